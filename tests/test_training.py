"""Training from the user's YAML on tiny random-weight models of every architecture, on the CPU."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from handler_fast import handler
from tests.training_helpers import USER_CONFIG, install_model, killed_at_step, train, upload_photos, user_yaml

ARCHES = ["flux", "flux_schnell", "sdxl", "sd15", "zimage", "qwen_image", "flux2_klein_4b", "flux2"]


def read_lora(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118 - not iterable


def loaded_lora_layers(pipe, adapter: str) -> int:
    """How many layers of the pipeline's models hold the adapter's LoRA weights."""
    count = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            count += sum(1 for name, _ in component.named_modules() if name.endswith(f"lora_A.{adapter}"))
    return count


def lora_layers_in_file(tensors: dict[str, torch.Tensor]) -> int:
    """LoRA layers a file holds; FLUX.2's fused qkv is three layers of the diffusers model."""
    return sum(3 if ".qkv." in key else 1 for key in tensors if key.endswith((".lora_A.weight", ".lora_down.weight")))


def render(pipeline_folder: str, lora_path: str | None, arch: str, scale: float = 1.0):
    """One image at 64 px from a fresh pipeline, with or without the LoRA, for a fixed seed.

    Every LoRA layer the file holds must land in the pipeline (a partial load would pass a
    "the output changed" check).
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    if lora_path:
        pipe.load_lora_weights(lora_path, adapter_name="trained")
        assert loaded_lora_layers(pipe, "trained") == lora_layers_in_file(read_lora(lora_path)[0])
        pipe.set_adapters(["trained"], adapter_weights=[scale])
    options = {"max_sequence_length": 32} if arch.startswith("flux") else {}
    return pipe(
        prompt="Matt, photo",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **options,
    ).images


def test_repository_copy_of_the_user_config_is_the_users_file_byte_for_byte():
    # The sha256 of the config the user trains with, as they sent it (trailing spaces included).
    assert (
        hashlib.sha256(USER_CONFIG.read_bytes()).hexdigest()
        == "8be311a02b50209c517bde164400ab34787f7e7c892f003118626d0e66b5c67c"
    )


@pytest.mark.parametrize("arch", ARCHES)
def test_user_yaml_trains_a_lora_that_loads_in_diffusers_and_changes_the_output(arch, tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    family = "flux" if arch in ("flux", "flux_schnell") else arch
    answer = train(
        user_yaml(
            model_path,
            family,
            steps=4,
            replacements={
                "linear: 16": "linear: 4",
                "linear_alpha: 16": "linear_alpha: 8",
                "sample_every: 100": "sample_every: 2",
            },
        )
    )
    assert answer["status"] == "success", answer
    assert answer["steps"] == 4 and answer["arch"] == family
    assert all(math.isfinite(loss) for _, loss in answer["loss_history"]) and len(answer["loss_history"]) == 4
    assert len(answer["samples"]) == 6  # three prompts at step 2 and at the end

    tensors, metadata = read_lora(answer["lora_path"])
    if family == "flux":
        assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in tensors)
        assert any(k.startswith("transformer.single_transformer_blocks.") for k in tensors)
    elif family in ("zimage", "qwen_image", "flux2_klein_4b", "flux2"):  # ai-toolkit's: diffusion_model.<module>
        blocks = {"zimage": ("layers.",), "qwen_image": ("transformer_blocks.",)}.get(
            family, ("double_blocks.", "single_blocks.")
        )
        prefixes = tuple(f"diffusion_model.{block}" for block in blocks)
        assert all(k.startswith(prefixes) and (".lora_A." in k or ".lora_B." in k) for k in tensors)
    else:
        assert all(k.startswith("lora_unet_") for k in tensors)
        alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
        assert alphas and all(float(a) == 8.0 for a in alphas)
        assert any(k.endswith(".lora_down.weight") for k in tensors) and any(
            k.endswith(".lora_up.weight") for k in tensors
        )
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if not k.endswith(".alpha"))
    up_weights = [v for k, v in tensors.items() if "lora_B" in k or "lora_up" in k]
    assert any(v.abs().sum() > 0 for v in up_weights), "lora_B starts at zero: training must move it"
    assert metadata["fastbackend_arch"] == family and metadata["ss_network_dim"] == "4"
    # ai-toolkit trains its transformer models at scale 1 (alpha = rank) whatever linear_alpha says, and says so here
    transformer = family not in ("sd15", "sdxl")
    assert metadata["ss_network_alpha"] == ("4.0" if transformer else "8.0") and metadata["ss_steps"] == "4"
    alpha_warning = f"config.process[0].network.linear_alpha: {family} LoRAs train at scale 1 (alpha = rank 4)"
    assert any(w.startswith(alpha_warning) for w in answer["warnings"]) == transformer
    assert metadata["ss_sd_model_name"] == model_path and metadata["ss_resolution"] == "[64]"
    assert len(metadata["ss_dataset_hash"]) == 16

    folder = str(data_root / "models" / arch)
    before = render(folder, None, arch)
    after = render(folder, answer["lora_path"], arch)
    assert before.shape == after.shape and not (before == after).all()
    assert (render(folder, answer["lora_path"], arch, scale=0.0) == before).all()  # scale 0: the base model


@pytest.mark.parametrize("arch", ["sd15", "zimage", "qwen_image", "flux2_klein_4b", "flux2"])
def test_fixed_batch_learns(arch, tiny_models, data_root):
    """With the batch, noise and timesteps fixed, the loss must fall: the LoRA learns."""
    from fastbackend.config import parse_training_config
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, arch)
    upload_photos(count=1)
    config, _ = parse_training_config(
        user_yaml(
            model_path,
            arch,
            replacements={
                "lr: 0.0001": "lr: 0.01",
                "caption_dropout_rate: 0.05": "caption_dropout_rate: 0.0",
                "use_ema: true": "use_ema: false",
                "dtype: bf16": "dtype: bf16\n      seed: 0",
            },
        )
    )
    job = trainer.TrainJob(
        config,
        str(data_root / "models" / arch),
        [data_root / "training_data" / "matt_training_test"],
        data_root / "output" / "fixed",
        resume=False,
    )
    run = trainer.set_up(job)
    batch = trainer.next_batch(run)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # same noise and timesteps every step
        loss = trainer.compute_loss(run, batch)
        run.accelerator.backward(loss)
        run.optimizer.step()
        run.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses


def test_list_models_shows_the_trained_lora(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer = train(user_yaml(model_path, steps=2))
    listing = handler({"id": "l", "input": {"type": "list_models"}})
    final = next(m for m in listing["models"] if m["filename"] == "nowy_dataset_1.3.safetensors")
    assert (final["arch"], final["rank"], final["steps"], final["base_model"]) == ("flux", 16, 2, model_path)
    assert final["sha256"] == answer["sha256"] and final["size"] == answer["size"]


def test_step_saves_keep_the_newest(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer = train(
        user_yaml(
            model_path,
            steps=6,
            replacements={
                "save_every: 2000": "save_every: 2",
                "max_step_saves_to_keep: 1": "max_step_saves_to_keep: 2",
                "sample_every: 100": "sample_every: 1000",
            },
        )
    )
    output = data_root / "output" / "nowy_dataset_1.3"
    assert [p.rsplit("/", 1)[1] for p in answer["step_saves"]] == [
        "nowy_dataset_1.3_000000002.safetensors",
        "nowy_dataset_1.3_000000004.safetensors",
    ][-2:]
    assert sorted(p.name for p in output.glob("*.safetensors")) == [
        "nowy_dataset_1.3.safetensors",
        "nowy_dataset_1.3_000000002.safetensors",
        "nowy_dataset_1.3_000000004.safetensors",
    ]
    assert (output / "config.yaml").exists() and (output / "metadata.json").exists()


@pytest.mark.parametrize("arch", ["flux", "zimage", "qwen_image", "flux2_klein_4b", "flux2"])
def test_a_crashed_run_resumes_from_its_last_save(arch, tiny_models, data_root, monkeypatch):
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    yaml_text = user_yaml(
        model_path,
        arch,
        steps=5,
        replacements={"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"},
    )
    with killed_at_step(3, monkeypatch):
        crashed = train(yaml_text)
    assert crashed["error_code"] == "internal_error"
    output = data_root / "output" / "nowy_dataset_1.3"
    assert (output / "training_state.pt").exists() and not (output / "nowy_dataset_1.3.safetensors").exists()
    resumed = train(yaml_text)
    assert resumed["status"] == "success", resumed
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 5
    assert [step for step, _ in resumed["loss_history"]] == [1, 2, 3, 4, 5]
    assert "resumed from the saved state at step 2" in resumed["warnings"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_save(tiny_models, data_root, monkeypatch):
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    real_loss = trainer.compute_loss

    def nan_from_step_4(run, batch):
        loss = real_loss(run, batch)
        return loss * float("nan") if run.step >= 3 else loss

    monkeypatch.setattr(trainer, "compute_loss", nan_from_step_4)
    answer = train(
        user_yaml(
            model_path,
            steps=6,
            replacements={"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"},
        )
    )
    assert answer["error_code"] == "non_finite_loss"
    assert answer["error"] == (
        "training stopped: the loss became nan at step 4; "
        "the last good save is kept (nowy_dataset_1.3_000000002.safetensors)"
    )
    assert (data_root / "output" / "nowy_dataset_1.3" / "nowy_dataset_1.3_000000002.safetensors").exists()


def test_progress_reports_every_stage_and_every_step(tiny_models, data_root):
    from fastbackend.api.train import train_with_yaml
    from fastbackend.schemas import TrainWithYamlRequest

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    seen = []
    every_2 = {"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 2"}
    request = TrainWithYamlRequest(
        type="train_with_yaml", yaml_config=user_yaml(model_path, steps=3, replacements=every_2)
    )
    train_with_yaml(request, progress=seen.append)
    stages = [(info["stage"], info.get("step")) for info in seen]
    assert stages == [
        ("analyzing_datasets", None),
        ("planning", None),
        ("loading_model", None),
        ("caching", None),
        ("training", 1),
        ("training", 2),
        ("sampling", 2),  # samples first: a save scored for likeness keeps its score in its state
        ("saving", 2),
        ("training", 3),
        ("sampling", 3),
        ("saving", 3),
    ]
    steps = [info for info in seen if info["stage"] == "training"]
    assert set(steps[0]) == {"stage", "step", "total_steps", "loss", "lr", "s_per_step", "eta_s"}
    assert steps[-1]["eta_s"] == 0


@pytest.mark.parametrize(
    ("arch", "prefixes"), [("sd15", {"lora_unet", "lora_te"}), ("sdxl", {"lora_unet", "lora_te1", "lora_te2"})]
)
def test_text_encoder_lora_is_trained_saved_and_loaded(arch, prefixes, tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, arch)
    upload_photos()
    answer = train(
        user_yaml(
            model_path,
            arch,
            steps=3,
            replacements={
                "train_text_encoder: false": "train_text_encoder: true",
                "lr: 0.0001": "lr: 0.001",
                "sample_every: 100": "sample_every: 1000",
            },
        )
    )
    assert answer["status"] == "success", answer
    assert not any("train_text_encoder" in w for w in answer["warnings"])
    tensors, _ = read_lora(answer["lora_path"])
    assert {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] for key in tensors} == prefixes
    # The names kohya, ai-toolkit, A1111, Forge and ComfyUI map: `text_model` kept (transformers 5
    # dropped it from CLIPTextModel), `lora_te_` for SD 1.5's single encoder.
    te_keys = [k for k in tensors if k.startswith("lora_te")]
    layer = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    pattern = rf"lora_te{'' if arch == 'sd15' else '[12]'}_{layer}\.(lora_down\.weight|lora_up\.weight|alpha)"
    assert te_keys and all(re.fullmatch(pattern, k) for k in te_keys), te_keys[:3]
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te") and k.endswith("lora_up.weight")]
    assert te_up and any(v.abs().sum() > 0 for v in te_up)

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(data_root / "models" / arch))
    pipe.load_lora_weights(answer["lora_path"], adapter_name="trained")
    assert any("lora_A" in name for name, _ in pipe.text_encoder.named_modules())


def test_running_out_of_gpu_memory_is_a_clear_error(tiny_models, data_root, monkeypatch):
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()

    def out_of_memory(run, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "compute_loss", out_of_memory)
    answer = train(user_yaml(model_path))
    assert answer["error_code"] == "out_of_memory"
    assert answer["error"].startswith("training ran out of GPU memory; try model.quantize: true")
    assert not (data_root / "output" / "nowy_dataset_1.3").exists()


def test_running_out_of_memory_after_a_save_keeps_a_state_the_next_job_resumes(tiny_models, data_root, monkeypatch):
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    yaml_text = user_yaml(
        model_path,
        steps=4,
        replacements={"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"},
    )
    real_loss = trainer.compute_loss

    def out_of_memory_at_step_3(run, batch):
        if run.step == 2:  # the third step, after the save at step 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(run, batch)

    monkeypatch.setattr(trainer, "compute_loss", out_of_memory_at_step_3)
    answer = train(yaml_text)
    assert answer["error_code"] == "out_of_memory" and "a resumable state, if any, is kept" in answer["error"]
    state = torch.load(data_root / "output" / "nowy_dataset_1.3" / "training_state.pt", weights_only=False)
    assert state["step"] == 2
    monkeypatch.setattr(trainer, "compute_loss", real_loss)
    resumed = train(yaml_text)
    assert resumed["status"] == "success" and resumed["resumed_from_step"] == 2 and resumed["steps"] == 4


REPO = Path(__file__).resolve().parent.parent
KILLED_RUN = """
import os, signal, sys
from fastbackend.training import trainer
from handler_fast import handler

save = trainer.save_checkpoint

def save_then_die(run, final):  # killed right after its first save: at step 2, inside a window of 4
    save(run, final)
    os.kill(os.getpid(), signal.SIGKILL)

trainer.save_checkpoint = save_then_die
handler({"id": "t", "input": {"type": "train_with_yaml", "yaml_config": open(sys.argv[1]).read()}})
"""


def test_a_killed_run_resumes_to_the_same_lora_as_an_uninterrupted_one(tiny_models, data_root, tmp_path):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    yaml_text = user_yaml(
        model_path,
        steps=12,
        replacements={"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"},
    ).replace("      train_unet: true\n", "      train_unet: true\n      disable_sampling: true\n")
    uninterrupted = train(yaml_text)
    assert uninterrupted["status"] == "success", uninterrupted
    expected, _ = read_lora(uninterrupted["lora_path"])
    output = data_root / "output" / "nowy_dataset_1.3"
    shutil.rmtree(output)

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml_text)
    worker = subprocess.run([sys.executable, "-c", KILLED_RUN, str(config_file)], cwd=REPO, timeout=300)
    assert worker.returncode == -signal.SIGKILL
    assert not (output / "nowy_dataset_1.3.safetensors").exists()

    resumed = train(yaml_text)
    assert resumed["status"] == "success", resumed
    # gradient_accumulation_steps: 4 and save_every: 2: the state holds half a window's gradients
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 12
    weights, _ = read_lora(resumed["lora_path"])
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


def test_a_retry_with_another_optimizer_resumes_with_fresh_moments(tiny_models, data_root):
    """train.preset: auto can pick another optimizer for a retry on a larger GPU; the state resumes."""
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    every_2 = {"save_every: 2000": "save_every: 2"}
    assert train(user_yaml(model_path, steps=2, replacements=every_2))["status"] == "success"  # adamw8bit
    other = every_2 | {"optimizer: adamw8bit": "optimizer: adamw"}
    again = train(user_yaml(model_path, steps=4, replacements=other))
    assert again["status"] == "success", again
    assert again["resumed_from_step"] == 2 and again["steps"] == 4
    assert (
        "the saved state's optimizer is AdamW8bit, this run's is AdamW: the LoRA weights, schedule and step "
        "continue, the optimizer starts with fresh moments"
    ) in again["warnings"]
