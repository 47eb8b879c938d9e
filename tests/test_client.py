"""The client splits uploads under the request limit and refuses what cannot fit."""

import json

import pytest

from fastbackend import client


def test_batches_stay_under_the_limit_and_carry_captions(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BATCH_BYTES", 3000)
    for index in range(5):
        (tmp_path / f"img{index}.jpg").write_bytes(bytes(1000))
    (tmp_path / "img0.txt").write_text("Matt, photo\n")
    (tmp_path / "notes.md").write_text("not an image")
    groups = client.batches(tmp_path)
    assert [len(group) for group in groups] == [2, 2, 1]
    assert all(sum(len(json.dumps(entry)) for entry in group) <= 3000 for group in groups)
    assert groups[0][0]["caption"] == "Matt, photo" and "caption" not in groups[0][1]


def test_a_file_too_large_for_any_request_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BATCH_BYTES", 1000)
    (tmp_path / "huge.jpg").write_bytes(bytes(2000))
    with pytest.raises(
        client.WorkerError, match=r"huge\.jpg is too large for one request; upload it with `urls` instead"
    ):
        client.batches(tmp_path)


def test_auto_caption_goes_with_every_request_and_the_captions_come_back_together(tmp_path, monkeypatch):
    monkeypatch.setattr(client, "BATCH_BYTES", 3000)
    for index in range(3):
        (tmp_path / f"img{index}.jpg").write_bytes(bytes(1000))
    sent = []

    def call(self, payload):
        sent.append(payload)
        names = [entry["filename"] for entry in payload["files"]]
        made = {"model": "m", "class_word": "man", "captions": {name: f"[trigger] man {name}" for name in names}}
        return {"uploaded_files": names, "skipped": [], "auto_captions": made}

    monkeypatch.setattr(client.Client, "call", call)
    result = client.Client("http://localhost:8000").upload_folder("matt", tmp_path, auto_caption=True)
    assert len(sent) == 2 and sent[0]["auto_caption"] is True
    assert sent[1]["auto_caption"] == {"class_word": "man"}  # the first request's, for the whole dataset
    assert result["auto_captions"]["captions"] == {f"img{i}.jpg": f"[trigger] man img{i}.jpg" for i in range(3)}


def test_caption_asks_the_worker_to_caption_a_dataset_already_there(monkeypatch, capsys):
    sent = []
    monkeypatch.setattr(client.Client, "call", lambda self, payload, notify=False: sent.append(payload) or {"ok": 1})
    client.main(["--url", "http://localhost:8000", "caption", "matt", "--again"])
    assert sent == [{"type": "caption_dataset", "training_name": "matt", "replace_automatic": True}]
    assert json.loads(capsys.readouterr().out) == {"ok": 1}
    client.main(["--url", "http://localhost:8000", "caption", "matt", "--class-word", "woman"])
    assert sent[1] == {
        "type": "caption_dataset",
        "training_name": "matt",
        "replace_automatic": False,
        "auto_caption": {"class_word": "woman"},
    }
