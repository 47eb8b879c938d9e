"""list_models, download_model and delete_model over LoRA files on the volume."""

import base64
import hashlib

import numpy as np
from safetensors.numpy import save_file

from fastbackend.schemas import MAX_DOWNLOAD_CHUNK_BYTES
from handler_fast import handler


def make_lora(data_root, model="matt", filename=None, size=4096):
    folder = data_root / "output" / model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (filename or f"{model}.safetensors")
    tensors = {"transformer.x.lora_A.weight": np.arange(size, dtype=np.float32).reshape(-1, 16)}
    metadata = {
        "fastbackend_arch": "flux",
        "ss_sd_model_name": "black-forest-labs/FLUX.1-dev",
        "ss_network_dim": "16",
        "ss_steps": "2000",
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def call(**payload):
    return handler({"id": "t", "input": payload})


def test_list_models_reads_arch_rank_and_steps_from_the_file(data_root):
    path = make_lora(data_root)
    make_lora(data_root, filename="matt_000000100.safetensors")
    (data_root / "output" / "matt" / ".matt.safetensors.123.tmp").write_bytes(b"half")
    answer = call(type="list_models")
    assert answer["total_count"] == 2
    first = answer["models"][0]
    assert first["filename"] == "matt.safetensors" and first["path"] == str(path)
    assert (first["name"], first["arch"], first["rank"], first["steps"]) == ("matt", "flux", 16, 2000)
    assert first["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["size"] == path.stat().st_size


def test_download_in_chunks_reassembles_the_file(data_root):
    path = make_lora(data_root, size=40_000)
    pieces, offset = [], 0
    while offset is not None:
        answer = call(type="download_model", model="matt", offset=offset, length=50_000)
        assert answer["status"] == "success"
        pieces.append(base64.b64decode(answer["content"]))
        offset = answer["next_offset"]
    data = b"".join(pieces)
    assert len(pieces) == 4 and data == path.read_bytes()
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()


def test_download_past_the_end_is_a_validation_error(data_root):
    path = make_lora(data_root)
    size = path.stat().st_size
    at_end = call(type="download_model", model="matt", offset=size)
    assert (at_end["length"], at_end["next_offset"], at_end["content"]) == (0, None, "")
    past = call(type="download_model", model="matt", offset=size + 1)
    assert past["error_code"] == "validation_error"
    assert past["error"] == f"input.offset: {size + 1} is past the end of the file ({size} bytes)"


def test_download_refuses_missing_file_and_oversized_chunk(data_root):
    make_lora(data_root)
    missing = call(type="download_model", model="matt", filename="other.safetensors")
    assert (
        missing["error"] == "input.filename: 'other.safetensors' not found in model 'matt'; files: ['matt.safetensors']"
    )
    too_big = call(type="download_model", model="matt", length=MAX_DOWNLOAD_CHUNK_BYTES + 1)
    assert (
        too_big["error"] == f"input.length: must be <= {MAX_DOWNLOAD_CHUNK_BYTES}, got {MAX_DOWNLOAD_CHUNK_BYTES + 1}"
    )
    outside = call(type="download_model", model="..")
    assert outside["error_code"] == "validation_error"


def test_delete_model_removes_it_from_the_listing(data_root):
    make_lora(data_root)
    assert call(type="delete_model", model="matt") == {
        "status": "success",
        "deleted": "matt",
        "files": ["matt.safetensors"],
    }
    assert call(type="list_models")["total_count"] == 0
    assert not any((data_root / "output").iterdir())
    assert call(type="delete_model", model="matt")["error_code"] == "not_found"


def test_only_lora_files_are_downloadable(data_root):
    make_lora(data_root)
    (data_root / "output" / "matt" / "training_state.pt").write_bytes(b"state")
    answer = call(type="download_model", model="matt", filename="training_state.pt")
    assert (
        answer["error"] == "input.filename: 'training_state.pt' not found in model 'matt'; files: ['matt.safetensors']"
    )


def test_deleting_a_model_that_is_being_trained_is_refused(data_root, monkeypatch):
    from fastbackend import storage

    make_lora(data_root)
    monkeypatch.setattr(storage, "BUSY_LOCK_TIMEOUT_S", 0.2)
    with storage.locked(data_root / "output" / "matt"):
        answer = call(type="delete_model", model="matt")
    assert answer["error"] == "'matt' is in use by another job (waited 0.2s)"
    assert (data_root / "output" / "matt" / "matt.safetensors").exists()
