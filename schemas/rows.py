"""Row models: the contract between the pipeline's stages and its consumers (trainer, other languages)."""

from __future__ import annotations

from typing import Annotated, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, create_model

from schemas.arrow import ArrowType

Float32List = Annotated[list[float], ArrowType(pa.list_(pa.float32()))]
Int32 = Annotated[int, ArrowType(pa.int32())]
Float32 = Annotated[float, ArrowType(pa.float32())]


class Row(BaseModel):
    """Base of every table row: strict fields, aliases accepted."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def subset(name: str, doc: str, fields: dict[str, type[Row]]) -> type[Row]:
    """A model of fields taken from other models (field -> its model), definitions shared: a field renamed there
    fails here, at import."""
    missing = [f"{m.__name__}.{f}" for f, m in fields.items() if f not in m.model_fields]
    if missing:
        raise TypeError(f"{name}: no fields {missing}")
    defs = {f: (m.model_fields[f].annotation, m.model_fields[f]) for f, m in fields.items()}
    return create_model(name, __base__=Row, __doc__=doc, __module__=__name__, **defs)


class WebPair(Row):
    """An input image-text pair from the web (the URL list). uid is derived from url and caption when absent."""

    url: str | None
    caption: str | None = None
    uid: str | None = None


class Image(Row):
    """An image with its alt-text: downloaded, decoded and resized (ingest), or read where it lies (the read_*
    sources: tars, image Parquet, folders, COCO)."""

    uid: str = Field(description="stable id: blake2b-64 of url and caption, hex")
    url: str = Field(description="the web URL; for a local image without one, its path relative to the source root")
    caption: str | None
    sha256: str = Field(description="sha256 of the bytes as downloaded")
    width: Int32
    height: Int32
    original_width: Int32
    original_height: Int32
    image: bytes = Field(description="encoded image after resizing (JPEG by default)")
    exif: str | None = None
    source: str | None = Field(
        None, description="where a read_* source read the image: its file, or the tar and the sample's key (tar#key)"
    )


class CocoImage(Image):
    """An image of a COCO-format set with all its captions (read_coco output; `caption` is the first of them)."""

    coco_id: int = Field(description="the image's id in the COCO files")
    captions: list[str] = Field(description="every caption of the image, in annotation id order")


# Stages that only decide write thin rows: uid plus what they add. The image, its alt-text and its sizes stay in
# the Image rows the source stage wrote, read by uid (schemas.rundir) when a later stage or a reader needs them.


class Deduped(Row):
    """An image kept as the representative of its duplicate group (dedup output)."""

    uid: str
    phash: str = Field(description="64-bit perceptual hash, 16 hex digits")
    dup_group: str = Field(description="uid of the group's representative (this row's own uid)")
    dup_count: Int32 = Field(description="rows in the group, this one included")


class SemDeduped(Row):
    """An image kept by semantic dedup: no kept image before it in priority order is within eps in cosine."""

    uid: str
    sem_cluster: Int32 = Field(description="k-means cluster of the image embedding")
    sem_dup_count: Int32 = Field(description="images it stands for (its semantic duplicates and itself)")


class Decontaminated(Row):
    """An image that matched no item of the evaluation set (decontaminate output): no pHash near copy, no exact copy
    and, where embeddings were compared, no cosine at or over min_cosine."""

    uid: str


class ClipScored(Row):
    """An image whose alt-text fits it: the CLIP score (image-caption cosine) passed the threshold (clip_score
    output, DataComp's CLIP score filter)."""

    uid: str
    clip_score: Float32 = Field(description="cosine of embed's image and caption embeddings")


class Filtered(Row):
    """An image that passed the size, aspect and caption rules (filter output)."""

    uid: str
    lang: str | None = Field(description="caption language (ISO 639-1) or null when too short to tell")
    caption_issue: str | None = Field(
        None,
        description="the caption rule the alt-text broke, where `caption_failures: flag` kept the image (the "
        "caption is then unusable: embed, match_concepts and clip_score ignore it, pseudo_caption replaces it)",
    )


class PseudoCaptioned(Row):
    """An image's caption for the stages after pseudo_caption: its usable alt-text, or, where the alt-text is
    missing or unusable, a pseudo-caption made of its top concepts (LLaVA-OneVision-1.5)."""

    uid: str
    caption: str = Field(description="the alt-text, or the concept names joined into a pseudo-caption")
    caption_source: Literal["alt_text", "concepts"]


class Balanced(Row):
    """An image selected by concept balancing (balance output)."""

    uid: str
    vocab: str = Field(description="vocabulary version (hash) of concept_ids")
    concept_ids: list[int] = Field(description="the image's matched concepts, as match_concepts ordered them")
    sample_weight: float = Field(
        description="MetaCLIP keep probability, or the inverse-frequency weight it was drawn with"
    )


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
        description="cosine of image and concept embeddings; null for substring matches made without a model"
    )
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
    recaption_lang: str
    recaption_model: str = Field(description="the model (or 'rules') that wrote it")
    recaption_prompt_version: str = Field(description="hash of the prompt folder's files")


class Turn(Row):
    """One conversation turn in LLaVA's format."""

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Instruction(Row):
    """A generated instruction sample (conversation, detail description, complex reasoning, short answer...); its
    image is the Image row of its uid (stored once, however many samples an image has)."""

    id: str = Field(description="uid and kind: unique per sample")
    uid: str = Field(description="uid of the source image")
    kind: str
    conversations: list[Turn] = Field(description="human/gpt turns; <image> once, in the first human turn")
    model: str = Field(description="what wrote the gpt turns: an LLM, 'rules', or (kind caption) the recaption's model")
    prompt_version: str = Field(description="hash of the prompt folder (kind caption: the recaption's prompt)")
    source: Literal["generated", "recaption", "alt_text", "imported"] = Field(
        "generated",
        description="where the gpt turns come from: generated for this kind, a caption as it was, or an external "
        "LLaVA-format set (curate import llava-json)",
    )


ImageInstruction = subset(
    "ImageInstruction",
    "An instruction sample that carries its image: a shard that trains on its own (users' own data, LLaVA-style).",
    {**dict.fromkeys(Instruction.model_fields, Instruction), "image": Image},
)

TrainSample = subset(
    "TrainSample",
    "What the trainer reads of a sample (stage 1 caption or stage 2 chat): the Instruction's id and turns, and the "
    "image of its uid (in the shard, or where the run dir's source stage wrote it).",
    {"id": Instruction, "uid": Instruction, "conversations": Instruction, "image": Image},
)


class PackedSequence(Row):
    """One packing-plan sequence (trainer.pack.to_table): which samples it holds and their token lengths."""

    seq_id: str
    sample_ids: list[str]
    lengths: list[int]
    total_tokens: int


class TrainSequence(Row):
    """One row of the trainer's packed files (trainer.packed): a sequence's samples, tokens, labels and images."""

    seq_id: str = Field(description="seq-00000001 ...: rows in packing order")
    sample_ids: list[str] = Field(description="the samples in the sequence, in order")
    lengths: list[Int32] = Field(description="their token lengths: the per-sample boundaries, cu_seqlens = cumsum")
    input_ids: list[Int32] = Field(description="concatenated token ids, each <image> expanded to image_tokens copies")
    labels: list[Int32] = Field(description="concatenated labels, -100 where no loss")
    images: list[bytes] = Field(description="the encoded images of the sequence's samples, in reading order")


TABLES: dict[str, type[Row]] = {
    m.__name__: m
    for m in (
        WebPair,
        Image,
        CocoImage,
        Deduped,
        SemDeduped,
        Decontaminated,
        ClipScored,
        Filtered,
        PseudoCaptioned,
        Balanced,
        Reject,
        Embedding,
        ConceptMatch,
        BoxObject,
        Caption,
        Instruction,
        ImageInstruction,
        PackedSequence,
        TrainSequence,
    )
}
