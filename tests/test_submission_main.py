"""The submission's main.py: bad-input corpus, batch-size determinism, no network, and the runtime's versions.

The model is a random-weight Unet + resnet18 cut to 3 encoder stages (predictions are not meaningful, only
reproducible); chips are the seeded 512x512 fixtures of tests/data/fixtures.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image

from cloudseg.checkpoint import make_checkpoint, save_checkpoint
from cloudseg.data.io import BANDS, write_tif
from cloudseg.data.transforms import Normalization
from cloudseg.submission import MAIN_TEMPLATE, write_submission
from cloudseg.submission.verify import write_network_guard
from tests.data.fixtures import make_dataset
from tests.needs import runtime_python

TINY_ARGS = {"arch": "Unet", "encoder_name": "resnet18", "in_channels": 4, "classes": 1,
             "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}
NORM = Normalization(mean=(0.1, 0.1, 0.1, 0.25), std=(0.2, 0.2, 0.2, 0.3))


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=4, classes=1, encoder_depth=3,
                    decoder_channels=[16, 8, 8]).eval()


def save_tiny_checkpoint(path: Path, seed: int = 0, threshold: float = 0.5) -> Path:
    """A cloudseg checkpoint of ``tiny_model(seed)``."""
    ckpt = make_checkpoint(tiny_model(seed), TINY_ARGS, NORM.to_dict(), threshold, {"arch": "Unet"}, epoch=1)
    return save_checkpoint(ckpt, path)


def load_main(folder: Path) -> ModuleType:
    """Import a submission's main.py in-process (its assets are found relative to ``folder``)."""
    spec = importlib.util.spec_from_file_location(f"submission_main_{abs(hash(folder))}", folder / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_root(root: Path, features: Path) -> Path:
    """A codeexecution-like root whose data/test_features is a copy of ``features``."""
    shutil.copytree(features, root / "data" / "test_features")
    return root


def read_prediction(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two tiny checkpoints: seed 0 storing threshold 0.37, seed 1 storing 0.5."""
    folder = tmp_path_factory.mktemp("ckpt")
    return [save_tiny_checkpoint(folder / "a.pt", 0, threshold=0.37), save_tiny_checkpoint(folder / "b.pt", 1)]


@pytest.fixture(scope="module")
def checkpoint(checkpoints) -> Path:
    return checkpoints[0]


@pytest.fixture(scope="module")
def good_chips(tmp_path_factory) -> Path:
    """3 clean test chips: <dir>/test_features/te00..te02."""
    return make_dataset(tmp_path_factory.mktemp("good"), n_chips=3, split="test", labels=False)


def _corpus(root: Path) -> tuple[Path, dict[str, str]]:
    """Test features, one kind of bad input per chip. Returns (features, chip id -> expected error or '')."""
    make_dataset(root, n_chips=7, split="test", labels=False, seed=3)
    feats = root / "test_features"
    (feats / "te01" / "B03.tif").unlink()  # missing band
    data = (feats / "te02" / "B04.tif").read_bytes()
    (feats / "te02" / "B04.tif").write_bytes(data[: len(data) // 2])  # truncated TIF
    write_tif(feats / "te03" / "B08.tif", np.full((511, 512), 3000, dtype=np.uint16))  # wrong shape
    for band in BANDS:  # all-zero chip: valid input, no error
        write_tif(feats / "te04" / f"{band}.tif", np.zeros((512, 512), dtype=np.uint16))
    (feats / "te05" / "B02.tif").write_bytes(b"not a TIFF\x00" * 50)  # unreadable (root ignores chmod 000)
    for band in BANDS:  # nothing readable at all
        (feats / "te06" / f"{band}.tif").write_bytes(b"\x00" * 100)
    (feats / ".DS_Store").write_bytes(b"\x00\x01junk")
    shutil.copytree(feats / "te00", feats / ".hidden")  # looks like a chip but starts with '.'
    (feats / "notes.txt").write_text("a plain file is not a chip\n")
    expected = {"te00": "", "te01": "te01/B03.tif: missing", "te02": "te02/B04.tif: unreadable",
                "te03": "te03/B08.tif: shape 511x512 resized", "te04": "",
                "te05": "te05/B02.tif: unreadable", "te06": "no readable band: all-zero prediction"}
    return feats, expected


# ------------------------------------------------------------------------------------------ in-process pieces

def test_resize_nearest_hand_computed():
    main = load_main(MAIN_TEMPLATE.parent)
    out = main.resize_nearest(np.arange(6).reshape(2, 3), size=4)
    np.testing.assert_array_equal(out, [[0, 0, 1, 2], [0, 0, 1, 2], [3, 3, 4, 5], [3, 3, 4, 5]])


def test_missing_band_filled_with_mean_of_readable(tmp_path):
    main = load_main(MAIN_TEMPLATE.parent)
    for band, value in (("B02", 1000), ("B04", 3000), ("B08", 5000)):
        write_tif(tmp_path / f"{band}.tif", np.full((512, 512), value, dtype=np.uint16))
    image, problems = main.read_chip(tmp_path, BANDS)
    assert image.shape == (4, 512, 512) and image.dtype == np.float32
    assert [float(image[i, 0, 0]) for i in range(4)] == [1000.0, 3000.0, 3000.0, 5000.0]
    assert len(problems) == 2 and "B03.tif: missing" in problems[0] and "mean of the readable" in problems[1]


def test_normalization_matches_training_exactly():
    main = load_main(MAIN_TEMPLATE.parent)
    member = main.Member(Path("x.pt"), torch.nn.Identity(), [0, 1, 2, 3], NORM.to_dict(), 1,
                         torch.device("cpu"))
    raw = np.random.default_rng(0).integers(0, 30000, (2, 4, 8, 8)).astype(np.float32)
    got = member.normalize(torch.from_numpy(raw)).numpy()
    np.testing.assert_array_equal(got, np.stack([NORM(r.astype(np.uint16)) for r in raw]))
    # hand-computed for band 0 (mean 0.1, std 0.2): 0 -> -0.5, 5000 -> 2.0, 30000 clipped to 2 -> 9.5
    x = torch.tensor([0.0, 5000.0, 30000.0]).view(1, 1, 1, 3).expand(1, 4, 1, 3)
    np.testing.assert_allclose(member.normalize(x)[0, 0, 0].numpy(), [-0.5, 2.0, 9.5], rtol=1e-6)


@pytest.mark.parametrize("name,n_views", [("none", 1), ("hflip", 2), ("flip", 3), ("flip4", 4), ("d4", 8)])
def test_tta_views_invert(name, n_views):
    main = load_main(MAIN_TEMPLATE.parent)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    views = main.tta_views(name)
    assert len(views) == n_views
    outputs = {tuple(fwd(x).flatten().tolist()) for fwd, _ in views}
    assert len(outputs) == n_views  # each view really is a different transform
    for fwd, inv in views:
        torch.testing.assert_close(inv(fwd(x)), x, rtol=0, atol=0)


def test_ensemble_averages_probabilities_and_threshold_defaults(tmp_path, checkpoints):
    folder = write_submission(tmp_path / "sub", checkpoints, tta="none")
    main = load_main(folder)
    config = main.load_inference_config(folder)
    members, bands, threshold = main.load_members(config, torch.device("cpu"), folder)
    assert threshold == pytest.approx(0.37) and bands == list(BANDS) and len(members) == 2
    x = torch.rand(1, 4, 64, 64) * 8000
    both = main.predict_probabilities(members, x, main.tta_views("none"))
    each = [main.predict_probabilities([m], x, main.tta_views("none")) for m in members]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    with torch.no_grad():
        direct = torch.sigmoid(tiny_model(0)(members[0].normalize(x)))[:, 0]
    torch.testing.assert_close(each[0], direct)


# ----------------------------------------------------------------------------------------- main.py end to end

def test_bad_input_corpus_one_prediction_per_chip_no_network(tmp_path, checkpoint):
    feats, expected = _corpus(tmp_path / "corpus")
    folder = write_submission(tmp_path / "sub", [checkpoint], tta="none", batch_size=3, num_workers=2)
    root = make_root(tmp_path / "root", feats)
    guard = write_network_guard(tmp_path / "guard")
    net_log = tmp_path / "network.log"
    env = {**os.environ, "CLOUDSEG_ROOT": str(root), "PYTHONPATH": str(guard),
           "CLOUDSEG_NETWORK_LOG": str(net_log)}
    proc = subprocess.run([sys.executable, "main.py"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not net_log.exists(), f"main.py tried to open a network connection: {net_log.read_text()}"

    preds = root / "predictions"
    assert sorted(os.listdir(preds)) == [f"{c}.tif" for c in sorted(expected)]
    for chip in expected:
        path = preds / f"{chip}.tif"
        arr = read_prediction(path)
        assert arr.shape == (512, 512) and arr.dtype == np.uint8
        assert set(np.unique(arr).tolist()) <= {0, 1}
        assert path.stat().st_size <= 524_288
    assert not read_prediction(preds / "te06.tif").any()  # nothing readable -> all clear

    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR")]
    for chip, fragment in expected.items():
        lines = [ln for ln in errors if ln.startswith(f"ERROR chip={chip} ")]
        if fragment:
            assert len(lines) == 1, (chip, errors)
            assert fragment in lines[0]
        else:
            assert lines == [], (chip, lines)
    assert len(errors) == sum(bool(f) for f in expected.values())
    assert re.search(r"^throughput chips_per_s=[0-9.]+ chips=7 ", proc.stdout, re.M)
    progress = r"^progress chips=7/7 \(100\.0%\) chips_per_s=[0-9.]+ elapsed=\S+ eta=0:00:00$"
    assert re.search(progress, proc.stdout, re.M)


def test_network_guard_catches_a_connection(tmp_path):
    """The guard used above really sees connects (to loopback's discard port: nothing leaves the machine)."""
    guard = write_network_guard(tmp_path / "guard")
    net_log = tmp_path / "network.log"
    code = ("import socket\n"
            "for attempt in (lambda: socket.socket().connect(('127.0.0.1', 9)),\n"
            "                lambda: socket.create_connection(('localhost', 9), timeout=0.5)):\n"
            "    try:\n        attempt()\n    except OSError:\n        pass\n")
    env = {**os.environ, "PYTHONPATH": str(guard), "CLOUDSEG_NETWORK_LOG": str(net_log)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    lines = net_log.read_text().splitlines()
    assert len(lines) == 2
    assert "blocked socket.connect ('127.0.0.1', 9)" in lines[0]
    assert "blocked socket.getaddrinfo 'localhost'" in lines[1]


def test_fp32_predictions_do_not_depend_on_batch_size(tmp_path, checkpoint, good_chips):
    outputs = []
    for batch_size in (1, 3):
        folder = write_submission(tmp_path / f"sub{batch_size}", [checkpoint], tta="none",
                                  batch_size=batch_size)
        root = make_root(tmp_path / f"root{batch_size}", good_chips / "test_features")
        assert load_main(folder).run(root, folder) == 0
        outputs.append({p.name: p.read_bytes() for p in sorted((root / "predictions").iterdir())})
    assert list(outputs[0]) == ["te00.tif", "te01.tif", "te02.tif"]
    assert outputs[0] == outputs[1]
    assert any(read_prediction(tmp_path / "root1" / "predictions" / n).any() for n in outputs[0])  # not all 0


def test_failed_write_is_reported_and_exit_status_is_1(tmp_path, checkpoint, good_chips):
    folder = write_submission(tmp_path / "sub", [checkpoint], tta="none", batch_size=2)
    root = make_root(tmp_path / "root", good_chips / "test_features")
    (root / "predictions" / "te01.tif").mkdir(parents=True)  # a folder where the file must go: write fails
    main = load_main(folder)
    lines: list[str] = []
    main.log = lines.append  # the pipeline looks up ``log`` in its module at call time
    assert main.run(root, folder) == 1
    assert sorted(os.listdir(root / "predictions")) == ["te00.tif", "te01.tif", "te02.tif"]  # no .partial left
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert len(errors) == 2, errors
    assert errors[0].startswith("ERROR chip=te01 ") and "te01.tif: write failed" in errors[0]
    assert errors[1].startswith("ERROR 1 chip(s) have no prediction") and "te01" in errors[1]


def test_missing_features_folder_exits_nonzero(tmp_path, checkpoint):
    folder = write_submission(tmp_path / "sub", [checkpoint], tta="none")
    assert load_main(folder).run(tmp_path / "nowhere", folder) == 1


@pytest.mark.runtime
def test_runtime_versions_give_the_same_predictions(tmp_path, checkpoint, good_chips):
    python = runtime_python()
    folder = write_submission(tmp_path / "sub", [checkpoint], tta="flip", batch_size=2)
    chips = tmp_path / "chips"
    for name in ("te00", "te01"):  # two chips keep the six forwards per stack affordable on 2 cores
        shutil.copytree(good_chips / "test_features" / name, chips / name)
    here = make_root(tmp_path / "here", chips)
    assert load_main(folder).run(here, folder) == 0
    there = make_root(tmp_path / "there", chips)
    env = {**os.environ, "CLOUDSEG_ROOT": str(there), "PYTHONPATH": ""}
    proc = subprocess.run([str(python), "main.py"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch=1.8" in proc.stdout
    for name in ("te00.tif", "te01.tif"):
        a, b = read_prediction(here / "predictions" / name), read_prediction(there / "predictions" / name)
        assert a.shape == b.shape == (512, 512)
        assert (a == b).mean() >= 0.999, f"{name}: only {(a == b).mean():.5f} of pixels agree"


def test_a_chip_folder_whose_name_is_not_utf8_is_read(tmp_path, checkpoint, good_chips):
    """A folder name with bytes that are not UTF-8 (kept by Python as surrogates) is read like any chip: its
    prediction equals the same chip's under a plain name, and it is written under the same odd name."""
    folder = write_submission(tmp_path / "sub", [checkpoint], tta="none")
    root = make_root(tmp_path / "root", good_chips / "test_features")
    odd = os.fsdecode(b"chip\xff\xfe")
    shutil.copytree(root / "data" / "test_features" / "te00", root / "data" / "test_features" / odd)
    main = load_main(folder)
    lines: list[str] = []
    main.log = lines.append
    assert main.run(root, folder) == 0
    preds = root / "predictions"
    assert (preds / f"{odd}.tif").is_file()
    np.testing.assert_array_equal(read_prediction(preds / f"{odd}.tif"), read_prediction(preds / "te00.tif"))
    assert not [ln for ln in lines if ln.startswith("ERROR")], lines


def test_a_failed_batch_is_retried_chip_by_chip_after_its_memory_is_released(monkeypatch):
    """A CUDA out-of-memory retried inside the ``except`` block would find the failed forward's tensors still held
    by the traceback, and fail again; each retry must start with them released."""
    import weakref

    spec = importlib.util.spec_from_file_location("submission_main_oom", MAIN_TEMPLATE)
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    held, released = [], []

    def predict_masks(members, x, views, threshold, amp):
        if x.shape[0] > 1:
            activations = torch.zeros(1 << 16)  # what the failed forward had allocated
            held.append(weakref.ref(activations))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        released.append(held[0]() is None)
        return [np.ones((512, 512), dtype=np.uint8)]

    monkeypatch.setattr(main, "predict_masks", predict_masks)
    batch = main.Batch(["a", "b"], [[], []], [0, 1], torch.zeros(2, 4, 8, 8))
    masks = main.predict_batch(batch, [], [], 0.5, False, torch.device("cpu"))
    assert released == [True, True]
    assert all(int(m.sum()) == 512 * 512 for m in masks) and batch.problems == [[], []]
