"""The training core: typed config in, LoRA files out. It never imports runpod."""
