"""Every setting the worker reads from the environment, with its default: the only reader of it.

Settings are read when they are used, not at import, so a test or an operator can change one
without reloading modules. The README's configuration table lists exactly ``ALL`` (a test
compares them). ``check_all`` runs when the worker starts: a value that does not parse stops it
with a message naming the variable, before it takes a job.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
TRUE_WORDS = ("1", "true", "yes")


@dataclass(frozen=True)
class Setting(Generic[T]):
    env: str
    parse: Callable[[str], T]
    default: Callable[[], T]
    shown_default: str  # the default as the README's table writes it
    help: str

    def get(self) -> T:
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default()
        try:
            return self.parse(raw)
        except ValueError:
            raise ValueError(f"environment variable {self.env}={raw!r} is not valid: {self.help}") from None


def _flag(raw: str) -> bool:
    return raw in TRUE_WORDS  # exact words: a typo must not open the private-address guard


def _number(env: str, kind: Callable[[str], T], value: T, help: str) -> Setting[T]:
    return Setting(env, kind, lambda: value, f"`{value:g}`" if isinstance(value, float) else f"`{value}`", help)


DATA_DIR: Setting[Path | None] = Setting(
    "FASTBACKEND_DATA_DIR",
    lambda raw: Path(raw).absolute(),
    lambda: None,  # storage.data_root() decides: the RunPod volume when mounted, else ./data
    "`/runpod-volume` when it exists, else `./data`",
    "the data root: `training_data/`, `output/`, `huggingface-cache/hub/`",
)
RUN_LIMIT_BYTES = _number("FASTBACKEND_RUN_LIMIT_BYTES", int, 10_000_000, "payload limit for `/run` jobs")
RUNSYNC_LIMIT_BYTES = _number(
    "FASTBACKEND_RUNSYNC_LIMIT_BYTES", int, 20_000_000, "payload limit for `/runsync` (`sync-`) jobs"
)
PROGRESS_INTERVAL_S = _number(
    "FASTBACKEND_PROGRESS_INTERVAL_S", float, 5.0, "least time between two progress updates sent to RunPod"
)
LOCK_TIMEOUT_S = _number(
    "FASTBACKEND_LOCK_TIMEOUT_S",
    float,
    600.0,
    "how long a writer waits for another worker's lock on a dataset or model",
)
ALLOW_PRIVATE_URLS = Setting(
    "FASTBACKEND_ALLOW_PRIVATE_URLS",
    _flag,
    lambda: False,
    "unset",
    "`1` lets `urls` reach private and loopback addresses",
)
CPU_FALLBACK = Setting(
    "FASTBACKEND_CPU_FALLBACK",
    _flag,
    lambda: False,
    "unset",
    "`1` lets a job that asks for a GPU run on the CPU on RunPod too (rehearsals on a machine without one)",
)
MAX_IMAGE_PIXELS = _number("FASTBACKEND_MAX_IMAGE_PIXELS", int, 50_000_000, "largest image accepted, in pixels")
MIN_IMAGE_SIDE = _number("FASTBACKEND_MIN_IMAGE_SIDE", int, 256, "smallest shorter side accepted, in pixels")
MAX_IMAGE_BYTES = _number("FASTBACKEND_MAX_IMAGE_BYTES", int, 40_000_000, "largest image file accepted")
MAX_URL_BYTES = _number("FASTBACKEND_MAX_URL_BYTES", int, 500_000_000, "largest file fetched from one URL")
URL_TIMEOUT_S = _number("FASTBACKEND_URL_TIMEOUT_S", float, 60.0, "connect/read timeout for `urls`")
URL_DEADLINE_S = _number("FASTBACKEND_URL_DEADLINE_S", float, 300.0, "most time one URL may take, whole")
URLS_DEADLINE_S = _number(
    "FASTBACKEND_URLS_DEADLINE_S", float, 900.0, "most time all the `urls` of one request may take"
)
MAX_UPLOAD_BYTES = _number(
    "FASTBACKEND_MAX_UPLOAD_BYTES",
    int,
    2_000_000_000,
    "largest total of one upload's files, zips unpacked (staged on the volume while checked)",
)


def _folders(raw: str) -> tuple[Path, ...]:
    folders = tuple(Path(part) for part in raw.split(":") if part)
    if not all(folder.is_absolute() for folder in folders):
        raise ValueError("each folder must be an absolute path")
    return folders


MODEL_DIRS: Setting[tuple[Path, ...]] = Setting(
    "FASTBACKEND_MODEL_DIRS",
    _folders,
    lambda: (),
    "unset (the image sets `/models`)",
    "colon-separated read-only folders of models baked into the image; "
    "`name_or_path` may name a diffusers folder in them by absolute path",
)
DECODE_THREADS = Setting(
    "FASTBACKEND_DECODE_THREADS",
    int,
    lambda: os.cpu_count() or 1,
    "CPU count",
    "threads that decode a request's photos",
)


def _processes(raw: str) -> int:
    count = int(raw)
    if count < 1:
        raise ValueError(raw)
    return count


PROCESSES: Setting[int | None] = Setting(
    "FASTBACKEND_PROCESSES",
    _processes,
    lambda: None,
    "the visible GPUs",
    "training processes, one per GPU (data-parallel); 1 trains in the worker's own process",
)
CAPTION_MODEL = Setting(
    "FASTBACKEND_CAPTION_MODEL",
    str,
    lambda: "florence-community/Florence-2-large",
    "`florence-community/Florence-2-large`",
    "the Florence-2 checkpoint that writes automatic captions (`auto_caption`): a hub id or a folder",
)
DOWNLOAD_STALL_S = _number(
    "FASTBACKEND_DOWNLOAD_STALL_S", float, 120.0, "a hub download that receives nothing this long is tried again"
)
LOG_LEVEL = Setting("FASTBACKEND_LOG_LEVEL", str.upper, lambda: "INFO", "`INFO`", "log level")
HF_TOKEN: Setting[str | None] = Setting(
    "HF_TOKEN",
    str,
    lambda: None,
    "unset",
    "hub token for gated base models (FLUX.1-dev); never logged or returned",
)
BUCKET: Setting[str | None] = Setting(
    "FASTBACKEND_BUCKET",
    str,
    lambda: None,
    "unset",
    "the bucket finished LoRAs go to, with runpod's `BUCKET_*` variables; unset: no bucket",
)
BUCKET_ENDPOINT_URL: Setting[str | None] = Setting(
    "BUCKET_ENDPOINT_URL", str, lambda: None, "unset", "runpod's variable: the S3-compatible endpoint"
)
BUCKET_ACCESS_KEY_ID: Setting[str | None] = Setting(
    "BUCKET_ACCESS_KEY_ID", str, lambda: None, "unset", "runpod's variable: the bucket's access key"
)
BUCKET_SECRET_ACCESS_KEY: Setting[str | None] = Setting(
    "BUCKET_SECRET_ACCESS_KEY",
    str,
    lambda: None,
    "unset",
    "runpod's variable: the bucket's secret key; never logged or returned",
)
BUCKET_URL_EXPIRY_S = _number(
    "FASTBACKEND_BUCKET_URL_EXPIRY_S", int, 604_800, "how long a `download_url` works (S3 allows 7 days at most)"
)
BUCKET_TIMEOUT_S = _number(
    "FASTBACKEND_BUCKET_TIMEOUT_S", float, 30.0, "connect/read timeout for the bucket (2 tries in all)"
)
BUCKET_SETTINGS = (BUCKET, BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY)

ALL: tuple[Setting, ...] = (
    DATA_DIR,
    RUN_LIMIT_BYTES,
    RUNSYNC_LIMIT_BYTES,
    PROGRESS_INTERVAL_S,
    LOCK_TIMEOUT_S,
    ALLOW_PRIVATE_URLS,
    CPU_FALLBACK,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    MAX_IMAGE_BYTES,
    MAX_URL_BYTES,
    URL_TIMEOUT_S,
    URL_DEADLINE_S,
    URLS_DEADLINE_S,
    MAX_UPLOAD_BYTES,
    MODEL_DIRS,
    DECODE_THREADS,
    PROCESSES,
    CAPTION_MODEL,
    DOWNLOAD_STALL_S,
    LOG_LEVEL,
    HF_TOKEN,
    BUCKET,
    BUCKET_ENDPOINT_URL,
    BUCKET_ACCESS_KEY_ID,
    BUCKET_SECRET_ACCESS_KEY,
    BUCKET_URL_EXPIRY_S,
    BUCKET_TIMEOUT_S,
)


# Variables an older worker read, and what replaced them: setting one must not be silently ignored.
RETIRED = {"FASTBACKEND_MAX_ZIP_UNPACKED_BYTES": "FASTBACKEND_MAX_UPLOAD_BYTES (a cap per upload, not per zip)"}


def check_all() -> None:
    """Read every setting once; raises ValueError naming the first variable that does not parse."""
    for old, new in RETIRED.items():
        if os.environ.get(old, "").strip():
            raise ValueError(f"environment variable {old} is no longer read; use {new}")
    for setting in ALL:
        setting.get()
    endpoint = BUCKET_ENDPOINT_URL.get()
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"environment variable {BUCKET_ENDPOINT_URL.env}={endpoint!r} must start with https://")
    if BUCKET_TIMEOUT_S.get() <= 0:
        raise ValueError(f"environment variable {BUCKET_TIMEOUT_S.env} must be above 0 seconds")
    # FASTBACKEND_BUCKET is the switch: runpod's BUCKET_* variables alone may serve something else.
    missing = [setting.env for setting in BUCKET_SETTINGS if not setting.get()]
    if BUCKET.get() and missing:
        raise ValueError(
            f"a bucket needs all of {', '.join(s.env for s in BUCKET_SETTINGS)}; missing: {', '.join(missing)}"
        )
    if not 1 <= BUCKET_URL_EXPIRY_S.get() <= 604_800:
        raise ValueError(f"environment variable {BUCKET_URL_EXPIRY_S.env} must be 1 to 604800 seconds (S3's limit)")


def bucket_configured() -> bool:
    return all(setting.get() for setting in BUCKET_SETTINGS)


# RunPod's own variables, which this worker reads but does not define.
def on_runpod() -> bool:
    """Whether the worker runs on a RunPod endpoint (progress updates have somewhere to go)."""
    return bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))


def datacenter() -> str | None:
    """The data centre RunPod placed this worker in (``RUNPOD_DC_ID``), when it says."""
    return os.environ.get("RUNPOD_DC_ID") or None


def runpod_log_level_set() -> bool:
    """Whether the operator asked for a runpod SDK log level (then the worker leaves it alone)."""
    return bool(os.environ.get("RUNPOD_LOG_LEVEL") or os.environ.get("RUNPOD_DEBUG_LEVEL"))
