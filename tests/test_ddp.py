"""torchrun with two ranks on CPU (gloo): one MLflow run, the single-process figure, failures and resume, each
encoder family the configs name, and the paths only GPUs take, rehearsed: every tensor cloudseg hands a collective
must be on the rank's own device, as NCCL demands (``tests/ddp_strict.py``), and a rank with nothing to validate
still joins every collective."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cloudseg.paths import CONFIGS_DIR, REPO_ROOT

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN = str(REPO_ROOT / "experiments" / "train.py")
TINY = ["--set", "encoder=resnet18", "--set", "batch_size=4", "--set", "crop_size=64", "--set", "n_folds=3",
        "--set", "val_batch_size=1", "--set", "plot_chips=1", "--set", "experiment=ddp", "--set",
        "steps_per_epoch=2", "--set", "num_threads=1", "--set", "precision=fp32"]
# Loaded by every Python process of the job. Each rank records its pid (CLOUDSEG_TEST_PIDS) and makes its
# collectives strict (tests/ddp_strict.py). With CLOUDSEG_TEST_RAISE=<rank>:<epoch>, that rank raises when it starts
# that epoch (once per state folder, so a resumed run goes on).
HOOK = '''
import os
rank = os.environ.get("RANK")
if rank is not None:
    open(os.path.join(os.environ["CLOUDSEG_TEST_PIDS"], f"rank{rank}.{os.getpid()}"), "w").close()
    import tests.ddp_strict
    tests.ddp_strict.install()
spec = os.environ.get("CLOUDSEG_TEST_RAISE")
if spec and rank == spec.split(":")[0]:
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
    pids = tmp_path / "pids"
    pids.mkdir()
    path = os.pathsep.join([str(hook), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "CLOUDSEG_STATE_ROOT": str(tmp_path / "state"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path, "TQDM_DISABLE": "1", "CLOUDSEG_TEST_PIDS": str(pids)}
    env.pop("PYTEST_CURRENT_TEST", None)

    def run(*args: str, raise_at: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        e = {**env, **({"CLOUDSEG_TEST_RAISE": raise_at} if raise_at else {})}
        proc = subprocess.Popen([*TORCHRUN, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=e)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # a hung job (a rank waiting in a collective) is stopped whole: torchrun stops its ranks on SIGTERM
            # (each runs in its own session), and any rank still there is killed by the pid it recorded
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            for pid in _rank_pids(tmp_path):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the torchrun job hung for {timeout} s (a rank waiting in a collective?):\n"
                        f"{out[-2000:]}\n{err[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    return run


def _runs():
    client = MlflowClient()
    exp = client.get_experiment_by_name("ddp")
    return client, client.search_runs([exp.experiment_id])


def _alive(pid: int) -> bool:
    """A live process (not a zombie) with this pid running a rank of the job."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return "State:\tZ" not in status and TRAIN.encode() in cmdline


def _rank_pids(tmp_path: Path) -> list[int]:
    """The pids the job's ranks recorded when they started."""
    return [int(f.name.split(".")[1]) for f in (tmp_path / "pids").glob("rank*.*")]


def _no_rank_left(tmp_path: Path) -> None:
    """Every rank that started is gone (each recorded its pid when it started)."""
    pids = _rank_pids(tmp_path)
    assert len(pids) >= 2, f"the ranks recorded no pids: {sorted(f.name for f in (tmp_path / 'pids').iterdir())}"
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    assert not left, f"ranks still running: {left}"


def _checked_collectives(tmp_path: Path) -> dict[str, set[str]]:
    """Per rank, the collectives that passed the strict device check."""
    return {f.name: set(f.read_text().split()) for f in (tmp_path / "pids").glob("collectives.rank*")}


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
    # the end-of-epoch sums (loss, validation counts) and the buffers went through NCCL's device rule, on each rank
    checked = _checked_collectives(tmp_path)
    assert set(checked) == {"collectives.rank0", "collectives.rank1"}, checked
    assert all({"all_reduce", "broadcast"} <= names for names in checked.values()), checked
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


def _shrunk_full_recipe(data: Path) -> list[str]:
    """experiments/configs/full.yaml as the issue's torchrun command shrinks it to CPU size, on a fold whose
    validation holds one chip: with 2 ranks, rank 1's validation shard is empty."""
    from cloudseg.config import load_config
    from cloudseg.data.sources import fold_ids
    from cloudseg.data.validate import validate_split

    sets = ["device=cpu", "precision=fp32", "num_workers=2", "epochs=2", "steps_per_epoch=2", "batch_size=4",
            "crop_size=64", "val_batch_size=1", "plot_chips=1", "experiment=ddp", "num_threads=1"]
    split = validate_split(data, "train", labels=True, load=False)
    def n_val(fold: int) -> int:
        return len(fold_ids(load_config(CONFIGS_DIR / "full.yaml", [*sets, f"fold={fold}"], data=str(data)),
                            split)[1])

    folds = [f for f in range(5) if n_val(f) == 1]
    assert folds, "no fold of the 6-location fixture validates on a single chip"
    return ["--config", str(CONFIGS_DIR / "full.yaml"), "--data", str(data),
            *[x for s in [*sets, f"fold={folds[0]}"] for x in ("--set", s)]]


def test_full_recipe_shrunk_trains_efficientnet_with_an_empty_validation_shard(job, tmp_path):
    """full.yaml's recipe (efficientnet-b1, loader workers reading from disk, augmentation, OneCycle) over 2 ranks;
    it crashed at the second step (EfficientNet's unused classifier head under DDP), and a rank with no chip to
    validate must still join every collective (else the job hangs until the timeout)."""
    from tests.data.fixtures import make_dataset

    data = make_dataset(tmp_path / "data", n_chips=6, locations=tuple("ABCDEF"))
    res = job(*_shrunk_full_recipe(data), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client, runs = _runs()
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["encoder"] == "efficientnet-b1"
    assert run.data.tags["cloudseg.world_size"] == "2" and run.data.tags["cloudseg.precision"] == "fp32"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_jaccard")] == [1, 2]
    assert "epoch 2/2" in res.stdout
    checked = _checked_collectives(tmp_path)
    assert len(checked) == 2 and all("all_reduce" in names for names in checked.values()), checked
    _no_rank_left(tmp_path)


def test_timm_efficientnet_trains_under_two_ranks(job, tiny_data, tmp_path):
    res = job("--data", str(tiny_data), *TINY, "--set", "encoder=timm-efficientnet-b0", "--set", "epochs=2",
              timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client, runs = _runs()
    assert runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")] == [1, 2]
    _no_rank_left(tmp_path)


def test_the_strict_check_refuses_a_tensor_off_the_rank_device():
    """The rehearsal's own positive control: a CPU tensor handed to a collective whose rank device is not the CPU
    raises before anything is sent (what NCCL does with it)."""
    from tests.ddp_strict import StrictDist

    strict = StrictDist(lambda: torch.device("meta"))
    with pytest.raises(RuntimeError, match="tensors on meta only"):
        strict.all_reduce(torch.zeros(3))
    with pytest.raises(RuntimeError, match="tensors on meta only"):
        strict.all_gather([torch.zeros(3, device="meta")], torch.zeros(3))
    assert strict.get_rank is torch.distributed.get_rank  # everything else is torch.distributed's own
