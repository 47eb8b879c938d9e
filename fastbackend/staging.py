"""One upload's files on the volume while they are checked: ``training_data/.incoming-<id>/``.

Every file a request brings (inline, a zip entry, a URL's body) streams in a chunk at a time, so
memory holds a chunk (and, while checking, a decoded image per thread) whatever the request
brings. Files are created by the worker under its own numbers (never a name from the request),
exclusively and without following links. Together they may not pass
``settings.MAX_UPLOAD_BYTES`` nor ``MAX_FILES_PER_REQUEST``; a zip's own bytes do not count, its
entries do. Accepted images are renamed out of the folder into their dataset (the same volume:
no copy); the folder is removed when the upload ends. A killed worker's folder is removed by a
later upload (``storage.remove_abandoned``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastbackend import settings, stopping
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.storage import disk_full, free_bytes, locked, remove_abandoned

PREFIX = ".incoming-"
MAX_FILES_PER_REQUEST = 2000
ZIP_MAGIC = b"PK\x03\x04"
# A live upload touches its folder at least this often; one left alone ten times as long, with
# its lock free, is a dead worker's.
HEARTBEAT_S = 60.0
ABANDONED_AFTER_S = 10 * HEARTBEAT_S
LIMIT_SETTING = settings.MAX_UPLOAD_BYTES.env


class OverLimit(FastBackendError):
    """The request passes a limit for a whole upload: it is refused at once, nothing more is read."""

    code = ErrorCode.INVALID_UPLOAD


@dataclass
class RawFile:
    """A file as it arrived, staged before any check; ``source`` says where it came from, for errors."""

    filename: str
    path: Path
    size: int
    sha256: str
    source: str


class StagedFile:
    """A file streaming into the staging folder: hashed, and counted against the request's limit."""

    def __init__(self, staging: Staging, path: Path, source: str, may_be_zip: bool):
        self.staging = staging
        self.path = path
        self.source = source
        self.size = 0
        self.counted = True
        self.may_be_zip = may_be_zip
        self.digest = hashlib.sha256()
        self.handle = os.fdopen(_create(path), "wb")

    def write(self, chunk: bytes) -> None:
        stopping.stop_if_requested("the upload was")  # the staging folder goes; nothing was committed
        if self.size == 0 and self.may_be_zip and chunk.startswith(ZIP_MAGIC):
            self.counted = False  # a zip behind a URL: its entries count as they unpack
        if self.counted:
            self.staging.take(len(chunk), self.source)
        self.size += len(chunk)
        self.digest.update(chunk)
        self.handle.write(chunk)

    def raw(self, filename: str, source: str) -> RawFile:
        return RawFile(filename, self.path, self.size, self.digest.hexdigest(), source)


def _create(path: Path) -> int:
    """A new file the worker alone made: anything already there (a planted file or link) is refused."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise FastBackendError(
            f"staging file {path.name!r} existed before the worker created it (planted on the volume); "
            "nothing was written through it",
            code=ErrorCode.PATH_OUTSIDE_ROOT,
        ) from None


class Staging:
    """The staging folder of one upload, as a context manager (see the module's docstring)."""

    def __init__(self, parent: Path):
        self.parent = parent
        self.folder = parent / f"{PREFIX}{secrets.token_hex(8)}"
        self.limit = settings.MAX_UPLOAD_BYTES.get()
        self.used = 0
        self.files = 0
        self._touched = time.monotonic()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Staging:
        remove_abandoned(self.parent, PREFIX, ABANDONED_AFTER_S)
        self._stack.enter_context(locked(self.folder, timeout_s=0))
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # before the lock goes: no one sees it unowned
        self._stack.close()

    def take(self, size: int, source: str) -> None:
        """Count ``size`` more bytes from ``source``; over the limit, the upload stops."""
        self.used += size
        if self.used > self.limit:
            raise OverLimit(
                f"{source}: the request's files come to over {self.limit:,} bytes, the limit per upload "
                f"({LIMIT_SETTING}); send them in several requests"
            )
        self.touch()

    def expect_files(self, count: int, source: str) -> None:
        """Refuse ``count`` more files when the request would pass the per-request file count."""
        if self.files + count > MAX_FILES_PER_REQUEST:
            raise OverLimit(
                f"{source}: {self.files + count:,} files in one request is over the limit of "
                f"{MAX_FILES_PER_REQUEST:,}; send them in several requests"
            )

    def check_room(self, size: int) -> None:
        """Refuse ``size`` bytes the volume has no room for before they come (``disk_full``, with
        what is needed and free); a full volume found while writing is answered the same way."""
        if size > free_bytes():
            raise disk_full(size)

    def touch(self) -> None:
        """Tell other workers this folder is alive (see ``storage.remove_abandoned``)."""
        if time.monotonic() - self._touched > HEARTBEAT_S:
            os.utime(self.folder)
            self._touched = time.monotonic()

    @contextlib.contextmanager
    def new_file(
        self, source: str, expected_bytes: int | None = None, may_be_zip: bool = False
    ) -> Iterator[StagedFile]:
        """A new staged file; removed again (its bytes given back) when the block fails."""
        if expected_bytes is not None:
            self.check_room(expected_bytes)
        self.expect_files(1, source)
        self.files += 1
        staged = StagedFile(self, self.folder / f"{self.files:05d}", source, may_be_zip)
        try:
            with staged.handle:
                yield staged
        except BaseException:
            self.discard(staged)
            raise

    def discard(self, staged: StagedFile) -> None:
        staged.path.unlink(missing_ok=True)
        if staged.counted:
            self.used -= staged.size

    def add_bytes(self, filename: str, data: bytes, source: str) -> RawFile:
        with self.new_file(source, len(data)) as staged:
            staged.write(data)
        return staged.raw(filename, source)
