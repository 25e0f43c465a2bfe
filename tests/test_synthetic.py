"""Synthetic chips: layout and validity, determinism, physical sanity, atomic writes, CLI, previews."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from typer.testing import CliRunner

from cloudseg.cli import app
from cloudseg.data import synthetic
from cloudseg.data.io import BANDS, features_dir, labels_dir, load_metadata, read_chip, read_label
from cloudseg.data.synthetic import ensure_synthetic_default, generate_chip, read_summary, write_synthetic
from cloudseg.data.validate import validate_split
from cloudseg.plots import chip_gallery, false_color, rgb_preview

SMALL = 64  # chip size for most tests: spatial scales follow the size, so small chips look like shrunken ones


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """12 train chips over 3 locations and 5 test chips, 64 x 64."""
    return write_synthetic(
        tmp_path_factory.mktemp("synth") / "data", n=12, seed=3, n_test=5, n_locations=3, size=SMALL
    )


# ------------------------------------------------------------------------------------------------------------
# One chip


def test_chip_shapes_dtypes_and_values():
    bands, label = generate_chip(rng(0), size=128)
    assert bands.shape == (4, 128, 128) and bands.dtype == np.uint16
    assert label.shape == (128, 128) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1}
    assert bands.max() <= synthetic.MAX_DN


def test_full_size_chips_pass_validation(tmp_path):
    out = write_synthetic(tmp_path / "full", n=1, n_test=1, seed=1)  # default size: 512, as the competition's
    assert validate_split(out, "train").ids == list(load_metadata(out, "train")["chip_id"])
    validate_split(out, "test")
    bands, label = generate_chip(rng(1), size=512)
    assert bands.shape == (4, 512, 512) and label.shape == (512, 512)


def test_same_seed_same_bytes_and_different_seed_differs():
    a_bands, a_label = generate_chip(rng(5), size=SMALL)
    b_bands, b_label = generate_chip(rng(5), size=SMALL)
    c_bands, _ = generate_chip(rng(6), size=SMALL)
    assert a_bands.tobytes() == b_bands.tobytes() and a_label.tobytes() == b_label.tobytes()
    assert a_bands.tobytes() != c_bands.tobytes()


def test_cloud_fraction_argument_is_honoured():
    for seed in range(6):
        assert generate_chip(rng(seed), size=SMALL, cloud_fraction=0.0)[1].sum() == 0
        assert generate_chip(rng(seed), size=SMALL, cloud_fraction=1.0)[1].all()
        half = generate_chip(rng(seed), size=128, cloud_fraction=0.5)[1].mean()
        assert 0.3 < half < 0.75, f"seed {seed}: asked for 0.5 cloud, got {half:.2f}"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="cloud_fraction"):
        generate_chip(rng(0), size=SMALL, cloud_fraction=1.5)
    with pytest.raises(ValueError, match="size"):
        generate_chip(rng(0), size=30)
    with pytest.raises(ValueError, match="landscape"):
        generate_chip(rng(0), size=SMALL, landscape="moon")


def test_cloud_fraction_spreads_from_clear_to_overcast():
    fractions = np.array([generate_chip(rng(100 + i), size=SMALL)[1].mean() for i in range(40)])
    assert (fractions == 0).sum() >= 2, "expected some fully clear chips"
    assert (fractions == 1).sum() >= 2, "expected some fully cloudy chips"
    assert ((fractions > 0.05) & (fractions < 0.95)).sum() >= 15, "expected many partly cloudy chips"


def test_labeled_cloud_is_brighter_in_blue_than_clear_ground():
    cloud_sum = clear_sum = cloud_n = clear_n = 0
    for seed in range(8):
        bands, label = generate_chip(rng(200 + seed), size=128, cloud_fraction=0.5)
        blue = bands[0].astype(np.float64)
        cloud_sum, cloud_n = cloud_sum + blue[label == 1].sum(), cloud_n + (label == 1).sum()
        clear_sum, clear_n = clear_sum + blue[label == 0].sum(), clear_n + (label == 0).sum()
    assert cloud_sum / cloud_n > 2 * clear_sum / clear_n


def test_clouds_are_flat_in_spectrum_and_blue_leaning():
    bands, _ = generate_chip(rng(7), size=128, cloud_fraction=1.0)
    mean = bands.reshape(4, -1).astype(np.float64).mean(axis=1)  # B02, B03, B04, B08
    assert mean.min() > 2000  # bright in all four bands
    assert mean[0] >= mean[2]  # slightly higher in blue than red
    assert mean.max() / mean.min() < 1.3  # nearly white


def test_vegetation_is_brighter_in_nir_than_red():
    bands, label = generate_chip(rng(8), size=128, cloud_fraction=0.0, landscape="forest")
    red, nir = bands[2].astype(np.float64), bands[3].astype(np.float64)
    assert label.sum() == 0
    assert nir.mean() > 2.5 * red.mean()


def test_bright_ground_is_not_labeled_cloud():
    bands, label = generate_chip(rng(9), size=128, cloud_fraction=0.0, landscape="saltflat")
    assert label.sum() == 0
    assert (bands[0] > 3000).mean() > 0.05, "a salt-flat scene should hold bright, unlabeled ground"


def test_shadows_darken_the_ground():
    # The same chip stream with and without clouds: ground next to clouds (not under them) gets darker.
    clear, _ = generate_chip(rng(11), size=128, cloud_fraction=0.0)
    cloudy, label = generate_chip(rng(11), size=128, cloud_fraction=0.3)
    darker = (cloudy[3].astype(int) < 0.7 * clear[3]) & (label == 0)
    assert darker.mean() > 0.01


# ------------------------------------------------------------------------------------------------------------
# Writing a dataset


def test_written_splits_pass_validation(small_data):
    train = validate_split(small_data, "train", size=SMALL)
    test = validate_split(small_data, "test", size=SMALL)
    assert len(train.ids) == 12 and len(test.ids) == 5
    assert train.has_labels and test.has_labels
    assert (small_data / synthetic.MARKER).is_file()


def test_metadata_format(small_data):
    for split in ("train", "test"):
        meta = load_metadata(small_data, split)
        assert list(meta.columns) == ["chip_id", "location", "datetime", "cloudpath"]
        assert all(re.fullmatch(r"[a-z]{4}", c) for c in meta["chip_id"])
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d) for d in meta["datetime"])
        assert list(meta["cloudpath"]) == [f"az://./{split}_features/{c}" for c in meta["chip_id"]]
    train, test = load_metadata(small_data, "train"), load_metadata(small_data, "test")
    assert train["location"].nunique() == 3
    assert not set(train["location"]) & set(test["location"]), "test locations must not appear in train"
    assert not set(train["chip_id"]) & set(test["chip_id"])


def test_tifs_are_georeferenced_in_utm(small_data):
    meta = load_metadata(small_data, "train")
    for chip_id, location in zip(meta["chip_id"], meta["location"]):
        with rasterio.open(features_dir(small_data, "train") / chip_id / "B02.tif") as src:
            epsg = src.crs.to_epsg()
            assert 32601 <= epsg <= 32660 or 32701 <= epsg <= 32760
            assert (src.transform.a, src.transform.e) == (10.0, -10.0)
            assert src.dtypes == ("uint16",)
        with rasterio.open(labels_dir(small_data, "train") / f"{chip_id}.tif") as src:
            assert src.crs.to_epsg() == epsg and src.dtypes == ("uint8",)
    # all chips of one location share its zone
    zones = {}
    for chip_id, location in zip(meta["chip_id"], meta["location"]):
        with rasterio.open(features_dir(small_data, "train") / chip_id / "B08.tif") as src:
            zones.setdefault(location, set()).add(src.crs.to_epsg())
    assert all(len(z) == 1 for z in zones.values())


def test_chip_i_does_not_depend_on_n(tmp_path):
    few = write_synthetic(tmp_path / "few", n=2, seed=4, size=SMALL)
    many = write_synthetic(tmp_path / "many", n=5, seed=4, n_test=1, size=SMALL)
    few_ids = list(load_metadata(few, "train")["chip_id"])
    assert list(load_metadata(many, "train")["chip_id"])[:2] == few_ids
    for chip_id in few_ids:
        a = read_chip(features_dir(few, "train") / chip_id)
        b = read_chip(features_dir(many, "train") / chip_id)
        assert a.tobytes() == b.tobytes()
        assert (
            read_label(labels_dir(few, "train") / f"{chip_id}.tif").tobytes()
            == read_label(labels_dir(many, "train") / f"{chip_id}.tif").tobytes()
        )


def test_same_seed_same_dataset_other_seed_differs(tmp_path):
    a = write_synthetic(tmp_path / "a", n=2, seed=9, size=SMALL)
    b = write_synthetic(tmp_path / "b", n=2, seed=9, size=SMALL)
    c = write_synthetic(tmp_path / "c", n=2, seed=10, size=SMALL)
    meta_a = pd.read_csv(a / "train_metadata.csv")
    pd.testing.assert_frame_equal(meta_a, pd.read_csv(b / "train_metadata.csv"))
    for chip_id in meta_a["chip_id"]:
        assert (
            read_chip(features_dir(a, "train") / chip_id).tobytes()
            == read_chip(features_dir(b, "train") / chip_id).tobytes()
        )
    assert list(pd.read_csv(c / "train_metadata.csv")["chip_id"]) != list(meta_a["chip_id"])


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = write_synthetic(tmp_path / "d", n=1, seed=0, size=SMALL)
    first = read_summary(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic(out, n=2, seed=1, size=SMALL)
    assert read_summary(out) == first  # untouched
    write_synthetic(out, n=2, seed=1, size=SMALL, overwrite=True)
    assert read_summary(out)["n"] == 2
    (tmp_path / "empty").mkdir()
    write_synthetic(tmp_path / "empty", n=1, size=SMALL)  # an empty folder is fine
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(task):
        calls.append(task)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(task)

    original = synthetic._write_chip
    monkeypatch.setattr(synthetic, "_write_chip", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic(tmp_path / "out", n=3, size=SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder


def test_process_pool_gives_the_same_chips(tmp_path):
    one = write_synthetic(tmp_path / "one", n=8, seed=2, size=32, workers=1)
    two = write_synthetic(tmp_path / "two", n=8, seed=2, size=32, workers=2)
    for chip_id in load_metadata(one, "train")["chip_id"]:
        for band in BANDS:
            assert (features_dir(one, "train") / chip_id / f"{band}.tif").read_bytes() == (
                features_dir(two, "train") / chip_id / f"{band}.tif"
            ).read_bytes()


def test_ensure_default_generates_once(tmp_path, capsys):
    target = tmp_path / "synthetic"
    assert ensure_synthetic_default(n=2, n_test=2, path=target, size=SMALL) == target
    assert "generating" in capsys.readouterr().out
    validate_split(target, "train", size=SMALL)
    validate_split(target, "test", size=SMALL)
    assert ensure_synthetic_default(n=2, n_test=2, path=target, size=SMALL) == target
    assert capsys.readouterr().out == ""  # complete: nothing regenerated


def test_ensure_default_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        ensure_synthetic_default(n=2, n_test=1, path=tmp_path / "synthetic", size=SMALL)


def test_ensure_default_under_concurrent_callers(tmp_path):
    target = tmp_path / "synthetic"
    results, errors = [], []

    def call():
        try:
            results.append(ensure_synthetic_default(n=3, n_test=2, path=target, size=SMALL))
        except Exception as exc:  # noqa: BLE001 - a thread's exception must reach the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [target] * 3
    assert len(validate_split(target, "train", size=SMALL).ids) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


# ------------------------------------------------------------------------------------------------------------
# Command line and pictures


def test_cli_synth_and_gallery(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--n", "3", "--seed", "1", "--test", "2", "--size", str(SMALL)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert "train: 3 chips" in result.output and "test: 2 chips" in result.output
    assert re.search(r"seconds=\d+\.\d", result.output)
    validate_split(out, "test", size=SMALL)

    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0

    png = tmp_path / "gallery.png"
    result = runner.invoke(
        app, ["gallery", "--data", str(out), "--split", "test", "--n", "2", "--out", str(png)]
    )
    assert result.exit_code == 0, result.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100


def test_rgb_preview_stretch_by_hand():
    image = np.zeros((4, 1, 2), dtype=np.uint16)
    image[2] = [[100, 300]]  # red
    image[1] = [[200, 200]]  # green
    image[0] = [[300, 100]]  # blue
    rgb = rgb_preview(image, percentiles=(0, 100), min_range=0)  # one shared stretch: 100 -> 0, 300 -> 1
    np.testing.assert_allclose(rgb[0, 0], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(rgb[0, 1], [1.0, 0.5, 0.0])
    fixed = rgb_preview(image, value_range=(0, 400))
    np.testing.assert_allclose(fixed[0, 0], [0.25, 0.5, 0.75])
    constant = np.full((4, 3, 3), 7, np.uint16)
    assert np.all(rgb_preview(constant, min_range=0) == 0.5)  # no range at all: grey, no division by zero
    # a nearly uniform chip is stretched over at least min_range (here 0..1500), not blown up to full contrast
    np.testing.assert_allclose(rgb_preview(constant), 7 / 1500)


def test_false_color_puts_nir_in_red():
    image = np.zeros((4, 2, 2), dtype=np.uint16)
    image[3] = 4000  # NIR only
    fc = false_color(image, percentiles=None)
    assert fc[..., 0].min() == 1.0 and fc[..., 1:].max() == 0.0


def test_chip_gallery_writes_png(tmp_path):
    chips = [generate_chip(rng(i), size=SMALL) for i in range(3)]
    path = chip_gallery(
        [c[0] for c in chips], [chips[0][1], None, chips[2][1]], ["a", "b", "c"], tmp_path / "g.png", ncols=2
    )
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="titles"):
        chip_gallery([chips[0][0]], [None], [], tmp_path / "bad.png")
