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

from fastbackend import hub_fetch, settings, stopping
from fastbackend.errors import ErrorCode, FastBackendError
from fastbackend.images import ImageProblem, open_upright
from fastbackend.schemas import MAX_CAPTION_CHARS, AutoCaption
from fastbackend.storage import HUB_ID, cached_hub_file, download_cache_dir, resolve_base_model

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
    rf"\b(?:a|an|the)\s+((?:{NOT_ADJECTIVE}[\w-]+\s+){{0,3}}?)({'|'.join(PERSON_NOUNS)})(?![\w-])", re.IGNORECASE
)
# Nouns that are often adjectives ("a baby elephant", "a male lion"): a person only when no noun follows.
AMBIGUOUS = frozenset({"baby", "male", "female", "kid"})
FOLLOWERS = re.compile(
    r"\s*(?:[,.;]|$)|\s+(?:with|in|on|at|by|next|and|is|was|who|that|wearing|holding|\w+ing)\b", re.IGNORECASE
)
PRONOUN_START = re.compile(r"^(?:he|she|they)\b", re.IGNORECASE)
TRAIT_NOUN = re.compile(rf"\b{TRAIT_NOUNS}\b", re.IGNORECASE)
WITH = re.compile(r"^\s*,?\s*with\s+", re.IGNORECASE)
# Where a "with ..." phrase after the person ends: a stop, a place, a relative clause or a verb.
WITH_END = re.compile(
    r"[.;]|,?\s+(?:in|on|at|against|near|by|behind|under|inside|outside|next|beside|who|that|is|are|was|\w+ing)\b",
    re.IGNORECASE,
)
WITH_ITEMS = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\b\s*", re.IGNORECASE)
# Whole sentences about fixed looks: "His hair is short." "She has blue eyes."
TRAIT_SENTENCE = re.compile(
    rf"^(?:(?:his|her|their|the (?:man|woman|person)'s)\s+(?:\w+\s+)?{TRAIT_NOUNS}\b"
    rf"|(?:he|she|they)\s+(?:has|have)\s+[^.]*\b{TRAIT_NOUNS}\b)",
    re.IGNORECASE,
)
# "His hair is short and he is wearing a suit." -> two pieces, the second kept.
AND_PRONOUN = re.compile(r",?\s+and\s+(?=(?:he|she|they)\b)", re.IGNORECASE)
# "He has short hair and is wearing a suit." keeps "He is wearing a suit."
HAS_TRAITS_AND = re.compile(
    rf"^((?:he|she|they)\s+)(?:has|have)\s+[^.]*?\b{TRAIT_NOUNS}\b[^.]*?\s+and\s+"
    r"((?:is|are|wears|wear|holds|hold|stands|sits|looks)\b)",
    re.IGNORECASE,
)


# ---------------------------------------------------------------- the words


def _subject(text: str) -> re.Match | None:
    """The first phrase naming a person ("a young man"), not an adjective use ("a baby elephant")."""
    for match in SUBJECT.finditer(text):
        if match.group(2).lower() not in AMBIGUOUS or FOLLOWERS.match(text, match.end()):
            return match
    return None


def subject_word(raw: str) -> str | None:
    """The class word of the first person a caption names ("a young man" -> "man"), or None."""
    match = _subject(raw)
    return PERSON_NOUNS[match.group(2).lower()] if match else None


def class_word_for(raws: list[str]) -> str:
    """The class word most of the captions name their person by; "person" when none names one."""
    found = Counter(word for word in map(subject_word, raws) if word)
    return found.most_common(1)[0][0] if found else "person"


def personalize(raw: str, trigger: str, class_word: str) -> str:
    """A raw caption as a person LoRA wants it: the person named ``<trigger> <class_word>``, fixed
    traits left out, the lead-in ("The image shows") dropped."""
    text = LEAD_IN.sub("", clean(raw), count=1)
    sentences = [_without_traits(s) for s in re.split(r"(?<=[.!?])\s+", text)]
    text = " ".join(s for s in sentences if s)
    match = _subject(text)
    if match is not None:
        kept = [word for word in match.group(1).split() if word.lower() not in TRAIT_WORDS]
        person = " ".join([*kept, trigger, class_word])
        named = text[: match.start()] + person + _without_trait_with(text[match.end() :])
    elif PRONOUN_START.match(text):  # "He is wearing a suit."
        named = PRONOUN_START.sub(f"{trigger} {class_word}", text, count=1)
    else:
        named = f"{trigger} {class_word}, {text}" if text else f"{trigger} {class_word}"
    return tidy(named)[:MAX_CAPTION_CHARS]


def _without_trait_with(rest: str) -> str:
    """``rest`` (what follows the person) without the traits of a "with ..." phrase right after
    them: "with short hair and a blue shirt in a park" -> "with a blue shirt in a park"."""
    opening = WITH.match(rest)
    if opening is None:
        return rest
    end = WITH_END.search(rest, opening.end())
    stop = end.start() if end else len(rest)
    items = [item for item in WITH_ITEMS.split(rest[opening.end() : stop]) if item]
    kept = [item for item in items if not TRAIT_NOUN.search(item)]
    if len(kept) == len(items):
        return rest
    tail = rest[stop:]
    if not kept:  # and a clause about the traits goes with them: "that falls over his shoulders"
        return re.sub(r"^\s+that\b[^,.;]*", "", tail, flags=re.IGNORECASE)
    return " with " + " and ".join(kept) + tail


def _without_traits(sentence: str) -> str:
    """A sentence without its statements of fixed looks (empty when that is all it says)."""
    if HAS_TRAITS_AND.match(sentence):
        return HAS_TRAITS_AND.sub(r"\1\2", sentence, count=1)
    pieces = AND_PRONOUN.split(sentence)
    kept = [piece for piece in pieces if not TRAIT_SENTENCE.match(piece)]
    if len(kept) == len(pieces):
        return sentence
    text = " and ".join(kept)
    return text[:1].upper() + text[1:]  # "he is wearing ..." now starts the sentence


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


# What a Florence-2 checkpoint needs of its repository: configs, tokenizer and the safetensors
# weights (not the pickled copies some repositories also hold).
CAPTIONER_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


def captioner_folder(source: str, field: str) -> str:
    """The captioner's local folder: ``source`` itself, its snapshot in a hub cache, or a fresh download."""
    if not HUB_ID.fullmatch(source):
        return source
    found = cached_hub_file(source, "config.json")
    if found is not None and (found[1].parent / "model.safetensors").is_file():  # a cut download has no weights
        return str(found[1].parent)
    return str(
        hub_fetch.fetch(source, None, CAPTIONER_FILES, download_cache_dir(), field, shown=f"the captioner {source!r}")
    )


def load_captioner(reference: str | None, field: str) -> Captioner:
    """Florence-2 from ``reference`` (a hub id, or a folder under the data root or a model dir;
    default ``FASTBACKEND_CAPTION_MODEL``), or ``model_load_failed`` naming ``field`` and the model."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Florence2ForConditionalGeneration

    shown = reference or settings.CAPTION_MODEL.get()
    folder = captioner_folder(_local_or_hub(shown, field), field)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_stop = stopping.stop_check("loading the captioner")  # between its parts (a small model: seconds)
    try:
        kind = AutoConfig.from_pretrained(folder).model_type
        if kind != "florence2":
            raise ValueError(f"it is a {kind!r} model; the captioner must be a Florence-2 checkpoint")
        check_stop()
        processor = AutoProcessor.from_pretrained(folder)
        check_stop()
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, info = Florence2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
        # Weights of another layout (the remote-code checkpoints) load as random layers: refuse them.
        unfit = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
        if unfit:
            raise ValueError(f"its weights do not fit Florence-2 ({len(unfit)} missing or mismatched)")
        check_stop()
    except stopping.JobStopped:
        raise
    except Exception as exc:  # a checkpoint can fail in many ways (bad files, configs, tokenizers)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise FastBackendError(
            f"{field}: could not load the captioner {shown!r} ({reason})", code=ErrorCode.MODEL_LOAD_FAILED
        ) from None
    return Captioner(model=model.to(device).eval(), processor=processor, device=device)


def _local_or_hub(reference: str, field: str) -> str:
    """A hub id, or a folder under the data root or a model dir (never one relative to the process)."""
    return resolve_base_model(reference, field, marker="config.json")


def write_captions(
    photos: dict[str, Path],
    captioner: Captioner,
    trigger: str,
    class_word: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, str], str, dict[str, str]]:
    """Captions for ``photos`` (name -> path), personalized, the class word used (given, or the one
    most raw captions name), and the photos that could not be read (name -> why: a photo on the
    volume may be damaged, or removed meanwhile). Photos go through the captioner a batch at a time."""
    names = sorted(photos)
    raws: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    check_stop = stopping.stop_check("captioning")
    for start in range(0, len(names), BATCH):
        check_stop()
        opened = {}
        for name in names[start : start + BATCH]:
            try:
                opened[name] = open_upright(photos[name])
            except (FileNotFoundError, ImageProblem) as exc:
                unreadable[name] = "it is no longer there" if isinstance(exc, FileNotFoundError) else str(exc)
        if opened:
            raws |= dict(zip(opened, captioner(list(opened.values())), strict=True))
        if progress:
            progress(len(raws) + len(unreadable), len(names))
    word = class_word or class_word_for(list(raws.values()))
    return {name: personalize(raw, trigger, word) for name, raw in raws.items()}, word, unreadable


def caption_photos(photos: dict[str, Path], options: AutoCaption, field: str, progress=None) -> dict:
    """Caption ``photos`` (name -> path): ``{"model", "class_word", "captions": {name: caption},
    "unreadable": {name: why}}``.
    ``progress`` (a request's callback) hears each batch. The captioner stays loaded for the next
    upload (a dataset comes in several requests under the payload limits) until another model or a
    training run needs the memory (``pipeline_cache``)."""
    from fastbackend.training import pipeline_cache

    shown = options.model or settings.CAPTION_MODEL.get()
    source = _local_or_hub(shown, f"{field}.model")
    report = (lambda done, total: progress({"stage": "captioning", "done": done, "total": total})) if progress else None
    with pipeline_cache.lock:
        captioner = pipeline_cache.kept(f"captioner:{source}", lambda: load_captioner(options.model, f"{field}.model"))
        captions, word, unreadable = write_captions(photos, captioner, options.trigger_word, options.class_word, report)
    return {"model": shown, "class_word": word, "captions": captions, "unreadable": unreadable}
