# syntax=docker/dockerfile:1
# FastBackend: the RunPod serverless LoRA trainer.
# torch's CUDA wheels carry their own CUDA runtime, so a slim Python base is enough; the GPU
# driver comes from the RunPod host.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# Unbuffered logs reach RunPod's console as they happen; no .pyc files in the image.
# RUNPOD_MIN_CUDA_VERSION: runpod's start-up check stops a worker whose driver supports an older CUDA
# than torch's build (torch 2.13.0 from the package index is a CUDA 13.0 build: driver 580 or newer),
# instead of a worker that would train on the CPU. Its 1024x1024 matmul check times cuBLAS's first
# start too: 10 s instead of 2 keeps a busy host's worker from being killed for that.
ENV PYTHONUNBUFFERED=1 \
    RUNPOD_MIN_CUDA_VERSION=13.0 \
    RUNPOD_GPU_BENCHMARK_TIMEOUT=10 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A C compiler: torch.compile (train.compile) builds small launchers for its GPU kernels with it.
# Not pinned: Debian replaces point releases in place, so a pinned version stops resolving.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

# Dependencies first, in their own layer, so code changes do not reinstall torch.
COPY requirements.txt .
RUN pip install -r requirements.txt

# Optionally bake one hub model into the image, for the fastest cold start (README: Deploy):
#   docker build --build-arg BAKED_MODEL=black-forest-labs/FLUX.1-dev --secret id=hf_token,env=HF_TOKEN .
# The token is a build secret: mounted for this step only, it is in no layer, argument or variable.
# The single-file checkpoints beside the diffusers folders are not needed and not fetched.
ARG BAKED_MODEL=""
RUN --mount=type=secret,id=hf_token \
    if [ -n "$BAKED_MODEL" ]; then \
      HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
        hf download "$BAKED_MODEL" --local-dir "/models/$BAKED_MODEL" \
        --exclude "flux1-*.safetensors" --exclude "ae.safetensors" --exclude "*.gguf"; \
    fi
ENV FASTBACKEND_MODEL_DIRS=/models

# The worker itself. Models not baked in are downloaded at run time into the volume's hub cache
# (<volume>/huggingface-cache/hub, where RunPod's model caching puts them too); HF_TOKEN for
# gated models is set on the endpoint, never here.
COPY fastbackend/ fastbackend/
COPY handler.py handler_fast.py test_input.json ./

CMD ["python", "-u", "handler_fast.py"]
