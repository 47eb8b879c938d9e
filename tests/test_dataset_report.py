"""The dataset report: faces found and compared on real photographs (scikit-image's astronaut, its
coffee cup and cat, a face from the LFW benchmark), sharpness, exposure, sizes, near-duplicates,
and ``require_faces`` refusing a run before any download."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from skimage import data

from fastbackend import faces
from handler_fast import handler
from tests.training_helpers import fixture_yaml, install_model, train, upload_photos, user_yaml


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def stranger() -> Image.Image:
    """Another person: the first face of scikit-image's LFW subset, enlarged to 300 px."""
    face = (np.stack([data.lfw_subset()[0]] * 3, axis=-1) * 255).astype(np.uint8)
    return Image.fromarray(face).resize((300, 300), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 95) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode()


def test_faces_are_found_where_they_are_and_nowhere_else():
    found = faces.face_model().faces(astronaut())
    assert len(found) == 1
    left, top, right, bottom = found[0].box  # Eileen Collins' face, not her suit's patches
    assert 170 <= left < right <= 275 and 75 <= top < bottom <= 180
    for photo in (data.coffee(), data.chelsea(), np.stack([data.camera()] * 3, axis=-1)):
        assert faces.face_model().faces(Image.fromarray(photo)) == []


def test_the_same_person_stays_within_the_threshold_and_another_does_not():
    model = faces.face_model()
    reference = model.faces(astronaut())[0].embedding
    same = {
        "mirror": astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "close-up": astronaut().crop((100, 0, 400, 300)).resize((512, 512)),
        "tilted 7 degrees": astronaut().rotate(7),
        "half size": astronaut().resize((256, 256)),
    }
    for name, photo in same.items():
        assert faces.distance(model.faces(photo)[0].embedding, reference) < faces.SAME_PERSON, name
    assert faces.distance(model.faces(stranger())[0].embedding, reference) > faces.SAME_PERSON


def upload(name: str, photos: dict[str, str]) -> None:
    files = [{"filename": filename, "content": content} for filename, content in photos.items()]
    answer = handler({"id": "u", "input": {"type": "upload_training_data", "training_name": name, "files": files}})
    assert answer["status"] == "success", answer


def mixed_photos() -> dict[str, str]:
    photo = astronaut()
    return {
        "astronaut.jpg": jpeg(photo),
        "astronaut_again.jpg": jpeg(photo, quality=60),  # the same photo, saved again
        "mirror.jpg": jpeg(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "closeup.jpg": jpeg(photo.crop((100, 0, 400, 300)).resize((600, 600))),
        "dark.jpg": jpeg(ImageEnhance.Brightness(photo).enhance(0.25)),
        "soft.jpg": jpeg(photo.filter(ImageFilter.GaussianBlur(4))),
        "coffee.jpg": jpeg(Image.fromarray(data.coffee())),
        "stranger.jpg": jpeg(stranger()),
    }


def test_analyze_dataset_reports_in_plain_words(data_root):
    upload("mixed", mixed_photos())
    answer = handler({"id": "a", "input": {"type": "analyze_dataset", "training_name": "mixed", "resolution": [512]}})
    assert answer["status"] == "success", answer
    warnings = answer["warnings"]
    assert "coffee.jpg: no face found" in warnings
    # the same photo saved again, darkened, blurred: one group (the hash sees neither brightness nor fine detail)
    group = (
        "astronaut.jpg, astronaut_again.jpg, dark.jpg and soft.jpg are near-duplicates: they teach the same thing twice"
    )
    assert group in warnings
    assert not any("mirror.jpg and" in w or "and mirror.jpg" in w for w in warnings)  # a flip is a new view
    assert any(w.startswith("stranger.jpg: the face differs from the others (distance 0.") for w in warnings)
    assert any(w.startswith("soft.jpg: looks blurry (sharpness ") for w in warnings)
    assert any(w.startswith("dark.jpg: underexposed (mean brightness 0.1") for w in warnings)
    assert any(w.startswith("stranger.jpg: 300x300 is smaller than the 512 px bucket(s)") for w in warnings)
    assert any("with the face under 5% of the photo (astronaut.jpg, astronaut_again.jpg" in w for w in warnings)
    assert not any(w.startswith(("closeup.jpg", "mirror.jpg: the face")) for w in warnings)
    by_name = {image["filename"]: image for image in answer["images"]}
    assert by_name["closeup.jpg"]["faces"][0]["share"] > 0.05 and by_name["mirror.jpg"]["face_distance"] < 0.6
    summary = answer["summary"]
    assert summary["images"] == 8 and summary["no_face"] >= 1 and summary["same_person"] is False
    assert set(answer["blocking"]) >= {"coffee.jpg: no face found"}


def test_analyze_dataset_refuses_bad_input_naming_the_field(data_root):
    missing = handler({"id": "a", "input": {"type": "analyze_dataset", "training_name": "nope"}})
    assert missing["error_code"] == "not_found"
    upload("one", {"a.jpg": jpeg(astronaut())})
    tiny = handler({"id": "a", "input": {"type": "analyze_dataset", "training_name": "one", "resolution": [8]}})
    assert tiny["error_code"] == "validation_error" and tiny["error"].startswith("input.resolution")


def test_a_face_model_that_cannot_load_is_named(data_root, monkeypatch):
    upload("one", {"a.jpg": jpeg(astronaut())})
    monkeypatch.setattr(faces, "MODELS_PACKAGE", "no_such_models_package")
    faces.face_model.cache_clear()
    try:
        answer = handler({"id": "a", "input": {"type": "analyze_dataset", "training_name": "one"}})
    finally:
        faces.face_model.cache_clear()
    assert answer["error_code"] == "model_load_failed"
    assert answer["error"].startswith("the face model (dlib, with no_such_models_package) could not load")


@pytest.mark.slow
def test_require_faces_refuses_before_any_download_and_the_report_is_answered(tiny_models, data_root, monkeypatch):
    model_path = install_model(tiny_models, data_root, "sd15")
    upload_photos()  # synthetic photos: no faces
    text = user_yaml(model_path, "sd15", steps=1)
    strict = text.replace(
        "      cache_latents_to_disk: true\n", "      cache_latents_to_disk: true\n      require_faces: true\n"
    )
    refused = train(strict)
    assert refused["error_code"] == "invalid_dataset", refused
    assert refused["error"].startswith("config.process[0].datasets[0].require_faces: IMG_")
    assert refused["error"].endswith(": no face found (and 2 more problem(s), see details)")
    assert not (data_root / "output" / "nowy_dataset_1.3").exists()
    answer = train(text)
    assert answer["status"] == "success", answer
    report = answer["dataset_report"]["matt_training_test"]
    assert report["summary"]["no_face"] == 3 and "images" not in report  # rows only in analyze_dataset
    monkeypatch.setattr(faces, "MODELS_PACKAGE", "no_such_models_package")
    faces.face_model.cache_clear()
    try:
        without = train(text.replace("name: nowy", "name: again"))
        failed = train(strict.replace("name: nowy", "name: strict"))
    finally:
        faces.face_model.cache_clear()
    assert without["status"] == "success" and without["dataset_report"] == {}
    assert any("datasets[0]: no dataset report: the face model" in w for w in without["warnings"])
    assert failed["error_code"] == "model_load_failed"


def test_fixture_yaml_is_untouched_by_the_report_keys():
    assert "require_faces" not in fixture_yaml()


def test_odd_photos_in_a_folder_made_by_hand_are_noted_not_fatal(tmp_path, monkeypatch):
    """A folder made by hand skips the upload's checks: EXIF rotation, a photo past the pixel
    limit, a broken file, a sliver, plain colours, and too few faces to compare."""
    from fastbackend.dataset_report import analyze
    from fastbackend.layout import DatasetFolder

    monkeypatch.setenv("FASTBACKEND_MAX_IMAGE_PIXELS", "1000000")
    folder = tmp_path / "by_hand"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    astronaut().rotate(90, expand=True).save(folder / "turned.jpg", exif=exif)
    Image.new("RGB", (1100, 1000)).save(folder / "huge.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (40, 20000), "gray").save(folder / "sliver.png")  # 1 px wide at 512 px
    for colour in ("red", "blue"):
        Image.new("RGB", (300, 300), colour).save(folder / f"{colour}.png")
    report = analyze(DatasetFolder(folder), [512])
    rows = {row["filename"]: row for row in report["images"]}
    assert len(rows["turned.jpg"]["faces"]) == 1  # upright first, as training sees it
    assert rows["huge.png"]["notes"] == ["could not be read: 1100x1000 is over the 1,000,000-pixel limit"]
    assert rows["broken.jpg"]["notes"][0].startswith("could not be read: ")
    assert "broken.jpg: could not be read: " in " ".join(report["blocking"])
    assert rows["sliver.png"]["sharpness"] is not None  # a number, never NaN
    assert not any("red.png" in w and "near-duplicates" in w for w in report["warnings"])  # plain is not a copy
    assert report["summary"]["same_person"] is None  # one face: nothing to compare


def test_a_long_report_is_capped(tmp_path):
    from fastbackend.dataset_report import MAX_WARNINGS, analyze
    from fastbackend.layout import DatasetFolder

    folder = tmp_path / "cups"
    folder.mkdir()
    for index in range(MAX_WARNINGS + 5):
        Image.fromarray(data.coffee()).rotate(index * 7).save(folder / f"cup_{index:03d}.jpg")
    report = analyze(DatasetFolder(folder), [512], images=False)
    assert len(report["blocking"]) == MAX_WARNINGS + 1 and report["blocking"][-1] == "and 5 more"


def test_a_small_face_in_a_large_photo_is_found():
    """A full-body-like photo: the face is 4% of the width, under 80 px once scaled to 1024."""
    canvas = Image.new("RGB", (2400, 1800), "white")
    canvas.paste(astronaut(), (0, 0))
    found = faces.face_model().faces(canvas)
    assert len(found) == 1 and found[0].box[0] < 200 and found[0].box[2] < 300
