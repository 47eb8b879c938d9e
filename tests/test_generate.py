"""generate: images from a trained LoRA on its base model."""

import base64
import io

import pytest
from PIL import Image

from handler_fast import handler
from tests.training_helpers import install_model, train, upload_photos, user_yaml


def generate(**payload):
    return handler(
        {
            "id": "g",
            "input": {
                "type": "generate",
                "model": "nowy_dataset_1.3",
                "prompt": "Matt, photo",
                "width": 64,
                "height": 64,
                "steps": 2,
                "format": "png",
                **payload,
            },
        }
    )


def decode(answer):
    return [Image.open(io.BytesIO(base64.b64decode(image["content"]))) for image in answer["images"]]


@pytest.mark.parametrize("arch", ["flux", "zimage", "qwen_image", "flux2_klein_4b", "flux2"])
def test_generate_uses_the_lora_and_its_base_model(arch, tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    trained = train(user_yaml(model_path, arch, steps=3, replacements={"lr: 0.0001": "lr: 0.01"}))
    assert trained["status"] == "success", trained
    with_lora = generate(num_images=2)
    assert with_lora["status"] == "success", with_lora
    assert with_lora["base_model"] == model_path and [i["seed"] for i in with_lora["images"]] == [0, 1]
    assert [im.size for im in decode(with_lora)] == [(64, 64), (64, 64)]
    # Compared one image at a time: a batch of two rounds differently from a batch of one.
    one = decode(generate())[0]
    assert one.tobytes() == decode(generate())[0].tobytes()  # same seed, same LoRA: same image
    assert one.tobytes() != decode(generate(lora_scale=0.0))[0].tobytes()


def test_generate_refuses_unknown_models(data_root):
    answer = generate()
    assert answer["error"] == "input.model: no LoRA file 'nowy_dataset_1.3.safetensors' in model 'nowy_dataset_1.3'"
    assert generate(width=4096)["error"] == "input.width: must be <= 2048, got 4096"


def test_images_over_the_result_limit_are_refused(tiny_models, data_root, monkeypatch):
    from fastbackend import api

    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()
    assert train(user_yaml(model_path, "sd15", steps=1))["status"] == "success"
    monkeypatch.setattr(api, "MAX_RESULT_BYTES", 100)
    answer = generate()
    assert answer["error_code"] == "result_too_large"
    assert answer["error"].endswith("byte result limit; ask for fewer or smaller images, or format jpg")


def test_get_samples_returns_the_newest_step_and_lists_the_others(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    trained = train(user_yaml(model_path, steps=4, replacements={"sample_every: 100": "sample_every: 2"}))
    newest = handler({"id": "s", "input": {"type": "get_samples", "model": "nowy_dataset_1.3"}})
    assert (newest["step"], newest["steps"]) == (4, [2, 4])
    assert [image["filename"] for image in newest["images"]] == [
        "000000004_0.jpg",
        "000000004_1.jpg",
        "000000004_2.jpg",
    ]
    assert decode(newest)[0].size == (64, 64)
    assert len(trained["samples"]) == 6
    missing = handler({"id": "s", "input": {"type": "get_samples", "model": "nowy_dataset_1.3", "step": 3}})
    assert missing["error"] == "input.step: no samples at step 3; steps with samples: [2, 4]"


def test_the_base_pipeline_is_loaded_once_for_several_jobs(tiny_models, data_root, monkeypatch):
    from fastbackend.training import pipeline_cache
    from fastbackend.training.families import Family

    model_path = install_model(tiny_models, data_root, "sdxl")
    upload_photos()
    assert train(user_yaml(model_path, "sdxl", steps=1))["status"] == "success"
    pipeline_cache.release()
    loads = []
    real_load = Family.load

    def counted_load(self, source, *args, **kwargs):
        loads.append(source)
        return real_load(self, source, *args, **kwargs)

    monkeypatch.setattr(Family, "load", counted_load)
    for seed in (0, 1, 2):
        assert generate(seed=seed)["status"] == "success"
    assert loads == [str(data_root / "models" / "sdxl")]


@pytest.mark.parametrize(
    ("arch", "steps", "guidance"), [("sd15", 50, {"guidance_scale": 7.5}), ("flux", 28, {"guidance_scale": 3.5})]
)
def test_steps_and_guidance_default_to_the_pipelines_own(arch, steps, guidance, tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos(count=1)
    assert train(user_yaml(model_path, arch, steps=1))["status"] == "success"
    default = handler(
        {
            "id": "g",
            "input": {"type": "generate", "model": "nowy_dataset_1.3", "prompt": "Matt", "width": 64, "height": 64},
        }
    )
    assert default["status"] == "success", default
    assert default["steps"] == steps and default["guidance"] == guidance
    named = generate(guidance_scale=2.0)
    assert named["steps"] == 2 and named["guidance"] == {"guidance_scale": 2.0}
