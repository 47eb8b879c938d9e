"""Symbolic links planted on the shared volume are never followed: every request type refuses or
skips them, and a sentinel folder outside the data root stays byte for byte as it was."""

from __future__ import annotations

import pytest

from handler_fast import handler
from tests.photos import b64, nine_photos
from tests.test_model_files import make_lora
from tests.test_upload import file_entries, snapshot, upload
from tests.training_helpers import install_model, train, upload_photos, user_yaml


def call(**payload) -> dict:
    return handler({"id": "l", "input": payload})


@pytest.fixture
def outside(tmp_path):
    """A folder outside the data root that links point at, with files a worker must not touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("do not read, move or delete")
    make_lora_like = folder / "x.safetensors"
    make_lora_like.write_bytes(b"not yours")
    return folder


def plant(link, target):
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())


def test_a_linked_dataset_folder_is_refused_by_every_request(data_root, outside):
    before = snapshot(outside)
    plant(data_root / "training_data" / "matt", outside)
    upload = call(type="upload_training_data", training_name="matt", files=file_entries(nine_photos()[:1]))
    assert upload["error_code"] == "path_outside_root"
    assert upload["error"] == "'training_data/matt' on the volume is a symbolic link; the worker follows none"
    assert call(type="delete_dataset", training_name="matt")["error_code"] == "path_outside_root"
    assert call(type="list_datasets")["datasets"] == []
    (outside / "IMG_0000.jpg").write_bytes(nine_photos()[0][1])  # not empty: only the link can refuse it
    named = train(user_yaml("/workspace/models/flux").replace("/workspace/training_data/matt_training_test", "matt"))
    assert named["error_code"] == "invalid_dataset" and "symbolic link" in named["error"]
    mapped = train(user_yaml("/workspace/models/flux").replace("matt_training_test", "matt"))
    assert mapped["error_code"] == "invalid_dataset"
    (outside / "IMG_0000.jpg").unlink()
    assert snapshot(outside) == before


def test_a_linked_data_folder_is_refused(data_root, outside):
    before = snapshot(outside)
    plant(data_root / "training_data", outside)
    upload = call(type="upload_training_data", training_name="matt", files=file_entries(nine_photos()[:1]))
    assert upload["error"] == "'training_data' on the volume is a symbolic link; the worker follows none"
    assert snapshot(outside) == before


def test_a_linked_model_folder_is_refused_by_every_request(data_root, outside):
    before = snapshot(outside)
    plant(data_root / "output" / "matt", outside)
    for answer in (
        call(type="download_model", model="matt", filename="x.safetensors"),
        call(type="get_samples", model="matt"),
        call(type="delete_model", model="matt"),
        call(type="generate", model="matt", prompt="a photo"),
    ):
        assert answer["error_code"] == "path_outside_root", answer
    assert call(type="list_models")["models"] == []
    assert snapshot(outside) == before


def test_linked_files_in_a_model_folder_are_neither_listed_nor_served(data_root, outside):
    make_lora(data_root)
    plant(data_root / "output" / "matt" / "matt_000000100.safetensors", outside / "x.safetensors")
    plant(data_root / "output" / "matt" / "samples" / "000000100_0.jpg", outside / "secret.txt")
    assert [m["filename"] for m in call(type="list_models")["models"]] == ["matt.safetensors"]
    answer = call(type="download_model", model="matt", filename="matt_000000100.safetensors")
    assert answer["error_code"] == "path_outside_root"
    assert call(type="get_samples", model="matt")["error_code"] == "not_found"


def test_training_refuses_linked_images_caches_and_model_folders(tiny_models, data_root, outside):
    before = snapshot(outside)
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos(count=2)
    dataset = data_root / "training_data" / "matt_training_test"
    image = dataset / "IMG_0000.jpg"
    image.unlink()
    plant(image, outside / "secret.txt")
    refused = train(user_yaml(model_path))
    assert refused["error_code"] == "path_outside_root"
    assert "IMG_0000.jpg" in refused["error"]

    image.unlink()
    image.write_bytes(nine_photos()[0][1])  # the real photo back
    plant(dataset / ".cache", outside)
    assert train(user_yaml(model_path))["error_code"] == "path_outside_root"
    (dataset / ".cache").unlink()

    plant(data_root / "output" / "nowy_dataset_1.3", outside)
    assert train(user_yaml(model_path))["error_code"] == "path_outside_root"
    assert snapshot(outside) == before


def test_a_linked_hub_cache_is_refused(tiny_models, data_root, outside):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos(count=1)
    plant(data_root / "huggingface-cache", outside)
    assert train(user_yaml(model_path))["error_code"] == "path_outside_root"


def test_an_upload_never_writes_through_a_linked_file(data_root, outside):
    before = snapshot(outside)
    name, data, _ = nine_photos()[0]
    assert (
        call(type="upload_training_data", training_name="matt", files=[{"filename": name, "content": b64(data)}])[
            "status"
        ]
        == "success"
    )
    stray = data_root / "training_data" / "matt" / "IMG_0001.jpg"
    plant(stray, outside / "secret.txt")  # a link no manifest owns, under the name the next upload uses
    second = nine_photos()[1]
    answer = call(
        type="upload_training_data", training_name="matt", files=[{"filename": second[0], "content": b64(second[1])}]
    )
    assert answer["status"] == "success" and not stray.is_symlink() and stray.read_bytes() == second[1]
    assert snapshot(outside) == before


def test_training_never_writes_through_a_linked_output_or_samples_folder(tiny_models, data_root, outside):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos(count=1)
    before, dataset = snapshot(outside), snapshot(data_root / "training_data")
    plant(data_root / "output", data_root / "training_data")  # output/<name> would land in a dataset
    answer = train(user_yaml(model_path, steps=1))
    assert answer["error_code"] == "path_outside_root"
    assert snapshot(data_root / "training_data") == dataset
    (data_root / "output").unlink()
    plant(data_root / "output" / "nowy_dataset_1.3" / "samples", outside)
    answer = train(user_yaml(model_path, steps=1))
    assert answer["error_code"] == "path_outside_root"
    assert snapshot(outside) == before


def test_a_linked_lock_file_is_refused(data_root, outside):
    upload(files=file_entries(nine_photos()[:1]))
    lock = data_root / "training_data" / "matt" / ".lock"
    lock.unlink()
    plant(lock, outside / "secret.txt")
    answer = upload(files=file_entries(nine_photos()[1:2]))
    assert answer["error_code"] == "path_outside_root"
    assert (outside / "secret.txt").read_text() == "do not read, move or delete"


def test_a_planted_pending_list_moves_nothing(data_root, outside):
    import json

    upload(files=file_entries(nine_photos()[:1]))
    make_lora(data_root, model="victim")
    victim = data_root / "output" / "victim" / "victim.safetensors"
    before = victim.read_bytes()
    manifest_path = data_root / "training_data" / "matt" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["pending"] = {"../../output/victim/victim.safetensors": "IMG_0000.jpg", "IMG_0000.jpg": "../x"}
    manifest_path.write_text(json.dumps(manifest))
    assert upload(files=file_entries(nine_photos()[1:2]))["status"] == "success"
    assert victim.read_bytes() == before
    assert "pending" not in json.loads(manifest_path.read_text())
