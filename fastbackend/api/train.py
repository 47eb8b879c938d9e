"""``train_with_yaml``: check the config against the volume, train, answer with the LoRA.

Everything that can be refused is refused here, before torch is imported, a model loaded or a
file written: the config's keys and values, the datasets (uploaded, non-empty, under the data
root), the output folder, and the base model's location (a hub id, or a folder under the root).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path

from fastbackend import bucket, hardware, settings, stopping, storage
from fastbackend.api import Progress
from fastbackend.config import FLOW_MATCHING, PREFIX, TrainingConfig, parse_training_config
from fastbackend.datasets import decode_base64
from fastbackend.datasets import recover as recover_dataset
from fastbackend.errors import ErrorCode, FastBackendError, ValidationFailed
from fastbackend.fingerprint import content_sha256
from fastbackend.layout import DatasetFolder, LoraFolder
from fastbackend.presets import apply_preset
from fastbackend.schemas import DatasetSource, TrainWithYamlRequest, UploadTrainingDataRequest
from fastbackend.storage import (
    atomic_write_bytes,
    dataset_dir,
    datasets_dir,
    list_names,
    locked,
    map_user_path,
    name_problem,
    no_links,
    outputs_dir,
    resolve_base_model,
    resolve_lora_file,
)


def train_with_yaml(request: TrainWithYamlRequest, progress: Progress | None = None) -> dict:
    config, warnings = parse_training_config(request.source)
    hardware.refuse_cpu_fallback(config.process.device, f"{PREFIX}.device")
    datasets = dataset_paths(config)
    base_model = resolve_base_model(config.process.model.name_or_path, f"{PREFIX}.model.name_or_path")
    assistant = resolve_assistant(config)
    output = resolve_output(config)
    bring_datasets(request, datasets, progress or (lambda info: None))  # the only write before the run
    check_datasets_present(datasets)
    with contextlib.ExitStack() as held:
        held.enter_context(locked(output.path, timeout_s=storage.BUSY_LOCK_TIMEOUT_S))  # one job per model
        try:
            for (
                folder
            ) in datasets:  # read, not written: a delete waits (and says who reads) instead of pulling them away
                held.enter_context(locked(folder, reader=config.name))
                refuse_unfinished_commit(DatasetFolder(folder))
            check_still_named(request)
            reports = report_datasets(config, datasets, warnings, progress or (lambda info: None))
            answer = run_training(config, request, datasets, (base_model, assistant), output, warnings, progress)
            return answer | {"dataset_report": reports}
        except BaseException:
            remove_if_nothing_saved(output)
            raise


def bring_datasets(request: TrainWithYamlRequest, folders: list[Path], progress: Progress) -> None:
    """Make the volume hold the photos the request names (``input.datasets``): a dataset that is
    missing or differs is uploaded from what the request brings (replacing it, as
    ``upload_training_data`` does: all or nothing), or the run is refused before anything loads."""
    trained = sorted(folder.name for folder in folders)
    for name, source in request.datasets.items():
        field = f"input.datasets.{name}"
        if name not in trained:
            raise FastBackendError(
                f"{field}: the config trains on no dataset named {name!r} (it trains on {trained})",
                code=ErrorCode.VALIDATION_ERROR,
            )
        folder = DatasetFolder(dataset_dir(name))
        if folder.path.is_dir():
            recover_dataset(folder)
        if folder.content_sha256() != source.sha256:
            _bring(folder, source, field, progress)


def _bring(folder: DatasetFolder, source: DatasetSource, field: str, progress: Progress) -> None:
    from fastbackend.api.datasets import upload_training_data

    if not source.brings_photos:
        raise dataset_mismatch(folder, field)
    if source.files and not (source.urls or source.zip):  # inline photos: checked before anything is written
        try:
            sent = content_sha256(
                (hashlib.sha256(decode_base64(f.content)).hexdigest(), f.caption) for f in source.files
            )
        except ValueError:  # bad base64: the upload names the file
            sent = source.sha256
        _check_sent(sent, source.sha256, field)
    progress({"stage": "uploading_dataset", "dataset": folder.name})
    upload = UploadTrainingDataRequest(
        type="upload_training_data",
        training_name=folder.name,
        files=source.files,
        urls=source.urls,
        zip=source.zip,
        mode="replace",
    )
    upload_training_data(upload, progress)
    _check_sent(folder.content_sha256(), source.sha256, field)  # what the upload kept (URLs, zips: only now)


def _check_sent(got: str, named: str, field: str) -> None:
    if got != named:
        raise FastBackendError(
            f"{field}.sha256: the photos sent hash to {got}, not to {named}", code=ErrorCode.INVALID_UPLOAD
        )


NOT_SHARED = "an endpoint with network volumes in several data centres does not share datasets between them"


def dataset_mismatch(folder: DatasetFolder, field: str) -> FastBackendError:
    state = "holds other photos" if folder.image_files() else "does not exist"
    return FastBackendError(
        f"{field}: dataset {folder.name!r} {state} on this worker's {storage.volume_description()}; {NOT_SHARED}: "
        "send the photos with the training (python -m fastbackend.client train --photos FOLDER)",
        code=ErrorCode.DATASET_MISMATCH,
    )


def check_still_named(request: TrainWithYamlRequest) -> None:
    """Under the run's reader locks: the datasets still hold the photos the request named (another
    job may have replaced one between the check and the lock)."""
    for name, source in request.datasets.items():
        folder = DatasetFolder(dataset_dir(name))
        if folder.content_sha256() != source.sha256:
            raise dataset_mismatch(folder, f"input.datasets.{name}")


def resolve_assistant(config: TrainingConfig) -> str | None:
    """The training adapter's file (or hub reference), for the families that take one."""
    model = config.process.model
    if model.assistant_lora_path is None or model.resolved_arch not in FLOW_MATCHING:
        return None  # sd15 / sdxl: warned about and ignored
    return resolve_lora_file(model.assistant_lora_path, f"{PREFIX}.model.assistant_lora_path")


def refuse_unfinished_commit(folder: DatasetFolder) -> None:
    """``check_datasets_present`` finished any overwrite a killed upload left half-done; one killed again
    before this run's reader lock was taken would have the run read old bytes under new hashes."""
    if folder.read_manifest().get("pending"):
        raise FastBackendError(
            f"dataset {folder.name!r}: an upload was cut short while committing; send the job again "
            "(it finishes that upload first)",
            code=ErrorCode.LOCKED,
        )


def report_datasets(config: TrainingConfig, folders: list[Path], warnings: list[str], progress: Progress) -> dict:
    """Each dataset's report (faces, sharpness, exposure, sizes, near-duplicates), by name. With
    ``require_faces``, photos with no face or another person's refuse the run before any download;
    without it, a face model that cannot load leaves the report out and training goes on."""
    from fastbackend.dataset_report import analyze

    progress({"stage": "analyzing_datasets"})
    reports = {}
    for index, (folder, dataset) in enumerate(zip(folders, config.process.datasets, strict=True)):
        field = f"{PREFIX}.datasets[{index}]"
        try:
            report = analyze(DatasetFolder(folder), dataset.resolution, images=False)  # analyze_dataset has rows
        except FastBackendError as exc:
            if dataset.require_faces or exc.code != ErrorCode.MODEL_LOAD_FAILED:
                raise
            warnings.append(f"{field}: no dataset report: {exc.message}")
            continue
        reports[folder.name] = report
        if dataset.require_faces and report["blocking"]:
            problems = [f"{field}.require_faces: {problem}" for problem in report["blocking"]]
            raise ValidationFailed.from_problems(problems, code=ErrorCode.INVALID_DATASET)
    return reports


def remove_if_nothing_saved(output: LoraFolder) -> None:
    """A run that failed before its first save leaves no model folder behind."""
    if output.path.is_dir() and not output.has_saves():
        shutil.rmtree(output.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            output.path.parent.rmdir()  # only when no other model is there


def run_training(
    config: TrainingConfig,
    request: TrainWithYamlRequest,
    datasets: list[Path],
    models: tuple[str, str | None],  # the base model and the training adapter, as resolved
    output: LoraFolder,
    warnings: list[str],
    progress: Progress | None,
) -> dict:
    base_model, assistant = models
    # torch comes in only here: a refused config is answered without it.
    import torch

    from fastbackend.training import distributed, pipeline_cache
    from fastbackend.training.run import Hooks, TrainJob, out_of_memory

    report = progress or (lambda info: None)
    plan = plan_memory(config, request, models, warnings)
    report({"stage": "planning", "memory_plan": plan.summary()})
    pipeline_cache.release()
    output.remove_temporaries()  # of a save a killed run left half-written
    if not request.resume:
        output.state.unlink(missing_ok=True)
    if request.yaml_config is not None:
        atomic_write_bytes(output.config, request.yaml_config.encode())
    job = TrainJob(config, base_model, datasets, output, request.resume, warnings, assistant_lora=assistant)
    try:
        hooks = Hooks(on_step=report, on_stage=report, should_stop=stopping.this_jobs_request())
        result, processes = distributed.train(job, hooks)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory() from None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the run's model is gone; give its cached blocks back for the next job
    answer = {
        "status": "success",
        "model": config.name,
        "lora_path": str(result.lora_path),
        "filename": result.lora_path.name,
        "size": result.lora_path.stat().st_size,
        "sha256": result.sha256,
        "arch": config.process.model.resolved_arch,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "final_loss": result.final_loss,
        "loss_history": result.loss_history,
        "duration_s": result.duration_s,
        "step_saves": [str(p) for p in result.saves],
        "samples": [str(p) for p in result.samples],
        "warnings": result.warnings,
        "likeness": result.likeness,
        "best_checkpoint": result.best_checkpoint,
        "stopped_early": result.stopped_early,
        "memory_plan": plan.summary(),
        "processes": processes,
    }
    if settings.bucket_configured():  # the LoRA goes to the bucket too; a failure keeps it on the volume
        report({"stage": "uploading", "step": result.steps})
        answer |= bucket.publish(output, result.lora_path, result.sha256)
    return answer


def plan_memory(
    config: TrainingConfig, request: TrainWithYamlRequest, models: tuple[str, str | None], warnings: list[str]
):
    """Apply the preset and plan the run's GPU memory, before anything is loaded or downloaded;
    a run that cannot fit the GPU (the visible one, or the request's ``gpu_memory_gb``) is
    refused with ``out_of_memory`` and what would make it fit."""
    from fastbackend.training.memory_plan import adapter_file_bytes, plan_run

    base_model, adapter = models[0], adapter_file_bytes(models[1])

    process = config.process
    if request.gpu_memory_gb is not None and process.train.preset != "auto":
        warnings.append(f"input.gpu_memory_gb: {PREFIX}.train.preset is not auto; only the memory plan uses it")
    gpu_gb = request.gpu_memory_gb or visible_gpu_gb(process.device)
    apply_preset(
        process, gpu_gb, warnings, fits=lambda candidate: plan_run(candidate, base_model, gpu_gb, adapter).fits
    )
    plan = plan_run(process, base_model, gpu_gb, adapter)
    if plan.fits is not False:
        return plan
    fixes = "; ".join(plan.suggestions) or "no change to this config fits it; use a GPU with more memory"
    verdict = (
        f"memory plan: this run needs about {plan.needed_gb:g} GB of GPU memory (its peak, {plan.peak_gb:g} GB "
        f"while {plan.phase}, with the CUDA context and allocator slack, counted from {plan.source}) "
        f"and the GPU has {plan.gpu_gb:g} GB; what would fit: {fixes}"
    )
    if plan.borrowed:  # another model's shapes: a guess about this one, not a reason to refuse it
        warnings.append(f"{verdict}; training anyway, since {base_model}'s own size is not known before its download")
        return plan
    details = [f"{name}: {gb:g} GB" for name, gb in plan.parts.items()]
    raise FastBackendError(verdict, details=details, code=ErrorCode.OUT_OF_MEMORY)


def visible_gpu_gb(device: str) -> float | None:
    """Memory of the GPU the config names, when there is one here."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    try:
        # Decimal GB, as cards are named: an "80GB" H100 reports 81,082 MiB, 85.0 GB, 79.2 GiB.
        return round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9, 1)
    except (RuntimeError, AssertionError):  # a device index this machine lacks: training falls back too
        return None


def resolve_datasets(config: TrainingConfig) -> list[Path]:
    """Each ``folder_path`` as an uploaded, non-empty dataset folder under the data root."""
    folders = dataset_paths(config)
    check_datasets_present(folders)
    return folders


def dataset_paths(config: TrainingConfig) -> list[Path]:
    """Each ``folder_path`` as a dataset folder under the data root; every problem at once."""
    folders, problems = [], []
    for index, dataset in enumerate(config.process.datasets):
        try:
            folders.append(dataset_folder(dataset.folder_path, f"{PREFIX}.datasets[{index}].folder_path"))
        except FastBackendError as exc:
            problems.append(exc.message)
    if problems:
        raise ValidationFailed.from_problems(problems, code=ErrorCode.INVALID_DATASET)
    return folders


def check_datasets_present(folders: list[Path]) -> None:
    """Each dataset uploaded and not empty; every problem at once, naming this worker's volume."""
    problems = []
    existing = list_names(datasets_dir())
    for index, folder in enumerate(folders):
        on_volume = DatasetFolder(folder)
        if folder.is_dir():
            recover_dataset(on_volume)
        if not on_volume.image_files():
            state = "is empty" if folder.is_dir() else "does not exist"
            problems.append(
                f"{PREFIX}.datasets[{index}].folder_path: dataset {folder.name!r} {state} on this worker's "
                f"{storage.volume_description()}; upload it first (datasets here: {existing or 'none'}); {NOT_SHARED}"
            )
    if problems:
        raise ValidationFailed.from_problems(problems, code=ErrorCode.INVALID_DATASET)


def dataset_folder(text: str, field: str) -> Path:
    """A bare dataset name, or a path that maps into ``<root>/training_data/``."""
    if name_problem(text) is None:
        return no_links(datasets_dir() / text)
    folder = map_user_path(text, field)
    if folder.parent != Path(datasets_dir()).resolve() or name_problem(folder.name) is not None:
        raise FastBackendError(
            f"{field}: {text!r} is not a dataset folder; use <data root>/training_data/<name> "
            "or just the dataset's name",
            code=ErrorCode.PATH_OUTSIDE_ROOT,
        )
    return no_links(datasets_dir() / folder.name)  # the path as named: a link on the way is refused


def resolve_output(config: TrainingConfig) -> LoraFolder:
    """``<root>/output/<name>``: ``training_folder`` must be the data root's output folder."""
    field = f"{PREFIX}.training_folder"
    folder = map_user_path(config.process.training_folder, field)
    if folder != Path(outputs_dir()).resolve():
        raise FastBackendError(
            f"{field}: must be the data root's output folder ('output'), got {config.process.training_folder!r}",
            code=ErrorCode.INVALID_CONFIG,
        )
    return LoraFolder(no_links(outputs_dir() / config.name))  # as named, not as links resolve it
