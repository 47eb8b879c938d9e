"""Training datasets on the volume: upload (files, a zip, URLs), list and delete.

A dataset is ``<root>/training_data/<name>/``: the images, one ``<stem>.txt`` caption per
captioned image (the kohya / ai-toolkit folder shape) and ``manifest.json``. The manifest is
the commit point: an image is part of the dataset only once the manifest lists it, and the
manifest is replaced atomically after the images and captions are in place. So a killed
upload leaves at most unlisted files, which the next writer removes, and never a half-written
image that listing or training would see.

An upload is all or nothing: every file is decoded and checked first, every problem is
reported together, and nothing is written unless all pass. Writers of one dataset hold its
lock, so two workers appending at once both land completely.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import urlsplit

from fastbackend import settings
from fastbackend.errors import ErrorCode, ValidationFailed
from fastbackend.fetch import FetchProblem, fetch
from fastbackend.images import IMAGE_EXTENSIONS, CheckedImage, ImageProblem, check_image
from fastbackend.schemas import MAX_CAPTION_CHARS, DeleteDatasetRequest, ListDatasetsRequest, UploadTrainingDataRequest
from fastbackend.storage import (
    atomic_write_bytes,
    dataset_dir,
    datasets_dir,
    existing_dataset_dir,
    list_names,
    locked,
    name_problem,
    remove_tree,
)

Progress = Callable[[dict], None]
MANIFEST = "manifest.json"
MAX_FILES_PER_REQUEST = 2000
CAPTION_EXTENSION = ".txt"


@dataclass
class RawFile:
    """A file as it arrived, before any check; ``source`` says where, for error messages."""

    filename: str
    data: bytes
    source: str


@dataclass
class Batch:
    """What one request brings, after checks: images by filename, captions by image stem."""

    images: dict[str, dict] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- manifest


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return {"images": {}}


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest["updated"] = _now()
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- gathering the request's files


def gather(request: UploadTrainingDataRequest) -> tuple[list[RawFile], dict[str, str], list[str]]:
    """Every file the request brings (inline, in a zip, behind URLs), inline captions, problems."""
    files: list[RawFile] = []
    captions: dict[str, str] = {}
    problems: list[str] = []
    for index, item in enumerate(request.files):
        source = f"input.files[{index}] ({item.filename!r})"
        try:
            files.append(RawFile(item.filename, decode_base64(item.content), source))
        except (binascii.Error, ValueError):
            problems.append(f"{source}: content is not valid base64")
        if item.caption is not None:
            captions[PurePosixPath(item.filename).stem] = item.caption
    if request.zip is not None:
        try:
            files += unpack_zip(decode_base64(request.zip), "input.zip", problems)
        except (binascii.Error, ValueError):
            problems.append("input.zip: not valid base64")
    for index, url in enumerate(request.urls):
        files += fetch_url(url, f"input.urls[{index}] ({_shown_url(url)})", problems)
    if len(files) > MAX_FILES_PER_REQUEST:
        problems.append(f"input: {len(files)} files in one request is over the limit of {MAX_FILES_PER_REQUEST}")
    return files, captions, problems


def decode_base64(text: str) -> bytes:
    """Strict base64, tolerating what clients commonly add: line breaks and a data-URL prefix."""
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    if "\n" in text or " " in text:
        text = "".join(text.split())
    return base64.b64decode(text, validate=True)


def _shown_url(url: str) -> str:
    """A URL without its query string, which may hold a signed token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else repr(url[:80])


def fetch_url(url: str, source: str, problems: list[str]) -> list[RawFile]:
    try:
        data = fetch(url)
    except FetchProblem as exc:
        problems.append(f"{source}: {exc}")
        return []
    if data[:4] == b"PK\x03\x04":
        return unpack_zip(data, source, problems)
    filename = PurePosixPath(urlsplit(url).path).name
    problem = name_problem(filename)
    if problem:
        problems.append(f"{source}: the file name in the URL {problem}")
        return []
    return [RawFile(filename, data, source)]


def unpack_zip(data: bytes, source: str, problems: list[str]) -> list[RawFile]:
    """The files of a zip, flattened to their base names; unsafe entries are problems."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        problems.append(f"{source}: not a valid zip file")
        return []
    with archive:
        entries = [info for info in archive.infolist() if not _ignored_entry(info)]
        unpacked = sum(info.file_size for info in entries)
        limit = settings.MAX_ZIP_UNPACKED_BYTES.get()
        if unpacked > limit:
            problems.append(f"{source}: unpacks to {unpacked:,} bytes, over the {limit:,}-byte limit")
            return []
        files = []
        for info in entries:
            problem = _unsafe_entry(info)
            if problem:
                problems.append(f"{source}: entry {info.filename!r} {problem}")
                continue
            files.append(RawFile(PurePosixPath(info.filename).name, archive.read(info), f"{source}:{info.filename}"))
        return files


def _ignored_entry(info: zipfile.ZipInfo) -> bool:
    """Folders, macOS resource forks and hidden files carry nothing to train on."""
    path = PurePosixPath(info.filename)
    return info.is_dir() or "__MACOSX" in path.parts or path.name.startswith(".")


def _unsafe_entry(info: zipfile.ZipInfo) -> str | None:
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        return "has an absolute or parent (..) path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    limit = settings.MAX_IMAGE_BYTES.get()
    if info.file_size > limit:  # refused before it is unpacked into memory
        return f"unpacks to {info.file_size:,} bytes, over the {limit:,}-byte limit per file"
    return name_problem(path.name)


# ---------------------------------------------------------------- checking


def check_batch(files: list[RawFile], captions: dict[str, str], problems: list[str]) -> Batch:
    """Decode every image and caption; collect problems (in request order) and duplicates."""
    batch = Batch(captions=dict(captions), problems=problems)
    images = [raw for raw in files if _suffix(raw) in IMAGE_EXTENSIONS]
    # Pillow decodes and hashlib hashes without the GIL: a request's photos are checked in parallel.
    with ThreadPoolExecutor(max_workers=min(settings.DECODE_THREADS.get(), max(1, len(images)))) as pool:
        results = dict(zip(map(id, images), pool.map(_check_one, images), strict=True))
    seen: dict[str, str] = {}
    for raw in files:
        if id(raw) in results:
            _add_image(batch, raw, *results[id(raw)], seen)
        elif _suffix(raw) == CAPTION_EXTENSION:
            _add_caption_file(batch, raw)
        else:
            kinds = f"an image ({', '.join(IMAGE_EXTENSIONS)}) nor a caption (.txt)"
            batch.problems.append(f"{raw.source}: {raw.filename!r} is neither {kinds}")
    for stem, caption in batch.captions.items():
        if len(caption) > MAX_CAPTION_CHARS:
            batch.problems.append(
                f"caption for {stem!r}: {len(caption)} characters is over the limit of {MAX_CAPTION_CHARS}"
            )
    return batch


def _suffix(raw: RawFile) -> str:
    return PurePosixPath(raw.filename).suffix.lower()


def _check_one(raw: RawFile) -> tuple[str, CheckedImage | ImageProblem]:
    digest = hashlib.sha256(raw.data).hexdigest()
    try:
        return digest, check_image(raw.data)
    except ImageProblem as exc:
        return digest, exc


def _add_caption_file(batch: Batch, raw: RawFile) -> None:
    try:
        batch.captions[PurePosixPath(raw.filename).stem] = raw.data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        batch.problems.append(f"{raw.source}: caption is not UTF-8 text")


def _add_image(
    batch: Batch, raw: RawFile, digest: str, result: CheckedImage | ImageProblem, seen: dict[str, str]
) -> None:
    if raw.filename in batch.images:
        batch.problems.append(f"{raw.source}: file name {raw.filename!r} appears twice in this request")
    elif digest in seen:
        batch.skipped.append({"filename": raw.filename, "reason": f"duplicate of {seen[digest]!r} (same bytes)"})
    elif isinstance(result, ImageProblem):
        batch.problems.append(f"{raw.source}: {result}")
    else:
        seen[digest] = raw.filename
        batch.images[raw.filename] = {"checked": result, "sha256": digest}


# ---------------------------------------------------------------- writing


def commit(folder: Path, batch: Batch, replace: bool) -> tuple[list[dict], list[dict], dict]:
    """Write the batch into ``folder`` (the caller holds its lock); the manifest goes last."""
    manifest = {"images": {}} if replace else read_manifest(folder)
    images = manifest["images"]
    known = {entry["sha256"]: name for name, entry in images.items()}
    uploaded, skipped = [], list(batch.skipped)
    for filename, item in batch.images.items():
        original = known.get(item["sha256"])
        if original is not None:
            skipped.append({"filename": filename, "reason": f"duplicate of {original!r} already in the dataset"})
            continue
        checked = item["checked"]
        atomic_write_bytes(folder / filename, checked.data)
        images[filename] = {
            "sha256": item["sha256"],
            "width": checked.width,
            "height": checked.height,
            "bytes": len(checked.data),
            "caption": None,
            "added": _now(),
        }
        uploaded.append(
            {
                "filename": filename,
                "path": str(folder / filename),
                "size": len(checked.data),
                "width": checked.width,
                "height": checked.height,
                "sha256": item["sha256"],
            }
        )
    _apply_captions(folder, images, batch.captions)
    write_manifest(folder, manifest)
    remove_unlisted(folder, images)
    return uploaded, skipped, manifest


def _apply_captions(folder: Path, images: dict, captions: dict[str, str]) -> None:
    stems = {PurePosixPath(name).stem: name for name in images}
    for stem, caption in captions.items():
        if stem in stems:
            atomic_write_bytes(folder / f"{stem}{CAPTION_EXTENSION}", caption.encode())
            images[stems[stem]]["caption"] = caption


def remove_unlisted(folder: Path, images: dict) -> None:
    """Delete files no manifest entry owns: leftovers of a killed upload or of a replace."""
    owned = set(images) | {
        f"{PurePosixPath(name).stem}{CAPTION_EXTENSION}" for name, e in images.items() if e["caption"]
    }
    for path in folder.iterdir():
        if path.is_file() and path.name not in owned and path.name != MANIFEST and not path.name.startswith("."):
            path.unlink()
        elif path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()


# ---------------------------------------------------------------- operations


def upload_training_data(request: UploadTrainingDataRequest, progress: Progress | None = None) -> dict:
    folder = dataset_dir(request.training_name)
    files, captions, problems = gather(request)
    batch = check_batch(files, captions, problems)
    existing = set() if request.mode == "replace" else set(read_manifest(folder)["images"])
    _check_orphan_captions(batch, existing)
    if batch.problems:  # refused before the lock: a refused upload does not even create the folder
        raise ValidationFailed.from_problems(batch.problems, code=ErrorCode.INVALID_UPLOAD)
    with locked(folder):
        uploaded, skipped, manifest = commit(folder, batch, replace=request.mode == "replace")
    images = manifest["images"]
    uncaptioned = sorted(name for name, entry in images.items() if not entry["caption"])
    warnings = [f"{len(uncaptioned)} image(s) have no caption: {', '.join(uncaptioned[:10])}"] if uncaptioned else []
    return {
        "status": "success",
        "training_name": request.training_name,
        "mode": request.mode,
        "uploaded_files": uploaded,
        "skipped": skipped,
        "total_images": len(images),
        "training_folder": str(folder),
        "warnings": warnings,
    }


def _check_orphan_captions(batch: Batch, existing: set[str]) -> None:
    """A caption must belong to an image in this request or already in the dataset."""
    stems = {PurePosixPath(name).stem for name in [*batch.images, *existing]}
    stems |= {PurePosixPath(s["filename"]).stem for s in batch.skipped}
    for stem in sorted(set(batch.captions) - stems):
        batch.problems.append(
            f"caption {stem + CAPTION_EXTENSION!r}: no image named {stem!r} in this request or the dataset"
        )


def dataset_summary(name: str) -> dict:
    folder = dataset_dir(name)
    manifest = read_manifest(folder)
    images = manifest["images"]
    return {
        "name": name,
        "image_count": len(images),
        "total_bytes": sum(entry["bytes"] for entry in images.values()),
        "captioned_count": sum(1 for entry in images.values() if entry["caption"]),
        "updated": manifest.get("updated"),
        "path": str(folder),
    }


def list_datasets(request: ListDatasetsRequest, progress: Progress | None = None) -> dict:
    datasets = [dataset_summary(name) for name in list_names(datasets_dir())]
    return {"status": "success", "datasets": datasets, "total_count": len(datasets)}


def delete_dataset(request: DeleteDatasetRequest, progress: Progress | None = None) -> dict:
    folder = existing_dataset_dir(request.training_name)
    count = len(read_manifest(folder)["images"])
    remove_tree(folder)
    return {"status": "success", "deleted": request.training_name, "images": count}
