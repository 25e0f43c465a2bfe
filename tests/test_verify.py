"""cloudseg verify-submission: the runtime's checks, each failure naming the file, and the Jaccard figure.

Most cases run a stub main.py (numpy + PIL only, no model) that writes a chosen kind of bad output, so each
check is exercised in well under a second; one test verifies a real submission built from the main.py
template.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cloudseg.cli import app
from cloudseg.data.io import BANDS, write_tif
from cloudseg.submission import write_submission, zip_submission
from cloudseg.submission import verify
from cloudseg.submission.verify import check_sources, check_zip, verify_submission
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
    # refused by the kernel (main.py runs unprivileged); the failure names the file
    ("write_data", "main.py exited with status 1 (last line: PermissionError: [Errno 13] Permission denied: "
                   "'{data}/test_features/c0/B02.tif')"),
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
    assert f"FAIL {result.failures[0]}" in lines and lines[-1] == "verify failed: 1 problem(s)"


def test_too_large_names_the_size(tmp_path, data):
    result, _ = run_verify(tmp_path, data, "large")
    assert re.search(r"c1\.tif: 1,04\d,\d{3} bytes > 524,288$", result.failures[0]), result.failures


def test_time_limit_kills_main(tmp_path, data):
    result, _ = run_verify(tmp_path, data, "sleep", timeout=3)
    assert result.timed_out and not result.ok
    assert "main.py exceeded the time limit of 3 s and was killed" in result.failures


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
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

MODE, PORT = "{mode}", {port}
root = os.environ["CLOUDSEG_ROOT"]
feats = os.path.join(root, "data", "test_features")
out = os.path.join(root, "predictions")
for chip in sorted(d for d in os.listdir(feats) if not d.startswith(".")):
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(os.path.join(out, chip + ".tif"))
if MODE == "secret":
    print("seen DB=%r MLFLOW_TRACKING_URI=%r" % (os.environ.get("DB"), os.environ.get("MLFLOW_TRACKING_URI")))
if MODE == "write":
    with open(os.path.join(os.environ["HOME"], "cache.txt"), "w") as fh:  # the scratch home is writable
        fh.write("ok")
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
'''


def hostile_zip(tmp_path: Path, mode: str, port: int = 0) -> Path:
    path = tmp_path / f"hostile-{mode}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("main.py", HOSTILE.format(mode=mode, port=port))
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


@pytest.fixture(params=["namespace", "no_namespace"])
def path(request, monkeypatch) -> str:
    """Both ways verify runs: with a network namespace, and (simulated) where none can be made."""
    if request.param == "no_namespace":
        monkeypatch.setattr(verify, "UNSHARE", "cloudseg-no-such-unshare")
    return request.param


def run_hostile(tmp_path, data, mode, port=0, **kwargs):
    lines: list[str] = []
    result = verify_submission(hostile_zip(tmp_path, mode, port), data / "features", echo=lines.append,
                               keep=tmp_path / "work", **kwargs)
    return result, lines


def test_no_namespace_fails_unless_the_weaker_check_is_accepted(tmp_path, data, monkeypatch):
    monkeypatch.setattr(verify, "UNSHARE", "cloudseg-no-such-unshare")
    result, lines = run_verify(tmp_path, data, "good")
    assert not result.ok and result.returncode is None  # main.py never ran
    assert result.failures[0].startswith(
        "no network namespace for main.py (network not isolated "
        "(cloudseg-no-such-unshare -n: cloudseg-no-such-unshare not installed)")
    assert "--allow-network-check-skip" in result.failures[0]
    result, lines = run_verify(tmp_path, data, "good", allow_network_check_skip=True)
    assert result.ok and lines[-1] == "checks passed"
    assert any(ln.startswith("WARNING weaker check: network not isolated") for ln in lines[-4:-1])


def test_secret_in_the_environment_is_withheld_and_named(tmp_path, data, path, monkeypatch):
    monkeypatch.setenv("DB", "postgresql://cloudseg:hunter2@db/cloudseg")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid:5000")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # on the allow-list: passed on
    result, lines = run_hostile(tmp_path, data, "secret", allow_network_check_skip=path == "no_namespace")
    assert result.ok, result.failures
    assert "[main.py] seen DB=None MLFLOW_TRACKING_URI=None" in lines
    assert not any("hunter2" in ln or "tracking.invalid" in ln for ln in lines)
    (env_line,) = [ln for ln in lines if ln.startswith("user: ")]
    withheld = env_line.split("withheld from main.py: ")[1].split(", ")
    assert "DB" in withheld and "MLFLOW_TRACKING_URI" in withheld and "OMP_NUM_THREADS" not in withheld


def test_write_outside_predictions_is_refused_and_named(tmp_path, data, path):
    result, lines = run_hostile(tmp_path, data, "write", allow_network_check_skip=path == "no_namespace")
    stray = tmp_path / "work" / "codeexecution" / "stray.txt"
    assert not result.ok
    if path == "namespace":  # runs as nobody: the kernel refuses, the failure names the file
        assert result.failures == [f"main.py exited with status 1 (last line: PermissionError: [Errno 13] "
                                   f"Permission denied: '{stray}')"]
    else:  # no mount namespace here: main.py ran as root (said in the last lines); the file is found after
        assert result.failures == [
            f"main.py wrote outside predictions/ and the scratch home: {stray} (created)"]
        assert any(ln.startswith("WARNING weaker check: main.py ran as root") for ln in lines)
    assert (tmp_path / "work" / "home" / "cache.txt").read_text() == "ok"  # the scratch home is writable


def test_write_outside_predictions_is_named_when_it_succeeds(tmp_path, data, monkeypatch):
    """With a user the write is not refused to (root here), the scan after the run names the file."""
    monkeypatch.setattr(verify, "UNPRIVILEGED_USER", "root")
    result, _ = run_hostile(tmp_path, data, "write")
    stray = tmp_path / "work" / "codeexecution" / "stray.txt"
    assert result.failures == [f"main.py wrote outside predictions/ and the scratch home: {stray} (created)"]


def test_socket_to_a_local_server_is_caught(tmp_path, data, server, path):
    port, accepted = server
    weaker = path == "no_namespace"
    result, lines = run_hostile(tmp_path, data, "socket", port, allow_network_check_skip=weaker)
    assert not result.ok
    assert len(result.failures) == 1, result.failures  # main.py's own attempt, named by the audit hook
    assert result.failures[0].startswith("main.py tried to use the network: cloudseg-network-guard: blocked "
                                         "socket.getaddrinfo '127.0.0.1'")
    if not weaker:  # the namespace has no interfaces: even the python -I child reaches nothing
        assert accepted == []
        assert any(ln.startswith("[main.py] child: rc=1") for ln in lines)
    else:  # the audit hook alone misses a python -I child: reached the server, and verify says it was weaker
        assert len(accepted) == 1
        assert any("child in" in ln for ln in lines)
        assert lines[-2].startswith("WARNING weaker check: ") and "python -I" in " ".join(lines[-3:])
