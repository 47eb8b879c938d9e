"""Captions written for the user: a Florence-2 caption of each photo, rewritten for a person LoRA.

A LoRA of one person learns best from captions that name the person by the trigger word and a
class word ("ohwx man") and describe only what changes from photo to photo (clothes, pose,
setting, light). What never changes (hair, eyes, beard, skin, age) is left out so that it binds
to the trigger instead of to words the user will not write at generation time.

The captioner is Florence-2 as transformers loads it natively (``Florence2ForConditionalGeneration``,
no remote code), from the hub or a folder under the data root. Its detailed captions read like
"The image shows a man with short brown hair and a beard, wearing a blue shirt, standing in front
of a brick wall."; ``personalize`` turns that into "[trigger] man, wearing a blue shirt, standing in
front of a brick wall." ai-toolkit replaces ``[trigger]`` with the config's trigger word at training.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastbackend import settings
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.images import open_upright
from fastbackend.schemas import MAX_CAPTION_CHARS, AutoCaption
from fastbackend.storage import HUB_ID, hf_cache_dir, resolve_base_model

TASK = "<DETAILED_CAPTION>"  # Florence-2's task token for a few sentences about the whole image
BATCH = 8
MAX_NEW_TOKENS = 256
BEAMS = 3  # the model card's setting: greedy captions repeat themselves more

# The nouns a caption names a person by, and the class word each stands for.
PERSON_NOUNS = {
    "man": "man",
    "men": "man",
    "guy": "man",
    "gentleman": "man",
    "male": "man",
    "boy": "boy",
    "woman": "woman",
    "women": "woman",
    "lady": "woman",
    "female": "woman",
    "girl": "girl",
    "person": "person",
    "people": "person",
    "child": "child",
    "kid": "child",
    "baby": "baby",
    "teenager": "teenager",
}
# Adjectives of what a person is rather than what they do or wear: they bind to the trigger.
# fmt: off
TRAIT_WORDS = frozenset({
    "young", "old", "older", "elderly", "aged", "middle-aged",
    "asian", "african", "african-american", "caucasian", "white", "black", "hispanic", "latino", "latina", "indian",
    "european", "blond", "blonde", "brunette", "redhead", "red-haired", "dark-haired", "fair-haired", "long-haired",
    "short-haired", "curly-haired", "bearded", "bald", "balding", "freckled",
    "tall", "slim", "thin", "skinny", "chubby", "fat", "overweight", "muscular",
    "handsome", "beautiful", "pretty", "attractive", "cute",
})
# fmt: on
# Nouns of the body a caption describes a person's fixed look by.
TRAIT_NOUNS = r"(?:hair|hairstyle|beard|mustache|moustache|stubble|goatee|eyes|eyebrows|skin|complexion|freckles)"
LEAD_IN = re.compile(
    r"^\s*(?:(?:the|this) (?:image|picture|photo|photograph) (?:shows|is of|is|depicts|features|captures)"
    r"|in (?:the|this) (?:image|picture|photo),? (?:we can see|there is|there are|is)|this is)\s+",
    re.IGNORECASE,
)
NOT_ADJECTIVE = r"(?!(?:a|an|the|of|with|in|on|at|and|or|is|are|who|that|his|her|their)\b)"
SUBJECT = re.compile(
    rf"\b(?:a|an|the)\s+((?:{NOT_ADJECTIVE}[\w-]+\s+){{0,3}}?)({'|'.join(PERSON_NOUNS)})\b", re.IGNORECASE
)
# "with short brown hair and a beard" right after the subject, up to the next clause.
WITH_TRAITS = re.compile(
    rf"^\s*,?\s*with\s+[^,.;]*?\b{TRAIT_NOUNS}\b[^,.;]*?"
    r"(?=[,.;]|\s+(?:is|are|was|who|that|and\s+(?:is|are|wearing))\b|\s+\w+ing\b|$)",
    re.IGNORECASE,
)
# Whole sentences about fixed looks: "His hair is short and dark." "She has blue eyes."
TRAIT_SENTENCE = re.compile(
    rf"^(?:(?:his|her|their|the (?:man|woman|person)'s)\s+(?:\w+\s+)?{TRAIT_NOUNS}\b"
    rf"|(?:he|she|they)\s+(?:has|have)\s+[^.]*\b{TRAIT_NOUNS}\b)",
    re.IGNORECASE,
)
# "He has short hair and is wearing a suit." keeps "He is wearing a suit."
HAS_TRAITS_AND = re.compile(
    rf"^((?:he|she|they)\s+)(?:has|have)\s+[^.]*?\b{TRAIT_NOUNS}\b[^.]*?\s+and\s+((?:is|are)\s+)", re.IGNORECASE
)


# ---------------------------------------------------------------- the words


def subject_word(raw: str) -> str | None:
    """The class word of the first person a caption names ("a young man" -> "man"), or None."""
    match = SUBJECT.search(raw)
    return PERSON_NOUNS[match.group(2).lower()] if match else None


def class_word_for(raws: list[str]) -> str:
    """The class word most of the captions name their person by; "person" when none names one."""
    found = Counter(word for word in map(subject_word, raws) if word)
    return found.most_common(1)[0][0] if found else "person"


def personalize(raw: str, trigger: str, class_word: str) -> str:
    """A raw caption as a person LoRA wants it: the person named ``<trigger> <class_word>``, fixed
    traits left out, the lead-in ("The image shows") dropped."""
    text = LEAD_IN.sub("", clean(raw), count=1)
    match = SUBJECT.search(text)
    if match is None:
        named = f"{trigger} {class_word}, {text}" if text else f"{trigger} {class_word}"
    else:
        kept = [word for word in match.group(1).split() if word.lower() not in TRAIT_WORDS]
        rest = WITH_TRAITS.sub("", text[match.end() :], count=1)
        named = text[: match.start()] + " ".join([*kept, trigger, class_word]) + rest
    sentences = [_without_traits(s) for s in re.split(r"(?<=[.!?])\s+", named)]
    return tidy(" ".join(s for s in sentences if s))[:MAX_CAPTION_CHARS]


def _without_traits(sentence: str) -> str:
    if HAS_TRAITS_AND.match(sentence):
        return HAS_TRAITS_AND.sub(r"\1\2", sentence, count=1)
    return "" if TRAIT_SENTENCE.match(sentence) else sentence


def clean(text: str) -> str:
    """Printable text on one line (a captioner can emit stray bytes)."""
    return " ".join("".join(c if c.isprintable() and c != "\ufffd" else " " for c in text).split())


def tidy(text: str) -> str:
    text = re.sub(r"\s+([,.;])", r"\1", " ".join(text.split()))
    text = re.sub(r"([,;])(?:\s*[,;])+", r"\1", text)
    return text.strip(" ,;")


# ---------------------------------------------------------------- the captioner


@dataclass
class Captioner:
    """A loaded Florence-2 model and its processor."""

    model: Any  # Florence2ForConditionalGeneration
    processor: Any  # Florence2Processor
    device: str

    def __call__(self, images: list) -> list[str]:
        """Raw captions of PIL images (one batch), in order."""
        import torch

        inputs = self.processor(text=[TASK] * len(images), images=images, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # Never past the decoder's positions (1024 in the published checkpoints).
        longest = min(MAX_NEW_TOKENS, self.model.config.text_config.max_position_embeddings - 2)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=longest, num_beams=BEAMS, do_sample=False)
        return [clean(text) for text in self.processor.batch_decode(out, skip_special_tokens=True)]


def load_captioner(reference: str | None, field: str) -> Captioner:
    """Florence-2 from ``reference`` (a hub id, or a folder under the data root or a model dir;
    default ``FASTBACKEND_CAPTION_MODEL``), or ``model_load_failed`` naming ``field`` and the model."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Florence2ForConditionalGeneration

    shown = reference or settings.CAPTION_MODEL.get()
    source = _local_or_hub(shown, field)
    options = {"cache_dir": str(hf_cache_dir()), "token": settings.HF_TOKEN.get()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = AutoConfig.from_pretrained(source, **options).model_type
        if kind != "florence2":
            raise ValueError(f"it is a {kind!r} model; the captioner must be a Florence-2 checkpoint")
        processor = AutoProcessor.from_pretrained(source, **options)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = Florence2ForConditionalGeneration.from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FastBackendError(
            f"{field}: could not load the captioner {shown!r} ({reason})", code=ErrorCode.MODEL_LOAD_FAILED
        ) from None
    return Captioner(model=model.to(device).eval(), processor=processor, device=device)


def _local_or_hub(reference: str, field: str) -> str:
    if HUB_ID.fullmatch(reference) and not reference.startswith("."):
        return reference
    return resolve_base_model(reference, field, marker="config.json")


def write_captions(
    photos: dict[str, Path],
    captioner: Captioner,
    trigger: str,
    class_word: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, str], str]:
    """Captions for ``photos`` (name -> path), personalized, and the class word used (given, or the one
    most raw captions name). Photos go through the captioner a batch at a time."""
    names = sorted(photos)
    raws: list[str] = []
    for start in range(0, len(names), BATCH):
        chunk = names[start : start + BATCH]
        raws += captioner([open_upright(photos[name]) for name in chunk])
        if progress:
            progress(len(raws), len(names))
    word = class_word or class_word_for(raws)
    return {name: personalize(raw, trigger, word) for name, raw in zip(names, raws, strict=True)}, word


def caption_photos(photos: dict[str, Path], options: AutoCaption, field: str, progress=None) -> dict:
    """Load the captioner, caption ``photos`` (name -> path), let it go: ``{"model", "class_word",
    "captions": {name: caption}}``. ``progress`` (a request's callback) hears each batch."""
    import torch

    captioner = load_captioner(options.model, f"{field}.model")
    report = (lambda done, total: progress({"stage": "captioning", "done": done, "total": total})) if progress else None
    try:
        captions, word = write_captions(photos, captioner, options.trigger_word, options.class_word, report)
    finally:
        del captioner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"model": options.model or settings.CAPTION_MODEL.get(), "class_word": word, "captions": captions}
