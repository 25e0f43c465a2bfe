"""Does a second rank pay? chips/s with 2 ranks x 1 thread over 1 rank x 1 thread, for each of two recipes: the
default one, and the same with the GPU recipes' EfficientNet encoder (``efficientnet-b1``, as in gpu.yaml and
full.yaml), whose unused classifier head once made DDP fail at its second step.

    python experiments/bench_ddp.py [--config experiments/configs/default.yaml] [--steps 8] [--ranks 2]
        [--recipes default,efficientnet] [--set key=value]...

Both sides train the same global batch (``batch_size``; each of N ranks takes ``batch_size / N``) with one torch
thread per rank, on the config's data, with the real ``Trainer`` (data loading, augmentation, DDP's gradient
all-reduce); one warm-up epoch, then one timed epoch of ``--steps`` optimiser steps. No MLflow. Last line:
``ddp_speedup=<chips/s with N ranks / chips/s with 1>``, the smallest over the recipes measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloudseg.paths import CONFIGS_DIR

# recipe name -> config overrides on top of --config and --set
RECIPES = {"default": [], "efficientnet": ["encoder=efficientnet-b1"]}


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): warm up, time one epoch, rank 0 prints its chips/s as JSON."""
    import torch

    from cloudseg import distributed as dist
    from cloudseg.config import apply_overrides, load_config
    from cloudseg.data.sources import fold_ids, load_split
    from cloudseg.training import Trainer

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.sets)
    dist.setup(cfg.device)
    cfg = apply_overrides(cfg, {"steps_per_epoch": args.steps, "epochs": 2, "num_threads": 1}, "bench_ddp")
    root, split = load_split(cfg)
    train_ids, val_ids = fold_ids(cfg, split)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, split, train_ids, val_ids, tmp)
        trainer.build()
        trainer.train_one_epoch(1)  # warm-up: first-call costs, loader start
        dist.barrier()
        t0 = time.perf_counter()
        metrics = trainer.train_one_epoch(2)
        dist.barrier()
        wall = time.perf_counter() - t0
    if dist.is_main():
        chips = args.steps * cfg.batch_size
        print(json.dumps({"chips_per_s": chips / wall, "wall_s": wall, "ranks": dist.world(),
                          "loss": metrics["train_loss"]}), flush=True)
    dist.teardown()


def measure(args: argparse.Namespace, ranks: int, recipe: str) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--config", str(args.config), "--steps", str(args.steps)]
    me += [x for s in [*RECIPES[recipe], *args.sets] for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{recipe}: {ranks} rank(s) failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIGS_DIR / "default.yaml")
    p.add_argument("--steps", type=int, default=8, help="timed optimiser steps (after one warm-up epoch)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if not recipes or unknown:
        p.error(f"--recipes {args.recipes!r}: choose from {', '.join(RECIPES)}")
    speedups = {}
    print(f"{'recipe':14s} {'ranks x threads':16s} {'chips/s':>8s} {'wall_s':>8s} {'speed-up':>9s}")
    for recipe in recipes:
        one = measure(args, 1, recipe)
        many = measure(args, args.ranks, recipe)
        speedups[recipe] = many["chips_per_s"] / one["chips_per_s"]
        for r, up in ((one, ""), (many, f"{speedups[recipe]:.3f}")):
            ranks = f"{r['ranks']} x 1"
            print(f"{recipe:14s} {ranks:16s} {r['chips_per_s']:8.3f} {r['wall_s']:8.2f} {up:>9s}", flush=True)
    print(f"ddp_speedup={min(speedups.values()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
