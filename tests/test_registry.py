"""MLflow model registry: registering promoted submissions, resolving run ids and models:/ URIs for predict."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cloudseg import tracking
from cloudseg.cli import app
from cloudseg.submission import write_submission, zip_submission
from cloudseg.tracking.models import ModelRefError, register_submission, resolve_model_ref
from tests.data.fixtures import make_dataset
from tests.test_predict import save_tiny_checkpoint


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_promoted(root: Path, name: str, seed: int = 0, threshold: float = 0.45) -> tuple[Path, Path]:
    """A submission folder, zip and MANIFEST.json as promote leaves them (tiny random-weight model)."""
    ckpt = save_tiny_checkpoint(root / f"{name}-{seed}.pt", seed, threshold)
    folder = write_submission(root / name, [ckpt], threshold=threshold, tta="none", batch_size=2)
    manifest = folder / "MANIFEST.json"
    manifest.write_text(json.dumps({"name": name, "runs": [{"run_id": "r" * 32, "value": 0.8}]}))
    return zip_submission(folder, root / f"{name}.zip"), manifest


def training_run(tmp: Path, exp_id: str, kind: str = "train", parent: str | None = None, fold: int = 0,
                 checkpoint: bool = True, seed: int = 0) -> str:
    """A FINISHED run as training leaves it: tags and checkpoint/best.pt."""
    client = MlflowClient()
    tags = {"cloudseg.kind": kind, "cloudseg.fold": str(fold)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    if checkpoint:
        path = save_tiny_checkpoint(tmp / run_id / "best.pt", seed)
        client.log_artifact(run_id, str(path), "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture
def chip(tmp_path) -> Path:
    return make_dataset(tmp_path / "chips", n_chips=1, split="test", labels=False) / "test_features" / "te00"


def test_register_versions_move_the_alias_and_resolve(mlflow_tmp, tmp_path):
    zip1, manifest1 = make_promoted(tmp_path / "p1", "sub", seed=0)
    zip2, manifest2 = make_promoted(tmp_path / "p2", "sub", seed=1)
    tags = {"cloudseg.run_ids": "a,b", "cloudseg.metric": "cv_jaccard", "cloudseg.metric_value": 0.91}
    assert register_submission("sub", zip1, manifest1, tags) == "1"
    assert register_submission("sub", zip2, manifest2, tags) == "2"
    client = MlflowClient()
    champion = client.get_model_version_by_alias("sub", "champion")
    assert str(champion.version) == "2"
    assert champion.tags["cloudseg.zip_sha256"] == sha(zip2) and champion.tags["cloudseg.metric_value"] == "0.91"
    assert champion.tags["cloudseg.run_ids"] == "a,b" and "cloudseg.git_commit" in champion.tags
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(champion.run_id, "submission")) == \
        ["submission/MANIFEST.json", "submission/sub.zip"]
    got = resolve_model_ref("models:/sub@champion", tmp_path / "dl")
    assert got.name == "sub.zip" and sha(got) == sha(zip2)
    assert sha(resolve_model_ref("models:/sub/1", tmp_path / "dl1")) == sha(zip1)
    register_submission("sub", zip1, manifest1, {}, alias="staging")
    assert str(client.get_model_version_by_alias("sub", "staging").version) == "3"
    assert str(client.get_model_version_by_alias("sub", "champion").version) == "2"  # other aliases stay


def test_predict_with_a_registered_model(mlflow_tmp, tmp_path, chip):
    zip_path, manifest = make_promoted(tmp_path / "p", "demo")
    register_submission("demo", zip_path, manifest, {"cloudseg.run_ids": "x"})
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(chip), "--model", "models:/demo@champion", "--out",
                              str(tmp_path / "reg.tif"), "--probabilities"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", str(chip), "--model", str(zip_path), "--out", str(tmp_path / "zip.tif"),
                              "--probabilities"])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "reg.tif") as a, rasterio.open(tmp_path / "zip.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_run_ids_resolve_to_checkpoints_and_cv_to_its_folds(mlflow_tmp, tmp_path, chip):
    exp_id = tracking.setup("t")
    single = training_run(tmp_path, exp_id)
    parent = training_run(tmp_path, exp_id, kind="cv", checkpoint=False)
    folds = [training_run(tmp_path, exp_id, parent=parent, fold=k, seed=k) for k in (1, 0)]
    got = resolve_model_ref(single, tmp_path / "a")
    assert [p.name for p in got] == ["best.pt"] and got[0].is_file()
    got = resolve_model_ref(parent, tmp_path / "b")
    assert [p.parent.name for p in got] == [folds[1], folds[0]]  # fold order, not creation order
    res = CliRunner().invoke(app, ["predict", str(chip), "--model", parent, "--out", str(tmp_path / "cv.tif"),
                                   "--tta", "none"])
    assert res.exit_code == 0, res.output
    assert "models=2" in res.output


def test_unresolvable_refs_are_one_line_errors(mlflow_tmp, tmp_path, chip):
    exp_id = tracking.setup("t")
    bare = training_run(tmp_path, exp_id, checkpoint=False)
    with pytest.raises(ModelRefError, match="no such registered model version"):
        resolve_model_ref("models:/nope@champion", tmp_path)
    with pytest.raises(ModelRefError, match="no such run"):
        resolve_model_ref("0" * 32, tmp_path)
    with pytest.raises(ModelRefError, match="has no checkpoint/best.pt"):
        resolve_model_ref(bare, tmp_path)
    for ref in ("models:/nope@champion", "0" * 32, "not-a-ref"):
        res = CliRunner().invoke(app, ["predict", str(chip), "--model", ref, "--out", str(tmp_path / "x.tif")])
        assert res.exit_code == 2, (ref, res.output)
        assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1, res.output


def test_experiments_are_model_training_with_a_runs_view_showing_the_figures(mlflow_tmp):
    """MLflow 3.17's runs table shows no metric or parameter column by default: every experiment carries a saved
    view named cloudseg (listed under Views, opened with ?viewStateShareKey=cloudseg, applied by make ui's page)
    whose columns are the figures, the recipe and whether a trial was pruned, and a description."""
    from cloudseg.tracking import ui

    exp_id = tracking.setup("viewed")
    client = MlflowClient()
    tags = client.get_experiment(exp_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    saved = json.loads(tags[ui.VIEW_TAG])
    assert saved["name"] == "cloudseg" and saved["createdAt"] > 0
    columns = json.loads(saved["state"])["selectedColumns"]
    assert {"metrics.`best_val_jaccard`", "metrics.`cv_jaccard`", "metrics.`threshold_tuned`", "params.`lr`",
            "tags.`cloudseg.pruned`"} <= set(columns)
    assert ui.view_columns(tags[ui.VIEW_TAG]) == columns and tags[ui.DESCRIPTION_TAG] == ui.DESCRIPTION
    # an experiment of an older cloudseg (the bare view, an older description of cloudseg's) gets the current ones
    # on next use, or when make ui starts (refresh_views); a description of the user's own stays
    client.set_experiment_tag(exp_id, ui.VIEW_TAG, json.dumps({"selectedColumns": ["metrics.`threshold`"]}))
    for tag in (ui.DESCRIPTION_TAG, ui.WROTE_DESCRIPTION_TAG):
        client.set_experiment_tag(exp_id, tag, "cloudseg runs, as an older version put it")
    assert tracking.setup("viewed") == exp_id
    tags = client.get_experiment(exp_id).tags
    assert ui.view_columns(tags[ui.VIEW_TAG]) == columns and tags[ui.DESCRIPTION_TAG] == ui.DESCRIPTION
    written = tags[ui.VIEW_TAG]
    tracking.setup("viewed")  # a current view is not rewritten (its times would change on every run)
    assert client.get_experiment(exp_id).tags[ui.VIEW_TAG] == written
    client.set_experiment_tag(exp_id, ui.VIEW_TAG, json.dumps({"selectedColumns": ["metrics.`threshold`"]}))
    client.set_experiment_tag(exp_id, ui.DESCRIPTION_TAG, "mine")
    other = client.create_experiment("not cloudseg's")
    assert ui.refresh_views(mlflow_tmp) == ["viewed"]
    tags = client.get_experiment(exp_id).tags
    assert ui.view_columns(tags[ui.VIEW_TAG]) == columns and tags[ui.DESCRIPTION_TAG] == "mine"
    assert ui.VIEW_TAG not in client.get_experiment(other).tags  # experiments of other tools are left alone
