"""Row models: the contract between the pipeline's stages and its consumers (trainer, other languages)."""
from __future__ import annotations

from typing import Annotated, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.arrow import ArrowType

Float32List = Annotated[list[float], ArrowType(pa.list_(pa.float32()))]
Int32 = Annotated[int, ArrowType(pa.int32())]


class Row(BaseModel):
    """Base of every table row: strict fields, aliases accepted."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class WebPair(Row):
    """An input image-text pair from the web (the URL list). uid is derived from url and caption when absent."""

    url: str | None
    caption: str | None = None
    uid: str | None = None


class Image(Row):
    """A downloaded, decoded and resized image with its alt-text (ingest output)."""

    uid: str = Field(description="stable id: blake2b-64 of url and caption, hex")
    url: str
    caption: str | None
    sha256: str = Field(description="sha256 of the bytes as downloaded")
    width: Int32
    height: Int32
    original_width: Int32
    original_height: Int32
    image: bytes = Field(description="encoded image after resizing (JPEG by default)")
    exif: str | None = None


class DedupedImage(Image):
    """An image kept as the representative of its duplicate group (dedup output)."""

    phash: str = Field(description="64-bit perceptual hash, 16 hex digits")
    dup_group: str = Field(description="uid of the group's representative (this row's own uid)")
    dup_count: Int32 = Field(description="rows in the group, this one included")


class FilteredImage(DedupedImage):
    """An image that passed the size, aspect and caption rules (filter output)."""

    lang: str | None = Field(description="caption language (ISO 639-1) or null when too short to tell")


class BalancedImage(FilteredImage):
    """An image selected by concept balancing (balance output)."""

    vocab: str = Field(description="vocabulary version (hash) of concept_ids")
    concept_ids: list[int] = Field(description="the image's matched concepts, as match_concepts ordered them")
    sample_weight: float = Field(description="MetaCLIP keep probability, or the inverse-frequency weight it was drawn with")


class Reject(Row):
    """A row a stage did not pass on, with a reason code."""

    uid: str | None
    url: str | None
    caption: str | None
    stage: str
    reason: str = Field(description="machine-readable code, e.g. http_404, near_duplicate, too_small")
    detail: str | None = None


class Embedding(Row):
    """L2-normalised image (and caption) embeddings of one image."""

    uid: str
    model: str = Field(description="open_clip model name and pretrained tag")
    image_embedding: Float32List
    text_embedding: Float32List | None = None


class ConceptMatch(Row):
    """The concepts matched to one image: feature matches best first, then caption-only substring matches."""

    uid: str
    vocab: str = Field(description="vocabulary version (hash)")
    concept_ids: list[int]
    scores: Annotated[list[float | None], ArrowType(pa.list_(pa.float32()))] = Field(
        description="cosine of image and concept embeddings; null for substring matches made without a model")
    source: list[Literal["feature", "substring", "both"]] = Field(description="provenance of each match")


class BoxObject(Row):
    """An annotated object: category, optional colour, box [x1, y1, x2, y2] normalised to 0-1."""

    category: str
    color: str | None = None
    box: Annotated[list[float], ArrowType(pa.list_(pa.float32()))]


class Caption(Row):
    """A synthetic caption (recaption) of one image, joined to the image rows by uid."""

    uid: str
    recaption: str
    lang: str
    model: str = Field(description="the model (or 'rules') that wrote it")
    prompt_version: str = Field(description="hash of the prompt folder's files")


class Turn(Row):
    """One conversation turn in LLaVA's format."""

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Instruction(Row):
    """A generated instruction sample (conversation, detail description, complex reasoning, short answer...)."""

    id: str = Field(description="uid and kind: unique per sample")
    uid: str = Field(description="uid of the source image")
    kind: str
    conversations: list[Turn] = Field(description="human/gpt turns; <image> once, in the first human turn")
    model: str
    prompt_version: str
    image: bytes = Field(description="the encoded image, so a shard trains on its own")


class PackedSequence(Row):
    """One packed training sequence: which samples it holds and their token lengths."""

    seq_id: str
    sample_ids: list[str]
    lengths: list[int]
    total_tokens: int


TABLES: dict[str, type[Row]] = {
    m.__name__: m
    for m in (WebPair, Image, DedupedImage, FilteredImage, BalancedImage, Reject, Embedding, ConceptMatch, BoxObject, Caption, Instruction, PackedSequence)
}
