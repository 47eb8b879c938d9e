"""Hostile input and bad luck: each case answers its error code, names the culprit, and leaves the
data root and a sentinel folder outside it as they were."""

from __future__ import annotations

import errno
import struct
import zlib

import pytest
import torch

from handler_fast import handler
from tests.photos import b64, nine_photos, photo
from tests.test_upload import file_entries, make_zip, nothing_stored, snapshot, upload
from tests.training_helpers import install_model, train, upload_photos, user_yaml


def call(**payload) -> dict:
    return handler({"id": "f", "input": payload})


def lying_zip() -> bytes:
    """A zip whose central directory claims a smaller size and wrong CRC for its entry."""
    data = bytearray(make_zip({"a.jpg": nine_photos()[0][1]}))
    central = data.rindex(b"PK\x01\x02")
    data[central + 16 : central + 20] = struct.pack("<I", 12345)  # CRC-32
    return bytes(data)


def png_with_huge_text() -> bytes:
    """A valid PNG with a compressed text chunk that inflates to 50 MB."""
    data = bytearray(photo(300, 300, "PNG"))
    payload = b"k\x00\x00" + zlib.compress(b"x" * 50_000_000, 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    end = data.rindex(b"IEND") - 4
    return bytes(data[:end] + chunk + data[end:])


@pytest.mark.parametrize(
    ("filename", "content", "reason"),
    [
        ("a.zip", None, "could not be unpacked (BadZipFile)"),
        ("cut.png", photo(300, 300, "PNG")[:30], "not an image Pillow can decode"),
        ("text.png", None, "could not be decoded"),
    ],
)
def test_damaged_files_are_named_not_internal_errors(filename, content, reason, data_root):
    if filename == "a.zip":
        answer = upload(zip=b64(lying_zip()))
    else:
        answer = upload(files=[{"filename": filename, "content": b64(content or png_with_huge_text())}])
    assert answer["error_code"] == "invalid_upload", answer
    assert reason in answer["error"]
    assert nothing_stored(data_root)


def test_input_that_is_not_json_is_an_invalid_request():
    nested: list = []
    for _ in range(50_000):
        nested = [nested]
    assert handler({"id": "x", "input": {"type": "health", "x": nested}})["error_code"] == "invalid_request"
    assert handler({"id": "x", "input": {"type": "health", "x": b"bytes"}})["error_code"] == "invalid_request"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("lr: 0.0001", "lr: .nan"), "config.process[0].train.lr: input should be a finite number"),
        (("      lr: 0.0001", "      lr: 0.0001\n      optimizer_params:\n        eps: -1"), "eps must be > 0"),
        (("      lr: 0.0001", "      lr: 0.0001\n      seed: 99999999999999999999"), "must be <= 4294967295"),
        (("      lr: 0.0001", "      lr: 0.0001\n      lr_scheduler_params:\n        power: .inf"), "finite number"),
    ],
)
def test_values_that_would_fail_once_the_model_is_loaded_are_refused_with_the_config(change, message):
    answer = train(user_yaml("/workspace/models/flux").replace(*change))
    assert answer["error_code"] == "invalid_config" and message in answer["error"], answer


def test_generate_seeds_past_the_generators_range_are_refused():
    answer = call(type="generate", model="m", prompt="p", seed=2**64)
    assert answer["error"] == "input.seed: must be <= 4294967295, got 18446744073709551616"


def test_a_nan_lora_is_never_saved_or_called_success(tiny_models, data_root, monkeypatch):
    from fastbackend.training import lora_io

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    real = lora_io.lora_state

    def poisoned(modules):
        states = real(modules)
        first = next(iter(states["transformer"]))
        states["transformer"][first] = torch.full_like(states["transformer"][first], float("nan"))
        return states

    monkeypatch.setattr(lora_io, "lora_state", poisoned)
    answer = train(user_yaml(model_path, steps=2))
    assert answer["error_code"] == "non_finite_loss"
    assert answer["error"].startswith("training stopped: the LoRA weight transformer.")
    assert not (data_root / "output" / "nowy_dataset_1.3").exists()


def test_appending_other_bytes_under_an_existing_name_needs_overwrite(data_root):
    name, data, _ = nine_photos()[0]
    assert upload(files=[{"filename": name, "content": b64(data), "caption": "Matt, photo"}])["status"] == "success"
    before = snapshot(data_root)
    other = b64(nine_photos()[1][1])
    refused = upload(files=[{"filename": name, "content": other}])
    assert refused["error_code"] == "invalid_upload"
    assert (
        refused["error"] == f"{name!r} is already in the dataset with other content; send overwrite: true to replace it"
    )
    assert snapshot(data_root) == before
    replaced = upload(files=[{"filename": name, "content": other}], overwrite=True)
    assert replaced["status"] == "success" and replaced["replaced"] == [name]
    listing = call(type="list_datasets")["datasets"][0]
    assert listing["captioned_count"] == 1  # the caption stayed


def test_deleting_a_dataset_a_run_reads_is_refused_naming_the_run(data_root, monkeypatch):
    from fastbackend import storage

    upload(files=file_entries(nine_photos()[:1]))
    monkeypatch.setattr(storage, "BUSY_LOCK_TIMEOUT_S", 0.2)
    with storage.locked(data_root / "training_data" / "matt", reader="nowy_dataset_1.3"):
        answer = call(type="delete_dataset", training_name="matt")
    assert answer["error_code"] == "locked"
    assert answer["error"] == "'matt' is in use by training of 'nowy_dataset_1.3' (waited 0.2s)"
    assert call(type="delete_dataset", training_name="matt")["status"] == "success"  # once the run is done


def test_training_holds_its_datasets_while_it_runs(tiny_models, data_root, monkeypatch):
    from fastbackend import storage
    from fastbackend.training import trainer

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    monkeypatch.setattr(storage, "BUSY_LOCK_TIMEOUT_S", 0.2)
    seen = []
    real = trainer.report_step

    def delete_midway(run, *args):
        real(run, *args)
        if run.step == 1:
            seen.append(call(type="delete_dataset", training_name="matt_training_test"))

    monkeypatch.setattr(trainer, "report_step", delete_midway)
    assert train(user_yaml(model_path, steps=2))["status"] == "success"
    assert seen[0]["error"] == "'matt_training_test' is in use by training of 'nowy_dataset_1.3' (waited 0.2s)"


def test_a_full_volume_answers_disk_full_and_keeps_what_was_there(data_root, monkeypatch):
    import shutil

    from fastbackend import staging

    assert upload(files=file_entries(nine_photos()[:1]))["status"] == "success"
    before = snapshot(data_root)
    usage = shutil.disk_usage(data_root)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    needed = len(nine_photos()[1][1])
    answer = upload(files=file_entries(nine_photos()[1:2]))
    assert answer["error_code"] == "disk_full"
    assert answer["error"].startswith(f"the volume is full: {needed:,} bytes are needed, 1,000 bytes are free")
    assert snapshot(data_root) == before

    def no_room(self, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(staging.StagedFile, "write", no_room)
    assert upload(files=file_entries(nine_photos()[2:3]))["error_code"] == "disk_full"


def test_resending_fewer_steps_than_the_saved_state_says_so(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    every_2 = {"save_every: 2000": "save_every: 2", "sample_every: 100": "sample_every: 1000"}
    assert train(user_yaml(model_path, steps=4, replacements=every_2))["status"] == "success"
    again = train(user_yaml(model_path, steps=2, replacements=every_2))
    assert again["status"] == "success" and again["steps"] == 4
    assert "the saved state is at step 4, not before train.steps 2: nothing more was trained" in " ".join(
        again["warnings"]
    )


def test_a_killed_saves_temporaries_are_cleaned_by_the_next_run(tiny_models, data_root):
    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    output = data_root / "output" / "nowy_dataset_1.3"
    output.mkdir(parents=True)
    (output / ".nowy_dataset_1.3.safetensors.abc.tmp").write_bytes(b"half")
    (output / "samples").mkdir()
    (output / "samples" / ".000000001_0.jpg.xyz.tmp").write_bytes(b"half")
    assert train(user_yaml(model_path, steps=1))["status"] == "success"
    assert not list(output.rglob("*.tmp"))


def test_zip_headers_that_lie_about_offsets_are_invalid(data_root):
    data = bytearray(make_zip({"a.jpg": nine_photos()[0][1]}))
    end = data.rindex(b"PK\x05\x06")
    data[end + 16 : end + 20] = struct.pack("<I", 10**6)  # the central directory's offset
    answer = upload(zip=b64(bytes(data)))
    assert answer["error_code"] == "invalid_upload" and "zip" in answer["error"]


def sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("killed_at", ["before the manifest", "after the manifest"])
def test_an_overwrite_killed_midway_never_leaves_a_file_its_manifest_does_not_describe(
    killed_at, data_root, monkeypatch
):
    from fastbackend import datasets
    from fastbackend.layout import DatasetFolder

    name, data, _ = nine_photos()[0]
    assert upload(files=[{"filename": name, "content": b64(data)}])["status"] == "success"
    folder = DatasetFolder(data_root / "training_data" / "matt")
    real_write, real_finish = DatasetFolder.write_manifest, datasets.finish_pending
    calls = {"finish": 0}

    def kill_before_manifest(self, manifest):
        raise KeyboardInterrupt("killed")

    def kill_after_manifest(target):
        calls["finish"] += 1
        if calls["finish"] == 2:  # the first call only tidies up before the upload writes anything
            raise KeyboardInterrupt("killed")
        return real_finish(target)

    if killed_at == "before the manifest":
        monkeypatch.setattr(DatasetFolder, "write_manifest", kill_before_manifest)
    else:
        monkeypatch.setattr(datasets, "finish_pending", kill_after_manifest)
    with pytest.raises(KeyboardInterrupt):
        upload(files=[{"filename": name, "content": b64(nine_photos()[1][1])}], overwrite=True)
    monkeypatch.setattr(DatasetFolder, "write_manifest", real_write)
    monkeypatch.setattr(datasets, "finish_pending", real_finish)

    datasets.recover(folder)  # what a training run does before it reads the dataset
    entry = folder.images()[name]
    assert sha(folder.path / name) == entry["sha256"]  # the file is what the manifest says, old or new
    expected = nine_photos()[0 if killed_at == "before the manifest" else 1][1]
    assert (folder.path / name).read_bytes() == expected
    assert upload(files=file_entries(nine_photos()[2:3]))["status"] == "success"  # the next writer tidies up
    assert not [p.name for p in folder.path.iterdir() if p.name.startswith(".pending-")]


def test_an_overwrite_killed_again_before_the_reader_lock_is_refused_not_read(tiny_models, data_root, monkeypatch):
    """A run finishes a half-committed overwrite before it reads; if another writer was killed
    mid-commit in between, the run refuses (it would read old bytes under new hashes)."""
    from fastbackend.api import train as train_module
    from fastbackend.layout import DatasetFolder

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()
    folder = DatasetFolder(data_root / "training_data" / "matt_training_test")
    manifest = folder.read_manifest()
    name = next(iter(manifest["images"]))
    manifest["pending"] = {name: f".pending-{name}"}
    folder.write_manifest(manifest)
    monkeypatch.setattr(train_module, "recover_dataset", lambda dataset: None)  # killed in the window
    answer = train(user_yaml(model_path, steps=1))
    assert answer["error_code"] == "locked"
    assert answer["error"] == (
        "dataset 'matt_training_test': an upload was cut short while committing; "
        "send the job again (it finishes that upload first)"
    )
    assert not (data_root / "output" / "nowy_dataset_1.3").exists()


def test_a_full_volume_during_a_save_answers_disk_full(tiny_models, data_root, monkeypatch):
    from fastbackend.training import lora_io

    model_path = install_model(tiny_models, data_root, "flux")
    upload_photos()

    def no_room(*args, **kwargs):  # what safetensors raises, in its own error type, on a full disk
        raise RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(lora_io, "save_file", no_room)
    answer = train(user_yaml(model_path, steps=1))
    assert answer["error_code"] == "disk_full", answer


def test_a_run_killed_while_reading_leaves_no_stale_name_behind(data_root, monkeypatch):
    from fastbackend import storage

    upload(files=file_entries(nine_photos()[:1]))
    folder = data_root / "training_data" / "matt"
    (folder / ".reader-killed_run").write_bytes(b"")  # a SIGKILLed run's mark
    assert upload(files=file_entries(nine_photos()[1:2]))["status"] == "success"  # a writer, alone
    assert not (folder / ".reader-killed_run").exists()
    monkeypatch.setattr(storage, "BUSY_LOCK_TIMEOUT_S", 0.2)
    with storage.locked(folder, timeout_s=0.2):
        refused = call(type="delete_dataset", training_name="matt")
    assert refused["error"] == "'matt' is in use by another job (waited 0.2s)"
