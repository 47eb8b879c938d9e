"""Training datasets on the volume: files gathered from a zip or URLs, checked, and committed.

A dataset is ``<root>/training_data/<name>/`` (``layout.DatasetFolder``): the images, one
``<stem>.txt`` caption per captioned image (the kohya / ai-toolkit folder shape) and a
manifest. The manifest is the commit point: an image is part of the dataset only once the
manifest lists it, and the manifest is replaced atomically after the images and captions are
in place. So a killed upload leaves at most unlisted files, which the next writer removes, and
never a half-written image that listing or training would see.

An upload is all or nothing: every file is decoded and checked first, every problem is
reported together, and nothing is written unless all pass. Writers of one dataset hold its
lock, so two workers appending at once both land completely.
"""

from __future__ import annotations

import base64
import stat
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

from fastbackend import settings
from fastbackend.errors import ErrorCode, NotFound, ValidationFailed
from fastbackend.fetch import FetchProblem, fetch
from fastbackend.images import CheckedImage, ImageProblem, check_image
from fastbackend.layout import (
    CAPTION_EXTENSION,
    FORMATS,
    IMAGE_EXTENSIONS,
    PENDING_PREFIX,
    DatasetFolder,
    Manifest,
    ManifestEntry,
    caption_name,
    now,
)
from fastbackend.schemas import MAX_CAPTION_CHARS
from fastbackend.staging import RawFile, Staging
from fastbackend.storage import (
    TEMP_SUFFIX,
    atomic_write_bytes,
    locked,
    mark_volume,
    move_into_place,
    name_problem,
    no_links,
)

# What a damaged or hostile zip entry raises when read: CRC or size mismatch, bad deflate data,
# truncation, an unknown compression method, encryption.
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError, ValueError)
CHUNK_BYTES = 1 << 20
# The longest caption file that can hold a caption under the limit: 4 bytes per character, and a BOM.
MAX_CAPTION_FILE_BYTES = MAX_CAPTION_CHARS * 4 + 3


@dataclass
class UploadBatch:
    """What one upload brings, after checks: images by filename, captions by image stem."""

    images: dict[str, dict] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- files from base64, zips and URLs


def decode_base64(text: str) -> bytes:
    """Strict base64, tolerating what clients commonly add: line breaks and a data-URL prefix."""
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(",", 1)[1]
    if "\n" in text or " " in text:
        text = "".join(text.split())
    return base64.b64decode(text, validate=True)


def shown_url(url: str) -> str:
    """A URL without its query string or user:password, which may hold secrets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return repr(url[:80])
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if host else repr(url[:80])


def fetch_url(
    url: str, source: str, problems: list[str], staging: Staging, deadline: float | None = None
) -> list[RawFile]:
    with staging.new_file(source, may_be_zip=True) as staged:
        try:
            _, final_url = fetch(url, staged, deadline=deadline)
        except FetchProblem as exc:
            problems.append(f"{source}: {exc}")
            staging.discard(staged)
            return []
    if not staged.counted:  # a zip: it is not kept, its entries are
        with staged.path.open("rb") as handle:
            staging.discard(staged)  # unlinked: the open handle still reads it
            return unpack_zip(handle, source, problems, staging)
    filename = PurePosixPath(urlsplit(final_url).path).name  # where redirects led: a share link's file
    problem = name_problem(filename)
    if problem:
        problems.append(f"{source}: the file name in the URL {problem}")
        return []
    return [staged.raw(filename, source)]


def unpack_zip(archive_file: BinaryIO, source: str, problems: list[str], staging: Staging) -> list[RawFile]:
    """The files of a zip, flattened to their base names and staged one at a time; unsafe entries are problems."""
    try:
        archive = zipfile.ZipFile(archive_file)
    except (zipfile.BadZipFile, ValueError, OSError):  # ValueError, OSError: headers that lie about offsets
        problems.append(f"{source}: not a valid zip file")
        return []
    with archive:
        entries = [info for info in archive.infolist() if not _ignored_entry(info)]
        staging.expect_files(len(entries), source)  # from the headers, before a byte is unpacked
        unpacked = sum(info.file_size for info in entries)
        if staging.used + unpacked > staging.limit:  # refused from the headers, before a byte is unpacked
            others = f" (with the request's other {staging.used:,})" if staging.used else ""
            problems.append(
                f"{source}: unpacks to {unpacked:,} bytes{others}, over the {staging.limit:,}-byte limit per upload"
            )
            return []
        staging.check_room(unpacked)
        files = []
        for info in entries:
            problem = _unsafe_entry(info)
            if problem:
                problems.append(f"{source}: entry {info.filename!r} {problem}")
                continue
            raw = _unpack_entry(archive, info, source, problems, staging)
            if raw is not None:
                files.append(raw)
        return files


def _unpack_entry(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, problems: list[str], staging: Staging
) -> RawFile | None:
    """Stream one entry into a staged file; an entry whose data is damaged, or longer than its
    header said (zipfile stops at the declared size and checks the CRC), is a problem."""
    entry_source = f"{source}:{info.filename}"
    chunks = _entry_chunks(archive, info)
    with staging.new_file(entry_source) as staged:
        while True:
            try:  # reading only: a full volume while writing is disk_full, not a damaged entry
                chunk = next(chunks, b"")
            except ZIP_READ_ERRORS as exc:
                problems.append(f"{source}: entry {info.filename!r} could not be unpacked ({type(exc).__name__})")
                staging.discard(staged)
                return None
            if not chunk:
                break
            staged.write(chunk)
    return staged.raw(PurePosixPath(info.filename).name, entry_source)


def _entry_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    with archive.open(info) as entry:
        while chunk := entry.read(CHUNK_BYTES):
            yield chunk


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
    if info.file_size > limit:  # refused before it is unpacked
        return f"unpacks to {info.file_size:,} bytes, over the {limit:,}-byte limit per file"
    return name_problem(path.name)


# ---------------------------------------------------------------- checking


def check_batch(files: list[RawFile], captions: dict[str, str], problems: list[str], staging: Staging) -> UploadBatch:
    """Decode every image and caption; collect problems (in request order) and duplicates."""
    batch = UploadBatch(captions=dict(captions), problems=problems)
    images = [raw for raw in files if _suffix(raw) in IMAGE_EXTENSIONS]
    # Pillow decodes without the GIL: a request's photos are checked in parallel, one image per thread in memory.
    with ThreadPoolExecutor(max_workers=min(settings.DECODE_THREADS.get(), max(1, len(images)))) as pool:
        results = dict(zip(map(id, images), pool.map(_check_one, images), strict=True))
    seen: dict[str, str] = {}
    for raw in files:
        if id(raw) in results:
            result = results[id(raw)]
            if isinstance(result, CheckedImage) and result.rotated:  # rewritten upright: its size counts
                staging.take(result.size - raw.size, raw.source)
            _add_image(batch, raw, result, seen)
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


def _check_one(raw: RawFile) -> CheckedImage | ImageProblem:
    try:
        return check_image(raw.path)
    except ImageProblem as exc:
        return exc


def _add_caption_file(batch: UploadBatch, raw: RawFile) -> None:
    if raw.size > MAX_CAPTION_FILE_BYTES:
        longest = f"longer than a caption of {MAX_CAPTION_CHARS} characters can be"
        batch.problems.append(f"{raw.source}: caption file is {raw.size:,} bytes, {longest}")
        return
    try:
        batch.captions[PurePosixPath(raw.filename).stem] = raw.path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        batch.problems.append(f"{raw.source}: caption is not UTF-8 text")


def _add_image(batch: UploadBatch, raw: RawFile, result: CheckedImage | ImageProblem, seen: dict[str, str]) -> None:
    if raw.filename in batch.images:
        batch.problems.append(f"{raw.source}: file name {raw.filename!r} appears twice in this request")
    elif raw.sha256 in seen:
        batch.skipped.append({"filename": raw.filename, "reason": f"duplicate of {seen[raw.sha256]!r} (same bytes)"})
    elif isinstance(result, ImageProblem):
        batch.problems.append(f"{raw.source}: {result}")
    elif _suffix(raw) not in FORMATS[result.format]:  # stored as named: the name must say what it holds
        batch.problems.append(
            f"{raw.source}: {raw.filename!r} holds {result.format} data; name it {' or '.join(FORMATS[result.format])}"
        )
    else:
        seen[raw.sha256] = raw.filename
        batch.images[raw.filename] = {"checked": result, "sha256": raw.sha256, "staged": raw.path}


# ---------------------------------------------------------------- writing


def commit(
    folder: DatasetFolder, batch: UploadBatch, replace: bool, overwrite: bool = False, auto_captions: dict | None = None
) -> tuple[list[dict], list[dict], list[str], Manifest]:
    """Write the batch into ``folder`` under its lock; the manifest goes last.

    Returns the files uploaded, the files skipped (duplicates), the names replaced and the new manifest. An image
    under a name the dataset already holds with other bytes is refused unless ``overwrite``. Automatic captions
    (``captions.caption_photos``) go only to images that still have none.
    """
    mark_volume()  # so that an error about a dataset missing elsewhere can name this volume
    with locked(folder.path):
        current = finish_pending(folder)
        on_disk = set(current["images"])
        manifest = Manifest(images={}) if replace else current
        images: dict[str, ManifestEntry] = manifest["images"]
        refuse_silent_overwrites(batch, images, overwrite)
        pending: dict[str, str] = {}
        known = {entry["sha256"]: name for name, entry in images.items()}
        uploaded, skipped, replaced = [], list(batch.skipped), []
        for filename, item in batch.images.items():
            original = known.get(item["sha256"])
            if original is not None:
                skipped.append({"filename": filename, "reason": f"duplicate of {original!r} already in the dataset"})
                continue
            if filename in images:
                replaced.append(filename)
            if filename in on_disk:  # new bytes for a file the manifest still describes: staged first
                pending[filename] = f"{PENDING_PREFIX}{filename}"
            uploaded.append(_write_image(folder, filename, item, images, pending.get(filename)))
        _apply_captions(folder, images, batch.captions)
        if auto_captions:
            _apply_automatic(folder, images, auto_captions["captions"], captioned_stems(images))
        if pending:
            manifest["pending"] = pending
        folder.write_manifest(manifest)
        manifest = finish_pending(folder)
        remove_unlisted(folder, images)
    return uploaded, skipped, replaced, manifest


def _apply_automatic(
    folder: DatasetFolder, images: dict[str, ManifestEntry], captions: dict[str, str], taken: set[str]
) -> None:
    """The captioner's ``captions`` (by filename), each on its own photo's entry, where the photo is
    still there and its stem is not ``taken`` (a caption arrived meanwhile; a duplicate skipped under
    this name is not in ``images``); one per stem, as a.jpg and a.png share a.txt."""
    for name, text in sorted(captions.items()):
        stem = PurePosixPath(name).stem
        if name in images and stem not in taken:
            atomic_write_bytes(folder.caption_path(name), text.encode())
            images[name] |= {"caption": text, "auto_caption": True}
            taken.add(stem)


def one_per_stem(names: Iterable[str]) -> list[str]:
    """The first of ``names`` (sorted) for each stem: photos sharing a stem share one caption file."""
    chosen: dict[str, str] = {}
    for name in sorted(names):
        chosen.setdefault(PurePosixPath(name).stem, name)
    return sorted(chosen.values())


def add_automatic_captions(folder: DatasetFolder, captions: dict[str, str], seen: dict[str, str]) -> Manifest:
    """Write the captioner's ``captions`` for photos already in ``folder``, under its lock: each only if
    the photo still has the bytes it was captioned from (``seen``: name -> sha256) and its stem still
    has no caption other than an automatic one of those same bytes. Returns the manifest. A dataset
    deleted meanwhile is ``not_found``, and not made again."""
    with locked(folder.path, create=False):
        if not folder.manifest_path.is_file():
            raise NotFound(f"dataset {folder.name!r} was deleted while its photos were captioned")
        manifest = finish_pending(folder)
        images = manifest["images"]
        current = {
            name: text for name, text in captions.items() if name in images and images[name]["sha256"] == seen[name]
        }
        taken = {PurePosixPath(n).stem for n, e in images.items() if e["caption"] and not e.get("auto_caption")}
        _apply_automatic(folder, images, current, taken)
        folder.write_manifest(manifest)
    return manifest


def finish_pending(folder: DatasetFolder) -> Manifest:
    """Move staged overwrites into place and drop them from the manifest (the caller holds the lock).

    Safe to repeat: a writer killed anywhere in between leaves either no pending entry (the old
    file and entry stand; the staged copy is a leftover) or one this finishes.
    """
    manifest = folder.read_manifest()
    pending = manifest.pop("pending", None)
    if not pending:
        return manifest
    for filename, staged in pending.items():
        # Only what commit() writes: a manifest planted on the shared volume must not move files.
        if name_problem(filename) is not None or staged != f"{PENDING_PREFIX}{filename}":
            continue
        source, target = no_links(folder.path / staged), no_links(folder.path / filename)
        if source.is_file():
            source.replace(target)  # atomic, per file
    folder.write_manifest(manifest)
    return manifest


def settled_manifest(folder: DatasetFolder) -> Manifest:
    """The manifest with no overwrite half-done: while one is (``pending``), it already names new
    bytes that are not in place yet, and a photo read now would not be them."""
    while True:
        manifest = folder.read_manifest()
        if not manifest.get("pending"):
            return manifest
        recover(folder)


def recover(folder: DatasetFolder) -> None:
    """Finish what a killed upload left half-done, before a run reads the dataset."""
    if folder.read_manifest().get("pending"):
        with locked(folder.path):
            finish_pending(folder)


def refuse_silent_overwrites(batch: UploadBatch, images: dict[str, ManifestEntry], overwrite: bool) -> None:
    clashes = [
        name for name, item in batch.images.items() if name in images and images[name]["sha256"] != item["sha256"]
    ]
    if clashes and not overwrite:
        raise ValidationFailed.from_problems(
            [
                f"{name!r} is already in the dataset with other content; send overwrite: true to replace it"
                for name in clashes
            ],
            code=ErrorCode.INVALID_UPLOAD,
        )


def _write_image(
    folder: DatasetFolder, filename: str, item: dict, images: dict[str, ManifestEntry], staged: str | None
) -> dict:
    checked: CheckedImage = item["checked"]
    sha256: str = item["sha256"]
    path = folder.path / filename
    move_into_place(item["staged"], folder.path / (staged or filename))
    # An overwrite keeps a user's caption unless the request brings one; the captioner's described the old bytes.
    previous = images.get(filename)
    kept = previous["caption"] if previous is not None and not previous.get("auto_caption") else None
    images[filename] = ManifestEntry(
        sha256=sha256,
        width=checked.width,
        height=checked.height,
        bytes=checked.size,
        caption=kept,
        added=now(),
    )
    return {
        "filename": filename,
        "path": str(path),
        "size": checked.size,
        "width": checked.width,
        "height": checked.height,
        "sha256": sha256,
    }


def captioned_stems(images: dict[str, ManifestEntry], batch: UploadBatch | None = None) -> set[str]:
    """The stems whose caption file holds a caption: images sharing a stem (a.jpg, a.png) share ``a.txt``.
    With ``batch``, the captions that survive it: new bytes under a name drop the captioner's caption."""
    return {
        PurePosixPath(name).stem
        for name, entry in images.items()
        if entry["caption"] and not (batch is not None and entry.get("auto_caption") and _rewritten(name, entry, batch))
    }


def _rewritten(name: str, entry: ManifestEntry, batch: UploadBatch) -> bool:
    return name in batch.images and batch.images[name]["sha256"] != entry["sha256"]


def _apply_captions(folder: DatasetFolder, images: dict[str, ManifestEntry], captions: dict[str, str]) -> None:
    """The user's ``captions`` (by stem), on the entry of the last photo of that stem."""
    stems = {PurePosixPath(name).stem: name for name in images}
    for stem, caption in captions.items():
        if stem in stems:
            atomic_write_bytes(folder.caption_path(stems[stem]), caption.encode())
            entry = images[stems[stem]]
            entry["caption"] = caption
            entry.pop("auto_caption", None)  # a user's, from now on


def remove_unlisted(folder: DatasetFolder, images: dict[str, ManifestEntry]) -> None:
    """Delete files no manifest entry owns: leftovers of a killed upload or of a replace."""
    owned = set(images) | {caption_name(name) for name, entry in images.items() if entry["caption"]}
    owned.add(folder.MANIFEST)
    for path in folder.path.iterdir():
        # Hidden files are the lock, reader marks and temporary files; a dead writer's temporaries
        # and staged overwrites go (finish_pending ran first, so no staged file is still wanted).
        hidden_leftover = path.name.endswith(TEMP_SUFFIX) or path.name.startswith(PENDING_PREFIX)
        leftover = hidden_leftover if path.name.startswith(".") else path.name not in owned
        if path.is_file() and leftover:
            path.unlink()


def check_orphan_captions(batch: UploadBatch, existing: set[str]) -> None:
    """A caption must belong to an image in this upload or already in the dataset."""
    stems = {PurePosixPath(name).stem for name in [*batch.images, *existing]}
    stems |= {PurePosixPath(s["filename"]).stem for s in batch.skipped}
    for stem in sorted(set(batch.captions) - stems):
        batch.problems.append(
            f"caption {stem + CAPTION_EXTENSION!r}: no image named {stem!r} in this request or the dataset"
        )


def summary(folder: DatasetFolder) -> dict:
    """What ``list_datasets`` shows of one dataset."""
    manifest = folder.read_manifest()
    images: dict[str, ManifestEntry] = manifest["images"]
    return {
        "name": folder.name,
        "image_count": len(images),
        "total_bytes": sum(entry["bytes"] for entry in images.values()),
        "captioned_count": sum(1 for entry in images.values() if entry["caption"]),
        "updated": manifest.get("updated"),
        "path": str(folder.path),
    }
