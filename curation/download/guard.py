"""Download guard: which URLs and addresses may be fetched, and a capped, timed fetch that checks every hop.

The fetch resolves each host once, refuses the request if any resolved address is blocked, then connects to
one of the very addresses it checked (so a second DNS answer cannot swap in another: no rebinding window).
Redirect targets go through the same check at their own connect, after a scheme and hop-count check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from functools import cache, partial
from http.client import HTTPConnection, HTTPSConnection
from urllib.parse import urljoin, urlsplit

SCHEMES = ("http", "https")
REASONS = ("unsupported_scheme", "blocked_address", "too_many_redirects", "too_large", "timeout", "tls_error")
METADATA = {
    ipaddress.ip_address("169.254.169.254"): "cloud metadata service",
    ipaddress.ip_address("fd00:ec2::254"): "cloud metadata service",
}
_PRIVATE = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]
_NAT64 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48")]
resolver = socket.getaddrinfo  # tests swap this to resolve names to chosen addresses


class GuardError(Exception):
    """A download refused by the guard: str() is 'reason: detail' (the reason is one of REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class GuardPolicy:
    """What a download may do. Loopback and private ranges are refused unless allowed; link-local never passes."""

    allow_loopback: bool = False
    allow_private: bool = False
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    max_seconds: float = 30.0  # per image, all hops and the body included
    ca_bundle: str | None = None  # a PEM file of CAs trusted besides the system's (verification is never off)

    def allows(self, kind: str) -> bool:
        return (
            kind == "global"
            or (kind == "loopback" and self.allow_loopback)
            or (kind == "private" and self.allow_private)
        )


def _embedded_v4(a: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside IPv4-mapped, IPv4-compatible, 6to4 and NAT64 forms, else None."""
    if a.ipv4_mapped is not None:
        return a.ipv4_mapped
    if a.sixtofour is not None:
        return a.sixtofour
    if any(a in n for n in _NAT64) or (int(a) >> 32 == 0 and int(a) > 1):  # NAT64 or ::a.b.c.d
        return ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)
    return None


def _effective(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a connect reaches: the IPv4 one for IPv4-in-IPv6 forms; any IPv6 zone id dropped."""
    a = ipaddress.ip_address(address.split("%", 1)[0])
    return (_embedded_v4(a) or a) if a.version == 6 else a


def address_class(address: str) -> str:
    """'global', or why an address is not: unspecified, loopback, link_local, multicast, private, reserved."""
    a = _effective(address)
    if a.is_unspecified:
        return "unspecified"
    if a.is_loopback:
        return "loopback"
    if a.is_link_local or a in METADATA:
        return "link_local"
    if a.is_multicast:
        return "multicast"
    if any(a in n for n in _PRIVATE):
        return "private"
    return "global" if a.is_global and not a.is_reserved else "reserved"


def check_scheme(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise GuardError("unsupported_scheme", f"'{scheme or '(none)'}:' URL refused; only http(s) is downloaded")


def vet(host: str, port: int, policy: GuardPolicy) -> list[tuple]:
    """Resolve `host` and classify every address; the addrinfo list if all are allowed, else GuardError."""
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"Name or service not known: {host} ({e})") from e
    for info in infos:
        ip = info[4][0]
        kind = address_class(ip)
        if not policy.allows(kind):
            what = METADATA.get(_effective(ip), kind.replace("_", "-"))
            raise GuardError("blocked_address", f"{host} -> {ip} is {what}")
    return infos


def check_url(url: str, policy: GuardPolicy) -> list[tuple]:
    """The guard's decision for a URL without connecting: GuardError, or the vetted addresses."""
    check_scheme(url)
    parts = urlsplit(url)
    if not parts.hostname:
        raise GuardError("blocked_address", f"no host in {url!r}")
    return vet(parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80), policy)


def connect_socket(info: tuple, timeout: float) -> socket.socket:
    """Open a TCP connection to one vetted addrinfo entry."""
    family, type_, proto, _, sockaddr = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


class _Fetch:
    """State of one guarded download: policy, deadline, redirect hops and the socket being read."""

    def __init__(self, policy: GuardPolicy, timeout: float) -> None:
        self.policy, self.timeout = policy, timeout
        self.deadline = time.monotonic() + policy.max_seconds
        self.hops = 0
        self.sock: socket.socket | None = None  # the connection being read (TLS-wrapped for https)
        self.raw: socket.socket | None = None  # the TCP socket just connected (before a TLS handshake wraps it)
        self._lock, self._done = threading.Lock(), False
        # a server that drips its headers a byte at a time passes every per-read timeout: at the deadline the
        # connection is shut down under the reader, so that max_seconds bounds the whole image
        self._watchdog = threading.Timer(policy.max_seconds, self._cut)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _cut(self) -> None:
        """At the deadline: shut the open connection down (its blocked read returns); never a closed one."""
        with self._lock:
            if self._done:
                return
            for sock in (self.sock, self.raw):
                if sock is not None and sock.fileno() != -1:  # -1: closed or handed to TLS
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd only, never the TLS state

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def finish(self) -> None:
        with self._lock:
            self._done = True
        self._watchdog.cancel()

    def budget(self, slack: float = 0.0) -> float:
        """Seconds the next blocking step may take: the per-request timeout, cut to what is left of max_seconds."""
        left = self.deadline - time.monotonic()
        if left <= slack:
            raise GuardError("timeout", f"over {self.policy.max_seconds:g} s in total for this image")
        return min(self.timeout, left)

    def connect(self, address: tuple, timeout=None, source_address=None) -> socket.socket:
        """http.client's _create_connection: vet the host, then connect to a checked address."""
        host, port = address
        error: OSError | None = None
        for info in vet(host, port, self.policy):
            try:
                self.raw = connect_socket(info, self.budget())
                return self.raw
            except OSError as e:
                error = e
        raise error or OSError(f"no address for {host}")

    def hop(self, url: str) -> None:
        """A redirect to `url`: count it and check its scheme (its address is vetted when it connects)."""
        self.hops += 1
        if self.hops > self.policy.max_redirects:
            raise GuardError(
                "too_many_redirects", f"more than {self.policy.max_redirects} redirects (next: {url[:200]})"
            )
        check_scheme(url)
        self.budget()

    def read(self, response) -> bytes:
        """Read the body in pieces, never past max_bytes, within the time left."""
        cap = self.policy.max_bytes
        length = response.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > cap:
            raise GuardError("too_large", f"Content-Length {int(length)} > {cap} bytes")
        body = bytearray()
        while True:
            if self.sock is not None:
                self.sock.settimeout(self.budget())
            try:
                piece = response.read1(65536)
            except TimeoutError:
                self.budget(slack=0.05)  # the total time ran out (GuardError), else the per-request timeout did
                raise
            if not piece:
                if self.expired():  # the watchdog's shutdown ends the body like an EOF
                    raise GuardError("timeout", f"over {self.policy.max_seconds:g} s in total for this image")
                return bytes(body)
            body += piece
            if len(body) > cap:
                raise GuardError("too_large", f"body over {cap} bytes (stopped reading)")


class _Guarded:
    """Connects through the fetch's checked address and lets it see the socket (mixed into http.client's classes)."""

    def __init__(self, *args, fetch: _Fetch, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fetch = fetch
        self._create_connection = fetch.connect

    def connect(self) -> None:
        try:
            super().connect()  # for HTTPS: TLS with SNI and certificate checks for the URL's host name
        except ssl.SSLCertVerificationError as e:
            raise GuardError("tls_error", f"{self.host}: certificate not accepted: {e.verify_message}") from None
        except ssl.SSLError as e:
            raise GuardError("tls_error", f"{self.host}: TLS handshake failed: {e.reason or e}") from None
        self._fetch.sock = self.sock


class _GuardedHTTP(_Guarded, HTTPConnection):
    pass


class _GuardedHTTPS(_Guarded, HTTPSConnection):
    pass


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, fetch: _Fetch) -> None:
        super().__init__()
        self.fetch = fetch

    def http_open(self, req):
        return self.do_open(partial(_GuardedHTTP, fetch=self.fetch), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, fetch: _Fetch) -> None:
        super().__init__(context=tls_context(fetch.policy.ca_bundle))
        self.fetch = fetch

    def https_open(self, req):
        return self.do_open(partial(_GuardedHTTPS, fetch=self.fetch), req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects hop by hop through the guard; the redirect's own body is discarded unread."""

    max_repeats = max_redirections = 1 << 30  # the guard counts hops

    def __init__(self, fetch: _Fetch) -> None:
        self.fetch = fetch

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        fp.close()
        if target:
            self.fetch.hop(urljoin(req.full_url, target.strip()))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@cache
def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The client context: the system's CAs (plus `ca_bundle`'s), certificate and host name always checked."""
    ctx = ssl.create_default_context()
    if ca_bundle:
        ctx.load_verify_locations(cafile=ca_bundle)
    return ctx


def fetch(url: str, policy: GuardPolicy, timeout: float, headers: dict | None = None):
    """GET `url` under `policy`: (body bytes, response headers), or GuardError / urllib's errors."""
    check_scheme(url)
    state = _Fetch(policy, timeout)
    opener = urllib.request.OpenerDirector()  # no proxy, file, ftp or data handlers: http(s) only, connected directly
    for handler in (
        _HTTP(state),
        _HTTPS(state),
        _Redirects(state),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=state.budget()) as response:
            return state.read(response), response.headers
    except GuardError:
        raise
    except Exception:
        if state.expired():  # whatever the cut connection raised: the total time ran out
            raise GuardError("timeout", f"over {policy.max_seconds:g} s in total for this image") from None
        raise
    finally:
        state.finish()


__all__ = ["REASONS", "GuardError", "GuardPolicy", "address_class", "check_url", "fetch"]
