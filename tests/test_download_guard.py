"""Download safety: refused schemes and addresses, and caps on bytes, pixels, redirects and time.

Network rule (GUIDE section 5): every request goes to 127.0.0.1. Loopback spellings and file:// run through the
real ingest path (if the guard failed they would still only reach this machine); private and metadata addresses
are checked on the guard's decision alone, with the socket layer wrapped so that a non-loopback connect fails.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import struct
import time
import zlib

import numpy as np
import polars as pl
import pytest
from PIL import Image

import curation.download.guard as guard
from curation.download.guard import GuardError, GuardPolicy, address_class, check_url, fetch
from curation.download.reasons import download_failure
from curation.engine.config import load_pipeline, parse_pipeline
from curation.engine.driver import run_pipeline
from curation.fixtures.serve import WebServer
from tests.conftest import ROOT

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0x7f.0.0.1",
    "017700000001",
    "127.1",
    "[::ffff:127.0.0.1]",
    "localhost",
]


def _jpeg(seed: int, side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(1 + width)))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A loopback server with a few files, plus a valid JPEG on disk that must never be read through a URL."""
    root = tmp_path_factory.mktemp("guard-web")
    (root / "files").mkdir()
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        (root / "files" / name).write_bytes(_jpeg(i))
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(big, "PNG")
    (root / "files" / "big.png").write_bytes(big.getvalue())  # ~77 KB
    (root / "files" / "bomb.png").write_bytes(_png_claiming(60_000, 60_000))
    secret = root / "secret.jpg"
    secret.write_bytes(_jpeg(7))
    with WebServer(root, port=0, trickle=0.25) as server:
        yield server, secret


@pytest.fixture
def loopback_only(monkeypatch):
    """Wrap the guard's connect so that any non-loopback connect fails the test instead of leaving the machine."""
    connected = []
    real = guard.connect_socket

    def connect(info, timeout):
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        assert ip.is_loopback or (getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback), f"connect to {ip}"
        connected.append(str(ip))
        return real(info, timeout)

    monkeypatch.setattr(guard, "connect_socket", connect)
    return connected


def _ingest(tmp_path, urls: list[str], **params):
    """Run the real ingest stage (Ray, img2dataset) over `urls`; (manifest, outputs, rejects by url)."""
    pl.DataFrame({"url": urls, "caption": [f"case {i}" for i in range(len(urls))]}).write_parquet(
        tmp_path / "urls.parquet"
    )
    raw = {
        "name": "guard",
        "stages": {
            "ingest": {
                "op": "ingest",
                "params": {"urls": str(tmp_path / "urls.parquet"), "thread_count": 16, "timeout": 2, **params},
            }
        },
    }
    m = run_pipeline(parse_pipeline(raw, "guard.yaml"), tmp_path / "run")["ingest"]
    out = pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / "run/ingest").glob("part-*.parquet"))])
    rej = pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / "run/ingest/rejects").glob("part-*.parquet"))])
    assert m["counts"]["in"] == len(urls) == m["counts"]["out"] + m["counts"]["rejected"] == out.height + rej.height
    return m, out, {r["url"]: (r["reason"], r["detail"]) for r in rej.iter_rows(named=True)}


def test_loopback_spellings_and_file_urls_are_refused_by_default(ray_session, site, tmp_path):
    server, secret = site
    before = dict(server.requests)
    urls = [f"http://{h}:{server.port}/files/a.jpg" for h in [*LOOPBACK_SPELLINGS, "[::1]"]]
    urls += [f"HTTP://127.0.0.1:{server.port}/files/c.jpg"]  # schemes are case-insensitive: it reaches the guard
    urls += [secret.as_uri(), f"http://127.0.0.1:{server.port}/redirect?to=/files/b.jpg"]
    _m, out, rej = _ingest(tmp_path, urls)
    assert out.height == 0
    for url in urls[:-2] + urls[-1:]:
        reason, detail = rej[url]
        assert reason == "blocked_address" and detail.endswith("is loopback"), (url, detail)
    assert rej[secret.as_uri()][0] == "unsupported_scheme"  # a valid JPEG on disk, not read
    assert dict(server.requests) == before  # nothing reached the server


def test_caps_redirects_and_time_on_the_real_ingest_path(ray_session, site, tmp_path):
    server, secret = site
    base = f"http://127.0.0.1:{server.port}"
    ok = [f"http://{h}:{server.port}/files/c.jpg" for h in LOOPBACK_SPELLINGS] + [f"{base}/hops/5/a.jpg"]
    cases = {
        f"{base}/redirect?to={secret.as_uri()}": ("unsupported_scheme", "'file:'"),
        f"{base}/redirect?to=http://0.0.0.0:{server.port}/files/b.jpg": ("blocked_address", "unspecified"),
        f"{base}/redirect?to=http://[::]:{server.port}/files/b.jpg": ("blocked_address", "unspecified"),
        f"{base}/hops/6/b.jpg": ("too_many_redirects", "more than 5 redirects"),
        f"{base}/files/big.png": ("too_large", "Content-Length"),
        f"{base}/endless": ("too_large", "stopped reading"),
        f"{base}/files/bomb.png": ("too_many_pixels", "pixels"),
        f"{base}/slow/a.jpg": ("timeout", "in total"),
    }
    before = dict(server.requests)
    _m, out, rej = _ingest(tmp_path, ok + list(cases), allow_loopback=True, max_bytes=40_000, max_seconds=4)
    assert sorted(out["url"]) == sorted(ok)  # every loopback spelling reaches the server when allowed
    for url, (reason, detail) in cases.items():
        assert rej[url][0] == reason and detail in rej[url][1], (url, rej[url])
    hit = {p: n - before.get(p, 0) for p, n in server.requests.items() if n != before.get(p, 0)}
    assert "/files/b.jpg" not in hit and "/hops/0/b.jpg" not in hit  # refused hops never connected
    assert hit["/hops/1/b.jpg"] == 1 and hit["/hops/0/a.jpg"] == 1


@pytest.mark.parametrize(
    "address,kind",
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link_local"),
        ("169.254.0.5", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("fd00:ec2::254", "link_local"),
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link_local"),
        ("64:ff9b::a9fe:a9fe", "link_local"),
        ("2002:0a00:0001::1", "private"),
        ("::a00:1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("192.0.2.1", "reserved"),
        ("240.0.0.1", "reserved"),
        ("8.8.8.8", "global"),
        ("2606:4700::1111", "global"),
    ],
)
def test_address_classes(address, kind):
    assert address_class(address) == kind


def _resolve_to(monkeypatch, table: dict[str, list[list[str]]]):
    """Resolve the names in `table` to its answers in turn, the last one repeated (no DNS); others as usual.

    Returns the names looked up."""
    real, calls = guard.resolver, []

    def resolver(host, port, *args, **kwargs):
        calls.append(host)
        if host not in table:
            return real(host, port, *args, **kwargs)
        answers = table[host]
        ips = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ips
        ]

    monkeypatch.setattr(guard, "resolver", resolver)
    return calls


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/a.jpg",
        "http://172.20.1.1/a.jpg",
        "http://192.168.0.10:8080/a.jpg",
        "http://[fc00::5]/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/a.jpg",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://2852039166/",
        "http://[::ffff:169.254.169.254]/",
        "https://intranet.test/a.jpg",
        "http://metadata.test/computeMetadata/v1/",
        "http://mixed.test/a.jpg",
    ],
)
def test_private_and_metadata_addresses_are_refused_on_the_guards_decision(url, monkeypatch, loopback_only):
    _resolve_to(
        monkeypatch,
        {
            "intranet.test": [["10.20.30.40"]],
            "metadata.test": [["169.254.169.254"]],
            "mixed.test": [["93.184.216.34", "192.168.1.1"]],
        },
    )
    monkeypatch.setattr(guard, "connect_socket", lambda *a: pytest.fail("the guard's decision must not connect"))
    with pytest.raises(GuardError) as e:
        check_url(url, GuardPolicy(allow_loopback=True))
    assert e.value.reason == "blocked_address"
    with pytest.raises(GuardError, match=r"blocked_address"):
        fetch(url, GuardPolicy(allow_loopback=True), timeout=1)  # the download path refuses before connecting
    metadata = any(m in url for m in ("169.254.169.254", "metadata", "0xa9", "2852039166", "fd00:ec2::254"))
    assert ("cloud metadata service" in e.value.detail) == metadata


def test_allow_private_opens_private_ranges_only(monkeypatch):
    _resolve_to(monkeypatch, {"nas.test": [["192.168.1.20"]]})
    policy = GuardPolicy(allow_private=True)
    assert [i[4][0] for i in check_url("http://nas.test/a.jpg", policy)] == ["192.168.1.20"]
    assert check_url("http://10.0.0.1/", policy)
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://127.0.0.1/"):
        with pytest.raises(GuardError, match=r"blocked_address"):
            check_url(url, policy)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/a.jpg",
        "data:image/png;base64,AAAA",
        "gopher://127.0.0.1/",
        "javascript:alert(1)",
        "//127.0.0.1/a.jpg",
    ],
)
def test_other_schemes_are_refused(url):
    with pytest.raises(GuardError, match=r"unsupported_scheme"):
        fetch(url, GuardPolicy(allow_loopback=True), timeout=1)


def test_redirects_to_blocked_addresses_are_refused_at_the_hop(site, monkeypatch, loopback_only):
    server, secret = site
    _resolve_to(monkeypatch, {"metadata.test": [["169.254.169.254"]], "intranet.test": [["10.0.0.7"]]})
    policy = GuardPolicy(allow_loopback=True)
    base = f"http://127.0.0.1:{server.port}"
    for target in (
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.test/",
        "http://intranet.test:8080/a.jpg",
        "http://[fe80::1]/",
        "http://[::ffff:10.0.0.1]/",
    ):
        with pytest.raises(GuardError, match=r"blocked_address"):
            fetch(f"{base}/redirect?to={target}", policy, timeout=2)
    with pytest.raises(GuardError, match=r"unsupported_scheme"):
        fetch(f"{base}/redirect?to={secret.as_uri()}", policy, timeout=2)
    assert set(loopback_only) == {"127.0.0.1"}  # only the redirecting server was connected to


def test_connect_goes_to_the_address_that_was_checked(site, monkeypatch, loopback_only):
    """DNS rebinding: the name resolves once per hop and the connect uses that checked answer."""
    server, _ = site
    calls = _resolve_to(monkeypatch, {"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
    body, _ = fetch(f"http://rebind.test:{server.port}/files/a.jpg", GuardPolicy(allow_loopback=True), timeout=2)
    assert body == (server.files / "a.jpg").read_bytes()
    assert calls == ["rebind.test"] and loopback_only == ["127.0.0.1"]
    with pytest.raises(GuardError, match=r"10.0.0.1 is private"):  # the next lookup would have given the other answer
        check_url(f"http://rebind.test:{server.port}/", GuardPolicy(allow_loopback=True))


def test_body_cap_stops_reading_and_time_cap_bounds_a_slow_server(site, loopback_only):
    server, _ = site
    base = f"http://127.0.0.1:{server.port}"
    small = GuardPolicy(allow_loopback=True, max_bytes=10_000)
    with pytest.raises(GuardError, match=r"too_large: body over 10000 bytes"):
        fetch(f"{base}/endless", small, timeout=2)
    data = (server.files / "a.jpg").read_bytes()
    assert fetch(f"{base}/files/a.jpg", GuardPolicy(allow_loopback=True, max_bytes=len(data)), timeout=2)[0] == data
    with pytest.raises(GuardError, match=r"too_large: Content-Length"):
        fetch(f"{base}/files/a.jpg", GuardPolicy(allow_loopback=True, max_bytes=len(data) - 1), timeout=2)
    with pytest.raises(GuardError, match=r"timeout: over 1 s in total"):  # each piece comes well within the 2 s timeout
        fetch(f"{base}/slow/b.jpg", GuardPolicy(allow_loopback=True, max_seconds=1), timeout=2)
    with pytest.raises(GuardError, match=r"too_many_redirects"):
        fetch(f"{base}/hops/3/a.jpg", GuardPolicy(allow_loopback=True, max_redirects=2), timeout=2)
    assert fetch(f"{base}/hops/2/a.jpg", GuardPolicy(allow_loopback=True, max_redirects=2), timeout=2)[0] == data


def test_guard_messages_become_reason_codes():
    assert download_failure("blocked_address: x -> 10.0.0.1 is private") == (
        "blocked_address",
        "x -> 10.0.0.1 is private",
    )
    assert download_failure("HTTP Error 404: Not Found") == ("http_404", "HTTP Error 404: Not Found")
    assert download_failure("<urlopen error [Errno 111] Connection refused>")[0] == "unreachable"


def test_profiles_real_keeps_safe_defaults_demo_allows_loopback():
    import img2dataset.downloader as i2d

    from curation.download import shard  # noqa: F401 (imported, it leaves img2dataset alone)

    # the guard is scoped to our Downloader: img2dataset's own download_image stays in place for everyone else
    assert i2d.download_image.__module__ == "img2dataset.downloader"
    real = load_pipeline(ROOT / "curation/pipelines/metaclip.yaml").stages["ingest"].params
    demo = load_pipeline(ROOT / "curation/pipelines/demo.yaml").stages["ingest"].params
    assert (real.allow_loopback, real.allow_private, demo.allow_loopback, demo.allow_private) == (
        False,
        False,
        True,
        False,
    )
    assert real.max_bytes > 0 and real.max_redirects >= 1 and real.max_pixels < 200_000_000
    assert real.disallowed_header_directives == ["noai", "noimageai", "noindex", "noimageindex"]  # opt-outs honoured


@pytest.fixture(scope="module")
def tls_sites(site, tmp_path_factory):
    """HTTPS servers of the same files: one whose certificate (from a CA the test makes) names 127.0.0.1, one whose
    certificate names another host; and the CA's PEM file."""
    from curation.fixtures.tls import TestCA

    server, _ = site
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    good = WebServer(server.root, port=0, tls=ca.server_context(["127.0.0.1", "localhost"], "good"))
    wrong = WebServer(server.root, port=0, tls=ca.server_context(["images.example.test"], "wrong"))
    with good, wrong:
        yield good, wrong, str(ca.pem)


def test_https_is_verified_and_a_bad_certificate_is_tls_error(site, tls_sites, loopback_only):
    server, _ = site
    good, wrong, ca = tls_sites
    data = (server.files / "a.jpg").read_bytes()
    trusted = GuardPolicy(allow_loopback=True, ca_bundle=ca)
    assert good.base_url.startswith("https://")
    assert fetch(f"{good.base_url}/files/a.jpg", trusted, timeout=2)[0] == data
    with pytest.raises(GuardError, match=r"^tls_error: 127.0.0.1: certificate not accepted: .*unable to get local"):
        fetch(f"{good.base_url}/files/a.jpg", GuardPolicy(allow_loopback=True), timeout=2)  # our CA: not trusted
    with pytest.raises(GuardError, match=r"^tls_error: .*(mismatch|doesn't match|not valid)"):
        fetch(f"{wrong.base_url}/files/a.jpg", trusted, timeout=2)  # a trusted certificate for another host
    plain = f"http://127.0.0.1:{server.port}"
    with pytest.raises(GuardError, match=r"^tls_error: .*handshake"):  # https to a server speaking plain HTTP
        fetch(f"https://127.0.0.1:{server.port}/files/a.jpg", trusted, timeout=2)
    # redirects between the schemes are followed hop by hop, each hop checked: https -> http -> https
    there_and_back = f"{good.base_url}/redirect?to={plain}/redirect?to={good.base_url}/files/b.jpg"
    assert fetch(there_and_back, trusted, timeout=2)[0] == (server.files / "b.jpg").read_bytes()
    with pytest.raises(GuardError, match="too_many_redirects"):
        fetch(there_and_back, GuardPolicy(allow_loopback=True, ca_bundle=ca, max_redirects=1), timeout=2)
    with pytest.raises(GuardError, match="tls_error"):  # the http hop leads to the wrong certificate
        fetch(f"{plain}/redirect?to={wrong.base_url}/files/b.jpg", trusted, timeout=2)
    with pytest.raises(GuardError, match="blocked_address"):  # an https page redirecting to a refused address
        fetch(f"{good.base_url}/redirect?to=http://localhost:{server.port}/files/a.jpg", GuardPolicy(ca_bundle=ca), 2)


def test_tls_errors_are_rejects_on_the_real_ingest_path(ray_session, site, tls_sites, tmp_path):
    from curation.ops.ingest import IngestParams

    server, _ = site
    good, wrong, ca = tls_sites
    urls = [
        f"{good.base_url}/files/a.jpg",
        f"{wrong.base_url}/files/b.jpg",
        f"http://127.0.0.1:{server.port}/files/c.jpg",
    ]
    _m, out, rej = _ingest(tmp_path, urls, allow_loopback=True, ca_bundle=ca)
    assert sorted(out["url"].to_list()) == sorted([urls[0], urls[2]])
    assert rej[urls[1]][0] == "tls_error" and "certificate not accepted" in rej[urls[1]][1]
    (tmp_path / "no-ca").mkdir()
    _m, out, rej = _ingest(tmp_path / "no-ca", urls, allow_loopback=True)  # the system's CAs only
    assert out["url"].to_list() == [urls[2]] and {rej[u][0] for u in urls[:2]} == {"tls_error"}
    with pytest.raises(ValueError, match="ca_bundle"):
        IngestParams(urls="x.parquet", ca_bundle=str(tmp_path / "missing.pem"))


@pytest.mark.parametrize("route", ["drip", "stall", "slow"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_slow_server_gets_max_seconds_in_all(site, tls_sites, loopback_only, route, scheme):
    """Headers a byte every 0.25 s (each read well within the 2 s timeout), headers then silence, or a body in
    64-byte pieces every 0.25 s: each stops at max_seconds with the reason timeout, over TLS too (a fast endless
    body stops at max_bytes: too_large, above)."""
    server, _ = site
    good, _, ca = tls_sites
    base = good.base_url if scheme == "https" else f"http://127.0.0.1:{server.port}"
    policy = GuardPolicy(allow_loopback=True, ca_bundle=ca, max_seconds=1.5, max_bytes=1 << 40)
    start = time.monotonic()
    with pytest.raises(GuardError, match=r"^timeout: over 1.5 s in total"):
        fetch(f"{base}/{route}/big.png", policy, timeout=2)
    assert time.monotonic() - start < 1.5 + 2.5  # bounded by max_seconds, not by the drip (~17 min) or the stall


def test_slow_servers_do_not_hold_up_the_shard(ray_session, site, tmp_path):
    server, _ = site
    base = f"http://127.0.0.1:{server.port}"
    slow = [f"{base}/drip/a.jpg", f"{base}/stall/b.jpg", f"{base}/slow/big.png"]
    good = [f"{base}/files/{n}?k={k}" for k in range(4) for n in ("a.jpg", "b.jpg", "c.jpg")]
    start = time.monotonic()
    _m, out, rej = _ingest(tmp_path, [*slow, f"{base}/endless", *good], allow_loopback=True, max_seconds=3)
    assert sorted(out["url"].to_list()) == sorted(good)  # the shard's other downloads are unaffected
    assert {rej[u][0] for u in slow} == {"timeout"} and rej[f"{base}/endless"][0] == "too_large"
    assert time.monotonic() - start < 120  # not the 17 min the drip would take
