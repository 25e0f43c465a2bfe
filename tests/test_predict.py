"""cloudseg predict: scenes of any size from sliding, blended windows, on the input's grid, memory flat.

The model is a random-weight Unet + resnet18 cut to 3 encoder stages (predictions are not meaningful, only
reproducible); chips are the seeded fixtures of tests/data/fixtures.py placed into larger nodata scenes.
"""

from __future__ import annotations

import importlib.util
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import segmentation_models_pytorch as smp
import torch
from affine import Affine
from rasterio.windows import Window
from typer.testing import CliRunner

from cloudseg import predict as pr
from cloudseg.checkpoint import make_checkpoint, save_checkpoint
from cloudseg.cli import app
from cloudseg.data.io import BANDS
from cloudseg.data.transforms import Normalization
from cloudseg.submission import write_submission, zip_submission
from tests.data.fixtures import make_chip

TINY_ARGS = {"arch": "Unet", "encoder_name": "resnet18", "in_channels": 4, "classes": 1,
             "kwargs": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}
NORM = Normalization(mean=(0.1, 0.1, 0.1, 0.25), std=(0.2, 0.2, 0.2, 0.3))
CRS = "EPSG:32736"
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 9000000.0)
CPU = torch.device("cpu")


def save_tiny_checkpoint(path: Path, seed: int = 0, threshold: float = 0.5) -> Path:
    torch.manual_seed(seed)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=4, classes=1, encoder_depth=3,
                     decoder_channels=[16, 8, 8]).eval()
    return save_checkpoint(make_checkpoint(model, TINY_ARGS, NORM.to_dict(), threshold, {}, epoch=1), path)


def write_bands(folder: Path, image: np.ndarray, transform: Affine = TRANSFORM, crs: str | None = CRS) -> Path:
    """``image`` (4, H, W) as B02.tif ... B08.tif in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for band, arr in zip(BANDS, image):
        with rasterio.open(folder / f"{band}.tif", "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0],
                           count=1, dtype=arr.dtype.name, crs=crs, transform=transform, tiled=True,
                           blockxsize=256, blockysize=256, compress="deflate") as dst:
            dst.write(arr, 1)
    return folder


def read_out(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), {"crs": src.crs, "transform": src.transform, "width": src.width,
                             "height": src.height, "dtype": src.dtypes[0], "nodata": src.nodata,
                             "blocks": src.block_shapes[0], "compress": src.compression}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.pt", threshold=0.45)


@pytest.fixture(scope="module")
def submission_zip(tmp_path_factory, ckpt) -> Path:
    root = tmp_path_factory.mktemp("sub")
    folder = write_submission(root / "sub", [ckpt], threshold=0.45, tta="none", batch_size=4)
    return zip_submission(folder, root / "sub.zip")


@pytest.fixture(scope="module")
def ensemble(ckpt) -> pr.Ensemble:
    return pr.load_ensemble([ckpt], CPU, tta="none", batch_size=4)


# Chips at known offsets in a 1736 x 1636 nodata scene (not a multiple of 512). At overlap 0 the window origins
# are rows 0, 512, 1024, 1224 and columns 0, 512, 1024, 1124: A and B fill one window each, exactly; C straddles
# six windows, four of them blended; the windows in between are nodata and skipped.
SCENE_HW = (1736, 1636)
OFFSETS = {"A": (0, 0), "B": (512, 512), "C": (1100, 1000)}


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("mosaic")
    rng = np.random.default_rng(7)
    scene = np.zeros((4, *SCENE_HW), np.uint16)
    chips = {}
    for name, (r, c) in OFFSETS.items():
        img, _ = make_chip(rng)
        img = np.maximum(img, 1)  # a real chip has no all-zero pixel
        scene[:, r:r + 512, c:c + 512] = img
        chips[name] = write_bands(root / name, img, TRANSFORM @ Affine.translation(c, r))
    return write_bands(root / "scene", scene), chips


def test_window_starts_cover_the_axis_with_the_last_flush():
    assert pr.window_starts(1300, 512, 0) == [0, 512, 788]
    assert pr.window_starts(1000, 512, 64) == [0, 448, 488]
    assert pr.window_starts(512, 512, 64) == [0]
    assert pr.window_starts(300, 512, 64) == [0]


def test_taper_is_a_partition_of_unity_across_the_overlap():
    w = pr.taper(512, 64)[256]  # one row through the middle
    assert w[200] == 1.0 and 0 < w[0] < 0.01
    np.testing.assert_allclose(w[448:] + w[:64], 1.0, atol=1e-6)  # left's falling + right's rising ramp
    assert (pr.taper(512, 0) == 1).all()


def test_mosaic_grid_nodata_and_chips_equal_to_chips_alone(tmp_path, mosaic, ensemble):
    scene, chips = mosaic
    stats = pr.predict_scene(scene, ensemble, tmp_path / "scene.tif", overlap=0, probabilities=True)
    out, meta = read_out(tmp_path / "scene.tif")
    with rasterio.open(scene / "B02.tif") as src:
        assert (meta["crs"], meta["transform"], meta["width"], meta["height"]) == \
            (src.crs, src.transform, src.width, src.height)
    assert meta["dtype"] == "uint8" and meta["nodata"] == 255 and meta["blocks"] == (512, 512)
    assert meta["compress"].name.lower() == "deflate"
    assert stats.windows == 16 and stats.skipped == 8
    covered = np.zeros(SCENE_HW, bool)
    for name, (r, c) in OFFSETS.items():
        covered[r:r + 512, c:c + 512] = True
    assert (out[~covered] == 255).all() and (out[covered] <= 100).all()
    for name, (r, c) in OFFSETS.items():
        pr.predict_scene(chips[name], ensemble, tmp_path / f"{name}.tif", overlap=0, probabilities=True)
        alone, meta_alone = read_out(tmp_path / f"{name}.tif")
        assert meta_alone["transform"] == TRANSFORM @ Affine.translation(c, r)
        part = out[r:r + 512, c:c + 512].astype(int)
        diff = np.abs(part - alone.astype(int))
        if name in ("A", "B"):  # one window each, no neighbour: the same forward
            assert diff.max() <= 1, name
        else:  # blended from windows that see the chip's edges and nodata: close, not equal
            assert diff.mean() < 3 and np.mean(diff <= 10) > 0.95, (name, diff.mean())


def test_overlap_blends_without_seams(tmp_path, mosaic, ensemble):
    scene, chips = mosaic
    pr.predict_scene(scene, ensemble, tmp_path / "o.tif", overlap=128, probabilities=True)
    out, _ = read_out(tmp_path / "o.tif")
    pr.predict_scene(chips["B"], ensemble, tmp_path / "b.tif", overlap=0, probabilities=True)
    alone, _ = read_out(tmp_path / "b.tif")
    diff = np.abs(out[512:1024, 512:1024].astype(int) - alone.astype(int))
    assert diff.mean() < 3 and np.mean(diff <= 10) > 0.95
    # no seam: at the window edges inside the chip (scene rows 768 and 896 at step 384) the jump between
    # neighbouring rows is like anywhere else in the chip's interior (its own edges see nodata: left out)
    rows = out[512 + 32:1024 - 32, 512:1024].astype(int)
    steps = np.abs(np.diff(rows, axis=0)).mean(axis=1)
    assert steps.max() < 4 * np.median(steps) + 1, steps.round(2)


def test_chip_folder_matches_the_submission_main_py(tmp_path, submission_zip, mosaic):
    """predict on a chip equals what the submission's main.py predicts for it (same models, threshold, TTA)."""
    _, chips = mosaic
    folder = tmp_path / "sub"
    shutil.unpack_archive(submission_zip, folder)
    spec = importlib.util.spec_from_file_location("submission_main_predict", folder / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    root = tmp_path / "root"
    shutil.copytree(chips["A"], root / "data" / "test_features" / "A")
    assert main.run(root, base=folder) == 0
    expected = np.array(__import__("PIL.Image", fromlist=["Image"]).open(root / "predictions" / "A.tif"))
    ens = pr.load_reference(submission_zip, CPU, tmp_path / "work")
    assert ens.threshold == pytest.approx(0.45) and ens.tta == "none" and ens.batch_size == 4
    pr.predict_scene(chips["A"], ens, tmp_path / "a.tif")
    got, _ = read_out(tmp_path / "a.tif")
    assert set(np.unique(got)) <= {0, 1}
    assert np.mean(got == expected) > 0.999


def test_four_band_file_equals_band_folder_and_small_scene_is_padded(tmp_path, mosaic, ensemble):
    _, chips = mosaic
    with rasterio.open(chips["A"] / "B02.tif") as src:
        profile = src.profile
    small = np.stack([rasterio.open(chips["A"] / f"{b}.tif").read(1)[:300, :200] for b in BANDS])
    profile.update(count=4, width=200, height=300, blockxsize=128, blockysize=128)
    with rasterio.open(tmp_path / "stack.tif", "w", **profile) as dst:
        dst.write(small)
    write_bands(tmp_path / "small", small)
    pr.predict_scene(tmp_path / "stack.tif", ensemble, tmp_path / "a.tif", probabilities=True)
    pr.predict_scene(tmp_path / "small", ensemble, tmp_path / "b.tif", probabilities=True)
    a, meta = read_out(tmp_path / "a.tif")
    b, _ = read_out(tmp_path / "b.tif")
    assert a.shape == (300, 200) and (meta["width"], meta["height"]) == (200, 300)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", [dict(tiled=True, blockxsize=256, blockysize=256),
                                    dict(tiled=True, blockxsize=1024, blockysize=1024),
                                    dict(tiled=False, blockysize=7), "4-band"])
def test_strips_cut_the_windows_a_direct_read_gives(tmp_path, layout):
    """Whatever the files' blocks (tiles, strips, one multi-band file), the strip reader yields, for every
    overlapping window of a scene of odd size, exactly what reading that window from the files gives."""
    h, w = 1300, 1100
    image = np.random.default_rng(3).integers(1, 10000, (4, h, w), dtype=np.uint16)
    profile = dict(driver="GTiff", width=w, height=h, dtype="uint16", crs=CRS, transform=TRANSFORM,
                   compress="deflate")
    if layout == "4-band":
        path = tmp_path / "stack.tif"
        with rasterio.open(path, "w", count=4, tiled=True, blockxsize=256, blockysize=256, **profile) as dst:
            dst.write(image)
    else:
        path = tmp_path / "bands"
        path.mkdir()
        for band, arr in zip(BANDS, image):
            with rasterio.open(path / f"{band}.tif", "w", count=1, **layout, **profile) as dst:
                dst.write(arr, 1)
    scene = pr.Scene(path)
    windows = [(r, c) for r in pr.window_starts(h, 512, 100) for c in pr.window_starts(w, 512, 100)]
    got = list(pr._read_ahead(scene, windows, io_nice=False))
    assert [(r, c) for r, c, _ in got] == windows
    for r, c, data in got:
        np.testing.assert_array_equal(data, image[:, r:r + 512, c:c + 512], err_msg=f"window ({r}, {c})")
    scene.close()


def test_full_scene_is_read_in_strips_once(tmp_path, ensemble, monkeypatch):
    """A 10,980 x 10,980 scene (sparse files: nodata but one chip) is never read whole, each band file is read
    once, in whole-width strips aligned with its 512-row blocks, and memory stays flat."""
    n = 10980
    folder = tmp_path / "big"
    folder.mkdir()
    chip, _ = make_chip(np.random.default_rng(1))
    for band, arr in zip(BANDS, np.maximum(chip, 1)):
        with rasterio.open(folder / f"{band}.tif", "w", driver="GTiff", width=n, height=n, count=1,
                           dtype="uint16", crs=CRS, transform=TRANSFORM, tiled=True, blockxsize=512,
                           blockysize=512, compress="deflate", SPARSE_OK="TRUE") as dst:
            dst.write(arr, 1, window=Window(5000, 5000, 512, 512))  # unwritten tiles read as 0
    reads = []
    real_read = pr.Scene.read_file

    def spy(self, i, row, col, height, width):
        reads.append((i, row, col, height, width))
        return real_read(self, i, row, col, height, width)

    monkeypatch.setattr(pr.Scene, "read_file", spy)
    tracemalloc.start()
    try:
        stats = pr.predict_scene(folder, ensemble, tmp_path / "big.tif", overlap=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.windows == 22 * 22
    strips = [(row, row + height) for i, row, col, height, width in reads if i == 0]
    assert strips == [(r, min(r + 512, n)) for r in range(0, n, 512)]  # every row once, on block boundaries
    assert sorted(reads) == sorted((i, r, 0, b - r, n) for i in range(4) for r, b in strips)
    assert stats.windows - stats.skipped == 4  # the chip at (5000, 5000) straddles 2 x 2 windows
    assert peak < 200e6, f"peak traced memory {peak / 1e6:.0f} MB; a whole band alone is {n * n * 2 / 1e6:.0f} MB"
    with rasterio.open(tmp_path / "big.tif") as src:
        assert (src.width, src.height) == (n, n)
        inner = src.read(1, window=Window(5000, 5000, 512, 512))
        corner = src.read(1, window=Window(0, 0, 512, 512))
    assert set(np.unique(inner)) <= {0, 1} and (corner == 255).all()


# ------------------------------------------------------------------------------------------------ command line

def run_cli(*args: str):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_cli_writes_what_the_library_writes(tmp_path, mosaic, submission_zip, ensemble):
    _, chips = mosaic
    res = run_cli(chips["B"], "--model", submission_zip, "--out", tmp_path / "cli.tif", "--probabilities")
    assert res.exit_code == 0, res.output
    assert "throughput pixels_per_s=" in res.output.strip().splitlines()[-1]
    pr.predict_scene(chips["B"], ensemble, tmp_path / "lib.tif", probabilities=True)
    np.testing.assert_array_equal(read_out(tmp_path / "cli.tif")[0], read_out(tmp_path / "lib.tif")[0])


def _broken_inputs(tmp_path: Path, chip: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    missing = shutil.copytree(chip, tmp_path / "missing")
    (missing / "B08.tif").unlink()
    cases["missing"] = (missing, "missing band file(s) B08.tif")
    grid = shutil.copytree(chip, tmp_path / "grid")
    write_bands(tmp_path / "g", np.ones((4, 256, 256), np.uint16))
    shutil.copyfile(tmp_path / "g" / "B04.tif", grid / "B04.tif")
    cases["grid"] = (grid, "bands are not on one grid: B04.tif is 256x256")
    dtype = shutil.copytree(chip, tmp_path / "dtype")
    write_bands(tmp_path / "f", np.ones((4, 512, 512), np.float32))
    shutil.copyfile(tmp_path / "f" / "B02.tif", dtype / "B02.tif")
    cases["dtype"] = (dtype, "B02.tif: dtype float32, expected uint16")
    junk = shutil.copytree(chip, tmp_path / "junk")
    (junk / "B03.tif").write_bytes(b"not a tiff" * 20)
    cases["unreadable"] = (junk, "B03.tif: unreadable raster")
    return cases


def test_cli_bad_input_one_line_exit_2(tmp_path, mosaic, submission_zip):
    _, chips = mosaic
    for case, (folder, message) in _broken_inputs(tmp_path, chips["A"]).items():
        res = run_cli(folder, "--model", submission_zip, "--out", tmp_path / f"{case}.tif")
        assert res.exit_code == 2, (case, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (case, res.output)
        assert not (tmp_path / f"{case}.tif").exists()


def test_cli_unreadable_model_ref_exit_2(tmp_path, mosaic):
    _, chips = mosaic
    (tmp_path / "junk.zip").write_bytes(b"PK not really a zip")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    for ref, message in ((tmp_path / "nope", "no such submission folder"),
                         (tmp_path / "junk.zip", "not a readable zip file"),
                         (tmp_path / "junk.pt", "not a readable cloudseg checkpoint"),
                         (tmp_path / "empty", "no model checkpoint in assets/")):
        res = run_cli(chips["A"], "--model", ref, "--out", tmp_path / "x.tif")
        assert res.exit_code == 2 and message in res.output, (ref, res.output)


def test_cli_refuses_an_out_that_is_its_input_or_a_folder(tmp_path, mosaic, submission_zip, ensemble):
    """Refused before the model loads (or, for a band file, before anything is written); the input is intact."""
    _, chips = mosaic
    folder = shutil.copytree(chips["A"], tmp_path / "scene")
    with rasterio.open(folder / "B02.tif") as src:
        profile = src.profile | {"count": 4}
    stack = tmp_path / "stack.tif"
    with rasterio.open(stack, "w", **profile) as dst:
        for i, band in enumerate(BANDS, 1):
            with rasterio.open(folder / f"{band}.tif") as src:
                dst.write(src.read(1), i)
    before = {p: p.read_bytes() for p in [stack, *folder.iterdir()]}
    (tmp_path / "outdir").mkdir()
    for inp, out, message in ((stack, stack, f"--out {stack} is the input {stack}: predict would overwrite"),
                              (folder, folder, f"--out {folder} is the input {folder}: predict would overwrite"),
                              (folder, folder / "B08.tif", f"--out {folder / 'B08.tif'} is the input "
                                                          f"{folder / 'B08.tif'}: predict would overwrite"),
                              (stack, tmp_path / "outdir", f"--out {tmp_path / 'outdir'} is an existing folder")):
        res = run_cli(inp, "--model", submission_zip, "--out", out)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and message in errors[0], (out, res.output)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == []
