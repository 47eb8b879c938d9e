"""Typed models of every request type, checked at the edge before any work starts.

Each model refuses unknown keys, so a typo is an error rather than a silently ignored
option. ``parse_request`` turns pydantic's errors into one-line messages that name the field
(``input.files[2].filename``) and the bad value, collecting every problem at once.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fastbackend.errors import ValidationFailed, show_value
from fastbackend.storage import name_problem

MAX_CAPTION_CHARS = 4000
MAX_URLS = 200
# A download chunk is base64-encoded in the answer (4/3 larger) and must stay under the
# 10 MB /run result limit with room for the other fields.
MAX_DOWNLOAD_CHUNK_BYTES = 7_000_000


def _safe_name(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str


class HealthRequest(Request):
    deep: bool = Field(False, description="Also report GPU facts (imports torch).")


class ListModelsRequest(Request):
    pass


class ListDatasetsRequest(Request):
    pass


class DeleteDatasetRequest(Request):
    training_name: SafeName


class AnalyzeDatasetRequest(Request):
    training_name: SafeName
    resolution: list[int] = Field(
        default_factory=lambda: [512, 768, 1024],
        min_length=1,
        max_length=16,
        description="The buckets the photos will train at (datasets[].resolution), to compare their sizes with.",
    )

    @field_validator("resolution")
    @classmethod
    def _sizes(cls, sizes: list[int]) -> list[int]:
        for size in sizes:
            if not 32 <= size <= 4096:
                raise ValueError(f"each resolution must be between 32 and 4096, got {size}")
        return sizes


class DeleteModelRequest(Request):
    model: SafeName


class DownloadModelRequest(Request):
    model: SafeName
    filename: SafeName | None = Field(None, description="A file in the model folder; default <model>.safetensors.")
    offset: int = Field(0, ge=0)
    length: int = Field(MAX_DOWNLOAD_CHUNK_BYTES, gt=0, le=MAX_DOWNLOAD_CHUNK_BYTES)
    url: bool = Field(False, description="Answer a presigned bucket URL instead of base64 chunks.")


class GetSamplesRequest(Request):
    model: SafeName
    step: int | None = Field(None, ge=0, description="The step whose samples to return; default the newest.")


AUTO = "auto"  # a file's caption that asks for an automatic one


class AutoCaption(BaseModel):
    """How automatic captions are written (``auto_caption``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    trigger_word: str = Field(
        "[trigger]",
        min_length=1,
        max_length=200,
        description="Names the person in each caption; `[trigger]` is replaced by the config's trigger_word.",
    )
    class_word: str | None = Field(
        None,
        min_length=1,
        max_length=50,
        description="What the person is (man, woman, ...); default the word most captions use.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        description="A Florence-2 checkpoint (hub id or folder); default the setting.",
    )

    @field_validator("trigger_word")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError(f"must be one line, got {show_value(value)}")
        if not any(c.isalnum() for c in value):
            raise ValueError(f"must contain a letter or digit, got {show_value(value)}")
        return value

    @field_validator("class_word")
    @classmethod
    def _plain_words(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z][A-Za-z -]*", value):
            raise ValueError(f"must be plain words (letters, spaces, hyphens), got {show_value(value)}")
        return value


class UploadFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    filename: SafeName
    content: str = Field(description="The file's bytes, base64-encoded.")
    caption: str | None = Field(None, max_length=MAX_CAPTION_CHARS, description='Its caption, or "auto".')


class CaptionDatasetRequest(Request):
    training_name: SafeName
    auto_caption: AutoCaption = Field(
        default_factory=AutoCaption, description="How the captions are written (true, or the options)."
    )
    replace_automatic: bool = Field(
        False, description="Caption again the photos whose caption the captioner wrote (never a user's)."
    )

    @field_validator("auto_caption", mode="before")
    @classmethod
    def _true_means_the_defaults(cls, value: object) -> object:
        return {} if value is True else value


class UploadTrainingDataRequest(Request):
    training_name: SafeName
    files: list[UploadFile] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list, max_length=MAX_URLS)
    zip: str | None = Field(None, description="A .zip of images and .txt captions, base64-encoded.")
    mode: Literal["append", "replace"] = "append"
    overwrite: bool = Field(False, description="Replace images already in the dataset under the same name.")
    auto_caption: AutoCaption | None = Field(
        None, description="Caption every image that comes without a caption (true, or the options)."
    )

    @field_validator("auto_caption", mode="before")
    @classmethod
    def _true_means_the_defaults(cls, value: object) -> object:
        return {} if value is True else None if value is False else value

    @property
    def caption_options(self) -> AutoCaption:
        return self.auto_caption or AutoCaption()

    @model_validator(mode="after")
    def _something_to_upload(self) -> UploadTrainingDataRequest:
        if not self.files and not self.urls and self.zip is None:
            raise ValueError("nothing to upload: give at least one of `files`, `urls` or `zip`")
        return self


class DatasetSource(BaseModel):
    """A dataset a training request brings with it, so that it trains on whichever volume it lands."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="The photos and captions as the client has them (content_sha256)."
    )
    files: list[UploadFile] = Field(default_factory=list)
    urls: list[str] = Field(default_factory=list, max_length=MAX_URLS)
    zip: str | None = Field(None, description="A .zip of images and .txt captions, base64-encoded.")

    @property
    def brings_photos(self) -> bool:
        return bool(self.files or self.urls or self.zip is not None)


class TrainWithYamlRequest(Request):
    yaml_config: str | None = Field(None, description="An ai-toolkit YAML config, as text.")
    config: dict[str, Any] | None = Field(None, description="The same config, already parsed.")
    resume: bool = Field(True, description="Continue from the newest saved state of this model, if any.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, le=4096, description="Plan for a GPU of this size instead of the visible one (train.preset: auto)."
    )
    datasets: dict[SafeName, DatasetSource] = Field(
        default_factory=dict,
        max_length=8,
        description="By dataset name: the photos the run must train on (their sha256, and the photos to "
        "upload first when this worker's volume does not hold them).",
    )

    @property
    def source(self) -> str | dict[str, Any]:
        """The config as given: YAML text or an object (the validator makes sure there is exactly one)."""
        return self.yaml_config if self.yaml_config is not None else (self.config or {})

    @model_validator(mode="after")
    def _exactly_one_config(self) -> TrainWithYamlRequest:
        if (self.yaml_config is None) == (self.config is None):
            raise ValueError("give exactly one of `yaml_config` (YAML text) or `config` (an object)")
        return self


class GenerateRequest(Request):
    model: SafeName = Field(description="A trained model (its folder under output/).")
    prompt: str = Field(min_length=1, max_length=2000)
    filename: SafeName | None = Field(None, description="A step save to use; default <model>.safetensors.")
    negative_prompt: str = Field(
        "", max_length=2000, description="SD 1.5, SDXL, Z-Image and Qwen-Image; the FLUX pipelines take none."
    )
    width: int = Field(1024, ge=64, le=2048)
    height: int = Field(1024, ge=64, le=2048)
    steps: int | None = Field(None, gt=0, le=100, description="Denoising steps; default the pipeline's own.")
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=30,
        description="The usual CFG scale (FLUX.1: its embedded guidance); default the pipeline's own.",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1)
    num_images: int = Field(1, gt=0, le=4)
    lora_scale: float = Field(1.0, ge=0, le=2)
    format: Literal["jpg", "png"] = "jpg"


def field_path(loc: tuple, root: str = "input") -> str:
    """``("files", 2, "filename")`` -> ``input.files[2].filename``."""
    text = root
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# pydantic error type -> how the bound reads in our messages.
BOUND_WORDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def describe_error(error: dict, root: str = "input", valid_keys: list[str] | None = None) -> str:
    """One line for one pydantic error: the field's full path, what is wrong, and the bad value."""
    path = field_path(error["loc"], root)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key" + (f"; valid keys: {', '.join(valid_keys)}" if valid_keys else "")
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind in BOUND_WORDS:
        name, word = BOUND_WORDS[kind]
        bound = error["ctx"][name]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{path}: must be {word} {bound}, got {show_value(error['input'])}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return f"{path or root}: {message}"
    message = f"{path}: {message[0].lower()}{message[1:]}"
    return message if ", got " in message else f"{message}, got {show_value(error['input'])}"


def parse_request(model: type[Request], payload: dict) -> Request:
    """Validate ``payload`` (a job's ``input``) against ``model``, or raise with every problem."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        top_keys = list(model.model_fields)
        problems = [
            describe_error(error, valid_keys=top_keys if len(error["loc"]) == 1 else None)
            for error in exc.errors(include_url=False)
        ]
        raise ValidationFailed.from_problems(problems) from None
