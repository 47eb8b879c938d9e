"""Automatic captions: Florence-2 captions rewritten for a person LoRA, written at upload, never over the user's."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from devtools.tiny import TINY_CAPTION
from fastbackend.captions import class_word_for, personalize
from tests.photos import b64, nine_photos
from tests.test_upload import make_zip, nothing_stored, upload

# What the tiny captioner's caption becomes: the person named, hair and beard left out.
TINY_PERSONALIZED = "[trigger] man, wearing a blue shirt, standing in front of a brick wall."

# Detailed captions as Florence-2 writes them, and what a person LoRA should train on.
REWRITES = [
    (
        "The image shows a man with short brown hair and a beard, wearing a blue shirt, standing in front of a wall.",
        "ohwx man, wearing a blue shirt, standing in front of a wall.",
    ),
    (
        "The image is a close-up portrait of a young woman with long blonde hair wearing a red dress. "
        "She is smiling at the camera.",
        "a close-up portrait of ohwx man wearing a red dress. She is smiling at the camera.",
    ),
    (
        "In this image we can see a person sitting on a bench in a park. He has short dark hair and is wearing a "
        "black jacket.",
        "ohwx man sitting on a bench in a park. He is wearing a black jacket.",
    ),
    (
        "The image shows a smiling middle-aged asian man holding a cup of coffee. His hair is neatly combed.",
        "smiling ohwx man holding a cup of coffee.",
    ),
    (
        "A man with a beard and glasses is sitting at a desk, typing on a laptop.",
        "ohwx man with glasses is sitting at a desk, typing on a laptop.",
    ),
    # What goes on after the traits stays: places, clothes, what they do.
    ("a man with a beard in front of a brick wall.", "ohwx man in front of a brick wall."),
    ("a man with dark hair in a white shirt.", "ohwx man in a white shirt."),
    ("a man with brown hair and a blue shirt.", "ohwx man with a blue shirt."),
    ("a man with a red hat and long hair walking down the street.", "ohwx man with a red hat walking down the street."),
    (
        "a man with short hair, a beard, and a mustache, wearing a suit and tie.",
        "ohwx man, wearing a suit and tie.",
    ),
    ("a man with long hair that falls over his shoulders.", "ohwx man."),
    ("a man with a guitar.", "ohwx man with a guitar."),
    # Sentences: the traits go, the rest stays.
    ("His hair is short and he is wearing a white shirt.", "ohwx man is wearing a white shirt."),
    ("He has a beard, and he is wearing a hat.", "ohwx man is wearing a hat."),
    ("He has brown hair and wears a suit.", "ohwx man wears a suit."),
    ("He is wearing a black suit.", "ohwx man is wearing a black suit."),
    # Words that are not a person here.
    ("a man-made lake in a park.", "ohwx man, a man-made lake in a park."),
    ("a baby elephant walking.", "ohwx man, a baby elephant walking."),
    ("A baby sitting on a blanket.", "ohwx man sitting on a blanket."),
    (
        "The image shows a woman with curly red hair and freckles, sitting on a sofa. Her eyes are green. "
        "Behind her is a window.",
        "ohwx man, sitting on a sofa. Behind her is a window.",
    ),
    ("The image shows a red car parked on the street.", "ohwx man, a red car parked on the street."),
    ("", "ohwx man"),
    ("a man\ufffd\x00 on a\n beach", "ohwx man on a beach"),
]


@pytest.mark.parametrize(("raw", "expected"), REWRITES)
def test_captions_name_the_person_and_leave_fixed_traits_out(raw, expected):
    assert personalize(raw, "ohwx", "man") == expected


def test_the_tiny_captioners_caption_is_rewritten_like_the_others():
    assert personalize(TINY_CAPTION, "[trigger]", "man") == TINY_PERSONALIZED


def test_the_class_word_is_the_one_most_captions_use():
    raws = ["a young woman on a beach", "a lady in a red coat", "a man reading", "a red car"]
    assert class_word_for(raws) == "woman"
    assert class_word_for(["a red car", ""]) == "person"


@pytest.fixture
def captioner(tiny_captioner, monkeypatch):
    """The tiny captioner as the default model, baked into a model dir as an image would hold it."""
    monkeypatch.setenv("FASTBACKEND_MODEL_DIRS", str(tiny_captioner.parent))
    monkeypatch.setenv("FASTBACKEND_CAPTION_MODEL", str(tiny_captioner))
    return tiny_captioner


def files(photos, captions):
    return [
        {"filename": name, "content": b64(data)} | ({"caption": caption} if caption is not None else {})
        for (name, data, _), caption in zip(photos, captions, strict=True)
    ]


def stored_captions(data_root, name="matt") -> dict[str, str | None]:
    manifest = json.loads((data_root / "training_data" / name / "manifest.json").read_text())
    return {image: entry["caption"] for image, entry in manifest["images"].items()}


def test_auto_caption_captions_what_has_no_caption_and_keeps_the_users(data_root, captioner):
    photos = nine_photos()[:3]
    answer = upload(files=files(photos, [None, "my own words", None]), auto_caption=True)
    assert answer["status"] == "success", answer
    names = [name for name, _, _ in photos]
    assert stored_captions(data_root) == {
        names[0]: TINY_PERSONALIZED,
        names[1]: "my own words",
        names[2]: TINY_PERSONALIZED,
    }
    folder = data_root / "training_data" / "matt"
    assert (folder / names[0]).with_suffix(".txt").read_text() == TINY_PERSONALIZED
    assert answer["auto_captions"] == {
        "model": str(captioner),
        "class_word": "man",
        "captions": {names[0]: TINY_PERSONALIZED, names[2]: TINY_PERSONALIZED},
    }
    assert answer["warnings"] == []


def test_caption_auto_asks_for_one_file_only(data_root, captioner):
    photos = nine_photos()[:2]
    answer = upload(files=files(photos, ["auto", None]))
    assert answer["status"] == "success", answer
    assert stored_captions(data_root) == {photos[0][0]: TINY_PERSONALIZED, photos[1][0]: None}
    assert "1 image(s) have no caption" in answer["warnings"][0]


def test_options_name_the_trigger_and_class_word(data_root, captioner):
    photos = nine_photos()[:1]
    options = {"trigger_word": "sks", "class_word": "woman", "model": str(captioner)}
    answer = upload(files=files(photos, [None]), auto_caption=options)
    assert answer["status"] == "success", answer
    assert stored_captions(data_root) == {
        photos[0][0]: "sks woman, wearing a blue shirt, standing in front of a brick wall."
    }


def test_captions_in_a_zip_and_captions_already_stored_are_never_replaced(data_root, captioner):
    (a, a_bytes, _), (b, b_bytes, _), _, (c, c_bytes, _) = nine_photos()[:4]
    archive = make_zip({a: a_bytes, "IMG_0000.txt": b"from the zip", b: b_bytes})
    first = upload(zip=b64(archive), auto_caption=True)
    assert first["status"] == "success", first
    assert stored_captions(data_root) == {a: "from the zip", b: TINY_PERSONALIZED}
    assert list(first["auto_captions"]["captions"]) == [b]
    # a with new bytes, and c: a keeps the user's caption, only c is captioned.
    again = upload(
        files=files([(a, c_bytes, None), (c, c_bytes, None)], [None, None]), overwrite=True, auto_caption=True
    )
    assert again["status"] == "success", again
    assert again["replaced"] == [a] and again["skipped"] == [
        {"filename": c, "reason": f"duplicate of {a!r} (same bytes)"}
    ]
    assert stored_captions(data_root) == {a: "from the zip", b: TINY_PERSONALIZED}
    assert "auto_captions" not in again  # a kept its caption and c was the same bytes as a


def test_captioning_is_reported_as_it_goes(data_root, captioner, monkeypatch):
    from fastbackend.api.datasets import upload_training_data
    from fastbackend.schemas import UploadTrainingDataRequest, parse_request

    heard = []
    payload = {"type": "upload_training_data", "training_name": "matt", "files": files(nine_photos()[:2], [None, None])}
    request = parse_request(UploadTrainingDataRequest, payload | {"auto_caption": True})
    upload_training_data(request, progress=heard.append)
    assert heard == [{"stage": "captioning", "done": 2, "total": 2}]


def test_a_captioner_that_cannot_load_is_named_and_nothing_is_written(
    data_root, tiny_captioner, tiny_models, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FASTBACKEND_MODEL_DIRS", f"{tiny_captioner.parent}:{tiny_models}")
    photos = files(nine_photos()[:2], [None, None])
    not_florence = str(tiny_models / "sd15" / "text_encoder")
    for model, words in [
        (
            "someone/no-such-captioner",
            "could not load the captioner 'someone/no-such-captioner': it is in no hub cache",
        ),
        (not_florence, "it is a 'clip_text_model' model; the captioner must be a Florence-2 checkpoint"),
    ]:
        answer = upload(files=photos, auto_caption={"model": model})
        assert answer["error_code"] == "model_load_failed", answer
        assert answer["error"].startswith("input.auto_caption.model: ") and words in answer["error"]
        assert nothing_stored(data_root)
    answer = upload(files=photos, auto_caption={"model": "/etc"})
    assert answer["error_code"] == "path_outside_root" and "input.auto_caption.model" in answer["error"]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"trigger_word": "two\nlines"}, "input.auto_caption.trigger_word: must be one line, got 'two\\nlines'"),
        ({"class_word": "man; rm"}, "input.auto_caption.class_word: must be plain words (letters, spaces, hyphens)"),
        ({"trigger": "ohwx"}, "input.auto_caption.trigger: unknown key"),
        ("yes", "input.auto_caption: input should be a valid dictionary or instance of AutoCaption, got 'yes'"),
    ],
)
def test_bad_caption_options_are_refused_by_field(data_root, options, words):
    answer = upload(files=files(nine_photos()[:1], [None]), auto_caption=options)
    assert answer["error_code"] == "validation_error" and words in answer["error"], answer
    assert nothing_stored(data_root)


def test_readme_rewrites_are_what_the_worker_writes():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("#### Automatic captions", 1)[1].split("\n\n", 3)[2]
    rows = [line.split(" | ") for line in section.splitlines()[2:]]
    assert len(rows) == 2
    for said, written in rows:
        assert personalize(said.strip("| "), "[trigger]", "man") == written.strip("| ")


def test_a_caption_written_while_the_captioner_runs_is_kept(data_root, captioner, monkeypatch):
    from fastbackend import captions

    (a, a_bytes, _), (_, b_bytes, _) = nine_photos()[:2]
    assert upload(files=files([(a, a_bytes, None)], [None]))["status"] == "success"
    real = captions.caption_photos

    def meanwhile_the_user_captions_it(*args, **kwargs):
        written = real(*args, **kwargs)
        assert upload(files=[{"filename": "IMG_0000.txt", "content": b64(b"the user's words")}])["status"] == "success"
        return written

    monkeypatch.setattr(captions, "caption_photos", meanwhile_the_user_captions_it)
    answer = upload(files=files([(a, b_bytes, None)], [None]), overwrite=True, auto_caption=True)
    assert answer["status"] == "success", answer
    assert stored_captions(data_root) == {a: "the user's words"}
    assert answer["auto_captions"]["captions"] == {}


def test_an_image_sharing_a_captioned_stem_is_not_captioned(data_root, captioner):
    """a.jpg and a.png share a.txt: an automatic caption for a.png would replace a.jpg's."""
    (_, jpg, _), (_, png, _) = nine_photos()[1:3]  # a JPEG and a PNG
    assert (
        upload(files=[{"filename": "a.jpg", "content": b64(jpg), "caption": "the user's words"}])["status"] == "success"
    )
    answer = upload(files=[{"filename": "a.png", "content": b64(png), "caption": "auto"}])
    assert answer["status"] == "success", answer
    assert (data_root / "training_data" / "matt" / "a.txt").read_text() == "the user's words"
    assert "auto_captions" not in answer


def test_a_captioner_folder_under_the_data_root_is_found_by_its_relative_path(data_root, tiny_captioner):
    shutil.copytree(tiny_captioner, data_root / "models" / "florence")
    answer = upload(files=files(nine_photos()[:1], [None]), auto_caption={"model": "models/florence"})
    assert answer["status"] == "success", answer
    assert answer["auto_captions"]["captions"] == {"IMG_0000.jpg": TINY_PERSONALIZED}


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("truncated", "could not load the captioner 'models/broken'"),
        ("renamed", "its weights do not fit Florence-2"),
        ("no_tokenizer", "could not load the captioner 'models/broken'"),
    ],
)
def test_a_damaged_captioner_is_model_load_failed_and_nothing_is_written(data_root, tiny_captioner, damage, words):
    from safetensors.torch import load_file, save_file

    folder = data_root / "models" / "broken"
    shutil.copytree(tiny_captioner, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "renamed":  # another weight layout: every tensor under other names
        save_file({f"legacy.{key}": value for key, value in load_file(weights).items()}, weights)
    else:
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer_config.json").unlink()
    answer = upload(files=files(nine_photos()[:1], [None]), auto_caption={"model": "models/broken"})
    assert answer["error_code"] == "model_load_failed", answer
    assert answer["error"].startswith("input.auto_caption.model: ") and words in answer["error"]
    assert not (data_root / "training_data" / "matt").exists()


def test_each_photo_gets_its_own_caption_across_batches(tmp_path):
    from PIL import Image

    from fastbackend import captions

    photos = {}
    for index in range(captions.BATCH + 2):  # two batches
        photos[f"p{index:02d}.png"] = tmp_path / f"p{index:02d}.png"
        Image.new("RGB", (32, 32), (index * 10, 0, 0)).save(photos[f"p{index:02d}.png"])

    def by_colour(images):  # a captioner that says what it sees
        return [f"a man in a shirt of red {image.getpixel((0, 0))[0]}" for image in images]

    heard = []
    written, word, unreadable = captions.write_captions(
        photos, by_colour, "ohwx", None, lambda done, total: heard.append(done)
    )
    assert word == "man" and heard == [captions.BATCH, captions.BATCH + 2] and unreadable == {}
    assert written == {name: f"ohwx man in a shirt of red {int(name[1:3]) * 10}" for name in photos}
    # A photo damaged on the volume, or removed meanwhile, is named; the others are captioned.
    photos["p01.png"].write_bytes(photos["p01.png"].read_bytes()[:40])
    photos["p02.png"].unlink()
    written, _, unreadable = captions.write_captions(photos, by_colour, "ohwx", None)
    assert sorted(written) == sorted(set(photos) - {"p01.png", "p02.png"})
    assert sorted(unreadable) == ["p01.png", "p02.png"] and unreadable["p02.png"] == "it is no longer there"


def test_a_blank_trigger_word_is_refused(data_root):
    answer = upload(files=files(nine_photos()[:1], [None]), auto_caption={"trigger_word": " , "})
    assert answer["error"].startswith("input.auto_caption.trigger_word: must contain a letter or digit, got ' , '")


def test_new_bytes_under_a_name_drop_its_automatic_caption_and_keep_a_users(data_root, captioner, monkeypatch):
    """The captioner's caption describes the photo it saw: a new photo under that name gets a new one
    (or none, and the warning says so); a caption the user wrote stays, as for any overwrite."""
    from fastbackend import captions

    first, second, third = [data for name, data, _ in nine_photos() if name.endswith(".jpg")][:3]
    assert upload(files=[{"filename": "a.jpg", "content": b64(first)}], auto_caption=True)["status"] == "success"
    manifest = json.loads((data_root / "training_data" / "matt" / "manifest.json").read_text())
    assert manifest["images"]["a.jpg"]["auto_caption"] is True

    seen = []
    real = captions.caption_photos
    monkeypatch.setattr(captions, "caption_photos", lambda photos, *a: seen.append(sorted(photos)) or real(photos, *a))
    again = upload(files=[{"filename": "a.jpg", "content": b64(second)}], auto_caption=True, overwrite=True)
    assert again["status"] == "success", again
    assert seen == [["a.jpg"]] and again["auto_captions"]["captions"] == {"a.jpg": TINY_PERSONALIZED}

    plain = upload(files=[{"filename": "a.jpg", "content": b64(third)}], overwrite=True)
    assert plain["status"] == "success", plain
    assert stored_captions(data_root) == {"a.jpg": None}
    assert not (data_root / "training_data" / "matt" / "a.txt").exists()
    assert plain["warnings"] == ["1 image(s) have no caption: a.jpg"]

    mine = upload(files=[{"filename": "a.jpg", "content": b64(first), "caption": "my words"}], overwrite=True)
    assert mine["status"] == "success", mine
    kept = upload(files=[{"filename": "a.jpg", "content": b64(second)}], auto_caption=True, overwrite=True)
    assert kept["status"] == "success" and "auto_captions" not in kept, kept
    assert stored_captions(data_root) == {"a.jpg": "my words"}


def test_the_captioner_stays_loaded_for_the_next_upload_until_another_model_needs_the_memory(
    data_root, captioner, monkeypatch
):
    """A dataset arrives in several requests (the payload limits): the captioner loads once for all
    of them; training (or generate's pipeline) takes its place."""
    from fastbackend import captions
    from fastbackend.training import pipeline_cache

    loads = []
    real = captions.load_captioner
    monkeypatch.setattr(captions, "load_captioner", lambda *args: loads.append(args) or real(*args))
    photos = [(name, data, c) for name, data, c in nine_photos() if name.endswith(".jpg")]
    for name, data, _ in photos[:3]:
        assert upload(files=[{"filename": name, "content": b64(data)}], auto_caption=True)["status"] == "success"
    assert len(loads) == 1 and len(pipeline_cache._loaded) == 1
    pipeline_cache.release()  # what a training run does first
    assert pipeline_cache._loaded == {}
    name, data, _ = photos[3]
    assert upload(files=[{"filename": name, "content": b64(data)}], auto_caption=True)["status"] == "success"
    assert len(loads) == 2


def handle(kind: str, **extra) -> dict:
    from handler_fast import handler

    return handler({"id": "cap", "input": {"type": kind, "training_name": "matt", **extra}})


def caption_dataset(**extra) -> dict:
    return handle("caption_dataset", **extra)


def test_caption_dataset_captions_the_photos_already_there_that_have_none(data_root, captioner):
    photos = [(name, data, c) for name, data, c in nine_photos() if name.endswith(".jpg")][:3]
    names = [name for name, _, _ in photos]
    assert upload(files=files(photos, [None, "my own words", None]))["status"] == "success"
    answer = caption_dataset()
    assert answer["status"] == "success", answer
    assert answer["auto_captions"] == {
        "model": str(captioner),
        "class_word": "man",
        "captions": {names[0]: TINY_PERSONALIZED, names[2]: TINY_PERSONALIZED},
    }
    assert stored_captions(data_root) == {
        names[0]: TINY_PERSONALIZED,
        names[1]: "my own words",
        names[2]: TINY_PERSONALIZED,
    }
    assert answer["warnings"] == []
    assert caption_dataset()["auto_captions"] == {"captions": {}}  # nothing left to caption

    again = caption_dataset(replace_automatic=True, auto_caption={"trigger_word": "sks", "class_word": "woman"})
    assert again["status"] == "success", again
    woman = "sks woman, wearing a blue shirt, standing in front of a brick wall."
    assert stored_captions(data_root) == {names[0]: woman, names[1]: "my own words", names[2]: woman}


def test_caption_dataset_writes_nothing_over_what_changed_while_it_ran(data_root, captioner, monkeypatch):
    """A photo overwritten, or captioned by its user, while the captioner ran keeps what arrived."""
    from fastbackend import captions

    (a, a_bytes, _), (b, b_bytes, _), (_, other, _) = [p for p in nine_photos() if p[0].endswith(".jpg")][:3]
    assert upload(files=files([(a, a_bytes, None), (b, b_bytes, None)], [None, None]))["status"] == "success"
    real = captions.caption_photos

    def meanwhile(*args, **kwargs):
        written = real(*args, **kwargs)
        assert upload(files=[{"filename": a, "content": b64(other)}], overwrite=True)["status"] == "success"
        txt = b.rsplit(".", 1)[0] + ".txt"
        assert upload(files=[{"filename": txt, "content": b64(b"the user's words")}])["status"] == "success"
        return written

    monkeypatch.setattr(captions, "caption_photos", meanwhile)
    answer = caption_dataset()
    assert answer["status"] == "success", answer
    assert stored_captions(data_root) == {a: None, b: "the user's words"}
    assert answer["auto_captions"]["captions"] == {}
    assert answer["warnings"] == [f"1 image(s) have no caption: {a}"]


def test_caption_dataset_names_a_dataset_that_is_not_there(data_root):
    answer = caption_dataset()
    assert answer["error_code"] == "not_found", answer
    assert "matt" in answer["error"]


def jpegs(count: int) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data, _ in nine_photos() if name.endswith(".jpg")][:count]


def test_caption_dataset_for_a_dataset_deleted_meanwhile_is_not_found_and_not_made_again(
    data_root, captioner, monkeypatch
):
    from fastbackend import captions

    ((name, data),) = jpegs(1)
    assert upload(files=[{"filename": name, "content": b64(data)}])["status"] == "success"
    real = captions.caption_photos

    def meanwhile(*args, **kwargs):
        written = real(*args, **kwargs)
        assert handle("delete_dataset")["status"] == "success"
        return written

    monkeypatch.setattr(captions, "caption_photos", meanwhile)
    answer = caption_dataset()
    assert answer["error_code"] == "not_found", answer
    assert "matt" in answer["error"] and "was deleted while" in answer["error"]
    assert not (data_root / "training_data" / "matt").exists()


def test_caption_dataset_names_photos_it_cannot_read_and_captions_the_rest(data_root, captioner):
    (a, a_bytes), (b, b_bytes) = jpegs(2)
    assert upload(files=[{"filename": n, "content": b64(d)} for n, d in ((a, a_bytes), (b, b_bytes))])["status"] == (
        "success"
    )
    stored = data_root / "training_data" / "matt" / b
    stored.write_bytes(stored.read_bytes()[:300])  # damaged on the volume after the upload
    answer = caption_dataset()
    assert answer["status"] == "success", answer
    assert answer["auto_captions"]["captions"] == {a: TINY_PERSONALIZED}
    assert answer["warnings"][0] == f"1 image(s) have no caption: {b}"
    assert answer["warnings"][1].startswith(f"{b}: not captioned, ")


def test_caption_dataset_captions_the_bytes_an_unfinished_overwrite_put_in_place(data_root, monkeypatch):
    """An overwrite killed between its manifest and its rename names new bytes not yet in place: they
    are put in place first, so the caption is of the bytes the manifest names."""
    from fastbackend import captions

    def by_colour(images):
        return [f"a man in a shirt of colour {image.getpixel((0, 0))}" for image in images]

    monkeypatch.setattr(captions, "load_captioner", lambda *args: by_colour)
    monkeypatch.setenv("FASTBACKEND_CAPTION_MODEL", "some/florence")
    (name, old), (_, new) = jpegs(2)
    assert upload(files=[{"filename": name, "content": b64(old)}])["status"] == "success"
    folder = data_root / "training_data" / "matt"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / f".pending-{name}").write_bytes(new)
    manifest["images"][name]["sha256"] = "new-bytes"
    manifest["pending"] = {name: f".pending-{name}"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    from PIL import Image

    with Image.open(io.BytesIO(new)) as image:
        expected = f"[trigger] man in a shirt of colour {image.convert('RGB').getpixel((0, 0))}"
    answer = caption_dataset()
    assert answer["status"] == "success", answer
    assert stored_captions(data_root) == {name: expected}


def test_two_photos_of_one_stem_get_one_automatic_caption_on_the_photo_captioned(data_root, captioner):
    """a.jpg and a.png share a.txt: one of them is captioned, the caption is recorded on its own
    entry (so the answer shows it and new bytes under that name drop it)."""
    (_, jpg), png = jpegs(1)[0], next(data for name, data, _ in nine_photos() if name.endswith(".png"))
    sent = [{"filename": "a.png", "content": b64(png)}, {"filename": "a.jpg", "content": b64(jpg)}]
    answer = upload(files=sent, auto_caption=True)
    assert answer["status"] == "success", answer
    assert answer["auto_captions"]["captions"] == {"a.jpg": TINY_PERSONALIZED}
    assert stored_captions(data_root) == {"a.jpg": TINY_PERSONALIZED, "a.png": None}
    (_, other) = jpegs(2)[1]
    assert upload(files=[{"filename": "a.jpg", "content": b64(other)}], overwrite=True)["status"] == "success"
    assert stored_captions(data_root) == {"a.jpg": None, "a.png": None}
    assert not (data_root / "training_data" / "matt" / "a.txt").exists()


def test_caption_dataset_says_at_once_that_a_training_run_reads_the_dataset(data_root, captioner, monkeypatch):
    from fastbackend import captions, storage

    ((name, data),) = jpegs(1)
    assert upload(files=[{"filename": name, "content": b64(data)}])["status"] == "success"
    monkeypatch.setattr(storage, "BUSY_LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(captions, "load_captioner", lambda *args: pytest.fail("captioned a dataset in use"))
    with storage.locked(data_root / "training_data" / "matt", reader="some_lora"):
        answer = caption_dataset(auto_caption=True)
    assert answer["error_code"] == "locked", answer
    assert "some_lora" in answer["error"]


def test_a_users_caption_over_an_automatic_one_is_the_users_from_then_on(data_root, captioner):
    (name, data), (_, other) = jpegs(2)
    assert upload(files=[{"filename": name, "content": b64(data)}], auto_caption=True)["status"] == "success"
    txt = name.rsplit(".", 1)[0] + ".txt"
    assert upload(files=[{"filename": txt, "content": b64(b"mine")}])["status"] == "success"
    assert upload(files=[{"filename": name, "content": b64(other)}], overwrite=True)["status"] == "success"
    assert stored_captions(data_root) == {name: "mine"}


def test_another_captioner_model_is_loaded_in_place_of_the_kept_one(data_root, tiny_captioner, monkeypatch):
    from fastbackend import captions
    from fastbackend.training import pipeline_cache

    second = tiny_captioner.parent / "florence-copy"
    if not second.exists():
        shutil.copytree(tiny_captioner, second)
    monkeypatch.setenv("FASTBACKEND_MODEL_DIRS", str(tiny_captioner.parent))
    loads = []
    real = captions.load_captioner
    monkeypatch.setattr(captions, "load_captioner", lambda *args: loads.append(args[0]) or real(*args))
    (a, a_bytes), (b, b_bytes) = jpegs(2)
    assert (
        upload(files=[{"filename": a, "content": b64(a_bytes)}], auto_caption={"model": str(tiny_captioner)})["status"]
        == "success"
    )
    assert (
        upload(files=[{"filename": b, "content": b64(b_bytes)}], auto_caption={"model": str(second)})["status"]
        == "success"
    )
    assert loads == [str(tiny_captioner), str(second)] and list(pipeline_cache._loaded) == [f"captioner:{second}"]


def test_a_training_run_drops_the_kept_captioner(data_root, captioner, tiny_models):
    from fastbackend.training import pipeline_cache
    from tests.training_helpers import install_model, train, user_yaml

    photos = [{"filename": name, "content": b64(data)} for name, data in jpegs(3)]
    assert upload("matt_training_test", files=photos, auto_caption=True)["status"] == "success"
    assert list(pipeline_cache._loaded) == [f"captioner:{captioner}"]
    answer = train(user_yaml(install_model(tiny_models, data_root, "sd15"), "sd15", steps=1))
    assert answer["status"] == "success", answer
    assert pipeline_cache._loaded == {}
