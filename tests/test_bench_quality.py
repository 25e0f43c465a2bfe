"""experiments/bench_quality.py: pooled counts, the location bootstrap, and an end-to-end run of the baselines."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.fixtures import make_dataset

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "experiments" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(mod)
    return mod


def _counts(bq, name, inter, union):
    c = bq.Counts(name)
    for chip, (i, u) in enumerate(zip(inter, union)):
        c.add(f"c{chip}", i, u)
    return c


def test_counts_pool_intersections_over_unions():
    bq = _bench()
    c = _counts(bq, "m", [1, 0, 3], [2, 0, 4])  # the empty chip adds nothing: (1 + 3) / (2 + 4)
    assert c.score() == pytest.approx(4 / 6)
    assert c.score(["c1"]) != c.score(["c1"])  # nan: no union at all
    c.add_mask("c9", np.array([[1, 1, 0]]), np.array([[1, 0, 0]]))
    assert (c.inter["c9"], c.union["c9"]) == (1, 2)


def test_location_bootstrap_difference_and_degenerate_interval():
    bq = _bench()
    a = _counts(bq, "a", [8, 4], [10, 5])  # 0.8 at both locations
    b = _counts(bq, "b", [5, 2], [10, 4])  # 0.5 at both locations
    locs = {"c0": "L1", "c1": "L2"}
    d, lo, hi = bq.location_bootstrap(a, b, locs, ["c0", "c1"], n=200)
    assert d == pytest.approx(12 / 15 - 7 / 14)
    # every resample pools locations that each score 0.8 vs 0.5: the interval collapses onto 0.3
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)


def test_location_bootstrap_interval_covers_the_spread_of_locations():
    bq = _bench()
    a = _counts(bq, "a", [9, 1], [10, 10])  # 0.9 and 0.1
    b = _counts(bq, "b", [5, 5], [10, 10])  # 0.5 and 0.5
    d, lo, hi = bq.location_bootstrap(a, b, {"c0": "L1", "c1": "L2"}, ["c0", "c1"], n=2000, seed=1)
    assert d == pytest.approx(0.0)
    assert lo == pytest.approx(-0.4) and hi == pytest.approx(0.4)  # both-L2 and both-L1 draws each ~1/4


def test_bench_quality_baselines_only_prints_the_interface_line(tiny_data, mlflow_tmp, tmp_path, capsys):
    bq = _bench()
    rc = bq.main(["--data", str(tiny_data), "--folds", "0", "--skip", "cloudseg,synthetic,ukis", "--threads", "1",
                  "--oof-out", str(tmp_path / "oof.npz"), "--bootstrap", "50"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"cloudseg_all=nan cloudseg_clean=nan ukis_all=nan ukis_clean=nan "
                        r"synthetic_only_all=nan synthetic_only_clean=nan", out[-1])
    table = "\n".join(out)
    assert "all_cloud" in table and "brightness" in table and "recipes tried in development" in table


def test_synthetic_only_model_trains_from_scratch_settings_when_the_recipe_starts_from_ukis(tmp_path):
    """A recipe fine-tuning outside weights gently would learn nothing from scratch: the synthetic-only model takes
    real-scratch.yaml's settings then, the recipe's own otherwise, and --synthetic-config wins over both."""
    from cloudseg.config import apply_overrides, load_config

    bq = _bench()
    recipe = load_config(ROOT / "experiments" / "configs" / "real-best.yaml")
    assert recipe.init_from.startswith("ukis-csmask")
    got = bq.synthetic_config(bq.parse_args(["--set", "batch_size=3"]), recipe)
    scratch = load_config(bq.SYNTHETIC_CONFIG)
    assert (got.encoder, got.lr, got.epochs) == (scratch.encoder, scratch.lr, scratch.epochs) != (
        recipe.encoder, recipe.lr, recipe.epochs)
    assert got.batch_size == 3  # --set applies to it too
    plain = apply_overrides(recipe, {"init_from": ""}, "test")
    assert bq.synthetic_config(bq.parse_args([]), plain) is plain
    own = tmp_path / "syn.yaml"
    own.write_text("encoder: resnet18\nepochs: 1\n")
    chosen = bq.synthetic_config(bq.parse_args(["--synthetic-config", str(own)]), recipe)
    assert (chosen.encoder, chosen.epochs) == ("resnet18", 1)


@pytest.mark.slow
def test_bench_quality_trains_the_recipe_out_of_fold(tiny_data, mlflow_tmp, tmp_path, capsys, monkeypatch):
    """Each fold's model trains on other locations than the chips it predicts, every chip is predicted by exactly
    one fold, and the printed figure pools those out-of-fold predictions."""
    import pandas as pd

    from cloudseg.data.io import read_band

    bq = _bench()
    folds = []
    train_model = bq.train_model

    def spy(cfg, split, train_ids, val_ids, kind, *args, **kwargs):
        if kind == "bench-recipe":
            folds.append((list(train_ids), list(val_ids)))
        return train_model(cfg, split, train_ids, val_ids, kind, *args, **kwargs)

    monkeypatch.setattr(bq, "train_model", spy)
    rc = bq.main(["--data", str(tiny_data), "--folds", "0", "--skip", "synthetic,ukis", "--threads", "1",
                  "--set", "epochs=1", "--set", "crop_size=64", "--set", "batch_size=2", "--set", "steps_per_epoch=1",
                  "--set", "val_batch_size=2", "--set", "init_from=", "--oof-out", str(tmp_path / "oof.npz"),
                  "--bootstrap", "50"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"cloudseg_all=(\S+) cloudseg_clean=(\S+) ukis_all=nan ukis_clean=nan "
                     r"synthetic_only_all=nan synthetic_only_clean=nan", last)
    assert m and 0.0 <= float(m.group(1)) <= 1.0
    meta = pd.read_csv(tiny_data / "train_metadata.csv", dtype=str)
    location = dict(zip(meta["chip_id"], meta["location"]))
    assert len(folds) == 3  # tiny_data: 3 locations, one held out per fold
    for train_ids, val_ids in folds:
        assert train_ids and val_ids and not {location[c] for c in train_ids} & {location[c] for c in val_ids}
    assert sorted(c for _, val in folds for c in val) == sorted(location)  # each chip predicted once
    inter = union = 0
    with np.load(tmp_path / "oof.npz") as z:
        assert sorted(z.files) == sorted(location) and z[z.files[0]].shape == (512, 512)
        for chip in z.files:  # the recipe's threshold (0.5) on the out-of-fold probabilities
            pred, label = z[chip] >= 0.5, read_band(tiny_data / "train_labels" / f"{chip}.tif") == 1
            inter, union = inter + int((pred & label).sum()), union + int((pred | label).sum())
    assert float(m.group(1)) == pytest.approx(inter / union, abs=5e-4)


@pytest.mark.slow
def test_a_recipe_pretraining_is_the_synthetic_model_and_seeds_every_fold(tiny_data, mlflow_tmp, tmp_path, capsys,
                                                                           monkeypatch):
    from mlflow.tracking import MlflowClient

    from cloudseg import training

    pre = tmp_path / "pre.yaml"
    pre.write_text(f"experiment: pre\ndata: {tiny_data}\nencoder: resnet18\nepochs: 1\nbatch_size: 2\n"
                   "crop_size: 64\nn_folds: 3\nval_batch_size: 2\nplot_chips: 1\nsteps_per_epoch: 1\n")
    loaded = []
    real_load = training.load_init_weights
    monkeypatch.setattr(training, "load_init_weights",
                        lambda m, a, c, p: (loaded.append(Path(p)), real_load(m, a, c, p)))
    bq = _bench()
    rc = bq.main(["--data", str(tiny_data), "--folds", "0", "--skip", "ukis", "--threads", "1",
                  "--set", "epochs=1", "--set", "crop_size=64", "--set", "batch_size=2", "--set", "steps_per_epoch=1",
                  "--set", "val_batch_size=2", "--set", "encoder=resnet18", "--set", "mix_synthetic=0",
                  "--set", f"init_from={pre}", "--bootstrap", "50"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"cloudseg_all=0\.\d+ cloudseg_clean=\S+ ukis_all=nan ukis_clean=nan "
                        r"synthetic_only_all=0\.\d+ synthetic_only_clean=\S+", last), last
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("bench-quality").experiment_id])
    syn = [r for r in runs if r.data.tags["cloudseg.kind"] == "bench-synthetic"]
    folds = [r for r in runs if r.data.tags["cloudseg.kind"] == "bench-recipe"]
    assert len(syn) == 1 and len(folds) == 3  # tiny_data: 3 locations
    assert syn[0].data.params["epochs"] == "1" and syn[0].data.params["steps_per_epoch"] == "1"
    assert syn[0].info.start_time < min(r.info.start_time for r in folds)
    # every fold started from the synthetic model's checkpoint, and nothing went to the config's own experiment
    assert len(loaded) == 3 and len(set(loaded)) == 1 and loaded[0].name == "best.pt"
    assert syn[0].info.run_id in str(loaded[0])
    assert client.get_experiment_by_name("pre") is None


def test_merge_splits_prefixes_extra_chips_and_shares_arrays(tiny_data):
    from cloudseg.data.mixing import merge_splits
    from cloudseg.data.validate import validate_split

    base = validate_split(tiny_data, "train", labels=True, load=True)
    merged, new = merge_splits(base, base, n_extra=2, prefix="syn_", seed=0)
    assert len(new) == 2 and all(c.startswith("syn_") for c in new)
    assert merged.ids == base.ids + new
    assert merged.images[new[0]] is base.images[new[0][4:]]  # shared, not copied
    assert merged.metadata.loc[new[0], "location"].startswith("syn_")
    with pytest.raises(ValueError, match="n_extra"):
        merge_splits(base, base, n_extra=99)


def test_mixed_chips_train_in_every_fold_and_never_validate(tiny_data, tmp_path, monkeypatch):
    """``mix_synthetic``: merged-in chips join each fold's training side; folds are made over the real chips."""
    from cloudseg import paths
    from cloudseg.config import Config, apply_overrides
    from cloudseg.data.splits import location_folds
    from cloudseg.data.synthetic import MARKER
    from cloudseg.data.sources import fold_ids, load_split, own_metadata

    syn = make_dataset(tmp_path / "syn", n_chips=4, locations=("SynA", "SynB"), seed=5)
    (syn / MARKER).touch()  # a finished synthetic default, as far as resolve_data("synthetic") is concerned
    monkeypatch.setattr(paths, "SYNTHETIC_DIR", syn)
    cfg = apply_overrides(Config(), {"data": str(tiny_data), "n_folds": 0, "mix_synthetic": 3}, "test")
    root, split = load_split(cfg)
    assert len(split.mixed_ids) == 3 and all(c.startswith("syn_") for c in split.mixed_ids)
    assert split.own_ids == split.ids[:6] and not any(c.startswith("syn_") for c in split.own_ids)
    folds = location_folds(own_metadata(split), 0, 0)
    assert len(folds) == 3  # the three real locations; synthetic ones never become a fold
    for k in range(len(folds)):
        train, val = fold_ids(apply_overrides(cfg, {"fold": k}, "test"), split, k)
        assert set(split.mixed_ids) <= set(train)
        assert not set(split.mixed_ids) & set(val) and val
    with pytest.raises(ValueError, match="mix_synthetic=9"):
        load_split(apply_overrides(cfg, {"mix_synthetic": 9}, "test"))
