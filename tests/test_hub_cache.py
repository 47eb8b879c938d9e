"""Base models by hub id, found where RunPod's model caching puts them: ``<root>/huggingface-cache/hub``.

The tiny model is laid out exactly as the hub cache lays a model out (``refs/main``, blobs named
by their hash, a snapshot folder of relative links into them), then trained and used by its hub
id with every network connection refused and without ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.test_generate import generate
from tests.training_helpers import train, upload_photos, user_yaml

REPO_ID = "tiny-org/tiny-flux"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def install_in_hub_cache(model: Path, cache: Path, repo_id: str = REPO_ID) -> Path:
    """``model`` as the hub cache stores it; returns the snapshot folder."""
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repository / "snapshots" / COMMIT
    (repository / "blobs").mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(COMMIT)
    for source in sorted(p for p in model.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = repository / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / source.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup and outgoing connection fails and is counted; the hub's offline switch is off."""
    import huggingface_hub.constants

    attempts: list[object] = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network is off in this test")

    def refuse_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


@pytest.mark.slow
def test_a_model_in_runpods_cache_trains_and_generates_by_hub_id_without_the_network(
    tiny_models, data_root, no_network
):
    install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    upload_photos()
    answer = train(user_yaml(REPO_ID, steps=2))
    assert answer["status"] == "success", answer
    images = generate()
    assert images["status"] == "success", images
    assert images["base_model"] == REPO_ID
    assert no_network == []


def test_an_incomplete_copy_is_not_used(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    assert cached_snapshot(REPO_ID, None) == snapshot
    weights = next((snapshot / "transformer").glob("*.safetensors"))
    weights.unlink()  # a download cut short
    assert cached_snapshot(REPO_ID, None) is None


def test_a_copy_whose_files_link_out_of_its_cache_folder_is_not_used(tiny_models, data_root, tmp_path):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    outside = tmp_path / "outside.json"
    shutil.copy(snapshot / "model_index.json", outside)
    (snapshot / "model_index.json").unlink()
    (snapshot / "model_index.json").symlink_to(outside)
    assert cached_snapshot(REPO_ID, None) is None


def test_models_this_worker_cached_before_hub_are_still_found(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache")
    assert cached_snapshot(REPO_ID, None) == snapshot


def test_a_copy_this_worker_downloaded_is_found_despite_the_hubs_full_file_list(tiny_models, data_root):
    """huggingface_hub records every file of the repository; diffusers never fetches the
    single-file checkpoints beside the component folders, so those must not count as missing."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    files = {
        str(p.relative_to(snapshot)): TreeCacheEntry(size=p.stat().st_size, blob_id="0" * 40)
        for p in snapshot.rglob("*")
        if p.is_file()
    }
    files["flux1-dev.safetensors"] = TreeCacheEntry(size=23_802_932_552, blob_id="1" * 40)
    write_tree_cache(str(snapshot.parent.parent), COMMIT, files)
    assert cached_snapshot(REPO_ID, None) == snapshot


def test_a_repository_folder_that_is_a_link_out_is_not_used(tiny_models, data_root, tmp_path):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", tmp_path / "outside-cache")
    hub = data_root / "huggingface-cache" / "hub"
    hub.mkdir(parents=True)
    (hub / f"models--{REPO_ID.replace('/', '--')}").symlink_to(snapshot.parent.parent)
    assert cached_snapshot(REPO_ID, None) is None


def test_a_linked_folder_inside_the_repository_is_followed_and_checked(tiny_models, data_root, tmp_path):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    outside = tmp_path / "outside-vae"
    shutil.copytree(tiny_models / "flux" / "vae", outside)
    other = snapshot.parent / ("f" * 40) / "vae"  # another snapshot of the same repository...
    other.mkdir(parents=True)
    for file in outside.iterdir():
        (other / file.name).symlink_to(file)  # ...whose files lead out of it
    shutil.rmtree(snapshot / "vae")
    (snapshot / "vae").symlink_to(os.path.relpath(other, snapshot))
    assert cached_snapshot(REPO_ID, None) is None


def test_a_folder_linking_to_itself_ends_the_walk_not_the_worker(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    (snapshot / "transformer" / "loop").symlink_to(".")
    assert cached_snapshot(REPO_ID, None) == snapshot


def test_a_revision_that_is_a_path_is_refused(data_root):
    from fastbackend.storage import cached_snapshot

    assert cached_snapshot(REPO_ID, "../../../../training_data/x") is None
    answer = train(user_yaml(REPO_ID).replace("      quantize: true", "      quantize: true\n      revision: ../../x"))
    assert answer["error_code"] == "invalid_config"
    assert answer["error"].startswith("config.process[0].model.revision: string should match pattern")


def test_download_progress_counts_files_renamed_under_it_as_none(data_root, monkeypatch):
    """huggingface_hub renames each finished file out of its temporary name while the bytes are counted."""
    from fastbackend import hub_fetch

    blobs = data_root / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "a.incomplete").write_bytes(bytes(10))
    (blobs / "b").write_bytes(bytes(5))
    real_stat = Path.stat

    def vanishing(self, *args, **kwargs):
        if self.name == "a.incomplete":
            raise FileNotFoundError(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    assert hub_fetch._bytes_in(blobs) == 5


# ---------------------------------------------------------------- RunPod's cache as RunPod lays it


def test_a_snapshot_is_found_without_refs_main(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    (snapshot.parent.parent / "refs" / "main").unlink()  # an older cache layout: no refs at all
    notes: list[str] = []
    assert cached_snapshot(REPO_ID, None, notes) == snapshot and notes == []
    assert cached_snapshot(REPO_ID, COMMIT) == snapshot  # a commit names its folder
    assert cached_snapshot(REPO_ID, "some-branch") is None  # a branch needs its ref


def test_of_several_snapshots_refs_main_chooses_else_the_newest_complete_one_said_in_warnings(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    newer = snapshot.parent / ("f" * 40)
    shutil.copytree(snapshot, newer, symlinks=True)
    os.utime(snapshot, (1, 1))
    incomplete = snapshot.parent / ("e" * 40)
    shutil.copytree(snapshot, incomplete, symlinks=True)
    next((incomplete / "transformer").glob("*.safetensors")).unlink()
    notes: list[str] = []
    assert cached_snapshot(REPO_ID, None, notes) == snapshot and notes == []  # refs/main names it
    (snapshot.parent.parent / "refs" / "main").unlink()
    assert cached_snapshot(REPO_ID, None, notes) == newer
    assert notes == [
        f"{REPO_ID}: the cache has 3 snapshots and no refs/main to choose one; using the most recently modified "
        f"complete one, {'f' * 40}"
    ]


def test_refs_that_name_another_branch_are_not_guessed_past(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "huggingface-cache" / "hub")
    refs = snapshot.parent.parent / "refs"
    (refs / "main").rename(refs / "fp16")  # fetched as revision fp16: not the default branch's files
    assert cached_snapshot(REPO_ID, None) is None
    assert cached_snapshot(REPO_ID, "fp16") == snapshot


def test_models_downloaded_into_the_workers_own_cache_are_found_under_runpods_mount(tiny_models, data_root):
    from fastbackend.storage import cached_snapshot

    (data_root / "huggingface-cache" / "hub").mkdir(parents=True)  # RunPod's mount, without this model
    snapshot = install_in_hub_cache(tiny_models / "flux", data_root / "fastbackend-hub-cache")
    assert cached_snapshot(REPO_ID, None) == snapshot


def test_a_real_read_only_mount_sends_downloads_to_the_workers_own_cache(data_root):
    """RunPod's cache mount made read-only for real: a bind mount in a user and mount namespace of
    this test's own (util-linux ``unshare``), where even root cannot write."""
    import subprocess
    import sys

    hub = data_root / "huggingface-cache" / "hub"
    hub.mkdir(parents=True)
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is not installed")
    script = (
        f"mount --bind {hub} {hub} && mount -o remount,bind,ro {hub} && "
        f"{sys.executable} -c 'from fastbackend import storage; print(storage.download_cache_dir())'"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"FASTBACKEND_DATA_DIR": str(data_root)},
        check=False,
    )
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"no user namespaces here: {done.stderr.strip()}")
    assert done.stdout.strip() == str(data_root / "fastbackend-hub-cache"), done.stderr
    from fastbackend.storage import download_cache_dir

    assert download_cache_dir() == hub  # outside that namespace the same folder is writable
