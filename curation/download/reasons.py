"""Reason codes for failed downloads: img2dataset's error strings mapped to codes, and a pre-decode sniff of the
bytes."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from curation.download.guard import REASONS as GUARD_REASONS

# reasons a rerun with --retry-failed tries again (the failure may be transient)
TRANSIENT = frozenset(
    {"timeout", "unreachable", "connection_error", "http_429", "http_500", "http_502", "http_503", "http_504"}
)

_DOWNLOAD_PATTERNS = [
    # the download guard's and the shard's own 'reason: detail' (checked first: a detail may quote a server's text)
    (re.compile(rf"^({'|'.join((*GUARD_REASONS, 'robots_disallowed'))}): "), lambda m: m.group(1)),
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out", re.I), lambda m: "timeout"),
    (
        re.compile(
            r"Connection refused|No route to host|Network is unreachable|Name or service not known|"
            r"nodename nor servname|Temporary failure in name resolution",
            re.I,
        ),
        lambda m: "unreachable",
    ),
    (re.compile(r"unknown url type|unsupported", re.I), lambda m: "unsupported_scheme"),
    (re.compile(r"X-Robots-Tag", re.I), lambda m: "robots_disallowed"),
    (re.compile(r"hash mismatch"), lambda m: "hash_mismatch"),
    (
        re.compile(r"Remote end closed|Connection reset|IncompleteRead|BadStatusLine", re.I),
        lambda m: "connection_error",
    ),
]


def download_reason(message: str | None) -> str:
    """Reason code for an img2dataset failed_to_download message."""
    for pattern, code in _DOWNLOAD_PATTERNS:
        m = pattern.search(message or "")
        if m:
            return code(m)
    return "download_error"


def download_failure(message: str | None) -> tuple[str, str]:
    """(reason, detail) for a failed_to_download message; the guard's 'reason: detail' loses its prefix."""
    message = message or ""
    reason = download_reason(message)
    prefix = f"{reason}: "
    return reason, message[len(prefix) :] if message.startswith(prefix) else message


def sniff(data: bytes, max_pixels: int) -> tuple[str, str] | None:
    """Refuse bytes before decoding: (reason, detail) for empty, non-image or oversized content, else None."""
    if not data:
        return "empty_body", "0 bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                w, h = im.size
    except Image.DecompressionBombError as e:
        return "too_many_pixels", str(e)[:200]
    except Exception:
        head = data[:512].lstrip().lower()
        kind = "html" if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")) else "unknown format"
        return "not_an_image", f"{kind}, {len(data)} bytes"
    if w * h > max_pixels:
        return "too_many_pixels", f"{w}x{h} > {max_pixels} pixels"
    return None


def decode_reason(data: bytes) -> tuple[str, str]:
    """Why bytes that look like an image failed to decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except OSError as e:
        if "truncated" in str(e).lower():
            return "truncated_image", str(e)[:200]
        return "decode_error", str(e)[:200]
    return "decode_error", "decoder refused the image"


def split_reason(message: str) -> tuple[str, str]:
    """Parse 'reason: detail' as written by the checked resizer."""
    reason, _, detail = message.partition(": ")
    return reason, detail
