"""``cloudseg download`` against a real HTTP server on 127.0.0.1 (Python's http.server in a subprocess).

The served tree is the dataset's remote layout (``public/``, ``private/``) of tests/data/fixtures.py chips.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cloudseg.cli import app
from cloudseg.data import download as dl
from cloudseg.data.validate import validate_split
from tests.data.fixtures import make_dataset

pytestmark = pytest.mark.download

# Stdlib only, run with ``python -c``: serves ROOT, can die mid-body after N bytes, or answer 503 first.
SERVER = r'''
import argparse, functools, http.server, os, threading, time
p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--port", type=int, default=0)
p.add_argument("--die-after-bytes", type=int, default=0)
p.add_argument("--fail-first", type=int, default=0)
p.add_argument("--chunk-delay", type=float, default=0.0)
a = p.parse_args()
lock, sent, seen = threading.Lock(), [0], {}

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with lock:
            n = seen[self.path] = seen.get(self.path, 0) + 1
        if n <= a.fail_first:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def copyfile(self, src, dst):
        while True:
            chunk = src.read(64 * 1024)
            if not chunk:
                return
            with lock:
                sent[0] += len(chunk)
                die = a.die_after_bytes and sent[0] > a.die_after_bytes
            if die:  # the server dies mid-body: the client sees fewer bytes than Content-Length
                dst.write(chunk[: len(chunk) // 2])
                dst.flush()
                os._exit(3)
            dst.write(chunk)
            time.sleep(a.chunk_delay)

srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), functools.partial(Handler, directory=a.root))
print(srv.server_address[1], flush=True)
srv.serve_forever()
'''


class Server:
    """One http.server subprocess serving ``root``; ``start`` again on the same port after it died."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, 0, None

    def start(self, **opts) -> Server:
        args = [sys.executable, "-c", SERVER, str(self.root), "--port", str(self.port)]
        for key, value in opts.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        for _ in range(50):  # the old socket may linger a moment after a kill
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if line.strip():
                self.port = int(line)
                return self
            self.proc.wait()
            time.sleep(0.1)
        raise RuntimeError(f"test server did not start: {self.proc.stderr.read()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture(scope="session")
def remote_tree(tmp_path_factory) -> Path:
    """The remote layout: 6 train chips over 3 locations (public/), 3 test chips over 2 others (private/)."""
    work = tmp_path_factory.mktemp("remote")
    make_dataset(work / "chips", n_chips=6, locations=("Alpha", "Beta", "Gamma"), seed=0, split="train")
    make_dataset(work / "chips", n_chips=3, locations=("Delta", "Epsilon"), seed=1, split="test")
    root = work / "final"
    for split, folder in dl.SPLITS.items():
        (root / folder).mkdir(parents=True)
        for name in (f"{split}_features", f"{split}_labels"):
            shutil.copytree(work / "chips" / name, root / folder / name)
        shutil.copy(work / "chips" / f"{split}_metadata.csv", root / folder)
    return root


@pytest.fixture
def remote_copy(remote_tree, tmp_path) -> Path:
    return Path(shutil.copytree(remote_tree, tmp_path / "final"))


@pytest.fixture
def serve(monkeypatch):
    """Factory: ``serve(root, **opts)`` starts a server, killed at teardown. Retries are quick here."""
    monkeypatch.setattr(dl, "BACKOFF_S", 0.02)
    monkeypatch.setattr(dl, "RETRIES", 3)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(root: Path, **opts) -> Server:
        servers.append(Server(root).start(**opts))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _cli(*args: str):
    return CliRunner().invoke(app, ["download", *args])


def _remote_file(remote: Path, local_rel: Path) -> Path:
    split = local_rel.parts[0].split("_")[0]
    return remote / dl.SPLITS[split] / local_rel


def _assert_identical(dest: Path, remote: Path) -> int:
    """Each TIF under ``dest`` equals its source byte for byte; no partial file is left. Returns the count."""
    tifs = sorted(dest.rglob("*.tif"))
    for path in tifs:
        rel = path.relative_to(dest)
        assert path.read_bytes() == _remote_file(remote, rel).read_bytes(), rel
    assert not list(dest.rglob("*.part")), list(dest.rglob("*.part"))
    return len(tifs)


def test_download_all_validates_and_records(serve, remote_tree, tmp_path):
    srv = serve(remote_tree)
    dest = tmp_path / "out"
    res = _cli("--dest", str(dest), "--source", srv.url, "--workers", "4")
    assert res.exit_code == 0, res.output
    assert _assert_identical(dest, remote_tree) == 9 * 5
    train = validate_split(dest, "train")
    test = validate_split(dest, "test")
    assert (len(train.ids), len(test.ids)) == (6, 3) and train.has_labels and test.has_labels
    manifest = json.loads((dest / "download.json").read_text())
    assert manifest["source"] == srv.url and manifest["complete"] is True
    assert manifest["splits"]["train"]["downloaded"] == 30
    on_disk = sum(p.stat().st_size for p in (dest / "train_features").rglob("*.tif"))
    on_disk += sum(p.stat().st_size for p in (dest / "train_labels").glob("*.tif"))
    assert manifest["splits"]["train"]["bytes"] == on_disk
    assert CliRunner().invoke(app, ["validate", str(dest), "--split", "test"]).exit_code == 0

    again = _cli("--dest", str(dest), "--source", srv.url, "--split", "test")
    assert again.exit_code == 0, again.output
    manifest = json.loads((dest / "download.json").read_text())
    assert manifest["splits"]["test"]["skipped"] == 15 and manifest["splits"]["train"]["downloaded"] == 30
    assert manifest["chips"] == 9 and manifest["complete"] is True


def test_server_dies_mid_transfer_then_rerun_completes(serve, remote_tree, tmp_path):
    srv = serve(remote_tree, die_after_bytes=1_500_000)
    dest = tmp_path / "out"
    with pytest.raises(dl.DownloadError) as info:
        dl.download(dest, srv.url, split="train", workers=3)
    assert "failed" in str(info.value)
    partial = _assert_identical(dest, remote_tree)  # whatever has a final name is complete
    assert partial < 30
    assert srv.proc.wait(timeout=10) == 3  # it died mid-body
    srv.start()  # same port
    result = dl.download(dest, srv.url, split="train", workers=3)
    assert result.ok
    assert _assert_identical(dest, remote_tree) == 30
    assert result.splits["train"].skipped == partial
    validate_split(dest, "train")


def test_truncated_file_is_refetched_and_5xx_retried(serve, remote_tree, tmp_path):
    dest = tmp_path / "out"
    shutil.copytree(remote_tree / "public" / "train_features", dest / "train_features")
    shutil.copytree(remote_tree / "public" / "train_labels", dest / "train_labels")
    victim = dest / "train_features" / "tr03" / "B08.tif"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    srv = serve(remote_tree, fail_first=1)  # every GET answers 503 once
    result = dl.download(dest, srv.url, split="train", workers=2)
    rep = result.splits["train"]
    assert (rep.downloaded, rep.skipped) == (1, 29)
    assert _assert_identical(dest, remote_tree) == 30


def test_missing_chip_is_named_others_complete(serve, remote_copy, tmp_path):
    shutil.rmtree(remote_copy / "public" / "train_features" / "tr04")
    (remote_copy / "private" / "test_labels" / "te01.tif").unlink()
    srv = serve(remote_copy)
    dest = tmp_path / "out"
    res = _cli("--dest", str(dest), "--source", srv.url)
    assert res.exit_code == 1
    assert "tr04" in res.output and "te01" in res.output
    train, test = validate_split(dest, "train"), validate_split(dest, "test")
    assert train.ids == ["tr00", "tr01", "tr02", "tr03", "tr05"] and test.ids == ["te00", "te02"]
    manifest = json.loads((dest / "download.json").read_text())
    assert manifest["complete"] is False and list(manifest["splits"]["train"]["missing_chips"]) == ["tr04"]


def test_dry_run_counts_and_writes_nothing(serve, remote_tree, tmp_path):
    srv = serve(remote_tree)
    dest = tmp_path / "out"
    res = _cli("--dest", str(dest), "--source", srv.url, "--dry-run", "--max-chips", "3", "--split", "train")
    assert res.exit_code == 0, res.output
    meta = pd.read_csv(remote_tree / "public" / "train_metadata.csv", dtype=str)
    picked = dl.select_chips(meta, max_chips=3, seed=0)
    expect = sum((remote_tree / "public" / "train_features" / c / f"{b}.tif").stat().st_size
                 for c in picked["chip_id"] for b in dl.BANDS)
    labels = remote_tree / "public" / "train_labels"
    expect += sum((labels / f"{c}.tif").stat().st_size for c in picked["chip_id"])
    assert res.output.strip().splitlines()[-1].startswith(f"chips=3 files=15 bytes={expect} ")
    assert "train: 3 chips, 3 locations, 15 files" in res.output
    assert not dest.exists()


def test_dry_run_estimates_bytes_of_large_selections(serve, remote_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "DRY_RUN_EXACT_FILES", 10)
    monkeypatch.setattr(dl, "DRY_RUN_SAMPLE", 5)
    srv = serve(remote_tree)
    res = _cli("--dest", str(tmp_path / "out"), "--source", srv.url, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "test: 3 chips, 2 locations, 15 files" in res.output
    assert "chips=9 files=45 bytes=unknown (about " in res.output and "estimated from 5 files" in res.output


def test_max_chips_is_stratified_and_seeded():
    meta = pd.DataFrame({"chip_id": [f"c{i:02d}" for i in range(20)],
                         "location": ["A"] * 10 + ["B"] * 6 + ["C"] * 4})
    picks = {s: dl.select_chips(meta, max_chips=10, seed=s) for s in range(5)}
    for pick in picks.values():
        assert pick["location"].value_counts().to_dict() == {"A": 5, "B": 3, "C": 2}
        assert list(pick.index) == sorted(pick.index)  # the server's order is kept
    assert picks[0].equals(dl.select_chips(meta, max_chips=10, seed=0))
    assert len({tuple(p["chip_id"]) for p in picks.values()}) > 1
    bigger = dl.select_chips(meta, max_chips=15, seed=0)
    assert set(picks[0]["chip_id"]) <= set(bigger["chip_id"])
    only = dl.select_chips(meta, locations=["B", "C"], max_chips=5, seed=1)
    assert only["location"].value_counts().to_dict() == {"B": 3, "C": 2}


def test_max_chips_and_locations_download_validates(serve, remote_tree, tmp_path):
    srv = serve(remote_tree)
    dest = tmp_path / "out"
    res = _cli("--dest", str(dest), "--source", srv.url, "--locations", "Alpha,Gamma",
               "--max-chips", "3", "--seed", "1")
    assert res.exit_code == 0, res.output
    split = validate_split(dest, "train")
    assert len(split.ids) == 3 and set(split.metadata["location"]) == {"Alpha", "Gamma"}
    assert not (dest / "test_metadata.csv").exists()  # no test chip is in Alpha or Gamma
    assert json.loads((dest / "download.json").read_text())["splits"]["test"]["chips"] == 0


def test_file_url_source(remote_tree, tmp_path):
    dest = tmp_path / "out"
    res = _cli("--dest", str(dest), "--source", remote_tree.as_uri(), "--split", "test")
    assert res.exit_code == 0, res.output
    assert _assert_identical(dest, remote_tree) == 15
    validate_split(dest, "test")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, code, words", [
    (["--source", "ftp://example.org/x"], 2, ["ftp://example.org/x", "unsupported scheme"]),
    (["--source", "http:///final"], 2, ["http:///final", "not a valid URL"]),
    (["--split", "val"], 2, ["'val'", "train, test, all"]),
    (["--locations", "Alpha,Nowhere"], 2, ["Nowhere", "valid: Alpha, Beta, Delta, Epsilon, Gamma"]),
    (["--max-chips", "0"], 2, ["--max-chips 0"]),
    (["--workers", "0", "--dry-run"], 2, ["--workers 0"]),
])
def test_bad_input_is_one_line_usage_error(serve, remote_tree, tmp_path, args, code, words):
    srv = serve(remote_tree)
    res = _cli("--dest", str(tmp_path / "out"), "--source", srv.url, *args)
    assert res.exit_code == code, res.output
    assert len(res.output.strip().splitlines()) == 1
    for word in words:
        assert word in res.output
    assert not (tmp_path / "out").exists()


def test_unreachable_source_and_unwritable_dest(serve, remote_tree, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/final"
    serve(remote_tree)  # only for its quick-retry settings
    res = _cli("--dest", str(tmp_path / "out"), "--source", url)
    assert res.exit_code == 1 and f"cannot reach {url}/public/train_metadata.csv" in res.output
    assert len(res.output.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("--dest", str(blocker), "--source", str(remote_tree))
    assert res.exit_code == 2 and f"--dest {blocker}" in res.output
    res = _cli("--dest", str(tmp_path / "out"), "--source", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "does not exist" in res.output


def test_ctrl_c_leaves_only_complete_files(serve, remote_tree, tmp_path):
    import os
    import signal

    srv = serve(remote_tree, chunk_delay=0.05)  # ~0.3 s a band file: slow enough to interrupt mid-transfer
    dest = tmp_path / "out"
    env = {**os.environ, "TQDM_DISABLE": "1", "NO_PROXY": "127.0.0.1"}
    cmd = [sys.executable, "-m", "cloudseg.cli", "download", "--dest", str(dest), "--source", srv.url,
           "--split", "train", "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(list(dest.rglob("B0*.tif"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert 2 <= _assert_identical(dest, remote_tree) < 30
    assert not (dest / "train_metadata.csv").exists()
