"""A small client for the worker: upload a folder of photos, train, list, download.

It splits uploads so that every request stays under RunPod's 10 MB limit, waits for long jobs
through ``/run`` + ``/status`` on RunPod, and checks downloads against their sha256.

    python -m fastbackend.client --url http://localhost:8000 upload matt_training_test photos/
    python -m fastbackend.client --url https://api.runpod.ai/v2/<endpoint id> --api-key $RUNPOD_API_KEY \\
        train examples/training.yaml
    python -m fastbackend.client --url ... list
    python -m fastbackend.client --url ... --route run --webhook https://example.com/hook train config.yaml
    python -m fastbackend.client --url ... download nowy_dataset_1.3 ./loras/

Locally (``--rp_serve_api``) use the default ``--route runsync``: the local server only runs
``/run`` jobs when their status is asked for.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from pathlib import Path

import requests

REQUEST_LIMIT_BYTES = 10_000_000
# Room for the JSON around the files, so that a batch never lands exactly on the limit.
BATCH_BYTES = REQUEST_LIMIT_BYTES - 100_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
POLL_INTERVAL_S = 5.0


class WorkerError(RuntimeError):
    """The worker answered with an error (its one-line message)."""


class Client:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        route: str = "runsync",
        timeout_s: float = 3600,
        webhook: str | None = None,
    ):
        self.url, self.route, self.timeout_s, self.webhook = url.rstrip("/"), route, timeout_s, webhook
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def call(self, payload: dict, notify: bool = False) -> dict:
        """Run one request and return its output; raise WorkerError when it failed. With ``notify``
        the request carries the webhook (training does; upload batches and download chunks do not)."""
        body = {"input": payload, "webhook": self.webhook} if notify and self.webhook else {"input": payload}
        if self.route == "run":
            answer = self._run_and_wait(body)
        else:
            response = self.session.post(f"{self.url}/runsync", json=body, timeout=self.timeout_s)
            response.raise_for_status()
            answer = response.json()
        if answer.get("status") != "COMPLETED":
            raise WorkerError(answer.get("error") or f"job ended {answer.get('status')}")
        return answer["output"]

    def _run_and_wait(self, body: dict) -> dict:
        response = self.session.post(f"{self.url}/run", json=body, timeout=60)
        response.raise_for_status()
        job_id = response.json()["id"]
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            status = self.session.get(f"{self.url}/status/{job_id}", timeout=60).json()
            if status.get("status") in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                return status
            if isinstance(status.get("output"), dict) and "step" in status["output"]:
                progress = status["output"]
                print(f"step {progress['step']}/{progress['total_steps']} loss {progress['loss']}", file=sys.stderr)
            time.sleep(POLL_INTERVAL_S)
        raise WorkerError(f"job {job_id} did not finish within {self.timeout_s:.0f}s")

    def upload_folder(self, name: str, folder: Path, mode: str = "append", auto_caption: bool = False) -> dict:
        """Every image in ``folder`` with its ``.txt`` caption, in as many requests as the limit needs;
        with ``auto_caption`` the worker captions the images that have no ``.txt``."""
        answers: list[dict] = []
        options: dict = {}
        for index, batch in enumerate(batches(folder)):
            payload = {
                "type": "upload_training_data",
                "training_name": name,
                "files": batch,
                "mode": mode if index == 0 else "append",
            }
            answers.append(self.call(payload | ({"auto_caption": options or True} if auto_caption else {})))
            if "auto_captions" in answers[-1]:  # one class word for the whole dataset: the first request's
                options = {"class_word": answers[-1]["auto_captions"]["class_word"]}
        if not answers:
            raise WorkerError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        last = answers[-1]
        return (
            last
            | {
                "uploaded_files": [f for a in answers for f in a["uploaded_files"]],
                "skipped": [s for a in answers for s in a["skipped"]],
                "requests": len(answers),
            }
            | _merged_captions(answers)
        )

    def download(self, model: str, destination: Path, filename: str | None = None) -> Path:
        """Fetch a LoRA in chunks and check it against the worker's sha256."""
        offset, digest, target = 0, hashlib.sha256(), None
        while offset is not None:
            chunk = self.call(
                {
                    "type": "download_model",
                    "model": model,
                    "offset": offset,
                    **({"filename": filename} if filename else {}),
                }
            )
            target = destination / chunk["filename"] if destination.is_dir() else destination
            data = base64.b64decode(chunk["content"])
            with target.open("wb" if offset == 0 else "ab") as handle:
                handle.write(data)
            digest.update(data)
            offset = chunk["next_offset"]
        if digest.hexdigest() != chunk["sha256"]:
            raise WorkerError(f"{target}: sha256 mismatch after download")
        return target


def _merged_captions(answers: list[dict]) -> dict:
    """The automatic captions of all of an upload's requests, as one answer would give them."""
    made = [a["auto_captions"] for a in answers if "auto_captions" in a]
    if not made:
        return {}
    return {"auto_captions": made[-1] | {"captions": {k: v for m in made for k, v in m["captions"].items()}}}


def batches(folder: Path) -> list[list[dict]]:
    """Files of ``folder`` grouped so that each group's base64 stays under BATCH_BYTES."""
    groups: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        entry = {"filename": path.name, "content": base64.b64encode(path.read_bytes()).decode("ascii")}
        caption = path.with_suffix(".txt")
        if caption.exists():
            entry["caption"] = caption.read_text(encoding="utf-8").strip()
        entry_size = len(json.dumps(entry))
        if entry_size > BATCH_BYTES:
            raise WorkerError(f"{path.name} is too large for one request; upload it with `urls` instead")
        if current and size + entry_size > BATCH_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry_size
    return groups + ([current] if current else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Talk to a FastBackend worker.")
    parser.add_argument("--url", required=True, help="http://localhost:8000, or your RunPod endpoint's URL")
    parser.add_argument("--api-key", help="RunPod API key (for a RunPod endpoint)")
    parser.add_argument("--route", choices=["runsync", "run"], default="runsync")
    parser.add_argument("--webhook", help="a URL RunPod posts a training's result to when it is done")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload a folder of photos (+ .txt captions)")
    upload.add_argument("name")
    upload.add_argument("folder", type=Path)
    upload.add_argument("--replace", action="store_true")
    upload.add_argument("--auto-caption", action="store_true", help="caption the images that have no .txt")
    caption = commands.add_parser("caption", help="caption a dataset's photos that have no caption")
    caption.add_argument("name")
    caption.add_argument("--again", action="store_true", help="also caption again what the captioner wrote")
    caption.add_argument("--trigger-word", help="names the person in each caption (default [trigger])")
    caption.add_argument("--class-word", help="what the person is (man, woman, ...)")
    commands.add_parser("train", help="train from an ai-toolkit YAML file").add_argument("config", type=Path)
    commands.add_parser("list", help="list the trained LoRAs")
    download = commands.add_parser("download", help="download a LoRA")
    download.add_argument("model")
    download.add_argument("destination", type=Path)
    args = parser.parse_args(argv)

    client = Client(args.url, args.api_key, args.route, webhook=args.webhook)
    try:
        if args.command == "upload":
            mode = "replace" if args.replace else "append"
            result = client.upload_folder(args.name, args.folder, mode, auto_caption=args.auto_caption)
        elif args.command == "caption":
            words = {"trigger_word": args.trigger_word, "class_word": args.class_word}
            options = {key: value for key, value in words.items() if value is not None}
            request = {"type": "caption_dataset", "training_name": args.name, "replace_automatic": args.again}
            result = client.call(request | ({"auto_caption": options} if options else {}))
        elif args.command == "train":
            result = client.call({"type": "train_with_yaml", "yaml_config": args.config.read_text()}, notify=True)
        elif args.command == "list":
            result = client.call({"type": "list_models"})
        else:
            result = {"path": str(client.download(args.model, args.destination))}
    except (WorkerError, requests.RequestException) as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
