"""`curate`: run pipelines, inspect runs, export schemas, make and serve the fixture web."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Curate web image-text pairs into LLaVA-style training data.", no_args_is_help=True)
schema_app = typer.Typer(help="The row contract (schemas/).", no_args_is_help=True)
fixtures_app = typer.Typer(help="The synthetic web used by tests and the demo.", no_args_is_help=True)
vocab_app = typer.Typer(help="The concept vocabulary (MetaCLIP's recipe, from offline sources).", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
app.add_typer(vocab_app, name="vocab")
models_app = typer.Typer(help="Models the project makes itself.", no_args_is_help=True)
app.add_typer(fixtures_app, name="fixtures")
app.add_typer(models_app, name="models")
export_app = typer.Typer(help="Export instruction data to other formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
console = Console(stderr=True)


@contextmanager
def _progress():
    """A rich progress bar per stage; yields the runner's progress callback."""
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, phase: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=max(total, 1), description=f"{stage} [{phase}]")

        yield update


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}", markup=True, highlight=False)
    raise typer.Exit(2)


def execute(pipeline_path: Path, run_dir: Optional[Path], address: Optional[str], overrides: list[str],
            retry_failed: bool = False) -> Path:
    """Validate, then run a pipeline with progress; return the run dir."""
    from curation.config import ConfigError, load_pipeline
    from curation.runner import StageFailed, run_pipeline

    try:
        pipeline = load_pipeline(pipeline_path, overrides)
    except ConfigError as e:
        _fail(str(e))
    run_dir = run_dir or Path("runs") / pipeline.name
    try:
        with _progress() as update:
            run_pipeline(pipeline, run_dir, address=address, retry_failed=retry_failed, progress=update)
    except StageFailed as e:
        _fail(str(e))
    return run_dir


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="pipelines/NAME.yaml"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="where outputs go (default runs/NAME)"),
    address: Optional[str] = typer.Option(None, "--address", help="an existing Ray cluster (default: local Ray)"),
    set_: list[str] = typer.Option([], "--set", help="override a param: STAGE.PARAM=VALUE (YAML value)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="retry rows rejected for transient reasons (timeouts, 5xx)"),
):
    """Run (or resume) a pipeline DAG."""
    out = execute(pipeline, run_dir, address, set_, retry_failed)
    _print_status(out)


def _print_status(run_dir: Path) -> None:
    from curation.status import coverage_rows, run_status

    st = run_status(run_dir)
    out = Console()
    table = Table(title=f"run {st['run_dir']}")
    for col in ("stage", "op", "status", "parts", "in", "out", "rejected", "seconds"):
        table.add_column(col, justify="right" if col in ("in", "out", "rejected", "seconds") else "left")
    reasons = Table(title="rejects by reason")
    for col in ("stage", "reason", "rows"):
        reasons.add_column(col, justify="right" if col == "rows" else "left")
    for s in st["stages"]:
        table.add_row(*(str(s.get(k, "")) for k in ("stage", "op", "status", "parts", "in", "out", "rejected", "seconds")))
        for reason, n in s.get("rejected_by_reason", {}).items():
            reasons.add_row(s["stage"], reason, str(n))
    out.print(table)
    out.print(reasons)
    for s in st["stages"]:
        if "coverage_before" in s.get("report", {}):
            rep = s["report"]
            cov = Table(title=f"{s['stage']}: concept coverage ({rep['method']}, t={rep['t'] and round(rep['t'], 3)}, "
                              f"{rep['selected']} of {rep['pool']} images kept)")
            for col in ("metric", "before", "after"):
                cov.add_column(col, justify="left" if col == "metric" else "right")
            for row in coverage_rows(rep):
                cov.add_row(row["metric"], *(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in ("before", "after")))
            out.print(cov)


@app.command()
def status(run_dir: Path, as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Per-stage counts and reject reasons of a run."""
    from curation.status import run_status

    try:
        st = run_status(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        _print_status(run_dir)


@app.command()
def report(run_dir: Path, out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default RUN_DIR/report.html)"),
           samples: int = typer.Option(8, help="rows in the gallery")):
    """Write a self-contained HTML report: funnel, dedup groups, concept coverage, lengths, LLM use, sample rows."""
    from curation.report import write_report

    try:
        print(write_report(run_dir, out, samples))
    except (FileNotFoundError, OSError) as e:
        _fail(str(e))


@app.command()
def view(run_dir: Path, port: int = typer.Option(8766, "--port", help="port on 127.0.0.1 (0: any free port)")):
    """Browse a run's rows and rejects in a small local web page (127.0.0.1 only) until Ctrl-C."""
    from curation.view import serve

    try:
        serve(run_dir, port)
    except (FileNotFoundError, OSError) as e:
        _fail(str(e))


def demo_assets(out: Path, urls: Path) -> tuple[Path, Path]:
    """The demo's tiny CLIP weights and its small vocabulary (frequent words, numbers, caption bigrams), made once."""
    import pyarrow.parquet as pq

    from curation.clip import make_tiny_checkpoint
    from curation.vocab import build_vocab, write_vocab

    model, vocab = out / "models" / "tiny-clip.pt", out / "vocab.parquet"
    if not model.exists():
        make_tiny_checkpoint(model, seed=0)
    if not vocab.exists():
        captions = pq.read_table(urls, columns=["caption"]).column("caption").to_pylist()
        write_vocab(build_vocab(DEMO_VOCAB, wordnet_dir=None, corpus=captions, bigram_min_count=3), vocab)
    return model, vocab


def synth_stages(pipeline: Path) -> list[str]:
    """Stages of a pipeline file that write synthetic text (they take the demo's annotations)."""
    import yaml

    stages = yaml.safe_load(pipeline.read_text())["stages"]
    return [name for name, st in stages.items() if st["op"] in ("recaption", "instruct")]


DEMO_VOCAB = 12_000  # entries: the tiny model embeds ~1.5k entries/s on 2 cores; real runs use 500,000


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="where the fixture web and the run go"),
    n: int = typer.Option(400, help="URLs in the fixture web"),
    pipeline: Path = typer.Option(Path("pipelines/demo.yaml")),
):
    """Make the fixture web, serve it on 127.0.0.1, run the demo pipeline, print the run dir."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local demo: Ray on loopback only
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    web = out / "web"
    make_web(web, n=n, port=free_port(), seed=0)
    model, vocab = demo_assets(out, web / "urls.parquet")
    overrides = [f"ingest.urls={web / 'urls.parquet'}", "ingest.allow_loopback=true",  # the demo's web is on 127.0.0.1
                 f"embed.pretrained={model}", f"match_concepts.pretrained={model}",
                 f"match_concepts.vocab={vocab}", f"match_concepts.cache_dir={out / 'cache'}", f"balance.vocab={vocab}"]
    overrides += [f"{s}.annotations={web / 'truth.parquet'}" for s in synth_stages(pipeline)]
    with WebServer(web):
        run_dir = execute(pipeline, out / "run", None, overrides)
    _print_status(run_dir)
    print(f"run dir: {run_dir.resolve()}")
    print(f"status:  curate status {run_dir}")
    from curation.report import write_report

    print(f"report:  {write_report(run_dir).resolve()}")
    print(f"browse:  curate view {run_dir}")


@schema_app.command("export")
def schema_export(out: Path = typer.Option(Path("schemas/json"), help="folder for NAME.schema.json files")):
    """Write a JSON Schema per row model, for consumers in other languages."""
    from schemas import TABLES

    out.mkdir(parents=True, exist_ok=True)
    for name, model in TABLES.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(by_alias=True), indent=2) + "\n")
    print(f"wrote {len(TABLES)} schemas to {out}")


def _wrote_vocab(table, out: Path) -> None:
    from curation.vocab import source_counts, write_vocab

    version = write_vocab(table, out)
    print(json.dumps({"path": str(out), "version": version, "entries": table.num_rows, "sources": source_counts(table)}, indent=2))


@vocab_app.command("build")
def vocab_build(
    out: Path = typer.Option(..., help="vocabulary Parquet file to write (id, text, source)"),
    target: int = typer.Option(500_000, help="entries to aim for"),
    titles: list[Path] = typer.Option([], "--titles", help="text files of titles/phrases, one per line"),
    corpus: list[Path] = typer.Option([], "--corpus", help="Parquet files with a caption column, mined for PMI bigrams"),
    caption_col: str = typer.Option("caption"),
    min_pmi: float = typer.Option(3.0, help="bigram PMI threshold (natural log)"),
    min_count: int = typer.Option(10, help="bigram minimum count"),
):
    """Build a vocabulary: numbers 0-99, WordNet synset names, titles, PMI bigrams, then frequent words."""
    import pyarrow.parquet as pq

    from curation.vocab import build_vocab

    texts = [t for p in corpus for t in pq.read_table(p, columns=[caption_col]).column(caption_col).to_pylist()]
    try:
        table = build_vocab(target, title_files=titles, corpus=texts or None, bigram_min_count=min_count, bigram_min_pmi=min_pmi)
    except (OSError, ValueError) as e:
        _fail(str(e))
    _wrote_vocab(table, out)


@vocab_app.command("import")
def vocab_import(metadata: Path, out: Path = typer.Option(..., help="vocabulary Parquet file to write")):
    """Import MetaCLIP's metadata.json (a JSON list of strings, id = index)."""
    from curation.vocab import import_metaclip

    try:
        table = import_metaclip(metadata)
    except (OSError, ValueError) as e:
        _fail(str(e))
    _wrote_vocab(table, out)


@vocab_app.command("embed")
def vocab_embed(
    vocab: Path,
    model: str = typer.Option("ViT-H-14-quickgelu", help="open_clip model name (use the embed stage's)"),
    pretrained: Optional[str] = typer.Option("metaclip_fullcc", help="pretrained tag or local checkpoint file"),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16"),
    template: str = typer.Option("{}", help="text embedded per entry, e.g. 'a photo of {}'"),
    cache_dir: Optional[Path] = typer.Option(None, help="default $CURATION_CACHE or ~/.cache/curation"),
    batch_size: int = typer.Option(256),
):
    """Embed a vocabulary with a text tower into the concept cache (what match_concepts loads), by (model, vocab hash)."""
    from curation.clip import load_clip
    from curation.concepts import ConceptCache

    try:
        clip = load_clip(model, pretrained, precision)
        cache = ConceptCache(vocab, clip.model_id, template, cache_dir)
    except (OSError, ValueError) as e:
        _fail(str(e))
    with Progress(TextColumn("embedding entries"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("embed", total=cache.vocab.num_rows)
        cache.build(clip, batch_size, progress=lambda done, total: bar.update(task, completed=done))
    print(json.dumps(cache.describe(), indent=2))


@models_app.command("tiny")
def models_tiny(out: Path = typer.Argument(..., help="checkpoint file to write (.pt)"), seed: int = typer.Option(0)):
    """Write random weights for the project's tiny open_clip model (tests and the offline demo)."""
    from curation.clip import TINY_MODEL, make_tiny_checkpoint

    make_tiny_checkpoint(out, seed)
    print(json.dumps({"model": TINY_MODEL, "pretrained": str(out)}))


@export_app.command("llava-json")
def export_llava(
    paths: list[Path] = typer.Argument(..., help="a run dir (all instruct stages), stage dirs or Parquet shards"),
    out: Path = typer.Option(..., help="the JSON file to write"),
    images: Optional[Path] = typer.Option(None, help="where images go (default: images/ next to the JSON)"),
):
    """Write instruction shards in LLaVA's JSON format ([{id, image, conversations}]) plus the image files."""
    from curation.synth.export import export_llava_json

    try:
        print(json.dumps(export_llava_json(paths, out, images), indent=2))
    except (OSError, ValueError) as e:
        _fail(str(e))


@app.command()
def train(
    config: Path = typer.Argument(..., help="training YAML (trainer/config.py: TrainConfig)"),
    set_: list[str] = typer.Option([], "--set", help="override a field: KEY=VALUE (YAML value)"),
):
    """Train the compact LLaVA on instruction shards (stage 1 projector, stage 2 projector + LLM); reruns resume."""
    from trainer.config import ConfigError, load_config
    from trainer.train import train as run_train

    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        _fail(str(e))
    summary = run_train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "init_loaded"}, indent=2, default=str))


@export_app.command("hf")
def export_hf(out: Path = typer.Argument(..., help="a finished `curate train` out dir"),
              to: Path = typer.Option(..., help="folder for the LlavaForConditionalGeneration checkpoint")):
    """Write a transformers LlavaForConditionalGeneration checkpoint from a training run."""
    from trainer.train import export_trained

    try:
        print(json.dumps({"hf_checkpoint": str(export_trained(out, to))}))
    except (OSError, ValueError) as e:
        _fail(str(e))


@app.command()
def regenerate(
    prompts: Path = typer.Option(..., help="the (changed) prompt folder"),
    input: list[Path] = typer.Option(..., "--input", help="image shards (Parquet with uid, url, caption, image)"),
    out: Path = typer.Option(..., help="output dir: parts, rejects, manifest"),
    backend: str = typer.Option("openai", help="openai, vllm (in process: --set model=FOLDER) or rules"),
    kind: Optional[str] = typer.Option(None, help="instruction kind, or 'recaption'; default: the prompt's task"),
    set_: list[str] = typer.Option([], "--set", help="more params: PARAM=VALUE (model, base_url, annotations, cache...)"),
):
    """Rebuild an instruction set from a prompt folder; cached requests are not paid for again."""
    import yaml

    from curation.ops.instruct import Instruct
    from curation.ops.recaption import Recaption
    from curation.synth.export import regenerate as run_regenerate
    from curation.synth.prompts import PromptError, load_prompt

    try:
        task = kind or load_prompt(prompts).task
        params = {"prompts": str(prompts), "backend": backend, **{k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in set_)}}
        op_cls = Recaption if task == "recaption" else Instruct
        if op_cls is Instruct:
            params["kind"] = task
        op = op_cls(op_cls.Params(**params), "regenerate", out / "_work")
        report = run_regenerate(op, input, out)
    except (OSError, ValueError, PromptError) as e:
        _fail(str(e))
    print(json.dumps({k: report[k] for k in ("prompt_version", "counts", "usage")}, indent=2))


@fixtures_app.command("web")
def fixtures_web(
    out: Path = typer.Option(..., help="folder to write"),
    n: int = typer.Option(1000, help="URL rows"),
    port: int = typer.Option(8765, help="port the URLs point at (serve on the same)"),
    seed: int = typer.Option(0),
    scenes: str = typer.Option("web", help="web: patterned scenes of 1-4 shapes; simple: 1-3 larger shapes on "
                               "white, square (what a tiny vision tower can learn from)"),
):
    """Write a synthetic web: images, captions, duplicates, broken items, urls.parquet and truth.parquet."""
    from curation.fixtures.web import make_web

    try:
        summary = make_web(out, n=n, port=port, seed=seed, scenes=scenes)
    except ValueError as e:
        _fail(str(e))
    print(json.dumps(summary, indent=2))


@fixtures_app.command("serve")
def fixtures_serve(web: Path, port: Optional[int] = typer.Option(None, help="default: the port in web.json")):
    """Serve a fixture web on 127.0.0.1 until Ctrl-C."""
    from curation.fixtures.serve import main

    main(web, port)


def entry() -> None:
    app(prog_name="curate")


if __name__ == "__main__":
    sys.exit(entry())
