"""Figures of cloudseg.plots and the notebook helpers of cloudseg.analysis on tiny hand-made arrays."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch

from cloudseg import analysis, plots
from cloudseg.metrics import ThresholdSweep
from cloudseg.paths import REPO_ROOT


def _chip(values: list[list[int]]) -> np.ndarray:
    """A (4, 1, N) chip from one [B02, B03, B04, B08] list per pixel."""
    return np.array(values, dtype=np.uint16).T[:, None, :]


# ------------------------------------------------------------------------------------------ band histograms


def test_band_histograms_counts_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(1, 12_000, (4, 5, 6)).astype(np.uint16) for _ in range(2)]
    masks = [rng.integers(0, 2, (5, 6)).astype(np.uint8) for _ in range(2)]
    images[0][:, 0, 0] = 0  # a no-data pixel: left out of both classes
    masks[0][0, 0] = 1
    fig = plots.band_histograms(images, masks, bins=10, max_reflectance=1.0, share=False,
                                path=tmp_path / "sub" / "h.png")
    assert isinstance(fig, Figure) and (tmp_path / "sub" / "h.png").is_file()
    assert [ax.get_title() for ax in fig.axes] == ["B02", "B03", "B04", "B08"]
    edges = np.linspace(0, 1, 11)
    for b, ax in enumerate(fig.axes):
        steps = [p for p in ax.patches if isinstance(p, StepPatch)]
        assert len(steps) == 2  # clear, cloud
        for step, cloud in zip(steps, (False, True)):
            vals = np.concatenate([
                img[b][(m.astype(bool) == cloud) & np.any(img > 0, axis=0)] for img, m in zip(images, masks)
            ]) / 10_000
            expected = np.histogram(np.minimum(vals, 1.0), bins=edges)[0]  # > 1.0 lands in the last bin
            values, got_edges, _ = step.get_data()
            np.testing.assert_array_equal(values, expected)
            np.testing.assert_allclose(got_edges, edges)
        assert sum(steps[1].get_data()[0]) == sum(int(m.sum()) for m in masks) - 1  # minus the no-data pixel


def test_band_histograms_shares_sum_to_one_per_class():
    image = _chip([[100, 200, 300, 400], [5000, 5000, 5000, 5000], [6000, 6000, 6000, 6000]])
    mask = np.array([[0, 1, 1]], dtype=np.uint8)
    fig = plots.band_histograms([image], [mask], bins=4)
    for ax in fig.axes:
        clear, cloud = (p.get_data()[0] for p in ax.patches if isinstance(p, StepPatch))
        assert clear.sum() == pytest.approx(1.0) and cloud.sum() == pytest.approx(1.0)
    # B02 of the clear pixel is 0.01 reflectance: bin 0 of [0, 0.25, 0.5, 0.75, 1]; cloud 0.5 and 0.6: bin 2
    clear, cloud = (p.get_data()[0] for p in fig.axes[0].patches if isinstance(p, StepPatch))
    np.testing.assert_allclose(clear, [1, 0, 0, 0])
    np.testing.assert_allclose(cloud, [0, 0, 1, 0])


def test_band_histograms_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 images and 1 masks"):
        plots.band_histograms([np.zeros((4, 2, 2))] * 2, [np.zeros((2, 2))])


# ------------------------------------------------------------------------------------------ cloud fractions


def test_cloud_fraction_distribution_counts_and_title():
    fractions = [0.0, 0.0, 0.05, 0.5, 1.0]
    fig = plots.cloud_fraction_distribution(fractions, bins=10)
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_array_equal(heights, np.histogram(fractions, bins=np.linspace(0, 1, 11))[0])
    assert heights == [3, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # 1.0 falls in the last bin
    assert "5 chips: mean 0.31, median 0.05, 2 clear (0), 1 fully cloudy (1)" == ax.get_title()


def test_cloud_fraction_distribution_stacks_groups():
    fig = plots.cloud_fraction_distribution([0.1, 0.15, 0.9], bins=2, groups=["b", "a", "b"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    a, b = ax.containers
    assert [p.get_height() for p in a] == [1, 0]
    assert [p.get_height() for p in b] == [1, 1]  # stacked: drawn on top of group a
    assert [p.get_y() for p in b] == [1, 0]
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        plots.cloud_fraction_distribution([0.2, 1.5])


# ------------------------------------------------------------------------------------------ jaccard/threshold


def test_jaccard_vs_threshold_from_a_sweep():
    sweep = ThresholdSweep(bins=10)
    sweep.update(np.array([0.25, 0.65, 0.95]), np.array([0, 1, 1]))
    fig = plots.jaccard_vs_threshold(sweep, chosen=0.5)
    (ax,) = fig.axes
    curve, best = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(curve.get_xdata(), np.arange(1, 10) / 10)
    # t <= 0.2: all three predicted, J = 2/3; 0.3..0.6: J = 1; 0.7..0.9: only 0.95, J = 1/2
    np.testing.assert_allclose(curve.get_ydata(), [2 / 3, 2 / 3, 1, 1, 1, 1, 0.5, 0.5, 0.5])
    assert best.get_xdata()[0] == pytest.approx(0.3) and best.get_ydata()[0] == 1.0
    chosen = ax.lines[2]
    assert list(chosen.get_xdata()) == [0.5, 0.5]
    assert "chosen 0.50 (1.0000)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_jaccard_vs_threshold_from_arrays_and_undefined():
    fig = plots.jaccard_vs_threshold([0.1, 0.2, 0.3], [0.4, 0.7, 0.6])
    assert fig.axes[0].lines[1].get_xdata()[0] == 0.2
    fig = plots.jaccard_vs_threshold([0.1, 0.2], [np.nan, np.nan])
    assert len(fig.axes[0].lines) == 1 and "undefined" in fig.axes[0].texts[0].get_text()
    with pytest.raises(ValueError, match="thresholds and jaccards"):
        plots.jaccard_vs_threshold([0.1, 0.2])


# ----------------------------------------------------------------------------------------- runs and params


def _runs() -> pd.DataFrame:
    return pd.DataFrame({
        "run_id": ["a", "b", "c", "d"],
        "metrics.best_val_jaccard": [0.5, 0.7, 0.6, np.nan],
        "params.lr": ["0.001", "0.01", "0.1", "0.05"],  # MLflow params are strings
        "params.loss": ["bce", "dice", "bce", "bce"],
        "params.epochs": ["2", "2", "3", "3"],
        "params.seed": ["0", "0", "0", "0"],
    })


def test_metric_vs_params_one_panel_per_param():
    fig = plots.metric_vs_params(_runs(), "best_val_jaccard", ["lr", "loss"], ncols=3)
    assert len(fig.axes) == 2  # the third panel of the row is removed
    lr_ax, loss_ax = fig.axes
    (points,) = lr_ax.collections
    # the run without the metric is dropped
    np.testing.assert_allclose(points.get_offsets(), [[0.001, 0.5], [0.01, 0.7], [0.1, 0.6]])
    assert lr_ax.get_xscale() == "log"  # 0.001..0.1 spans more than 20x
    np.testing.assert_allclose(loss_ax.collections[0].get_offsets(), [[0, 0.5], [1, 0.7], [0, 0.6]])
    assert [t.get_text() for t in loss_ax.get_xticklabels()] == ["bce", "dice"]
    fig = plots.metric_vs_params(_runs(), "metrics.best_val_jaccard", ["lr", "loss", "epochs", "seed"])
    assert len(fig.axes) == 4 and fig.axes[2].get_xscale() == "linear"
    with pytest.raises(KeyError, match="'nope'"):
        plots.metric_vs_params(_runs(), "best_val_jaccard", ["nope"])


def test_learning_curves_several_runs_on_one_axes():
    curves = {
        "run a": pd.DataFrame({"step": [2, 1], "train_loss": [0.5, 0.9], "val_jaccard": [0.6, 0.3]}),
        "run b": [{"epoch": 1, "train_loss": 0.8}, {"epoch": 2, "train_loss": 0.4}],  # no val_jaccard
    }
    fig = plots.learning_curves(curves)
    loss_ax, jac_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["run a", "run b"]
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 2])  # sorted by step
    np.testing.assert_array_equal(loss_ax.lines[0].get_ydata(), [0.9, 0.5])
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), [0.8, 0.4])
    assert [line.get_label() for line in jac_ax.lines] == ["run a"]
    assert jac_ax.get_ylabel() == "val_jaccard"


def test_per_location_bars_sorted_with_nan_noted(tmp_path):
    fig = plots.per_location_bars({"A": 0.5, "B": np.nan, "C": 0.2}, annotations={"A": "3 chips"},
                                  path=tmp_path / "loc.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["C", "A", "B"]
    assert [p.get_height() for p in ax.containers[0]] == [0.2, 0.5, 0.0]
    assert sorted(t.get_text() for t in ax.texts) == ["3 chips", "n/a"]
    assert (tmp_path / "loc.png").is_file()
    fig = plots.per_location_bars(pd.Series({"x": 3.0, "y": 1.0}), sort=False)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["x", "y"]


# ------------------------------------------------------------------------------------------ chips and labels


def test_chip_figures_have_a_panel_per_chip(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 5000, (4, 8, 8)).astype(np.uint16) for _ in range(3)]
    labels = [np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8), np.eye(8, dtype=np.uint8)]
    labels[0][:2, :] = 1  # 25 % cloud
    fig = plots.label_pairs(images[:2], labels[:2], ["a", "b"])
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[2::3]] == ["label: 25.0% cloud", "label: 100.0% cloud"]
    assert len(plots.gallery_figure(images, labels, ["a", "b", "c"], ncols=2).axes) == 4  # 2x2 grid
    path = plots.chip_gallery(images, labels, ["a", "b", "c"], tmp_path / "g.png", ncols=2)
    assert path == tmp_path / "g.png" and path.stat().st_size > 0
    probs = [lab.astype(float) for lab in labels[:2]]
    fig = plots.overlays_figure(images[:2], labels[:2], probs, 0.5, ["a", "b"])
    assert len(fig.axes) == 6 and fig.axes[2].get_title() == "prediction @ 0.50: J=1.000"
    with pytest.raises(ValueError, match="need as many of each"):
        plots.label_pairs(images, labels[:1], ["a"])


# --------------------------------------------------------------------------------------- analysis helpers


def test_band_statistics_exact_quantiles():
    rng = np.random.default_rng(2)
    images = [rng.integers(1, 9000, (4, 6, 7)).astype(np.uint16) for _ in range(2)]
    masks = [rng.integers(0, 2, (6, 7)).astype(np.uint8) for _ in range(2)]
    images[1][:, 0, :] = 0  # no-data row
    stats = analysis.band_statistics(images, masks).set_index(["band", "class"])
    for b, band in enumerate(("B02", "B03", "B04", "B08")):
        for cls, cloud in (("cloud", True), ("clear", False)):
            v = np.concatenate([img[b][(m.astype(bool) == cloud) & np.any(img > 0, axis=0)]
                                for img, m in zip(images, masks)]).astype(float)
            row = stats.loc[(band, cls)]
            assert row["pixels"] == v.size
            assert row["mean"] == pytest.approx(v.mean() / 1e4)
            for col, q in (("p05", 5), ("median", 50), ("p95", 95)):
                assert row[col] == pytest.approx(np.percentile(v, q, method="inverted_cdf") / 1e4)


def test_band_statistics_empty_class_is_nan():
    stats = analysis.band_statistics([_chip([[100, 100, 100, 100]])], [np.zeros((1, 1), np.uint8)])
    assert stats.loc[stats["class"] == "cloud", "pixels"].eq(0).all()
    assert stats.loc[stats["class"] == "cloud", "median"].isna().all()


def test_classify_false_positives_by_hand():
    image = _chip([
        [400, 500, 600, 300],  # NIR below red and dark: water
        [2500, 2800, 3200, 3400],  # bright, red above blue: bright ground
        [3000, 2900, 2700, 2800],  # bright but bluish: haze/other
        [400, 700, 600, 2800],  # dark vegetation: haze/other
        [6000, 6000, 6000, 6000],  # true positive: not a false positive
        [400, 500, 600, 300],  # water-like but not predicted: not a false positive
    ])
    pred = np.array([[1, 1, 1, 1, 1, 0]])
    label = np.array([[0, 0, 0, 0, 1, 0]])
    assert analysis.classify_false_positives(image, pred, label) == {"bright ground": 1, "water": 1,
                                                                     "haze/other": 2}
    table = analysis.false_positive_table({"x": image}, {"x": pred}, {"x": label})
    assert table.loc["x"].to_dict() == {"bright ground": 1, "water": 1, "haze/other": 2, "fp": 4}
    with pytest.raises(ValueError, match="do not match"):
        analysis.classify_false_positives(image, pred[:, :3], label)


def test_label_consistency_by_hand():
    image = _chip([[500, 500, 500, 500], [6000, 6000, 6000, 6000], [3500, 3400, 3300, 3000], [0, 0, 0, 0]])
    mask = np.array([[1, 1, 0, 1]])  # dark pixel labeled cloud; the no-data pixel is ignored
    assert analysis.label_consistency(image, mask) == {"cloud_but_dark": 0.5, "clear_but_bright": 1.0}
    out = analysis.label_consistency(image, np.zeros((1, 4)))
    assert np.isnan(out["cloud_but_dark"])
    assert out["clear_but_bright"] == pytest.approx(2 / 3)  # 6000 and 3300 of 500, 6000, 3300


def test_worst_chips_rank_by_error_pixels():
    per_chip = pd.DataFrame({"chip_id": ["a", "b", "c", "d"], "intersection": [0, 900, 50, 0],
                             "union": [10, 1000, 60, 0]})
    worst = analysis.worst_chips(per_chip, 2)
    assert list(worst["chip_id"]) == ["b", "a"]  # b has J=0.9 but costs 100 pixels; a (J=0) costs 10
    assert list(worst["errors"]) == [100, 10]


def test_small_helpers():
    assert analysis.sample_ids(list("abcdef"), 10) == list("abcdef")
    picked = analysis.sample_ids(list("abcdef"), 3, seed=1)
    assert len(picked) == 3 and picked == sorted(picked)
    assert picked == analysis.sample_ids(list("abcdef"), 3, seed=1)
    frac = analysis.cloud_fractions({"a": np.array([[1, 0], [0, 0]]), "b": np.ones((2, 2))})
    assert frac.to_dict() == {"a": 0.25, "b": 1.0}
    values = pd.Series({"a": 0.9, "b": 0.0, "c": 0.5, "d": 0.2, "e": 1.0})
    assert analysis.spread_ids(values, 3) == ["b", "c", "e"]
    meta = pd.DataFrame({"location": ["X", "X", "Y"], "datetime": ["2020-01-01T10:00Z", "2020-02-01T10:00Z",
                                                                    "2020-01-01T09:00Z"]})
    table = analysis.chips_per_location_date(meta)
    assert table.loc["X"].to_dict() == {"2020-01-01": 1, "2020-02-01": 1, "total": 2}
    assert list(table.index) == ["X", "Y"]
    assert analysis.varying_params(_runs()) == ["epochs", "loss", "lr"]


def test_suspect_ids(tmp_path):
    assert analysis.suspect_ids(tmp_path) is None
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "suspect_label_ids.txt").write_text("abcd\n# comment\nefgh\n")
    assert analysis.suspect_ids(tmp_path) == {"abcd", "efgh"}


class _FakeClient:
    """The three MlflowClient calls resolve_experiment makes, over runs given as (experiment, kind, start)."""

    def __init__(self, runs: list[tuple[str, str, int]]):
        self.names = sorted({e for e, _, _ in runs} | {"Default"})
        self.runs = runs

    def search_experiments(self):
        return [SimpleNamespace(experiment_id=n, name=n) for n in self.names]

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id=name, name=name) if name in self.names else None

    def search_runs(self, ids, filter_string, order_by, max_results):
        assert filter_string == "attributes.status = 'FINISHED'"
        assert order_by == ["attributes.start_time DESC"]
        rows = sorted((r for r in self.runs if r[0] in ids), key=lambda r: -r[2])
        return [SimpleNamespace(info=SimpleNamespace(start_time=t),
                                data=SimpleNamespace(tags={"cloudseg.kind": k})) for _, k, t in rows]


def test_resolve_experiment():
    client = _FakeClient([("cloudseg", "train", 10), ("demo", "trial", 30), ("demo", "sweep", 40),
                          ("cv", "cv", 50)])
    # the newest train or trial run decides; sweep parents and cv runs do not count
    assert analysis.resolve_experiment(client, None).name == "demo"
    assert analysis.resolve_experiment(client, "cloudseg").name == "cloudseg"
    with pytest.raises(ValueError, match=r"no experiment 'nope' in this MLflow store; it has \['Default'"):
        analysis.resolve_experiment(client, "nope")
    with pytest.raises(ValueError, match="run `make demo`"):
        analysis.resolve_experiment(_FakeClient([("x", "sweep", 1)]), None)


def test_data_root(tmp_path, monkeypatch):
    (tmp_path / "train_metadata.csv").write_text("chip_id,location,datetime,cloudpath\n")
    monkeypatch.setenv("CLOUDSEG_REAL_DATA", str(tmp_path))
    assert analysis.data_root("real") == tmp_path.resolve()
    assert analysis.data_root(str(tmp_path)) == tmp_path.resolve()
    assert analysis.data_root("tests/data") == (REPO_ROOT / "tests" / "data").resolve()  # repository-relative
    with pytest.raises(FileNotFoundError, match="data folder nope-nope does not exist"):
        analysis.data_root("nope-nope")
    monkeypatch.setenv("CLOUDSEG_REAL_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="real sample not found"):
        analysis.data_root("real")


def test_renamed_metrics_read_under_either_name():
    """Runs logged before the renames hold metrics lr and threshold; cloudseg reads them as lr_now and
    threshold_tuned, and a run that has the new name is read by it."""
    assert analysis.run_metric({"threshold": 0.4}, "threshold_tuned") == 0.4
    assert analysis.run_metric({"threshold_tuned": 0.6, "threshold": 0.4}, "threshold_tuned") == 0.6
    assert analysis.run_metric({"lr": 1e-3}, "lr_now") == 1e-3
    assert analysis.run_metric({"best_val_jaccard": 0.5}, "threshold_tuned") is None
    runs = pd.DataFrame({"metrics.threshold_tuned": [0.6, np.nan], "metrics.threshold": [np.nan, 0.4]})
    assert analysis.metric_column(runs, "threshold_tuned").tolist() == [0.6, 0.4]
    old_only = pd.DataFrame({"metrics.threshold": [0.4]})
    col = analysis.metric_column(old_only, "threshold_tuned")
    assert col.name == "metrics.threshold_tuned" and col.tolist() == [0.4]
    assert analysis.metric_column(pd.DataFrame({"metrics.x": [1.0]}), "threshold_tuned") is None
