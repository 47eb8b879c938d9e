"""Training adapters (ai-toolkit's `model.assistant_lora_path`, which `arch: zimage:turbo` sets): a LoRA
that is on while the user's LoRA trains and off for samples, never trained, never saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastbackend.config import ZIMAGE_TURBO_ADAPTER, parse_training_config
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.layout import LoraFolder
from tests.training_helpers import install_model, killed_at_step, train, upload_photos, user_yaml, write_lora_file

ADAPTER_FILE = "adapters/turbo.safetensors"  # under the data root
TURBO = {"arch: zimage": f"arch: zimage:turbo\n      assistant_lora_path: {ADAPTER_FILE}"}


def write_adapter(tiny_models: Path, data_root: Path) -> Path:
    """What the published turbo adapter is to Z-Image-Turbo, for the tiny Z-Image."""
    return write_lora_file(tiny_models, "zimage", data_root / ADAPTER_FILE)


def set_up_turbo(tiny_models, data_root, replacements: dict[str, str] = TURBO):
    from fastbackend.api.train import resolve_assistant, resolve_datasets
    from fastbackend.storage import resolve_base_model
    from fastbackend.training.run import TrainJob
    from fastbackend.training.setup import set_up

    write_adapter(tiny_models, data_root)
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    config, warnings = parse_training_config(user_yaml(model_path, "zimage", replacements=replacements))
    base = resolve_base_model(config.process.model.name_or_path, "name_or_path")
    output = LoraFolder(data_root / "output" / config.name)
    job = TrainJob(config, base, resolve_datasets(config), output, warnings=warnings)
    job.assistant_lora = resolve_assistant(config)
    return set_up(job)


def transformer_output(transformer) -> torch.Tensor:
    torch.manual_seed(0)
    latents = [torch.randn(transformer.config.in_channels, 1, 8, 8)]
    text = [torch.randn(5, transformer.config.cap_feat_dim)]
    with torch.no_grad():
        return transformer(latents, torch.tensor([0.5]), text, return_dict=False)[0][0]


def test_the_adapter_is_on_while_training_frozen_and_off_for_samples(tiny_models, data_root):
    from diffusers import ZImagePipeline

    from fastbackend.training import lora_io

    full_precision = TURBO | {"quantize: true": "quantize: false"}  # compared with fresh full-precision models
    run = set_up_turbo(tiny_models, data_root, full_precision)
    denoiser = run.denoiser
    assert lora_io.ASSISTANT in denoiser.peft_config
    assistant = [p for n, p in denoiser.named_parameters() if f".{lora_io.ASSISTANT}." in n]
    assert assistant and not any(p.requires_grad for p in assistant)
    assert not {id(p) for p in assistant} & {id(p) for p in run.params}  # never trained
    for name, param in denoiser.named_parameters():
        if f".lora_B.{lora_io.ADAPTER}." in name:
            param.data.normal_(0, 0.05)  # the user's LoRA, trained
    file = lora_io.to_file_format(run.family, lora_io.lora_state(run.lora_modules), rank=16, alpha=16)
    assert not any("assistant" in key for key in file)
    denoiser.eval()

    def fresh(*adapters: dict) -> torch.Tensor:
        pipe = ZImagePipeline.from_pretrained(tiny_models / "zimage")
        for index, weights in enumerate(adapters):
            pipe.load_lora_weights({k: v.clone() for k, v in weights.items()}, adapter_name=f"a{index}")
        if adapters:
            pipe.transformer.set_adapters([f"a{i}" for i in range(len(adapters))])
        return transformer_output(pipe.transformer)

    from safetensors.torch import load_file

    adapter = load_file(str(data_root / ADAPTER_FILE))
    training = transformer_output(denoiser)
    with lora_io.assistant_off(denoiser):
        sampling = transformer_output(denoiser)
    assert torch.allclose(training, fresh(adapter, file), atol=1e-5)  # base + adapter + the user's LoRA
    assert torch.allclose(sampling, fresh(file), atol=1e-5)  # base + the user's LoRA alone
    assert not torch.allclose(training, sampling, atol=1e-3)
    assert torch.equal(transformer_output(denoiser), training)  # back on after


def test_samples_are_rendered_with_the_adapter_off(tiny_models, data_root, monkeypatch):
    from fastbackend.training import lora_io, sampling

    run = set_up_turbo(tiny_models, data_root)
    layers = [m for m in run.denoiser.modules() if lora_io.ASSISTANT in getattr(m, "scaling", {})]
    seen = []

    def render(pipe, **kwargs):
        seen.append([layer.scaling[lora_io.ASSISTANT] for layer in layers])
        raise RuntimeError("rendered")

    monkeypatch.setattr(type(run.pipe), "__call__", render)
    with pytest.raises(RuntimeError, match="rendered"):
        sampling.sample(run)
    assert seen and all(scale == 0.0 for scale in seen[0])
    assert all(layer.scaling[lora_io.ASSISTANT] == 1.0 for layer in layers)  # on again for the next steps


def test_zimage_turbo_trains_through_the_adapter_and_saves_only_the_users_lora(tiny_models, data_root):
    write_adapter(tiny_models, data_root)
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    answer = train(user_yaml(model_path, "zimage", steps=2, replacements=TURBO))
    assert answer["status"] == "success", answer
    assert answer["arch"] == "zimage"
    note = f"config.process[0].model.assistant_lora_path: {ADAPTER_FILE} is on while training and off for samples"
    assert any(w.startswith(note) for w in answer["warnings"]), answer["warnings"]
    from safetensors import safe_open

    with safe_open(answer["lora_path"], "pt") as handle:
        keys = set(handle.keys())
    assert keys and all(key.startswith("diffusion_model.layers.") for key in keys)
    adapter_keys = set(safe_open(str(data_root / ADAPTER_FILE), "pt").keys())
    assert keys == adapter_keys  # the same layers, none of them the adapter's weights
    assert len(answer["samples"]) == 3


def test_zimage_turbo_defaults_to_the_published_adapter_and_keeps_one_given():
    text = user_yaml("Tongyi-MAI/Z-Image-Turbo", "zimage:turbo")
    config, _ = parse_training_config(text)
    assert config.process.model.resolved_arch == "zimage"
    assert config.process.model.assistant_lora_path == ZIMAGE_TURBO_ADAPTER
    config, _ = parse_training_config(user_yaml("Tongyi-MAI/Z-Image-Turbo", "zimage", replacements=TURBO))
    assert config.process.model.assistant_lora_path == ADAPTER_FILE
    config, _ = parse_training_config(user_yaml("Tongyi-MAI/Z-Image", "zimage"))
    assert config.process.model.assistant_lora_path is None


def test_an_adapter_for_sd_is_warned_about_and_ignored():
    from fastbackend.api.train import resolve_assistant

    text = user_yaml("some/model", "sd15", replacements={"arch: sd15": "arch: sd15\n      assistant_lora_path: x/y"})
    config, warnings = parse_training_config(text)
    assert "config.process[0].model.assistant_lora_path: ignored (a flow-matching setting)" in warnings
    assert resolve_assistant(config) is None


@pytest.mark.parametrize(
    ("reference", "code"),
    [
        ("/etc/passwd", ErrorCode.PATH_OUTSIDE_ROOT),
        ("../outside.safetensors", ErrorCode.PATH_OUTSIDE_ROOT),
        ("adapters/missing.safetensors", ErrorCode.NOT_FOUND),
        ("owner/repo/notes.txt", ErrorCode.INVALID_CONFIG),
        ("owner/repo/../../x.safetensors", ErrorCode.INVALID_CONFIG),
        ("not a hub id", ErrorCode.INVALID_CONFIG),
        ("owner/re--po/a.safetensors", ErrorCode.INVALID_CONFIG),  # the hub's own rule for repo ids
        ("owner/repo.git", ErrorCode.INVALID_CONFIG),
    ],
)
def test_adapter_references_outside_the_root_or_malformed_are_refused_by_field(data_root, reference, code):
    from fastbackend.storage import resolve_lora_file

    (data_root / "adapters").mkdir(parents=True)
    with pytest.raises(FastBackendError) as caught:
        resolve_lora_file(reference, "config.process[0].model.assistant_lora_path")
    assert caught.value.code == code
    assert caught.value.message.startswith("config.process[0].model.assistant_lora_path: ") and reference in (
        caught.value.message
    )


def test_adapter_references_in_ai_toolkits_forms_resolve(data_root):
    from fastbackend.storage import LORA_WEIGHTS_NAME, hub_file, resolve_lora_file

    folder = data_root / "adapters" / "schnell"
    folder.mkdir(parents=True)
    (folder / LORA_WEIGHTS_NAME).write_bytes(b"x")
    assert resolve_lora_file("adapters/schnell", "f") == str(folder / LORA_WEIGHTS_NAME)  # a folder: diffusers' name
    assert resolve_lora_file("/workspace/adapters/schnell", "f") == str(folder / LORA_WEIGHTS_NAME)
    assert resolve_lora_file(ZIMAGE_TURBO_ADAPTER, "f") == ZIMAGE_TURBO_ADAPTER
    assert hub_file(ZIMAGE_TURBO_ADAPTER) == (
        "ostris/zimage_turbo_training_adapter",
        "zimage_turbo_training_adapter_v2.safetensors",
    )
    assert hub_file("ostris/FLUX.1-schnell-training-adapter") == (
        "ostris/FLUX.1-schnell-training-adapter",
        LORA_WEIGHTS_NAME,
    )


def test_an_adapter_that_cannot_be_fetched_or_loaded_is_model_load_failed_naming_the_field(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    offline = {"arch: zimage": "arch: zimage\n      assistant_lora_path: nobody/nothing/adapter.safetensors"}
    answer = train(user_yaml(model_path, "zimage", steps=2, replacements=offline))
    assert answer["error_code"] == "model_load_failed", answer
    assert answer["error"].startswith(
        "config.process[0].model.assistant_lora_path: could not load 'nobody/nothing/adapter.safetensors'"
    )
    (data_root / "adapters").mkdir()
    (data_root / ADAPTER_FILE).write_bytes(b"not a safetensors file")
    answer = train(user_yaml(model_path, "zimage", steps=2, replacements=TURBO))
    assert answer["error_code"] == "model_load_failed", answer
    assert "assistant_lora_path" in answer["error"]
    assert not list((data_root / "output").rglob("*.safetensors"))  # nothing saved, nothing to list


def test_zimage_turbo_without_a_path_downloads_the_published_adapter_into_the_volumes_cache(
    tiny_models, data_root, monkeypatch, tmp_path
):
    from fastbackend.storage import cached_hub_file, hf_cache_dir
    from tests.fake_hub import serving

    repo_id, filename = "ostris/zimage_turbo_training_adapter", "zimage_turbo_training_adapter_v2.safetensors"
    published = tmp_path / "published"
    write_lora_file(tiny_models, "zimage", published / filename)
    (published / "README.md").write_text("not needed for training")
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    with serving(monkeypatch, repo_id, published) as hub:
        answer = train(user_yaml(model_path, "zimage:turbo", steps=1))
    assert answer["status"] == "success", answer
    assert cached_hub_file(repo_id, filename) is not None
    assert cached_hub_file(repo_id, filename)[0] == hf_cache_dir()
    assert not any(path.endswith("README.md") for _, path, _ in hub.requests)  # the adapter file only


def test_a_crashed_turbo_run_resumes_with_its_adapter_and_starts_over_without_it(tiny_models, data_root, monkeypatch):
    """The saved state belongs to the adapter it was trained against: the same adapter continues it,
    another (or none) starts from step 0 and says so."""
    write_adapter(tiny_models, data_root)
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    saves = {"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"}
    turbo = user_yaml(model_path, "zimage", steps=4, replacements=TURBO | saves)
    with killed_at_step(3, monkeypatch):
        assert train(turbo)["error_code"] == "internal_error"
    resumed = train(turbo)
    assert resumed["status"] == "success" and resumed["resumed_from_step"] == 2, resumed
    other = {"name: nowy_dataset_1.3": "name: other"}
    with killed_at_step(3, monkeypatch):
        crashed = train(user_yaml(model_path, "zimage", steps=4, replacements=TURBO | saves | other))
    assert crashed["error_code"] == "internal_error"
    plain = train(user_yaml(model_path, "zimage", steps=4, replacements=saves | other))
    assert plain["status"] == "success", plain
    assert plain["resumed_from_step"] == 0
    assert any(w.startswith("saved state at step 2 was made with another model") for w in plain["warnings"])


def test_a_hub_shaped_reference_never_reads_the_working_directory(tiny_models, data_root, monkeypatch, tmp_path):
    """owner/repo/file.safetensors names a hub file; a file of that name where the worker runs is not it."""
    here = tmp_path / "cwd"
    write_lora_file(tiny_models, "zimage", here / "own" / "repo" / "a.safetensors")
    monkeypatch.chdir(here)
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    hub_shaped = {"arch: zimage": "arch: zimage\n      assistant_lora_path: own/repo/a.safetensors"}
    answer = train(user_yaml(model_path, "zimage", steps=1, replacements=hub_shaped))
    assert answer["error_code"] == "model_load_failed", answer  # offline: the hub cannot have it


def test_a_folder_whose_lora_file_links_out_of_the_root_is_refused(data_root, tmp_path):
    from fastbackend.storage import LORA_WEIGHTS_NAME, resolve_lora_file

    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    folder = data_root / "adapters" / "evil"
    folder.mkdir(parents=True)
    (folder / LORA_WEIGHTS_NAME).symlink_to(outside)
    for reference in ("adapters/evil", "/workspace/adapters/evil"):
        with pytest.raises(FastBackendError) as caught:
            resolve_lora_file(reference, "config.process[0].model.assistant_lora_path")
        assert caught.value.code == ErrorCode.PATH_OUTSIDE_ROOT, reference


def test_an_adapter_whose_layers_do_not_all_land_is_refused(tiny_models, data_root):
    from safetensors.torch import load_file, save_file

    path = write_adapter(tiny_models, data_root)
    state = load_file(str(path))
    save_file({key.replace(".layers.1.", ".layerz.1."): value for key, value in state.items()}, str(path))
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    answer = train(user_yaml(model_path, "zimage", steps=1, replacements=TURBO))
    assert answer["error_code"] == "model_load_failed", answer
    assert (
        "of its" in answer["error"]
        and "up-projection weights found a layer of the ZImageTransformer2DModel" in (answer["error"])
    )


def test_an_adapters_text_encoder_layers_are_left_out(tiny_models, data_root):
    """ai-toolkit applies a training adapter to the denoiser alone; FLUX's loader would put a file's
    text-encoder layers on CLIP, which no sample switches off."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file, save_file

    from fastbackend.training import lora_io

    path = write_lora_file(tiny_models, "flux", data_root / "adapters" / "schnell.safetensors")
    pipe = FluxPipeline.from_pretrained(tiny_models / "flux")
    q_proj = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")  # transformers 5's CLIP
    text_layer = "text_encoder.encoder.layers.0.self_attn.q_proj"
    state = load_file(str(path)) | {
        f"{text_layer}.lora_A.weight": torch.randn(2, q_proj.in_features),
        f"{text_layer}.lora_B.weight": torch.randn(q_proj.out_features, 2),
    }
    save_file(state, str(path))
    lora_io.add_assistant(pipe, pipe.transformer, str(path))
    assert lora_io.ASSISTANT in pipe.transformer.peft_config
    assert not getattr(pipe.text_encoder, "peft_config", None)


def test_the_memory_plan_counts_the_adapter_on_the_denoiser(data_root, monkeypatch):
    """The adapter's file, as big on the GPU as on the volume, while training and sampling (it is on
    the denoiser, which is not on the device while captions and latents are cached)."""
    import huggingface_hub

    from fastbackend.training.memory_plan import adapter_file_bytes, plan_run

    path = data_root / "adapters" / "big.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(3_000_000_000 // 1000))  # 3 MB stands for 3 GB below
    assert adapter_file_bytes(str(path)) == 3_000_000
    assert adapter_file_bytes(None) == 0
    assert adapter_file_bytes(str(path.parent / "gone.safetensors")) == 0  # the load will say what is wrong
    config, _ = parse_training_config(user_yaml("Tongyi-MAI/Z-Image-Turbo", "zimage:turbo"))
    without = plan_run(config.process, "Tongyi-MAI/Z-Image-Turbo", None)
    with_it = plan_run(config.process, "Tongyi-MAI/Z-Image-Turbo", None, adapter_bytes=3_000_000_000)
    assert with_it.phases["training"] == pytest.approx(without.phases["training"] + 3, abs=0.06)
    assert with_it.phases["sampling"] == pytest.approx(without.phases["sampling"] + 3, abs=0.06)
    assert with_it.phases["caching"] == without.phases["caching"]
    # A hub file: its size as the hub says (here: offline, so unknown and left out, never an error).
    assert adapter_file_bytes(ZIMAGE_TURBO_ADAPTER) == 0

    class Metadata:
        size = 170_000_000

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **options: Metadata())
    assert adapter_file_bytes(ZIMAGE_TURBO_ADAPTER) == 170_000_000


def test_generate_defaults_to_the_samples_steps_and_guidance_for_a_lora_trained_through_an_adapter(
    tiny_models, data_root
):
    """Z-Image-Turbo shares Z-Image's pipeline and so its defaults (50 steps, CFG 5), which are wrong
    for the distilled model: a LoRA trained through a training adapter renders as its samples did."""
    from handler_fast import handler

    write_adapter(tiny_models, data_root)
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    # the user's samples: 2 steps, no guidance; network keys as `rank` / `alpha` (their header names differ)
    turbo = {"guidance_scale: 4": "guidance_scale: 1", "linear: 16": "rank: 16", "linear_alpha: 16": "alpha: 16"}
    assert train(user_yaml(model_path, "zimage", steps=1, replacements=turbo | TURBO))["status"] == "success"

    def generate(**named) -> dict:
        request = {"type": "generate", "model": "nowy_dataset_1.3", "prompt": "Matt", "width": 64, "height": 64}
        return handler({"id": "g", "input": request | named})

    default = generate()
    assert default["status"] == "success", default
    assert default["steps"] == 2 and default["guidance"] == {"guidance_scale": 0.0}  # g - 1, as Z-Image takes it
    named = generate(steps=3, guidance_scale=2.0)
    assert named["steps"] == 3 and named["guidance"] == {"guidance_scale": 1.0}
    assert (
        train(user_yaml(model_path, "zimage", steps=1).replace("name: nowy_dataset_1.3", "name: plain"))["status"]
        == "success"
    )
    plain = handler(
        {"id": "g", "input": {"type": "generate", "model": "plain", "prompt": "Matt", "width": 64, "height": 64}}
    )
    assert plain["steps"] == 50 and plain["guidance"] == {"guidance_scale": 5.0}  # the pipeline's own
    # Samples past what a request may ask (steps 1-100): that one is the pipeline's own again.
    many = {"sample_steps: 2": "sample_steps: 150", "name: nowy_dataset_1.3": "name: many"}
    assert train(user_yaml(model_path, "zimage", steps=1, replacements=turbo | TURBO | many))["status"] == "success"
    past = handler(
        {"id": "g", "input": {"type": "generate", "model": "many", "prompt": "Matt", "width": 64, "height": 64}}
    )
    assert past["steps"] == 50 and past["guidance"] == {"guidance_scale": 0.0}


def test_a_training_run_plans_with_its_adapter(tiny_models, data_root):
    """What train_with_yaml plans with: the adapter's file is in the plan it answers."""
    write_adapter(tiny_models, data_root)
    adapter = data_root / ADAPTER_FILE
    with adapter.open("r+b") as grown:  # a sparse 2 GB: the plan reads the size, never the bytes
        grown.truncate(2_000_000_000)
    model_path = install_model(tiny_models, data_root, "zimage")
    upload_photos()
    from fastbackend.api.train import plan_memory, resolve_assistant
    from fastbackend.schemas import TrainWithYamlRequest

    config, warnings = parse_training_config(user_yaml(model_path, "zimage", replacements=TURBO))
    request = TrainWithYamlRequest(type="train_with_yaml", yaml_config="x: 1")
    base = str(data_root / "models" / "zimage")
    with_it = plan_memory(config, request, (base, resolve_assistant(config)), warnings)
    without = plan_memory(config, request, (base, None), warnings)
    assert with_it.phases["training"] == pytest.approx(without.phases["training"] + 2, abs=0.06)
