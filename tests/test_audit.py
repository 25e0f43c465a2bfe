"""Label audit: ranking by disagreement, precision@k, exclusion file, montage and the CLI on a tiny dataset."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cloudseg import audit
from cloudseg.cli import app
from cloudseg.data.splits import read_id_list


def _probs_and_labels():
    labels = {"a": np.array([[1, 1], [0, 0]]), "b": np.array([[1, 1], [1, 1]]), "c": np.array([[0, 0], [0, 0]])}
    probs = {
        "a": np.array([[0.9, 0.9], [0.1, 0.1]]),  # agrees: |p - t| = 0.1 everywhere
        "b": np.array([[0.0, 0.0], [0.0, 0.4]]),  # label says all cloud, model says none: 0.9 mean
        "c": np.array([[0.6, 0.0], [0.0, 0.0]]),  # one false positive: 0.15 mean
    }
    return probs, labels


def test_disagreement_table_ranks_worst_first_with_hand_values():
    probs, labels = _probs_and_labels()
    t = audit.disagreement_table(probs, labels, 0.5, {"a": "X", "b": "Y", "c": "X"}, suspects={"b"})
    assert list(t["chip_id"]) == ["b", "c", "a"]
    assert list(t["rank"]) == [1, 2, 3]
    row = t.set_index("chip_id")
    assert row.loc["b", "disagreement"] == pytest.approx(0.9)
    assert row.loc["c", "disagreement"] == pytest.approx(0.15)
    assert row.loc["a", "disagreement"] == pytest.approx(0.1)
    assert row.loc["b", "mismatch_fraction"] == pytest.approx(1.0)
    assert row.loc["c", "mismatch_fraction"] == pytest.approx(0.25)
    assert row.loc["a", "jaccard"] == pytest.approx(1.0)
    assert row.loc["b", "jaccard"] == pytest.approx(0.0)
    assert row.loc["c", "pred_cloud_fraction"] == pytest.approx(0.25)
    assert bool(row.loc["b", "suspect"]) and not bool(row.loc["a", "suspect"])
    assert row.loc["c", "location"] == "X"


def test_disagreement_table_skips_chips_without_a_prediction_and_checks_shapes():
    probs, labels = _probs_and_labels()
    del probs["c"]
    assert set(audit.disagreement_table(probs, labels)["chip_id"]) == {"a", "b"}
    with pytest.raises(ValueError, match="chip a"):
        audit.disagreement_table({"a": np.zeros((3, 3))}, labels)
    with pytest.raises(ValueError, match="no chip"):
        audit.disagreement_table({"z": np.zeros((2, 2))}, labels)


def test_precision_at_k():
    ranked = ["s1", "x", "s2", "y", "z"]
    assert audit.precision_at_k(ranked, {"s1", "s2"}, 2) == pytest.approx(0.5)
    assert audit.precision_at_k(ranked, {"s1", "s2"}, 5) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        audit.precision_at_k(ranked, set(), 0)


def test_exclusion_file_round_trips_through_read_id_list(tmp_path):
    path = audit.write_exclusion(["b", "c"], tmp_path / "sub" / "exclude.txt", "worst two")
    assert read_id_list(path) == {"b", "c"}
    assert path.read_text().startswith("# worst two\n")


def test_cli_audit_labels_with_probs_writes_csv_montage_and_exclusions(tiny_data, tmp_path):
    from cloudseg.data.validate import validate_split

    split = validate_split(tiny_data, "train", labels=True, load=True)
    # prediction = label, except chip tr01 gets the inverse: it must rank first
    probs = {c: split.masks[c].astype(np.float32) for c in split.ids}
    probs["tr01"] = 1.0 - probs["tr01"]
    np.savez_compressed(tmp_path / "oof.npz", **probs)
    (tmp_path / "sus.txt").write_text("tr01\ntr03\n")
    out = tmp_path / "audit"
    res = CliRunner().invoke(app, ["audit-labels", "--data", str(tiny_data), "--probs", str(tmp_path / "oof.npz"),
                                   "--out", str(out), "--top", "3", "--exclude-out", str(tmp_path / "ex.txt"),
                                   "--exclude-top", "1", "--suspects", str(tmp_path / "sus.txt")])
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(out / "audit.csv", dtype={"chip_id": str})
    assert table["chip_id"].iloc[0] == "tr01" and len(table) == len(split.ids)
    assert (out / "montage.png").stat().st_size > 1000
    assert read_id_list(tmp_path / "ex.txt") == {"tr01"}
    assert "precision@5=0.40 (base rate 2/6 = 0.33)" in res.output
