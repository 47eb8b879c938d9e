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
import math
import re
import typing
from collections.abc import Callable
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
# ai-toolkit's defaults where this worker's recipe depends on them (toolkit/config_modules.py).
DEFAULT_RANK = 4
# Seeds go to torch generators (at most 2**64 - 1) after small offsets (walk_seed, seed + 1).
MAX_SEED = 2**32 - 1
# The families this worker trains (training/families registers the same names; a test compares),
# ai-toolkit's other names for them, and its flags for families it does not train yet.
ARCHES = ("flux", "sdxl", "sd15", "zimage", "qwen_image", "flux2", "flux2_klein_4b", "flux2_klein_9b")
# The families trained by flow matching (the rest learn DDPM noise), and those whose text encoders
# can take a LoRA.
FLOW_MATCHING = ("flux", "zimage", "qwen_image", "flux2", "flux2_klein_4b", "flux2_klein_9b")
TRAINABLE_TEXT_ENCODERS = ("sdxl", "sd15")
SHOWN_ARCH = {
    "flux": "FLUX",
    "sdxl": "SDXL",
    "sd15": "SD 1.5",
    "zimage": "Z-Image",
    "qwen_image": "Qwen-Image",
    "flux2": "FLUX.2 [dev]",
    "flux2_klein_4b": "FLUX.2 [klein]",
    "flux2_klein_9b": "FLUX.2 [klein]",
}  # in messages
ARCH_ALIASES = {"sd1": "sd15", "flex1": "flux", "ssd": "sdxl", "vega": "sdxl"}
# ai-toolkit's zimage:turbo trains Z-Image-Turbo through a training adapter: a LoRA on while training,
# off for samples, so the LoRA learns the subject, not how to undo the distillation. Its UI writes this
# one (v2); a config that names none gets it too.
ZIMAGE_TURBO_ADAPTER = "ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors"
UNSUPPORTED_FLAGS = ("is_v2", "is_v3", "is_pixart", "is_pixart_sigma", "is_auraflow", "is_lumina2")
DTYPES = Literal["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"]
# ai-toolkit's other spellings of the same dtypes (toolkit/train_tools.py get_torch_dtype).
DTYPE_ALIASES = {"half": "fp16", "float": "fp32", "single": "fp32"}


# When an ignored or refused key changes nothing in ai-toolkit's run either: (its value, the section
# it is in) -> True. A key at ai-toolkit's own default, or one whose feature another key leaves off,
# is dropped without a word, so that the warnings that remain are the ones that change the run.
Inert = Callable[[Any, dict], bool]


def default(*values: Any) -> Inert:
    """Inert at any of ``values`` (ai-toolkit's default, and what means the same)."""
    return lambda value, section: any(_same(value, v) for v in values)


def _same(value: Any, wanted: Any) -> bool:
    if isinstance(value, bool) or isinstance(wanted, bool):  # true is not 1 here, nor false 0
        return value is wanted
    return bool(value == wanted)


def unless(switch: str) -> Inert:
    """Inert while the section's ``switch`` key (the feature this key tunes) is off or absent."""
    return lambda value, section: not section.get(switch)


def always(value: Any, section: dict) -> bool:
    """Inert whatever its value: it tunes bookkeeping or a feature this key's section cannot have."""
    return True


def empty(value: Any, section: dict) -> bool:
    """Inert when empty: nothing, or a mapping of nothing but empty values."""
    blank: tuple[Any, ...] = (None, "", [], {})
    return value in blank or (isinstance(value, dict) and all(v in blank for v in value.values()))


class Section(BaseModel):
    """A config section: strict keys; ``IGNORED`` maps accepted-but-unused keys to the reason."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN lr would train a NaN LoRA
    IGNORED: typing.ClassVar[dict[str, str]] = {}
    # Keys that ask for something this worker does not do: refused with why, not as typos.
    REFUSED: typing.ClassVar[dict[str, str]] = {}
    # Ignored or refused keys at values that change nothing in ai-toolkit's run: no word about them.
    INERT: typing.ClassVar[dict[str, Inert]] = {}

    @classmethod
    def fields_by_key(cls) -> dict[str, Any]:
        """Fields by the key a YAML file uses (the alias where the attribute is named otherwise)."""
        return {field.alias or name: field for name, field in cls.model_fields.items()}


class NetworkConfig(Section):
    INERT = {
        "conv": default(None, 0),
        "conv_alpha": always,  # said once, with conv
        "network_kwargs": empty,
        "lokr_full_rank": always,  # LoKr settings: this section's type is lora
        "lokr_factor": always,
        "old_lokr_format": always,
    }
    IGNORED = {
        "conv": "conv LoRA layers (ResNet blocks) are not trained; the transformer blocks' layers are",
        "conv_alpha": "conv LoRA layers are not trained",
        "network_kwargs": "target modules are fixed per architecture, as ai-toolkit's defaults choose them",
        "transformer_only": "only the transformer blocks are trained (ai-toolkit's default)",
        "normalize": "not used by LoRA training",
        "lorm": "not supported",
        "lokr_full_rank": "only LoRA is trained",
        "lokr_factor": "only LoRA is trained",
        "old_lokr_format": "only LoRA is trained",
        "split_multistage_loras": "no multi-stage models",
        "layer_offloading": "not supported",
        "pretrained_lora_path": "training starts from a fresh LoRA (or resumes its own)",
        "all_layers": "only the transformer blocks' linear layers are trained",
    }
    type: Literal["lora"] = "lora"  # ai-toolkit lower-cases it (LoRA, Lora)
    linear: int | None = Field(None, gt=0, le=512, description="LoRA rank (ai-toolkit's default 4).")
    rank_key: int | None = Field(None, alias="rank", gt=0, le=512, description="LoRA rank; wins over `linear`.")
    linear_alpha: float | None = Field(
        None,
        ge=0,
        description="LoRA alpha (SD 1.5 / SDXL): the update is scaled by alpha / rank. The transformer families "
        "(FLUX, FLUX.2, Z-Image, Qwen-Image) train at 1.",
    )
    alpha_key: float = Field(1.0, alias="alpha", ge=0, description="`linear_alpha` when that is not given.")
    dropout: float | None = Field(None, ge=0, lt=1)

    @field_validator("type", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def rank(self) -> int:
        return self.rank_key or self.linear or DEFAULT_RANK

    @property
    def alpha(self) -> float:
        alpha = self.linear_alpha if self.linear_alpha is not None else self.alpha_key
        return alpha or float(self.rank)  # ai-toolkit: alpha 0 means alpha = rank

    @property
    def alpha_given(self) -> bool:
        return bool({"linear_alpha", "alpha_key"} & self.model_fields_set)


class SaveConfig(Section):
    INERT = {"save_format": always, "hf_private": always, "hf_repo_id": empty}  # the file, not the training
    IGNORED = {
        "hf_repo_id": "pushing to the hub is not done by this worker",
        "hf_private": "pushing to the hub is not done by this worker",
        "save_format": "LoRAs are always saved as safetensors",
    }
    dtype: DTYPES = "float16"
    save_every: int = Field(1000, gt=0, description="Save <name>_<step>.safetensors every N steps.")
    max_step_saves_to_keep: int = Field(5, ge=0, description="Step saves kept; older ones are deleted.")
    push_to_hub: bool = False


class DatasetConfig(Section):
    # ai-toolkit's DatasetConfig defaults (toolkit/config_modules.py), and keys that only tune an off feature
    INERT = {
        "flip_x": default(False),
        "flip_y": default(False),
        "random_crop": default(False),
        "random_scale": default(False),
        "scale": default(1.0),
        "augments": empty,
        "augmentations": empty,
        "shuffle_augmentations": unless("augmentations"),
        "control_path": empty,
        "mask_path": empty,
        "mask_min_value": unless("mask_path"),
        "alpha_mask": default(False),
        "invert_mask": unless("mask_path"),
        "is_reg": default(False),
        "prior_reg": default(False),
        "network_weight": default(1.0),
        "token_dropout_rate": default(0.0),
        "type": default("image"),
        "random_triggers": empty,
        "random_triggers_max": unless("random_triggers"),
        "dataset_path": empty,
        "control_path_1": empty,
        "control_path_2": empty,
        "control_path_3": empty,
        "control_from_same_folder": default(False),
        "num_controls_from_same_folder": unless("control_from_same_folder"),
        "control_transparent_color": unless("control_path"),
        "inpaint_path": empty,
        "full_size_control_images": unless("control_path"),
        "unconditional_path": empty,
        "use_short_captions": default(False),
        "clip_image_path": empty,
        "clip_image_from_same_folder": default(False),
        "clip_image_augmentations": empty,
        "clip_image_shuffle_augmentations": unless("clip_image_augmentations"),
        "replacements": empty,
        "loss_multiplier": default(1.0),
        "extra_values": empty,
        "square_crop": default(False),
        "replay_transforms": always,  # only with augmentations, themselves warned about
        "num_frames": default(1),
        "shrink_video_to_frames": always,  # video settings: only with num_frames, itself warned about
        "fps": always,
        "auto_frame_count": default(False),
        "controls": empty,
        "do_i2v": always,
        "do_audio": default(False),
        "audio_preserve_pitch": unless("do_audio"),
        "audio_normalize": unless("do_audio"),
        "standardize_images": default(False),
        "buckets": default(True),
        "bucket_tolerance": default(64),
        "cache_clip_vision_to_disk": default(False),
        "load_image_when_caching_latents": always,  # when images are read, not what is trained
        "num_workers": always,
        "prefetch_factor": always,
        "cache_latents_num_workers": always,
        "debug": always,
        "fast_image_size": default(False),
        "keep_tokens": default(0),
    }
    REFUSED = {
        "is_reg": "regularization datasets are not supported: ai-toolkit trains them without the trigger word, "
        "in turns with the subject's photos, and as subject photos they would teach the trigger word on other "
        "people; leave this dataset out (or set is_reg: false to train it as the subject)",
    }
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
            "prior_reg",
            "network_weight",
            "token_dropout_rate",
            "type",
            "random_triggers",
            "random_triggers_max",
            "dataset_path",
            "control_path_1",
            "control_path_2",
            "control_path_3",
            "control_from_same_folder",
            "num_controls_from_same_folder",
            "control_transparent_color",
            "inpaint_path",
            "full_size_control_images",
            "unconditional_path",
            "invert_mask",
            "use_short_captions",
            "clip_image_path",
            "clip_image_from_same_folder",
            "clip_image_augmentations",
            "clip_image_shuffle_augmentations",
            "replacements",
            "loss_multiplier",
            "extra_values",
            "square_crop",
            "replay_transforms",
            "num_frames",
            "shrink_video_to_frames",
            "fps",
            "auto_frame_count",
            "trim_auto_frame_count_tail",
            "controls",
            "do_i2v",
            "do_audio",
            "audio_preserve_pitch",
            "audio_normalize",
            "guidance_type",
            "standardize_images",
            "diff_output_preservation",
            "diff_output_preservation_class",
        ),
        "not supported; the dataset is used as uploaded",
    ) | {
        "buckets": "aspect-ratio buckets are always used",
        "bucket_tolerance": "buckets snap to the model's size step",
        "batch_size": "train.batch_size applies to every dataset",
        "cache_text_embeddings": "train.cache_text_embeddings applies to every dataset",
        "cache_tensors_to_disk": "latents are cached by cache_latents_to_disk",
        "cache_clip_vision_to_disk": "no vision encoder",
        "load_image_when_caching_latents": "images are read when their latents are cached",
        "num_workers": "images are read in the worker's own process",
        "prefetch_factor": "images are read in the worker's own process",
        "cache_latents_num_workers": "images are read in the worker's own process",
        "debug": "progress is reported through the job",
        "fast_image_size": "image sizes come from the manifest",
        "keep_tokens": "ai-toolkit applies it to token_dropout_rate only, which is not supported",
    }
    folder_path: str = Field(description="An uploaded dataset: its name, or a path under the data root.")
    caption_ext: Literal["txt", ".txt"] = "txt"
    caption_type: Literal["txt", ".txt"] | None = Field(None, description="ai-toolkit's older name for caption_ext.")
    caption_dropout_rate: float = Field(
        0.0, ge=0, le=1, description="Chance a step trains on the trigger word alone (or empty) instead of the caption."
    )
    shuffle_tokens: bool = Field(False, description="Shuffle the comma-separated parts of captions each step.")
    cache_latents: bool = Field(True, description="Encode each image once; false: the VAE encodes it every step.")
    cache_latents_to_disk: bool = Field(False, description="Also keep the latents beside the dataset for later runs.")
    resolution: list[int] = Field(default_factory=lambda: [512])
    num_repeats: int = Field(1, gt=0, description="Relative sampling weight of this dataset.")
    default_caption: str | None = None
    trigger_word: str | None = Field(None, max_length=200, description="This dataset's trigger; default the process's.")
    face_crop: bool | None = Field(
        None, description="Crop around the photo's face (default: wherever a face is found); false: centred."
    )
    require_faces: bool = Field(
        False, description="Refuse to train when the dataset report finds a photo with no face or another person."
    )

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
    IGNORED = {"use_feedback": "not supported", "param_multiplier": "not supported"}
    use_ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1, description="Constant decay, no warm-up (ai-toolkit).")


# What each optimizer accepts in `optimizer_params` (the keyword arguments of its class).
OPTIMIZER_PARAMS = {
    "adamw": ("weight_decay", "betas", "eps"),
    "adam": ("weight_decay", "betas", "eps"),
    "adamw8bit": ("weight_decay", "betas", "eps"),
    "adam8bit": ("weight_decay", "betas", "eps"),
    "sgd": ("weight_decay", "momentum"),
    "prodigy": ("weight_decay", "betas", "eps", "d_coef"),
}


# Scheduler parameters: num_cycles, power (diffusers' schedules), start_factor and end_factor
# (`linear`, torch's LinearLR as ai-toolkit uses it), num_warmup_steps (ai-toolkit's warm-up key),
# cosine_decay_steps and eta_min (ai-toolkit's cosine).
SCHEDULER_PARAMS = (
    "num_cycles",
    "power",
    "start_factor",
    "end_factor",
    "num_warmup_steps",
    "cosine_decay_steps",
    "eta_min",
)


class TrainConfig(Section):
    # ai-toolkit's TrainConfig defaults (toolkit/config_modules.py), and keys that only tune an off feature
    INERT = {
        "xformers": always,  # attention kernels: the same arithmetic
        "sdp": always,
        "attention_backend": always,
        "weight_jitter": default(0.0),
        "merge_network_on_save": default(False),
        "merge_network_on_save_strength": unless("merge_network_on_save"),
        "free_u": default(False),
        "skip_first_sample": default(True),  # no sample at step 0 here
        "force_first_sample": default(False),
        "unload_text_encoder": default(False),
        "loss_type": default("mse"),
        "start_step": default(None),
        "bypass_guidance_embedding": default(False),
        "min_denoising_steps": default(0),
        "max_denoising_steps": default(999, 1000),
        "train_refiner": always,  # no model here has a refiner
        "refiner_lr": always,
        "train_turbo": default(False),
        "show_turbo_outputs": default(False),
        "snr_gamma": default(None),
        "learnable_snr_gos": default(False),
        "adapter_assist_name_or_path": empty,
        "adapter_assist_type": unless("adapter_assist_name_or_path"),
        "noise_multiplier": default(1.0),
        "target_noise_multiplier": default(1.0),
        "random_noise_multiplier": default(0.0),
        "do_signal_correction_noise": default(False),
        "signal_correction_noise_scale": unless("do_signal_correction_noise"),
        "do_batch_noise_correction": default(False),
        "batch_noise_correction_scale": unless("do_batch_noise_correction"),
        "do_signal_amplification": default(False),
        "signal_amplification_strength": unless("do_signal_amplification"),
        "random_noise_shift": default(0.0),
        "img_multiplier": default(1.0),
        "noisy_latent_multiplier": default(1.0),
        "latent_multiplier": default(1.0),
        "negative_prompt": empty,
        "max_negative_prompts": unless("negative_prompt"),
        "reg_weight": always,  # only with regularization datasets, which are refused
        "num_train_timesteps": default(1000),
        "adaptive_scaling_factor": default(False),
        "prompt_dropout_prob": default(0.0),
        "match_noise_norm": default(False),
        "short_and_long_captions": default(False),
        "short_and_long_captions_encoder_split": default(False),
        "single_item_batching": default(False),
        "match_adapter_assist": default(False),
        "match_adapter_chance": default(0.0),
        "loss_target": default("noise"),
        "inverted_mask_prior": default(False),
        "inverted_mask_prior_multiplier": unless("inverted_mask_prior"),
        "diff_output_preservation": default(False),
        "diff_output_preservation_multiplier": unless("diff_output_preservation"),
        "diff_output_preservation_class": unless("diff_output_preservation"),
        "blank_prompt_preservation": default(False),
        "blank_prompt_preservation_multiplier": unless("blank_prompt_preservation"),
        "standardize_images": default(False),
        "standardize_latents": default(False),
        "dynamic_noise_offset": default(False),
        "do_cfg": default(False),
        "do_random_cfg": default(False),
        "cfg_scale": default(1.0),
        "max_cfg_scale": unless("do_cfg"),
        "cfg_rescale": unless("do_cfg"),
        "correct_pred_norm": default(False),
        "correct_pred_norm_multiplier": unless("correct_pred_norm"),
        "t0_loss_target": default(False),
        "t0_velocity_equiv_weight": default(False),
        "do_fft_loss": default(False),
        "do_fft_velocity_equiv_weight": default(False),
        "pred_scaler": default(1.0),
        "prompt_saturation_chance": default(0.0),
        "switch_boundary_every": always,  # multi-stage (two-expert) models only
    }
    IGNORED = {
        "xformers": "PyTorch's scaled-dot-product attention is always used",
        "sdp": "PyTorch's scaled-dot-product attention is always used",
        "embedding_lr": "no embeddings are trained",
        "adapter_lr": "no adapters are trained",
        "weight_jitter": "not supported",
        "merge_network_on_save": "the LoRA is always saved separately",
        "free_u": "not supported",
        "skip_first_sample": "no sample is made at step 0",
        "unload_text_encoder": "text encoders leave the device after caching anyway",
        "loss_type": "the loss is mean squared error",
        "start_step": "resume continues from the newest saved state",
        "bypass_guidance_embedding": "not supported",
        "min_denoising_steps": "timesteps follow `timestep_type`",
        "max_denoising_steps": "timesteps follow `timestep_type`",
        "unet_lr": "ai-toolkit trains every LoRA layer at train.lr",
        "text_encoder_lr": "ai-toolkit trains every LoRA layer at train.lr",
        "attention_backend": "PyTorch's scaled-dot-product attention is always used",
        "train_refiner": "no refiner",
        "refiner_lr": "no refiner",
        "train_turbo": "not supported",
        "show_turbo_outputs": "not supported",
        "snr_gamma": "use min_snr_gamma",
        "learnable_snr_gos": "not supported",
        "force_first_sample": "no sample is made at step 0",
        "merge_network_on_save_strength": "the LoRA is always saved separately",
        "adapter_assist_name_or_path": "no adapters are trained",
        "adapter_assist_type": "no adapters are trained",
        "noise_multiplier": "not supported",
        "target_noise_multiplier": "not supported",
        "random_noise_multiplier": "not supported",
        "do_signal_correction_noise": "not supported",
        "signal_correction_noise_scale": "not supported",
        "do_batch_noise_correction": "not supported",
        "batch_noise_correction_scale": "not supported",
        "do_signal_amplification": "not supported",
        "signal_amplification_strength": "not supported",
        "random_noise_shift": "not supported",
        "img_multiplier": "not supported",
        "noisy_latent_multiplier": "not supported",
        "latent_multiplier": "not supported",
        "negative_prompt": "not supported",
        "max_negative_prompts": "not supported",
        "reg_weight": "no regularisation datasets",
        "num_train_timesteps": "the scheduler's own (1000) is used",
        "adaptive_scaling_factor": "not supported",
        "prompt_dropout_prob": "use datasets[].caption_dropout_rate",
        "match_noise_norm": "not supported",
        "short_and_long_captions": "not supported",
        "short_and_long_captions_encoder_split": "not supported",
        "single_item_batching": "not supported",
        "match_adapter_assist": "no adapters are trained",
        "match_adapter_chance": "no adapters are trained",
        "loss_target": "the target is the family's own (noise, v or velocity)",
        "inverted_mask_prior": "no masks",
        "inverted_mask_prior_multiplier": "no masks",
        "diff_output_preservation": "not supported",
        "diff_output_preservation_multiplier": "not supported",
        "diff_output_preservation_class": "not supported",
        "blank_prompt_preservation": "not supported",
        "blank_prompt_preservation_multiplier": "not supported",
        "standardize_images": "not supported",
        "standardize_latents": "not supported",
        "dynamic_noise_offset": "not supported",
        "do_cfg": "not supported",
        "do_random_cfg": "not supported",
        "cfg_scale": "not supported",
        "max_cfg_scale": "not supported",
        "cfg_rescale": "not supported",
        "correct_pred_norm": "not supported",
        "correct_pred_norm_multiplier": "not supported",
        "t0_loss_target": "not supported",
        "t0_velocity_equiv_weight": "not supported",
        "do_fft_loss": "not supported",
        "do_fft_velocity_equiv_weight": "not supported",
        "pred_scaler": "not supported",
        "prompt_saturation_chance": "not supported",
        "do_prior_divergence": "not supported",
        "target_norm_std": "not supported",
        "target_norm_std_value": "not supported",
        "next_sample_timesteps": "timestep_type next_sample is not supported",
        "linear_timesteps2": "use linear_timesteps",
        "do_paramiter_swapping": "not supported",
        "paramiter_swapping_factor": "not supported",
        "latent_feature_extractor_path": "not supported",
        "latent_feature_loss_weight": "not supported",
        "diffusion_feature_extractor_path": "not supported",
        "diffusion_feature_extractor_weight": "not supported",
        "optimal_noise_pairing_samples": "not supported",
        "force_consistent_noise": "not supported",
        "blended_blur_noise": "not supported",
        "do_guidance_loss": "not supported",
        "guidance_loss_target": "not supported",
        "do_guidance_loss_cfg_zero": "not supported",
        "guidance_loss_schedule": "not supported",
        "unconditional_prompt": "not supported",
        "do_differential_guidance": "not supported",
        "differential_guidance_scale": "not supported",
        "switch_boundary_every": "no multi-stage models",
        "do_blank_stabilization": "not supported",
        "audio_loss_multiplier": "no audio",
        "max_loss_debug": "not supported",
        "max_loss": "not supported",
        "validation_config": "not supported",
    }
    batch_size: int = Field(1, gt=0, le=64)
    steps: int = Field(1000, gt=0, le=200_000)
    gradient_accumulation_steps: int = Field(
        1, gt=0, le=256, description="Micro-batches per optimizer step; `steps` counts micro-batches (ai-toolkit)."
    )
    gradient_accumulation: int = Field(
        1, gt=0, le=256, description="Batches per optimizer step; `steps` counts optimizer steps (ai-toolkit)."
    )
    train_unet: bool = True
    train_text_encoder: bool = False
    gradient_checkpointing: bool = True
    compile: bool = Field(False, description="torch.compile the denoiser's repeated blocks (this worker's key).")
    preset: Literal["auto", "fast", "low_memory"] | None = Field(
        None, description="Settings for the GPU where the YAML leaves them open (this worker's key; presets.py)."
    )
    noise_scheduler: Literal["flowmatch", "ddpm", "ddim", "euler", "euler_a", "lms", "dpmsolver"] = "ddpm"
    optimizer: Literal["adamw", "adamw8bit", "adam", "adam8bit", "sgd", "prodigy"] = "adamw"
    optimizer_params: dict[str, float | list[float]] = Field(default_factory=dict)
    lr: float = Field(1e-6, gt=0, le=10, description="ai-toolkit's default when omitted: 1e-6.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_scheduler_params: dict[str, float] = Field(default_factory=dict)
    lr_warmup_steps: int | None = Field(
        None, ge=0, description="Not an ai-toolkit key, unused as there: lr_scheduler_params.num_warmup_steps warms up."
    )
    max_grad_norm: float = Field(1.0, ge=0)
    noise_offset: float = Field(0.0, ge=0, le=1)
    min_snr_gamma: float | None = Field(None, gt=0)
    timestep_type: Literal["sigmoid", "linear", "shift", "flux_shift", "lumina2_shift", "weighted"] | None = None
    linear_timesteps: bool = Field(False, description="FLUX: uniform timesteps, the loss weighted by a bell curve.")
    content_or_style: Literal["balanced", "content", "style"] = Field(
        "balanced", description="Timestep bias: content towards high noise, style towards low noise."
    )
    ema_config: EmaConfig = Field(default_factory=EmaConfig)

    @field_validator("ema_config", mode="before")
    @classmethod
    def _no_ema_section(cls, value: Any) -> Any:
        return {} if value is None else value  # `ema_config:` left empty means its defaults

    @field_validator("optimizer", mode="before")
    @classmethod
    def _lower_optimizer(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # as ai-toolkit (AdamW8bit)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    dtype: DTYPES = Field("fp32", description="Mixed precision of the base model on CUDA (ai-toolkit: fp32).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    disable_sampling: bool = False
    cache_text_embeddings: bool = Field(True, description="Encode each caption once; false: every step.")
    face_loss_weight: float | None = Field(
        None, gt=0, le=100, description="Multiply the loss inside each photo's face box by this (this worker's key)."
    )
    early_stop_on_likeness: int | None = Field(
        None, gt=0, description="End the run when likeness has not improved for this many saves (this worker's key)."
    )

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
        for key, low in (("eps", 0.0), ("d_coef", 0.0)):  # the optimizers refuse these only once a model is loaded
            if key in value and not value[key] > low:
                raise ValueError(f"{key} must be > {low:g}, got {show_value(value[key])}")
        for key in ("weight_decay", "momentum"):
            if key in value and not value[key] >= 0:
                raise ValueError(f"{key} must be >= 0, got {show_value(value[key])}")
        return value

    @field_validator("lr_scheduler_params")
    @classmethod
    def _known_scheduler_params(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(SCHEDULER_PARAMS))
        if unknown:
            raise ValueError(f"unknown scheduler parameter(s) {unknown}; valid: {', '.join(SCHEDULER_PARAMS)}")
        return value

    @model_validator(mode="after")
    def _one_kind_of_accumulation(self) -> TrainConfig:
        if self.gradient_accumulation > 1 and self.gradient_accumulation_steps > 1:
            raise ValueError("set gradient_accumulation or gradient_accumulation_steps, not both (as in ai-toolkit)")
        return self


class ModelConfig(Section):
    INERT = {
        "low_vram": always,  # where weights wait, not what is trained
        "quantize_te": default(False),
        "qtype": unless("quantize"),
        "qtype_te": unless("quantize_te"),
        "model_kwargs": empty,
        "lora_path": empty,
        "vae_path": empty,
    }
    IGNORED = {
        "low_vram": "memory is managed by unloading encoders after caching",
        "quantize_te": "text encoders only run once, to cache embeddings",
        "qtype": "quantization is bitsandbytes 8-bit (LLM.int8), not ai-toolkit's qfloat8",
        "text_encoder_bits": "text encoders only run once, to cache embeddings",
        "dtype": "the base model's dtype follows `train.dtype`",
        "lora_path": "training starts from a fresh LoRA (or resumes its own)",
        "vae_path": "the base model's own VAE is used",
        "use_text_encoder_1": "both text encoders are used",
        "use_text_encoder_2": "both text encoders are used",
        "experimental_xl": "not needed",
        "qtype_te": "text encoders only run once, to cache embeddings",
        "quantize_kwargs": "quantization covers the denoiser's linear layers",
        "attn_masking": "not supported",
        "ignore_if_contains": "only LoRA layers train",
        "only_if_contains": "only LoRA layers train",
        "split_model_over_gpus": "one GPU per job",
        "split_model_other_module_param_count_scale": "one GPU per job",
        "te_name_or_path": "the base model's own text encoders are used",
        "auto_memory": "not supported",
        "layer_offloading": "not supported",
        "layer_offloading_transformer_percent": "not supported",
        "layer_offloading_text_encoder_percent": "not supported",
        "extras_name_or_path": "the base model's own parts are used",
        "accuracy_recovery_adapter": "not supported",
        "block_compile": "model.compile compiles the repeated blocks already",
        "compile_mode": "not supported",
        "compile_fullgraph": "not supported",
        "compile_dynamic": "not supported",
        "cache_size_limit": "not supported",
        "model_kwargs": "not supported",
        "model_paths": "not supported",
        "in_context": "not supported",
        "vae_dtype": "the VAE follows `train.dtype` (SDXL encodes in fp32)",
        "vae_device": "the VAE runs on the training device",
        "te_device": "text encoders run on the training device",
        "te_dtype": "text encoders follow `train.dtype`",
        "refiner_name_or_path": "no refiner",
        "refiner_start_at": "no refiner",
        "inference_lora_path": "not supported",
        "unconditional_lora_path": "not supported",
        "latent_space_version": "the base model's own VAE is used",
        "unet_path": "the base model's own UNet is used",
        "unet_sample_size": "the base model's own UNet is used",
        "use_flux_cfg": "not supported",
    }
    name_or_path: str = Field(min_length=1, max_length=300, description="A hub id or a local diffusers folder.")
    arch: str | None = Field(
        None,
        description=f"{', '.join(ARCHES)} (also {', '.join(ARCH_ALIASES)}); ai-toolkit's `arch:tag` form too.",
    )
    assistant_lora_path: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="A training adapter (flow-matching families): a LoRA on while training and off for samples; "
        "owner/repo/file.safetensors or owner/repo on the hub, or a file under the data root.",
    )
    is_flux: bool = False
    is_xl: bool = False
    is_ssd: bool = False  # SSD-1B and Vega are distilled SDXL models: trained as SDXL
    is_vega: bool = False
    is_v2: bool = False
    is_v3: bool = False
    is_pixart: bool = False
    is_pixart_sigma: bool = False
    is_auraflow: bool = False
    is_lumina2: bool = False
    is_v_pred: bool = False
    quantize: bool = False
    compile: bool = Field(False, description="torch.compile the denoiser's repeated blocks (as train.compile).")
    revision: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="A hub branch, tag or commit hash."
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.split(":", 1)[0]  # ai-toolkit's `arch:tag` names a variant of `arch`
        name = ARCH_ALIASES.get(name, name)
        if name not in ARCHES:
            raise ValueError(
                f"architecture {value!r} is not supported by this worker yet; supported: {', '.join(ARCHES)} "
                f"(also {', '.join(ARCH_ALIASES)})"
            )
        return name

    @model_validator(mode="before")
    @classmethod
    def _turbo_adapter(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("arch") == "zimage:turbo" and data.get("assistant_lora_path") is None:
            return data | {"assistant_lora_path": ZIMAGE_TURBO_ADAPTER}
        return data

    @model_validator(mode="after")
    def _one_arch(self) -> ModelConfig:
        unsupported = [flag for flag in UNSUPPORTED_FLAGS if getattr(self, flag)]
        if unsupported:
            raise ValueError(f"{unsupported[0]}: that architecture is not supported yet; use arch {', '.join(ARCHES)}")
        xl = self.is_xl or self.is_ssd or self.is_vega
        flags = [name for name, on in (("flux", self.is_flux), ("sdxl", xl)) if on]
        if len(flags) > 1 or (self.arch and flags and self.resolved_arch != flags[0]):
            raise ValueError(
                f"conflicting architecture settings: arch={self.arch!r}, is_flux={self.is_flux}, is_xl={self.is_xl}"
            )
        return self

    @property
    def resolved_arch(self) -> str:
        if self.arch:
            return self.arch
        return "flux" if self.is_flux else "sdxl" if (self.is_xl or self.is_ssd or self.is_vega) else "sd15"


class SampleItem(Section):
    """One entry of ai-toolkit's newer `samples:` list (its UI writes these instead of `prompts`)."""

    IGNORED = dict.fromkeys(
        (
            "width",
            "height",
            "neg",
            "seed",
            "guidance_scale",
            "sample_steps",
            "fps",
            "num_frames",
            "ctrl_img",
            "ctrl_idx",
            "ctrl_img_1",
            "ctrl_img_2",
            "ctrl_img_3",
            "network_multiplier",
            "do_cfg_norm",
        ),
        "per-prompt settings are not supported; the sample section's own are used",
    )
    prompt: str = Field(max_length=2000)


class SampleConfig(Section):
    INERT = {"num_frames": default(1), "fps": always, "network_multiplier": default(1.0), "extra_values": empty}
    IGNORED = {
        "guidance_rescale": "not supported",
        "adapter_conditioning_scale": "no adapters",
        "refiner_start_at": "no refiner",
        "network_multiplier": "samples use the LoRA at full strength",
        "extra_values": "not supported",
        "num_frames": "images only",
        "fps": "images only",
        "do_cfg_norm": "not supported",
    }
    sampler: Literal["flowmatch", "ddpm", "ddim", "euler", "euler_a", "lms", "dpmsolver"] = Field(
        "ddpm", description="Samples use the base model's own scheduler; a mismatch is warned about."
    )
    sample_every: int = Field(100, gt=0)
    sample_start_step: int = Field(0, ge=0, description="No samples on schedule before this step.")
    width: int = Field(512, ge=32, le=4096)
    height: int = Field(512, ge=32, le=4096)
    prompts: list[str] = Field(default_factory=list, max_length=64)
    samples: list[SampleItem] = Field(default_factory=list, max_length=64, description="Sampled after `prompts`.")
    neg: str | bool = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    walk_seed: bool = False
    guidance_scale: float = Field(7.0, ge=0, le=50)
    sample_steps: int = Field(20, gt=0, le=200)
    format: Literal["jpg", "png", "webp"] = "jpg"

    @property
    def all_prompts(self) -> list[str]:
        return [*self.prompts, *(item.prompt for item in self.samples)]

    @property
    def negative_prompt(self) -> str:
        return self.neg if isinstance(self.neg, str) else ""


class ProcessConfig(Section):
    INERT = dict.fromkeys(("performance_log_every", "logging", "sqlite_db_path", "log_dir", "name"), always)
    IGNORED = {
        "performance_log_every": "progress is reported through the job",
        "logging": "progress is reported through the job",
        "sqlite_db_path": "not used",
        "log_dir": "progress is reported through the job",
        "name": "files are named by config.name",
        "first_sample": "no sample is made at step 0",
        "guidance": "not used by ai-toolkit either",
        "do_lorm": "not used by ai-toolkit either",
        "lorm_extract_mode": "not used by ai-toolkit either",
        "lorm_extract_mode_param": "not used by ai-toolkit either",
        "torch_profiler": "not supported",
        "slider": "only LoRA training (sd_trainer) is run",
    }
    REFUSED = {
        "embedding": "not supported: this worker trains LoRAs, not textual-inversion embeddings",
        "decorator": "not supported: this worker trains LoRAs, not decorator tokens",
        "adapter": "not supported: this worker trains LoRAs, not adapters",
    }
    type: Literal["sd_trainer", "diffusion_trainer"]  # ai-toolkit's UI writes diffusion_trainer
    training_folder: str = "output"
    device: str = "cuda:0"
    trigger_word: str | None = Field(None, max_length=200)
    training_seed: int | None = Field(None, ge=0, le=MAX_SEED, description="The seed when train.seed is not set.")
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    datasets: list[DatasetConfig] = Field(min_length=1, max_length=16)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig
    sample: SampleConfig | None = None

    @property
    def lora_alpha(self) -> float:
        """The transformer families' LoRAs (FLUX, FLUX.2, Z-Image, Qwen-Image) train at scale 1
        (alpha = rank) whatever `linear_alpha` says, as ai-toolkit's, which marks them
        ``is_transformer`` and saves them in peft's format (toolkit/lora_special.py); SD 1.5 / SDXL
        at linear_alpha / rank."""
        return float(self.network.rank) if self.model.resolved_arch in FLOW_MATCHING else self.network.alpha

    @property
    def sample_prompts(self) -> list[str]:
        """The prompts samples are rendered from: none when there is no sample section or sampling is off."""
        return [] if self.sample is None or self.train.disable_sampling else self.sample.all_prompts

    @property
    def largest_resolution(self) -> int:
        """The largest bucket side any dataset trains at."""
        return max(r for dataset in self.datasets for r in dataset.resolution)

    @model_validator(mode="after")
    def _something_to_train(self) -> ProcessConfig:
        if not self.train.train_unet:
            raise ValueError("train.train_unet is false: training only text encoders is not supported")
        return self


class JobSection(Section):
    IGNORED = {"device": "the process's `device` is used"}
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
        field = section.fields_by_key().get(key) if isinstance(key, str) else None
        if field is not None:
            child = _section_of(field.annotation)
            if child is not None and isinstance(value, list):
                value = [
                    sweep_keys(item, child, f"{key_path}[{i}]", warnings, problems) for i, item in enumerate(value)
                ]
            elif child is not None:
                value = sweep_keys(value, child, key_path, warnings, problems)
            kept[key] = value
        elif key in section.INERT and section.INERT[key](value, node):
            continue  # ai-toolkit's run is the same with it: not worth a warning
        elif key in section.IGNORED:
            warnings.append(f"{key_path}: ignored ({section.IGNORED[key]})")
        elif key in section.REFUSED:
            problems.append(f"{key_path}: {section.REFUSED[key]}")
        else:
            problems.append(f"{key_path}: unknown key{_nearest(key, section)}")
    return kept


def _nearest(key: Any, section: type[Section]) -> str:
    valid = [*section.fields_by_key(), *section.IGNORED]
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(section.fields_by_key())}"


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
    if arch in FLOW_MATCHING:
        candidates = [
            ("train.min_snr_gamma", train.min_snr_gamma is not None, "an SD 1.5 / SDXL setting"),
            ("model.is_v_pred", process.model.is_v_pred, "an SD 1.5 / SDXL setting"),
        ]
        if arch == "flux" or arch.startswith("flux2"):
            negative = bool(process.sample and process.sample.negative_prompt)
            candidates.append(("sample.neg", negative, f"{SHOWN_ARCH[arch]} samples take no negative"))
    else:
        candidates = [
            ("train.linear_timesteps", train.linear_timesteps, "a flow-matching setting; timesteps are uniform"),
            ("model.assistant_lora_path", process.model.assistant_lora_path is not None, "a flow-matching setting"),
        ]
    return [(path, why) for path, is_set, why in candidates if is_set]


def recipe_notes(process: ProcessConfig) -> list[str]:
    """Where a key does what ai-toolkit does with it, but not what its name suggests, or where this
    worker differs from ai-toolkit on purpose: said in the run's warnings."""
    train, network, notes = process.train, process.network, []
    arch = process.model.resolved_arch
    if arch in FLOW_MATCHING and network.alpha != float(network.rank) and network.alpha_given:
        notes.append(
            f"{PREFIX}.network.linear_alpha: {arch} LoRAs train at scale 1 (alpha = rank {network.rank}), as in "
            f"ai-toolkit; {network.alpha:g} is not used"
        )
    window = train.gradient_accumulation_steps
    if window > 1:
        notes.append(
            f"{PREFIX}.train.gradient_accumulation_steps: as in ai-toolkit, steps, save_every and sample_every "
            f"count micro-batches: {train.steps} steps are {math.ceil(train.steps / window)} optimizer updates "
            f"of {window} micro-batches each; unlike ai-toolkit (which keeps only the last micro-batch's "
            "gradient), each update uses all of them"
        )
    if train.lr_scheduler == "linear":
        notes.append(
            f"{PREFIX}.train.lr_scheduler: linear ramps the rate up from lr/3 to lr over the steps (torch's "
            "LinearLR, as in ai-toolkit); lr_scheduler_params start_factor and end_factor change the ramp"
        )
    if train.lr_warmup_steps is not None:
        notes.append(
            f"{PREFIX}.train.lr_warmup_steps: not used (ai-toolkit has no such key and ignores it); "
            "the warm-up is lr_scheduler_params.num_warmup_steps, for constant_with_warmup (default 1000) and cosine"
        )
    adapter = process.model.assistant_lora_path
    if adapter is not None and process.model.resolved_arch in FLOW_MATCHING:
        notes.append(
            f"{PREFIX}.model.assistant_lora_path: {adapter} is on while training and off for samples; "
            "the saved LoRA holds only what was trained"
        )
    if train.lr_scheduler == "constant_with_warmup" and "num_warmup_steps" not in train.lr_scheduler_params:
        notes.append(f"{PREFIX}.train.lr_scheduler: constant_with_warmup warms up over 1000 steps (ai-toolkit's)")
    return notes


def semantic_warnings(config: TrainingConfig) -> list[str]:
    """Settings that are valid but will not do what they might seem to."""
    process = config.process
    notes = []
    arch = process.model.resolved_arch
    if process.train.train_text_encoder and arch not in TRAINABLE_TEXT_ENCODERS:
        notes.append(
            f"{PREFIX}.train.train_text_encoder: ignored "
            f"({SHOWN_ARCH[arch]} text encoders stay frozen, as in ai-toolkit)"
        )
    if process.save.push_to_hub:
        notes.append(f"{PREFIX}.save.push_to_hub: ignored (download the LoRA with download_model)")
    notes += [f"{PREFIX}.{path}: ignored ({why})" for path, why in unused_for_arch(process)]
    notes += recipe_notes(process)
    if "network" not in process.model_fields_set:
        notes.append(
            f"{PREFIX}.network: missing; ai-toolkit would fine-tune the whole model, this worker trains a LoRA "
            f"(rank {process.network.rank}, alpha {process.network.alpha:g})"
        )
    objective = "flowmatch" if arch in FLOW_MATCHING else "ddpm"
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
