"""Offline tests of the weight registry's download cache: a local HTTP server (127.0.0.1, with
``Range`` support) and ``file://`` URLs stand in for the release hosts."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from parity import case_dir

import jvit
import jvit.convert
from jvit import pretrained, registry


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes); honours ``Range`` unless ``ignore_range``; logs Range headers."""

    def __init__(self, files: dict[str, bytes], ignore_range: bool = False):
        self.files, self.ignore_range, self.ranges = files, ignore_range, []
        super().__init__(("127.0.0.1", 0), _Handler)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header and not self.server.ignore_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(files, **kwargs):
        server = _Server(files, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


DATA = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 123, dtype=np.uint8).tobytes()
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("ignore_range", [False, True])
def test_http_download_resumes_a_partial_file(serve, tmp_path, ignore_range):
    server = serve({"w.pth": DATA}, ignore_range=ignore_range)
    (tmp_path / "w.pth.part").write_bytes(DATA[: 2**20])
    path = pretrained.download(server.url("w.pth"), tmp_path, sha256=DIGEST, progress=False)
    assert Path(path).read_bytes() == DATA and not (tmp_path / "w.pth.part").exists()
    assert server.ranges == [f"bytes={2**20}-"]  # asked only for the missing bytes
    # A finished file is reused without a request.
    assert pretrained.download(server.url("w.pth"), tmp_path, sha256=DIGEST, progress=False) == path
    assert len(server.ranges) == 1


def test_file_url_download_resumes_and_hash_mismatch_deletes(tmp_path):
    src = tmp_path / "src" / "w.pth"
    src.parent.mkdir()
    src.write_bytes(DATA)
    out = tmp_path / "cache"
    out.mkdir()
    (out / "w.pth.part").write_bytes(DATA[:1000])
    path = pretrained.download(src.as_uri(), out, sha256=DIGEST, progress=False)
    assert Path(path).read_bytes() == DATA
    with pytest.raises(ValueError, match="does not match"):
        pretrained.download(src.as_uri(), tmp_path / "other", sha256="0" * 64, progress=False)
    assert not (tmp_path / "other" / "w.pth").exists()


def _with_cfg(monkeypatch, name, **changes):
    entry = registry.get_model_entry(name)
    cfg = dataclasses.replace(entry.default_cfg, **changes)
    monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(entry, pretrained_cfgs=(cfg,)))


def test_load_downloads_converts_once_and_caches(serve, tmp_path, monkeypatch):
    pth = case_dir("hvt", "hvt_ti_1") / "checkpoint.pth"
    blob = pth.read_bytes()
    server = serve({"hvt_ti_1.pth": blob})
    _with_cfg(
        monkeypatch,
        "hvt_ti_1",
        urls=("http://127.0.0.1:9/unreachable.pth", server.url("hvt_ti_1.pth")),
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    model, variables = pretrained.load("hvt_ti_1", cache_dir=tmp_path)
    expected = jvit.convert.load_torch_checkpoint(str(pth), "hvt_ti_1")
    flat, ref = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(expected)
    assert flat.keys() == ref.keys() and all(np.array_equal(flat[k], ref[k]) for k in ref)
    assert (tmp_path / "converted" / "hvt_ti_1-224-unreachable.pth" / "jvit.json").is_file()
    # Second load: from the converted cache, without the network (the server is gone).
    server.shutdown()
    server.server_close()
    model2, variables2 = pretrained.load("hvt_ti_1", cache_dir=tmp_path)
    assert model2.num_classes == model.num_classes == 1000
    flat2 = traverse_util.flatten_dict(variables2)
    assert all(np.array_equal(flat2[k], ref[k]) for k in ref)


def test_manual_download_names_where_and_what_to_pass(tmp_path):
    with pytest.raises(pretrained.ManualDownloadRequired, match=r"drive\.google\.com.*weights=PATH"):
        pretrained.load("stvit_small", cache_dir=tmp_path)
    with pytest.raises(pretrained.ManualDownloadRequired, match="releases/tag/download"):
        pretrained.load("spvit_s", cache_dir=tmp_path, img_size=384)
    with pytest.raises(FileNotFoundError, match="no such file"):
        pretrained.load("stvit_small", weights=tmp_path / "missing.pth")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JVIT_CACHE", str(tmp_path))
    assert pretrained.resolve_cache_dir() == str(tmp_path)
    monkeypatch.delenv("JVIT_CACHE")
    assert pretrained.resolve_cache_dir().endswith(".cache/jvit")
