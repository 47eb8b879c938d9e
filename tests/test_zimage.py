"""Z-Image: files keyed as ai-toolkit writes them (and ComfyUI maps them), its alpha honoured, its guidance."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from fastbackend.config import parse_training_config
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos, user_yaml

# What ComfyUI's Z-Image key map (diffusers names to its NextDiT) and ai-toolkit's loader accept for a
# block's Linear layers: to_q / to_k / to_v (ComfyUI slices them into its fused qkv), to_out.0 (its
# `out`), the feed forward and the modulation.
COMFYUI_BLOCK_KEY = re.compile(
    r"diffusion_model\.layers\.\d+\."
    r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)\.lora_[AB]\.weight"
)


def test_files_are_keyed_as_ai_toolkit_writes_them_with_alpha_folded_in(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos(count=1)
    replacements = {
        "linear: 16": "linear: 4",
        "linear_alpha: 16": "linear_alpha: 8",
        "sample_every: 100": "sample_every: 1000",
    }
    answer = train(user_yaml(model_path, "zimage", steps=2, replacements=replacements))
    assert answer["status"] == "success", answer
    with safe_open(answer["lora_path"], framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert all(COMFYUI_BLOCK_KEY.fullmatch(key) for key in keys), sorted(keys)[:5]
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel.from_pretrained(data_root / "models" / "zimage" / "transformer")
    linears = {n for n, m in transformer.named_modules() if n.startswith("layers.") and isinstance(m, torch.nn.Linear)}
    assert {key.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for key in keys} == linears
    # linear_alpha is honoured (ai-toolkit ignores it for Z-Image) and folded into lora_B: no alpha keys.
    assert metadata["ss_network_alpha"] == "8.0" and not any(key.endswith(".alpha") for key in keys)
    assert not any("linear_alpha" in warning for warning in answer["warnings"])


def test_lora_b_carries_alpha_over_rank():
    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for

    states = {
        "transformer": {
            "layers.0.attention.to_q.lora_A.weight": torch.ones(4, 8),
            "layers.0.attention.to_q.lora_B.weight": torch.ones(8, 4),
        }
    }
    keyed = lora_io.to_file_format(family_for("zimage"), states, rank=4, alpha=8)
    assert torch.equal(keyed["diffusion_model.layers.0.attention.to_q.lora_B.weight"], torch.full((8, 4), 2.0))
    assert torch.equal(keyed["diffusion_model.layers.0.attention.to_q.lora_A.weight"], torch.ones(4, 8))


def test_the_user_yaml_with_arch_zimage_keeps_its_alpha_and_warns_of_flux_only_keys():
    text = fixture_yaml().replace("is_flux: true", "arch: zimage").replace("linear_alpha: 16", "linear_alpha: 8")
    text = text.replace("dtype: bf16", "dtype: bf16\n      noise_offset: 0.1")
    config, warnings = parse_training_config(text)
    assert config.process.model.resolved_arch == "zimage" and config.process.lora_alpha == 8
    assert (
        "config.process[0].train.noise_offset: ignored (an SD 1.5 / SDXL setting; Z-Image uses flow matching)"
        in warnings
    )


@pytest.mark.parametrize(("scale", "pipeline", "guided"), [(1.0, 0.0, False), (4.0, 3.0, True), (0.5, 0.0, False)])
def test_guidance_is_the_usual_scale_and_the_pipeline_gets_it_minus_one(scale, pipeline, guided):
    from fastbackend.training.families import family_for

    family = family_for("zimage")
    assert family.pipeline_guidance(scale) == pipeline and family.guided(scale) is guided
