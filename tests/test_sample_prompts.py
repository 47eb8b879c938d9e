"""Sample prompts are encoded before training, with the captions, so that samples need no text
encoder on the GPU (FLUX's T5 alone is 9.5 GB): the same images as encoding them at sample time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training_helpers import install_model, train, upload_photos, user_yaml


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["flux", "sdxl", "sd15", "zimage", "qwen_image", "flux2_klein_4b", "flux2"])
def test_samples_from_cached_prompts_match_and_use_no_text_encoder(arch, tiny_models, data_root, monkeypatch):
    from fastbackend.training import sampling, trainer

    real_sample = sampling.sample
    calls = []

    def sample_without_text_encoders(run, *args, **kwargs):
        encoders = [getattr(run.pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(run.pipe, n, None)]
        cached = bool(run.texts.samples)
        hooks = [e.register_forward_pre_hook(lambda *a: calls.append("text encoder ran")) for e in encoders]
        try:
            return real_sample(run, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            calls.append("cached" if cached else "encoded")

    monkeypatch.setattr(trainer, "sample", sample_without_text_encoders)
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    seeded = {"      lr: 0.0001\n": "      lr: 0.0001\n      seed: 3\n"}
    cached = train(user_yaml(model_path, arch=arch, steps=1, replacements=seeded))
    assert cached["status"] == "success", cached
    assert calls == ["cached"]  # the final samples, with no text encoder run
    calls.clear()
    # Captions encoded every step keep the encoders on the device, and samples encode their prompts.
    every_step = seeded | {"      dtype: bf16\n": "      dtype: bf16\n      cache_text_embeddings: false\n"}
    encoded = train(user_yaml(model_path, arch=arch, steps=1, replacements=every_step).replace("nowy", "again"))
    assert encoded["status"] == "success", encoded
    assert calls[-1] == "encoded" and "text encoder ran" in calls
    assert cached["final_loss"] == encoded["final_loss"]
    for mine, theirs in zip(cached["samples"], encoded["samples"], strict=True):
        assert Path(mine).read_bytes() == Path(theirs).read_bytes(), (mine, theirs)
