"""The competition metric against hand computation, and the official figure on the real sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cloudseg.cli import app
from cloudseg.data.io import write_tif
from cloudseg.metrics import (
    EmptyUnionError,
    JaccardAccumulator,
    ThresholdSweep,
    intersection_union,
    pooled_jaccard,
)


def test_intersection_union_by_hand():
    pred = np.array([[1, 1], [0, 0]])
    lab = np.array([[1, 0], [1, 0]])
    assert intersection_union(pred, lab) == (1, 3)


def test_pooled_is_not_mean_of_chips():
    acc = JaccardAccumulator()
    # chip a: 1/3; chip b: 9/10 -> pooled 10/13, mean of chips would be 0.6167
    acc.add_counts("a", 1, 3)
    acc.add_counts("b", 9, 10)
    assert acc.score() == pytest.approx(10 / 13)
    per = acc.per_chip().set_index("chip_id")["jaccard"]
    assert per["a"] == pytest.approx(1 / 3) and per["b"] == pytest.approx(0.9)


def test_empty_chip_counts_nothing_but_empty_total_raises():
    acc = JaccardAccumulator()
    acc.add("clear", np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(EmptyUnionError, match="total union is 0"):
        acc.score()
    acc.add("x", np.ones((4, 4)), np.eye(4))
    assert acc.score() == pytest.approx(4 / 16)
    assert np.isnan(acc.per_chip().set_index("chip_id").loc["clear", "jaccard"])
    with pytest.raises(EmptyUnionError):
        pooled_jaccard([0], [0])


def test_by_location():
    acc = JaccardAccumulator()
    acc.add_counts("a", 1, 2)
    acc.add_counts("b", 3, 4)
    acc.add_counts("c", 0, 5)
    meta = pd.DataFrame({"chip_id": ["a", "b", "c"], "location": ["X", "X", "Y"]})
    loc = acc.by_location(meta).set_index("location")
    assert loc.loc["X", "jaccard"] == pytest.approx(4 / 6)
    assert loc.loc["Y", "jaccard"] == 0.0
    assert loc.loc["X", "chips"] == 2


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs"):
        intersection_union(np.zeros((2, 2)), np.zeros((2, 3)))


def test_threshold_sweep_matches_direct_computation():
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(3, 32, 32))
    labels = (probs + rng.normal(0, 0.3, probs.shape) > 0.6).astype(np.uint8)
    sweep = ThresholdSweep(bins=100)
    for p, t in zip(probs, labels):
        sweep.update(p, t)
    for thr in (0.2, 0.5, 0.73):
        k = int(round(thr * 100)) - 1
        pred = probs >= thr
        expected = (pred & (labels == 1)).sum() / (pred | (labels == 1)).sum()
        # probabilities are binned at 0.01: compare with the binned prediction
        binned = np.floor(probs * 100) >= round(thr * 100)
        expected_binned = (binned & (labels == 1)).sum() / (binned | (labels == 1)).sum()
        assert sweep.jaccards()[k] == pytest.approx(expected_binned)
        assert abs(expected_binned - expected) < 0.02
    thr, best = sweep.best()
    assert best == pytest.approx(np.nanmax(sweep.jaccards()))
    assert 0 < thr < 1


def _write_preds(folder, arrays):
    for name, arr in arrays.items():
        write_tif(folder / f"{name}.tif", arr.astype(np.uint8), crs=None)


def test_score_command_by_hand(tmp_path):
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    lab_a = np.zeros((512, 512), np.uint8)
    lab_a[:256] = 1  # 131072 cloud pixels
    pred_a = np.zeros((512, 512), np.uint8)
    pred_a[:128] = 1  # intersection 65536, union 131072
    lab_b = np.zeros((512, 512), np.uint8)
    pred_b = np.zeros((512, 512), np.uint8)
    pred_b[:, :64] = 1  # intersection 0, union 32768
    _write_preds(labels, {"a": lab_a, "b": lab_b})
    _write_preds(preds, {"a": pred_a, "b": pred_b})
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"chip_id": ["a", "b"], "location": ["X", "Y"]}).to_csv(meta, index=False)
    result = CliRunner().invoke(app, ["score", str(preds), str(labels), "--by-chip", "--by-location", str(meta)])
    assert result.exit_code == 0, result.output
    expected = 65536 / (131072 + 32768)
    assert result.output.strip().splitlines()[-1] == f"jaccard={expected:.10f}"
    assert "0.500000" in result.output  # chip a's own Jaccard


def _bad_score_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: (score's arguments, what its one error line says), on 2 chips a and b of 16x16."""
    import rasterio
    from affine import Affine

    cases = {}

    def case(name: str, preds: dict, message: str, labels: dict | None = None, extra: tuple = ()) -> Path:
        root = tmp / name
        lab = {"a": np.zeros((16, 16), np.uint8), "b": np.ones((16, 16), np.uint8)}
        for stem, arr in (labels or lab).items():
            write_tif(root / "labels" / f"{stem}.tif", arr, crs=None)
        (root / "preds").mkdir(parents=True)
        for stem, arr in preds.items():
            write_tif(root / "preds" / f"{stem}.tif", arr, crs=None)
        cases[name] = ([str(root / "preds"), str(root / "labels"), *extra], message.format(root=root))
        return root

    ok = {"a": np.zeros((16, 16), np.uint8), "b": np.ones((16, 16), np.uint8)}
    root = case("truncated", ok, "{root}/preds/a.tif: unreadable or truncated TIF")
    (root / "preds" / "a.tif").write_bytes((root / "preds" / "a.tif").read_bytes()[:200])
    case("shape", {**ok, "b": np.ones((8, 16), np.uint8)},
         "{root}/preds/b.tif: shape (8, 16) differs from its label's (16, 16)")
    nan = np.zeros((16, 16), np.float32)
    nan[0, 0] = np.nan
    case("nan", {**ok, "a": nan}, "{root}/preds/a.tif: prediction values [nan] are not 0/1")
    root = case("three_bands", ok, "{root}/preds/b.tif: expected 1 band, found 3")
    with rasterio.open(root / "preds" / "b.tif", "w", driver="GTiff", width=16, height=16, count=3, dtype="uint8",
                       transform=Affine(1, 0, 0, 0, -1, 16)) as dst:
        dst.write(np.ones((3, 16, 16), np.uint8))
    case("missing", {"a": ok["a"]}, "{root}/preds/b.tif: prediction missing")
    case("empty_folder", {}, "{root}/preds/a.tif: prediction missing (and 1 more of 2)")
    root = case("not_a_csv", ok, "{root}/preds/a.tif: not a readable metadata CSV", extra=("--by-location",))
    cases["not_a_csv"][0].append(str(root / "preds" / "a.tif"))
    root = case("csv_without_location", ok, "{root}/meta.csv: no location column", extra=("--by-location",))
    (root / "meta.csv").write_text("chip_id,site\na,X\nb,Y\n")
    cases["csv_without_location"][0].append(str(root / "meta.csv"))
    nodata = np.ones((16, 16), np.uint8)
    nodata[:4] = 255
    root = case("label_nodata", ok, "{root}/labels/b.tif: label values [255] are not 0/1 (255 is the file's nodata",
                labels={"a": np.zeros((16, 16), np.uint8), "b": nodata})
    with rasterio.open(root / "labels" / "b.tif", "r+") as dst:
        dst.nodata = 255
    case("label_values", ok, "{root}/labels/a.tif: label values [2] are not 0/1",
         labels={"a": np.full((16, 16), 2, np.uint8), "b": np.ones((16, 16), np.uint8)})
    return cases


def test_score_bad_input_one_line_naming_the_file_exit_2(tmp_path):
    for name, (args, message) in _bad_score_inputs(tmp_path).items():
        result = CliRunner().invoke(app, ["score", *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (name, result.output)


def test_all_ones_on_real_sample_matches_official_scorer(real_data, tmp_path):
    label_dir = real_data / "train_labels"
    preds = tmp_path / "ones"
    _write_preds(preds, {p.stem: np.ones((512, 512)) for p in label_dir.glob("*.tif")})
    result = CliRunner().invoke(app, ["score", str(preds), str(label_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "jaccard=0.4741057158"
