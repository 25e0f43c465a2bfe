"""torchrun with two ranks on CPU (gloo): one MLflow run, the single-process figure, failures and resume."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cloudseg.paths import REPO_ROOT

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN = str(REPO_ROOT / "experiments" / "train.py")
TINY = ["--set", "encoder=resnet18", "--set", "batch_size=4", "--set", "crop_size=64", "--set", "n_folds=3",
        "--set", "val_batch_size=1", "--set", "plot_chips=1", "--set", "experiment=ddp", "--set",
        "steps_per_epoch=2", "--set", "num_threads=1", "--set", "precision=fp32"]
# Loaded by every Python process of the job: with CLOUDSEG_TEST_RAISE=<rank>:<epoch>, that rank raises when it
# starts that epoch (once per state folder, so a resumed run goes on).
HOOK = '''
import os
spec = os.environ.get("CLOUDSEG_TEST_RAISE")
if spec and os.environ.get("RANK") == spec.split(":")[0]:
    import cloudseg.training as t
    real = t.Trainer.train_one_epoch
    def train_one_epoch(self, epoch):
        flag = self.state_dir / "raised"
        if epoch == int(spec.split(":")[1]) and not flag.exists():
            flag.write_text("1")
            raise RuntimeError(f"rank {os.environ['RANK']} raised at epoch {epoch}")
        return real(self, epoch)
    t.Trainer.train_one_epoch = train_one_epoch
'''


@pytest.fixture
def job(mlflow_tmp, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "CLOUDSEG_STATE_ROOT": str(tmp_path / "state"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)

    def run(*args: str, raise_at: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        e = {**env, **({"CLOUDSEG_TEST_RAISE": raise_at} if raise_at else {})}
        return subprocess.run([*TORCHRUN, TRAIN, *args], capture_output=True, text=True, env=e, timeout=timeout)

    return run


def _runs():
    client = MlflowClient()
    exp = client.get_experiment_by_name("ddp")
    return client, client.search_runs([exp.experiment_id])


def _no_rank_left(tmp_path: Path) -> None:
    time.sleep(1)
    ps = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert not ps.stdout.strip(), f"processes left: {ps.stdout}"


def test_two_ranks_train_one_run_with_the_single_process_figure(job, tiny_data, tmp_path):
    res = job("--data", str(tiny_data), *TINY, "--set", "epochs=2", "--set", "tune_threshold=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("run_id=") == 1  # rank 0 alone reports
    client, runs = _runs()
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["cloudseg.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_jaccard")] == [1, 2]
    # the logged figure is the one a single process computes on the saved checkpoint (summed counts, not a mean)
    import torch

    from cloudseg.checkpoint import load_checkpoint, model_from_checkpoint
    from cloudseg.config import load_config
    from cloudseg.data.dataset import ChipDataset
    from cloudseg.data.sources import fold_ids
    from cloudseg.data.validate import validate_split
    from cloudseg.training import evaluate

    torch.set_num_threads(1)
    assert not (tmp_path / "state" / run.info.run_id).exists()  # a finished run leaves no local state behind
    ckpt = load_checkpoint(client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(tmp_path)))
    cfg = load_config(None, [s for s in TINY if s != "--set"], data=str(tiny_data))
    split = validate_split(tiny_data, "train", labels=True, load=True)
    _, val_ids = fold_ids(cfg, split)
    ev = evaluate(model_from_checkpoint(ckpt), ChipDataset(split, val_ids), torch.device("cpu"), None, 0.5,
                  batch_size=1, channels_last=False)
    assert ev.jaccard == pytest.approx(run.data.metrics["best_val_jaccard"], abs=1e-9)
    assert len(ev.per_chip) == len(val_ids)
    _no_rank_left(tmp_path)


def test_a_rank_that_raises_fails_the_run_and_stops_the_others(job, tiny_data, tmp_path):
    res = job("--data", str(tiny_data), *TINY, "--set", "epochs=3", raise_at="1:2")
    assert res.returncode != 0
    _, runs = _runs()
    assert len(runs) == 1 and runs[0].info.status == "FAILED", ([r.info.status for r in runs], res.stdout[-2000:],
                                                               res.stderr[-4000:])
    assert "rank 1" in runs[0].data.tags["cloudseg.error"]
    _no_rank_left(tmp_path)


def test_resume_under_torchrun_continues_from_the_last_epoch(job, tiny_data, tmp_path):
    res = job("--data", str(tiny_data), *TINY, "--set", "epochs=3", raise_at="0:2")
    assert res.returncode != 0
    client, runs = _runs()
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FAILED"
    res = job("--resume", run_id)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "after epoch 1" in res.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cloudseg.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    _no_rank_left(tmp_path)
