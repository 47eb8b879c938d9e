"""The whole flow a user runs, end to end through ``handler``: upload photos, train, list, locate the LoRA.

    python -m devtools.demo                      # tiny FLUX-shaped model, CPU, offline, ~1 minute
    python -m devtools.demo --arch sdxl          # or sd15, zimage, qwen_image, flux2_klein_4b, flux2
    python -m devtools.demo --model black-forest-labs/FLUX.1-dev --steps 2000   # the real thing, on a GPU

With no ``--model`` it builds a tiny random-weight pipeline on the volume and trains it with
the user's config (examples/training.yaml) with only the model path, steps and resolutions
changed. That proves the pipeline (upload, caching, LoRA training, saving, listing), not image
quality: the base model is random. With ``--model`` the config runs as written apart from
``--steps``, and needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "training.yaml"
DATASET = "matt_training_test"  # the dataset examples/training.yaml trains on


def call(handler, payload: dict) -> dict:
    answer = handler({"id": f"demo-{payload['type']}", "input": payload})
    if answer.get("status") == "error":
        sys.exit(f"{payload['type']} failed: {answer['error']}")
    return answer


def tiny_config(model_path: str, arch: str, steps: int) -> str:
    """The user's YAML with the model, steps and resolutions changed, and samples small."""
    text = CONFIG.read_text()
    text = text.replace("black-forest-labs/FLUX.1-dev", model_path).replace("steps: 2000", f"steps: {steps}")
    text = text.replace("      - 512\n      - 768\n      - 1024\n      - 1280\n", "      - 64\n      - 96\n")
    text = text.replace("width: 1024", "width: 64").replace("height: 1280", "height: 64")
    text = text.replace("sample_every: 100", f"sample_every: {steps}").replace("sample_steps: 20", "sample_steps: 4")
    return text if arch == "flux" else text.replace("is_flux: true", f"arch: {arch}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Upload, train, list: the whole flow through the handler.")
    parser.add_argument(
        "--arch",
        choices=["flux", "sdxl", "sd15", "zimage", "qwen_image", "flux2_klein_4b", "flux2"],
        default="flux",
        help="tiny model architecture",
    )
    parser.add_argument("--model", help="a hub id or a model folder under the data root (real training; GPU)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from devtools import tiny
    from devtools.photos import synthetic_photo
    from fastbackend.storage import data_root
    from handler_fast import handler

    print(json.dumps(call(handler, {"type": "health"}), indent=1))
    for batch in (range(5), range(5, 9)):  # two requests, as a client under the 10 MB limit sends them
        files = [
            {
                "filename": f"IMG_{i:04d}.jpg",
                "content": _b64(synthetic_photo(384 + 32 * i, 512 - 16 * i, i)),
                "caption": f"Matt, photo {i}",
            }
            for i in batch
        ]
        uploaded = call(handler, {"type": "upload_training_data", "training_name": DATASET, "files": files})
    print(f"dataset {DATASET}: {uploaded['total_images']} images in {uploaded['training_folder']}")

    if args.model:
        config = (
            CONFIG.read_text()
            .replace("black-forest-labs/FLUX.1-dev", args.model)
            .replace("steps: 2000", f"steps: {args.steps}")
        )
    else:
        folder = tiny.build(args.arch, data_root() / "models" / f"tiny-{args.arch}")
        print(f"built a tiny random-weight {args.arch} pipeline in {folder} (proves the pipeline, not image quality)")
        config = tiny_config(str(folder), args.arch, args.steps)
    trained = call(handler, {"type": "train_with_yaml", "yaml_config": config})
    summary = {
        k: trained[k] for k in ("model", "arch", "steps", "final_loss", "duration_s", "lora_path", "size", "sha256")
    }
    print(json.dumps(summary | {"warnings": trained["warnings"], "samples": trained["samples"][-3:]}, indent=1))
    models = call(handler, {"type": "list_models"})
    print(f"list_models: {models['total_count']} file(s): {[m['filename'] for m in models['models']]}")
    print(f"\nYour LoRA: {trained['lora_path']}")


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


if __name__ == "__main__":
    main()
