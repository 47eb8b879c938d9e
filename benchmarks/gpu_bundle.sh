#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for its Python (3.12, Linux x86_64), into gpu_wheels/
# (git-ignored; the device tool carries it). The machine has torch, transformers, peft,
# accelerate, safetensors and huggingface_hub, and no network. bitsandbytes' wheel is 43 MB of
# the 64 MiB that may travel: it is trimmed to the CUDA 13 library that machine's torch uses.
#
#   bash benchmarks/gpu_bundle.sh               # here, before the device run
#   bash benchmarks/gpu_bundle.sh 3.11 /tmp/w   # the same for this machine's Python: a rehearsal
# then, on the device, in one command (README: On a GPU):
#   pip install --no-index --find-links gpu_wheels diffusers bitsandbytes pydantic prodigyopt \
#       && python3 -m benchmarks.gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
out="${2:-gpu_wheels}"
pins() {  # the versions requirements.txt pins (and pip resolved here), so the check runs what ships
    .venv/bin/python -c "from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in '$*'.split()))"
}
rm -rf "$out" && mkdir -p "$out"
# shellcheck disable=SC2046
.venv/bin/pip download --quiet --no-deps --only-binary=:all: --dest "$out" \
    --python-version "$python_version" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
    $(pins diffusers bitsandbytes pydantic pydantic_core annotated_types typing_inspection typing_extensions \
        prodigyopt importlib_metadata lazy_importer)
.venv/bin/python - "$out" <<'PY'
"""Keep bitsandbytes' CPU and CUDA 13 libraries only, and its RECORD to match."""
import sys
import zipfile
from pathlib import Path

for wheel in Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        def kept(name: str) -> bool:
            library = Path(name).name
            if not library.startswith("libbitsandbytes_"):
                return True
            return library.startswith(("libbitsandbytes_cpu", "libbitsandbytes_cuda13"))
        for item in source.infolist():
            if not kept(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if kept(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            target.writestr(item, data)
    trimmed.replace(wheel)
PY
du -sh "$out"
ls -l "$out"
