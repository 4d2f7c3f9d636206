"""`curate`: run pipelines, inspect runs, export schemas, make and serve the fixture web."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from curation.cli_assets import fixtures_app, models_app, schema_app, vocab_app
from curation.cli_export import export_app, import_app
from curation.cli_util import fail, progress

# plain tracebacks: rich's would wrap paths at the terminal width and print every local variable
app = typer.Typer(
    help="Curate web image-text pairs into LLaVA-style training data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for sub, name in (
    (schema_app, "schema"),
    (vocab_app, "vocab"),
    (fixtures_app, "fixtures"),
    (models_app, "models"),
    (export_app, "export"),
    (import_app, "import"),
):
    app.add_typer(sub, name=name)


def execute(
    pipeline_path: Path,
    run_dir: Path | None,
    address: str | None,
    overrides: list[str],
    retry_failed: bool = False,
) -> Path:
    """Validate, then run a pipeline with progress; return the run dir."""
    from curation.engine.config import ConfigError, load_pipeline
    from curation.engine.driver import StageFailed, run_pipeline

    try:
        pipeline = load_pipeline(pipeline_path, overrides)
    except ConfigError as e:
        fail(str(e))
    run_dir = run_dir or Path("runs") / pipeline.name
    try:
        with progress() as update:
            run_pipeline(pipeline, run_dir, address=address, retry_failed=retry_failed, progress=update)
    except StageFailed as e:
        fail(str(e))
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C; SIGTERM (`ray job stop`): ray.init's handler exits 15
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        resume = ["curate", "run", str(pipeline_path), "--run-dir", str(run_dir)]
        resume += [a for o in overrides for a in ("--set", o)] + (["--retry-failed"] if retry_failed else [])
        print(
            f"interrupted: the parts finished so far are kept in {run_dir}; resume with: {shlex.join(resume)}",
            file=sys.stderr,
            flush=True,
        )
        raise typer.Exit(130) from None
    return run_dir


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="pipelines/NAME.yaml (a file, or a packaged pipeline: demo, metaclip)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="where outputs go (default runs/NAME)"),
    address: str | None = typer.Option(None, "--address", help="an existing Ray cluster (default: local Ray)"),
    set_: list[str] = typer.Option([], "--set", help="override a param: STAGE.PARAM=VALUE (YAML value)"),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="retry rows rejected for transient reasons (timeouts, 5xx)"
    ),
):
    """Run (or resume) a pipeline DAG."""
    out = execute(pipeline, run_dir, address, set_, retry_failed)
    _print_status(out)


def _print_status(run_dir: Path) -> None:
    from curation.engine.status import coverage_rows, run_status

    st = run_status(run_dir)
    print(f"run {st['run_dir']}", flush=True)  # a path: printed whole, never wrapped
    out = Console(width=None if sys.stdout.isatty() else 160)  # piped: wide enough that no stage name is cut
    table = Table(title="stages")
    for col in ("stage", "op", "status", "parts", "in", "out", "rejected", "seconds"):
        table.add_column(col, justify="right" if col in ("in", "out", "rejected", "seconds") else "left")
    reasons = Table(title="rejects by reason")
    for col in ("stage", "reason", "rows"):
        reasons.add_column(col, justify="right" if col == "rows" else "left")
    for s in st["stages"]:
        table.add_row(
            *(str(s.get(k, "")) for k in ("stage", "op", "status", "parts", "in", "out", "rejected", "seconds"))
        )
        for reason, n in s.get("rejected_by_reason", {}).items():
            reasons.add_row(s["stage"], reason, str(n))
    out.print(table)
    out.print(reasons)
    for s in st["stages"]:
        if "coverage_before" in s.get("report", {}):
            rep = s["report"]
            cov = Table(
                title=f"{s['stage']}: concept coverage ({rep['method']}, t={rep['t'] and round(rep['t'], 3)}, "
                f"{rep['selected']} of {rep['pool']} images kept)"
            )
            for col in ("metric", "before", "after"):
                cov.add_column(col, justify="left" if col == "metric" else "right")
            for row in coverage_rows(rep):
                cov.add_row(
                    row["metric"],
                    *(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in ("before", "after")),
                )
            out.print(cov)


@app.command()
def status(run_dir: Path, as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Per-stage counts and reject reasons of a run."""
    from curation.engine.status import run_status

    try:
        st = run_status(run_dir)
    except FileNotFoundError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        _print_status(run_dir)


@app.command()
def report(
    run_dir: Path,
    out: Path | None = typer.Option(None, "--out", help="HTML file (default RUN_DIR/report.html)"),
    samples: int = typer.Option(8, help="rows in the gallery"),
):
    """Write a self-contained HTML report: funnel, dedup groups, concept coverage, lengths, LLM use, sample rows."""
    from curation.inspect.report import write_report

    try:
        print(write_report(run_dir, out, samples))
    except (FileNotFoundError, OSError) as e:
        fail(str(e))


@app.command()
def view(run_dir: Path, port: int = typer.Option(8766, "--port", help="port on 127.0.0.1 (0: any free port)")):
    """Browse a run's rows and rejects in a small local web page (127.0.0.1 only) until Ctrl-C."""
    from curation.inspect.view import serve

    try:
        serve(run_dir, port)
    except (FileNotFoundError, OSError) as e:
        fail(str(e))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="where the fixture web and the run go"),
    n: int = typer.Option(400, help="URLs in the fixture web"),
    pipeline: Path = typer.Option(Path("pipelines/demo.yaml"), help="a pipeline file or a packaged one's name"),
    scenes: str = typer.Option(
        "longtail",
        help="the fixture web: longtail (colour x shape concepts on a Zipf law; the CLIP trained here, cached) or "
        "web / simple (uniform concepts; a random tiny CLIP)",
    ),
):
    """Make the fixture web, serve it on 127.0.0.1, run the demo pipeline, print the run dir."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local demo: Ray on loopback only
    from curation.fixtures.demo import demo_overrides
    from curation.fixtures.serve import WebServer, free_port
    from curation.fixtures.web import make_web

    web = out / "web"
    try:
        make_web(web, n=n, port=free_port(), seed=0, scenes=scenes)
    except ValueError as e:
        fail(str(e))
    overrides = demo_overrides(out, web, pipeline)
    with WebServer(web):
        run_dir = execute(pipeline, out / "run", None, overrides)
    _print_status(run_dir)
    print(f"run dir: {run_dir.resolve()}")
    print(f"status:  curate status {run_dir}")
    from curation.inspect.report import write_report

    print(f"report:  {write_report(run_dir).resolve()}")
    print(f"browse:  curate view {run_dir}")


@app.command()
def train(
    config: Path = typer.Argument(..., help="training YAML (trainer/config.py: TrainConfig)"),
    set_: list[str] = typer.Option([], "--set", help="override a field: KEY=VALUE (YAML value)"),
):
    """Train the compact LLaVA on instruction shards (stage 1 projector, stage 2 projector + LLM); reruns resume."""
    from trainer import distributed
    from trainer.config import ConfigError, load_config
    from trainer.train import train as run_train

    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        fail(str(e))
    with distributed.process_group():  # under torchrun: data-parallel ranks (trainer/distributed.py)
        summary = run_train(cfg)
        main_rank = distributed.is_main()
    if main_rank:
        print(json.dumps({k: v for k, v in summary.items() if k != "init_loaded"}, indent=2, default=str))


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(..., help="a finished `curate train` out dir (or its final/)"),
    shards: list[Path] = typer.Option(
        ..., "--shards", help="instruct shards: Parquet files or directories of part-*.parquet (run-dir stages too)"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="questions to evaluate (default: all)"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="tokens generated per answer at most"),
    out: Path | None = typer.Option(None, "--out", help="the JSON file (default CHECKPOINT/eval/NAME.json)"),
    ranking: bool = typer.Option(
        False, "--ranking", help="also rank the candidate answers of colour/count questions by log-likelihood"
    ),
    max_answer_words: int = typer.Option(5, min=1, help="longer answers are skipped (counted)"),
    max_answer_chars: int = typer.Option(32, min=1, help="longer answers are skipped (counted)"),
    batch_size: int = typer.Option(16, min=1, help="questions generated together"),
    device: str | None = typer.Option(None, help="torch device (default: cuda when there is one, else cpu)"),
):
    """Score a trained run on instruct shards' short-answer questions (greedy answers: exact and normalised match,
    per question type); the JSON goes beside the run, one file per set of shards, side by side."""
    import pyarrow as pa

    from trainer.eval_shards import evaluate_shards, write_report

    try:
        report = evaluate_shards(
            checkpoint,
            shards,
            limit,
            max_new_tokens,
            max_answer_words,
            max_answer_chars,
            batch_size,
            ranking,
            device,
        )
        path = write_report(report, out)
    except (OSError, ValueError, pa.ArrowException) as e:
        fail(str(e))
    print(json.dumps({**{k: v for k, v in report.items() if k != "mistakes"}, "written": str(path)}, indent=2))


@app.command()
def regenerate(
    prompts: Path = typer.Option(
        ..., help="the (changed) prompt folder, or a packaged prompt's name (conversation...)"
    ),
    input: list[Path] = typer.Option(
        ...,
        "--input",
        help="image shards (Parquet with uid, url, caption, image), or a run's stage parts: RUN/balance/part-*.parquet",
    ),
    out: Path = typer.Option(..., help="output dir: parts, rejects, manifest"),
    backend: str = typer.Option("openai", help="openai, vllm (in process: --set model=FOLDER) or rules"),
    kind: str | None = typer.Option(None, help="instruction kind, or 'recaption'; default: the prompt's task"),
    set_: list[str] = typer.Option(
        [], "--set", help="more params: PARAM=VALUE (model, base_url, annotations, cache...)"
    ),
):
    """Rebuild an instruction set from a prompt folder; cached requests are not paid for again."""
    from curation.ops.instruct import Instruct
    from curation.ops.recaption import Recaption
    from curation.synth.export import regenerate as run_regenerate
    from curation.synth.prompts import PromptError, find_prompt, load_prompt
    from schemas.overrides import apply_overrides, parse_overrides

    try:
        prompts = find_prompt(prompts)
        task = kind or load_prompt(prompts).task
        params = {
            "prompts": str(prompts),
            "backend": backend,
        }
        apply_overrides(params, parse_overrides(set_))
        op_cls = Recaption if task == "recaption" else Instruct
        if op_cls is Instruct:
            params["kind"] = task
        op = op_cls(op_cls.Params(**params), "regenerate", out / "_work")
        report = run_regenerate(op, input, out)
    except (OSError, ValueError, PromptError) as e:
        fail(str(e))
    print(json.dumps({k: report[k] for k in ("prompt_version", "counts", "usage")}, indent=2))


def entry() -> None:
    app(prog_name="curate")


if __name__ == "__main__":
    sys.exit(entry())
