"""``train.preset``: settings chosen for the GPU, where the user's YAML leaves them open.

``fast`` switches off 8-bit base weights and gradient checkpointing, which only slow a step
down when the memory is there; ``low_memory`` switches both on and keeps the optimizer's state
in 8 bits; ``auto`` picks ``fast`` on GPUs of ``ROOMY_GB`` and more, else ``low_memory``. A key
the user's YAML sets itself always wins; what a preset set, and why, goes into ``warnings``.
"""

from __future__ import annotations

from typing import Any

from fastbackend.config import PREFIX, ProcessConfig

# 80 GB cards (A100 80GB, H100) hold FLUX.1-dev's bf16 weights (24 GB), a rank-16 LoRA's
# optimizer state and 1024 px activations without checkpointing; hosted FLUX trainers switch
# quantization and checkpointing off from 100 GB. Not yet measured here (README: On a GPU).
ROOMY_GB = 80.0
SETTINGS: dict[str, dict[str, Any]] = {
    "fast": {"model.quantize": False, "train.gradient_checkpointing": False},
    "low_memory": {"model.quantize": True, "train.gradient_checkpointing": True, "train.optimizer": "adamw8bit"},
}


def apply_preset(process: ProcessConfig, gpu_gb: float | None, warnings: list[str]) -> None:
    """Apply ``process.train.preset`` to the keys the user's YAML did not set."""
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
        chosen = "fast" if gpu_gb >= ROOMY_GB else "low_memory"
        why = f"{gpu_gb:g} GB GPU, {'at least' if chosen == 'fast' else 'under'} {ROOMY_GB:g} GB"
    changed, kept = [], []
    for key, value in SETTINGS[chosen].items():
        section_name, name = key.split(".")
        section = getattr(process, section_name)
        if name in section.model_fields_set:
            kept.append(key)
            continue
        setattr(section, name, value)
        changed.append(f"{key}: {str(value).lower() if isinstance(value, bool) else value}")
    written = f"; kept as your YAML sets them: {', '.join(kept)}" if kept else ""
    warnings.append(f"{field}: {preset} chose {chosen} ({why}): {', '.join(changed) or 'nothing to change'}{written}")
