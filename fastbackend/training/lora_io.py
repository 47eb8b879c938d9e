"""LoRA layers on the denoiser (through peft) and the files they are saved to.

Files are keyed as ai-toolkit keys them, so diffusers' ``load_lora_weights`` and ComfyUI read
them: FLUX as ``transformer.<module>.lora_A/lora_B.weight``; SD 1.5 and SDXL as kohya's
``lora_unet_<module>.lora_down/lora_up.weight`` with ``.alpha``. The FLUX format carries no
alpha, so the ``alpha / rank`` scale is folded into ``lora_B`` there; kohya files keep the
real alpha. The header records how the LoRA was made.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from fastbackend.layout import HeaderKey
from fastbackend.storage import sha256_file, temporary_path
from fastbackend.training.families import Family

ADAPTER = "fastbackend"
ASSISTANT = "assistant"  # a training adapter (ai-toolkit's assistant_lora_path): on while training, off for samples
# The config's dtype names (train.dtype, save.dtype) -> torch dtypes.
TORCH_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def add_lora(
    module: torch.nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    shared_down: Sequence[tuple[str, ...]] = (),
) -> list[torch.nn.Parameter]:
    """Inject LoRA layers into the modules named ``targets`` and return their parameters (each once).

    Initialised as ai-toolkit does: ``lora_A`` Kaiming-uniform (a = sqrt(5), so |w| <= 1/sqrt(fan_in))
    and ``lora_B`` zero, so the model starts unchanged (peft's default initialisation). Each group of
    ``shared_down`` (layers the original model fuses into one, as FLUX.2's q, k and v) shares its first
    layer's ``lora_A``: one LoRA of rank ``rank`` on the fused layer, as ai-toolkit trains it there.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, target_modules=targets)
    module.requires_grad_(False)
    module.add_adapter(config, adapter_name=ADAPTER)  # ours becomes the only active adapter
    if ASSISTANT in getattr(module, "peft_config", {}):
        module.set_adapters([ASSISTANT, ADAPTER])  # the training adapter stays on beside ours, frozen:
        for name, param in module.named_parameters():
            param.requires_grad_(f".{ADAPTER}." in name)
    for first, *rest in shared_down:
        down = module.get_submodule(first).lora_A[ADAPTER]
        for name in rest:
            module.get_submodule(name).lora_A[ADAPTER] = down
    params = [p for name, p in module.named_parameters() if f".{ADAPTER}." in name]  # shared ones once
    for param in params:
        param.data = param.data.float()  # LoRA weights train in fp32 even over a bf16 base
        param.requires_grad_(True)
    return params


def add_assistant(pipe, denoiser: torch.nn.Module, path: str) -> None:
    """Load a training adapter onto ``denoiser`` through the pipeline's own LoRA loader (so any file
    it reads), frozen; its text-encoder layers, if any, are left out, as ai-toolkit applies it to the
    denoiser alone. ``add_lora`` keeps it on beside the LoRA that trains; ``assistant_off`` turns it
    off for samples: the base model with the trained LoRA alone, as ai-toolkit samples.

    Every layer of the file must land: diffusers only logs what it cannot place. The up-projections'
    sizes add up the same however a loader splits a fused layer, so they are what is compared."""
    from safetensors.torch import load_file

    state = {key: value for key, value in load_file(path).items() if not TEXT_ENCODER_KEY.match(key)}
    expected = sum(value.numel() for key, value in state.items() if UP_KEY.search(key))
    name = type(denoiser).__name__
    pipe.load_lora_weights(state, adapter_name=ASSISTANT)
    landed = sum(p.numel() for n, p in denoiser.named_parameters() if f".lora_B.{ASSISTANT}." in n)
    if landed == 0:
        raise ValueError(f"none of its layers is one of the {name}'s")
    if landed != expected:
        raise ValueError(f"only {landed:,} of its {expected:,} up-projection weights found a layer of the {name}")
    denoiser.requires_grad_(False)


@contextlib.contextmanager
def assistant_off(module: torch.nn.Module) -> Iterator[None]:
    """The training adapter's layers at scale 0 inside, back at 1 after (a no-op without one)."""
    from peft.tuners.lora import LoraLayer

    layers = [layer for layer in module.modules() if isinstance(layer, LoraLayer) and ASSISTANT in layer.scaling]
    for layer in layers:
        layer.set_scale(ASSISTANT, 0.0)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_scale(ASSISTANT, 1.0)


UP_KEY = re.compile(r"(lora_B|lora_up|lora\.up)\.")  # a LoRA file's up-projections, in the formats diffusers reads
TEXT_ENCODER_KEY = re.compile(r"(text_encoder|lora_te)")  # diffusers' and kohya's text-encoder layers

Components = dict[str, torch.nn.Module]  # pipeline name ("unet", "transformer", "text_encoder", ...) -> module
States = dict[str, dict[str, torch.Tensor]]  # the same names -> that module's LoRA weights


def lora_state(modules: Components) -> States:
    """The LoRA weights in peft's naming (``<module>.lora_A.weight``), detached on the CPU."""
    return {
        name: {
            key: value.detach().to("cpu", copy=True)
            for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()
        }
        for name, module in modules.items()
    }


def load_lora_state(modules: Components, states: States) -> None:
    for name, module in modules.items():
        result = set_peft_model_state_dict(module, states[name], adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"saved LoRA state does not fit {name}: {unexpected[:3]}")


def to_file_format(family: Family, states: States, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """peft-named weights -> the keys ai-toolkit writes for ``family``."""
    if family.file_format == "diffusers":
        scale = alpha / rank
        return family.file_tensors(
            {key: value * scale if ".lora_B." in key else value for key, value in states["transformer"].items()}
        )
    from diffusers.utils import convert_state_dict_to_kohya

    kohya: dict[str, torch.Tensor] = {}
    for name, state in states.items():
        denoiser = name == family.denoiser_name
        paths = {key if denoiser else clip_path(key): value for key, value in state.items()}
        # diffusers keys "unet.<path>" as lora_unet_<path with _>; each encoder then takes its own prefix.
        keyed = convert_state_dict_to_kohya({f"unet.{path}": value for path, value in paths.items()})
        prefix = "lora_unet_" if denoiser else family.kohya_text_encoder_prefixes[name]
        kohya |= {prefix + key.removeprefix("lora_unet_"): value for key, value in keyed.items()}
    return {key: torch.tensor(float(alpha)) if key.endswith(".alpha") else value for key, value in kohya.items()}


def clip_path(key: str) -> str:
    """A CLIP text encoder's module path as kohya, A1111, Forge and ComfyUI name it: transformers 5
    dropped CLIPTextModel's ``text_model`` wrapper (``encoder.layers.0...``); their maps expect it."""
    return f"text_model.{key}" if key.startswith("encoder.") else key


def save_lora(
    path: Path, family: Family, states: States, rank: int, alpha: float, dtype: str, metadata: dict[str, object]
) -> str:
    """Write the LoRA file atomically; returns its sha256."""
    keyed = to_file_format(family, states, rank, alpha)
    tensors = {key: value.to(TORCH_DTYPES[dtype]).contiguous() for key, value in keyed.items()}
    header = {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    with temporary_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        return sha256_file(tmp)


def lora_metadata(
    family: Family,
    base_model: str,
    rank: int,
    alpha: float,
    steps: int,
    resolutions: list[int],
    trigger_word: str | None,
    dataset_hash: str,
    name: str,
    config_json: str,
) -> dict[str, object]:
    """Header fields: ours, plus kohya's ``ss_*`` names where kohya has one."""
    return {
        HeaderKey.ARCH: family.name,
        HeaderKey.TRIGGER_WORD: trigger_word or "",
        HeaderKey.CONFIG: config_json,
        HeaderKey.OUTPUT_NAME: name,
        HeaderKey.BASE_MODEL: base_model,
        HeaderKey.BASE_MODEL_VERSION: family.kohya_base_version,
        HeaderKey.NETWORK_MODULE: "networks.lora",
        HeaderKey.RANK: str(rank),
        HeaderKey.ALPHA: str(alpha),
        HeaderKey.STEPS: str(steps),
        HeaderKey.RESOLUTION: json.dumps(resolutions),
        HeaderKey.DATASET_HASH: dataset_hash,
        HeaderKey.MODELSPEC_ARCHITECTURE: family.modelspec_architecture,
    }
