"""Getting the checkpoints: cache, local files, and the download against a local HTTP server
(started here, on 127.0.0.1) that can break the connection, send a short file, refuse ranges
or answer with Google Drive's confirmation page. No TensorFlow needed."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import densedepth.weights as w
from densedepth.errors import WeightsError
from pipeline.files import sha256_file

PAYLOAD = w.HDF5_SIGNATURE + np.random.default_rng(0).bytes(300_000)
S3_PATH = "/s3-eu-west-1.amazonaws.com/densedepth/test.h5"
DRIVE_PATH = "/drive.usercontent.google.com/download"


class Server:
    """Serves PAYLOAD at S3_PATH and (behind a confirmation page) at DRIVE_PATH. Knobs:
    break_first (bytes sent before the first response is cut), short (serve only this many
    bytes as if they were the whole file), s3_missing, no_ranges."""

    def __init__(self) -> None:
        self.break_first: int | None = None
        self.short: int | None = None
        self.s3_missing = False
        self.no_ranges = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path.startswith(S3_PATH) and not server.s3_missing:
                    return server.send_file(self)
                if self.path.startswith(DRIVE_PATH):
                    if "confirm=t" in self.path and "uuid=abc" in self.path:
                        return server.send_file(self)
                    page = (
                        b'<html><form id="download-form" action="https://drive.usercontent.'
                        b'google.com/download" method="get"><input type="hidden" name="id" '
                        b'value="X"><input type="hidden" name="export" value="download">'
                        b'<input type="hidden" name="confirm" value="t"><input type="hidden" '
                        b'name="uuid" value="abc"></form></html>'
                    )
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return None
                self.send_error(404)
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def send_file(self, h: BaseHTTPRequestHandler) -> None:
        body = PAYLOAD if self.short is None else PAYLOAD[: self.short]
        rng = h.headers.get("Range")
        start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng and not self.no_ranges else 0
        if start:
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body) - start))
        h.end_headers()
        if self.break_first is not None:
            cut, self.break_first = self.break_first, None
            h.wfile.write(body[start : start + cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the connection drops mid-file
            return
        h.wfile.write(body[start:])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    s = Server()
    monkeypatch.setenv(w.URL_BASE_ENV, s.url)
    monkeypatch.setenv(w.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(w.WEIGHTS_ENV, raising=False)
    yield s
    s.close()


def source(size: int | None = len(PAYLOAD), sha: str | None = None) -> w.Source:
    return w.Source(
        "test",
        "test.h5",
        size,
        sha,
        ("https://s3-eu-west-1.amazonaws.com/densedepth/test.h5", w._drive("X")),
        "https://drive.google.com/file/d/X/view",
    )


def test_download_lands_atomically_in_the_cache(server: Server, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    import hashlib

    sha = hashlib.sha256(PAYLOAD).hexdigest()
    path = w.fetch(source(sha=sha), progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "cache" / "densedepth" / "test.h5"
    assert path.read_bytes() == PAYLOAD and not path.with_name("test.h5.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    server.requests.clear()
    assert w.fetch(source()) == path and server.requests == []  # cached: no request


def test_broken_connection_resumes_with_a_range_request(server: Server) -> None:
    server.break_first = 100_000
    path = w.fetch(source())
    assert path.read_bytes() == PAYLOAD
    ranges = [r for _, r in server.requests]
    assert ranges[0] is None and ranges[1] == "bytes=100000-"


def test_partial_file_from_an_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "cache" / "densedepth" / "test.h5.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:123_456])
    assert w.fetch(source()).read_bytes() == PAYLOAD
    assert server.requests[0][1] == "bytes=123456-"


def test_server_that_ignores_ranges_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    server.no_ranges = True
    part = tmp_path / "cache" / "densedepth" / "test.h5.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 5000)
    assert w.fetch(source()).read_bytes() == PAYLOAD


def test_short_file_is_refused_and_not_placed(server: Server, tmp_path: Path) -> None:
    server.short = 50_000
    with pytest.raises(WeightsError, match=r"downloaded 50,000 bytes, expected 300,008") as e:
        w.fetch(source())
    assert "save it as" in str(e.value)
    folder = tmp_path / "cache" / "densedepth"
    assert not (folder / "test.h5").exists() and not (folder / "test.h5.part").exists()


def test_wrong_checksum_is_refused(server: Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="sha256"):
        w.fetch(source(sha="0" * 64))
    assert not (tmp_path / "cache" / "densedepth" / "test.h5").exists()


def test_google_drive_confirmation_page_is_followed(server: Server) -> None:
    server.s3_missing = True
    assert w.fetch(source(size=None)).read_bytes() == PAYLOAD
    paths = [p for p, _ in server.requests]
    assert paths[0].startswith(S3_PATH)
    assert any("confirm=t" in p and "uuid=abc" in p for p in paths)


def test_offline_error_says_how_to_get_the_file(monkeypatch, tmp_path: Path, cli_run) -> None:
    monkeypatch.setenv(w.URL_BASE_ENV, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv(w.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(w.WEIGHTS_ENV, raising=False)
    dest = tmp_path / "cache" / "densedepth" / "nyu.h5"
    with pytest.raises(WeightsError) as e:
        w.resolve_weights("nyu")
    msg = str(e.value)
    assert "https://s3-eu-west-1.amazonaws.com/densedepth/nyu.h5" in msg
    assert f"save it as {dest}" in msg and "DENSEDEPTH_WEIGHTS" in msg and "--weights" in msg
    res = cli_run("weights", "fetch", "nyu")
    assert res.exit_code == 1 and res.output.startswith("Error: cannot download nyu.h5")


def test_resolution_order_and_cache_folder(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(w.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert w.cache_dir() == tmp_path / "xdg" / "synthcar" / "densedepth"
    monkeypatch.setenv(w.CACHE_ENV, str(tmp_path / "mine"))
    assert w.cache_dir() == tmp_path / "mine" / "densedepth"
    local = tmp_path / "local.h5"
    local.write_bytes(PAYLOAD)
    monkeypatch.setenv(w.WEIGHTS_ENV, str(local))
    assert w.resolve_weights(None) == local  # $DENSEDEPTH_WEIGHTS when no --weights
    assert w.resolve_weights(str(local)) == local
    with pytest.raises(WeightsError, match="weights file not found: .*missing.h5; give `nyu`"):
        w.resolve_weights(str(tmp_path / "missing.h5"))
    cached = tmp_path / "mine" / "densedepth" / "kitti.h5"  # kitti's size is not published
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    assert w.resolve_weights("kitti", download=False) == cached
    with pytest.raises(WeightsError, match="nyu.h5 is not in the cache"):
        w.resolve_weights("nyu", download=False)


def test_cli_fetch_downloads_with_a_progress_bar(
    server: Server, monkeypatch, tmp_path, cli_run
) -> None:
    monkeypatch.setitem(w.CHECKPOINTS, "nyu", source())
    res = cli_run("weights", "fetch", "nyu")
    assert res.exit_code == 0, res.output
    path = tmp_path / "cache" / "densedepth" / "test.h5"
    assert "weights: " in res.output and f"sha256 {sha256_file(path)}" in res.output
    assert path.read_bytes() == PAYLOAD


def test_published_table() -> None:
    nyu = w.CHECKPOINTS["nyu"]
    assert nyu.size == 172_897_376 and nyu.urls[0].endswith("/densedepth/nyu.h5")
    assert "19dfvGvDfCRYaqxVKypp1fRHwK7XtSjVu" in nyu.urls[1]
    assert "19flUnbJ_6q2xtjuUQvjt1Y1cJRwOr-XY" in w.CHECKPOINTS["kitti"].urls[1]
