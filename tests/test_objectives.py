"""The training objectives, unit by unit: epsilon and v targets, min-SNR weights, noise offset."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from fastbackend.training.families import LossOptions, TrainingBatch
from fastbackend.training.families.sd15 import SD15, min_snr_weights

STEPS = torch.tensor([10, 500, 990])


def ddpm(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


class Oracle(torch.nn.Module):
    """A denoiser that answers with a given prediction, and records what it was asked."""

    def __init__(self, answer: torch.Tensor):
        super().__init__()
        self.answer, self.seen = answer, {}

    def forward(self, noisy, timesteps, embeds, return_dict=False, **kwargs):
        self.seen = {"noisy": noisy, "timesteps": timesteps}
        return (self.answer,)


def sd_loss(monkeypatch, scheduler, answer, latents, noise, **options):
    family = SD15()
    monkeypatch.setattr(torch, "randn_like", lambda tensor: noise.clone())
    monkeypatch.setattr(family, "timesteps", lambda *args: STEPS)
    batch = TrainingBatch(latents=latents, cond={"prompt_embeds": torch.zeros(3, 4, 8)}, sizes=torch.zeros(3, 6))
    oracle = Oracle(answer)
    loss = family.loss(None, oracle, batch, LossOptions(scheduler=scheduler, **options))
    return loss, oracle


def alphas(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod[STEPS].view(3, 1, 1, 1)


def test_epsilon_target_is_the_noise_and_the_noisy_latents_follow_ddpm(monkeypatch):
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    scheduler = ddpm()
    loss, oracle = sd_loss(monkeypatch, scheduler, noise, latents, noise)
    assert loss.item() == 0.0
    expected = alphas(scheduler).sqrt() * latents + (1 - alphas(scheduler)).sqrt() * noise
    assert torch.allclose(oracle.seen["noisy"], expected, atol=1e-6)


def test_v_target_is_alpha_noise_minus_sigma_latents(monkeypatch):
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    scheduler = ddpm("v_prediction")
    v = alphas(scheduler).sqrt() * noise - (1 - alphas(scheduler)).sqrt() * latents
    assert sd_loss(monkeypatch, scheduler, v, latents, noise)[0].item() == pytest.approx(0.0, abs=1e-10)
    assert sd_loss(monkeypatch, scheduler, noise, latents, noise)[0].item() > 0.1  # epsilon is not v


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    scheduler = ddpm(prediction_type)
    snr = scheduler.alphas_cumprod[STEPS] / (1 - scheduler.alphas_cumprod[STEPS])
    expected = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(min_snr_weights(scheduler, STEPS, 5.0), expected.float())
    assert min_snr_weights(scheduler, STEPS, 5.0)[0] < 1  # the easy, low-noise step counts less


def test_min_snr_gamma_weights_the_loss(monkeypatch):
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    scheduler, wrong = ddpm(), torch.zeros(3, 4, 8, 8)
    plain, _ = sd_loss(monkeypatch, scheduler, wrong, latents, noise)
    weighted, _ = sd_loss(monkeypatch, scheduler, wrong, latents, noise, min_snr_gamma=5.0)
    per_item = (noise**2).mean(dim=(1, 2, 3))
    assert plain.item() == pytest.approx(per_item.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx((per_item * min_snr_weights(scheduler, STEPS, 5.0)).mean().item(), rel=1e-5)


def test_noise_offset_shifts_each_channel(monkeypatch):
    latents, noise = torch.zeros(3, 4, 8, 8), torch.zeros(3, 4, 8, 8)
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: torch.ones(*shape))
    # With zero noise, the epsilon target is the offset alone: 0.1 in every channel of every pixel.
    loss, _ = sd_loss(monkeypatch, ddpm(), torch.full((3, 4, 8, 8), 0.1), latents, noise, noise_offset=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss_without, _ = sd_loss(monkeypatch, ddpm(), torch.full((3, 4, 8, 8), 0.1), latents, noise)
    assert loss_without.item() == pytest.approx(0.01)
