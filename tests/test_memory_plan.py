"""The memory plan: weights counted exactly on the meta device, activations from measured constants,
and a run that cannot fit refused before anything is downloaded, naming what would fit."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from fastbackend.config import parse_training_config
from fastbackend.training.families import family_for
from fastbackend.training.memory_plan import SHAPES, count_shapes, plan_run
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos

# Parameter counts as their publishers state them (model cards and the libraries' own counts).
PUBLISHED = {
    "flux": {
        "denoiser": 11_901_408_320,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
        "vae": 83_819_683,
    },
    "sdxl": {"denoiser": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
    "sd15": {"denoiser": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    # Counted from the published configs (the cards say 6B and Qwen3-4B's 4.0B; its VAE is FLUX.1's).
    "zimage": {"denoiser": 6_154_908_736, "text_encoder": 4_022_468_096, "vae": 83_819_683},
    # Counted from the published configs (the cards say 20B and Qwen2.5-VL-7B's 8.29B).
    "qwen_image": {"denoiser": 20_430_401_088, "text_encoder": 8_292_166_656, "vae": 126_892_531},
    # Counted from the published configs (the names say 4B and 9B; Qwen3-4B's and Qwen3-8B's cards 4.0B and 8.2B).
    "flux2_klein_4b": {"denoiser": 3_875_544_576, "text_encoder": 4_022_468_096, "vae": 84_046_115},
    "flux2_klein_9b": {"denoiser": 9_078_581_248, "text_encoder": 8_190_735_360, "vae": 84_046_115},
    # FLUX.2 [dev]: 32B, and Mistral Small 3.1 "24B" (its text model and Pixtral vision tower as configured).
    "flux2": {"denoiser": 32_223_281_152, "text_encoder": 23_340_272_640, "vae": 84_046_115},
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_full_size_parameter_counts_are_exact(arch):
    family = family_for(arch)
    shapes = count_shapes(family, SHAPES / arch, "reference")
    counted = {"denoiser": shapes.denoiser, "vae": shapes.vae} | shapes.text_encoders
    assert counted == PUBLISHED[arch]


def user_process(**changes):
    config, _ = parse_training_config(fixture_yaml())
    process = config.process
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(process, section), name, value)
    return process


def test_flux_weights_follow_dtype_and_quantization(data_root):
    full = plan_run(user_process(model__quantize=False), "black-forest-labs/FLUX.1-dev", None)
    assert full.phases["training"] > full.parts.get("denoiser", 0)
    training = plan_run(user_process(model__quantize=False, sample__prompts=[]), "black-forest-labs/FLUX.1-dev", None)
    assert training.phase == "training"
    assert training.parts["denoiser"] == pytest.approx(11_901_408_320 * 2 / 1e9, abs=0.01)  # bf16
    quantized = plan_run(user_process(sample__prompts=[]), "black-forest-labs/FLUX.1-dev", None)
    # LLM.int8: a byte per targeted weight and a scale per row; the rest (embedders, norms, biases) in bf16.
    assert 11.5 < quantized.parts["denoiser"] < 12.5
    assert "published shapes (the model is not on the volume yet)" in quantized.source


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["flux", "sdxl", "sd15", "flux2_klein_4b"])
def test_lora_parameters_counted_on_meta_equal_the_trained_ones(tiny_models, data_root, arch):
    """The plan's LoRA size (counted on the meta device) is what peft really adds, rank 16."""
    from diffusers import DiffusionPipeline

    from fastbackend.training import lora_io

    family = family_for(arch)
    shapes = count_shapes(family, tiny_models / arch, "own")
    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    denoiser = family.denoiser(pipe)
    targets, shared = family.lora_targets(denoiser), family.shared_lora_down(denoiser)
    params = lora_io.add_lora(denoiser, targets, rank=16, alpha=16, dropout=0.0, shared_down=shared)
    assert shapes.lora_per_rank * 16 == sum(p.numel() for p in params)
    assert shapes.denoiser == sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("arch", ["flux", "sd15"])
def test_the_8bit_part_is_what_quantize_really_swaps(tiny_models, arch):
    """Only linear targets become 8-bit (SD 1.5's pointwise convolutions stay in full precision)."""
    import torch
    from diffusers import DiffusionPipeline

    from fastbackend.training.setup import quantize_8bit

    family = family_for(arch)
    shapes = count_shapes(family, tiny_models / arch, "own")
    denoiser = family.denoiser(DiffusionPipeline.from_pretrained(tiny_models / arch))
    quantize_8bit(denoiser, family.lora_targets(denoiser))
    denoiser.to("cpu")  # bitsandbytes quantizes as the layers move
    int8 = sum(p.numel() for p in denoiser.parameters() if p.dtype == torch.int8)
    assert int8 == shapes.lora_targets > 0


SHALLOW = {
    "flux": {"num_layers": 1, "num_single_layers": 1},
    "zimage": {"n_layers": 2},
    "qwen_image": {"num_layers": 2},
    "flux2_klein_4b": {"num_layers": 1, "num_single_layers": 1},
}


def measured_apart(arch: str) -> tuple[dict, dict[bool, tuple[int, int]]]:
    """The denoiser's config and what a 256 px step keeps (total, largest block) without and with
    checkpointing, measured in a process of its own: full-width blocks take gigabytes that a long
    test process would not give back."""
    from devtools.memory import measure, published_denoiser

    config, model = published_denoiser(arch, **SHALLOW.get(arch, {}))
    text_tokens = 512 if arch in ("zimage", "flux2_klein_4b") else 256
    kept = {checkpointing: measure(arch, model, 256, text_tokens, checkpointing) for checkpointing in (False, True)}
    return config, {checkpointing: (k.total, k.largest_block) for checkpointing, k in kept.items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["flux", "sdxl", "sd15", "zimage", "qwen_image", "flux2_klein_4b"])
def test_activation_constants_match_what_autograd_keeps(arch):
    """Measured again at another size than the constants were (FLUX: 256 image and 256 text
    tokens, one block of each kind; Z-Image: two blocks, 512 caption tokens; the UNets: 256 px):
    the family's estimate is within 10% of the bytes autograd keeps and, with checkpointing, of the
    largest block's."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        config, measured = pool.submit(measured_apart, arch).result()
    if arch == "flux":
        config |= {"guidance_embeds": False}  # what the estimate reads for 256 text tokens (schnell's)
    for checkpointing, (total, largest_block) in measured.items():
        estimate = family_for(arch).activation_bytes(config, 256, 256, checkpointing)
        assert estimate.kept == pytest.approx(total, rel=0.10), checkpointing
        if checkpointing:
            assert estimate.largest_block == pytest.approx(largest_block, rel=0.10)


def test_a_run_that_cannot_fit_is_refused_before_any_download(data_root):
    """The user's FLUX config on a 16 GB card: refused with out_of_memory and what would fit, with
    no model on the volume and no network (the hub is offline in the tests)."""
    upload_photos()
    answer = train(fixture_yaml(), gpu_memory_gb=16)
    assert answer["error_code"] == "out_of_memory", answer
    assert answer["error"].startswith("memory plan: this run needs about ")
    assert "and the GPU has 16 GB; what would fit: " in answer["error"]
    assert any(d.startswith("denoiser: ") for d in answer["details"])
    assert not (data_root / "output").exists() or not any((data_root / "output").iterdir())
    assert not (data_root / "huggingface-cache").exists()


def test_suggestions_name_the_cheapest_change_that_fits(data_root):
    process = user_process(model__quantize=False, train__gradient_checkpointing=False, train__optimizer="adamw")
    plan = plan_run(process, "black-forest-labs/FLUX.1-dev", 80)
    assert plan.fits is False
    assert plan.suggestions[0].startswith("config.process[0].train.gradient_checkpointing: true (")
    assert all("adamw8bit" not in s for s in plan.suggestions)  # alone it frees too little
    small = plan_run(process, "black-forest-labs/FLUX.1-dev", 20)
    assert small.suggestions == [] or small.suggestions[0].endswith(" GB)")
    assert "together" in small.suggestions[0] if small.suggestions else True


@pytest.mark.slow
def test_the_plan_is_answered_and_reported_from_the_models_own_configs(tiny_models, data_root):
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest
    from tests.training_helpers import user_yaml

    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    updates: list[dict] = []
    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config=user_yaml(model_path, arch="sd15", steps=1))
    answer = train_with_yaml(request, progress=updates.append)
    assert answer["status"] == "success", answer
    plan = answer["memory_plan"]
    assert (plan["gpu_gb"], plan["fits"], plan["shapes"]) == (None, None, "the model's own configs")
    assert plan["estimated_peak_gb"] < 1
    assert updates[1] == {"stage": "planning", "memory_plan": plan}  # after analyzing_datasets


PLAN_MODELS = {
    "flux": "black-forest-labs/FLUX.1-dev",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "zimage": "Tongyi-MAI/Z-Image-Turbo",
    "qwen_image": "Qwen/Qwen-Image",
    "flux2_klein_4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "flux2_klein_9b": "black-forest-labs/FLUX.2-klein-base-9B",
    "flux2": "black-forest-labs/FLUX.2-dev",
}


def readme_plan_rows() -> list[str]:
    """README's plan table: the user's YAML at 1024 px (samples 1024 x 1024), per family and settings."""
    rows = []
    for arch, model in PLAN_MODELS.items():
        for quantize, checkpointing in ((False, False), (False, True), (True, True)):
            process = user_process(model__quantize=quantize, train__gradient_checkpointing=checkpointing)
            process.model.arch, process.model.is_flux = arch, arch == "flux"
            process.datasets[0].resolution = [1024]
            process.sample.width = process.sample.height = 1024
            plan = plan_run(process, model, None)
            fits = " | ".join("yes" if plan.needed_gb <= gb else "no" for gb in (24, 48, 80))
            settings = f"{'8-bit' if quantize else 'bf16'}, checkpointing {'on' if checkpointing else 'off'}"
            rows.append(
                f"| {model} | {settings} | {plan.phases['training']:g} | {plan.peak_gb:g} ({plan.phase}) "
                f"| {plan.needed_gb:g} | {fits} |"
            )
    return rows


def test_readme_plan_table_is_what_the_plan_says(data_root):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for row in readme_plan_rows():
        assert row in readme, row


def test_suggestions_reach_the_phase_at_the_peak(data_root):
    """ai-toolkit's default dtype is fp32: the plan says bf16 would fit, not that nothing does."""
    process = user_process(train__dtype="fp32")
    plan = plan_run(process, "black-forest-labs/FLUX.1-dev", 24)
    assert plan.fits is False
    assert plan.suggestions[0].startswith("config.process[0].train.dtype: bf16 (")
    process = user_process(train__cache_text_embeddings=False)
    plan = plan_run(process, "black-forest-labs/FLUX.1-dev", 24)
    assert "config.process[0].train.cache_text_embeddings: true (" in " ".join(plan.suggestions)


def test_another_family_models_folder_fails_to_load_not_to_plan(tiny_models, data_root):
    """An SD 1.5 folder named as FLUX: the plan falls back to FLUX's published shapes, and the
    load says what is wrong (model_load_failed), not an internal error."""
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    answer = train(fixture_yaml().replace("black-forest-labs/FLUX.1-dev", model_path))
    assert answer["error_code"] == "model_load_failed", answer


def test_a_model_planned_with_borrowed_shapes_is_warned_about_not_refused(data_root):
    from fastbackend.api.train import plan_memory
    from fastbackend.errors import FastBackendError
    from fastbackend.schemas import TrainWithYamlRequest

    config, _ = parse_training_config(fixture_yaml())
    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config=fixture_yaml(), gpu_memory_gb=12)
    warnings: list[str] = []
    plan = plan_memory(config, request, ("someone/flux-finetune", None), warnings)
    assert plan.fits is False and plan.borrowed
    assert warnings[-1].startswith("memory plan: this run needs about ")
    assert "published shapes" in warnings[-1] and warnings[-1].endswith("is not known before its download")
    with pytest.raises(FastBackendError) as refused:  # the published model itself: its shapes are known
        plan_memory(config, request, ("black-forest-labs/FLUX.1-dev", None), [])
    assert refused.value.code == "out_of_memory"


def test_sd15_loads_without_its_safety_checker(monkeypatch):
    from diffusers import StableDiffusionPipeline

    seen = {}

    def capture(cls, name, **options):
        seen.update(options)
        raise OSError("stop here")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(capture))
    from fastbackend.errors import FastBackendError

    with pytest.raises(FastBackendError):
        family_for("sd15").load("/nowhere", torch_dtype(), "/tmp")
    assert seen["safety_checker"] is None and seen["requires_safety_checker"] is False


def torch_dtype():
    import torch

    return torch.float32
