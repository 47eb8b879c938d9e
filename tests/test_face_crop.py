"""Faces kept in frame by the bucket crops, and the face-weighted loss, exactly inside the face."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fastbackend.training import data
from tests.test_dataset_report import astronaut, jpeg, upload
from tests.training_helpers import install_model, train, user_yaml

FACE = (10, 0, 70, 60)  # a face in the top-left corner of a wide photo


def face_inside(sizes: tuple[int, ...], face) -> bool:
    orig_h, orig_w, top, left, height, width = sizes
    scale = max(width / orig_w, height / orig_h)
    x0, y0, x1, y1 = (v * scale for v in face)
    return left <= x0 + 1e-6 and top <= y0 + 1e-6 and x1 <= left + width + 1e-6 and y1 <= top + height + 1e-6


def test_the_crop_keeps_the_face_at_every_bucket(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (1000, 400), "gray").save(path)
    cut_when_centred = 0
    for resolution in (64, 96, 128, 192, 256, 384, 512):
        bucket = data.bucket_for(1000, 400, resolution, 16)
        _, sizes = data.load_pixels(path, bucket, FACE)
        assert face_inside(sizes, FACE), (resolution, bucket, sizes)
        _, centred = data.load_pixels(path, bucket)
        cut_when_centred += not face_inside(centred, FACE)
    assert cut_when_centred  # the case is real: a centred crop cuts this face somewhere


def test_the_face_box_in_latent_cells():
    item = data.Item(path=None, sha256="x", caption="", size=(1000, 400), face=FACE)
    example = data.Example(item=item, caption="", bucket=(96, 32), face_crop=True)
    example.sizes = (400, 1000, 0, 0, 32, 96)  # scale 0.096: the face is 0.96-6.7 x 0-5.8 px
    assert data.face_in_latents(example, 8) == (0, 0, 1, 1)
    example.sizes = (400, 1000, 0, 0, 320, 960)  # scale 0.96: 9.6-67.2 x 0-57.6 px
    assert data.face_in_latents(example, 8) == (1, 0, 9, 8)
    item.face = None
    assert data.face_in_latents(example, 8) is None


@pytest.mark.parametrize("arch", ["flux", "sd15", "zimage", "qwen_image", "flux2_klein_4b"])
def test_the_weighted_loss_differs_from_the_plain_one_exactly_inside_the_mask(tiny_models, arch):
    """With the noise and timesteps fixed: L(1 + 2·I) - L(1) = 2·L(I), L(1 - I) = L(1) - L(I)."""
    from diffusers import DiffusionPipeline

    from fastbackend.training.families import LossOptions, TrainingBatch, family_for

    family = family_for(arch)
    pipe = DiffusionPipeline.from_pretrained(tiny_models / arch)
    options = LossOptions(scheduler=family.training_scheduler(pipe))
    torch.manual_seed(0)
    latents = torch.randn(1, 16 if arch.startswith("flux2") else 4, 8, 8)  # FLUX.2's come patched: 4x channels
    text = family.encode_prompt(pipe, "a photo")
    inside = torch.zeros(1, 1, 8, 8)
    inside[..., 2:6, 3:7] = 1.0

    def loss(weights):
        torch.manual_seed(1)
        batch = TrainingBatch(
            latents=latents, cond=text, sizes=torch.tensor([[64, 64, 0, 0, 64, 64]]), loss_weights=weights
        )
        with torch.no_grad():
            return family.loss(pipe, family.denoiser(pipe), batch, options).item()

    plain, ones, masked = loss(None), loss(torch.ones(1, 1, 8, 8)), loss(inside)
    assert ones == pytest.approx(plain, rel=1e-6) and masked > 0
    assert loss(1 + 2 * inside) - plain == pytest.approx(2 * masked, rel=1e-5)
    assert loss(1 - inside) == pytest.approx(plain - masked, rel=1e-5)


@pytest.mark.slow
def test_face_crops_and_the_face_weight_train_end_to_end(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "sd15")
    wide = Image.new("RGB", (1400, 512), "white")
    wide.paste(astronaut(), (0, 0))  # the face near the left edge
    upload("matt_training_test", {"wide.jpg": jpeg(wide), "photo.jpg": jpeg(astronaut())})
    text = user_yaml(
        model_path,
        "sd15",
        steps=2,
        replacements={"      lr: 0.0001\n": "      lr: 0.0001\n      face_loss_weight: 3\n"},
    )
    answer = train(text)
    assert answer["status"] == "success", answer
    cached = {p.name for p in (data_root / "training_data" / "matt_training_test").rglob("*.safetensors")}
    assert cached and all(name.endswith("_face.safetensors") for name in cached)
    centred = train(
        text.replace("cache_latents_to_disk: true", "cache_latents_to_disk: true\n      face_crop: false").replace(
            "name: nowy", "name: centred"
        )
    )
    assert centred["status"] == "success", centred
    names = {p.name for p in (data_root / "training_data" / "matt_training_test").rglob("*.safetensors")}
    assert any(not name.endswith("_face.safetensors") for name in names)


def test_flux_weights_land_on_their_own_latent_cells():
    """Packing weights with the latents: weighting then packing equals packing then weighting."""
    from diffusers import FluxPipeline

    from fastbackend.training.families.flux import packed_weights

    latents = torch.randn(2, 4, 8, 6)
    mask = torch.ones(2, 1, 8, 6)
    mask[0, :, 1:4, 3:6] = 3.0  # odd offsets: a box that straddles 2x2 patches
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 6)
    assert torch.equal(
        FluxPipeline._pack_latents(latents * mask, 2, 4, 8, 6), packed * packed_weights(mask, latents.shape)
    )


def test_face_weights_cover_each_face_box_and_nothing_else():
    from types import SimpleNamespace

    from fastbackend.training.families import family_for
    from fastbackend.training.trainer import face_weights

    run = SimpleNamespace(
        process=SimpleNamespace(train=SimpleNamespace(face_loss_weight=3.0)),
        pipe=SimpleNamespace(vae_scale_factor=8),
        family=family_for("sd15"),
    )
    with_face = data.Example(data.Item(None, "a", "", (1000, 400), FACE), "", (96, 32), face_crop=True)
    with_face.sizes = (400, 1000, 0, 0, 320, 960)  # the face: latent cells x 1-9, y 0-8
    without = data.Example(data.Item(None, "b", "", (1000, 400)), "", (96, 32))
    without.sizes = (400, 1000, 0, 0, 320, 960)
    weights = face_weights(run, [with_face, without], (40, 120))
    expected = torch.ones(2, 1, 40, 120)
    expected[0, :, 0:8, 1:9] = 3.0
    assert torch.equal(weights, expected)
    run.process.train.face_loss_weight = None
    assert face_weights(run, [with_face], (40, 120)) is None


@pytest.mark.slow
def test_without_the_face_model_the_default_crop_centres_and_explicit_requests_fail(
    tiny_models, data_root, monkeypatch
):
    from fastbackend import faces

    model_path = install_model(tiny_models, data_root, "sd15")
    upload("matt_training_test", {"photo.jpg": jpeg(astronaut())})
    monkeypatch.setattr(faces, "MODELS_PACKAGE", "no_such_models_package")
    faces.face_model.cache_clear()
    try:
        text = user_yaml(model_path, "sd15", steps=1)
        default = train(text)
        key = "      cache_latents_to_disk: true\n"
        cropped = train(text.replace(key, key + "      face_crop: true\n").replace("name: nowy", "name: cropped"))
        weighted = train(
            text.replace("      lr: 0.0001\n", "      lr: 0.0001\n      face_loss_weight: 2\n").replace(
                "name: nowy", "name: weighted"
            )
        )
    finally:
        faces.face_model.cache_clear()
    assert default["status"] == "success", default
    assert any(w.startswith("photos are centre-cropped: the face model") for w in default["warnings"])
    cached = {p.name for p in (data_root / "training_data" / "matt_training_test").rglob("*.safetensors")}
    assert cached and not any(name.endswith("_face.safetensors") for name in cached)
    assert cropped["error_code"] == weighted["error_code"] == "model_load_failed"


def test_flux2_face_weights_are_per_patch_where_the_loss_sees_its_latents():
    """FLUX.2 trains on 2x2-patched latents (16 px a cell): a face at pixels 48-80 of a 128 px photo is
    patches 3 and 4, not the 8 px cells 6 and 7."""
    from types import SimpleNamespace

    from fastbackend.training.families import family_for
    from fastbackend.training.trainer import face_weights

    run = SimpleNamespace(
        process=SimpleNamespace(train=SimpleNamespace(face_loss_weight=3.0)),
        pipe=SimpleNamespace(vae_scale_factor=8),
        family=family_for("flux2_klein_4b"),
    )
    example = data.Example(data.Item(None, "a", "", (128, 128), (48, 48, 80, 80)), "", (128, 128), face_crop=True)
    example.sizes = (128, 128, 0, 0, 128, 128)
    expected = torch.ones(1, 1, 8, 8)
    expected[..., 3:5, 3:5] = 3.0
    assert torch.equal(face_weights(run, [example], (8, 8)), expected)
