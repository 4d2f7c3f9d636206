"""The one `--set KEY=VALUE` grammar of every config (pipelines, training, `curate regenerate`).

KEY is dotted (`ingest.urls`, `vllm.dtype`); VALUE is parsed as YAML (`3` is an int, `[a, b]` a list, `x` a string).
It lives with the contract because both the producer (curation) and the consumer (trainer) read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


class OverrideError(ValueError):
    """An override that is not KEY=VALUE, or whose value is not YAML."""


def parse_overrides(items: Iterable[str]) -> list[tuple[list[str], Any]]:
    """`KEY=VALUE` strings into (key path, value) pairs."""
    pairs = []
    for item in items:
        key, eq, raw = item.partition("=")
        path = key.strip().split(".")
        if not eq or not all(path):
            raise OverrideError(f"--set {item!r}: expected KEY=VALUE (KEY dotted, VALUE as YAML)")
        try:
            pairs.append((path, yaml.safe_load(raw)))
        except yaml.YAMLError as e:
            raise OverrideError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    return pairs


def apply_overrides(tree: dict, pairs: Iterable[tuple[list[str], Any]]) -> dict:
    """Set each key path in a nested mapping, creating mappings on the way; returns the tree."""
    for path, value in pairs:
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise OverrideError(f"--set {'.'.join(path)}: '{part}' is {child!r}, not a mapping")
            node = child
        node[path[-1]] = value
    return tree
