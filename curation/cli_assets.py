"""`curate schema|vocab|models|fixtures ...`: the row contract, the concept vocabulary, the tiny models and the
fixture web: what a run needs besides its data."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from curation.cli_util import console, fail

schema_app = typer.Typer(help="The row contract (schemas/).", no_args_is_help=True)
vocab_app = typer.Typer(help="The concept vocabulary (MetaCLIP's recipe, from offline sources).", no_args_is_help=True)
models_app = typer.Typer(help="Models the project makes itself.", no_args_is_help=True)
fixtures_app = typer.Typer(help="The synthetic web used by tests and the demo.", no_args_is_help=True)


@schema_app.command("export")
def schema_export(out: Path = typer.Option(Path("schemas/json"), help="folder for NAME.schema.json files")):
    """Write a JSON Schema per row model, for consumers in other languages."""
    from schemas import TABLES

    out.mkdir(parents=True, exist_ok=True)
    for name, model in TABLES.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(by_alias=True), indent=2) + "\n")
    print(f"wrote {len(TABLES)} schemas to {out}")


def _wrote_vocab(table, out: Path) -> None:
    from curation.concepts.vocab import source_counts, write_vocab

    version = write_vocab(table, out)
    print(
        json.dumps(
            {"path": str(out), "version": version, "entries": table.num_rows, "sources": source_counts(table)}, indent=2
        )
    )


@vocab_app.command("build")
def vocab_build(
    out: Path = typer.Option(..., help="vocabulary Parquet file to write (id, text, source)"),
    target: int = typer.Option(500_000, help="entries to aim for"),
    titles: list[Path] = typer.Option([], "--titles", help="text files of titles/phrases, one per line"),
    corpus: list[Path] = typer.Option(
        [], "--corpus", help="Parquet files with a caption column, mined for PMI bigrams"
    ),
    caption_col: str = typer.Option("caption"),
    min_pmi: float = typer.Option(3.0, help="bigram PMI threshold (natural log)"),
    min_count: int = typer.Option(10, help="bigram minimum count"),
):
    """Build a vocabulary: numbers 0-99, WordNet synset names, titles, PMI bigrams, then frequent words."""
    import pyarrow.parquet as pq

    from curation.concepts.vocab import build_vocab

    texts = [t for p in corpus for t in pq.read_table(p, columns=[caption_col]).column(caption_col).to_pylist()]
    try:
        table = build_vocab(
            target, title_files=titles, corpus=texts or None, bigram_min_count=min_count, bigram_min_pmi=min_pmi
        )
    except (OSError, ValueError) as e:
        fail(str(e))
    _wrote_vocab(table, out)


@vocab_app.command("import")
def vocab_import(metadata: Path, out: Path = typer.Option(..., help="vocabulary Parquet file to write")):
    """Import MetaCLIP's metadata.json (a JSON list of strings, id = index)."""
    from curation.concepts.vocab import import_metaclip

    try:
        table = import_metaclip(metadata)
    except (OSError, ValueError) as e:
        fail(str(e))
    _wrote_vocab(table, out)


@vocab_app.command("embed")
def vocab_embed(
    vocab: Path,
    model: str = typer.Option("ViT-H-14-quickgelu", help="open_clip model name (use the embed stage's)"),
    pretrained: str | None = typer.Option("metaclip_fullcc", help="pretrained tag or local checkpoint file"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16"),
    template: str = typer.Option("{}", help="text embedded per entry, e.g. 'a photo of {}'"),
    cache_dir: Path | None = typer.Option(None, help="default $CURATION_CACHE or ~/.cache/curation"),
    batch_size: int = typer.Option(256),
):
    """Embed a vocabulary with a text tower into the concept cache (what match_concepts loads), by (model, vocab
    hash)."""
    from curation.concepts.clip import load_clip
    from curation.concepts.embeddings import ConceptCache

    try:
        clip = load_clip(model, pretrained, precision)
        cache = ConceptCache(vocab, clip.model_id, template, cache_dir)
    except (OSError, ValueError) as e:
        fail(str(e))
    with Progress(
        TextColumn("embedding entries"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("embed", total=cache.vocab.num_rows)
        cache.build(clip, batch_size, progress=lambda done, total: bar.update(task, completed=done))
    print(json.dumps(cache.describe(), indent=2))


@models_app.command("tiny")
def models_tiny(out: Path = typer.Argument(..., help="checkpoint file to write (.pt)"), seed: int = typer.Option(0)):
    """Write random weights for the project's tiny open_clip model (tests and the offline demo)."""
    from curation.concepts.clip import TINY_MODEL, make_tiny_checkpoint

    make_tiny_checkpoint(out, seed)
    print(json.dumps({"model": TINY_MODEL, "pretrained": str(out)}))


@models_app.command("train-clip")
def models_train_clip(
    source: Path = typer.Argument(..., help="a run's stage dir (e.g. RUN/filter) or a Parquet file of image + caption"),
    out: Path = typer.Option(..., help="checkpoint file to write (.pt); a summary goes to OUT.json"),
    steps: int = typer.Option(1000, help="optimizer steps"),
    batch_size: int = typer.Option(256),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
    caption_col: str = typer.Option("caption", help="the caption column (e.g. recaption)"),
):
    """Train the project's tiny open_clip model on image-caption pairs (open_clip's model and ClipLoss, on CPU);
    `embed` and `match_concepts` load it with pretrained=OUT, as real MetaCLIP weights."""
    from curation.concepts.train_clip import TrainClipParams, read_pairs, train_clip

    try:
        params = TrainClipParams(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        images, captions = read_pairs(source, caption_col)
    except (OSError, KeyError, ValueError) as e:
        fail(str(e))
    with Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("train", total=steps)
        summary = train_clip(images, captions, out, params, log=lambda step, loss: bar.update(task, completed=step + 1))
    loss = summary["loss"]
    print(json.dumps({**{k: summary[k] for k in ("model", "pretrained", "pairs", "train_s")}, "last_loss": loss[-1]}))


@fixtures_app.command("web")
def fixtures_web(
    out: Path = typer.Option(..., help="folder to write"),
    n: int = typer.Option(1000, help="URL rows"),
    port: int = typer.Option(8765, help="port the URLs point at (serve on the same)"),
    seed: int = typer.Option(0),
    scenes: str = typer.Option(
        "web",
        help="web: patterned scenes of 1-4 shapes; simple: 1-3 larger shapes on "
        "white, square (what a tiny vision tower can learn from); longtail: simple scenes whose colour x shape "
        "concepts follow a Zipf law (head 170x tail), 5% of clean captions mismatched",
    ),
    hostile_captions: bool = typer.Option(
        False, help="give 5% of the clean images a hostile alt-text (control chars, <image>, invalid UTF-8, spam)"
    ),
):
    """Write a synthetic web: images, captions, duplicates, broken items, urls.parquet and truth.parquet."""
    from curation.fixtures.web import make_web

    try:
        summary = make_web(out, n=n, port=port, seed=seed, scenes=scenes, hostile_captions=hostile_captions)
    except ValueError as e:
        fail(str(e))
    print(json.dumps(summary, indent=2))


@fixtures_app.command("serve")
def fixtures_serve(web: Path, port: int | None = typer.Option(None, help="default: the port in web.json")):
    """Serve a fixture web on 127.0.0.1 until Ctrl-C."""
    from curation.fixtures.serve import main

    main(web, port)


@fixtures_app.command("sources")
def fixtures_sources(
    web: Path = typer.Argument(..., help="a fixture web (`curate fixtures web`)"),
    out: Path = typer.Option(..., help="folder to write: urls/, laion/, folder/, webdataset/, parquet/, coco/"),
):
    """Write the web in the forms users bring data in: sharded URL lists (Parquet, CSV, TSV.GZ, JSONL; and LAION's
    column names), an image folder with .txt captions, WebDataset tars, image Parquet and a COCO set."""
    from curation.fixtures import sources as fx

    if not (web / "truth.parquet").is_file():
        fail(f"{web}: not a fixture web (no truth.parquet); make one with `curate fixtures web`")
    written = {
        "urls": [str(p) for p in fx.write_url_shards(web, out / "urls")],
        "laion": [str(p) for p in fx.write_url_shards(web, out / "laion", formats=("parquet",), laion=True)],
        "folder": str(fx.write_folder(web, out / "folder")),
        "webdataset": [str(p) for p in fx.write_webdataset(web, out / "webdataset")],
        "parquet": [str(p) for p in fx.write_image_parquet(web, out / "parquet")],
        "coco": {k: str(v) for k, v in fx.write_coco(web, out / "coco").items()},
    }
    print(json.dumps(written, indent=2))
