"""The request cache: answers keyed by (prompt version, model, sampling, messages) in SQLite, safe against kills."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from curation.synth.types import Backend, Request, Result, run_sync


def _plain(value: Any) -> Any:
    """A pydantic model as a dict, anything else unchanged."""
    return value.model_dump() if isinstance(value, BaseModel) else value


def key_for(prompt_version: str, model: str, sampling: Any, messages: list[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON (sorted keys) of exactly these four things."""
    doc = {"prompt_version": prompt_version, "model": model, "sampling": _plain(sampling), "messages": messages}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class RequestCache:
    """SQLite in WAL mode, one committed row per answer: a kill loses at most answers not yet committed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # timeout: wait for another process's write lock instead of failing
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, result TEXT NOT NULL, created REAL NOT NULL)"
        )

    def __repr__(self) -> str:
        return f"RequestCache({str(self.path)!r})"

    def get(self, key: str) -> Result | None:
        """The cached answer for `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Result]:
        """Cached answers for those of `keys` that have one."""
        keys, found = list(dict.fromkeys(keys)), {}
        with self._lock:
            for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[i : i + 500]
                rows = self._db.execute(
                    f"SELECT key, result FROM answers WHERE key IN ({','.join('?' * len(chunk))})", chunk
                ).fetchall()
                found.update((k, Result.model_validate_json(v)) for k, v in rows)
        return found

    def put(self, key: str, result: Result) -> bool:
        """Store a successful answer (one committed transaction); failures are not stored, so a rerun retries them."""
        if not result.ok:
            return False
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, result, created) VALUES (?, ?, ?)",
                (key, to_json(result), time.time()),
            )
        return True

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


async def cached_generate(backend: Backend, cache: RequestCache, requests: list[Request]) -> list[Result]:
    """Results in request order: hits from the cache, misses sent once each (by cache key) and stored on arrival."""
    keys = [key_for(r.prompt_version, backend.model, r.sampling, r.messages) for r in requests]
    hits = cache.get_many(keys)
    misses: dict[str, Request] = {}  # cache key -> the one request sent for it
    for key, req in zip(keys, requests):
        if key not in hits and key not in misses:
            misses[key] = req.model_copy(update={"key": key})
    fresh = {r.key: r for r in await backend.generate(list(misses.values()), on_result=lambda r: cache.put(r.key, r))}
    out = []
    for key, req in zip(keys, requests):
        if key in hits:
            out.append(hits[key].model_copy(update={"key": req.key, "cached": True, "attempts": 0}))
        else:
            out.append(fresh[key].model_copy(update={"key": req.key, "cached": False}))
    return out


def run_cached(backend: Backend, cache: RequestCache, requests: list[Request]) -> list[Result]:
    """`cached_generate` from synchronous code."""
    return run_sync(cached_generate(backend, cache, requests))


def to_json(result: Result) -> str:
    """A Result as compact JSON (what the cache stores)."""
    return json.dumps(result.model_dump(exclude={"cached"}), separators=(",", ":"), ensure_ascii=False)
