"""Likeness: the samples of every save scored against the dataset's face. The scoring is tested on
real photographs (scikit-image's astronaut as the dataset and, flipped, cropped and tilted, as the
"samples"); the plumbing (every save scored, the best kept and named, early stopping, listings)
on the tiny models, whose random samples have no faces, with the scores stood in for."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from skimage import data

from fastbackend.training import likeness
from handler_fast import handler
from tests.test_dataset_report import astronaut, jpeg, stranger, upload
from tests.training_helpers import install_model, train, user_yaml


def save(folder, name: str, image: Image.Image):
    path = folder / name
    image.convert("RGB").save(path, "JPEG", quality=95)
    return path


def astronaut_reference(folder) -> tuple[float, ...]:
    """The median face of a dataset of three photos of the astronaut (whole, cropped, turned)."""
    dataset = folder / "dataset"
    dataset.mkdir()
    photo = astronaut()
    save(dataset, "a.jpg", photo)
    save(dataset, "b.jpg", photo.crop((60, 0, 460, 400)))
    save(dataset, "c.jpg", photo.rotate(-4))
    warnings: list[str] = []
    reference = likeness.reference_face([dataset], warnings)
    assert reference is not None and warnings == []
    return reference


def test_the_same_face_scores_as_a_match_and_no_face_scores_none(tmp_path):
    reference = astronaut_reference(tmp_path)
    photo = astronaut()
    samples = tmp_path / "samples"
    samples.mkdir()
    same = [
        save(samples, "mirror.jpg", photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        save(samples, "closeup.jpg", photo.crop((100, 0, 400, 300)).resize((512, 512))),
        save(samples, "tilted.jpg", photo.rotate(7)),
    ]
    result = likeness.score(100, same, reference)
    assert (result.faces_found, result.matches, result.images) == (3, 3, 3) and result.score > 0.75
    cup = save(samples, "coffee.jpg", Image.fromarray(data.coffee()))
    other = save(samples, "stranger.jpg", stranger())
    assert likeness.score(200, [cup], reference).as_dict() == {
        "step": 200,
        "score": 0.0,
        "faces_found": 0,
        "matches": 0,
        "images": 1,
    }
    mixed = likeness.score(300, [*same, other], reference)
    assert (mixed.faces_found, mixed.matches) == (4, 3) and mixed.score < result.score


def test_a_dataset_without_faces_is_not_scored(tmp_path):
    dataset = tmp_path / "cups"
    dataset.mkdir()
    save(dataset, "coffee.jpg", Image.fromarray(data.coffee()))
    warnings: list[str] = []
    assert likeness.reference_face([dataset], warnings) is None
    assert warnings == ["likeness is not scored: no face was found in the dataset's photos"]


def test_best_and_stalled():
    scores = [likeness.Likeness(step, value, 1, 1, 1) for step, value in ((2, 0.2), (4, 0.5), (6, 0.5), (8, 0.3))]
    assert likeness.best(scores).step == 4  # the earliest of equal scores
    assert likeness.stalled(scores, 2) and not likeness.stalled(scores[:3], 2) and not likeness.stalled(scores, 4)


FAKE_SCORES = {2: 0.2, 4: 0.5, 6: 0.3, 8: 0.1, 10: 0.4}


@pytest.mark.slow
def test_every_save_is_scored_the_best_is_kept_and_a_stall_ends_the_run(tiny_models, data_root, monkeypatch):
    """Scores stood in by step (tiny models draw no faces): the best save (step 4) outlives
    max_step_saves_to_keep: 1, and with early_stop_on_likeness: 2 the run ends at step 8."""
    monkeypatch.setattr(
        likeness, "score", lambda step, images, reference: likeness.Likeness(step, FAKE_SCORES[step], 1, 1, len(images))
    )
    model_path = install_model(tiny_models, data_root, "sd15")
    upload("matt_training_test", {f"photo_{i}.jpg": jpeg(astronaut().rotate(3 * i)) for i in range(3)})
    text = user_yaml(
        model_path,
        "sd15",
        steps=10,
        replacements={
            "save_every: 2000": "save_every: 2",
            "      lr: 0.0001\n": "      lr: 0.0001\n      early_stop_on_likeness: 2\n",
        },
    )
    answer = train(text)
    assert answer["status"] == "success", answer
    assert [(s["step"], s["score"]) for s in answer["likeness"]] == [(2, 0.2), (4, 0.5), (6, 0.3), (8, 0.1)]
    assert answer["stopped_early"] is True and answer["steps"] == 8
    best = answer["best_checkpoint"]
    assert best == {"filename": "nowy_dataset_1.3_000000004.safetensors", "step": 4, "score": 0.5}
    folder = data_root / "output" / "nowy_dataset_1.3"
    assert (folder / best["filename"]).exists()  # kept beyond max_step_saves_to_keep: 1
    assert any("early_stop_on_likeness: no better likeness in the last 2 saves" in w for w in answer["warnings"])
    listed = handler({"id": "l", "input": {"type": "list_models"}})["models"]
    assert {m["filename"]: m["likeness"] for m in listed} == {
        "nowy_dataset_1.3.safetensors": 0.1,
        "nowy_dataset_1.3_000000004.safetensors": 0.5,
        "nowy_dataset_1.3_000000008.safetensors": 0.1,  # the newest step save (keep 1), step 6's is gone
    }
    recorded = json.loads((folder / "metadata.json").read_text())["likeness"]
    assert [s["step"] for s in recorded] == [2, 4, 6, 8]


@pytest.mark.slow
def test_real_scoring_runs_end_to_end_on_the_tiny_models(tiny_models, data_root):
    """No stand-ins: the tiny model's samples have no faces, and say so."""
    model_path = install_model(tiny_models, data_root, "sd15")
    upload("matt_training_test", {"photo.jpg": jpeg(astronaut())})
    answer = train(user_yaml(model_path, "sd15", steps=2, replacements={"save_every: 2000": "save_every: 1"}))
    assert answer["status"] == "success", answer
    assert [(s["step"], s["faces_found"], s["score"], s["images"]) for s in answer["likeness"]] == [
        (1, 0, 0.0, 3),
        (2, 0, 0.0, 3),
    ]
    assert answer["best_checkpoint"]["step"] == 1 and answer["stopped_early"] is False


def readme_likeness_rows(folder) -> list[str]:
    """README's scoring table: the astronaut as the dataset, each photo below scored as a sample."""
    reference = astronaut_reference(folder)
    photo = astronaut()
    samples = {
        "the astronaut, mirrored": photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "the astronaut, close-up": photo.crop((100, 0, 400, 300)).resize((512, 512)),
        "the astronaut, tilted 7 degrees": photo.rotate(7),
        "another person (LFW)": stranger(),
        "a coffee cup": Image.fromarray(data.coffee()),
    }
    rows = []
    for index, (name, image) in enumerate(samples.items()):
        result = likeness.score(index, [save(folder, f"{index}.jpg", image)], reference)
        verdict = "match" if result.matches else ("another face" if result.faces_found else "no face")
        rows.append(f"| {name} | {result.score:.2f} | {verdict} |")
    return rows


def test_readme_likeness_table_is_what_the_scoring_says(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for row in readme_likeness_rows(tmp_path):
        assert row in readme, row


@pytest.mark.slow
def test_a_resumed_run_keeps_the_scores_and_the_best_file(tiny_models, data_root, monkeypatch):
    """Killed after its step-4 save (the best): the resumed run still knows step 4 and keeps its file."""
    from fastbackend.training import trainer

    scores = {2: 0.2, 4: 0.9, 6: 0.3, 8: 0.1, 10: 0.4}
    monkeypatch.setattr(
        likeness, "score", lambda step, images, reference: likeness.Likeness(step, scores[step], 1, 1, len(images))
    )
    model_path = install_model(tiny_models, data_root, "sd15")
    upload("matt_training_test", {f"p{i}.jpg": jpeg(astronaut().rotate(3 * i)) for i in range(3)})
    text = user_yaml(model_path, "sd15", steps=10, replacements={"save_every: 2000": "save_every: 2"})
    real_step = trainer.train_step

    def killed_after_step_4(run):
        if run.step == 4:
            raise RuntimeError("worker killed")
        return real_step(run)

    monkeypatch.setattr(trainer, "train_step", killed_after_step_4)
    assert train(text)["error_code"] == "internal_error"
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = train(text)
    assert resumed["resumed_from_step"] == 4
    assert [s["step"] for s in resumed["likeness"]] == [2, 4, 6, 8, 10]
    assert resumed["best_checkpoint"] == {"filename": "nowy_dataset_1.3_000000004.safetensors", "step": 4, "score": 0.9}
    assert (data_root / "output" / "nowy_dataset_1.3" / "nowy_dataset_1.3_000000004.safetensors").exists()


@pytest.mark.slow
def test_each_dataset_photo_is_looked_at_once_per_run(tiny_models, data_root, monkeypatch):
    """The dataset report, the face crops and the likeness reference share one look per photo."""
    from fastbackend import faces

    looked: list[tuple[int, int]] = []
    real = faces.FaceModel.faces

    def counted(self, image):
        looked.append(image.size)
        return real(self, image)

    monkeypatch.setattr(faces.FaceModel, "faces", counted)
    model_path = install_model(tiny_models, data_root, "sd15")
    upload("matt_training_test", {f"p{i}.jpg": jpeg(astronaut().rotate(5 * i)) for i in range(3)})
    answer = train(user_yaml(model_path, "sd15", steps=1))
    assert answer["status"] == "success", answer
    assert [s["images"] for s in answer["likeness"]] == [3]
    assert looked.count((512, 512)) == 3 and len(looked) == 3 + 3  # 3 photos once, then the 3 samples
