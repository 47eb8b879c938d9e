"""FastBackend: a RunPod serverless worker that trains LoRA adapters for text-to-image models.

The package is imported lazily by ``handler_fast.py``; importing it (or any module that the
light request types use) never imports torch or diffusers.
"""

__version__ = "0.1.0"
