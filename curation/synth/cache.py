"""The request cache: answers keyed by (prompt version, model, sampling, messages) in SQLite, safe against kills.

Single flight across processes: before sending, a worker claims the keys it misses (a row per key in `claims`,
owner and lease); a key another live worker has claimed is waited for, not sent again, so two parts that render
the same request (two images with the same caption) ask the server once. A claim lapses when its lease runs out
(the owner renews it every lease/3 s from a thread while it works), when its owner's process is gone (same host),
or when its owner's request failed (failures are not stored, so another worker may try).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
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
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)"
        )

    def __repr__(self) -> str:
        return f"RequestCache({str(self.path)!r})"

    def get(self, key: str) -> Result | None:
        """The cached answer for `key`, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, Result]:
        """Cached answers for those of `keys` that have one."""
        with self._lock:
            return self._answers(list(dict.fromkeys(keys)))

    def _answers(self, keys: list[str]) -> dict[str, Result]:
        """get_many's query (the caller holds the lock)."""
        found = {}
        for chunk, marks in _chunks(keys):
            rows = self._db.execute(f"SELECT key, result FROM answers WHERE key IN ({marks})", chunk)
            found.update((k, Result.model_validate_json(v)) for k, v in rows)
        return found

    def put(self, key: str, result: Result) -> bool:
        """Store a successful answer and drop its claim (one committed transaction); failures are not stored, so a
        rerun retries them."""
        if not result.ok:
            return False
        with self._lock, self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, result, created) VALUES (?, ?, ?)",
                (key, to_json(result), time.time()),
            )
            self._db.execute("DELETE FROM claims WHERE key = ?", (key,))
        return True

    def claim(self, keys: list[str], owner: str, lease: float) -> tuple[set[str], dict[str, Result]]:
        """Claim for `owner` those of `keys` that are neither answered nor held by another live claim; returns
        (claimed keys, answers of the answered ones). One IMMEDIATE transaction, so a key is never claimed by two
        owners, and a key whose answer landed since the caller looked comes back answered, not claimed."""
        now, claimed = time.time(), set()
        with self._lock, self._tx("BEGIN IMMEDIATE"):
            answered = self._answers(keys)
            for chunk, marks in _chunks(keys):
                held = self._db.execute(f"SELECT key, owner, expires FROM claims WHERE key IN ({marks})", chunk)
                lapsed = [(k,) for k, who, until in held.fetchall() if _lapsed(who, until, now)]
                self._db.executemany("DELETE FROM claims WHERE key = ?", lapsed)
                self._db.executemany(
                    "INSERT OR IGNORE INTO claims (key, owner, expires) VALUES (?, ?, ?)",
                    [(k, owner, now + lease) for k in chunk if k not in answered],
                )
                mine = self._db.execute(f"SELECT key FROM claims WHERE owner = ? AND key IN ({marks})", [owner, *chunk])
                claimed.update(k for (k,) in mine)
        return claimed, answered

    def renew(self, owner: str, lease: float) -> None:
        """Extend every claim `owner` holds to now + lease."""
        with self._lock:
            self._db.execute("UPDATE claims SET expires = ? WHERE owner = ?", (time.time() + lease, owner))

    def release(self, owner: str) -> None:
        """Drop every claim `owner` still holds (its failed or unsent keys)."""
        with self._lock:
            self._db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    def claimed_by_others(self, keys: list[str], owner: str) -> set[str]:
        """Those of `keys` held by a live, unexpired claim of another owner."""
        now, held = time.time(), set()
        with self._lock:
            for chunk, marks in _chunks(keys):
                rows = self._db.execute(f"SELECT key, owner, expires FROM claims WHERE key IN ({marks})", chunk)
                held.update(k for k, who, until in rows if who != owner and not _lapsed(who, until, now))
        return held

    @contextlib.contextmanager
    def _tx(self, begin: str = "BEGIN"):
        """A transaction (the connection is in autocommit mode): committed, or rolled back on an error."""
        self._db.execute(begin)
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


HOST = socket.gethostname()
CHUNK = 500  # keys per query: under SQLite's bound-parameter limit


def _chunks(keys: list[str]):
    """(keys, "?,?,...") pieces of at most CHUNK keys."""
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _lapsed(owner: str, expires: float, now: float) -> bool:
    """Whether a claim no longer holds: its lease ran out or its owner's process is gone."""
    return expires < now or _gone(owner)


def new_owner() -> str:
    """A claim owner: host, pid and a random token (one per cached_generate call)."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _gone(owner: str) -> bool:
    """True when the owner's process is known to be dead (same host, no such pid); other hosts rely on the lease."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Renewer:
    """A thread renewing an owner's claims every lease/3 s (a thread: a backend may block the event loop)."""

    def __init__(self, cache: RequestCache, owner: str, lease: float):
        self.cache, self.owner, self.lease, self._stop = cache, owner, lease, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            self.cache.renew(self.owner, self.lease)

    def __enter__(self) -> _Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cache.release(self.owner)


async def cached_generate(
    backend: Backend, cache: RequestCache, requests: list[Request], lease: float = 30.0, poll: float = 0.2
) -> list[Result]:
    """Results in request order: hits from the cache, misses sent once each (by cache key) and stored on arrival;
    a miss another worker is already asking is waited for (its answer read from the cache), not sent again."""
    keys = [key_for(r.prompt_version, backend.model, r.sampling, r.messages) for r in requests]
    hits = cache.get_many(keys)
    first: dict[str, Request] = {}  # cache key -> the one request sent for it
    for key, req in zip(keys, requests):
        if key not in hits and key not in first:
            first[key] = req.model_copy(update={"key": key})
    fresh: dict[str, Result] = {}
    owner, pending = new_owner(), list(first)
    with _Renewer(cache, owner, lease):
        while pending:
            mine, answered = cache.claim(pending, owner, lease)
            hits.update(answered)
            send = [first[k] for k in pending if k in mine]
            if send:
                done = await backend.generate(send, on_result=lambda r: cache.put(r.key, r))
                fresh.update((r.key, r) for r in done)
                cache.release(owner)  # the failed ones: another worker may try them
            pending = [k for k in pending if k not in mine and k not in answered]
            while pending:  # held by others: wait for their answers, or for a claim to lapse
                hits.update(cache.get_many(pending))
                pending = [k for k in pending if k not in hits]
                if not pending or len(cache.claimed_by_others(pending, owner)) < len(pending):
                    break
                await asyncio.sleep(poll)
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
