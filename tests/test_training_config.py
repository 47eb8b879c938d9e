"""The ai-toolkit config: what is read, what is ignored with a warning, what is refused (and nothing written)."""

from __future__ import annotations

import pytest

from fastbackend.config import parse_training_config
from fastbackend.errors import ValidationFailed
from tests.test_upload import snapshot
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos, user_yaml

# The user's YAML has gradient_accumulation_steps: 4 and steps: 2000; ai-toolkit counts micro-batches.
ACCUMULATION_NOTE = (
    "config.process[0].train.gradient_accumulation_steps: as in ai-toolkit, steps, save_every and sample_every "
    "count micro-batches: 2000 steps are 500 optimizer updates of 4 micro-batches each; unlike ai-toolkit "
    "(which keeps only the last micro-batch's gradient), each update uses all of them"
)


def test_the_users_config_parses_unchanged():
    config, warnings = parse_training_config(fixture_yaml())
    process = config.process
    assert config.name == "nowy_dataset_1.3" and process.model.resolved_arch == "flux"
    assert process.train.lr == 0.0001 and process.train.steps == 2000 and process.train.gradient_accumulation_steps == 4
    assert process.network.rank == 16 and process.network.alpha == 16
    assert process.datasets[0].resolution == [512, 768, 1024, 1280]
    assert process.train.ema_config.use_ema and process.train.ema_config.ema_decay == 0.99
    assert process.sample.prompts[1] == "Matt, portrait, upper body"
    assert warnings == [ACCUMULATION_NOTE]


def test_numbers_are_read_as_ai_toolkit_reads_them_and_name_is_substituted():
    text = fixture_yaml().replace("lr: 0.0001", "lr: 1e-4").replace("neg: ''", "neg: '[name], blurry'")
    config, _ = parse_training_config(text)
    assert config.process.train.lr == 1e-4
    assert config.process.sample.negative_prompt == "nowy_dataset_1.3, blurry"


def test_known_but_unused_keys_are_accepted_with_a_warning():
    text = fixture_yaml().replace("      quantize: true", "      quantize: true\n      vae_path: other/vae")
    _, warnings = parse_training_config(text)
    assert warnings == [
        "config.process[0].model.vae_path: ignored (the base model's own VAE is used)",
        ACCUMULATION_NOTE,
    ]


def test_already_parsed_config_object_is_accepted():
    import yaml

    config, _ = parse_training_config(yaml.safe_load(fixture_yaml()))
    assert config.process.train.lr == 0.0001


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("steps: 2000", "stpes: 2000"), "config.process[0].train.stpes: unknown key; did you mean 'steps'?"),
        (("lr: 0.0001", "lr: -1"), "config.process[0].train.lr: must be > 0, got -1"),
        (
            ("optimizer: adamw8bit", "optimizer: adamw9bit"),
            "config.process[0].train.optimizer: input should be 'adamw', 'adamw8bit', 'adam', 'adam8bit', 'sgd' "
            "or 'prodigy', got 'adamw9bit'",
        ),
        (("job: extension", "job: extensions"), "job: input should be 'extension', got 'extensions'"),
        (("linear: 16", "linear: 0"), "config.process[0].network.linear: must be > 0, got 0"),
        (
            ("name: nowy_dataset_1.3", "name: ../evil"),
            "config.name: must be 1-64 characters from A-Z a-z 0-9 . _ -, not starting with a dot, got '../evil'",
        ),
    ],
)
def test_bad_values_are_refused_with_their_path(change, message):
    with pytest.raises(ValidationFailed) as caught:
        parse_training_config(fixture_yaml().replace(*change))
    assert caught.value.details == [message]


def test_every_problem_is_reported_at_once():
    text = (
        fixture_yaml()
        .replace("steps: 2000", "stpes: 2000")
        .replace("lr: 0.0001", "lr: 0")
        .replace("is_flux: true", "is_fluxx: true")
    )
    with pytest.raises(ValidationFailed, match=r"\(and 2 more problem\(s\), see details\)"):
        parse_training_config(text)


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (ALIAS_BOMB, "yaml_config: expands to over 20,000 values (a YAML alias bomb?)"),
        ("!!python/object/apply:os.system ['echo pwned']", "yaml_config: not valid YAML"),
        ("job: [unclosed", "yaml_config: not valid YAML"),
        ("- just\n- a list", "config: must be a mapping with `job` and `config`, got ['just', 'a list']"),
    ],
)
def test_unsafe_or_malformed_yaml_is_refused(yaml_text, message):
    with pytest.raises(ValidationFailed) as caught:
        parse_training_config(yaml_text)
    assert caught.value.message.startswith(message)


def refused(data_root, yaml_text: str) -> dict:
    before = snapshot(data_root)
    answer = train(yaml_text)
    assert answer["status"] == "error"
    assert snapshot(data_root) == before, "a refused config must not write anything"
    return answer


def test_refusals_write_nothing(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    assert refused(data_root, user_yaml(model_path))["error"] == (
        "config.process[0].datasets[0].folder_path: dataset 'matt_training_test' does not exist on this worker's "
        f"volume (nothing uploaded to it yet) at {data_root}; upload it first (datasets here: none); an endpoint "
        "with network volumes in several data centres does not share datasets between them"
    )
    upload_photos()
    outside = refused(data_root, user_yaml(model_path).replace("/workspace/training_data/matt_training_test", "/etc"))
    assert (
        outside["error"]
        == f"config.process[0].datasets[0].folder_path: path '/etc' is outside the data root '{data_root}'"
    )
    escape = refused(data_root, user_yaml(model_path).replace("matt_training_test", "../../etc"))
    assert escape["error_code"] == "invalid_dataset" and "outside the data root" in escape["error"]
    model_outside = refused(data_root, user_yaml("/etc/models/flux"))
    assert model_outside["error"] == (
        f"config.process[0].model.name_or_path: path '/etc/models/flux' is outside the data root '{data_root}'; "
        "models baked into the image must lie in FASTBACKEND_MODEL_DIRS (unset)"
    )
    not_model = refused(data_root, user_yaml("/workspace/training_data"))
    assert not_model["error"] == (
        "config.process[0].model.name_or_path: '/workspace/training_data' is not a diffusers "
        "model folder (no model_index.json)"
    )
    bad_folder = refused(data_root, user_yaml(model_path).replace("training_folder: output", "training_folder: /tmp"))
    assert (
        bad_folder["error"] == f"config.process[0].training_folder: path '/tmp' is outside the data root '{data_root}'"
    )
    typo = refused(data_root, user_yaml(model_path).replace("  steps: 4", "  stpes: 4"))
    assert typo["error"] == "config.process[0].train.stpes: unknown key; did you mean 'steps'?"
    negative = refused(data_root, user_yaml(model_path).replace("lr: 0.0001", "lr: -1"))
    assert negative["error"] == "config.process[0].train.lr: must be > 0, got -1"
    assert refused(data_root, ALIAS_BOMB)["error"] == "yaml_config: expands to over 20,000 values (a YAML alias bomb?)"


def test_a_hub_model_that_cannot_be_fetched_leaves_nothing(data_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    upload_photos()
    answer = refused(data_root, user_yaml("nobody/no-such-model"))
    assert answer["error_code"] == "model_load_failed"
    assert answer["error"].startswith("config.process[0].model.name_or_path: could not load 'nobody/no-such-model'")


def test_a_model_of_another_architecture_is_refused_cleanly(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer = refused(data_root, user_yaml(model_path, "sdxl"))
    assert answer["error_code"] == "model_load_failed", answer
    assert answer["error"].startswith(f"config.process[0].model.name_or_path: could not load '{model_path}'")


def test_a_second_job_for_the_same_model_is_refused_while_the_first_runs(tiny_models, data_root, monkeypatch):
    from fastbackend import storage

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    monkeypatch.setattr(storage, "BUSY_LOCK_TIMEOUT_S", 0.3)
    output = data_root / "output" / "nowy_dataset_1.3"
    with storage.locked(output):  # the first job, on another worker
        (output / "config.yaml").write_text("the first job's")
        answer = train(user_yaml(model_path))
    assert answer["error_code"] == "locked"
    assert answer["error"] == "'nowy_dataset_1.3' is in use by another job (waited 0.3s)"
    assert (output / "config.yaml").read_text() == "the first job's"


def test_a_path_with_a_nul_byte_is_refused(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer = refused(data_root, user_yaml(model_path).replace("/workspace/training_data/matt_training_test", '"a\\0b"'))
    assert answer["error"] == "config.process[0].datasets[0].folder_path: path 'a\\x00b' contains a NUL byte"


def test_settings_that_do_not_fit_the_architecture_are_warned_about():
    text = (
        fixture_yaml()
        .replace("is_flux: true", "arch: sd15")
        .replace("neg: ''", "neg: ''\n      network_multiplier: 0.8")
    )
    _, warnings = parse_training_config(text)
    assert warnings == [
        "config.process[0].sample.network_multiplier: ignored (samples use the LoRA at full strength)",
        ACCUMULATION_NOTE,
        "config.process[0].sample.sampler: 'flowmatch' does not fit sd15; samples use the model's own scheduler",
        "config.process[0].train.noise_scheduler: 'flowmatch' does not fit sd15; its own objective (ddpm) is used",
    ]


def test_keys_the_architecture_does_not_use_are_warned_about():
    text = fixture_yaml().replace("dtype: bf16", "dtype: bf16\n      noise_offset: 0.1\n      min_snr_gamma: 5")
    _, warnings = parse_training_config(text)
    assert warnings == [  # noise_offset is not among them: ai-toolkit offsets every model's noise
        "config.process[0].train.min_snr_gamma: ignored (an SD 1.5 / SDXL setting)",
        ACCUMULATION_NOTE,
    ]
    sd_text = (
        fixture_yaml()
        .replace("is_flux: true", "arch: sdxl")
        .replace("dtype: bf16", "dtype: bf16\n      timestep_type: shift")
    )
    _, sd_warnings = parse_training_config(sd_text)
    assert not any("timestep_type" in w for w in sd_warnings)  # ai-toolkit's DDPM ignores it too: the same run


@pytest.mark.parametrize("arch", ["flux_kontext", "chroma", "hidream", "wan21"])
def test_architectures_not_supported_yet_are_refused_with_the_list(arch):
    text = fixture_yaml().replace("is_flux: true", f"arch: {arch}")
    with pytest.raises(ValidationFailed) as refused:
        parse_training_config(text)
    assert refused.value.message.startswith(
        f"config.process[0].model.arch: architecture '{arch}' is not supported by this worker yet; "
        "supported: flux, sdxl, sd15, zimage, qwen_image, flux2, flux2_klein_4b, flux2_klein_9b"
    )
