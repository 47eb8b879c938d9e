"""The model families the trainer knows, by their config name (``model.arch``).

Adding a family is one file beside these that subclasses ``Family``, one entry here, and its
name among ``config.ModelConfig.arch``'s choices (a test checks the two lists agree).
"""

from __future__ import annotations

from fastbackend.training.families.base import Family, LossOptions, TrainingBatch
from fastbackend.training.families.flux import Flux
from fastbackend.training.families.flux2 import Flux2Dev, Flux2Klein, Flux2Klein9B
from fastbackend.training.families.qwen_image import QwenImage
from fastbackend.training.families.sd15 import SD15
from fastbackend.training.families.sdxl import SDXL
from fastbackend.training.families.zimage import ZImage

FAMILIES: dict[str, type[Family]] = {
    family.name: family for family in (SD15, SDXL, Flux, ZImage, QwenImage, Flux2Dev, Flux2Klein, Flux2Klein9B)
}


def family_for(name: str, v_prediction: bool = False) -> Family:
    """The family named ``name`` (as ``config`` resolved it); ``v_prediction`` for SD 1.5 / SDXL."""
    return FAMILIES[name](v_prediction)


__all__ = ["FAMILIES", "Family", "LossOptions", "TrainingBatch", "family_for"]
