"""Upload peak memory: an honest large upload and hostile ones, each in a fresh process.

Each case runs ``handler`` once in its own process and reports how far the resident set grew
while the request ran (peak RSS minus RSS after the imports and the request's own JSON), next to
how many bytes the request unpacks to. Memory should stay near a chunk plus one decoded image
per checking thread, whatever the request brings:

- honest: phone photos (~3 MB each) in one zip behind a loopback URL;
- zip bomb: an inline zip of about 2 MB that unpacks to 1.9 GB of zeros named like photos;
- URL repeats: five URLs of one 0.4 MB zip that unpacks to 380 MB each.

    .venv/bin/python -m benchmarks.upload_memory [--photos 40]
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

ENTRY_MB = 38  # under the 40 MB per-file limit


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def zeros_zip(entries: int) -> bytes:
    zeros = bytes(ENTRY_MB << 20)
    return zip_of({f"IMG_{index:04d}.jpg": zeros for index in range(entries)})


def child(job_file: str) -> None:
    """Run one job and print its peak resident set and the one before it (KiB) as JSON."""
    import logging

    import fastbackend.api.datasets  # noqa: F401  (what the job imports lazily: part of the baseline)
    from handler_fast import handler

    logging.getLogger("fastbackend").setLevel(logging.ERROR)
    job = json.loads(Path(job_file).read_text())
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = proc_status_kib("VmHWM")
    answer = handler(job)
    print(json.dumps({"before_kib": before, "peak_kib": proc_status_kib("VmHWM"), "status": answer.get("status")}))


def proc_status_kib(field: str) -> int:
    """A memory figure of this process from Linux's /proc (kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def run_case(payload: dict, tmp: Path, name: str) -> dict:
    job = {"id": "bench", "input": {"type": "upload_training_data", "training_name": name, **payload}}
    job_file = tmp / f"{name}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "FASTBACKEND_DATA_DIR": str(tmp / f"volume-{name}"), "FASTBACKEND_ALLOW_PRIVATE_URLS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.upload_memory", "--child", str(job_file)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve(folder: Path) -> str:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from benchmarks.upload import make_photos

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        served = tmp / "served"
        served.mkdir()
        base = serve(served)
        photos = make_photos(args.photos)
        (served / "photos.zip").write_bytes(zip_of(dict(photos), zipfile.ZIP_STORED))
        (served / "zeros.zip").write_bytes(zeros_zip(10))
        bomb = zeros_zip(50)
        cases = [
            ("honest", {"urls": [f"{base}/photos.zip"]}, sum(len(d) for _, d in photos), "success"),
            ("zip_bomb", {"zip": base64.b64encode(bomb).decode()}, 50 * ENTRY_MB << 20, "error"),
            ("url_repeats", {"urls": [f"{base}/zeros.zip"] * 5}, 5 * 10 * ENTRY_MB << 20, "error"),
        ]
        print(f"{'case':<14}{'unpacked MB':>12}{'RSS growth MB':>15}{'growth/unpacked':>17}  answer")
        for name, payload, unpacked, expected in cases:
            figures = run_case(payload, tmp, name)
            assert figures["status"] == expected, (name, figures)
            growth = (figures["peak_kib"] - figures["before_kib"]) / 1024
            print(f"{name:<14}{unpacked / 2**20:>12.0f}{growth:>15.1f}{growth / (unpacked / 2**20):>17.3f}  {expected}")


if __name__ == "__main__":
    main()
