"""Location-grouped folds: no location on both sides, reproducible by seed, LOLO on request."""

from __future__ import annotations

import pandas as pd
import pytest

from cloudseg.data.splits import exclude_from_training, fold_split, location_folds, read_id_list


def _meta(n=30, n_loc=6):
    return pd.DataFrame({"chip_id": [f"c{i:03d}" for i in range(n)], "location": [f"L{i % n_loc}" for i in range(n)]})


def _loc(meta, ids):
    return set(meta.set_index("chip_id").loc[ids, "location"])


@pytest.mark.parametrize("n_folds", [0, 2, 3, 5])
def test_folds_never_share_a_location(n_folds):
    meta = _meta()
    folds = location_folds(meta, n_folds, seed=1)
    assert len(folds) == (6 if n_folds == 0 else n_folds)
    seen_val = []
    for train, val in folds:
        assert not _loc(meta, train) & _loc(meta, val)
        assert sorted(train + val) == sorted(meta["chip_id"])
        seen_val += val
    assert sorted(seen_val) == sorted(meta["chip_id"])  # each chip validated exactly once


def test_folds_reproducible_by_seed():
    meta = _meta()
    assert location_folds(meta, 3, seed=7) == location_folds(meta, 3, seed=7)
    assignments = {tuple(tuple(v) for _, v in location_folds(meta, 3, seed=s)) for s in range(6)}
    assert len(assignments) > 1  # the seed changes which locations go together


def test_leave_one_location_out_is_sorted_by_location():
    meta = _meta()
    folds = location_folds(meta, 0)
    assert [_loc(meta, val) for _, val in folds] == [{f"L{i}"} for i in range(6)]


def test_errors_name_the_value():
    meta = _meta(n_loc=3)
    with pytest.raises(ValueError, match="only 3 locations"):
        location_folds(meta, 4)
    with pytest.raises(ValueError, match="n_folds=1"):
        location_folds(meta, 1)
    with pytest.raises(ValueError, match="fold=3 is out of range"):
        fold_split(meta, 3, 3)


def test_exclusion_applies_to_training_only(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("# suspects\nc001\n\nc002  # bad label\n")
    excluded = read_id_list(path)
    assert excluded == {"c001", "c002"}
    assert exclude_from_training(["c000", "c001", "c002", "c003"], excluded) == ["c000", "c003"]
    with pytest.raises(ValueError, match="nothing is left"):
        exclude_from_training(["c001"], excluded)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_id_list(tmp_path / "nope.txt")


def test_real_sample_lolo(real_data):
    from cloudseg.data.io import load_metadata

    meta = load_metadata(real_data, "train")
    folds = location_folds(meta, 0)
    assert len(folds) == 6
    assert sorted(len(v) for _, v in folds) == [1, 1, 1, 1, 5, 23]
