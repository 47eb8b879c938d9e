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
    assert answer["details"] == [f"input: the request's files come to over {limit:,} bytes, the limit per upload"]
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
    live = data_root / "training_data" / ".incoming-live"
    with locked(live):  # another worker's upload, still running
        (live / "00001").write_bytes(b"in progress")
        assert upload(files=file_entries(nine_photos()[:1]))["status"] == "success"
        assert not dead.exists()
        assert (live / "00001").read_bytes() == b"in progress"


def test_a_staging_folder_without_a_lock_is_left_alone_while_it_may_be_setting_up(data_root):
    young = data_root / "training_data" / ".incoming-young"
    young.mkdir(parents=True)
    old = data_root / "training_data" / ".incoming-old"
    old.mkdir()
    os.utime(old, (0, 0))
    assert upload(files=file_entries(nine_photos()[:1]))["status"] == "success"
    assert young.exists() and not old.exists()


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
