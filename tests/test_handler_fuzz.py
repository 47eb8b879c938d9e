"""Whatever JSON-shaped input arrives, the handler answers a dict and never raises."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handler_fast
from handler_fast import handler

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=2000),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=30,
)
known_types = st.sampled_from(sorted(handler_fast.OPERATIONS) + ["", "HEALTH", "../x"])
inputs = st.one_of(
    json_values,
    st.dictionaries(st.text(max_size=20), json_values, max_size=5),
    st.fixed_dictionaries(
        {"type": known_types},
        optional={"training_name": json_values, "model": json_values, "deep": json_values, "files": json_values},
    ),
)
jobs = st.one_of(json_values, st.fixed_dictionaries({"id": st.text(max_size=10)}, optional={"input": inputs}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=jobs)
def test_handler_always_answers_success_or_string_error(job):
    answer = handler(job)
    assert isinstance(answer, dict)
    if "error" in answer:
        assert answer["status"] == "error"
        assert isinstance(answer["error"], str) and answer["error"]
        assert isinstance(answer["error_code"], str)
        assert answer["error_code"] != "internal_error", answer
    else:
        assert answer["status"] in ("success", "healthy")
