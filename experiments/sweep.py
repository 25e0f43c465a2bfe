"""An Optuna study over a training config, every trial a nested MLflow run.

    python experiments/sweep.py --config experiments/configs/default.yaml --study NAME --n-trials N
        [--timeout S] [--storage URL] [--workers K] [--data DIR] [--set key=value]... [--space FILE]

Re-running the same command resumes the study. ``--n-trials`` counts trials across all workers of the study.
The search space is read from ``<config>-space.yaml`` beside the config (else ``space.yaml``), or ``--space``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudseg.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="base training config (YAML, partial override of the defaults)")
    p.add_argument("--study", required=True, help="study name (also tagged on every MLflow run)")
    p.add_argument("--n-trials", type=int, required=True, help="trials in the study, counted across workers")
    p.add_argument("--timeout", type=float, default=None, help="stop starting new trials after S seconds")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default: sqlite optuna.db at the repo root)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--data", help="data folder (same as --set data=DIR)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--space", type=Path, default=None, help="search-space YAML (default: beside the config)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_tracking(storage_url: str | None = None) -> None:
    """Fail early and clearly when the MLflow tracking store cannot be reached; warn when a shared study would log
    to this machine's own MLflow store."""
    from mlflow.tracking import MlflowClient

    from cloudseg.paths import tracking_uri

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


def reconcile(study, client, current_parent: str | None = None) -> None:
    """Close the MLflow runs of trials that Optuna failed because their worker died (heartbeat)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id or "error" in t.user_attrs:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:
            continue
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "cloudseg.closed_by", "sweep: trial failed by Optuna heartbeat (worker died)")
            client.set_terminated(run_id, "KILLED")
            print(f"closed run {run_id} of trial {t.number} (its worker died)", flush=True)
        parent = run.data.tags.get("mlflow.parentRunId")  # the dead worker's sweep run, wherever it ran
        if parent:
            try:
                prun = client.get_run(parent)
            except Exception:
                continue
            if prun.info.status == "RUNNING" and parent != current_parent:
                client.set_tag(parent, "cloudseg.closed_by", "sweep: its worker died (trial heartbeat failed)")
                client.set_terminated(parent, "KILLED")


def run_worker(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking
    from cloudseg.paths import optuna_storage
    from cloudseg.tracking.runs import load_split, start_run
    from cloudseg.tracking.study import (
        counted, display_url, figures, load_space, make_storage, open_study, space_beside, trial_objective,
    )

    cfg = load_config(args.config, args.sets, data=args.data)
    space = load_space(args.space or space_beside(args.config))
    url = args.storage or optuna_storage()
    storage = make_storage(url)
    # workers on other hosts, and restarted ones, must not replay the same random draws
    seed = zlib.crc32(f"{cfg.seed}:{args.worker_index}:{socket.gethostname()}:{os.getpid()}".encode())
    study = open_study(args.study, storage, space, cfg, seed=seed)
    print(f"[worker {args.worker_index}] study '{args.study}' on {display_url(url)}: "
          f"{counted(study)}/{args.n_trials} trials done", flush=True)
    check_tracking()  # prepare_stores() already warned about a local store
    exp_id = tracking.setup(cfg.experiment)
    client = MlflowClient()
    tracking.close_stale_runs([exp_id])
    reconcile(study, client)
    root, split = load_split(cfg)
    parent = start_run(cfg, "sweep", {"cloudseg.study": args.study, "cloudseg.worker": str(args.worker_index),
                                      "cloudseg.storage": url.split("@")[-1]},
                       run_name=f"{args.study}-worker{args.worker_index}")
    deadline = time.time() + args.timeout if args.timeout else None

    objective = trial_objective(study, cfg, space, root, split, parent, args.study, args.n_trials)

    with tracking.run_status(parent):
        while counted(study) < args.n_trials and (deadline is None or time.time() < deadline):
            study.optimize(objective, n_trials=1, catch=(Exception,))
            reconcile(study, client, parent)
            client.set_tag(parent, "cloudseg.heartbeat", str(int(time.time())))
            last = study.trials[-1]
            if last.user_attrs.get("surplus"):
                break
        finish_parent(study, parent, client, figures)
    return 0


def finish_parent(study, parent: str, client, figures) -> None:
    from optuna.trial import TrialState

    from cloudseg import tracking

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    client.log_metric(parent, "trials_counted", float(len(complete)))
    if complete:
        best = study.best_trial
        client.log_metric(parent, "best_value", float(best.value))
        client.set_tag(parent, "cloudseg.best_trial", str(best.number))
        tracking.log_json(parent, {"number": best.number, "value": best.value, "params": best.params,
                                   "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, "best_trial.json")
        for k, v in best.params.items():
            client.set_tag(parent, f"best.{k}", str(v))
    with tracking.scratch_dir() as tmp:
        drawn = figures(study, Path(tmp) / "optuna")
        for name, path in drawn.items():
            if path.endswith(".png"):
                client.log_artifact(parent, path, "optuna")
            else:
                client.set_tag(parent, f"optuna.{name}", path[:500])


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run K worker processes on the same storage and report the study at the end."""
    t0 = time.time()
    prepare_stores(args)
    if args.workers <= 1:
        rc = run_worker(args)
    else:
        cleaned, skip = [], False
        for a in argv:  # drop "--workers K"
            if skip:
                skip = False
                continue
            if a == "--workers":
                skip = True
                continue
            if a.startswith("--workers="):
                continue
            cleaned.append(a)
        procs = [subprocess.Popen([sys.executable, __file__, *cleaned, "--worker-index", str(i)],
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}) for i in range(args.workers)]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            codes = [p.wait() for p in procs]
        rc = max(codes)
    summarize(args, time.time() - t0)
    return rc


def prepare_stores(args: argparse.Namespace) -> None:
    """Create the study and the MLflow store once, before workers start, so they never race to create tables."""
    from cloudseg import tracking
    from cloudseg.paths import optuna_storage
    from cloudseg.tracking.study import load_space, make_storage, open_study, space_beside

    cfg = load_config(args.config, args.sets, data=args.data)
    space = load_space(args.space or space_beside(args.config))
    open_study(args.study, make_storage(args.storage or optuna_storage()), space, cfg, seed=cfg.seed)
    check_tracking(args.storage)
    tracking.setup(cfg.experiment)


def summarize(args: argparse.Namespace, wall: float) -> None:
    import optuna
    from optuna.trial import TrialState

    from cloudseg.paths import optuna_storage
    from cloudseg.tracking.study import counted

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=args.storage or optuna_storage())
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    print(f"study={args.study} counted_trials={counted(study)} states={states} wall_s={wall:.1f}")
    if states["COMPLETE"]:
        print(f"best_val_jaccard={study.best_value:.6f} best_trial={study.best_trial.number} "
              f"params={study.best_trial.params}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from cloudseg import tracking
    from cloudseg.tracking.study import StudyError

    try:
        load_config(args.config, args.sets, data=args.data)
        tracking.echo_stores()
        if args.worker_index:  # a worker started by launch()
            return run_worker(args)
        return launch(args, argv)
    except (ConfigError, StudyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
