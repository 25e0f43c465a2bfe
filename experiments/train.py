"""Train one model (or every fold with cv=true) and track it in MLflow.

    python experiments/train.py --config experiments/configs/default.yaml [--set key=value]... [--data DIR]
    python experiments/train.py --resume RUN_ID
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudseg.config import Config, ConfigError, apply_overrides, load_config, validate_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file of overrides (partial); defaults in cloudseg/config.py")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); the key must exist and keep its type")
    p.add_argument("--data", help="data folder in the competition layout (same as --set data=DIR)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run from its last checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.sets, data=args.data)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking
    from cloudseg.tracking.runs import cross_validate, load_split, resolve_init, train_fold

    tracking.echo_stores()
    if args.resume:
        tracking.setup(cfg.experiment)
        client = MlflowClient()
        try:
            run = client.get_run(args.resume)
        except Exception as exc:
            print(f"--resume {args.resume}: no such run in {tracking.tracking_uri()} ({exc})", file=sys.stderr)
            return 2
        if run.info.status == "FINISHED":
            print(f"--resume {args.resume}: run already FINISHED; nothing to resume", file=sys.stderr)
            return 2
        with tracking.scratch_dir() as tmp:
            logged = json.loads(Path(tracking.download(args.resume, "config.json", tmp)).read_text())
        cfg = apply_overrides(Config(), logged, f"config.json of run {args.resume}")
        validate_config(cfg)
        exp_name = client.get_experiment(run.info.experiment_id).name
        cfg = apply_overrides(cfg, {"experiment": exp_name}, "resume")
        tracking.close_stale_runs([run.info.experiment_id])
        root, split = load_split(cfg)
        if run.data.tags.get("cloudseg.kind") == "cv":
            out = cross_validate(cfg, root, split, resume_run_id=args.resume)
        else:
            out = train_fold(cfg, root, split, run.data.tags.get("cloudseg.kind", "train"), resume_run_id=args.resume)
    else:
        exp_id = tracking.setup(cfg.experiment)
        try:
            resolve_init(cfg.init_from)  # a bad init_from fails here, before any run starts
        except (FileNotFoundError, ValueError) as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        tracking.close_stale_runs([exp_id])
        root, split = load_split(cfg)
        out = cross_validate(cfg, root, split) if cfg.cv else train_fold(cfg, root, split)
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
