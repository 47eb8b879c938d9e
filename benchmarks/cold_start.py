"""Cold start: process start to answer for ``--test_input`` health, against a bare runpod handler.

Both run in the same loop, alternating, so machine noise hits them alike; the ratio is the
claim (aim: within 1.25x of the bare handler, whose cost is mostly ``import runpod``).

    .venv/bin/python -m benchmarks.cold_start [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BARE_HANDLER = """
import runpod

def handler(job):
    return {"status": "healthy"}

runpod.serverless.start({"handler": handler})
"""
HEALTH = '{"input": {"type": "health"}}'


def time_run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare_handler.py"
        bare.write_text(BARE_HANDLER)
        commands = {
            "bare runpod handler": [sys.executable, str(bare), "--test_input", HEALTH],
            "handler_fast.py health": [sys.executable, str(REPO / "handler_fast.py"), "--test_input", HEALTH],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, args in commands.items():
                times[name].append(time_run(args, cwd=Path(tmp)))
    base = statistics.median(times["bare runpod handler"])
    print(f"{'command':<26}{'median s':>10}{'min s':>8}{'ratio':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<26}{median:>10.3f}{min(samples):>8.3f}{median / base:>8.2f}")


if __name__ == "__main__":
    main()
