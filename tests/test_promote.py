"""experiments/promote.py: selection (best, top-k, explicit, cv), refusals, and the submission's layout."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
import segmentation_models_pytorch as smp
from mlflow.tracking import MlflowClient

from cloudseg import tracking
from cloudseg.checkpoint import make_checkpoint, save_checkpoint
from cloudseg.config import Config, apply_overrides
from cloudseg.data.transforms import Normalization
from cloudseg.models import model_args
from cloudseg.paths import REPO_ROOT
from cloudseg.tracking.runs import start_run

from cloudseg.tracking import promote


def fake_run(tmp: Path, value: float | None, *, kind="train", status="FINISHED", arch="Unet", encoder="resnet18",
             checkpoint=True, tags=None, metric="best_val_jaccard", parent=None, threshold=0.4,
             cfg_over=None) -> str:
    """An MLflow run as training leaves it, with a tiny real checkpoint (random weights)."""
    cfg = apply_overrides(Config(), {"experiment": "promo", "arch": arch, "encoder": encoder, **(cfg_over or {})},
                          "test")
    run_id = start_run(cfg, kind, tags, parent)
    client = MlflowClient()
    if value is not None:
        client.log_metric(run_id, metric, value)
    if checkpoint:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=4, classes=1)
        ckpt = make_checkpoint(model, model_args(arch, encoder), Normalization().to_dict(), threshold,
                               cfg.to_dict(), 1, {"best_val_jaccard": value})
        path = save_checkpoint(ckpt, tmp / run_id / "best.pt")
        client.log_artifact(run_id, str(path), "checkpoint")
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture
def store(mlflow_tmp, tmp_path, monkeypatch):
    tracking.setup("promo")
    out = tmp_path / "submissions"
    monkeypatch.setattr(promote, "SUBMISSIONS_DIR", out)
    real_write = promote.write_submission
    monkeypatch.setattr(promote, "write_submission", lambda *a, **k: real_write(*a, **k, out_root=out))
    return tmp_path


def test_picks_best_finished_run_and_writes_layout(store, capsys):
    a = fake_run(store, 0.60)
    b = fake_run(store, 0.80)
    fake_run(store, 0.95, status="FAILED")  # better but not FINISHED: ignored
    fake_run(store, 0.99, checkpoint=False)  # better but no checkpoint: ignored
    assert promote.main(["--experiment", "promo", "--name", "sub"]) == 0
    out = capsys.readouterr().out
    assert f"promoted run {b}" in out and a not in out
    folder = store / "submissions" / "sub"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [b]
    assert manifest["runs"][0]["value"] == pytest.approx(0.80)
    inference = json.loads((folder / "assets" / "inference.json").read_text())
    assert inference["models"] == ["assets/model_0.pt"] and inference["threshold"] == pytest.approx(0.4)
    assert (folder / "main.py").read_text() == promote.MAIN_TEMPLATE.read_text()
    for rel, digest in manifest["sha256"].items():
        assert promote.sha256(folder / rel) == digest
    with zipfile.ZipFile(store / "submissions" / "sub.zip") as zf:
        names = zf.namelist()
    assert "main.py" in names and "assets/model_0.pt" in names and "MANIFEST.json" in names
    assert all(not n.startswith("/") and ".." not in n and "__pycache__" not in n for n in names)


def test_top_k_ensemble(store, capsys):
    runs = [fake_run(store, v, threshold=t) for v, t in ((0.5, 0.3), (0.7, 0.5), (0.6, 0.7))]
    assert promote.main(["--experiment", "promo", "--top-k", "2", "--name", "ens"]) == 0
    manifest = json.loads((store / "submissions" / "ens" / "MANIFEST.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [runs[1], runs[2]]
    inference = manifest["inference"]
    assert inference["models"] == ["assets/model_0.pt", "assets/model_1.pt"]
    assert inference["threshold"] == pytest.approx(0.6)  # mean of the members' stored thresholds


def test_study_filter_and_explicit_ids(store, capsys):
    sweep_parent = fake_run(store, None, kind="sweep", checkpoint=False, tags={"cloudseg.study": "s1"})
    t1 = fake_run(store, 0.7, kind="trial", tags={"cloudseg.study": "s1", "cloudseg.trial": "0"}, parent=sweep_parent)
    fake_run(store, 0.9, kind="trial", tags={"cloudseg.study": "other", "cloudseg.trial": "0"})
    assert promote.main(["--study", "s1", "--name", "s"]) == 0
    assert f"promoted run {t1}" in capsys.readouterr().out
    low = fake_run(store, 0.1)
    assert promote.main(["--run-id", low, "--name", "explicit"]) == 0
    assert f"promoted run {low}" in capsys.readouterr().out


def test_cv_run_promotes_its_folds(store, capsys):
    parent = fake_run(store, 0.77, kind="cv", checkpoint=False, metric="cv_jaccard")
    folds = [fake_run(store, 0.5, parent=parent, tags={"cloudseg.fold": str(k)}) for k in range(3)]
    assert promote.main(["--experiment", "promo", "--metric", "cv_jaccard", "--name", "cv"]) == 0
    manifest = json.loads((store / "submissions" / "cv" / "MANIFEST.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == folds
    assert len(manifest["inference"]["models"]) == 3


def test_refusals(store, capsys):
    assert promote.main(["--experiment", "promo"]) == 2
    assert "no FINISHED run with metric 'best_val_jaccard'" in capsys.readouterr().err
    no_ckpt = fake_run(store, 0.9, checkpoint=False)
    assert promote.main(["--experiment", "promo"]) == 2
    assert "has a checkpoint" in capsys.readouterr().err
    assert promote.main(["--run-id", no_ckpt]) == 2
    assert "no checkpoint artifact" in capsys.readouterr().err
    no_metric = fake_run(store, None)
    assert promote.main(["--run-id", no_metric]) == 2
    assert "has no metric 'best_val_jaccard'" in capsys.readouterr().err
    failed = fake_run(store, 0.5, status="FAILED")
    assert promote.main(["--run-id", failed]) == 2
    assert "is FAILED, not FINISHED" in capsys.readouterr().err
    seg = fake_run(store, 0.99, arch="Segformer", encoder="resnet18")
    assert promote.main(["--run-id", seg]) == 2
    assert "Segformer" in capsys.readouterr().err
    assert promote.main(["--run-id", "0" * 32]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert promote.main(["--experiment", "nope"]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_submission_code_must_pass_runtime_checks(store, monkeypatch, tmp_path, capsys):
    fake_run(store, 0.5)
    bad = tmp_path / "main.py"
    bad.write_text("import mlflow\nmatch = 1\n")
    monkeypatch.setattr(promote, "MAIN_TEMPLATE", bad)
    assert promote.main(["--experiment", "promo"]) == 2
    assert "imports 'mlflow'" in capsys.readouterr().err


@pytest.mark.slow
def test_promote_after_tiny_sweep_picks_optunas_best(mlflow_tmp, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: float, low: 0.0001, high: 0.01, log: true}\n")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, str(REPO_ROOT / "experiments" / "sweep.py"), "--study", "pick", "--n-trials", "3",
           "--storage", storage, "--space", str(space), "--data", str(tiny_data), "--set", "encoder=resnet18",
           "--set", "epochs=1", "--set", "batch_size=2", "--set", "crop_size=64", "--set", "n_folds=3",
           "--set", "steps_per_epoch=1", "--set", "experiment=promo", "--set", "plot_chips=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    best = optuna.load_study(study_name="pick", storage=storage).best_trial
    out = tmp_path / "subs"
    monkeypatch.setattr(promote, "SUBMISSIONS_DIR", out)
    real_write = promote.write_submission
    monkeypatch.setattr(promote, "write_submission", lambda *a, **k: real_write(*a, **k, out_root=out))
    assert promote.main(["--study", "pick", "--name", "picked"]) == 0
    manifest = json.loads((out / "picked" / "MANIFEST.json").read_text())
    assert manifest["runs"][0]["run_id"] == best.user_attrs["mlflow_run_id"]


def test_submission_carries_no_local_paths(store, tmp_path, capsys):
    """data, exclude_ids and init_from with absolute paths: none of them (nor the home folder) reaches the
    folder, the zip, or the configs pickled inside the checkpoints."""
    import os

    excl = tmp_path / "private" / "exclude.txt"
    excl.parent.mkdir()
    excl.write_text("chip_a\n")
    data = tmp_path / "private" / "mydata"
    data.mkdir()
    init = tmp_path / "private" / "init.pt"
    init.write_bytes(b"weights")
    cfg_over = {"data": str(data), "exclude_ids": str(excl), "init_from": str(init)}
    rid = fake_run(store, 0.7, cfg_over=cfg_over)
    assert promote.main(["--run-id", rid, "--name", "private"]) == 0
    out = store / "submissions"
    needles = [str(tmp_path), str(REPO_ROOT), os.path.expanduser("~") + "/"]
    for path in [p for p in (out / "private").rglob("*") if p.is_file()]:
        text = path.read_bytes()
        assert not [n for n in needles if n.encode() in text], path
    with zipfile.ZipFile(out / "private.zip") as zf:
        for name in zf.namelist():
            blob = zf.read(name)
            assert not [n for n in needles if n.encode() in blob], name
    from cloudseg.checkpoint import load_checkpoint

    stored = load_checkpoint(out / "private" / "assets" / "model_0.pt")["config"]
    assert stored["data"] == "folder:mydata" and stored["exclude_ids"].startswith("sha256:")
    assert stored["init_from"].startswith("sha256:")
    manifest = json.loads((out / "private" / "MANIFEST.json").read_text())
    assert manifest["config"][rid] == stored


def test_promote_registers_a_model_version_and_moves_the_alias(store, capsys):
    a = fake_run(store, 0.6)
    assert promote.main(["--run-id", a, "--name", "reg"]) == 0
    client = MlflowClient()
    first = client.get_model_version_by_alias("reg", "champion")
    assert str(first.version) == "1" and first.tags["cloudseg.run_ids"] == a
    assert first.tags["cloudseg.zip_sha256"] == promote.sha256(store / "submissions" / "reg.zip")
    b = fake_run(store, 0.7)
    assert promote.main(["--run-id", b, "--name", "reg"]) == 0
    assert str(client.get_model_version_by_alias("reg", "champion").version) == "2"
    assert promote.main(["--run-id", a, "--name", "reg", "--alias", "staging"]) == 0
    assert str(client.get_model_version_by_alias("reg", "staging").version) == "3"
    assert str(client.get_model_version_by_alias("reg", "champion").version) == "2"
    assert "models:/reg@staging" in capsys.readouterr().out


def test_a_pruned_trial_is_never_promoted(store, capsys):
    """A pruned trial ends FINISHED (cloudseg.pruned=true); even one holding a better figure and a checkpoint is
    passed over, and naming it is refused."""
    pruned = fake_run(store, 0.99, kind="trial", tags={"cloudseg.study": "p", "cloudseg.trial": "0",
                                                      "cloudseg.pruned": "true"})
    done = fake_run(store, 0.50, kind="trial", tags={"cloudseg.study": "p", "cloudseg.trial": "1"})
    assert promote.main(["--study", "p", "--name", "p", "--no-register"]) == 0
    assert f"promoted run {done}" in capsys.readouterr().out
    assert promote.main(["--run-id", pruned, "--name", "p", "--no-register"]) == 2
    assert "is a pruned trial (tag cloudseg.pruned=true)" in capsys.readouterr().err


def test_registered_version_comes_from_the_run_that_trained_it(store, capsys):
    """The version's source run is the trial (not promote's bookkeeping run), the best fold of a cv ensemble; its
    description names the submission, its members with their runs and scores, the git commit and the cost."""
    sweep = fake_run(store, None, kind="sweep", checkpoint=False, tags={"cloudseg.study": "r"})
    trial = fake_run(store, 0.8, kind="trial", tags={"cloudseg.study": "r", "cloudseg.trial": "3"}, parent=sweep,
                     cfg_over={"run_name": "r-trial3"})
    assert promote.main(["--study", "r", "--name", "reg"]) == 0
    client = MlflowClient()
    version = client.get_model_version_by_alias("reg", "champion")
    assert version.run_id == trial and client.get_run(version.run_id).data.tags["cloudseg.kind"] == "trial"
    assert version.tags["cloudseg.source_run"] == trial
    bookkeeping = client.get_run(version.tags["cloudseg.registration_run"])
    assert {a.path for a in client.list_artifacts(bookkeeping.info.run_id, "submission")} == \
        {"submission/reg.zip", "submission/MANIFEST.json"}
    manifest = json.loads((store / "submissions" / "reg" / "MANIFEST.json").read_text())
    text = version.description
    assert "**reg**" in text and f"`{trial}`" in text and "r-trial3" in text and "0.8000" in text
    assert f"Git commit: `{manifest['git_commit']}`" in text
    assert "cost: not estimated (MANIFEST.json has no cost block)" in text

    parent = fake_run(store, 0.77, kind="cv", checkpoint=False, metric="cv_jaccard")
    folds = [fake_run(store, v, parent=parent, tags={"cloudseg.fold": str(k)}) for k, v in enumerate((.5, .9, .6))]
    assert promote.main(["--run-id", parent, "--name", "cvreg"]) == 0
    version = client.get_model_version_by_alias("cvreg", "champion")
    assert version.run_id == folds[1]  # the fold with the best figure of its own
    assert all(f"`{f}`" in version.description for f in folds)
    assert "cv_jaccard=0.7700" in version.description


def test_cost_line_reads_the_manifests_cost_block():
    from cloudseg.tracking.models import cost_line

    line = cost_line({"forwards_per_chip": 3, "gflop_per_chip": 12.5, "k80_projected_h": 0.8,
                      "k80_projected_h_low": 0.6, "k80_projected_h_high": 1.1})
    assert line == "cost: 3 forwards/chip, 12.5 GFLOP/chip, K80 projected 0.8 h (0.6-1.1 h) for 10,980 chips"
