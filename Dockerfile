# FastBackend: the RunPod serverless LoRA trainer.
# torch's CUDA wheels carry their own CUDA runtime, so a slim Python base is enough; the GPU
# driver comes from the RunPod host.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# Unbuffered logs reach RunPod's console as they happen; no .pyc files in the image.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall torch.
COPY requirements.txt .
RUN pip install -r requirements.txt

# The worker itself. Base models are downloaded at run time into the network volume
# (<volume>/huggingface-cache); HF_TOKEN for gated models is set on the endpoint, never here.
COPY fastbackend/ fastbackend/
COPY handler.py handler_fast.py test_input.json ./

CMD ["python", "-u", "handler_fast.py"]
