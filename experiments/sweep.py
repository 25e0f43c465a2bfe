"""An Optuna study over a training config, every trial a nested MLflow run.

    python experiments/sweep.py --config experiments/configs/default.yaml --study NAME --n-trials N
        [--timeout S] [--storage URL] [--workers K] [--data DIR] [--set key=value]... [--space FILE]

Re-running the same command resumes the study. ``--n-trials`` counts trials across all workers of the study.
The search space is read from ``<config>-space.yaml`` beside the config (else ``space.yaml``), or ``--space``.
A worker's loop and a trial live in ``cloudseg.tracking.study`` (``run_worker``, ``trial_objective``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from cloudseg.config import ConfigError, load_config


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
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n_trials < 1 or args.workers < 1:
        p.error(f"--n-trials ({args.n_trials}) and --workers ({args.workers}) must be >= 1")
    return args


def spawn_workers(argv: list[str], workers: int) -> int:
    """``workers`` copies of this command, each with its own ``--worker-index``; the worst exit status."""
    cleaned, skip = [], False
    for a in argv:  # drop "--workers K"
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            cleaned.append(a)
    procs = [subprocess.Popen([sys.executable, __file__, *cleaned, "--worker-index", str(i)],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for i in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        codes = [p.wait() for p in procs]
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from cloudseg import tracking
    from cloudseg.paths import optuna_storage
    from cloudseg.tracking import study as studies
    from cloudseg.tracking.runs import RunError, ensure_pretraining, resolve_init

    url = args.storage or optuna_storage()
    try:
        cfg = load_config(args.config, args.sets, data=args.data)
        space = studies.load_space(args.space or studies.space_beside(args.config))
        tracking.echo_stores()
        # the study and the MLflow store are made here, before any worker starts, so workers never race for tables
        study = studies.open_study(args.study, studies.make_storage(url), space, cfg, args.worker_index or 0)
        if args.worker_index is not None:  # a worker started by spawn_workers()
            studies.run_worker(study, cfg, args.study, url, args.n_trials, args.timeout, args.worker_index,
                               resolve_init(cfg.init_from))
            return 0
        t0 = time.time()
        tracking.check_store(args.storage)
        tracking.setup(cfg.experiment)
        ensure_pretraining(cfg.init_from)  # a pretraining named by a YAML config trains first, as its own run
        init_weights = resolve_init(cfg.init_from)
        if args.workers == 1:
            studies.run_worker(study, cfg, args.study, url, args.n_trials, args.timeout, 0, init_weights)
            rc = 0
        else:
            rc = spawn_workers(argv, args.workers)
    except (ConfigError, studies.StudyError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=url)
    print(f"study={args.study} counted_trials={studies.counted(study)} states={studies.summary(study)} "
          f"wall_s={time.time() - t0:.1f}")
    if studies.summary(study)["COMPLETE"]:
        print(f"best_val_jaccard={study.best_value:.6f} best_trial={study.best_trial.number} "
              f"params={study.best_trial.params}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
