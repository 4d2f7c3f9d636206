"""`curate export ...`: a run's data (LLaVA JSON, WebDataset, HF datasets) and trained checkpoints out; `curate
import ...`: external instruction data in."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from curation.cli_util import fail

export_app = typer.Typer(help="Export a run's data (and trained checkpoints) to other formats.", no_args_is_help=True)
import_app = typer.Typer(
    help="Bring external instruction data in, as shards of this project's schema.", no_args_is_help=True
)


_EXPORT_PATHS = "a run dir (its instruct stages, or those --stage names), stage dirs or Parquet shards"
_EXPORT_STAGES = "a stage of the run dir to export (repeat for more; default: every instruct stage)"
_MIXTURE = "a mixture spec (YAML: seed, datasets of path + sampling_strategy) or a manifest to rebuild"


@export_app.command("llava-json")
def export_llava(
    paths: list[Path] = typer.Argument(None, help="a run dir (all instruct stages), stage dirs or Parquet shards"),
    out: Path = typer.Option(..., help="the JSON file to write (its mixture manifest goes beside it)"),
    images: Path | None = typer.Option(None, help="where images go (default: images/ next to the JSON)"),
    mixture: Path | None = typer.Option(None, help=_MIXTURE),
):
    """Write instruction shards in LLaVA's JSON format ([{id, image, conversations}]) plus the image files, and
    OUT.mixture.parquet: each sample's id and content hash (a manifest given to --mixture rebuilds it exactly)."""
    from curation.export.llava_json import export_llava_json

    try:
        print(json.dumps(export_llava_json(paths or [], out, images, mixture), indent=2))
    except (OSError, ValueError) as e:
        fail(str(e))


@export_app.command("webdataset")
def export_webdataset(
    paths: list[Path] = typer.Argument(None, help=_EXPORT_PATHS),
    out: Path = typer.Option(..., help="folder for NNNNN.tar shards and their NNNNN.parquet metadata"),
    shard_size: int = typer.Option(10_000, help="samples per tar"),
    stage: list[str] = typer.Option([], help=_EXPORT_STAGES),
    mixture: Path | None = typer.Option(None, help=_MIXTURE),
):
    """Write WebDataset tar shards in img2dataset's layout: key.jpg, key.txt (alt-text), key.json (lineage)."""
    from curation.export.webdataset import export_webdataset as write

    if shard_size < 1:
        fail(f"--shard-size must be at least 1, got {shard_size}")
    try:
        print(json.dumps(write(paths or [], out, shard_size, stage or None, mixture), indent=2))
    except (OSError, ValueError) as e:
        fail(str(e))


@export_app.command("datasets")
def export_datasets(
    paths: list[Path] = typer.Argument(None, help=_EXPORT_PATHS),
    out: Path = typer.Option(..., help="folder for NNNNN.parquet shards, one per part read"),
    stage: list[str] = typer.Option([], help=_EXPORT_STAGES),
    mixture: Path | None = typer.Option(None, help=_MIXTURE),
):
    """Write Parquet shards that datasets.load_dataset("parquet", data_files=...) loads with images as Image()."""
    from curation.export.datasets import export_datasets as write

    try:
        print(json.dumps(write(paths or [], out, stage or None, mixture), indent=2))
    except (OSError, ValueError) as e:
        fail(str(e))


@export_app.command("hf")
def export_hf(
    out: Path = typer.Argument(..., help="a finished `curate train` out dir"),
    to: Path = typer.Option(..., help="folder for the LlavaForConditionalGeneration checkpoint"),
):
    """Write a transformers LlavaForConditionalGeneration checkpoint from a training run."""
    from trainer.train import export_trained

    try:
        print(json.dumps({"hf_checkpoint": str(export_trained(out, to))}))
    except (OSError, ValueError) as e:
        fail(str(e))


@import_app.command("llava-json")
def import_llava(
    file: Path = typer.Argument(..., help="a LLaVA-format JSON file: [{id, image, conversations}]"),
    images: Path = typer.Option(..., help="the folder its `image` paths are relative to"),
    out: Path = typer.Option(..., help="an empty folder for part-NNNNN.parquet shards (ImageInstruction rows)"),
    kind: str = typer.Option("imported", help="the samples' kind"),
    shard_size: int = typer.Option(10_000, help="samples per shard"),
):
    """Write a LLaVA-format set as instruction shards with their images (ids kept, uids stable), checked as our own
    samples are; every sample that fails is a reject in OUT/rejects.parquet with a reason."""
    from curation.sources.llava_json import import_llava_json

    if shard_size < 1:
        fail(f"--shard-size must be at least 1, got {shard_size}")
    try:
        print(json.dumps(import_llava_json(file, images, out, kind, shard_size), indent=2))
    except (OSError, ValueError) as e:
        fail(str(e))
