"""Opt-outs (X-Robots-Tag) on the ingest path, and the guarded download scoped to our Downloader.

Every request goes to a loopback server started here (127.0.0.1).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version

import img2dataset.downloader as i2d
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset.resizer import Resizer
from img2dataset.writer import ParquetSampleWriter
from PIL import Image

from curation.download import shard
from curation.download.reasons import download_failure
from curation.engine.config import parse_pipeline
from curation.engine.driver import run_pipeline
from curation.ops.ingest import Ingest, IngestParams
from tests.conftest import ROOT, free_port

# path -> the X-Robots-Tag headers it is served with, and whether the default directives refuse it
CASES = {
    "/plain.jpg": ([], False),
    "/noai.jpg": (["noai"], True),
    "/noimageai.jpg": (["noimageai"], True),
    "/noindex-nofollow.jpg": (["noindex, nofollow"], True),
    "/nofollow-noimageindex.jpg": (["nofollow, NoImageIndex"], True),  # several directives, any case
    "/nofollow.jpg": (["nofollow"], False),
    "/none.jpg": (["none"], False),  # img2dataset gives 'none' no special meaning (nor is it in its defaults)
    "/otherbot.jpg": (["otherbot: noai"], False),  # scoped to another agent
    "/mybot.jpg": (["mybot: noai"], False),  # refused only with user_agent_token="mybot"
    "/two-headers.jpg": (["otherbot: noai", "noimageai"], True),
    "/two-headers-ok.jpg": (["otherbot: noai", "nofollow"], False),
}
ADDED = (
    "disallowed_header_directives",
    "user_agent_token",
    "column_names",
    "metadata",
    "ca_bundle",
)  # fields after release 1


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 90)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """A loopback server: each path of CASES serves the JPEG with its X-Robots-Tag headers; records User-Agents."""
    body, agents = _jpeg(), []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            agents.append(self.headers.get("User-Agent", ""))
            if self.path not in CASES:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            for value in CASES[self.path][0]:
                self.send_header("X-Robots-Tag", value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", agents
    httpd.shutdown()
    httpd.server_close()


def _urls(tmp_path, base: str):
    urls = [base + path for path in CASES]
    pl.DataFrame({"url": urls, "caption": [f"case {i}" for i in range(len(urls))]}).write_parquet(
        tmp_path / "urls.parquet"
    )
    return str(tmp_path / "urls.parquet")


def _process(tmp_path, base: str, **params):
    """Run the ingest op's plan and process in this process (no Ray); (op, kept paths, {path: (reason, detail)})."""
    op = Ingest(
        IngestParams(urls=_urls(tmp_path, base), allow_loopback=True, thread_count=4, timeout=2, **params),
        "ingest",
        tmp_path / "work",
    )
    op.setup()
    (part,) = op.plan()
    images, rejects = op.process(part)
    cut = len(base)
    kept = {u[cut:] for u in images.column("url").to_pylist()}
    refused = {r["url"][cut:]: (r["reason"], r["detail"]) for r in rejects.to_pylist()}
    assert len(kept) + len(refused) == len(CASES)
    return op, kept, refused


def test_default_directives_refuse_opted_out_images(server, tmp_path):
    base, agents = server
    op, kept, refused = _process(tmp_path, base)
    assert kept == {p for p, (_, no) in CASES.items() if not no} and "/mybot.jpg" in kept
    assert set(refused) == {p for p, (_, no) in CASES.items() if no}
    for path, (reason, detail) in refused.items():
        assert reason == "robots_disallowed", (path, reason, detail)
    assert refused["/noindex-nofollow.jpg"][1].startswith("X-Robots-Tag: noindex, nofollow (refused directives: ")
    assert refused["/two-headers.jpg"][1].startswith("X-Robots-Tag: noimageai (")  # the header that refused it
    assert op.report() == {
        "opt_outs": {"honoured": ["noai", "noimageai", "noindex", "noimageindex"], "user_agent_token": None}
    }
    assert not any("compatible;" in a for a in agents)


def test_user_agent_token_scopes_directives(server, tmp_path):
    base, agents = server
    before = len(agents)
    op, kept, refused = _process(tmp_path, base, user_agent_token="MyBot", disallowed_header_directives=["noai"])
    assert set(refused) == {"/noai.jpg", "/mybot.jpg"}  # scoped to us (case-insensitively); otherbot's is not
    assert {r for r, _ in refused.values()} == {"robots_disallowed"}
    assert "/otherbot.jpg" in kept and "/noimageai.jpg" in kept  # noimageai is not in this list
    assert all("(compatible; mybot; " in a for a in agents[before:])
    assert op.report() == {"opt_outs": {"honoured": ["noai"], "user_agent_token": "MyBot"}}


def test_empty_list_turns_the_check_off(server, tmp_path):
    base, _ = server
    op, kept, refused = _process(tmp_path, base, disallowed_header_directives=[], user_agent_token="mybot")
    assert refused == {} and kept == set(CASES)
    assert op.report() == {"opt_outs": "off"}


def test_config_hash_unchanged_at_the_old_behaviour_and_changed_at_the_new_default(tmp_path):
    def stage(*overrides):
        raw = {"name": "p", "stages": {"ingest": {"op": "ingest", "params": {"urls": "u.parquet", "timeout": 3}}}}
        return parse_pipeline(raw, "p.yaml", list(overrides)).stages["ingest"]

    old = stage("ingest.disallowed_header_directives=[]")
    before = {
        k: v for k, v in old.params.model_dump(mode="json").items() if k not in ADDED
    }  # as the op's first release
    blob = json.dumps({"op": "ingest", "version": Ingest.version, "params": before}, sort_keys=True)
    assert old.config_hash() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert old.params.hashed() == before
    assert stage("ingest.disallowed_header_directives=[]", "ingest.user_agent_token=null").config_hash() == (
        old.config_hash()
    )
    new = stage()
    assert new.params.disallowed_header_directives == ["noai", "noimageai", "noindex", "noimageindex"]
    assert new.config_hash() != old.config_hash()
    assert new.params.model_dump(mode="json")["disallowed_header_directives"] == new.params.hashed()[ADDED[0]]
    assert stage("ingest.user_agent_token=mybot").config_hash() != new.config_hash()


def test_manifest_reports_opt_outs(ray_session, server, tmp_path):
    base, _ = server
    raw = {
        "name": "opt-outs",
        "stages": {
            "ingest": {
                "op": "ingest",
                "params": {"urls": _urls(tmp_path, base), "allow_loopback": True, "thread_count": 4, "timeout": 2},
            }
        },
    }
    m = run_pipeline(parse_pipeline(raw, "opt-outs.yaml"), tmp_path / "run")["ingest"]
    assert m["counts"]["rejected_by_reason"] == {"robots_disallowed": sum(no for _, no in CASES.values())}
    assert m["report"]["opt_outs"]["honoured"] == ["noai", "noimageai", "noindex", "noimageindex"]
    assert m["params"]["disallowed_header_directives"] == m["report"]["opt_outs"]["honoured"]


def test_a_quoted_header_keeps_its_reason():
    msg = "robots_disallowed: X-Robots-Tag: noai, HTTP Error 404 timed out (refused directives: noai)"
    assert download_failure(msg) == ("robots_disallowed", msg.removeprefix("robots_disallowed: "))
    assert download_failure("Use of image disallowed by X-Robots-Tag directive")[0] == "robots_disallowed"  # i2d's


def test_importing_the_shard_module_leaves_img2dataset_alone():
    code = (
        "import img2dataset.downloader as i2d; f = i2d.download_image; import curation.download.shard; "
        "assert i2d.download_image is f, i2d.download_image"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def _rows(urls: list[str]) -> pa.Table:
    return pa.table({"uid": [str(i) for i in range(len(urls))], "url": urls, "caption": ["c"] * len(urls)})


def test_guard_is_scoped_to_our_downloader(server, tmp_path, monkeypatch):
    base, _ = server
    urls = [base + "/plain.jpg", base + "/noai.jpg"]
    original = i2d.download_image
    with monkeypatch.context() as m:  # ours never reaches img2dataset's download_image (urlopen)
        m.setattr(i2d, "download_image", lambda *a: pytest.fail("our Downloader used img2dataset's download_image"))
        refused = shard.download_shard(_rows(urls), tmp_path / "a", IngestParams(urls="u.parquet"))
        assert {r.split(":")[0] for r in refused.column("error_message").to_pylist()} == {"blocked_address"}
        got = shard.download_shard(_rows(urls), tmp_path / "b", IngestParams(urls="u.parquet", allow_loopback=True))
        status = dict(zip(got.column("url").to_pylist(), got.column("status").to_pylist()))
        assert status == {urls[0]: "success", urls[1]: "failed_to_download"}
    assert i2d.download_image is original

    # someone else's Downloader: img2dataset's own behaviour (urlopen, no opt-out check when given none), no guard
    monkeypatch.setattr(shard, "fetch", lambda *a, **k: pytest.fail("another Downloader went through our guard"))
    (tmp_path / "c").mkdir()
    rows = _rows(urls)
    with pa.OSFile(str(tmp_path / "c/shard.arrow"), "wb") as f, pa.ipc.new_file(f, rows.schema) as w:
        w.write_table(rows)
    i2d.Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=Resizer(
            image_size=16,
            resize_mode="no",
            resize_only_if_bigger=False,
            upscale_interpolation="lanczos",
            downscale_interpolation="area",
            encode_quality=95,
            encode_format="jpg",
            skip_reencode=False,
            disable_all_reencoding=False,
            min_image_size=0,
            max_image_area=float("inf"),
            max_aspect_ratio=float("inf"),
            blurrer=None,
        ),
        thread_count=2,
        save_caption=True,
        extract_exif=False,
        output_folder=str(tmp_path / "c"),
        column_list=["uid", "url", "caption"],
        timeout=2,
        number_sample_per_shard=10,
        oom_shard_count=5,
        compute_hash=None,
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=None,
        disallowed_header_directives=None,
    )((0, str(tmp_path / "c/shard.arrow")))
    assert pq.read_table(tmp_path / "c/00000.parquet").column("status").to_pylist() == ["success"] * 2


def test_setup_refuses_an_img2dataset_it_does_not_wrap(monkeypatch, tmp_path):
    op = Ingest(IngestParams(urls="u.parquet"), "ingest", tmp_path)
    op.setup()  # the installed 1.47.0
    monkeypatch.setattr(
        i2d, "download_image", lambda row, timeout, user_agent_token, disallowed_header_directives, max_size: None
    )
    with pytest.raises(RuntimeError) as e:
        op.setup()
    msg = str(e.value)
    assert f"img2dataset {version('img2dataset')} " in msg and "max_size" in msg and "1.47.0" in msg
