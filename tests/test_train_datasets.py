"""train_with_yaml's ``datasets``: a training request that names its photos trains on them on any
volume, or is refused before anything loads."""

from __future__ import annotations

import hashlib
import json

import pytest

from fastbackend.fingerprint import content_sha256
from fastbackend.layout import DatasetFolder
from fastbackend.storage import dataset_dir
from tests.photos import b64, nine_photos
from tests.training_helpers import train, upload_photos, user_yaml

DATASET = "matt_training_test"


def files(count: int = 3) -> list[dict]:
    return [{"filename": n, "content": b64(d), "caption": c} for n, d, c in nine_photos()[:count]]


@pytest.fixture
def model_folder(data_root):
    """Where the config's model is: found by path, and failing to load (no weights) if it comes to that."""
    model = data_root / "models" / "flux"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    return model


def fingerprint(count: int = 3) -> str:
    return content_sha256((hashlib.sha256(d).hexdigest(), c) for _, d, c in nine_photos()[:count])


def test_a_missing_dataset_named_without_photos_is_refused_naming_this_volume(data_root, model_folder, monkeypatch):
    monkeypatch.setenv("RUNPOD_DC_ID", "EU-RO-1")
    answer = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": fingerprint()}})
    assert answer["error_code"] == "dataset_mismatch"
    message = f"input.datasets.{DATASET}: dataset {DATASET!r} does not exist on this worker's volume "
    assert message + f"(nothing uploaded to it yet) at {data_root} in data centre EU-RO-1" in answer["error"]
    assert "does not share datasets" in answer["error"]
    assert not (data_root / "output").exists() and not (data_root / "training_data" / DATASET).exists()
    assert not (data_root / ".volume-id").exists()  # a refusal writes nothing
    upload_photos(1, name="another")  # an upload gives the volume an id, which the error names from then on
    volume_id = (data_root / ".volume-id").read_text()
    again = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": fingerprint()}})
    assert message + f"{volume_id} at {data_root}" in again["error"]


def test_a_dataset_holding_other_photos_is_refused_and_left_as_it_was(data_root, model_folder):
    upload_photos(2)
    before = DatasetFolder(dataset_dir(DATASET)).content_sha256()
    answer = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": fingerprint(3)}})
    assert answer["error_code"] == "dataset_mismatch" and "holds other photos" in answer["error"]
    assert DatasetFolder(dataset_dir(DATASET)).content_sha256() == before


def test_photos_that_do_not_hash_as_named_are_refused(data_root, model_folder):
    answer = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": "0" * 64, "files": files()}})
    assert answer["error_code"] == "invalid_upload"
    assert (
        f"input.datasets.{DATASET}.sha256: the photos sent hash to {fingerprint()}, not to {'0' * 64}"
        in (answer["error"])
    )


def test_a_dataset_the_config_does_not_train_on_is_refused(data_root, model_folder):
    answer = train(user_yaml("/workspace/models/flux"), datasets={"other": {"sha256": fingerprint(), "files": files()}})
    assert answer["error_code"] == "validation_error"
    assert "input.datasets.other: the config trains on no dataset named 'other'" in answer["error"]
    assert not (data_root / "training_data" / "other").exists()


def test_a_config_refused_for_another_reason_writes_no_photos(data_root):
    answer = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": fingerprint(), "files": files()}})
    assert answer["error_code"] == "not_found" and "model.name_or_path" in answer["error"]  # no model here
    assert not (data_root / "training_data" / DATASET).exists()


def test_the_photos_brought_replace_the_dataset_before_the_run_reads_it(data_root, model_folder):
    upload_photos(2)
    answer = train(
        user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": fingerprint(3), "files": files()}}
    )
    assert answer["error_code"] == "model_load_failed", answer
    assert DatasetFolder(dataset_dir(DATASET)).content_sha256() == fingerprint(3)
    assert sorted(DatasetFolder(dataset_dir(DATASET)).images()) == sorted(n for n, _, _ in nine_photos()[:3])


def test_inline_photos_that_do_not_hash_as_named_leave_the_dataset_as_it_was(data_root, model_folder):
    upload_photos(2)
    before = DatasetFolder(dataset_dir(DATASET)).content_sha256()
    answer = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": "1" * 64, "files": files()}})
    assert answer["error_code"] == "invalid_upload"
    assert DatasetFolder(dataset_dir(DATASET)).content_sha256() == before  # refused before the upload


def test_photos_replaced_between_the_check_and_the_runs_lock_are_refused(data_root, model_folder, monkeypatch):
    from fastbackend.api import train as train_module

    upload_photos(3)
    real_check = train_module.check_datasets_present

    def another_job_replaces_them(folders):
        real_check(folders)
        from handler_fast import handler

        other = [{"filename": "other.png", "content": b64(nine_photos()[5][1]), "caption": "someone else"}]
        job = {"type": "upload_training_data", "training_name": DATASET, "files": other, "mode": "replace"}
        replaced = handler({"id": "other", "input": job})
        assert replaced["status"] == "success", replaced

    monkeypatch.setattr(train_module, "check_datasets_present", another_job_replaces_them)
    answer = train(user_yaml("/workspace/models/flux"), datasets={DATASET: {"sha256": fingerprint(3)}})
    assert answer["error_code"] == "dataset_mismatch" and "holds other photos" in answer["error"]
