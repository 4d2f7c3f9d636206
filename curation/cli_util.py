"""What every `curate` command shares: errors on one plain stderr line, and a progress bar per stage."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@contextmanager
def progress():
    """A rich progress bar per stage; yields the runner's progress callback."""
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, phase: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=max(total, 1), description=f"{stage} [{phase}]")

        yield update


def fail(msg: str) -> None:
    """The error on stderr as is (never through rich, which wraps paths at the terminal width), then exit 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise typer.Exit(2)
