"""Does the data path scale? Loader throughput per core, and peak memory of a run as the split grows.

    python experiments/bench_data.py [--small 100] [--large 1000] [--batches 12] [--skip-rss]

1. ``loader chips/s per core``: one process with one thread (``num_workers=0``) delivering batches of the
   default recipe's augmentation on full 512 chips, read from disk (a split that is not held in memory),
   normalised and collated; the first batch is not timed. Measured on the real sample where it is present (the
   competition's files are uncompressed TIFs), else on the large synthetic split (deflate-compressed TIFs, about
   a third slower to read); both figures are printed when both exist.
2. ``rss_ratio``: the peak RSS of a one-epoch run (2 steps) of ``default.yaml`` on ``--large`` synthetic chips over
   the same on ``--small`` chips, each a fresh ``experiments/train.py`` process with MLflow in a temporary store.
   ``in_memory=auto`` holds the small split and reads the large one from disk.

Synthetic chips are generated once under ``.cache/bench_data/``. Last line:
``loader_chips_per_s_per_core=<x> rss_ratio=<y>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cloudseg.paths import CONFIGS_DIR, REPO_ROOT

CACHE = REPO_ROOT / ".cache" / "bench_data"


def dataset(n: int) -> Path:
    from cloudseg.data.synthetic import is_complete, write_synthetic

    path = CACHE / f"synthetic-{n}"
    if not is_complete(path):
        print(f"generating {n} synthetic chips in {path} (once)", flush=True)
        write_synthetic(path, n, seed=0, n_test=0, n_locations=max(4, n // 25), overwrite=True)
    return path


def loader_rate(root: Path, batches: int, batch_size: int) -> float:
    """Chips per second one single-threaded process delivers, from disk, default augmentation, full chips."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from cloudseg.config import load_config
    from cloudseg.data.dataset import ChipDataset
    from cloudseg.data.transforms import Normalization, build_train_transform
    from cloudseg.data.validate import validate_split

    torch.set_num_threads(1)
    cfg = load_config(CONFIGS_DIR / "default.yaml")
    split = validate_split(root, "train", labels=True, deep=False)
    ds = ChipDataset(split, transform=build_train_transform(None, cfg.aug_strength, seed=0),
                     normalization=Normalization())
    sampler = RandomSampler(ds, replacement=True, num_samples=(batches + 1) * batch_size,
                            generator=torch.Generator().manual_seed(0))
    it = iter(DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0))
    next(it)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def peak_rss_gb(root: Path) -> tuple[float, float]:
    """(peak RSS in GB, wall s) of a one-epoch, 2-step default.yaml run on ``root`` in its own process."""
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "CLOUDSEG_MLARTIFACTS":
               f"{tmp}/mlartifacts", "CLOUDSEG_STATE_ROOT": f"{tmp}/state", "TQDM_DISABLE": "1"}
        cmd = [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--config",
               str(CONFIGS_DIR / "default.yaml"), "--data", str(root), "--set", "epochs=1", "--set",
               "steps_per_epoch=2", "--set", "experiment=bench-data", "--set", "plot_chips=2"]
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"training on {root} failed:\n{out[-3000:]}")
        mode = next((line for line in out.splitlines() if line.startswith("data: ")), "")
        print(f"  {mode}", flush=True)
        return usage.ru_maxrss / 1e6, time.time() - t0  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=100, help="chips of the small run")
    p.add_argument("--large", type=int, default=1000, help="chips of the large run")
    p.add_argument("--batches", type=int, default=12, help="timed loader batches")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-rss", action="store_true", help="only the loader rate")
    args = p.parse_args(argv)

    from cloudseg.paths import real_data_dir

    small, large = dataset(args.small), dataset(args.large)
    print(f"{'measure':40s} value")
    rate = loader_rate(large, args.batches, args.batch_size)
    print(f"{'loader chips/s, synthetic (deflate)':40s} {rate:.1f}")
    real = real_data_dir()
    if (real / "train_metadata.csv").is_file():
        rate = loader_rate(real, args.batches, args.batch_size)
        print(f"{'loader chips/s, real sample (as released)':40s} {rate:.1f}")
    ratio = float("nan")
    if not args.skip_rss:
        rss_small, wall_small = peak_rss_gb(small)
        rss_large, wall_large = peak_rss_gb(large)
        ratio = rss_large / rss_small
        print(f"{f'peak RSS, {args.small} chips':40s} {rss_small:.2f} GB ({wall_small:.0f} s)")
        print(f"{f'peak RSS, {args.large} chips':40s} {rss_large:.2f} GB ({wall_large:.0f} s)")
    print(f"loader_chips_per_s_per_core={rate:.1f} rss_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
