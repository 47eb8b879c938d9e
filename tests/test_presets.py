"""``train.preset``: fast on roomy GPUs, low_memory on small ones, the user's own keys always win."""

from __future__ import annotations

import pytest

from fastbackend.config import parse_training_config
from fastbackend.presets import apply_preset
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos, user_yaml

OPEN_KEYS = ("      quantize: true\n", "      gradient_checkpointing: true\n", "      optimizer: adamw8bit\n")


def open_config(preset: str):
    """The user's YAML with a preset and without the keys a preset sets (so the preset decides)."""
    text = fixture_yaml()
    for key in OPEN_KEYS:
        assert key in text
        text = text.replace(key, "")
    text = text.replace("      lr: 0.0001\n", f"      lr: 0.0001\n      preset: {preset}\n")
    config, _ = parse_training_config(text)
    return config.process


@pytest.mark.parametrize(
    ("preset", "gpu_gb", "fast_fits", "expected", "note"),
    [
        (
            "auto",
            141.0,
            True,
            (False, False, "adamw"),
            "auto chose fast (141 GB GPU: the memory plan with fast's settings fits)",
        ),
        (
            "auto",
            24.0,
            False,
            (True, True, "adamw8bit"),
            "auto chose low_memory (24 GB GPU: the memory plan with fast's settings does not fit)",
        ),
        ("fast", None, None, (False, False, "adamw"), "fast chose fast (as asked)"),
        ("low_memory", None, None, (True, True, "adamw8bit"), "low_memory chose low_memory (as asked)"),
    ],
)
def test_presets_set_what_the_yaml_leaves_open(preset, gpu_gb, fast_fits, expected, note):
    process = open_config(preset)
    warnings: list[str] = []
    asked = []

    def fits(candidate):
        asked.append((candidate.model.quantize, candidate.train.gradient_checkpointing))
        return fast_fits

    apply_preset(process, gpu_gb, warnings, fits)
    assert (process.model.quantize, process.train.gradient_checkpointing, process.train.optimizer) == expected
    assert warnings[0].startswith(f"config.process[0].train.preset: {note}: ")
    assert asked == ([(False, False)] if preset == "auto" else [])  # auto asks the plan about fast's settings


@pytest.mark.parametrize(("gpu_gb", "chosen"), [(141.0, "fast"), (80.0, "low_memory"), (24.0, "low_memory")])
def test_auto_follows_the_memory_plan_for_the_users_flux_config(data_root, gpu_gb, chosen):
    """FLUX.1-dev at the user's 1280 px needs about 98 GB without quantization and checkpointing."""
    from fastbackend.training.memory_plan import plan_run

    process = open_config("auto")
    warnings: list[str] = []
    apply_preset(process, gpu_gb, warnings, lambda c: plan_run(c, "black-forest-labs/FLUX.1-dev", gpu_gb).fits)
    assert f"auto chose {chosen} ({gpu_gb:g} GB GPU" in warnings[0]


def test_the_users_own_keys_win_over_any_preset():
    text = fixture_yaml().replace("      lr: 0.0001\n", "      lr: 0.0001\n      preset: fast\n")
    config, _ = parse_training_config(text)
    warnings: list[str] = []
    apply_preset(config.process, 141.0, warnings, lambda candidate: True)
    assert config.process.model.quantize and config.process.train.gradient_checkpointing  # as the YAML says
    assert warnings == [
        "config.process[0].train.preset: fast chose fast (as asked): nothing to change; "
        "kept as your YAML sets them: model.quantize, train.gradient_checkpointing"
    ]


def test_auto_without_a_gpu_or_a_size_leaves_the_config_as_written():
    process = open_config("auto")
    warnings: list[str] = []
    apply_preset(process, None, warnings, lambda candidate: True)
    assert warnings == [
        "config.process[0].train.preset: auto: no GPU here and no gpu_memory_gb in the request; "
        "the config stays as written"
    ]


@pytest.mark.slow
def test_a_request_sized_gpu_reaches_the_preset_through_the_handler(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    text = user_yaml(
        model_path, steps=1, replacements={"      quantize: true\n": "", "lr: 0.0001": "lr: 0.0001\n      preset: auto"}
    )
    answer = train(text, gpu_memory_gb=24)
    assert answer["status"] == "success", answer
    # The tiny model's plan (from its own configs) fits 24 GB with fast's settings.
    assert any(
        w.startswith("config.process[0].train.preset: auto chose fast (24 GB GPU: the memory plan")
        for w in answer["warnings"]
    ), answer["warnings"]
    plan = answer["memory_plan"]
    assert (plan["gpu_gb"], plan["fits"], plan["shapes"]) == (24, True, "the model's own configs")


def test_bad_preset_and_gpu_size_are_refused_naming_the_field(data_root):
    bad_preset = train(fixture_yaml().replace("      lr: 0.0001\n", "      lr: 0.0001\n      preset: turbo\n"))
    assert bad_preset["error_code"] == "invalid_config"
    assert bad_preset["error"].startswith(
        "config.process[0].train.preset: input should be 'auto', 'fast' or 'low_memory'"
    )
    for size in (-1, 0, "big"):
        answer = train(fixture_yaml(), gpu_memory_gb=size)
        assert answer["error_code"] == "validation_error" and answer["error"].startswith("input.gpu_memory_gb: "), (
            answer
        )


@pytest.mark.slow
def test_a_gpu_size_without_preset_auto_says_it_changed_nothing(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    answer = train(user_yaml(model_path, steps=1), gpu_memory_gb=24)
    assert answer["status"] == "success", answer
    assert (
        "input.gpu_memory_gb: config.process[0].train.preset is not auto; only the memory plan uses it"
        in (answer["warnings"])
    )
