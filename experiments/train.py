"""Train one model (or every fold with cv=true) and track it in MLflow.

    python experiments/train.py --config experiments/configs/default.yaml [--set key=value]... [--data DIR]
    python experiments/train.py ... --seeds 0,1,2       # one repeat parent, a child run per seed
    python experiments/train.py --resume RUN_ID
    torchrun --nproc_per_node=N experiments/train.py ...   # one run over N ranks (rank 0 talks to MLflow)

One run, one path: the config (loaded, or the interrupted run's own), the starting weights (``init_from``,
resolved before any run opens; a pretraining named by a YAML config is trained first, as its own run), the data
(``cloudseg.data.sources``), then ``cloudseg.tracking.runs.train_fold`` / ``cross_validate``, which open the run,
train, log and end it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cloudseg.config import Config, ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file of overrides (partial); defaults in cloudseg/config.py")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); the key must exist and keep its type")
    p.add_argument("--data", help="data folder in the competition layout (same as --set data=DIR)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--seeds", help="comma-separated seeds: the same config once per seed under one repeat parent "
                   "run, which logs <metric>_mean, _sd, _ci_low, _ci_high of its children's figures")
    args = p.parse_args(argv)
    if args.seeds is not None:
        try:
            args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
        if not args.seeds or len(set(args.seeds)) != len(args.seeds):
            p.error("--seeds needs at least one seed, each once")
        if args.resume:
            p.error("--seeds and --resume: resuming a repeat parent repeats its own seeds; give --resume alone")
    return args


def prepare(args: argparse.Namespace, cfg: Config) -> tuple[Config, str, list[int] | None, Path | None]:
    """Everything that asks MLflow before a run opens (rank 0 alone under torchrun): the resumed run's own
    config, the experiment, a pretraining named by a YAML config (trained first, as its own run), the starting
    weights, and the repair of runs left RUNNING by dead processes."""
    from cloudseg import tracking
    from cloudseg.tracking import runs

    kind = "repeat" if args.seeds else "cv" if cfg.cv else "train"
    seeds = args.seeds
    if args.resume:
        tracking.connect()
        cfg, kind = runs.resumable(args.resume)
        if kind == "repeat":
            seeds = runs.repeat_seeds(args.resume)
    exp_id = tracking.setup(cfg.experiment)
    if not args.resume:
        runs.ensure_pretraining(cfg.init_from)
    init_weights = runs.resolve_init(cfg.init_from)
    tracking.close_stale_runs([exp_id])
    return cfg, kind, seeds, init_weights


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.sets, data=args.data)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from cloudseg import distributed as dist
    from cloudseg import tracking
    from cloudseg.data import sources
    from cloudseg.data.validate import DatasetError
    from cloudseg.devices import DeviceError, resolve_device
    from cloudseg.tracking import runs

    try:  # a GPU this torch build cannot drive is refused here, with the fix, before any run opens
        dist.setup(cfg.device)  # torchrun: join the group (NCCL where this rank uses a GPU, else gloo)
        resolve_device(cfg.device, dist.local_rank())
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refused = (ConfigError, runs.RunError, DatasetError, FileNotFoundError, ValueError)
    what = f"--resume {args.resume}" if args.resume else "error"
    problem, prepared = None, None
    if dist.is_main():
        tracking.echo_stores()
        try:
            prepared = prepare(args, cfg)
        except refused as exc:
            problem = f"{what}: {exc}"
    problem, prepared = dist.broadcast((problem, prepared))
    if problem is None:
        cfg, kind, seeds, init_weights = prepared
        if kind == "repeat" and dist.active():
            problem = "error: --seeds under torchrun: start one torchrun job per seed (--set seed=S)"
        try:
            root, split = sources.load_split(cfg)
            sources.fold_ids(cfg, split)  # a fold that cannot be made fails here, before any run opens
        except refused as exc:
            problem = problem or f"{what}: {exc}"
    if problem:
        if dist.is_main():
            print(problem, file=sys.stderr)
        dist.teardown()
        return 2
    if kind == "repeat":
        out = runs.repeat(cfg, root, split, seeds, resume_run_id=args.resume, init_weights=init_weights)
    elif kind == "cv":
        out = runs.cross_validate(cfg, root, split, resume_run_id=args.resume, init_weights=init_weights)
    else:
        out = runs.train_fold(cfg, root, split, kind, resume_run_id=args.resume, init_weights=init_weights)
    main_rank = dist.is_main()
    dist.teardown()
    if main_rank:
        print(f"run_id={out.run_id}")
        for k, v in out.metrics.items():
            print(f"{k}={v:.6f}" if isinstance(v, float) else f"{k}={v}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: the run is marked KILLED; continue it with --resume RUN_ID", file=sys.stderr)
        sys.exit(130)
