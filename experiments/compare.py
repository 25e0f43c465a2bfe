"""Is run A better than run B? A paired bootstrap over the chips both are scored on.

    python experiments/compare.py RUN_A RUN_B [--metric M] [--n-boot N] [--seed S] [--no-log]

M: all (default), clean, or cv_jaccard / best_val_jaccard (= all), cv_jaccard_clean (= clean).
RUN_A and RUN_B are MLflow run ids of single (train/trial), cv or repeat (--seeds) runs scored on the same
chips; every figure is the pooled Jaccard at the configured threshold (the ``_fixed`` per-chip counts). Prints
a table, logs the outcome (histogram of bootstrap differences in ``plots/``) as a run of kind ``compare`` in
A's experiment, and ends with one line:

    delta=<A-B> ci_low=<x> ci_high=<x> verdict=<a_better|b_better|no_detectable_difference>

Exit status 2 for an unknown run, runs scored on different chips or a bad option. The work is done by
``cloudseg.tracking.compare``.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", metavar="RUN_A", help="MLflow run id of the first run (delta = A - B)")
    p.add_argument("run_b", metavar="RUN_B", help="MLflow run id of the second run")
    p.add_argument("--metric", default="all",
                   help="all (every labeled chip) or clean (suspect labels left out); the MLflow names "
                        "cv_jaccard, cv_jaccard_clean, best_val_jaccard map to these")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap replicates")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's random draws")
    p.add_argument("--no-log", action="store_true", help="print only; log no compare run to MLflow")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr to what went wrong
    from cloudseg import tracking
    from cloudseg.tracking import compare, runs

    tracking.echo_stores()
    tracking.connect()
    try:
        cmp = compare.compare(args.run_a, args.run_b, args.metric, args.n_boot, args.seed)
    except (runs.RunError, compare.CompareError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(compare.format_table(cmp))
    if not args.no_log:
        print(f"compare run: {compare.log_comparison(cmp)}")
    print(compare.last_line(cmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
