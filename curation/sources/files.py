"""Input files named by a path, a directory (searched recursively) or a glob, in a stable order."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path

TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".jsonl", ".jsonl.gz", ".json.gz")


def suffix(path: str | Path) -> str:
    """The format suffix of a file name: .tsv.gz, .parquet, ... (lower case)."""
    name = Path(path).name.lower()
    return next(
        (s for s in sorted(TABLE_SUFFIXES + (".tar", ".tar.gz", ".tgz"), key=len, reverse=True) if name.endswith(s)),
        Path(name).suffix,
    )


def find_files(spec: str | list[str], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """Files of `spec` (a path, a directory searched recursively, or a glob; or a list of them) whose names end in
    one of `suffixes`, sorted by path; hidden files and folders are skipped. Raises ValueError when none match."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    found: set[Path] = set()
    for s in specs:
        p = Path(s)
        if glob.has_magic(s):
            candidates = [Path(m) for m in glob.glob(s, recursive=True)]
        elif p.is_dir():
            candidates = [f for f in p.rglob("*") if not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.exists():
            if suffix(p) not in suffixes:
                raise ValueError(f"{p}: not a {what} file (expected one of {', '.join(suffixes)})")
            candidates = [p]
        else:
            raise ValueError(f"{p}: no such file or directory")
        found |= {c for c in candidates if c.is_file() and suffix(c) in suffixes}
    if not found:
        raise ValueError(f"{', '.join(specs)}: no {what} files ({', '.join(suffixes)}) there")
    return sorted(found)


def stat_fingerprint(files: list[Path]) -> str:
    """A cheap fingerprint of a set of files: path, size and modification time of each (no byte is read, so a
    thousand-file input fingerprints in milliseconds; a file rewritten in place with the same size and time is not
    seen: rerun with a new run dir then)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
