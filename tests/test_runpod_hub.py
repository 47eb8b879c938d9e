"""The RunPod Hub listing: ``.runpod/hub.json`` and ``.runpod/tests.json`` as RunPod's Hub
publishing guide defines them, and the Hub's tests answered by this worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastbackend import settings
from handler_fast import handler

REPO = Path(__file__).resolve().parent.parent
HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())
# The guide's values (its pool IDs for gpuIds; the categories it lists).
CATEGORIES = {"audio", "embedding", "language", "video", "image"}
GPU_POOLS = {"AMPERE_16", "AMPERE_24", "ADA_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141"}
INPUT_TYPES = {"string", "huggingface", "number", "boolean"}


def test_hub_json_has_the_guides_required_fields():
    assert {"title", "description", "type", "category", "config"} <= set(HUB)
    assert HUB["type"] == "serverless" and HUB["category"] in CATEGORIES
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and isinstance(config["containerDiskInGb"], int)
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    pools = config["gpuIds"].split(",")
    assert pools and {pool.lstrip("-") for pool in pools} <= GPU_POOLS


def test_hub_env_entries_are_well_formed_and_read_by_the_worker():
    known = {setting.env for setting in settings.ALL}
    for entry in HUB["config"]["env"]:
        assert entry["key"] in known, f"{entry['key']} is not a variable the worker reads"
        assert ("value" in entry) != ("input" in entry)
        if "input" in entry:
            spec = entry["input"]
            assert spec["name"] and spec["type"] in INPUT_TYPES
            for option in spec.get("options", []):
                assert set(option) == {"label", "value"}
            if "default" in spec and spec["default"] != "":  # the worker accepts the default it shows
                setting = next(s for s in settings.ALL if s.env == entry["key"])
                setting.parse(str(spec["default"]))


def test_tests_json_has_the_guides_fields():
    assert TESTS["tests"] and {"gpuTypeId", "gpuCount"} <= set(TESTS["config"])
    for test in TESTS["tests"]:
        assert test["name"] and isinstance(test["input"], dict)
        assert isinstance(test["timeout"], int) and test["timeout"] >= 60_000  # milliseconds, cold start included


@pytest.mark.parametrize("test", TESTS["tests"], ids=[t["name"] for t in TESTS["tests"]])
def test_the_hubs_tests_pass_on_this_worker(test, data_root):
    answer = handler({"id": f"hub-{test['name']}", "input": test["input"]})
    assert answer["status"] in ("healthy", "success"), answer


def test_the_listing_stays_out_of_the_image():
    assert ".runpod/" in (REPO / ".dockerignore").read_text().split()
