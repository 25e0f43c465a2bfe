"""experiments/train.py end to end on CPU: tiny fixtures, a 1-epoch run, MLflow in a temporary store."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cloudseg.checkpoint import load_checkpoint, model_from_checkpoint
from cloudseg.config import ConfigError, load_config
from cloudseg.data.dataset import ChipDataset
from cloudseg.data.sources import fold_ids
from cloudseg.data.transforms import Normalization
from cloudseg.data.validate import validate_split
from cloudseg.metrics import JaccardAccumulator
from cloudseg.paths import REPO_ROOT
from cloudseg.training import predict_probs

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import train as train_script  # noqa: E402

TINY = ["--set", "encoder=resnet18", "--set", "epochs=1", "--set", "batch_size=2", "--set", "crop_size=64",
        "--set", "n_folds=3", "--set", "val_batch_size=2", "--set", "plot_chips=2", "--set", "experiment=tiny"]


@pytest.fixture
def env(mlflow_tmp, tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))
    return mlflow_tmp


def _only_run(experiment="tiny"):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def test_one_epoch_run_is_fully_tracked(env, tiny_data, capsys):
    assert train_script.main(["--data", str(tiny_data), *TINY]) == 0
    client, runs = _only_run()
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["encoder"] == "resnet18" and run.data.params["epochs"] == "1"
    assert set(run.data.params) >= {"data", "arch", "loss", "lr", "crop_size", "seed", "threshold"}
    for name in ("best_val_jaccard", "threshold_tuned", "epochs_run", "wall_s"):
        assert name in run.data.metrics
    for name in ("train_loss", "val_jaccard", "lr_now", "chips_per_s"):
        hist = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in hist] == [1]
    # one name, one meaning: the UI shows a param and a metric of one name in one column
    assert not set(run.data.metrics) & set(run.data.params)
    tags = run.data.tags
    assert tags["cloudseg.kind"] == "train"
    assert len(tags["cloudseg.data_fingerprint"]) == 16
    assert tags["cloudseg.git_dirty"] in ("true", "false") and tags["cloudseg.git_commit"]
    assert tags["cloudseg.device"] == "cpu" and tags["cloudseg.torch_version"] == torch.__version__
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "checkpoint", "plots", "per_chip_jaccard.csv"} <= arts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/predictions.png"}
    assert f"run_id={run.info.run_id}" in capsys.readouterr().out
    # the per-chip table holds the counts behind the run's figures: the fold's validation chips, pooled at the
    # configured threshold (best_val_jaccard, the epoch's val_jaccard) and at the kept one (val_jaccard_at_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        per = pd.read_csv(client.download_artifacts(run.info.run_id, "per_chip_jaccard.csv", tmp),
                          dtype={"chip_id": str})
    cfg = load_config(None, TINY[1::2], data=str(tiny_data))
    split = validate_split(tiny_data, "train", labels=True, load=False)
    assert sorted(per["chip_id"]) == sorted(fold_ids(cfg, split)[1]) and len(per) == 2
    assert list(per["location"]) == list(split.metadata.loc[per["chip_id"], "location"])
    assert (per["intersection"] <= per["union"]).all() and per["union"].sum() > 0
    np.testing.assert_allclose(per["jaccard"], per["intersection"] / per["union"].where(per["union"] > 0))
    metrics = run.data.metrics
    fixed = per["intersection_fixed"].sum() / per["union_fixed"].sum()
    assert metrics["best_val_jaccard"] == pytest.approx(fixed, abs=1e-12)
    assert client.get_metric_history(run.info.run_id, "val_jaccard")[0].value == pytest.approx(fixed, abs=1e-12)
    tuned = per["intersection"].sum() / per["union"].sum()
    assert metrics["val_jaccard_at_threshold"] == pytest.approx(tuned, abs=1e-12)


def test_val_every_validates_every_kth_epoch_and_the_last(env, tiny_data):
    sets = [*TINY, "--set", "epochs=5", "--set", "val_every=2", "--set", "steps_per_epoch=1", "--set", "keep=last"]
    assert train_script.main(["--data", str(tiny_data), *sets]) == 0
    client, runs = _only_run()
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_jaccard")] == [2, 4, 5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5]
    assert run.data.metrics["best_epoch"] == 5  # keep=last: the last epoch, validated although 5 % 2 != 0
    last = client.get_metric_history(run.info.run_id, "val_jaccard")[-1].value
    assert run.data.metrics["best_val_jaccard"] == pytest.approx(last)


def test_checkpoint_rebuilds_model_alone(env, tiny_data, tmp_path):
    train_script.main(["--data", str(tiny_data), *TINY, "--set", "precision=fp32"])
    client, runs = _only_run()
    path = Path(client.download_artifacts(runs[0].info.run_id, "checkpoint/best.pt", str(tmp_path)))
    ckpt = load_checkpoint(path)
    assert ckpt["model"]["arch"] == "Unet" and ckpt["model"]["encoder_name"] == "resnet18"
    assert ckpt["config"]["encoder"] == "resnet18"
    assert 0 < ckpt["threshold"] < 1 and ckpt["threshold"] == pytest.approx(runs[0].data.metrics["threshold_tuned"])
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    # only tensors and plain types: loads with weights_only (what torch 1.8 can unpickle)
    torch.load(path, weights_only=True)
    model = model_from_checkpoint(ckpt)
    out = model(torch.zeros(1, 4, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    # the file alone (its model, normalisation and threshold) predicts the run's validation chips as the run
    # scored them: the per-chip counts and the figure MLflow holds
    with tempfile.TemporaryDirectory() as tmp:
        per = pd.read_csv(client.download_artifacts(runs[0].info.run_id, "per_chip_jaccard.csv", tmp),
                          dtype={"chip_id": str}).set_index("chip_id")
    split = validate_split(tiny_data, "train", labels=True, load=True)
    dataset = ChipDataset(split, list(per.index), None, Normalization.from_dict(ckpt["normalization"]))
    probs = predict_probs(path, dataset, device="cpu", precision="fp32", batch_size=2)
    acc = JaccardAccumulator()
    for chip, p in probs.items():
        acc.add(chip, (p >= ckpt["threshold"]).astype(np.uint8), split.mask(chip))
    counts = acc.per_chip().set_index("chip_id").loc[per.index]
    assert counts["intersection"].tolist() == per["intersection"].tolist()
    assert counts["union"].tolist() == per["union"].tolist()
    assert acc.score() == pytest.approx(runs[0].data.metrics["val_jaccard_at_threshold"], abs=1e-12)


def test_init_from_a_run_starts_from_its_weights(env, tiny_data, capsys):
    assert train_script.main(["--data", str(tiny_data), *TINY]) == 0
    client, runs = _only_run()
    source = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        src = load_checkpoint(client.download_artifacts(source, "checkpoint/best.pt", tmp))["state_dict"]
    # lr=1e-12: the weights barely move, so the new run's checkpoint holds the source's conv weights
    # (batch-norm running statistics still update in train mode, so those are left out)
    assert train_script.main(["--data", str(tiny_data), *TINY, "--set", f"init_from={source}",
                              "--set", "lr=1e-12", "--set", "seed=7"]) == 0
    _, runs = _only_run()
    tuned = next(r for r in runs if r.info.run_id != source)
    assert tuned.data.params["init_from"] == source
    with tempfile.TemporaryDirectory() as tmp:
        new = load_checkpoint(client.download_artifacts(tuned.info.run_id, "checkpoint/best.pt", tmp))["state_dict"]
    convs = [k for k, v in src.items() if k.endswith(".weight") and v.ndim == 4]
    assert len(convs) > 10 and all(torch.allclose(src[k], new[k], rtol=0, atol=1e-8) for k in convs)
    # without init_from the same seed-7 run starts elsewhere
    assert train_script.main(["--data", str(tiny_data), *TINY, "--set", "lr=1e-12", "--set", "seed=7"]) == 0
    _, runs = _only_run()
    fresh = next(r for r in runs if r.info.run_id not in (source, tuned.info.run_id))
    with tempfile.TemporaryDirectory() as tmp:
        other = load_checkpoint(client.download_artifacts(fresh.info.run_id, "checkpoint/best.pt", tmp))["state_dict"]
    assert not torch.allclose(src[convs[0]], other[convs[0]], rtol=0, atol=1e-3)
    capsys.readouterr()
    # refusals, before any run starts
    assert train_script.main(["--data", str(tiny_data), *TINY, "--set", "init_from=/nope/best.pt"]) == 2
    assert "'/nope/best.pt' is neither a checkpoint file, an MLflow run id, a YAML config nor " in capsys.readouterr().err
    assert train_script.main(["--data", str(tiny_data), *TINY, "--set", "init_from=" + "0" * 32]) == 2
    assert f"no MLflow run {'0' * 32}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds Unet\\+resnet18 .* builds Unet\\+resnet34"):
        train_script.main(["--data", str(tiny_data), *TINY, "--set", f"init_from={source}",
                           "--set", "encoder=resnet34"])
    assert len(_only_run()[1]) == 4  # the refused runs started nothing; the mismatched one ended FAILED
    assert sum(r.info.status == "FAILED" for r in _only_run()[1]) == 1


def test_init_from_a_config_trains_it_once(env, tiny_data, tmp_path, capsys):
    pre = tmp_path / "pre.yaml"
    pre.write_text(f"experiment: pre\ndata: {tiny_data}\nencoder: resnet18\nepochs: 1\nbatch_size: 2\n"
                   "crop_size: 64\nn_folds: 3\nval_batch_size: 2\nplot_chips: 1\n")
    tune = [*TINY, "--set", f"init_from={pre}"]
    assert train_script.main(["--data", str(tiny_data), *tune]) == 0
    assert "no finished run of it" in capsys.readouterr().out
    client = MlflowClient()
    pre_runs = client.search_runs([client.get_experiment_by_name("pre").experiment_id])
    assert len(pre_runs) == 1 and pre_runs[0].data.tags["cloudseg.pretrain"] == "true"
    assert pre_runs[0].info.status == "FINISHED"
    # a second fine-tune finds the finished pretraining in MLflow (nothing is memoised in the process)
    assert train_script.main(["--data", str(tiny_data), *tune, "--set", "seed=3"]) == 0
    assert f"finished run {pre_runs[0].info.run_id}" in capsys.readouterr().out
    assert len(client.search_runs([client.get_experiment_by_name("pre").experiment_id])) == 1
    assert len(_only_run()[1]) == 2
    # a changed learned setting is another pretraining
    pre.write_text(pre.read_text().replace("epochs: 1", "epochs: 2"))
    assert train_script.main(["--data", str(tiny_data), *tune]) == 0
    assert len(client.search_runs([client.get_experiment_by_name("pre").experiment_id])) == 2
    assert train_script.main(["--data", str(tiny_data), *TINY, "--set", "init_from=nope.yaml"]) == 2
    assert "init_from: config nope.yaml does not exist" in capsys.readouterr().err


def test_set_errors(env, tiny_data, capsys):
    assert train_script.main(["--set", "nope=1"]) == 2
    assert "unknown config key(s) ['nope']" in capsys.readouterr().err
    assert train_script.main(["--set", "epochs=two"]) == 2
    assert "'epochs' must be int, got 'two'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="crop_size=100"):
        load_config(None, ["crop_size=100"])


def test_yaml_configs_load():
    """Every shipped config loads, and what it sets is what the Config holds (a file the loader ignored would
    load as the defaults)."""
    import yaml

    loaded = []
    for path in sorted((REPO_ROOT / "experiments" / "configs").glob("*.yaml")):
        if path.stem == "space" or path.stem.endswith("-space"):  # search spaces, not configs
            continue
        raw = yaml.safe_load(path.read_text())
        cfg = load_config(path)
        assert isinstance(raw, dict) and raw, path
        for key, value in raw.items():
            got = getattr(cfg, key)
            assert got == value or (isinstance(got, float) and got == pytest.approx(value)), (path.name, key, got)
        loaded.append(path.stem)
    # the recipes the README and the Makefile name
    assert {"default", "demo", "full", "gpu", "real-best", "real-scratch", "real-sample"} <= set(loaded), loaded


def test_raising_run_ends_failed(env, tiny_data, monkeypatch):
    from cloudseg import training

    def boom(self, epoch):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(training.Trainer, "train_one_epoch", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_script.main(["--data", str(tiny_data), *TINY])
    _, runs = _only_run()
    assert runs[0].info.status == "FAILED"
    assert "simulated crash" in runs[0].data.tags["cloudseg.error"]


@pytest.mark.slow
def test_kill_then_resume_continues_from_checkpoint(env, tiny_data, tmp_path):
    """SIGKILL a 3-epoch run after its first epoch; --resume finishes it from epoch 2 in the same run."""
    args = [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--data", str(tiny_data), *TINY,
            "--set", "epochs=3"]
    env_vars = {**os.environ, "CI": "", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_vars)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/3"):
            proc.send_signal(signal.SIGKILL)
            break
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no epoch finished in time:\n" + "".join(lines))
    proc.wait()
    client, runs = _only_run()
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "RUNNING", (runs[0].data.tags.get("cloudseg.error"), "".join(lines))  # killed
    state = torch.load(tmp_path / "state" / run_id / "last.pt", weights_only=False)
    assert state["epoch"] == 1
    res = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--resume", run_id],
                         capture_output=True, text=True, env=env_vars, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout and "after epoch 1" in res.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_jaccard")] == [1, 2, 3]
    assert not (tmp_path / "state" / run_id).exists()  # finished: the resumable state is gone, the artifact stays
    assert run.data.metrics["epochs_run"] == 3


def test_resumed_training_repeats_the_uninterrupted_one(tiny_data, tmp_path, monkeypatch):
    """Stop after epoch 1 (its state on disk), resume in a new Trainer: the weights end bit-identical to a run
    that was never stopped, so every random stream (sampler, augmentations, dropout) continued where it was."""
    from cloudseg.data.splits import fold_split
    from cloudseg.data.validate import validate_split
    from cloudseg.training import Trainer

    cfg = load_config(None, ["encoder=resnet18", "epochs=3", "batch_size=2", "crop_size=64", "steps_per_epoch=2",
                             "aug_strength=1", "val_batch_size=2", "n_folds=3", "plot_chips=0", "keep=last",
                             "tune_threshold=false", "num_threads=1", "precision=fp32"], data=str(tiny_data))
    split = validate_split(tiny_data, "train", labels=True, load=True)
    train_ids, val_ids = fold_split(split.metadata.reset_index(), 3, 0, cfg.seed)
    whole = Trainer(cfg, split, train_ids, val_ids, tmp_path / "whole").fit()

    save = Trainer._save_state

    def stop_after_first(self, epoch, *a, **kw):
        save(self, epoch, *a, **kw)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_state", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, split, train_ids, val_ids, tmp_path / "resumed").fit()
    monkeypatch.setattr(Trainer, "_save_state", save)
    # build() re-seeds from the config, so a resume that ignored last.pt and retrained from epoch 1 would end on
    # the same weights: the epochs the resumed fit trains tell the two apart
    ran = []
    train_one_epoch = Trainer.train_one_epoch
    monkeypatch.setattr(Trainer, "train_one_epoch", lambda self, epoch: (ran.append(epoch),
                                                                          train_one_epoch(self, epoch))[1])
    resumed = Trainer(cfg, split, train_ids, val_ids, tmp_path / "resumed").fit()
    assert ran == [2, 3]
    a = load_checkpoint(whole.checkpoint)["state_dict"]
    b = load_checkpoint(resumed.checkpoint)["state_dict"]
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in resumed.history]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_checks_itself_on_construction():
    from cloudseg.config import Config

    with pytest.raises(ConfigError, match="'epochs' must be int"):
        Config(epochs="3")
    with pytest.raises(ConfigError, match="lr=inf"):
        Config(lr=float("inf"))
    with pytest.raises(ConfigError, match="steps_per_epoch=-1"):
        Config(steps_per_epoch=-1)
    assert Config(lr=1).lr == 1.0 and isinstance(Config(lr=1).lr, float)


def test_bad_input_is_refused_before_any_run_opens(env, tiny_data, tmp_path, capsys):
    """Each bad value gets one line naming it and exit status 2, and no MLflow run is created."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1\n")
    cases = {
        "lr=inf": (["--set", "lr=inf"], "lr=inf"),
        "steps": (["--set", "steps_per_epoch=-1"], "steps_per_epoch=-1"),
        "encoder": (["--set", "encoder=resnet999"], "unknown encoder 'resnet999'"),
        "folds": (["--set", "n_folds=5"], "n_folds=5 but the data has only 3 locations"),
        "yaml": (["--config", str(bad_yaml)], f"{bad_yaml}: not valid YAML"),
    }
    for name, (extra, message) in cases.items():
        capsys.readouterr()
        code = train_script.main(["--data", str(tiny_data), *TINY, *extra])
        err = capsys.readouterr().err
        assert code == 2, name
        assert message in err, (name, err)
    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_seeds_make_one_repeat_parent(env, tiny_data, capsys):
    """--seeds 0,1,2: one repeat parent over three ordinary child runs; its mean, sd and 95% interval match the
    children's figures computed by hand; the last run_id printed is the parent's."""
    assert train_script.main(["--data", str(tiny_data), *TINY, "--seeds", "0,1,2"]) == 0
    out = capsys.readouterr().out
    parent_id = [line for line in out.splitlines() if line.startswith("run_id=")][-1].split("=", 1)[1]
    client, runs = _only_run()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cloudseg.kind"] == "repeat"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(int(k.data.tags["cloudseg.seed"]) for k in kids) == [0, 1, 2]
    assert all(k.info.status == "FINISHED" and k.data.tags["cloudseg.kind"] == "train" for k in kids)
    assert sorted(k.data.params["seed"] for k in kids) == ["0", "1", "2"]
    vals = [k.data.metrics["best_val_jaccard"] for k in kids]
    mean = sum(vals) / 3
    sd = (sum((v - mean) ** 2 for v in vals) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    m = parent.data.metrics
    assert m["best_val_jaccard_mean"] == pytest.approx(mean, abs=1e-9)
    assert m["best_val_jaccard_sd"] == pytest.approx(sd, abs=1e-9)
    assert m["best_val_jaccard_ci_low"] == pytest.approx(mean - half, abs=1e-9)
    assert m["best_val_jaccard_ci_high"] == pytest.approx(mean + half, abs=1e-9)
    assert f"best_val_jaccard_mean={mean:.6f}" in out
    # promote ranks the parent by its mean and ensembles its children
    from cloudseg.tracking import promote

    chosen = promote.select_runs(client, promote.parse_args(["--run-id", parent_id]))
    assert chosen[0][1] == "best_val_jaccard_mean"
    assert sorted(promote.model_runs(client, parent)) == sorted(k.info.run_id for k in kids)


def test_training_on_a_split_read_from_disk_matches_memory(tiny_data, tmp_path):
    """The same seed on a split held in memory and on one read chip by chip gives the same run."""
    from cloudseg.data.sources import fold_ids
    from cloudseg.data.validate import validate_split
    from cloudseg.training import Trainer

    cfg = load_config(None, ["encoder=resnet18", "epochs=2", "batch_size=2", "crop_size=64", "steps_per_epoch=2",
                             "aug_strength=1", "val_batch_size=2", "n_folds=3", "plot_chips=1",
                             "num_threads=1", "precision=fp32"], data=str(tiny_data))
    results = {}
    for mode, split in {"memory": validate_split(tiny_data, "train", labels=True, load=True),
                        "disk": validate_split(tiny_data, "train", labels=True, deep=False)}.items():
        train_ids, val_ids = fold_ids(cfg, split)
        results[mode] = Trainer(cfg, split, train_ids, val_ids, tmp_path / mode).fit()
    mem, disk = results["memory"], results["disk"]
    assert [h["train_loss"] for h in mem.history] == [h["train_loss"] for h in disk.history]
    assert [h["val_jaccard"] for h in mem.history] == [h["val_jaccard"] for h in disk.history]
    assert mem.best_val_jaccard == disk.best_val_jaccard and mem.threshold == disk.threshold
