"""``train.preset``: settings chosen for the GPU, where the user's YAML leaves them open.

``fast`` switches off 8-bit base weights and gradient checkpointing, which only slow a step
down when the memory is there; ``low_memory`` switches both on and keeps the optimizer's state
in 8 bits; ``auto`` picks ``fast`` when the memory plan says the run fits the GPU with fast's
settings, else ``low_memory``. A key the user's YAML sets itself always wins; what a preset set,
and why, goes into ``warnings``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastbackend.config import PREFIX, ProcessConfig

SETTINGS: dict[str, dict[str, Any]] = {
    "fast": {"model.quantize": False, "train.gradient_checkpointing": False},
    "low_memory": {"model.quantize": True, "train.gradient_checkpointing": True, "train.optimizer": "adamw8bit"},
}


def apply_preset(
    process: ProcessConfig, gpu_gb: float | None, warnings: list[str], fits: Callable[[ProcessConfig], bool | None]
) -> None:
    """Apply ``process.train.preset`` to the keys the user's YAML did not set; ``fits`` is the
    memory plan's verdict on a candidate config for this GPU."""
    preset = process.train.preset
    if preset is None:
        return
    field = f"{PREFIX}.train.preset"
    chosen, why = preset, "as asked"
    if preset == "auto":
        if gpu_gb is None:  # the CPU, where neither setting makes a difference worth choosing for
            warnings.append(
                f"{field}: auto: no GPU here and no gpu_memory_gb in the request; the config stays as written"
            )
            return
        candidate = process.model_copy(deep=True)
        set_open_keys(candidate, "fast")
        chosen = "fast" if fits(candidate) else "low_memory"
        verdict = "fits" if chosen == "fast" else "does not fit"
        why = f"{gpu_gb:g} GB GPU: the memory plan with fast's settings {verdict}"
    changed, kept = set_open_keys(process, chosen)
    written = f"; kept as your YAML sets them: {', '.join(kept)}" if kept else ""
    warnings.append(f"{field}: {preset} chose {chosen} ({why}): {', '.join(changed) or 'nothing to change'}{written}")


def set_open_keys(process: ProcessConfig, preset: str) -> tuple[list[str], list[str]]:
    """Set ``preset``'s keys the YAML left open; (what changed, the keys the YAML set itself)."""
    changed, kept = [], []
    for key, value in SETTINGS[preset].items():
        section_name, name = key.split(".")
        section = getattr(process, section_name)
        if name in section.model_fields_set:
            kept.append(key)
            continue
        setattr(section, name, value)
        changed.append(f"{key}: {str(value).lower() if isinstance(value, bool) else value}")
    return changed, kept
