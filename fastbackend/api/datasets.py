"""``upload_training_data``, ``list_datasets`` and ``delete_dataset``: the datasets on the volume.

An upload is all or nothing: the request's files (inline base64, a zip, URLs) are gathered and
checked, every problem is reported together, and nothing is written unless all pass.
"""

from __future__ import annotations

import binascii
import io
import time
from pathlib import PurePosixPath

from fastbackend import datasets, settings, storage
from fastbackend.api import Progress
from fastbackend.errors import ErrorCode, ValidationFailed
from fastbackend.layout import DatasetFolder
from fastbackend.schemas import (
    AUTO,
    AnalyzeDatasetRequest,
    CaptionDatasetRequest,
    DeleteDatasetRequest,
    ListDatasetsRequest,
    UploadTrainingDataRequest,
)
from fastbackend.staging import RawFile, Staging
from fastbackend.storage import (
    dataset_dir,
    datasets_dir,
    existing_dataset_dir,
    list_names,
    locked,
    no_links,
    remove_tree,
)


def upload_training_data(request: UploadTrainingDataRequest, progress: Progress | None = None) -> dict:
    folder = DatasetFolder(dataset_dir(request.training_name))
    with Staging(no_links(datasets_dir())) as staging:
        files, captions, problems = gather(request, staging)
        asked = {stem for stem, caption in captions.items() if caption == AUTO}
        captions = {stem: caption for stem, caption in captions.items() if caption != AUTO}
        batch = datasets.check_batch(files, captions, problems, staging)
        existing = set() if request.mode == "replace" else set(folder.images())
        datasets.check_orphan_captions(batch, existing)
        if batch.problems:  # refused before the lock: a refused upload does not even create the folder
            raise ValidationFailed.from_problems(batch.problems, code=ErrorCode.INVALID_UPLOAD)
        # Captioned before the commit, so a captioner that fails leaves the dataset as it was.
        written = _auto_captions(request, batch, asked, folder, progress)
        uploaded, skipped, replaced, manifest = datasets.commit(
            folder, batch, replace=request.mode == "replace", overwrite=request.overwrite, auto_captions=written
        )
    images = manifest["images"]
    warnings = uncaptioned_warning(images)
    extra = {"auto_captions": _shown_captions(written, images)} if written else {}
    return extra | {
        "status": "success",
        "training_name": request.training_name,
        "mode": request.mode,
        "uploaded_files": uploaded,
        "skipped": skipped,
        "replaced": replaced,
        "total_images": len(images),
        "training_folder": str(folder.path),
        "warnings": warnings,
    }


def _auto_captions(
    request: UploadTrainingDataRequest,
    batch: datasets.UploadBatch,
    asked: set[str],
    folder: DatasetFolder,
    progress: Progress | None,
) -> dict:
    """Captions for the images that asked for one (``caption: "auto"``, or every image without a
    caption under ``auto_caption``), by filename, with the captioner's name and class word.

    Images the dataset already holds with a caption are left out: user captions are never replaced
    (an automatic caption of bytes this upload replaces is no longer there: it is made again).
    """
    from fastbackend.captions import caption_photos

    held = {} if request.mode == "replace" else folder.read_manifest()["images"]
    captioned = set(batch.captions) | datasets.captioned_stems(held, batch)
    photos = {
        name: item["staged"]
        for name, item in batch.images.items()
        if (request.auto_caption is not None or PurePosixPath(name).stem in asked)
        and PurePosixPath(name).stem not in captioned  # a.jpg's caption is a.png's too (a.txt)
    }
    if not photos:
        return {}
    chosen = {name: photos[name] for name in datasets.one_per_stem(photos)}  # a.jpg and a.png share a.txt
    return caption_photos(chosen, request.caption_options, "input.auto_caption", progress)


def _shown_captions(written: dict, images: dict) -> dict:
    """What the answer says of the automatic captions: those the commit kept, and how they were made."""
    kept = {
        name: caption
        for name, caption in written["captions"].items()
        if name in images and images[name]["caption"] == caption
    }
    return {"model": written["model"], "class_word": written["class_word"], "captions": kept}


def gather(request: UploadTrainingDataRequest, staging: Staging) -> tuple[list[RawFile], dict[str, str], list[str]]:
    """Every file the request brings (inline, in a zip, behind URLs) staged, inline captions, problems.

    Past a limit for the whole request (``staging.OverLimit``) the upload is refused at once.
    """
    files: list[RawFile] = []
    captions: dict[str, str] = {}
    problems: list[str] = []
    _gather_inline(request, staging, files, captions, problems)
    deadline = time.monotonic() + settings.URLS_DEADLINE_S.get()  # for all of the request's URLs together
    for index, url in enumerate(request.urls):
        source = f"input.urls[{index}] ({datasets.shown_url(url)})"
        files += datasets.fetch_url(url, source, problems, staging, deadline)
    return files, captions, problems


def _gather_inline(
    request: UploadTrainingDataRequest,
    staging: Staging,
    files: list[RawFile],
    captions: dict[str, str],
    problems: list[str],
) -> None:
    for index, item in enumerate(request.files):
        source = f"input.files[{index}] ({item.filename!r})"
        try:
            files.append(staging.add_bytes(item.filename, datasets.decode_base64(item.content), source))
        except (binascii.Error, ValueError):
            problems.append(f"{source}: content is not valid base64")
        if item.caption is not None:
            captions[PurePosixPath(item.filename).stem] = item.caption
    if request.zip is not None:
        try:
            archive = io.BytesIO(datasets.decode_base64(request.zip))  # within the payload limit
        except (binascii.Error, ValueError):
            problems.append("input.zip: not valid base64")
            return
        files += datasets.unpack_zip(archive, "input.zip", problems, staging)


def list_datasets(request: ListDatasetsRequest, progress: Progress | None = None) -> dict:
    found = [datasets.summary(DatasetFolder(datasets_dir() / name)) for name in list_names(datasets_dir())]
    return {"status": "success", "datasets": found, "total_count": len(found)}


def delete_dataset(request: DeleteDatasetRequest, progress: Progress | None = None) -> dict:
    folder = DatasetFolder(existing_dataset_dir(request.training_name))
    count = len(folder.images())
    remove_tree(folder.path)
    return {"status": "success", "deleted": request.training_name, "images": count}


def caption_dataset(request: CaptionDatasetRequest, progress: Progress | None = None) -> dict:
    """Automatic captions for the photos of a dataset already on the volume that have none (and, with
    ``replace_automatic``, again for those the captioner wrote): what ``auto_caption`` does at upload,
    without sending the photos again. A user's caption is never replaced."""
    from fastbackend.captions import caption_photos

    folder = DatasetFolder(existing_dataset_dir(request.training_name))
    with locked(folder.path, timeout_s=storage.BUSY_LOCK_TIMEOUT_S, create=False):
        pass  # in use (a training run reads it): say so now, not after the captioner's work
    images = datasets.settled_manifest(folder)["images"]
    keep = {n: e for n, e in images.items() if not (request.replace_automatic and e.get("auto_caption"))}
    taken = datasets.captioned_stems(keep)
    wanted = datasets.one_per_stem(name for name in images if PurePosixPath(name).stem not in taken)
    written: dict = {"captions": {}, "unreadable": {}}
    if wanted:
        photos = {name: no_links(folder.path / name) for name in wanted}
        written = caption_photos(photos, request.auto_caption, "input.auto_caption", progress)
        seen = {name: images[name]["sha256"] for name in wanted}
        images = datasets.add_automatic_captions(folder, written["captions"], seen)["images"]
    warnings = uncaptioned_warning(images)
    warnings += [f"{name}: not captioned, {why}" for name, why in sorted(written["unreadable"].items())]
    shown = _shown_captions(written, images) if wanted else {"captions": {}}
    return {"status": "success", "training_name": request.training_name, "auto_captions": shown, "warnings": warnings}


def uncaptioned_warning(images: dict) -> list[str]:
    """The answer's warning for the dataset's images that have no caption (the first ten named)."""
    uncaptioned = sorted(name for name, entry in images.items() if not entry["caption"])
    return [f"{len(uncaptioned)} image(s) have no caption: {', '.join(uncaptioned[:10])}"] if uncaptioned else []


def analyze_dataset(request: AnalyzeDatasetRequest, progress: Progress | None = None) -> dict:
    """The dataset report (faces, sharpness, exposure, sizes, near-duplicates, one person?)."""
    from fastbackend.dataset_report import analyze

    folder = existing_dataset_dir(request.training_name)
    datasets.recover(DatasetFolder(folder))  # an upload a killed worker left half-committed
    # No lock: it only reads, and a photo that an upload removes meanwhile is noted as unreadable.
    report = analyze(DatasetFolder(folder), request.resolution)
    return {"status": "success", "training_name": request.training_name} | report
