"""ai-toolkit's YAML training config, parsed into typed models and checked before anything heavy.

The schema is ai-toolkit's (``job: extension``, ``config.name``, ``config.process[0]`` with
``type: sd_trainer``). Every key is one of three things:

* implemented: a typed field below, with its bounds;
* known and ignored: listed in a section's ``IGNORED`` with the reason, reported in the job's
  ``warnings`` (``config.process[0].model.low_vram: ignored (...)``);
* unknown: refused with its full path and the nearest valid key, so a typo never passes silently.

All problems are collected and reported at once. Numbers are read as ai-toolkit reads them
(``lr: 1e-4`` is a float, not PyYAML's string) and ``[name]`` in values is the config name.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fastbackend.errors import ErrorCode, ValidationFailed, show_value
from fastbackend.schemas import SafeName, describe_error

MAX_YAML_BYTES = 256_000
# Nodes a config may expand to once aliases are followed: a real config has a few hundred;
# an alias bomb ("billion laughs") has billions.
MAX_EXPANDED_NODES = 20_000
# Where the one process section sits; error paths and warnings start with it.
PREFIX = "config.process[0]"
DTYPES = Literal["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"]


class Section(BaseModel):
    """A config section: strict keys; ``IGNORED`` maps accepted-but-unused keys to the reason."""

    model_config = ConfigDict(extra="forbid")
    IGNORED: typing.ClassVar[dict[str, str]] = {}


class NetworkConfig(Section):
    IGNORED = {
        "conv": "conv LoRA layers are not trained; linear layers only",
        "conv_alpha": "conv LoRA layers are not trained",
        "network_kwargs": "target modules are fixed per architecture",
        "transformer_only": "only the transformer / UNet is trained",
        "normalize": "not used by LoRA training",
    }
    type: Literal["lora"] = "lora"
    linear: int = Field(16, gt=0, le=512, description="LoRA rank.")
    linear_alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def rank(self) -> int:
        return self.linear

    @property
    def alpha(self) -> float:
        return self.linear_alpha if self.linear_alpha is not None else float(self.linear)


class SaveConfig(Section):
    IGNORED = {
        "hf_repo_id": "pushing to the hub is not done by this worker",
        "hf_private": "pushing to the hub is not done by this worker",
        "save_format": "LoRAs are always saved as safetensors",
    }
    dtype: DTYPES = "float16"
    save_every: int = Field(250, gt=0, description="Save <name>_<step>.safetensors every N steps.")
    max_step_saves_to_keep: int = Field(4, ge=0, description="Step saves kept; older ones are deleted.")
    push_to_hub: bool = False


class DatasetConfig(Section):
    IGNORED = dict.fromkeys(
        (
            "flip_x",
            "flip_y",
            "random_crop",
            "random_scale",
            "scale",
            "augments",
            "augmentations",
            "shuffle_augmentations",
            "control_path",
            "mask_path",
            "alpha_mask",
            "mask_min_value",
            "poi",
            "is_reg",
            "network_weight",
            "token_dropout_rate",
            "type",
            "random_triggers",
        ),
        "not supported; the dataset is used as uploaded",
    ) | {"buckets": "aspect-ratio buckets are always used", "bucket_tolerance": "buckets snap to the model's size step"}
    folder_path: str = Field(description="An uploaded dataset: its name, or a path under the data root.")
    caption_ext: Literal["txt", ".txt"] = "txt"
    caption_dropout_rate: float = Field(0.05, ge=0, le=1, description="Chance to train a step with an empty caption.")
    shuffle_tokens: bool = Field(False, description="Shuffle the comma-separated parts of captions each step.")
    keep_tokens: int = Field(0, ge=0, description="Leading caption parts never shuffled.")
    cache_latents: bool = Field(True, description="Encode each image once; false: the VAE encodes it every step.")
    cache_latents_to_disk: bool = Field(False, description="Also keep the latents beside the dataset for later runs.")
    resolution: list[int] = Field(default_factory=lambda: [512])
    num_repeats: int = Field(1, gt=0, description="Relative sampling weight of this dataset.")
    default_caption: str | None = None

    @field_validator("resolution", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("resolution")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("must list at least one resolution")
        for size in value:
            if not 32 <= size <= 4096:
                raise ValueError(f"each resolution must be between 32 and 4096, got {size}")
        return sorted(set(value))


class EmaConfig(Section):
    use_ema: bool = False
    ema_decay: float = Field(0.99, gt=0, lt=1)


# What each optimizer accepts in `optimizer_params` (the keyword arguments of its class).
OPTIMIZER_PARAMS = {
    "adamw": ("weight_decay", "betas", "eps"),
    "adam": ("weight_decay", "betas", "eps"),
    "adamw8bit": ("weight_decay", "betas", "eps"),
    "adam8bit": ("weight_decay", "betas", "eps"),
    "sgd": ("weight_decay", "momentum"),
    "prodigy": ("weight_decay", "betas", "eps", "d_coef"),
}


class TrainConfig(Section):
    IGNORED = {
        "xformers": "PyTorch's scaled-dot-product attention is always used",
        "sdp": "PyTorch's scaled-dot-product attention is always used",
        "embedding_lr": "no embeddings are trained",
        "adapter_lr": "no adapters are trained",
        "weight_jitter": "not supported",
        "merge_network_on_save": "the LoRA is always saved separately",
        "free_u": "not supported",
        "skip_first_sample": "no sample is made at step 0",
        "content_or_style": "timesteps follow `timestep_type`",
        "unload_text_encoder": "text encoders leave the device after caching anyway",
        "loss_type": "the loss is mean squared error",
        "start_step": "resume continues from the newest saved state",
        "bypass_guidance_embedding": "not supported",
        "min_denoising_steps": "timesteps follow `timestep_type`",
        "max_denoising_steps": "timesteps follow `timestep_type`",
    }
    batch_size: int = Field(1, gt=0, le=64)
    steps: int = Field(1000, gt=0, le=200_000)
    gradient_accumulation_steps: int = Field(1, gt=0, le=256)
    train_unet: bool = True
    train_text_encoder: bool = False
    gradient_checkpointing: bool = True
    noise_scheduler: Literal["flowmatch", "ddpm", "ddim", "euler", "euler_a", "lms", "dpmsolver"] = "ddpm"
    optimizer: Literal["adamw", "adamw8bit", "adam", "adam8bit", "sgd", "prodigy"] = "adamw"
    optimizer_params: dict[str, float | list[float]] = Field(default_factory=dict)
    lr: float = Field(1e-4, gt=0, le=10)
    unet_lr: float | None = Field(None, gt=0, le=10)
    text_encoder_lr: float | None = Field(None, gt=0, le=10, description="With train_text_encoder; default lr.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_scheduler_params: dict[str, float] = Field(default_factory=dict)
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    noise_offset: float = Field(0.0, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0)
    timestep_type: Literal["sigmoid", "linear", "shift"] | None = None
    linear_timesteps: bool = False
    ema_config: EmaConfig = Field(default_factory=EmaConfig)
    dtype: DTYPES = "bf16"
    seed: int | None = Field(None, ge=0)
    disable_sampling: bool = False
    cache_text_embeddings: bool = Field(True, description="Encode each caption once; false: every step.")

    @field_validator("optimizer_params")
    @classmethod
    def _optimizer_params_fit(cls, value: dict, info: ValidationInfo) -> dict:
        """Each parameter must be one the chosen optimizer takes, so a bad one is refused before any load."""
        if "optimizer" not in info.data:  # the optimizer itself is invalid: that error is enough
            return value
        optimizer = info.data["optimizer"]
        valid = OPTIMIZER_PARAMS[optimizer]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"not valid for {optimizer}: {unknown}; valid: {', '.join(valid)}")
        betas = value.get("betas")
        if betas is not None and (not isinstance(betas, list) or len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {show_value(betas)}")
        scalars = [key for key, item in value.items() if key != "betas" and isinstance(item, list)]
        if scalars:
            raise ValueError(f"{scalars[0]} must be a number, got {show_value(value[scalars[0]])}")
        return value

    @field_validator("lr_scheduler_params")
    @classmethod
    def _known_scheduler_params(cls, value: dict) -> dict:
        unknown = sorted(set(value) - {"num_cycles", "power"})
        if unknown:
            raise ValueError(f"unknown scheduler parameter(s) {unknown}; valid: num_cycles, power")
        return value

    @property
    def learning_rate(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.lr


class ModelConfig(Section):
    IGNORED = {
        "low_vram": "memory is managed by unloading encoders after caching",
        "quantize_te": "text encoders only run once, to cache embeddings",
        "qtype": "quantization is 8-bit through bitsandbytes",
        "text_encoder_bits": "text encoders only run once, to cache embeddings",
        "dtype": "the base model's dtype follows `train.dtype`",
        "assistant_lora_path": "not supported",
        "lora_path": "training starts from a fresh LoRA (or resumes its own)",
        "vae_path": "the base model's own VAE is used",
        "use_text_encoder_1": "both text encoders are used",
        "use_text_encoder_2": "both text encoders are used",
        "experimental_xl": "not needed",
    }
    name_or_path: str = Field(min_length=1, max_length=300, description="A hub id or a local diffusers folder.")
    arch: Literal["flux", "sdxl", "sd15", "sd1"] | None = None
    is_flux: bool = False
    is_xl: bool = False
    is_v2: bool = False
    is_v3: bool = False
    is_v_pred: bool = False
    quantize: bool = False
    revision: str | None = None

    @model_validator(mode="after")
    def _one_arch(self) -> ModelConfig:
        if self.is_v2 or self.is_v3:
            raise ValueError("Stable Diffusion 2 and 3 are not supported; use arch flux, sdxl or sd15")
        flags = [name for name, on in (("flux", self.is_flux), ("sdxl", self.is_xl)) if on]
        if len(flags) > 1 or (self.arch and flags and self.resolved_arch != flags[0]):
            raise ValueError(
                f"conflicting architecture settings: arch={self.arch!r}, is_flux={self.is_flux}, is_xl={self.is_xl}"
            )
        return self

    @property
    def resolved_arch(self) -> str:
        if self.arch:
            return "sd15" if self.arch == "sd1" else self.arch
        return "flux" if self.is_flux else "sdxl" if self.is_xl else "sd15"


class SampleConfig(Section):
    IGNORED = {
        "guidance_rescale": "not supported",
        "adapter_conditioning_scale": "no adapters",
        "samples": "use `prompts`",
        "refiner_start_at": "no refiner",
        "network_multiplier": "samples use the LoRA at full strength",
    }
    sampler: Literal["flowmatch", "ddpm", "ddim", "euler", "euler_a", "lms", "dpmsolver"] = Field(
        "flowmatch", description="Samples use the base model's own scheduler; a mismatch is warned about."
    )
    sample_every: int = Field(250, gt=0)
    width: int = Field(1024, ge=32, le=4096)
    height: int = Field(1024, ge=32, le=4096)
    prompts: list[str] = Field(default_factory=list, max_length=64)
    neg: str | bool = ""
    seed: int = Field(0, ge=0)
    walk_seed: bool = False
    guidance_scale: float = Field(4.0, ge=0, le=50)
    sample_steps: int = Field(20, gt=0, le=200)
    format: Literal["jpg", "png", "webp"] = "jpg"

    @property
    def negative_prompt(self) -> str:
        return self.neg if isinstance(self.neg, str) else ""


class ProcessConfig(Section):
    IGNORED = {
        "performance_log_every": "progress is reported through the job",
        "logging": "progress is reported through the job",
        "sqlite_db_path": "not used",
    }
    type: Literal["sd_trainer"]
    training_folder: str = "output"
    device: str = "cuda:0"
    trigger_word: str | None = Field(None, max_length=200)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = Field(min_length=1, max_length=16)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig
    sample: SampleConfig | None = None

    @model_validator(mode="after")
    def _something_to_train(self) -> ProcessConfig:
        if not self.train.train_unet:
            raise ValueError("train.train_unet is false: training only text encoders is not supported")
        return self


class JobSection(Section):
    name: SafeName
    process: list[ProcessConfig] = Field(min_length=1, max_length=1)


class TrainingConfig(Section):
    """The whole YAML document."""

    job: Literal["extension"]
    config: JobSection
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def process(self) -> ProcessConfig:
        return self.config.process[0]

    @property
    def name(self) -> str:
        return self.config.name


# ---------------------------------------------------------------- YAML reading


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as ai-toolkit's configs expect."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    if len(text.encode()) > MAX_YAML_BYTES:
        raise ValidationFailed(
            f"yaml_config: {len(text.encode()):,} bytes is over the {MAX_YAML_BYTES:,}-byte limit",
            code=ErrorCode.INVALID_CONFIG,
        )
    try:
        document = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as exc:
        raise ValidationFailed(
            f"yaml_config: not valid YAML ({' '.join(str(exc).split())[:200]})", code=ErrorCode.INVALID_CONFIG
        ) from None
    check_expanded_size(document)
    return document


def check_expanded_size(document: Any) -> None:
    """Refuse documents whose aliases expand to more than MAX_EXPANDED_NODES nodes."""
    budget = MAX_EXPANDED_NODES
    stack = [document]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ValidationFailed(
                f"yaml_config: expands to over {MAX_EXPANDED_NODES:,} values (a YAML alias bomb?)",
                code=ErrorCode.INVALID_CONFIG,
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def substitute_name(node: Any, name: str) -> Any:
    """ai-toolkit replaces ``[name]`` in every string value with the config's name."""
    if isinstance(node, str):
        return node.replace("[name]", name)
    if isinstance(node, list):
        return [substitute_name(item, name) for item in node]
    if isinstance(node, dict):
        return {key: substitute_name(value, name) for key, value in node.items()}
    return node


# ---------------------------------------------------------------- key sweep


def _section_of(annotation: Any) -> type[Section] | None:
    """The Section class a field holds (directly, in a list, or optionally), if any."""
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
        nested = [a for a in typing.get_args(candidate) if isinstance(a, type) and issubclass(a, Section)]
        if nested:
            return nested[0]
    return None


def sweep_keys(node: Any, section: type[Section], path: str, warnings: list[str], problems: list[str]) -> Any:
    """Drop known-ignored keys (with a warning) and unknown keys (with a problem), recursively."""
    if not isinstance(node, dict):
        return node
    kept = {}
    for key, value in node.items():
        key_path = f"{path}.{key}" if path else str(key)
        field = section.model_fields.get(key) if isinstance(key, str) else None
        if field is not None:
            child = _section_of(field.annotation)
            if child is not None and isinstance(value, list):
                value = [
                    sweep_keys(item, child, f"{key_path}[{i}]", warnings, problems) for i, item in enumerate(value)
                ]
            elif child is not None:
                value = sweep_keys(value, child, key_path, warnings, problems)
            kept[key] = value
        elif key in section.IGNORED:
            warnings.append(f"{key_path}: ignored ({section.IGNORED[key]})")
        else:
            problems.append(f"{key_path}: unknown key{_nearest(key, section)}")
    return kept


def _nearest(key: Any, section: type[Section]) -> str:
    valid = [*section.model_fields, *section.IGNORED]
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(section.model_fields)}"


# ---------------------------------------------------------------- entry point


def parse_training_config(source: str | dict) -> tuple[TrainingConfig, list[str]]:
    """The typed config and the warnings for ignored keys; ValidationFailed lists every problem."""
    document = read_yaml(source) if isinstance(source, str) else source
    if not isinstance(document, dict):
        raise ValidationFailed(
            f"config: must be a mapping with `job` and `config`, got {show_value(document)}",
            code=ErrorCode.INVALID_CONFIG,
        )
    section = document.get("config")
    if isinstance(section, dict) and isinstance(section.get("name"), str):
        document = substitute_name(document, section["name"])
    warnings: list[str] = []
    problems: list[str] = []
    document = sweep_keys(document, TrainingConfig, "", warnings, problems)
    try:
        config = TrainingConfig.model_validate(document)
    except ValidationError as exc:
        problems += [describe_error(error, root="") for error in exc.errors(include_url=False)]
        config = None
    if problems:
        raise ValidationFailed.from_problems(problems, code=ErrorCode.INVALID_CONFIG)
    return config, warnings + semantic_warnings(config)


def unused_for_arch(process: ProcessConfig) -> list[tuple[str, str]]:
    """Keys that are set but that the chosen architecture's objective does not use."""
    train, arch = process.train, process.model.resolved_arch
    if arch == "flux":
        candidates = [
            ("train.noise_offset", train.noise_offset > 0, "an SD 1.5 / SDXL setting; FLUX uses flow matching"),
            ("train.min_snr_gamma", train.min_snr_gamma is not None, "an SD 1.5 / SDXL setting"),
            ("model.is_v_pred", process.model.is_v_pred, "an SD 1.5 / SDXL setting"),
            ("sample.neg", bool(process.sample and process.sample.negative_prompt), "FLUX samples take no negative"),
        ]
    else:
        candidates = [
            ("train.timestep_type", train.timestep_type is not None, "a FLUX setting; timesteps are uniform"),
            ("train.linear_timesteps", train.linear_timesteps, "a FLUX setting; timesteps are uniform"),
        ]
    return [(path, why) for path, is_set, why in candidates if is_set]


def semantic_warnings(config: TrainingConfig) -> list[str]:
    """Settings that are valid but will not do what they might seem to."""
    process = config.process
    notes = []
    if process.train.train_text_encoder and process.model.resolved_arch == "flux":
        notes.append(f"{PREFIX}.train.train_text_encoder: ignored (FLUX text encoders stay frozen, as in ai-toolkit)")
    if process.save.push_to_hub:
        notes.append(f"{PREFIX}.save.push_to_hub: ignored (download the LoRA with download_model)")
    notes += [f"{PREFIX}.{path}: ignored ({why})" for path, why in unused_for_arch(process)]
    objective = "flowmatch" if process.model.resolved_arch == "flux" else "ddpm"
    if process.sample is not None and (process.sample.sampler == "flowmatch") != (objective == "flowmatch"):
        notes.append(
            f"{PREFIX}.sample.sampler: {process.sample.sampler!r} does not fit {process.model.resolved_arch}; "
            "samples use the model's own scheduler"
        )
    if (process.train.noise_scheduler == "flowmatch") != (objective == "flowmatch"):
        notes.append(
            f"{PREFIX}.train.noise_scheduler: {process.train.noise_scheduler!r} does not fit "
            f"{process.model.resolved_arch}; its own objective ({objective}) is used"
        )
    return notes
