"""Uploads are bounded: memory holds a chunk and one image per thread whatever the request brings,
and the bytes one request may bring are capped as a whole (zips unpacked, URLs, inline files)."""

from __future__ import annotations

import io
import os
import tracemalloc
import zipfile

import pytest

from tests.photos import b64, nine_photos
from tests.test_upload import file_entries, make_zip, nothing_stored, upload

ZEROS_MB = 8


def zeros_zip(entries: int, megabytes: int = ZEROS_MB) -> bytes:
    """A small zip that unpacks to ``entries`` files of zeros named like photos (each under the per-file limit)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(entries):
            archive.writestr(f"IMG_{index:04d}.jpg", bytes(megabytes << 20))
    assert len(out.getvalue()) < entries * (megabytes << 20) // 500  # a bomb: small in, large out
    return out.getvalue()


def traced_peak_mb(action) -> tuple[object, float]:
    tracemalloc.start()
    try:
        result = action()
        return result, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_of_zeros_is_unpacked_a_chunk_at_a_time(data_root):
    archive = b64(zeros_zip(12))  # 12 x 8 MB = 96 MB unpacked from a zip of about 100 KB
    answer, peak_mb = traced_peak_mb(lambda: upload(zip=archive))
    assert answer["error_code"] == "invalid_upload"
    assert len(answer["details"]) == 12 and "not an image Pillow can decode" in answer["details"][0]
    assert peak_mb < 8, f"peak {peak_mb:.1f} MB of Python memory for a 96 MB unpacked upload"
    assert nothing_stored(data_root)


def test_many_urls_to_one_zip_stay_bounded_in_memory(http_root, data_root, monkeypatch):
    served, base = http_root
    (served / "zeros.zip").write_bytes(zeros_zip(4))
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    answer, peak_mb = traced_peak_mb(lambda: upload(urls=[f"{base}/zeros.zip"] * 5))  # 160 MB unpacked
    assert answer["error_code"] == "invalid_upload" and len(answer["details"]) == 20
    assert peak_mb < 8, f"peak {peak_mb:.1f} MB of Python memory for 5 URLs of a 32 MB unpacked zip"
    assert nothing_stored(data_root)


def test_the_limit_counts_the_whole_request_not_each_zip(data_root, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_MAX_UPLOAD_BYTES", str(3 << 20))
    data = nine_photos()[0][1]
    archive = make_zip({f"IMG_{i:04d}.jpg": bytes(1 << 20) for i in range(3)})  # 3 MB: fits alone
    answer = upload(files=file_entries(nine_photos()[:1]), zip=b64(archive))
    assert answer["details"] == [
        f"input.zip: unpacks to {3 << 20:,} bytes (with the request's other {len(data):,}), "
        f"over the {3 << 20:,}-byte limit per upload"
    ]
    assert nothing_stored(data_root)


def test_a_body_that_passes_the_request_limit_stops_gathering(http_root, data_root, monkeypatch):
    served, base = http_root
    photos = nine_photos()
    for name, data, _ in photos[:3]:
        (served / name).write_bytes(data)
    limit = len(photos[0][1]) + len(photos[1][1]) // 2
    monkeypatch.setenv("FASTBACKEND_MAX_UPLOAD_BYTES", str(limit))
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    answer = upload(urls=[f"{base}/{name}" for name, _, _ in photos[:3]])
    assert answer["details"] == [
        f"input.urls[1] ({base}/{photos[1][0]}): the request's files come to over {limit:,} bytes, "
        "the limit per upload (FASTBACKEND_MAX_UPLOAD_BYTES); send them in several requests"
    ]
    assert nothing_stored(data_root)


def test_staged_files_are_renamed_into_the_dataset_and_the_staging_folder_goes(data_root):
    assert upload(files=file_entries(nine_photos()[:2]))["status"] == "success"
    folder = data_root / "training_data"
    assert sorted(p.name for p in folder.iterdir()) == ["matt"]
    stored = {p.name: p.read_bytes() for p in (folder / "matt").glob("*.jpg")}
    assert stored == {name: data for name, data, _ in nine_photos()[:2]}


def test_a_killed_uploads_staging_folder_is_removed_by_the_next_upload_and_a_live_one_is_kept(data_root):
    from fastbackend.storage import locked

    dead = data_root / "training_data" / ".incoming-dead"
    dead.mkdir(parents=True)
    (dead / ".lock").touch()  # its owner died: nobody holds the flock
    (dead / "00001").write_bytes(b"half an upload")
    os.utime(dead, (0, 0))
    live = data_root / "training_data" / ".incoming-live"
    with locked(live):  # another worker's upload, still running (and quiet for a while)
        (live / "00001").write_bytes(b"in progress")
        os.utime(live, (0, 0))
        assert upload(files=file_entries(nine_photos()[:1]))["status"] == "success"
        assert not dead.exists()
        assert (live / "00001").read_bytes() == b"in progress"


def test_a_staging_folder_that_changed_recently_is_left_alone_lock_or_not(data_root):
    """An owner between creating its folder and locking it, or on a volume whose locks do not
    reach across hosts, is still alive: only a free lock and ten quiet minutes make a folder dead."""
    young = data_root / "training_data" / ".incoming-young"
    young.mkdir(parents=True)
    young_unlocked = data_root / "training_data" / ".incoming-young-unlocked"
    young_unlocked.mkdir()
    (young_unlocked / ".lock").touch()
    old = data_root / "training_data" / ".incoming-old"  # a cleanup killed after removing the lock
    old.mkdir()
    (old / "00001").write_bytes(b"left")
    os.utime(old, (0, 0))
    assert upload(files=file_entries(nine_photos()[:1]))["status"] == "success"
    assert young.exists() and young_unlocked.exists() and not old.exists()


def test_a_staging_folder_that_vanishes_during_the_cleanup_is_no_error(data_root, monkeypatch):
    """Another worker's upload finishing between the listing and the look is the common case."""
    from pathlib import Path

    from fastbackend import storage

    parent = data_root / "training_data"
    parent.mkdir(parents=True)
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([self / ".incoming-gone"]))
    storage.remove_abandoned(parent, ".incoming-", 600)


def test_a_link_planted_in_the_staging_folder_is_refused_and_nothing_is_written_through_it(
    data_root, tmp_path, monkeypatch
):
    from fastbackend import staging

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    real_enter = staging.Staging.__enter__

    def plant(self):
        entered = real_enter(self)
        (self.folder / "00001").symlink_to(outside)
        return entered

    monkeypatch.setattr(staging.Staging, "__enter__", plant)
    answer = upload(files=file_entries(nine_photos()[:1]))
    assert answer["error_code"] == "path_outside_root", answer
    assert outside.read_bytes() == b"precious"
    assert nothing_stored(data_root)


def test_a_full_volume_while_unpacking_is_disk_full_not_a_damaged_entry(data_root, monkeypatch):
    import errno

    from fastbackend import staging

    def no_room(self, chunk):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging.StagedFile, "write", no_room)
    answer = upload(zip=b64(make_zip({name: data for name, data, _ in nine_photos()[:3]})))
    assert answer["error_code"] == "disk_full", answer
    assert nothing_stored(data_root)


def test_the_file_count_is_checked_from_the_zip_headers_before_unpacking(data_root, monkeypatch):
    from fastbackend import staging

    created = []
    real_init = staging.StagedFile.__init__
    monkeypatch.setattr(staging.StagedFile, "__init__", lambda self, *a: (created.append(1), real_init(self, *a)))
    archive = make_zip({f"IMG_{i:05d}.jpg": b"" for i in range(staging.MAX_FILES_PER_REQUEST + 1)})
    answer = upload(zip=b64(archive))
    assert answer["details"] == [
        "input.zip: 2,001 files in one request is over the limit of 2,000; send them in several requests"
    ]
    assert created == [] and nothing_stored(data_root)


def test_a_photo_rewritten_upright_counts_its_new_size(data_root, monkeypatch):
    from PIL import Image

    from tests.photos import photo

    with Image.open(io.BytesIO(photo(600, 400, orientation=6))) as image:
        out = io.BytesIO()  # a small file: the upright copy, at the worker's quality, is larger
        image.save(out, "JPEG", quality=20, exif=image.info["exif"])
    rotated = out.getvalue()
    monkeypatch.setenv("FASTBACKEND_MAX_UPLOAD_BYTES", str(len(rotated)))
    answer = upload(files=[{"filename": "IMG_0001.jpg", "content": b64(rotated)}])
    assert answer["error_code"] == "invalid_upload"
    assert "the limit per upload" in answer["error"]


def test_a_zip_counts_the_same_inline_and_behind_a_url(http_root, data_root, monkeypatch):
    served, base = http_root
    entries = {name: data for name, data, _ in nine_photos()[:2]}
    (served / "two.zip").write_bytes(make_zip(entries))
    monkeypatch.setenv("FASTBACKEND_MAX_UPLOAD_BYTES", str(sum(len(d) for d in entries.values())))
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    assert upload(name="inline", zip=b64(make_zip(entries)))["status"] == "success"
    assert upload(name="by_url", urls=[f"{base}/two.zip"])["status"] == "success"


def test_a_caption_file_longer_than_any_caption_is_refused_unread(data_root):
    from fastbackend.datasets import MAX_CAPTION_FILE_BYTES

    name, data, _ = nine_photos()[0]
    archive = make_zip({name: data, "IMG_0000.txt": b"a" * (MAX_CAPTION_FILE_BYTES + 1)})
    answer = upload(zip=b64(archive))
    assert answer["details"] == [
        f"input.zip:IMG_0000.txt: caption file is {MAX_CAPTION_FILE_BYTES + 1:,} bytes, "
        "longer than a caption of 4000 characters can be"
    ]


def test_an_entry_longer_than_its_header_says_is_refused(data_root):
    """zipfile stops at the declared size and checks the CRC: a lying entry never streams past it."""
    name, data, _ = nine_photos()[0]
    raw = bytearray(make_zip({name: data}))
    header = raw.rfind(b"PK\x01\x02")  # the central directory entry: its uncompressed size at +24
    raw[header + 24 : header + 28] = (1000).to_bytes(4, "little")
    answer = upload(zip=b64(bytes(raw)))
    assert answer["error_code"] == "invalid_upload"
    assert "could not be unpacked" in answer["error"]
    assert nothing_stored(data_root)


def test_the_retired_zip_limit_variable_stops_the_worker_naming_its_successor(monkeypatch):
    from fastbackend import settings

    monkeypatch.setenv("FASTBACKEND_MAX_ZIP_UNPACKED_BYTES", "1000")
    with pytest.raises(
        ValueError, match="FASTBACKEND_MAX_ZIP_UNPACKED_BYTES is no longer read; use FASTBACKEND_MAX_UPLOAD_BYTES"
    ):
        settings.check_all()
