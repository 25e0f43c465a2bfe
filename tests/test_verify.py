"""cloudseg verify-submission: the runtime's checks, each failure naming the file, and the Jaccard figure.

Most cases run a stub main.py (numpy + PIL only, no model) that writes a chosen kind of bad output, so each
check is exercised in well under a second; one test verifies a real submission built from the main.py
template.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cloudseg.cli import app
from cloudseg.data.io import BANDS, write_tif
from cloudseg.submission import write_submission, zip_submission
from cloudseg.paths import REPO_ROOT
from cloudseg.submission import sandbox
from cloudseg.submission.verify import check_sources, check_zip, verify_submission
from tests.services import unavailable
from tests.test_submission_main import save_tiny_checkpoint

STUB = '''import os
import sys
import time

import numpy as np
from PIL import Image

MODE = "{mode}"
root = os.environ["CLOUDSEG_ROOT"]
feats = os.path.join(root, "data", "test_features")
out = os.path.join(root, "predictions")
os.makedirs(out, exist_ok=True)
ids = sorted(d for d in os.listdir(feats) if not d.startswith(".") and os.path.isdir(os.path.join(feats, d)))
print("data mode=%o" % (os.stat(os.path.join(feats, ids[0], "B02.tif")).st_mode & 0o777))
for i, chip in enumerate(ids):
    mask = np.zeros((512, 512), dtype=np.uint8)
    if chip == "c0":
        mask[:256] = 1  # top half cloud
    if MODE == "missing" and i == 1:
        continue
    if MODE == "shape" and i == 1:
        mask = mask[:511]
    if MODE == "values" and i == 1:
        mask[0, :3] = [0, 1, 2]
    img = Image.fromarray(mask)
    if MODE == "large" and i == 1:
        img = Image.fromarray(mask.astype(np.int32))  # 4 bytes a pixel: about 1 MB, still 512x512 {{0, 1}}
    img.save(os.path.join(out, chip + ".tif"), format="TIFF")
if MODE == "extra":
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(os.path.join(out, "stray.tif"), format="TIFF")
if MODE == "write_data":
    with open(os.path.join(feats, ids[0], "B02.tif"), "ab") as fh:
        fh.write(b"x")
if MODE == "network":
    import socket
    try:
        socket.socket().connect(("127.0.0.1", 9))
    except OSError:
        pass
if MODE == "sleep":
    time.sleep(60)
print("throughput chips_per_s=12.5000 chips=%d seconds=0.1" % len(ids))
sys.exit(3 if MODE == "crash" else 0)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Chips c0, c1 (constant bands) plus a '.hidden' folder, and labels with a hand-computable Jaccard."""
    root = tmp_path_factory.mktemp("verify_data")
    for chip in ("c0", "c1", ".hidden"):
        for band in BANDS:
            write_tif(root / "features" / chip / f"{band}.tif", np.full((512, 512), 1000, dtype=np.uint16))
    label = np.zeros((512, 512), dtype=np.uint8)
    label[:, :256] = 1  # c0: left half cloud; the stub predicts the top half
    write_tif(root / "labels" / "c0.tif", label)
    label = np.zeros((512, 512), dtype=np.uint8)
    label[0] = 1  # c1: one cloudy row; the stub predicts nothing
    write_tif(root / "labels" / "c1.tif", label)
    return root


def stub_zip(tmp_path: Path, mode: str = "good", name: str = "main.py", extra: dict | None = None) -> Path:
    path = tmp_path / f"{mode}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, STUB.format(mode=mode))
        for member, text in (extra or {}).items():
            zf.writestr(member, text)
    return path


def run_verify(tmp_path: Path, data: Path, mode: str, **kwargs) -> tuple:
    lines: list[str] = []
    result = verify_submission(stub_zip(tmp_path, mode), data / "features", echo=lines.append, **kwargs)
    return result, lines


def test_good_stub_passes_with_read_only_data(tmp_path, data):
    result, lines = run_verify(tmp_path, data, "good")
    assert result.ok, result.failures
    assert lines[-1] == "checks passed"
    assert "[main.py] data mode=444" in lines  # chip files handed over read-only
    assert result.n_chips == 2 and result.n_predictions == 2  # '.hidden' is not a chip
    assert result.chips_per_s == pytest.approx(12.5) and "main.py's own log" in result.chips_per_s_source
    assert any(ln.startswith("projected time for 10,980 chips here: ") for ln in lines)


def test_jaccard_hand_computed(tmp_path, data):
    result, lines = run_verify(tmp_path, data, "good", labels=data / "labels")
    # c0: top half vs left half -> I = 256*256, U = 3*256*256; c1: I = 0, U = 512 (one label row)
    expected = 65536 / (196608 + 512)
    assert result.ok and result.jaccard == pytest.approx(expected, abs=1e-12)
    assert lines[-1] == f"jaccard={expected:.10f}"


@pytest.mark.parametrize("mode,message", [
    ("missing", "missing prediction: {pred}/c1.tif"),
    ("extra", "extra file: {pred}/stray.tif"),
    ("shape", "wrong shape: {pred}/c1.tif: shape (511, 512), expected (512, 512)"),
    ("values", "bad values: {pred}/c1.tif: values [2] not in {{0, 1}}"),
    ("large", "too large: {pred}/c1.tif: "),
    # refused by the kernel (read-only in main.py's sandbox; unprivileged without bubblewrap): the failure names it
    ("write_data", "main.py exited with status 1 (last line: "),
    ("network", "main.py tried to use the network: cloudseg-network-guard: blocked socket.connect "
                "('127.0.0.1', 9)"),
    ("crash", "main.py exited with status 3"),
])
def test_each_bad_output_fails_with_its_message(tmp_path, data, mode, message):
    keep = tmp_path / "work"
    result, lines = run_verify(tmp_path, data, mode, keep=keep)
    ce = keep / "codeexecution"
    expected = message.format(pred=ce / "predictions", data=ce / "data")
    assert not result.ok
    assert any(f.startswith(expected) for f in result.failures), result.failures
    assert len(result.failures) == 1, result.failures
    if mode == "write_data":
        assert re.search(r"(Read-only file system|Permission denied): '\S*/data/test_features/c0/B02\.tif'\)$",
                         result.failures[0]), result.failures
    assert f"FAIL {result.failures[0]}" in lines and lines[-1] == "verify failed: 1 problem(s)"


def test_too_large_names_the_size(tmp_path, data):
    result, _ = run_verify(tmp_path, data, "large")
    assert re.search(r"c1\.tif: 1,04\d,\d{3} bytes > 524,288$", result.failures[0]), result.failures


def test_main_not_at_zip_root_is_refused_before_running(tmp_path, data):
    lines: list[str] = []
    result = verify_submission(stub_zip(tmp_path, "good", name="submission/main.py"), data / "features",
                               echo=lines.append)
    assert not result.ok and result.returncode is None
    assert result.failures == [f"{tmp_path / 'good.zip'}: main.py is not at the zip root "
                               "(found submission/main.py: it must be at the root, not in a folder)"]


def test_zip_layout_checks_name_each_member(tmp_path):
    path = stub_zip(tmp_path, "good", extra={
        "../evil.py": "", "__pycache__/main.cpython-311.pyc": "", "notebooks/explore.ipynb": "{}",
        ".env": "TOKEN=1", "assets/client_secret.json": "{}", "helper.py": "import mlflow\nimport numpy\n",
    })
    problems, safe = check_zip(path)
    assert not safe
    assert "../evil.py: '..' in a zip path" in problems
    for member in ("__pycache__/main.cpython-311.pyc", "notebooks/explore.ipynb", ".env",
                   "assets/client_secret.json"):
        assert f"{member}: caches, notebooks, stores or secrets do not belong in a submission" in problems
    assert "helper.py: line 1 imports 'mlflow', which the runtime does not have" in problems
    assert not any("numpy" in p or p.startswith("main.py") for p in problems)


def test_check_sources_python39_grammar_and_local_imports():
    ok = {"main.py": "import helpers.io\nfrom helpers import x\nimport torch, json\n",
          "helpers/io.py": "x = 1\n"}
    assert check_sources(ok) == []
    bad = {"main.py": "match x:\n    case 1:\n        pass\n"}
    (problem,) = check_sources(bad)
    assert problem.startswith("main.py: does not parse as Python 3.9 (line ")
    assert "Pattern matching" in problem


def test_real_submission_passes_and_cli_prints_jaccard(tmp_path, data):
    folder = write_submission(tmp_path / "sub", [save_tiny_checkpoint(tmp_path / "m.pt")], tta="none",
                              batch_size=2)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "junk.pyc").write_bytes(b"")  # left out by zip_submission
    zip_path = zip_submission(folder, tmp_path / "sub.zip")
    names = sorted(zipfile.ZipFile(zip_path).namelist())
    assert names == ["assets/inference.json", "assets/model_0.pt", "main.py", "stac_bands.py"]
    result = CliRunner().invoke(app, ["verify-submission", str(zip_path), "--features",
                                      str(data / "features"), "--labels", str(data / "labels"),
                                      "--timeout", "600"])
    out = result.output.strip().splitlines()
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"jaccard=[01]\.\d{10}", out[-1])
    assert any(ln.startswith("[main.py] throughput chips_per_s=") for ln in out)
    assert any("first read to last write" in ln for ln in out)
    # the figure is the pooled Jaccard of this model's masks against the labels, recomputed here from the
    # checkpoint alone (its normalisation and threshold; no main.py). The tolerance is two pixels of the union,
    # for a probability that lands on the threshold within float error.
    import torch

    from cloudseg.checkpoint import load_checkpoint, model_from_checkpoint
    from cloudseg.data.io import read_band, read_chip
    from cloudseg.data.transforms import Normalization
    from cloudseg.metrics import JaccardAccumulator

    ckpt = load_checkpoint(tmp_path / "m.pt")
    norm = Normalization.from_dict(ckpt["normalization"])
    x = torch.from_numpy(np.stack([norm(read_chip(data / "features" / c)) for c in ("c0", "c1")]))
    with torch.no_grad():
        probs = torch.sigmoid(model_from_checkpoint(ckpt).eval()(x))[:, 0].numpy()
    acc = JaccardAccumulator()
    for chip, p in zip(("c0", "c1"), probs):
        acc.add(chip, (p >= ckpt["threshold"]).astype(np.uint8), read_band(data / "labels" / f"{chip}.tif"))
    assert 0.001 < acc.score() < 0.999  # the masks are neither empty nor everything, so the figure says something
    assert float(out[-1].split("=")[1]) == pytest.approx(acc.score(), abs=2 / sum(u for _, _, u in acc.rows))


def test_cli_exit_codes_for_bad_submission_and_missing_runtime(tmp_path, data, monkeypatch):
    result = CliRunner().invoke(app, ["verify-submission", str(stub_zip(tmp_path, "missing")),
                                      "--features", str(data / "features")])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == "verify failed: 1 problem(s)"
    monkeypatch.setattr("cloudseg.submission.verify.RUNTIME_PYTHON", tmp_path / "no-such-python")
    result = CliRunner().invoke(app, ["verify-submission", str(stub_zip(tmp_path, "good")),
                                      "--features", str(data / "features"), "--runtime"])
    assert result.exit_code == 2 and "run make runtime-env" in result.output


# ------------------------------------------------------------------------------------------- hostile main.py

HOSTILE = '''import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

MODE, PORT, TOKEN, LABELS, SECRET, TARGET = "{mode}", {port}, "{token}", {labels!r}, {secret!r}, {target!r}
root = os.environ["CLOUDSEG_ROOT"]
feats = os.path.join(root, "data", "test_features")
out = os.path.join(root, "predictions")
print("predictions/ holds %r at the start" % sorted(os.listdir(out)))
chips = sorted(d for d in os.listdir(feats) if not d.startswith("."))
for chip in chips:
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(os.path.join(out, chip + ".tif"))


def attempt(what, fn):
    try:
        print("%s: %s" % (what, fn()))
    except OSError as exc:
        print("%s: %s" % (what, type(exc).__name__))


def detach():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", TOKEN], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("detached child pid %d" % child.pid)


if MODE == "secret":
    print("seen DB=%r MLFLOW_TRACKING_URI=%r" % (os.environ.get("DB"), os.environ.get("MLFLOW_TRACKING_URI")))
if MODE == "write":
    with open(os.path.join(os.environ["HOME"], "cache.txt"), "w") as fh:  # the scratch home is writable
        fh.write("ok")
    print("home written: %s" % open(os.path.join(os.environ["HOME"], "cache.txt")).read())
    with open(os.path.join(root, "stray.txt"), "w") as fh:
        fh.write("outside predictions/")
if MODE == "socket":
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    except OSError as exc:
        print("main connect refused: %s" % exc)
    child = "import socket; socket.create_connection(('127.0.0.1', %d), timeout=2).close(); print('child in')"
    r = subprocess.run([sys.executable, "-I", "-c", child % PORT], capture_output=True, text=True)
    print("child: rc=%d %s" % (r.returncode, (r.stdout + r.stderr).strip().splitlines()[-1:]))
if MODE == "snoop":
    def steal():  # the labels over the predictions: a perfect score, were they visible
        for chip in chips:
            shutil.copyfile(os.path.join(LABELS, chip + ".tif"), os.path.join(out, chip + ".tif"))
        return "copied"
    attempt("labels", steal)
    attempt("secret", lambda: open(SECRET).read())
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        attempt("write " + folder, lambda f=folder: open(os.path.join(f, TOKEN), "w").write("x"))
    attempt("write code folder", lambda: open(os.path.join(root, TOKEN), "w").write("x"))
    detach()
if MODE == "links":
    os.remove(os.path.join(out, chips[0] + ".tif"))
    os.symlink(TARGET, os.path.join(out, chips[0] + ".tif"))
    os.remove(os.path.join(out, chips[1] + ".tif"))
    os.mkfifo(os.path.join(out, chips[1] + ".tif"))
if MODE == "stac":  # through HTTP_PROXY: verify's relay in the namespace, its allow-listing proxy outside
    import urllib.request
    print("fetched: %s" % urllib.request.urlopen("http://127.0.0.1:%d/hello" % PORT, timeout=30).read().decode())
    try:
        urllib.request.urlopen("http://10.255.255.1/x", timeout=30)
    except Exception as exc:
        print("other host: %s" % exc)
if MODE == "sleep":
    detach()
    print("started", flush=True)
    time.sleep(600)
'''


def hostile_zip(tmp_path: Path, mode: str, port: int = 0, token: str = "", labels: str = "", secret: str = "",
                target: str = "", extra: dict | None = None) -> Path:
    path = tmp_path / f"hostile-{mode}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("main.py", HOSTILE.format(mode=mode, port=port, token=token, labels=labels, secret=secret,
                                              target=target))
        for member, text in (extra or {}).items():
            zf.writestr(member, text)
    return path


@pytest.fixture
def server():
    """A TCP server on loopback counting the connections it accepts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    accepted: list[tuple] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = sock.accept()
            except OSError:
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join(timeout=5)
    sock.close()


def _need_bwrap() -> None:
    why = sandbox._bwrap_works(os.geteuid() == 0)
    if why:
        unavailable(f"no bubblewrap sandbox here: {why} (make test installs Debian's bubblewrap where it can)")


def _use(kind: str, monkeypatch) -> None:
    """Make verify take the sandbox ``kind``: bubblewrap, unshare (bwrap missing) or none (neither)."""
    if kind == "bwrap":
        _need_bwrap()
        return
    monkeypatch.setattr(sandbox, "BWRAP", "cloudseg-no-such-bwrap")
    if kind == "none":
        monkeypatch.setattr(sandbox, "UNSHARE", "cloudseg-no-such-unshare")
    elif sandbox.network_namespace()[0] is None:
        unavailable("unshare cannot make a network namespace here")


@pytest.fixture(params=["bwrap", "unshare", "none"])
def path(request, monkeypatch) -> str:
    """Each way verify runs: bubblewrap, unshare where bubblewrap is missing, neither (both simulated missing)."""
    _use(request.param, monkeypatch)
    return request.param


@pytest.fixture
def tmpdir(tmp_path, monkeypatch) -> Path:
    """verify's temporary folders land here, so a test sees whether any is left behind."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def processes_with(token: str) -> list[int]:
    """Pids of processes whose command line holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            continue
    return found


def assert_nothing_left(tmpdir: Path, token: str = "") -> None:
    """No verify folder, no file named ``token`` in the host's world-writable folders, no process with it."""
    assert sorted(os.listdir(tmpdir)) == []
    if token:
        assert not any(Path(d, token).exists() for d in sandbox.TMP_DIRS), token
        pids = processes_with(token)
        for pid in pids:  # ours (the test's main.py started it): end it, then fail
            os.kill(pid, signal.SIGKILL)
        assert pids == []


def run_hostile(tmp_path, data, mode, port=0, **kwargs):
    lines: list[str] = []
    result = verify_submission(hostile_zip(tmp_path, mode, port), data / "features", echo=lines.append,
                               keep=tmp_path / "work", **kwargs)
    return result, lines


def test_no_namespace_fails_unless_the_weaker_check_is_accepted(tmp_path, data, monkeypatch):
    _use("none", monkeypatch)
    result, lines = run_verify(tmp_path, data, "good")
    assert not result.ok and result.returncode is None  # main.py never ran
    assert result.failures[0].startswith(
        "no network namespace for main.py (network not isolated "
        "(cloudseg-no-such-unshare -n: cloudseg-no-such-unshare not installed)")
    assert "--allow-network-check-skip" in result.failures[0]
    result, lines = run_verify(tmp_path, data, "good", allow_network_check_skip=True)
    assert result.ok and lines[-1] == "checks passed"
    end = lines[[ln.startswith("predictions: ") for ln in lines].index(True):]  # the last lines
    warnings = [ln for ln in end if ln.startswith("WARNING ")]
    assert warnings[0].startswith("WARNING weaker check: network not isolated")
    assert warnings[-2].startswith("WARNING reduced protection: no private file system for main.py "
                                   "(cloudseg-no-such-bwrap is not installed (Debian/Ubuntu: apt-get install "
                                   "bubblewrap))")
    assert warnings[-1].startswith("WARNING reduced protection: no PID namespace")


def test_secret_in_the_environment_is_withheld_and_named(tmp_path, data, path, monkeypatch):
    monkeypatch.setenv("DB", "postgresql://cloudseg:hunter2@db/cloudseg")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # on the allow-list: passed on
    result, lines = run_hostile(tmp_path, data, "secret", allow_network_check_skip=path == "none")
    assert result.ok, result.failures
    assert "[main.py] seen DB=None MLFLOW_TRACKING_URI=None" in lines
    assert not any("hunter2" in ln or "tracking.invalid" in ln for ln in lines)
    (env_line,) = [ln for ln in lines if ln.startswith("user: ")]
    withheld = env_line.split("withheld from main.py: ")[1].split(", ")
    assert "DB" in withheld and "MLFLOW_TRACKING_URI" in withheld and "OMP_NUM_THREADS" not in withheld
    assert (path == "bwrap") == (result.reduced == [])  # each fallback says what it lacks


def test_write_outside_predictions_is_refused_and_named(tmp_path, data, path):
    result, lines = run_hostile(tmp_path, data, "write", allow_network_check_skip=path == "none")
    stray = tmp_path / "work" / "codeexecution" / "stray.txt"
    assert not result.ok
    assert "[main.py] home written: ok" in lines  # the scratch home is writable
    if path == "bwrap":  # main.py's folder is mounted read-only: the kernel refuses, the failure names the file
        assert result.failures == ["main.py exited with status 1 (last line: OSError: [Errno 30] Read-only file "
                                   "system: '/codeexecution/stray.txt')"]
    elif path == "unshare":  # runs as nobody: the kernel refuses
        assert result.failures == [f"main.py exited with status 1 (last line: PermissionError: [Errno 13] "
                                   f"Permission denied: '{stray}')"]
    else:  # no mount namespace here: main.py ran as root (said in the last lines); the file is found after
        assert result.failures == [
            f"main.py wrote outside predictions/ and its scratch folders: {stray} (created)"]
        assert any(ln.startswith("WARNING weaker check: main.py ran as root") for ln in lines)


def test_socket_to_a_local_server_is_caught(tmp_path, data, server, path):
    port, accepted = server
    weaker = path == "none"
    result, lines = run_hostile(tmp_path, data, "socket", port, allow_network_check_skip=weaker)
    assert not result.ok
    assert len(result.failures) == 1, result.failures  # main.py's own attempt, named by the audit hook
    assert result.failures[0].startswith("main.py tried to use the network: cloudseg-network-guard: blocked "
                                         "socket.getaddrinfo '127.0.0.1'")
    if not weaker:  # the namespace has no way out: even the python -I child reaches nothing
        assert accepted == []
        assert any(ln.startswith("[main.py] child: rc=1") for ln in lines)
    else:  # the audit hook alone misses a python -I child: reached the server, and verify says it was weaker
        assert len(accepted) == 1
        assert any("child in" in ln for ln in lines)
        assert any(ln.startswith("WARNING weaker check: ") and "python -I" in ln for ln in lines[-6:])


@pytest.mark.parametrize("kind", ["bwrap", "unshare"])
def test_stac_door_lets_through_the_declared_host_only(tmp_path, data, tmpdir, monkeypatch, kind):
    """A submission declaring a STAC API reaches it through verify's relay and proxy; another host is refused."""
    _use(kind, monkeypatch)
    if os.geteuid() != 0 and kind != "bwrap":
        pytest.skip("without bubblewrap the relay needs root")

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    inference = json.dumps({"stac": {"url": f"http://127.0.0.1:{port}/", "bands": ["B11"]}})
    try:
        lines: list[str] = []
        result = verify_submission(hostile_zip(tmp_path, "stac", port, extra={"assets/inference.json": inference}),
                                   data / "features", echo=lines.append, timeout=120)
    finally:
        srv.shutdown()
    assert "[main.py] fetched: hello" in lines
    assert any(ln.startswith("[main.py] other host: HTTP Error 403") for ln in lines), lines
    assert result.failures == ["main.py tried to use the network: cloudseg-network-guard: blocked proxy refused "
                               "10.255.255.1:80 (not the declared STAC endpoint)"]
    assert_nothing_left(tmpdir)


@pytest.mark.parametrize("kind", ["bwrap", "unshare"])
def test_main_py_sees_nothing_of_the_user_and_leaves_nothing_behind(tmp_path, data, tmpdir, monkeypatch, kind):
    """A main.py that copies the labels over its predictions, reads a file of the user's, writes the host's
    world-writable folders and its own code folder, and leaves a detached child running."""
    _use(kind, monkeypatch)
    token = f"cloudseg-hostile-{os.getpid()}-{kind}"
    secret = tmp_path / "project" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("hunter2")
    os.chmod(secret, 0o644)  # world-readable, as a user's project files usually are
    zip_path = hostile_zip(tmp_path, "snoop", token=token, labels=str(data / "labels"), secret=str(secret))
    lines: list[str] = []
    result = verify_submission(zip_path, data / "features", labels=data / "labels", echo=lines.append, timeout=120)
    assert "[main.py] predictions/ holds [] at the start" in lines
    assert "[main.py] labels: FileNotFoundError" in lines and "[main.py] secret: FileNotFoundError" in lines
    assert result.jaccard == 0.0  # scored from the labels main.py never saw (it predicted no cloud)
    for folder in sandbox.TMP_DIRS:  # private to main.py: written there, gone with the sandbox
        assert f"[main.py] write {folder}: 1" in lines
    assert any(re.fullmatch(r"\[main\.py\] write code folder: (OSError|PermissionError)", ln) for ln in lines)
    (left,) = result.failures
    assert re.fullmatch(r"main\.py left 1 process\(es\) running when it ended: pid \d+ \(python[\d.]*\) \(all ended "
                        r"with its sandbox; the runtime would not wait for them either\)", left), left
    assert f"FAIL {left}" in lines and lines[-1] == "verify failed: 1 problem(s)"
    assert_nothing_left(tmpdir, token)


def test_links_and_fifos_in_predictions_fail_without_being_followed(tmp_path, data, tmpdir, monkeypatch):
    """A prediction that links to a root-only file verify could read (a valid mask: followed, it would pass) and
    one that is a FIFO (opened, it would block): both named, quickly, neither opened."""
    _use("bwrap", monkeypatch)
    target = tmp_path / "root-only.tif"
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(target)
    os.chmod(target, 0o600)
    zip_path = hostile_zip(tmp_path, "links", target=str(target))
    start = time.time()
    lines: list[str] = []
    result = verify_submission(zip_path, data / "features", echo=lines.append, timeout=60, keep=tmp_path / "work")
    assert time.time() - start < 60 + 60
    pred = tmp_path / "work" / "codeexecution" / "predictions"
    note = "(verify opens regular files only, as the runtime's checks expect)"
    assert result.failures == [f"not a regular file: {pred}/c0.tif: a symbolic link to {target} {note}",
                               f"not a regular file: {pred}/c1.tif: a FIFO (named pipe) {note}"]
    assert_nothing_left(tmpdir)


def test_time_limit_ends_main_and_its_detached_child(tmp_path, data, tmpdir):
    token = f"cloudseg-sleeper-{os.getpid()}"
    lines: list[str] = []
    start = time.time()
    result = verify_submission(hostile_zip(tmp_path, "sleep", token=token), data / "features", echo=lines.append,
                               timeout=5)
    assert time.time() - start < 5 + 60
    assert result.timed_out and "[main.py] started" in lines
    assert result.failures == ["main.py exceeded the time limit of 5 s and was killed, with every process it had "
                               "started"]
    assert_nothing_left(tmpdir, token)


# ------------------------------------------------------------------------------------------- hostile zips

def stream_zip(path: Path, member: str, chunk: bytes, count: int, extra: dict[str, str] | None = None) -> Path:
    """A zip whose ``member`` unpacks to ``chunk`` repeated ``count`` times, written without that data on disk
    or in memory: deflate after a full flush gives the same bytes for each repeat, and crc32 (affine in its
    start value) is stepped by its 32 basis responses instead of over every byte. ``extra`` members follow."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    if comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH) != block:
        raise ValueError("the chunk does not deflate to the same bytes twice")
    tail = comp.flush()
    base = zlib.crc32(chunk, 0)
    basis = [zlib.crc32(chunk, 1 << i) ^ base for i in range(32)]
    crc = 0
    for _ in range(count):
        crc = base ^ _xor_bits(basis, crc)
    usize, csize, name = len(chunk) * count, len(block) * count + len(tail), member.encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                             len(name), 20) + name + struct.pack("<HHQQ", 1, 16, usize, csize))
        for _ in range(count):
            fh.write(block)
        fh.write(tail)
        cd_offset = fh.tell()
        fh.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                             0xFFFFFFFF, len(name), 20, 0, 0, 0, 0o100644 << 16, 0) + name
                 + struct.pack("<HHQQ", 1, 16, usize, csize))
        cd_size = fh.tell() - cd_offset
        eocd64 = fh.tell()
        fh.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, cd_size, cd_offset))
        fh.write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, cd_size, cd_offset, 0))
    with zipfile.ZipFile(path, "a") as zf:
        for name, text in (extra or {}).items():
            zf.writestr(name, text)
    return path


def _xor_bits(basis: list[int], value: int) -> int:
    out = 0
    for i in range(32):
        if value >> i & 1:
            out ^= basis[i]
    return out


def test_stream_zip_is_a_real_zip():
    """The bombs below are what they claim: zipfile reads the member back, CRC checked."""
    buf = Path(tempfile.mkdtemp()) / "small.zip"
    try:
        stream_zip(buf, "x.bin", b"abc" * 1000, 50, extra={"main.py": "print(1)\n"})
        with zipfile.ZipFile(buf) as zf:
            assert zf.read("x.bin") == b"abc" * 1000 * 50 and zf.read("main.py") == b"print(1)\n"
    finally:
        shutil.rmtree(buf.parent)


def test_zip_bomb_and_huge_source_are_refused_before_unpacking(tmp_path, data, tmpdir):
    """5 GiB of zeros packed into ~5 MB, and a 1 GiB .py: named from the zip's directory, nothing unpacked, and
    verify's memory stays small (the source is never read whole)."""
    bomb = stream_zip(tmp_path / "bomb.zip", "assets/model_0.pt", bytes(1 << 20), 5 * 1024,
                      extra={"main.py": "print('hi')\n"})
    assert bomb.stat().st_size < 8 << 20
    huge = stream_zip(tmp_path / "huge.zip", "model.py", (b"#" * 1023 + b"\n") * 1024, 1024,
                      extra={"main.py": "print('hi')\n"})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    lines: list[str] = []
    result = verify_submission(bomb, data / "features", echo=lines.append)
    assert not result.ok and result.returncode is None
    (bombed,) = result.failures
    assert re.fullmatch(r"assets/model_0\.pt: 5\.00 GiB packed into 5,\d{3},\d{3} bytes \(ratio 1,0\d\d, over the "
                        r"limit of 100: a zip bomb\? --max-ratio\)", bombed), bombed
    assert lines[-3:] == [f"FAIL {bombed}", "nothing was unpacked", "verify failed: 1 problem(s)"]
    result = verify_submission(huge, data / "features", echo=lines.append)
    ratio, source = result.failures
    assert re.fullmatch(r"model\.py: 1\.00 GiB packed into [\d,]+ bytes \(ratio \d+, over the limit of 100: a zip "
                        r"bomb\? --max-ratio\)", ratio), ratio
    assert source == ("model.py: a 1.00 GiB Python source, over the 4 MiB verify reads to check it (sources that "
                      "size are not code: ship data as an asset)")
    assert time.time() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 << 10  # KiB: far below 1 GiB
    assert_nothing_left(tmpdir)
    # each limit has its flag
    result = CliRunner().invoke(app, ["verify-submission", str(bomb), "--features", str(data / "features"),
                                      "--max-unpacked-gb", "4", "--max-files", "1", "--max-ratio", "2000"])
    out = result.output.strip().splitlines()
    assert result.exit_code == 1 and out[-1] == "verify failed: 2 problem(s)", result.output
    assert "FAIL 2 files in the zip, over the limit of 1 (--max-files)" in out
    assert "FAIL the zip unpacks to 5.00 GiB, over the limit of 4.00 GiB (--max-unpacked-gb)" in out
    assert_nothing_left(tmpdir)


@pytest.mark.parametrize("folder", ["predictions", "data"])
def test_zip_shipping_a_folder_the_runtime_mounts_is_refused(tmp_path, data, tmpdir, folder):
    """Shipped predictions would count as main.py's output; a shipped data/ collides with the features."""
    zip_path = stub_zip(tmp_path, "good", extra={f"{folder}/c0.tif": "x", f"{folder}/c1.tif": "x"})
    lines: list[str] = []
    result = verify_submission(zip_path, data / "features", echo=lines.append)
    what = "the test features, read-only" if folder == "data" else "main.py's output, empty at the start"
    assert result.failures == [f"{folder}/: the runtime mounts {folder}/ beside main.py itself ({what}), so a zip "
                               f"may not ship it; leave {folder}/ out of the zip"]
    assert result.returncode is None and lines[-2] == "nothing was unpacked"
    assert_nothing_left(tmpdir)


def test_check_sources_reports_code_too_deep_to_parse():
    """The parser gives up (RecursionError, MemoryError) on deep nesting: a failed check naming the file."""
    problems = check_sources({"main.py": "import numpy\n", "deep.py": "x = " + "1+" * 200_000 + "1\n",
                              "deeper.py": "x = " + "-" * 100_000 + "1\n", "nul.py": "x = 1\x00\n"})
    assert [p.split(" (")[0] for p in problems] == ["deep.py: cannot be checked", "deeper.py: cannot be checked",
                                                    "nul.py: does not parse as Python 3.9"]
    assert "RecursionError" in problems[0] and "MemoryError" in problems[1]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_verify_killed_while_main_runs_leaves_no_process_and_no_folder(tmp_path, data, how):
    """verify itself ended from outside (SIGKILL: its janitor cleans up; SIGTERM, Ctrl-C: it does)."""
    token = f"cloudseg-killed-{os.getpid()}-{int(how)}"
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cloudseg.cli", "verify-submission",
                             str(hostile_zip(tmp_path, "sleep", token=token)), "--features", str(data / "features"),
                             "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[main.py] started"):
                break
        deadline = time.time() + 20
        while not processes_with(token) and time.time() < deadline:
            time.sleep(0.1)
        assert processes_with(token), "".join(seen)  # main.py's detached child runs
        proc.send_signal(how)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    if how != signal.SIGKILL:
        assert proc.returncode == 130 and "verify interrupted" in rest, rest
    deadline = time.time() + 30  # the janitor works on after verify is gone
    while time.time() < deadline and (os.listdir(tmp) or processes_with(token)):
        time.sleep(0.2)
    assert_nothing_left(tmp, token)
