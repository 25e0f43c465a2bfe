"""MLflow bookkeeping: stores, experiments, run tags, stale-run repair and the artifacts of a training run.

Only this module and ``experiments/`` import MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

import cloudseg
from cloudseg.paths import MLARTIFACTS, REPO_ROOT, tracking_uri

# the experiment's kind for MLflow 3 (its 3.17 UI still keeps the workflow it opens in the browser: tracking/ui.py)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
PRUNED_TAG = "cloudseg.pruned"  # "true" on trials the pruner stopped (FINISHED, never promoted)
STALE_AFTER_S = float(os.environ.get("CLOUDSEG_STALE_AFTER_S", 6 * 3600))  # heartbeat age that marks a remote run dead


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception so runs end KILLED instead of staying RUNNING."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def artifacts_root() -> Path:
    return Path(os.environ.get("CLOUDSEG_MLARTIFACTS", MLARTIFACTS))


def connect() -> str:
    """Point MLflow at the configured store (``cloudseg.paths.tracking_uri``); returns its URI."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def setup(experiment: str) -> str:
    """Point MLflow at the configured store and return the experiment id (created on first use).

    With a local store, artifacts go to ``mlartifacts/<experiment>`` under the repository root (never to the
    current directory); a tracking server decides its own artifact root.
    """
    from cloudseg.tracking import ui

    uri = connect()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:  # an experiment made by an older cloudseg gets this one's tags and view
        for key, value in ui.tags_to_update(exp.tags).items():
            MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        location = (artifacts_root() / safe).resolve().as_uri()
    try:
        return mlflow.create_experiment(experiment, artifact_location=location, tags=ui.tags_to_update({}))
    except Exception:  # another worker created it in between
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_info() -> tuple[str, bool]:
    """(commit, dirty) of the repository, or ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        return commit, bool(status)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def data_fingerprint(root: Path | str, split: str, ids: list[str]) -> str:
    """sha256 over chip ids and the sizes of their band and label files (cheap, catches changed data)."""
    root = Path(root)
    h = hashlib.sha256()
    for chip_id in sorted(ids):
        h.update(chip_id.encode())
        folder = root / f"{split}_features" / chip_id
        for f in sorted(folder.glob("*.tif")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        label = root / f"{split}_labels" / f"{chip_id}.tif"
        if label.is_file():
            h.update(f"label:{label.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _proc_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return "?"


def process_tag() -> str:
    """host:pid:start-time of this process, so a later start can tell whether it is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def _process_alive(tag: str) -> bool | None:
    """True/False for a process on this host; None when it ran elsewhere (cannot tell)."""
    try:
        host, pid, start = tag.rsplit(":", 2)
        pid_i = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid_i, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_start(pid_i) == start


def base_tags(kind: str) -> dict[str, str]:
    import torch

    from cloudseg import distributed

    commit, dirty = git_info()
    return {
        "cloudseg.kind": kind,
        "cloudseg.world_size": str(distributed.world()),
        "cloudseg.git_commit": commit,
        "cloudseg.git_dirty": str(dirty).lower(),
        "cloudseg.version": cloudseg.__version__,
        "cloudseg.torch_version": torch.__version__,
        "cloudseg.proc": process_tag(),
        "cloudseg.heartbeat": str(int(time.time())),
        "mlflow.source.git.commit": commit,
    }


def close_stale_runs(experiment_ids: list[str] | None = None, extra_dead: set[str] | None = None) -> list[str]:
    """Close RUNNING runs whose process is gone: KILLED when its process died on this host or its heartbeat is
    older than ``STALE_AFTER_S``; ``extra_dead`` are run ids known dead by other means (e.g. a failed Optuna
    heartbeat). Returns the closed run ids."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    closed = []
    runs = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=5000)
    now = time.time()
    for run in runs:
        tags = run.data.tags
        if "cloudseg.kind" not in tags:
            continue
        alive = _process_alive(tags.get("cloudseg.proc", ""))
        beat = float(tags.get("cloudseg.heartbeat", run.info.start_time / 1000))
        dead = (run.info.run_id in (extra_dead or set())) or alive is False or (
            alive is None and now - beat > STALE_AFTER_S)
        if dead:
            client.set_tag(run.info.run_id, "cloudseg.closed_by", f"stale-run repair from {process_tag()}")
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            closed.append(run.info.run_id)
    if closed:
        print(f"closed {len(closed)} run(s) left RUNNING by dead processes: {', '.join(closed)}", flush=True)
    return closed


@contextlib.contextmanager
def run_status(run_id: str, pruned: tuple[type[BaseException], ...] = (),
               failure: Callable[[], str | None] | None = None) -> Iterator[None]:
    """End ``run_id`` FINISHED on success, KILLED on interruption (Ctrl-C, SIGTERM), FAILED on any other error.
    An exception of the ``pruned`` types (a trial the pruner stopped) ends it FINISHED with the tags
    ``cloudseg.pruned=true`` and ``cloudseg.pruned_why``: it did what was asked of it, so it is neither a crash nor an
    interruption. ``failure`` says why an interruption is a failure after all (under torchrun: another rank raised,
    and torchrun stopped this one). The exception is raised again in every case but success."""
    client = MlflowClient()
    try:
        with sigterm_as_interrupt():
            yield
    except pruned as exc:
        client.set_tag(run_id, PRUNED_TAG, "true")
        client.set_tag(run_id, "cloudseg.pruned_why", str(exc)[:500] or type(exc).__name__)
        client.set_terminated(run_id, "FINISHED")
        raise
    except KeyboardInterrupt:
        why = failure() if failure is not None else None
        if why:
            client.set_tag(run_id, "cloudseg.error", why[:4000])
            client.set_terminated(run_id, "FAILED")
        else:
            client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        why = (failure() if failure is not None else None) or f"{type(exc).__name__}: {exc}"
        client.set_tag(run_id, "cloudseg.error", why[:4000])
        client.set_terminated(run_id, "FAILED")
        raise
    else:
        client.set_terminated(run_id, "FINISHED")


# the training loop's per-epoch figures -> their MLflow names; the scheduled lr is ``lr_now`` because ``lr`` is the
# config's param (runs logged before the rename hold a metric ``lr``: ``cloudseg.analysis.RENAMED_METRICS``)
EPOCH_METRICS = {"train_loss": "train_loss", "val_jaccard": "val_jaccard", "lr": "lr_now",
                 "chips_per_s": "chips_per_s"}


class EpochLogger:
    """Training callback: logs each epoch's metrics with step = epoch and refreshes the heartbeat tag."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = MlflowClient()

    def __call__(self, epoch: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(EPOCH_METRICS[k], float(metrics[k]), ts, epoch)
                                                     for k in EPOCH_METRICS if k in metrics])
        self.client.set_tag(self.run_id, "cloudseg.heartbeat", str(int(time.time())))


def log_params(run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_json(run_id: str, obj: dict, name: str) -> None:
    MlflowClient().log_text(run_id, json.dumps(obj, indent=2, sort_keys=True), name)


def log_file(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


def download(run_id: str, artifact_path: str, dst: Path | str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="cloudseg-")


def check_store(storage_url: str | None = None) -> None:
    """Fail early and clearly when the MLflow tracking store cannot be reached (SystemExit naming it); warn when a
    study shared through ``storage_url`` would log to this machine's own MLflow store."""
    uri = tracking_uri()
    # MLflow retries an unreachable server for minutes by default; at start-up one quick retry says enough
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        hint = "\n  is `mlflow server` running there and reachable from this host?" if uri.startswith("http") else ""
        raise SystemExit(f"error: cannot reach the MLflow tracking store {uri!r}: {type(exc).__name__}: "
                         f"{str(exc)[:600]}{hint}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if storage_url and not storage_url.startswith("sqlite") and uri.startswith(("sqlite", "file", "/")):
        print(f"warning: the study is shared through {storage_url.split('@')[-1]} but MLflow logs to this machine's "
              f"{uri}; set MLFLOW_TRACKING_URI to the shared tracking server", file=sys.stderr, flush=True)


def echo_stores() -> None:
    """Print where runs land (the brief: store paths are printed at start)."""
    print(f"MLflow tracking URI: {tracking_uri()}" + ("" if os.environ.get("MLFLOW_TRACKING_URI") else
                                                     f"  (artifacts: {artifacts_root()})"), file=sys.stderr,
          flush=True)
