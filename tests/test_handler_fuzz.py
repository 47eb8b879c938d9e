"""Whatever JSON-shaped input arrives, the handler answers a dict and never raises."""

import contextlib
import os
import tempfile
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handler_fast
from handler_fast import handler

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=2000),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=30,
)
known_types = st.sampled_from([*sorted(handler_fast.OPERATIONS), "", "HEALTH", "../x"])
inputs = st.one_of(
    json_values,
    st.dictionaries(st.text(max_size=20), json_values, max_size=5),
    st.fixed_dictionaries(
        {"type": known_types},
        optional={"training_name": json_values, "model": json_values, "deep": json_values, "files": json_values},
    ),
)
jobs = st.one_of(json_values, st.fixed_dictionaries({"id": st.text(max_size=10)}, optional={"input": inputs}))


@contextlib.contextmanager
def fresh_root() -> Iterator[None]:
    """Each example gets its own empty data root (the test's fixture gives one per test, not per example)."""
    before = os.environ["FASTBACKEND_DATA_DIR"]
    with tempfile.TemporaryDirectory() as root:
        os.environ["FASTBACKEND_DATA_DIR"] = root
        try:
            yield
        finally:
            os.environ["FASTBACKEND_DATA_DIR"] = before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=jobs)
def test_handler_always_answers_success_or_string_error(job):
    with fresh_root():
        answer = handler(job)
    assert isinstance(answer, dict)
    if "error" in answer:
        assert answer["status"] == "error"
        assert isinstance(answer["error"], str) and answer["error"] and "\n" not in answer["error"]  # one line
        assert isinstance(answer["error_code"], str)
        assert answer["error_code"] != "internal_error", answer
    else:
        assert answer["status"] in ("success", "healthy")


settings_for_configs = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@settings_for_configs
@given(folder=st.text(max_size=80), model=st.text(max_size=80), steps=json_values, lr=json_values)
def test_train_with_yaml_refuses_any_bad_config_cleanly(folder, model, steps, lr):
    config = {
        "job": "extension",
        "config": {
            "name": "fuzz",
            "process": [
                {
                    "type": "sd_trainer",
                    "datasets": [{"folder_path": folder}],
                    "model": {"name_or_path": model},
                    "train": {"steps": steps, "lr": lr},
                }
            ],
        },
    }
    with fresh_root():
        answer = handler({"id": "f", "input": {"type": "train_with_yaml", "config": config}})
    assert answer["status"] == "error" and answer["error_code"] != "internal_error", answer


@settings_for_configs
@given(text=st.text(max_size=300))
def test_any_yaml_text_is_parsed_or_refused_cleanly(text):
    with fresh_root():
        answer = handler({"id": "f", "input": {"type": "train_with_yaml", "yaml_config": text}})
    assert answer["status"] == "error" and answer["error_code"] != "internal_error", answer
