"""The same YAML trains as ai-toolkit trains it: each behaviour pinned against ai-toolkit's code.

References are to ostris/ai-toolkit at 27a03a9 (toolkit/lora_special.py, toolkit/optimizer.py,
toolkit/scheduler.py, toolkit/ema.py, toolkit/prompt_utils.py, toolkit/config_modules.py,
toolkit/samplers/custom_flowmatch_sampler.py, jobs/process/BaseSDTrainProcess.py).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from fastbackend.config import TrainConfig, parse_training_config
from fastbackend.errors import ValidationFailed
from fastbackend.layout import read_header
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos, user_yaml, write_lora_file


def load(tiny_models, arch):
    import diffusers

    pipeline = {"flux": "FluxPipeline", "sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}
    return getattr(diffusers, pipeline[arch.removesuffix("_schnell")]).from_pretrained(str(tiny_models / arch))


# ---------------------------------------------------------------- 1. initialisation


def test_lora_a_is_kaiming_uniform_and_lora_b_zero(tiny_models):
    from fastbackend.training import lora_io
    from fastbackend.training.families import family_for

    torch.manual_seed(0)
    transformer = load(tiny_models, "flux").transformer
    lora_io.add_lora(transformer, family_for("flux").lora_targets(transformer), rank=4, alpha=4, dropout=0.0)
    downs = [m for n, m in transformer.named_modules() if n.endswith("lora_A.fastbackend")]
    ups = [m for n, m in transformer.named_modules() if n.endswith("lora_B.fastbackend")]
    assert downs and len(downs) == len(ups)
    for down in downs:  # kaiming_uniform_(a=sqrt(5)): uniform on +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)
        bound = 1 / math.sqrt(down.in_features)
        assert down.weight.abs().max() <= bound
        assert down.weight.abs().max() > 0.8 * bound
    pooled = torch.cat([d.weight.flatten() * math.sqrt(3 * d.in_features) for d in downs])
    assert abs(pooled.std().item() - 1) < 0.1
    assert all(torch.count_nonzero(up.weight) == 0 for up in ups)


# ---------------------------------------------------------------- 2. targets


def test_flux_targets_every_linear_of_both_block_kinds_modulation_included(tiny_models):
    from fastbackend.training.families import family_for

    transformer = load(tiny_models, "flux").transformer
    targets = set(family_for("flux").lora_targets(transformer))
    linears = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert targets == {n for n in linears if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear"} <= targets
    assert {"single_transformer_blocks.0.norm.linear", "single_transformer_blocks.0.proj_out"} <= targets
    assert not targets & {"proj_out", "norm_out.linear", "x_embedder", "context_embedder"}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_unet_targets_every_linear_and_pointwise_conv_of_its_transformer_blocks(arch, tiny_models):
    from fastbackend.training.families import family_for

    unet = load(tiny_models, arch).unet
    targets = set(family_for(arch).lora_targets(unet))
    inside = {n for n, m in unet.named_modules() if ".attentions." in f".{n}" and isinstance(m, torch.nn.Linear)}
    inside |= {
        n
        for n, m in unet.named_modules()
        if ".attentions." in f".{n}" and isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
    }
    assert targets == inside
    assert any(n.endswith(".proj_in") for n in targets) and any(n.endswith("attn2.to_k") for n in targets)
    assert not any(".resnets." in n for n in targets)


def test_clip_targets_attention_and_mlp(tiny_models):
    from fastbackend.training.families import family_for

    encoder = load(tiny_models, "sd15").text_encoder
    targets = family_for("sd15").text_encoder_lora_targets(encoder)
    endings = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in targets}
    assert endings == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    }


# ---------------------------------------------------------------- 4. optimizers


@pytest.mark.parametrize("name", ["adamw", "adam", "adamw8bit", "prodigy"])
def test_adam_family_and_prodigy_use_eps_1e6(name):
    from fastbackend.training.setup import make_optimizer

    warnings: list[str] = []
    config = TrainConfig(optimizer=name, lr=1e-4)
    optimizer = make_optimizer(config, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"), warnings)
    assert optimizer.param_groups[0]["eps"] == 1e-6
    # ai-toolkit passes lr 1.0 to Prodigy below 0.1, but its parameter groups carry train.lr, which wins
    assert optimizer.param_groups[0]["lr"] == 1e-4


def test_optimizer_params_still_override_eps():
    from fastbackend.training.setup import make_optimizer

    config = TrainConfig(optimizer="adamw", optimizer_params={"eps": 1e-8})
    optimizer = make_optimizer(config, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"), [])
    assert optimizer.param_groups[0]["eps"] == 1e-8


# ---------------------------------------------------------------- 5. accumulation


@pytest.mark.parametrize(
    ("key", "steps", "batches", "updates"),
    [
        ("gradient_accumulation_steps: 1", 6, 6, 6),
        ("gradient_accumulation_steps: 2", 6, 6, 3),  # ai-toolkit's older key: steps count micro-batches
        ("gradient_accumulation_steps: 4", 6, 6, 2),  # the last, partial window still updates
        ("gradient_accumulation: 2", 6, 12, 6),  # the newer key: steps count optimizer updates
    ],
)
def test_steps_batches_and_updates_are_counted_as_ai_toolkit_counts_them(
    key, steps, batches, updates, tiny_models, data_root, monkeypatch
):
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    counted = {"batches": 0, "updates": 0}
    real_loss, real_update = trainer.compute_loss, trainer.optimizer_update

    def counting_loss(run, batch):
        counted["batches"] += 1
        return real_loss(run, batch)

    def counting_update(run):
        counted["updates"] += 1
        real_update(run)

    monkeypatch.setattr(trainer, "compute_loss", counting_loss)
    monkeypatch.setattr(trainer, "optimizer_update", counting_update)
    text = user_yaml(model_path, steps=steps).replace("gradient_accumulation_steps: 4", key)
    text = text.replace("      train_unet: true\n", "      train_unet: true\n      disable_sampling: true\n")
    answer = train(text)
    assert answer["status"] == "success", answer
    assert (answer["steps"], counted["batches"], counted["updates"]) == (steps, batches, updates)


# ---------------------------------------------------------------- 6. the recipe keys


def test_sd_alpha_defaults_to_one_and_flux_trains_at_scale_one():
    def process(arch: str, network: str):
        text = fixture_yaml().replace("is_flux: true", f"arch: {arch}")
        text = text.replace("      linear: 16\n      linear_alpha: 16\n", network)
        return parse_training_config(text)[0].process

    assert process("sdxl", "      linear: 16\n").lora_alpha == 1.0  # ai-toolkit: alpha 1.0 when omitted
    assert process("sdxl", "      linear: 16\n      alpha: 4\n").lora_alpha == 4.0
    assert process("sdxl", "      linear: 16\n      linear_alpha: 8\n").lora_alpha == 8.0
    assert process("flux", "      linear: 16\n      linear_alpha: 1\n").lora_alpha == 16.0
    for arch in ("flux2", "flux2_klein_4b", "flux2_klein_9b", "zimage", "qwen_image"):  # is_transformer in ai-toolkit
        assert process(arch, "      linear: 16\n").lora_alpha == 16.0, arch
        assert process(arch, "      linear: 16\n      linear_alpha: 1\n").lora_alpha == 16.0, arch
    assert process("flux", "      rank: 8\n").network.rank == 8


def test_linear_timesteps_weights_are_ai_toolkits_bell():
    from fastbackend.training.families.flux import bell_weights

    weights = bell_weights("cpu")
    assert weights.shape == (1000,) and abs(weights.mean().item() - 1) < 1e-5
    assert weights[0] < 0.01 and weights[-1] < 0.01
    assert int(weights.argmax()) == 500 and abs(weights.max().item() - 1.58) < 0.01


def flux_scheduler_config(dynamic: bool = True) -> dict:
    """FLUX.1-dev's scheduler settings (its scheduler_config.json), shifting dynamically or not."""
    from fastbackend.training.families.flux import FLUX_TRAINING_SCHEDULER

    return FLUX_TRAINING_SCHEDULER | {"use_dynamic_shifting": dynamic}


def flux_scheduler(dynamic: bool = True):
    """A real scheduler of FLUX.1-dev's settings, shifting dynamically or not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(dynamic))


def test_shift_follows_the_image_size_as_flux_inference_does():
    from fastbackend.training.families import LossOptions
    from fastbackend.training.families.flux import dynamic_shift, sigma_table

    config = flux_scheduler_config()
    assert dynamic_shift(1024, config) == pytest.approx(0.6300, abs=1e-3)  # 512 px: 64x64 latents, 2x2 patches
    assert dynamic_shift(4096, config) == pytest.approx(1.15)  # 1024 px
    options = LossOptions(scheduler=flux_scheduler(), timestep_type="shift")
    small, large = sigma_table(options, 1024, "cpu"), sigma_table(options, 4096, "cpu")
    middle = 500  # the unshifted table is linear: sigma ~0.5 there
    assert large[middle] == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1 / 0.5005 - 1), rel=1e-3)
    assert large[middle] > small[middle] > 0.5
    static = sigma_table(LossOptions(scheduler=flux_scheduler(dynamic=False), timestep_type="shift"), 4096, "cpu")
    assert static[middle] == pytest.approx(3 * 0.5005 / (1 + 2 * 0.5005), rel=1e-3)


def test_sigmoid_and_linear_tables():
    from fastbackend.training.families import LossOptions
    from fastbackend.training.families.flux import sigma_table

    torch.manual_seed(0)
    sigmoid = sigma_table(LossOptions(scheduler=flux_scheduler(), timestep_type="sigmoid"), 4096, "cpu")
    assert torch.all(sigmoid[:-1] >= sigmoid[1:]) and abs(sigmoid.median().item() - 0.5) < 0.05
    # logit-normal, not uniform: its 10th percentile is sigmoid(-1.28) = 0.217 (uniform: 0.1)
    assert sigmoid.quantile(0.1).item() == pytest.approx(0.217, abs=0.03)
    linear = sigma_table(LossOptions(scheduler=flux_scheduler(), linear_timesteps=True), 4096, "cpu")
    assert linear[0] == 1.0 and linear[-1] == pytest.approx(0.001) and torch.all(linear[:-1] > linear[1:])


def test_weighted_weights_are_our_fit_of_ai_toolkits_measured_table():
    """ai-toolkit's default_weighing_scheme: mean 1, its peak 1.52 at level 124, its smallest about 0.45
    at the clean end; the fit (devtools/fit_timestep_weights.py) keeps that shape."""
    from fastbackend.training.families.flux import measured_weights

    weights = measured_weights("cpu")
    assert weights.shape == (1000,) and weights.mean().item() == pytest.approx(1, abs=1e-6)
    assert int(weights.argmax()) == 125 and weights.max().item() == pytest.approx(1.52, abs=0.01)
    assert int(weights.argmin()) == 999 and 0.42 < weights[-1].item() < 0.5
    assert weights[0].item() == pytest.approx(0.91, abs=0.01)  # the noisiest level weighs less than its neighbours
    # A few of the table's own values (3 decimals), at knots and between them: the fit is within 0.02.
    table = {0: 0.906, 25: 1.220, 124: 1.523, 250: 1.355, 500: 0.925, 750: 0.715, 900: 0.716, 999: 0.447}
    assert {level: weights[level].item() for level in table} == pytest.approx(table, abs=0.02)


def test_weighted_draws_linear_levels_and_multiplies_each_items_loss_by_its_levels_weight():
    from fastbackend.training.families import LossOptions
    from fastbackend.training.families.flux import bell_weights, flow_loss, measured_weights, sigma_table

    weighted = LossOptions(scheduler=flux_scheduler(), timestep_type="weighted")
    linear = sigma_table(LossOptions(scheduler=flux_scheduler(), timestep_type="linear"), 4096, "cpu")
    assert torch.equal(sigma_table(weighted, 4096, "cpu"), linear)
    torch.manual_seed(0)
    prediction, target = torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    index = torch.tensor([0, 125, 999])
    per_item = ((prediction - target) ** 2).mean(dim=(1, 2))
    expected = (per_item * measured_weights("cpu")[index]).mean()
    assert flow_loss(prediction, target, None, weighted, index).item() == pytest.approx(expected.item(), rel=1e-6)
    # with linear_timesteps too, ai-toolkit takes the measured weights, not the bell
    both = LossOptions(scheduler=flux_scheduler(), timestep_type="weighted", linear_timesteps=True)
    assert flow_loss(prediction, target, None, both, index).item() == pytest.approx(expected.item(), rel=1e-6)
    bell = (per_item * bell_weights("cpu")[index]).mean()
    assert flow_loss(prediction, target, None, LossOptions(flux_scheduler(), linear_timesteps=True), index) == (
        pytest.approx(bell.item(), rel=1e-6)
    )


@pytest.mark.parametrize("arch", ["flux", "zimage", "qwen_image", "flux2_klein_4b"])
def test_each_flow_family_weights_its_loss_by_the_level_drawn(arch, tiny_models, monkeypatch):
    """The same noise, level and denoiser: the weighted loss is the linear one times that level's weight."""
    import importlib

    from diffusers import DiffusionPipeline

    from fastbackend.training.families import LossOptions, TrainingBatch, family_for
    from fastbackend.training.families.flux import measured_weights

    family = family_for(arch)
    module = importlib.import_module(type(family).__module__)
    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    side = 64 // pipe.vae_scale_factor
    torch.manual_seed(0)
    latents = family.scale_latents(pipe, torch.randn(1, 4, side, side))
    batch = TrainingBatch(latents=latents, cond=family.encode_prompt(pipe, "a photo"), sizes=torch.zeros(1, 6))
    scheduler = family.training_scheduler(pipe)

    def loss(kind: str, level: int) -> float:
        monkeypatch.setattr(module, "noise_level_indices", lambda b, bias, device: torch.full((b,), level))
        torch.manual_seed(1)  # the same noise for both kinds
        with torch.no_grad():
            return family.loss(pipe, family.denoiser(pipe), batch, LossOptions(scheduler, timestep_type=kind)).item()

    weights = measured_weights("cpu")
    for level in (125, 999):
        assert loss("weighted", level) == pytest.approx(loss("linear", level) * weights[level].item(), rel=1e-5)


def test_the_noise_offset_shifts_each_image_and_channel_by_one_draw():
    from fastbackend.training.families import LossOptions, family_for

    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(3)
    plain = family_for("flux").noise_like(latents, LossOptions(None))
    torch.manual_seed(3)
    offset = family_for("flux").noise_like(latents, LossOptions(None, noise_offset=0.5))
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift)) and shift.abs().min() > 0


@pytest.mark.parametrize("arch", ["flux", "zimage", "qwen_image", "flux2_klein_4b", "flux2", "sd15"])
def test_every_family_trains_with_the_noise_offset(arch, tiny_models, monkeypatch):
    """ai-toolkit adds the offset for every model (toolkit/train_tools.py): each family's loss draws
    its noise through it, so the same draws with an offset give another loss."""
    from diffusers import DiffusionPipeline

    from fastbackend.training.families import LossOptions, TrainingBatch, family_for

    family = family_for(arch)
    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    scheduler = family.training_scheduler(pipe)
    torch.manual_seed(0)
    latents = family.scale_latents(pipe, family.encode_pixels(pipe, torch.rand(1, 3, 64, 64) * 2 - 1)[0])
    cond = family.encode_prompt(pipe, "a photo")
    batch = TrainingBatch(latents=latents, cond=cond, sizes=torch.tensor([[64, 64, 0, 0, 64, 64]]))
    drawn: list[float] = []
    real = family.noise_like

    def counted(latents, options):
        drawn.append(options.noise_offset)
        return real(latents, options)

    monkeypatch.setattr(family, "noise_like", counted)

    def loss(offset: float) -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return family.loss(pipe, family.denoiser(pipe), batch, LossOptions(scheduler, noise_offset=offset)).item()

    assert loss(0.0) != loss(0.5) and drawn == [0.0, 0.5]


def test_weighted_is_accepted_for_flow_matching_and_unsaid_where_ai_toolkit_ignores_it_too():
    text = fixture_yaml().replace("dtype: bf16", "dtype: bf16\n      timestep_type: weighted")
    for arch_line in ("is_flux: true", "arch: zimage", "arch: qwen_image", "arch: flux2_klein_4b"):
        config, warnings = parse_training_config(text.replace("is_flux: true", arch_line))
        assert config.process.train.timestep_type == "weighted"
        assert not any("timestep_type" in warning for warning in warnings), warnings
    _, sd_warnings = parse_training_config(text.replace("is_flux: true", "arch: sdxl"))
    assert not any("timestep_type" in warning for warning in sd_warnings)  # DDPM: ai-toolkit ignores it as well


def test_the_weights_fit_is_reproducible_from_a_table(tmp_path):
    """devtools/fit_timestep_weights.py reads ai-toolkit's list without running the file and finds the
    knots of a table that is itself a curve through them."""
    from devtools.fit_timestep_weights import differences, fit, read_table
    from fastbackend.training.families.flux import WEIGHTED_KNOTS, piecewise_linear, weighted_knot_indices

    knots = torch.tensor(weighted_knot_indices(), dtype=torch.float64)
    curve = piecewise_linear(knots, torch.tensor(WEIGHTED_KNOTS, dtype=torch.float64))
    table = curve / curve.mean()
    source = tmp_path / "default_weighing_scheme.py"
    source.write_text("# measured\n\ndefault_weighing_scheme = [\n" + ",\n".join(map(repr, table.tolist())) + "\n]\n")
    read = read_table(source)
    assert torch.equal(read, table)
    fitted = fit(read)
    assert len(fitted) == 41 and fitted == pytest.approx(
        [value / curve.mean().item() for value in WEIGHTED_KNOTS], abs=1e-3
    )
    assert differences(fitted, read).abs().max().item() < 2e-3


def test_shift_ends_on_the_schedulers_shift_terminal_as_its_inference_does():
    """Qwen-Image's scheduler stretches its shifted sigmas so the last is shift_terminal (0.02); ai-toolkit
    does it for its shift types, and so does the table here: the scheduler's own 1000-step schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from devtools.tiny import QWEN_IMAGE_SCHEDULER
    from fastbackend.training.families import LossOptions
    from fastbackend.training.families.flux import dynamic_shift, sigma_table

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    table = sigma_table(LossOptions(scheduler=scheduler, timestep_type="shift"), 1024, "cpu")
    assert table[0].item() == pytest.approx(1.0) and table[-1].item() == pytest.approx(0.02, abs=1e-6)
    assert torch.all(table[:-1] > table[1:])
    scheduler.set_timesteps(1000, mu=dynamic_shift(1024, scheduler.config))
    assert torch.allclose(table, scheduler.sigmas[:-1], atol=1e-6)  # its last sigma is the final 0
    unstretched = FlowMatchEulerDiscreteScheduler(**(QWEN_IMAGE_SCHEDULER | {"shift_terminal": None}))
    plain = sigma_table(LossOptions(scheduler=unstretched, timestep_type="shift"), 1024, "cpu")
    assert plain[-1].item() < 0.01  # without it the last level stays near 0.001
    for kind in ("linear", "weighted"):  # only the shift types stretch
        assert sigma_table(LossOptions(scheduler=scheduler, timestep_type=kind), 1024, "cpu")[-1] == pytest.approx(
            0.001
        )


def test_a_fixed_shift_spaces_its_levels_over_the_schedulers_own_range_as_ai_toolkit_does():
    """Z-Image's scheduler shifts by a fixed 3, so its own sigmas run from 1 down to shift(0.001); ai-toolkit
    spaces the shift types' levels evenly over that range and shifts them again, so the cleanest level is
    shift(shift(0.001)), about 0.009, not shift(0.001)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastbackend.training.families import LossOptions
    from fastbackend.training.families.flux import sigma_table

    def shift(sigma: float) -> float:
        return 3 * sigma / (1 + 2 * sigma)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # Z-Image's
    table = sigma_table(LossOptions(scheduler=scheduler, timestep_type="shift"), 4096, "cpu")
    assert table[0].item() == pytest.approx(1.0)
    assert table[-1].item() == pytest.approx(shift(shift(0.001)), rel=1e-4)
    middle = 1 - 500 * (1 - shift(0.001)) / 999
    assert table[500].item() == pytest.approx(shift(middle), rel=1e-5)


@pytest.mark.parametrize("arch", ["flux2_klein_4b", "flux2"])
def test_flux2_shift_is_ai_toolkits_linear_mu_not_the_pipelines_empirical_one(arch, tiny_models):
    """ai-toolkit trains FLUX.2 with one fixed scheduler (FLUX.1-dev's settings, its flux2_model.py) and
    shifts by calculate_shift over the patched latents' tokens; diffusers' Flux2KleinPipeline samples with
    compute_empirical_mu, which also depends on the step count. Training follows ai-toolkit."""
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from fastbackend.training.families import LossOptions, family_for
    from fastbackend.training.families.flux import sigma_table

    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    pipe.scheduler.register_to_config(max_shift=3.0, shift_terminal=0.1)  # a checkpoint with other settings
    scheduler = family_for(arch).training_scheduler(pipe)
    config = scheduler.config
    assert (config.use_dynamic_shifting, config.base_shift, config.max_shift, config.shift_terminal) == (
        True, 0.5, 1.15, None
    )  # fmt: skip
    table = sigma_table(LossOptions(scheduler=scheduler, timestep_type="shift"), 4096, "cpu")  # 1024 px
    middle = 0.5  # level 500 of the even table (1 to 0.001 in steps of 0.001)

    def shifted(mu: float) -> float:
        return math.exp(mu) / (math.exp(mu) + 1 / middle - 1)

    assert table[500].item() == pytest.approx(shifted(1.15), rel=1e-4)
    assert abs(table[500].item() - shifted(compute_empirical_mu(4096, 50))) > 0.05


def test_content_favours_noise_and_style_favours_detail():
    from fastbackend.training.families.base import noise_level_indices

    torch.manual_seed(0)
    balanced = noise_level_indices(20_000, "balanced", "cpu").float()
    content = noise_level_indices(20_000, "content", "cpu").float()
    style = noise_level_indices(20_000, "style", "cpu").float()
    # u^3 * 1000 has mean 250; (1 - u^3) * 1000 has mean 750; index 0 is the noisiest level
    assert balanced.mean() == pytest.approx(500, abs=15)
    assert content.mean() == pytest.approx(250, abs=15) and style.mean() == pytest.approx(750, abs=15)


def lr_curve(scheduler: str, steps: int = 10, **params) -> list[float]:
    from fastbackend.training.setup import make_lr_scheduler

    config = TrainConfig(lr=1.0, steps=steps, lr_scheduler=scheduler, **params)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_lr_scheduler(config, optimizer)
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return curve


def test_learning_rate_curves_are_ai_toolkits():
    assert lr_curve("constant") == [1.0] * 10
    linear = lr_curve("linear")  # torch's LinearLR as ai-toolkit uses it: up from lr/3 to lr
    assert linear[0] == pytest.approx(1 / 3) and linear[-1] == pytest.approx(1 / 3 + 0.9 * 2 / 3)
    assert all(a < b for a, b in itertools.pairwise(linear))
    assert lr_curve("linear", lr_scheduler_params={"start_factor": 1.0, "end_factor": 0.1})[-1] == pytest.approx(0.19)
    cosine = lr_curve("cosine")  # CosineAnnealingLR(T_max=steps)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    warm = lr_curve("constant_with_warmup", steps=2000)  # ai-toolkit's default warm-up: 1000 steps
    assert warm[0] == 0 and warm[500] == pytest.approx(0.5) and warm[1500] == 1.0
    # lr_warmup_steps is no ai-toolkit key: it changes nothing; lr_scheduler_params.num_warmup_steps does
    assert lr_curve("constant_with_warmup", steps=10, lr_warmup_steps=2)[:3] == [0.0, 0.001, 0.002]
    assert lr_curve("cosine", lr_warmup_steps=3) == cosine
    # ai-toolkit's cosine: warm-up, then a decay over `steps` more (so it does not reach 0 here), to eta_min
    warm_cosine = lr_curve("cosine", lr_scheduler_params={"num_warmup_steps": 2, "eta_min": 0.1})
    assert warm_cosine[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert warm_cosine[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 10)))
    short = lr_curve("cosine", lr_scheduler_params={"cosine_decay_steps": 4})
    assert short[4:] == pytest.approx([0.0] * 6) and short[2] == pytest.approx(0.5)


def test_lr_warmup_steps_is_said_to_be_unused():
    text = fixture_yaml().replace("lr: 0.0001", "lr: 0.0001\n      lr_scheduler: cosine\n      lr_warmup_steps: 50")
    warnings = parse_training_config(text)[1]
    assert [w for w in warnings if "lr_warmup_steps" in w] == [
        "config.process[0].train.lr_warmup_steps: not used (ai-toolkit has no such key and ignores it); the warm-up "
        "is lr_scheduler_params.num_warmup_steps, for constant_with_warmup (default 1000) and cosine"
    ]


def test_ema_decay_is_constant_from_the_first_update():
    from fastbackend.training.setup import make_ema

    param = torch.nn.Parameter(torch.zeros(1))
    ema = make_ema(TrainConfig(ema_config={"use_ema": True, "ema_decay": 0.9}), [param])
    shadow = 0.0
    for value in (1.0, 2.0, 3.0):
        param.data.fill_(value)
        ema.step([param])
        shadow = 0.9 * shadow + 0.1 * value
        assert ema.shadow_params[0].item() == pytest.approx(shadow)


def test_omitted_keys_take_ai_toolkits_defaults():
    config, _ = parse_training_config(
        {
            "job": "extension",
            "config": {
                "name": "defaults",
                "process": [
                    {"type": "sd_trainer", "datasets": [{"folder_path": "d"}], "model": {"name_or_path": "a/b"}}
                ],
            },
        }
    )
    process = config.process
    train_cfg = process.train
    assert (train_cfg.lr, train_cfg.steps, train_cfg.batch_size, train_cfg.optimizer) == (1e-6, 1000, 1, "adamw")
    assert (train_cfg.lr_scheduler, train_cfg.max_grad_norm, train_cfg.dtype) == ("constant", 1.0, "fp32")
    assert (train_cfg.noise_scheduler, train_cfg.content_or_style, train_cfg.gradient_checkpointing) == (
        "ddpm",
        "balanced",
        True,
    )
    assert (train_cfg.ema_config.use_ema, train_cfg.ema_config.ema_decay) == (False, 0.999)
    assert (process.network.rank, process.network.alpha) == (4, 1.0)
    assert process.datasets[0].caption_dropout_rate == 0.0
    assert (process.save.save_every, process.save.max_step_saves_to_keep, process.save.dtype) == (1000, 5, "float16")


# ---------------------------------------------------------------- 8. SDXL's VAE


def test_sdxl_encodes_in_fp32_whatever_the_vae_dtype(tiny_models):
    from fastbackend.training.families import family_for

    pipe = load(tiny_models, "sdxl")
    pipe.vae.to(torch.bfloat16)
    seen = []
    encode = pipe.vae.encode

    def spy(pixels, *args, **kwargs):
        seen.append((pixels.dtype, pipe.vae.dtype))
        return encode(pixels, *args, **kwargs)

    pipe.vae.encode = spy
    mean, std = family_for("sdxl").encode_pixels(pipe, torch.zeros(1, 3, 64, 64))
    assert seen == [(torch.float32, torch.float32)] and pipe.vae.dtype == torch.bfloat16
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()


# ---------------------------------------------------------------- 9. ai-toolkit's own configs

EXAMPLES = Path(__file__).resolve().parent / "fixtures" / "ai_toolkit"


@pytest.mark.parametrize(
    ("example", "arch", "ignored"),
    [
        ("flux_dev.yaml", "flux", set()),
        ("flux_schnell.yaml", "flux", set()),  # its assistant_lora_path is FLUX.1-schnell's training adapter
        (
            "sdxl_ui.yaml",
            "sdxl",
            {  # what makes ai-toolkit's run differ: its conv layers, its sample at step 0, a sample's own seed
                "network.conv",
                "train.skip_first_sample",
                "sample.samples[1].seed",
            },
        ),
    ],
)
def test_ai_toolkits_configs_parse_unchanged_and_say_what_they_ignore(example, arch, ignored):
    config, warnings = parse_training_config((EXAMPLES / example).read_text())
    assert config.process.model.resolved_arch == arch
    said = {w.split(": ignored")[0].removeprefix("config.process[0].") for w in warnings if ": ignored (" in w}
    assert said == ignored


@pytest.mark.parametrize("example", ["flux_dev.yaml", "flux_schnell.yaml", "sdxl_ui.yaml"])
def test_ai_toolkits_configs_train_with_only_paths_and_sizes_changed(example, tiny_models, data_root):
    """The configs as written, but for the model and dataset paths and what keeps a CPU test short."""
    arch = "sdxl" if example.startswith("sdxl") else "flux_schnell" if "schnell" in example else "flux"
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    text = (EXAMPLES / example).read_text()
    for model in (
        "black-forest-labs/FLUX.1-dev",
        "black-forest-labs/FLUX.1-schnell",
        "stabilityai/stable-diffusion-xl-base-1.0",
    ):
        text = text.replace(model, model_path)
    text = text.replace("/path/to/images/folder", "matt_training_test")
    if "schnell" in example:  # a tiny training adapter, as a folder holding pytorch_lora_weights.safetensors
        write_lora_file(tiny_models, arch, data_root / "adapters" / "schnell" / "pytorch_lora_weights.safetensors")
        text = text.replace("ostris/FLUX.1-schnell-training-adapter", "adapters/schnell")
    text = text.replace("[ 512, 768, 1024 ]", "[ 64 ]").replace("[512, 768, 1024]", "[64]")
    text = text.replace("steps: 2000", "steps: 2").replace("steps: 3000", "steps: 2")
    text = text.replace("width: 1024", "width: 64").replace("height: 1024", "height: 64")
    text = text.replace("sample_steps: 20", "sample_steps: 2").replace("sample_steps: 25", "sample_steps: 2")
    answer = train(text)
    assert answer["status"] == "success", answer
    assert answer["steps"] == 2 and len(answer["samples"]) == 2  # both prompts, at the end


def test_an_architecture_not_trained_yet_is_refused_by_name():
    text = fixture_yaml().replace("is_flux: true", "arch: chroma")
    refused = r"model\.arch: .*'chroma' is not supported by this worker yet; supported: flux, sdxl, sd15, zimage"
    with pytest.raises(ValidationFailed, match=refused):
        parse_training_config(text)


def test_sample_start_step_dataset_trigger_and_training_seed(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    text = user_yaml(
        model_path,
        steps=4,
        replacements={
            "sample_every: 100": "sample_every: 1\n      sample_start_step: 3",
            "caption_ext: txt": "caption_ext: txt\n      trigger_word: p3r5on",
            "- type: sd_trainer": "- type: sd_trainer\n    training_seed: 5",
        },
    )
    text = text.replace("      seed: 1234\n", "")  # training_seed is the seed now
    first, second = train(text), None
    assert first["status"] == "success", first
    steps = sorted({Path(p).name.split("_")[0] for p in first["samples"]})
    assert steps == ["000000003", "000000004"]  # nothing on schedule before step 3; the end always
    assert read_header(Path(first["lora_path"]))["fastbackend_trigger_word"] == "p3r5on"
    second = train(text.replace("steps: 4", "steps: 4\n      disable_sampling: true"), resume=False)
    assert second["loss_history"] == first["loss_history"]  # training_seed made the run reproducible


@pytest.mark.parametrize(
    ("change", "check"),
    [
        (("optimizer: adamw8bit", "optimizer: AdamW8bit"), lambda p: p.train.optimizer == "adamw8bit"),
        (("type: lora", "type: LoRA"), lambda p: p.network.type == "lora"),
        (("linear_alpha: 16", "linear_alpha: 0"), lambda p: p.network.alpha == 16.0),  # 0 means alpha = rank
        (("dtype: bf16", "dtype: half"), lambda p: p.train.dtype == "fp16"),
        (("caption_ext: txt", "caption_type: txt"), lambda p: p.datasets[0].caption_type == "txt"),
        (("is_flux: true", "arch: vega"), lambda p: p.model.resolved_arch == "sdxl"),
        (("ema_decay: 0.99", "ema_decay: 0.99\n      timestep_type: lumina2_shift"), lambda p: True),
    ],
)
def test_ai_toolkits_other_spellings_are_read_as_it_reads_them(change, check):
    config, _ = parse_training_config(fixture_yaml().replace(*change))
    assert check(config.process)


def test_training_kinds_other_than_lora_are_refused_by_name():
    text = fixture_yaml().replace("  - type: sd_trainer", "  - type: sd_trainer\n    embedding:\n      trigger: x")
    with pytest.raises(
        ValidationFailed, match=r"config\.process\[0\]\.embedding: not supported: this worker trains LoRAs"
    ):
        parse_training_config(text)


def test_a_config_without_a_network_section_says_it_trains_a_lora():
    text = fixture_yaml().replace("    network:\n      type: lora\n      linear: 16\n      linear_alpha: 16\n", "")
    _, warnings = parse_training_config(text)
    said = "config.process[0].network: missing; ai-toolkit would fine-tune the whole model, this worker trains a LoRA"
    assert f"{said} (rank 4, alpha 1)" in warnings


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("gradient_accumulation_steps: 2", [1.5, 3.5]),  # the mean over each window of steps
        ("gradient_accumulation_steps: 3", [2.0, 4.0]),  # windows of 3 and a last one of 1
        ("gradient_accumulation: 2", [3.0, 7.0, 11.0, 15.0]),  # each step's batches summed, as ai-toolkit
    ],
)
def test_each_update_sees_its_windows_gradient(key, expected, tiny_models, data_root, monkeypatch):
    from fastbackend.training import trainer
    from tests.test_config_effects import set_up_run

    run = set_up_run(tiny_models, data_root, "flux", {"gradient_accumulation_steps: 4": key})  # 4 steps
    calls, seen = iter(range(1, 100)), []
    monkeypatch.setattr(trainer, "next_batch", lambda run: None)
    # batch number k has loss k * sum(first LoRA weight): its gradient there is k everywhere
    monkeypatch.setattr(trainer, "compute_loss", lambda run, batch: next(calls) * run.params[0].sum())

    def record_update(run):
        seen.append(run.params[0].grad.mean().item())
        run.optimizer.zero_grad()

    monkeypatch.setattr(trainer, "optimizer_update", record_update)
    for run.step in range(4):
        trainer.train_step(run)
    assert seen == pytest.approx(expected)


def test_flux_trains_with_dev_scheduler_settings_even_on_schnell(tiny_models):
    from fastbackend.training.families import family_for

    pipe = load(tiny_models, "flux_schnell")
    pipe.scheduler.register_to_config(use_dynamic_shifting=False, shift=1.0)  # FLUX.1-schnell's own
    config = family_for("flux").training_scheduler(pipe).config
    assert (config.use_dynamic_shifting, config.base_shift, config.max_shift) == (True, 0.5, 1.15)


@pytest.mark.parametrize(("bias", "low", "high"), [("balanced", 480, 520), ("content", 720, 780), ("style", 220, 280)])
def test_sd_timesteps_follow_content_or_style(bias, low, high):
    from diffusers import DDPMScheduler

    from fastbackend.training.families.sd15 import SD15

    torch.manual_seed(0)
    steps = SD15().timesteps(20_000, DDPMScheduler(), bias, "cpu").float()
    assert low < steps.mean() < high  # content: noisy (high t); style: clean (low t)
    assert steps.min() >= 0 and steps.max() <= 999


def test_ignored_keys_warn_only_at_values_that_change_ai_toolkits_run():
    """ai-toolkit's defaults, and tuners of a feature left off, say nothing; other values say they are ignored."""

    def said(train: str = "", dataset: str = "") -> set[str]:
        text = (
            fixture_yaml()
            .replace("lr: 0.0001", f"lr: 0.0001\n{train}")
            .replace("caption_ext: txt", f"caption_ext: txt\n{dataset}")
        )
        return {w.split(": ignored")[0] for w in parse_training_config(text)[1] if ": ignored (" in w}

    at_defaults = said(
        "      loss_type: mse\n      diff_output_preservation: false\n      diff_output_preservation_class: woman",
        "      flip_x: false\n      network_weight: 1\n      mask_min_value: 0.2\n      num_frames: 1",
    )
    assert at_defaults == set()
    changed = said(
        "      loss_type: mae\n      diff_output_preservation: true\n      diff_output_preservation_class: woman",
        "      flip_x: true\n      network_weight: 0.5\n      mask_path: masks\n      mask_min_value: 0.2\n"
        "      num_frames: true",  # true is not ai-toolkit's 1
    )
    dataset = "config.process[0].datasets[0]."
    assert changed == {
        "config.process[0].train.loss_type",
        "config.process[0].train.diff_output_preservation",
        "config.process[0].train.diff_output_preservation_class",
        *(dataset + key for key in ("flip_x", "network_weight", "mask_path", "mask_min_value", "num_frames")),
    }


def test_a_regularization_dataset_is_refused_not_trained_as_the_subject():
    text = fixture_yaml().replace("caption_ext: txt", "caption_ext: txt\n      is_reg: true")
    with pytest.raises(ValidationFailed) as refused:
        parse_training_config(text)
    assert refused.value.message.startswith(
        "config.process[0].datasets[0].is_reg: regularization datasets are not supported: ai-toolkit trains them "
        "without the trigger word"
    )
    assert (
        parse_training_config(text.replace("is_reg: true", "is_reg: false"))[1]
        == parse_training_config(fixture_yaml())[1]
    )
