"""upload_training_data, list_datasets, delete_dataset: whole photos, checked, safe on the volume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from handler_fast import handler
from tests.photos import b64, nine_photos, photo, png_bomb

REPO = Path(__file__).resolve().parent.parent


def call(**payload):
    return handler({"id": "t", "input": payload})


def upload(name="matt", **payload):
    return call(type="upload_training_data", training_name=name, **payload)


def file_entries(photos):
    return [{"filename": name, "content": b64(data), "caption": caption} for name, data, caption in photos]


def snapshot(root: Path) -> dict[str, int | str]:
    """Every file (by size) and folder under ``root``."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): "dir" if p.is_dir() else p.stat().st_size for p in root.rglob("*")}


def nothing_stored(root: Path) -> bool:
    """No file and no dataset folder: at most the bare ``training_data`` folder an upload stages in."""
    return snapshot(root) in ({}, {"training_data": "dir"})


def make_zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return out.getvalue()


def test_nine_photos_in_two_requests_build_one_dataset(data_root):
    photos = nine_photos()
    first = upload(files=file_entries(photos[:5]))
    # The second request sends captions kohya-style, as IMG_xxxx.txt files.
    second_files = [{"filename": n, "content": b64(d)} for n, d, _ in photos[5:]]
    second_files += [{"filename": n.rsplit(".", 1)[0] + ".txt", "content": b64(c.encode())} for n, _, c in photos[5:]]
    second = upload(files=second_files)
    assert first["status"] == second["status"] == "success"
    assert (first["total_images"], second["total_images"]) == (5, 9)
    assert second["warnings"] == [] and second["skipped"] == []
    folder = data_root / "training_data" / "matt"
    assert second["training_folder"] == str(folder)
    manifest = json.loads((folder / "manifest.json").read_text())["images"]
    assert sorted(manifest) == sorted(n for n, _, _ in photos)
    for name, _, caption in photos:
        assert (folder / name.rsplit(".", 1)[0]).with_suffix(".txt").read_text() == caption
        assert manifest[name]["caption"] == caption
    # EXIF orientation 6 (rotate 90°) turns the 800x600 photo upright: 600x800.
    rotated = next(f for f in first["uploaded_files"] if f["filename"] == "IMG_0003.jpg")
    assert (rotated["width"], rotated["height"]) == (600, 800)
    with Image.open(folder / "IMG_0003.jpg") as stored:
        assert stored.size == (600, 800) and stored.getexif().get(0x0112, 1) == 1
    plain = next(f for f in first["uploaded_files"] if f["filename"] == "IMG_0000.jpg")
    assert (folder / "IMG_0000.jpg").read_bytes() == photos[0][1]
    assert plain["size"] == len(photos[0][1]) and plain["path"] == str(folder / "IMG_0000.jpg")


def test_one_zip_with_nested_folders_and_captions(data_root):
    entries = {f"trip/{name}": data for name, data, _ in nine_photos()}
    entries |= {f"trip/{name.rsplit('.', 1)[0]}.txt": c.encode() for name, _, c in nine_photos()}
    entries |= {"__MACOSX/trip/._IMG_0000.jpg": b"junk", "trip/.DS_Store": b"junk"}
    answer = upload(zip=b64(make_zip(entries)))
    assert answer["total_images"] == 9 and len(answer["uploaded_files"]) == 9 and answer["warnings"] == []


def test_missing_captions_are_allowed_and_reported():
    name, data, _ = nine_photos()[0]
    answer = upload(files=[{"filename": name, "content": b64(data)}])
    assert answer["status"] == "success"
    assert answer["warnings"] == ["1 image(s) have no caption: IMG_0000.jpg"]


def test_duplicates_are_skipped_not_stored_twice(data_root):
    name, data, caption = nine_photos()[0]
    upload(files=[{"filename": name, "content": b64(data), "caption": caption}])
    again = upload(
        files=[{"filename": "copy.jpg", "content": b64(data)}, {"filename": "copy2.jpg", "content": b64(data)}]
    )
    assert again["uploaded_files"] == []
    assert again["skipped"] == [
        {"filename": "copy2.jpg", "reason": "duplicate of 'copy.jpg' (same bytes)"},
        {"filename": "copy.jpg", "reason": "duplicate of 'IMG_0000.jpg' already in the dataset"},
    ]
    assert again["total_images"] == 1
    assert not (data_root / "training_data" / "matt" / "copy.jpg").exists()


def test_replace_mode_keeps_only_the_new_request():
    photos = nine_photos()
    upload(files=file_entries(photos[:3]))
    answer = upload(files=file_entries(photos[3:4]), mode="replace")
    assert answer["total_images"] == 1
    listing = call(type="list_datasets")["datasets"][0]
    assert (listing["name"], listing["image_count"], listing["captioned_count"]) == ("matt", 1, 1)
    folder = Path(answer["training_folder"])
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "IMG_0003.jpg", "IMG_0003.txt", "manifest.json"]


def test_urls_fetch_images_and_zips_when_private_addresses_are_allowed(http_root, monkeypatch):
    served, base = http_root
    photos = nine_photos()
    for name, data, _ in photos[:4]:
        (served / name).write_bytes(data)
    (served / "rest.zip").write_bytes(make_zip({n: d for n, d, _ in photos[4:]}))
    urls = [f"{base}/{n}" for n, _, _ in photos[:4]] + [f"{base}/rest.zip?token=secret"]
    monkeypatch.setenv("FASTBACKEND_ALLOW_PRIVATE_URLS", "1")
    answer = upload(urls=urls)
    assert answer["status"] == "success", answer
    assert answer["total_images"] == 9


def test_urls_to_loopback_are_refused_by_default(http_root, data_root):
    served, base = http_root
    name, data, _ = nine_photos()[0]
    (served / name).write_bytes(data)
    answer = upload(urls=[f"{base}/{name}?token=secret", "file:///etc/passwd", f"{base}/missing.jpg"])
    assert answer["error_code"] == "invalid_upload"
    assert answer["details"] == [
        f"input.urls[0] ({base}/{name}): host '127.0.0.1' is a private or local address (127.0.0.1); "
        "set FASTBACKEND_ALLOW_PRIVATE_URLS=1 on the worker to allow it",
        "input.urls[1] ('file:///etc/passwd'): scheme 'file' is not allowed; use http or https",
        f"input.urls[2] ({base}/missing.jpg): host '127.0.0.1' is a private or local address (127.0.0.1); "
        "set FASTBACKEND_ALLOW_PRIVATE_URLS=1 on the worker to allow it",
    ]
    assert "secret" not in json.dumps(answer)
    assert nothing_stored(data_root)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "", ".hidden", "ＭＡＴＴ", "x" * 65, "a\x00b"])  # noqa: RUF001 - fullwidth on purpose
def test_unsafe_names_are_refused_with_the_name_quoted(name, data_root):
    good = nine_photos()[0]
    for answer in (
        upload(name=name, files=file_entries([good])),
        upload(files=[{"filename": name, "content": b64(good[1])}]),
    ):
        assert answer["error_code"] == "validation_error"
        assert repr(name)[:40] in answer["error"] or "<string of" in answer["error"]
    assert nothing_stored(data_root)


def test_one_bad_file_refuses_the_whole_request_and_lists_every_problem(data_root, monkeypatch):
    monkeypatch.setenv("FASTBACKEND_MAX_IMAGE_PIXELS", "1000000")
    good = file_entries(nine_photos()[:2])
    jpeg = photo(640, 480)
    bad = [
        {"filename": "notbase64.jpg", "content": "%%%"},
        {"filename": "text.jpg", "content": b64(b"hello, not an image")},
        {"filename": "truncated.jpg", "content": b64(jpeg[: len(jpeg) // 2])},
        {"filename": "tiny.png", "content": b64(photo(100, 80, "PNG"))},
        {"filename": "big.png", "content": b64(photo(1200, 1000, "PNG"))},
        {"filename": "bomb.png", "content": b64(png_bomb())},
        {"filename": "script.sh", "content": b64(b"echo hi")},
        {"filename": "gif.jpg", "content": b64(_gif())},
        {"filename": "latin1.txt", "content": b64("Matt, caf\xe9".encode("latin-1"))},
        {"filename": "orphan.txt", "content": b64(b"a caption for nothing")},
    ]
    answer = upload(files=good + bad)
    assert answer["error_code"] == "invalid_upload"
    assert answer["error"].startswith("input.files[2] ('notbase64.jpg'): content is not valid base64 (and 9 more")
    assert answer["details"] == [
        "input.files[2] ('notbase64.jpg'): content is not valid base64",
        "input.files[3] ('text.jpg'): not an image Pillow can decode",
        answer["details"][2],  # Pillow's wording of the truncation, pinned below by its start
        "input.files[5] ('tiny.png'): 100x80 is too small: the shorter side must be >= 256 px",
        "input.files[6] ('big.png'): 1200x1000 is over the 1,000,000-pixel limit",
        "input.files[7] ('bomb.png'): too many pixels (over 1,000,000): refused as a possible decompression bomb",
        "input.files[8] ('script.sh'): 'script.sh' is neither an image (.jpg, .jpeg, .png, .webp) nor a caption (.txt)",
        "input.files[9] ('gif.jpg'): format GIF is not accepted; use one of JPEG, PNG, WEBP",
        "input.files[10] ('latin1.txt'): caption is not UTF-8 text",
        "caption 'orphan.txt': no image named 'orphan' in this request or the dataset",
    ]
    assert answer["details"][2].startswith(
        "input.files[4] ('truncated.jpg'): could not be decoded (image file is truncated"
    )
    assert nothing_stored(data_root)


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 300)).save(out, format="GIF")
    return out.getvalue()


def test_unsafe_zip_entries_are_refused(data_root):
    name, data, _ = nine_photos()[0]
    archive = make_zip({name: data, "../evil.jpg": data, "/abs.jpg": data}, symlink="link.jpg")
    answer = upload(zip=b64(archive))
    assert answer["details"] == [
        "input.zip: entry '../evil.jpg' has an absolute or parent (..) path",
        "input.zip: entry '/abs.jpg' has an absolute or parent (..) path",
        "input.zip: entry 'link.jpg' is a symbolic link",
    ]
    assert upload(zip=b64(b"not a zip"))["error"] == "input.zip: not a valid zip file"
    assert upload(zip="@@")["error"] == "input.zip: not valid base64"
    assert nothing_stored(data_root)


def test_zip_entries_over_the_file_limit_are_refused_before_unpacking(monkeypatch, data_root):
    monkeypatch.setenv("FASTBACKEND_MAX_IMAGE_BYTES", "1000")
    answer = upload(zip=b64(make_zip({"big.jpg": b"\0" * 5000})))
    assert answer["error"] == "input.zip: entry 'big.jpg' unpacks to 5,000 bytes, over the 1,000-byte limit per file"
    assert nothing_stored(data_root)


def test_zip_over_the_unpacked_limit_is_refused(monkeypatch, data_root):
    monkeypatch.setenv("FASTBACKEND_MAX_UPLOAD_BYTES", "1000")
    answer = upload(zip=b64(make_zip({"a.jpg": b"\0" * 5000})))
    assert answer["error"] == "input.zip: unpacks to 5,000 bytes, over the 1,000-byte limit per upload"
    assert nothing_stored(data_root)


def test_refusals_leave_an_existing_dataset_unchanged(data_root):
    upload(files=file_entries(nine_photos()[:2]))
    before = snapshot(data_root)
    answer = upload(files=[*file_entries(nine_photos()[2:4]), {"filename": "x.jpg", "content": b64(b"junk")}])
    assert answer["status"] == "error"
    assert snapshot(data_root) == before


def test_too_long_caption_is_refused(data_root):
    name, data, _ = nine_photos()[0]
    answer = upload(files=[{"filename": name, "content": b64(data), "caption": "x" * 4001}])
    assert (
        answer["error"]
        == "input.files[0].caption: string should have at most 4000 characters, got <string of 4001 characters>"
    )
    answer = upload(
        files=[{"filename": name, "content": b64(data)}, {"filename": "IMG_0000.txt", "content": b64(b"y" * 4001)}]
    )
    assert answer["error"] == "caption for 'IMG_0000': 4001 characters is over the limit of 4000"
    assert nothing_stored(data_root)


def test_nothing_to_upload_is_refused():
    assert upload()["error"] == "input: nothing to upload: give at least one of `files`, `urls` or `zip`"


def test_leftovers_of_a_killed_upload_are_never_listed_and_are_cleaned(data_root):
    upload(files=file_entries(nine_photos()[:1]))
    folder = data_root / "training_data" / "matt"
    # A worker killed mid-upload: an image renamed into place but never committed to the
    # manifest, and a temporary file still being written.
    (folder / "IMG_0005.png").write_bytes(nine_photos()[5][1])
    (folder / ".IMG_0006.jpg.abc.tmp").write_bytes(b"half")
    assert call(type="list_datasets")["datasets"][0]["image_count"] == 1
    upload(files=file_entries(nine_photos()[1:2]))
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock",
        "IMG_0000.jpg",
        "IMG_0000.txt",
        "IMG_0001.jpg",
        "IMG_0001.txt",
        "manifest.json",
    ]


def test_list_and_delete_datasets(data_root):
    upload(files=file_entries(nine_photos()[:3]))
    upload(name="other", files=[{"filename": "a.png", "content": b64(photo(300, 300, "PNG", seed=42))}])
    listing = call(type="list_datasets")
    assert [d["name"] for d in listing["datasets"]] == ["matt", "other"] and listing["total_count"] == 2
    matt = listing["datasets"][0]
    assert (matt["image_count"], matt["captioned_count"]) == (3, 3)
    assert matt["total_bytes"] == sum(len(d) for _, d, _ in nine_photos()[:3])  # none of them is rotated
    assert call(type="delete_dataset", training_name="matt") == {"status": "success", "deleted": "matt", "images": 3}
    assert [d["name"] for d in call(type="list_datasets")["datasets"]] == ["other"]
    missing = call(type="delete_dataset", training_name="matt")
    assert missing["error"] == "dataset 'matt' does not exist; existing datasets: ['other']"


def test_listings_leave_out_folders_made_by_hand_that_no_request_could_name(data_root):
    upload(files=file_entries(nine_photos()[:1]))
    (data_root / "training_data" / "my photos").mkdir()  # a space: outside the name rule
    (data_root / "output" / "my lora").mkdir(parents=True)
    assert [d["name"] for d in call(type="list_datasets")["datasets"]] == ["matt"]
    assert call(type="list_models")["models"] == []


APPEND_SCRIPT = """
import sys, time
from fastbackend.layout import DatasetFolder
from handler_fast import handler
from tests.photos import b64, nine_photos

read_manifest = DatasetFolder.read_manifest

def slow_read(self):  # widen the window between reading the manifest and writing it back
    manifest = read_manifest(self)
    time.sleep(0.5)
    return manifest

DatasetFolder.read_manifest = slow_read
photos = nine_photos()
part = photos[:5] if sys.argv[1] == "0" else photos[5:]
files = [{"filename": name, "content": b64(data), "caption": caption} for name, data, caption in part]
print("ready", flush=True)
answer = handler({"id": "x", "input": {"type": "upload_training_data", "training_name": "matt", "files": files}})
assert answer["status"] == "success", answer
"""


def test_two_processes_appending_at_once_both_land(data_root):
    from fastbackend.storage import locked

    folder = data_root / "training_data" / "matt"
    with locked(folder):  # both writers start their commit while the lock is held, so they overlap
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", APPEND_SCRIPT, str(i)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready", worker.stderr.read()
        time.sleep(1.5)  # both are past reading the old manifest and waiting on the lock
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read()
    manifest = json.loads((folder / "manifest.json").read_text())["images"]
    assert sorted(manifest) == sorted(n for n, _, _ in nine_photos())
    on_disk = sorted(p.name for p in folder.glob("IMG_*.*") if p.suffix != ".txt")
    assert on_disk == sorted(manifest)


def test_wrapped_base64_and_data_urls_are_accepted():
    name, data, _caption = nine_photos()[0]
    encoded = b64(data)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # `base64` without -w0
    answer = upload(
        files=[
            {"filename": name, "content": wrapped},
            {"filename": "IMG_0001.jpg", "content": "data:image/jpeg;base64," + b64(nine_photos()[1][1])},
        ]
    )
    assert answer["status"] == "success", answer
    assert answer["total_images"] == 2
