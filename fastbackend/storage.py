"""Where the worker keeps its files, and the only ways request input may name them.

Layout under the data root (``FASTBACKEND_DATA_DIR``, else ``/runpod-volume`` when it exists,
else ``./data``)::

    training_data/<dataset>/   a dataset: images, captions, manifest, latent cache
    output/<name>/             a trained LoRA: its files, state, record and samples
    huggingface-cache/hub/     the hub cache: base models by hub id (RunPod's model caching too)

(what is inside the two folders is ``layout``'s to say). Base models are named by a hub id or a
diffusers folder under the root (``resolve_base_model``).

Names from requests match ``NAME_PATTERN`` and are joined under the root, never resolved
from user text; YAML paths go through ``map_user_path``. Files are written to a temporary
name that starts with a dot (never listed) and renamed into place, and writers of one dataset
or model hold a lock file, because several workers may share one network volume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastbackend import settings
from fastbackend.errors import ErrorCode, FastBackendError, NotFound

RUNPOD_VOLUME = Path("/runpod-volume")
# A RunPod Pod mounts the same network volume at /workspace; configs written there map here.
VOLUME_ALIASES = (Path("/workspace"), RUNPOD_VOLUME)
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# A job that needs a folder another job is working on (training a model, deleting it) waits this
# long, then answers `locked`: those jobs run for minutes to hours.
BUSY_LOCK_TIMEOUT_S = 5
TEMP_SUFFIX = ".tmp"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file in a folder or repo
READER_PREFIX = ".reader-"  # .reader-<model>: a run reading the folder, while it does
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, not starting with a dot"


def data_root() -> Path:
    """The data root, read from the environment on every call so tests can point it anywhere."""
    configured = settings.DATA_DIR.get()
    if configured is not None:
        return configured
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME
    return Path("data").absolute()


VOLUME_ID_FILE = ".volume-id"


def volume_description() -> str:
    """Which volume this worker has, for an error about data that is not on it: an endpoint with
    network volumes in several data centres gives each worker one of them, and they are not synced.
    Reading it writes nothing (a refusal leaves the volume as it was); uploads mark the volume."""
    root = data_root()
    try:
        volume_id = (root / VOLUME_ID_FILE).read_text().strip()[:64]
    except OSError:
        volume_id = ""
    name = f"volume {volume_id}" if volume_id else "volume (nothing uploaded to it yet)"
    place = settings.datacenter()
    return f"{name} at {root}" + (f" in data centre {place}" if place else "")


def mark_volume() -> None:
    """Give the volume an id of its own, once, for ``volume_description``."""
    marker = data_root() / VOLUME_ID_FILE
    if not marker.exists():
        atomic_write_bytes(marker, uuid.uuid4().hex[:12].encode())


def datasets_dir() -> Path:
    return data_root() / "training_data"


def outputs_dir() -> Path:
    return data_root() / "output"


def hf_cache_dir() -> Path:
    """The hub cache: ``<root>/huggingface-cache/hub``, where RunPod's model caching puts models too."""
    return no_links(data_root() / "huggingface-cache" / "hub")


def legacy_hf_cache_dir() -> Path:
    """Where this worker downloaded models before it used ``hub/`` (still read, never written)."""
    return no_links(data_root() / "huggingface-cache")


def own_hf_cache_dir() -> Path:
    """This worker's own hub cache on the volume: downloads go here when RunPod's cache mount at
    ``hub/`` is read-only, and are found here when that mount shadows what was downloaded before."""
    return no_links(data_root() / "fastbackend-hub-cache")


def download_cache_dir() -> Path:
    """Where a hub download goes: RunPod's hub cache when the worker may write there, else its own."""
    cache = hf_cache_dir()
    return cache if writable(cache) else own_hf_cache_dir()


def writable(folder: Path) -> bool:
    """Whether files can be made in ``folder`` (or, while it does not exist, in the nearest folder
    above it): false on a read-only mount, whoever the worker runs as."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:  # a file made and removed: root writes through permission bits, and some mounts say less
        descriptor, name = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError:
        return False
    os.close(descriptor)
    Path(name).unlink(missing_ok=True)
    return True


def hub_caches() -> tuple[Path, ...]:
    """Every hub cache a model may be found in, RunPod's first."""
    return hf_cache_dir(), own_hf_cache_dir(), legacy_hf_cache_dir()


def cached_hub_file(repo_id: str, filename: str) -> tuple[Path, Path] | None:
    """(the cache, the file) of ``filename`` of hub repository ``repo_id`` already in a hub cache,
    found without any network call; None when no cache holds it."""
    from huggingface_hub import try_to_load_from_cache

    for cache in hub_caches():
        with contextlib.suppress(ValueError):  # a repo id the hub library refuses: in no cache
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache))
            if isinstance(found, str):
                return cache, Path(found)
    return None


# What diffusers fetches of a repository: the index and the component folders (not the
# single-file checkpoints beside them, which huggingface_hub's record of the repository lists).
DIFFUSERS_FILES = ["model_index.json", "*/*"]
# Copies a diffusers or transformers load never reads (other frameworks' weights, other variants
# than the plain one): some repositories hold several times the model's size in them.
NOT_LOADED = ["*.msgpack", "*.onnx", "*.onnx_data", "*.pb", "*.h5", "*.ckpt", "*openvino*", "*.fp16.*", "*non_ema*"]
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a branch, tag or commit: no '/', no '..'
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def cached_snapshot(repo_id: str, revision: str | None, notes: list[str] | None = None) -> Path | None:
    """The folder of a complete copy of hub model ``repo_id`` already on the volume, or None.

    Looks in the hub caches (RunPod's model cache, this worker's downloads) without any network
    call: a model found here loads offline, however ``HF_HUB_OFFLINE`` is set. The snapshot
    ``refs/<revision>`` names, else (older cache layouts have no ``refs/main``) the one snapshot
    there is or, of several, the newest complete one, said in ``notes``. Incomplete copies (a
    download cut short) and copies with any link leading out of their own repository folder are
    not used.
    """
    if revision is not None and (REVISION.fullmatch(revision) is None or ".." in revision):
        return None  # refs/<revision> must not climb anywhere (config refuses such revisions too)
    caches = hub_caches()
    found = (_by_ref(cache, repo_id, revision) for cache in caches)  # a ref anywhere wins over none
    unnamed = (_without_ref(cache, repo_id, revision, notes) for cache in caches)
    return next((folder for folder in (*found, *unnamed) if folder is not None), None)


def _usable(cache: Path, repo_id: str, folder: Path) -> bool:
    return _inside_its_cache(cache, repo_id, folder) and pipeline_complete(folder)


def _by_ref(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot huggingface_hub itself finds (through ``refs/``), when complete."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=DIFFUSERS_FILES,
                ignore_patterns=NOT_LOADED,
            )
        )
    except Exception:  # not there, or incomplete by huggingface_hub's own record
        return None
    return folder if _usable(cache, repo_id, folder) else None


def _without_ref(cache: Path, repo_id: str, revision: str | None, notes: list[str] | None) -> Path | None:
    """A complete snapshot found by its folder alone (a cache with no ``refs/main``): the commit a
    revision names, else for the default branch the only one or the newest."""
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = repository / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision is not None and revision != "main":
        named = snapshots / revision  # a commit hash; a branch or tag needs its ref
        return named if COMMIT_HASH.fullmatch(revision) and named.is_dir() and _usable(cache, repo_id, named) else None
    refs = repository / "refs"
    if refs.is_dir() and any(refs.iterdir()):
        return None  # refs name what is there (another branch, a download under way): not a guess to make
    folders = sorted((f for f in snapshots.iterdir() if f.is_dir()), key=lambda f: f.stat().st_mtime, reverse=True)
    chosen = next((folder for folder in folders if _usable(cache, repo_id, folder)), None)
    if chosen is not None and len(folders) > 1 and notes is not None:
        notes.append(
            f"{repo_id}: the cache has {len(folders)} snapshots and no refs/main to choose one; using the most "
            f"recently modified complete one, {chosen.name}"
        )
    return chosen


def _inside_its_cache(cache: Path, repo_id: str, snapshot: Path) -> bool:
    """Hub snapshots are links into the repository's ``blobs/``: the repository folder must be a
    real folder of ``cache`` and every path under the snapshot, linked folders followed, must
    stay inside it."""
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    real_repository = Path(os.path.realpath(repository))
    if repository.is_symlink() or real_repository != Path(os.path.realpath(cache)) / repository.name:
        return False
    seen: set[Path] = set()
    folders = [snapshot]
    while folders:  # a walk that follows linked folders, each real folder once (links may loop)
        real = Path(os.path.realpath(folders.pop()))
        if not real.is_relative_to(real_repository):
            return False
        if real in seen:
            continue
        seen.add(real)
        for entry in os.scandir(real):
            if not Path(os.path.realpath(entry.path)).is_relative_to(real_repository):
                return False
            if entry.is_dir():
                folders.append(Path(entry.path))
    return True


def pipeline_complete(folder: Path) -> bool:
    """Whether a diffusers folder has every component its ``model_index.json`` lists, weights included."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    for name, spec in index.items():
        if not (isinstance(spec, list) and spec and spec[0] is not None):
            continue  # metadata (_class_name, ...) and components the pipeline leaves out
        component = folder / name
        if not component.is_dir() or not any(component.iterdir()):
            return False
        if (component / "config.json").is_file() and not _weights_complete(component):
            return False
    return True


def _weights_complete(component: Path) -> bool:
    """A model component has its weights: every shard its index names, or one weights file."""
    for index_file in component.glob("*.index.json"):
        try:
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return all((component / shard).is_file() for shard in shards)
    return any(component.glob("*.safetensors")) or any(component.glob("*.bin"))


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a safe file or folder name, or None when it is."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if NAME_PATTERN.fullmatch(name) is None or name.startswith(".") or name in {".", ".."}:
        return f"must be {NAME_RULE}, got {name!r}"[:200]
    return None


def check_name(name: str, field: str) -> str:
    problem = name_problem(name)
    if problem:
        raise FastBackendError(f"{field}: {problem}", code=ErrorCode.INVALID_NAME)
    return name


def dataset_dir(name: str) -> Path:
    return no_links(datasets_dir() / check_name(name, "training_name"))


def lora_dir(name: str) -> Path:
    """``output/<name>``: the folder of one trained LoRA (a "model" in the request contract)."""
    return no_links(outputs_dir() / check_name(name, "model"))


def no_links(path: Path) -> Path:
    """``path``, once no part of it below the data root is a symbolic link.

    The volume is shared (a Pod can write there): a link planted as a dataset, a model or a file
    in them would send the worker's reads, writes, locks and deletes anywhere. Every path made
    from a request goes through here before it is used.
    """
    root = data_root()
    for base in (root, Path(os.path.realpath(root))):
        if path.is_relative_to(base):
            current = base
            for part in path.relative_to(base).parts:
                if part in (".", ".."):
                    raise FastBackendError(f"path {str(path)!r} climbs out with '..'", code=ErrorCode.PATH_OUTSIDE_ROOT)
                current = current / part
                if current.is_symlink():
                    raise FastBackendError(
                        f"{str(current.relative_to(base))!r} on the volume is a symbolic link; the worker follows none",
                        code=ErrorCode.PATH_OUTSIDE_ROOT,
                    )
            return path
    raise FastBackendError(f"path {str(path)!r} is outside the data root", code=ErrorCode.PATH_OUTSIDE_ROOT)


def existing_dataset_dir(name: str) -> Path:
    folder = dataset_dir(name)
    if not folder.is_dir():
        raise NotFound(f"dataset {name!r} does not exist; existing datasets: {list_names(datasets_dir())}")
    return folder


def list_names(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` that a request can name (none when it is missing).

    Hidden folders (deletions in progress) and folders made by hand with names outside the rule
    are left out: a listing shows only what can be used, trained and deleted by name.
    """
    if not folder.is_dir() or folder.is_symlink():
        return []
    names = (p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    return sorted(name for name in names if name_problem(name) is None)


def map_user_path(text: str, field: str) -> Path:
    """Map a path from a config onto the data root, refusing anything that leaves it.

    Relative paths are relative to the root; ``/workspace/...`` and ``/runpod-volume/...``
    map onto the root; any other absolute path must already lie inside the root.
    """
    root = data_root()
    if "\x00" in text:
        raise FastBackendError(f"{field}: path {text!r} contains a NUL byte", code=ErrorCode.PATH_OUTSIDE_ROOT)
    path = Path(text)
    for alias in VOLUME_ALIASES:
        if path.is_absolute() and path.is_relative_to(alias):
            path = root / path.relative_to(alias)
            break
    else:
        path = path if path.is_absolute() else root / path
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(os.path.realpath(root)):
        raise FastBackendError(
            f"{field}: path {text!r} is outside the data root {str(root)!r}", code=ErrorCode.PATH_OUTSIDE_ROOT
        )
    return resolved


def resolve_base_model(name_or_path: str, field: str, marker: str = "model_index.json") -> str:
    """A hub id as it is, or a local model folder (one holding ``marker``: a diffusers pipeline by
    default): under the data root, or baked into the image in one of ``settings.MODEL_DIRS``
    (never elsewhere)."""
    looks_local = name_or_path.startswith(("/", ".", "~")) or (data_root() / name_or_path).exists()
    if not looks_local:
        if not hub_repo_id(name_or_path):
            raise FastBackendError(
                f"{field}: {name_or_path!r} is neither a hub id (org/name) nor a folder under the data root",
                code=ErrorCode.INVALID_CONFIG,
            )
        return name_or_path
    folder = baked_model_folder(name_or_path)
    if folder is None:
        try:
            folder = map_user_path(name_or_path, field)
        except FastBackendError as exc:
            dirs = ":".join(map(str, settings.MODEL_DIRS.get())) or "unset"
            raise FastBackendError(
                f"{exc.message}; models baked into the image must lie in FASTBACKEND_MODEL_DIRS ({dirs})",
                code=exc.code,
            ) from None
    if not (folder / marker).is_file():
        kind = "diffusers model" if marker == "model_index.json" else "model"
        raise NotFound(f"{field}: {name_or_path!r} is not a {kind} folder (no {marker})")
    return str(folder)


def resolve_lora_file(reference: str, field: str) -> str:
    """A LoRA file a config names, in ai-toolkit's forms: ``owner/repo/file.safetensors`` or
    ``owner/repo`` (its ``pytorch_lora_weights.safetensors``) on the hub, kept as named; or a file,
    or a folder holding that file, under the data root or in ``settings.MODEL_DIRS`` (never elsewhere)."""
    repo_id, filename = hub_file(reference)
    # a file name where a hub repo's name would be: a local file (that may not exist)
    named_file = filename == LORA_WEIGHTS_NAME and repo_id.endswith(".safetensors")
    looks_local = reference.startswith(("/", ".", "~")) or named_file or (data_root() / reference).exists()
    if not looks_local:
        if not hub_repo_id(repo_id) or not filename.endswith(".safetensors") or ".." in filename.split("/"):
            raise FastBackendError(
                f"{field}: {reference!r} is neither a hub file (owner/repo/file.safetensors or owner/repo) "
                "nor a file under the data root",
                code=ErrorCode.INVALID_CONFIG,
            )
        return reference
    path = baked_model_folder(reference) or map_user_path(reference, field)
    if path.is_dir():  # the file inside is checked as any path is: it may be a link out of the root
        inside = str(path / LORA_WEIGHTS_NAME)
        path = baked_model_folder(inside) or map_user_path(inside, field)
    if not path.is_file():
        raise NotFound(f"{field}: {reference!r} is not a LoRA file (nor a folder holding {LORA_WEIGHTS_NAME})")
    return str(path)


def hub_repo_id(text: str) -> bool:
    """Whether ``text`` is a repo id the hub takes (its own rule: no ``--``, ``..``, ``.git`` end, ...)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return HUB_ID.fullmatch(text) is not None


def hub_file(reference: str) -> tuple[str, str]:
    """``owner/repo/path/file.safetensors`` -> (repo id, path in the repo); ``owner/repo`` names its
    ``pytorch_lora_weights.safetensors``, as diffusers and ai-toolkit read it."""
    parts = reference.split("/", 2)
    return "/".join(parts[:2]), parts[2] if len(parts) == 3 else LORA_WEIGHTS_NAME


def baked_model_folder(text: str) -> Path | None:
    """``text`` as a folder inside one of ``settings.MODEL_DIRS``, or None.

    Named by absolute path, and inside the model folder once links are resolved too: a link
    there that leads elsewhere is as outside as any other path (``map_user_path`` refuses it).
    """
    path = Path(text)
    if not path.is_absolute() or "\x00" in text:
        return None
    resolved = Path(os.path.realpath(path))
    for root in settings.MODEL_DIRS.get():
        if path.is_relative_to(root) and resolved.is_relative_to(os.path.realpath(root)):
            return resolved
    return None


@contextlib.contextmanager
def temporary_path(path: Path) -> Iterator[Path]:
    """A hidden temporary path beside ``path`` that becomes ``path`` when the block succeeds.

    Readers see the old file or the whole new one, never a part: the block writes the temporary
    file, which is flushed to disk and renamed over ``path``; on an error it is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        move_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_no_follow(path: Path, flags: int, refused: str) -> int:
    """``os.open`` that never follows a link: one there is ``path_outside_root``, saying ``refused``."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise FastBackendError(f"{refused}; the worker follows none", code=ErrorCode.PATH_OUTSIDE_ROOT) from None


def move_into_place(source: Path, target: Path) -> None:
    """Rename a finished file over ``target`` on the same volume, its data flushed to disk first
    (otherwise the rename can land before the data, and a crash leaves an empty file)."""
    fd = open_no_follow(source, os.O_RDWR, f"{source.name!r} became a symbolic link before it was moved into place")
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    source.replace(target)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with temporary_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def locked(
    folder: Path, timeout_s: float | None = None, reader: str | None = None, create: bool = True
) -> Iterator[None]:
    """Hold ``<folder>/.lock`` (an flock, released by the OS if the worker dies).

    Writers hold it exclusively; a ``reader`` (a training run, by its model name) holds it shared
    with other readers and leaves its name in ``.reader-<name>`` so that a refused writer can say
    who is reading. Waits up to ``timeout_s`` (default ``settings.LOCK_TIMEOUT_S``) for other holders.
    The folder is made when missing, unless ``create`` is false: then a folder that is not there (or
    is deleted while this waits) is ``not_found``, and nothing is left behind.
    """
    if timeout_s is None:
        timeout_s = settings.LOCK_TIMEOUT_S.get()
    mode = fcntl.LOCK_SH if reader else fcntl.LOCK_EX
    fd = _lock_file(folder, time.monotonic() + timeout_s, timeout_s, mode, create)
    marker = folder / f"{READER_PREFIX}{reader}" if reader else None
    try:
        if marker is None:  # alone: any reader mark left is a killed run's
            for stale in folder.glob(f"{READER_PREFIX}*"):
                stale.unlink(missing_ok=True)
        else:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
        os.close(fd)  # releases the flock


def _lock_file(folder: Path, deadline: float, timeout_s: float, mode: int, create: bool = True) -> int:
    """An open, flocked ``.lock`` of ``folder`` (never through a link), still the folder's own.

    A folder deleted or renamed while we waited leaves us holding the lock of a file no one else
    will open again: then the lock is taken again on the folder's current ``.lock``.
    """
    while True:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise NotFound(f"{folder.name!r} was deleted while this job worked")
        path = folder / ".lock"
        try:
            fd = open_no_follow(path, os.O_RDWR | os.O_CREAT, f"{folder.name!r}'s lock file is a symbolic link")
        except FileNotFoundError:  # the folder went away before the lock could be opened
            continue
        try:
            _acquire(fd, folder, deadline, timeout_s, mode)
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass  # the folder went away while we waited
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _acquire(fd: int, folder: Path, deadline: float, timeout_s: float, mode: int) -> None:
    """flock ``fd`` in ``mode`` by ``deadline``, or answer ``locked`` saying who holds it."""
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                readers = sorted(p.name.removeprefix(READER_PREFIX) for p in folder.glob(f"{READER_PREFIX}*"))
                holder = f"training of {', '.join(map(repr, readers))}" if readers else "another job"
                raise FastBackendError(
                    f"{folder.name!r} is in use by {holder} (waited {timeout_s:g}s)", code=ErrorCode.LOCKED
                ) from None
            time.sleep(0.1)


def remove_tree(folder: Path) -> None:
    """Delete a dataset or model folder so that no reader ever sees it half-deleted.

    Under the folder's lock it is renamed to a hidden name (atomic), then removed. A folder
    that a running upload or training holds is refused after a short wait, not waited for.
    """
    with locked(folder, timeout_s=BUSY_LOCK_TIMEOUT_S):
        trash = folder.with_name(f".deleted-{folder.name}-{os.getpid()}-{time.time_ns()}")
        folder.rename(trash)
    shutil.rmtree(trash)


def remove_abandoned(parent: Path, prefix: str, quiet_s: float) -> None:
    """Remove the ``<parent>/<prefix>*`` work folders whose owner died.

    An owner holds its folder's ``.lock`` while it works (the OS releases an flock when its
    process dies) and touches the folder at least every ``quiet_s / 10``. A folder is abandoned
    when its lock is free (or missing) and it has not changed for ``quiet_s``: the quiet time
    covers the instant between creating a folder and locking it, a killed cleanup that removed
    the lock first, and volumes whose locks do not reach across hosts.
    """
    for folder in parent.glob(f"{prefix}*"):
        try:
            _remove_if_abandoned(folder, quiet_s)
        except OSError:
            continue  # gone meanwhile (its owner finished), or a lock that is no lock file: not ours to judge


def _remove_if_abandoned(folder: Path, quiet_s: float) -> None:
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or time.time() - info.st_mtime < quiet_s:
        return
    try:
        fd: int | None = os.open(folder / ".lock", os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its owner is alive
        shutil.rmtree(folder, ignore_errors=True)  # rmtree removes links, never what they point to
    finally:
        if fd is not None:
            os.close(fd)


def free_bytes() -> int:
    """Free bytes on the data root's volume (the root itself may not exist yet)."""
    path = data_root()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(needed: int | None = None) -> FastBackendError:
    """The error for a volume without room: what is free, and what was needed when it is known."""
    free = free_bytes()
    wanted = f"{needed:,} bytes are needed, " if needed is not None else ""
    return FastBackendError(
        f"the volume is full: {wanted}{free:,} bytes are free; delete datasets or models, or grow the volume",
        code=ErrorCode.DISK_FULL,
    )


def out_of_space(exc: BaseException) -> bool:
    """A full volume or quota: as an OSError, or as torch's and safetensors' own wrappers of one."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "os error 28" in str(exc)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
