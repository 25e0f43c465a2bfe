"""``make real-best``: cross-validate the winning real-data recipe, promote its fold ensemble, verify it.

    python scripts/real_best.py [--data DIR] [--config YAML] [--set key=value]... [--no-verify]

1. ``experiments/train.py --config experiments/configs/real-best.yaml --set cv=true`` trains every
   leave-one-location-out fold under one cv parent run (pooled out-of-fold ``cv_jaccard``, ``cv_jaccard_clean``).
2. ``experiments/promote.py --run-id <cv run> --metric cv_jaccard --name real-best`` writes
   ``submissions/real-best/`` and ``submissions/real-best.zip`` (the ensemble of the folds' models).
3. ``cloudseg verify-submission submissions/real-best.zip --features <data>/test_features`` runs it like the
   competition runtime (``--runtime`` when ``.venv-runtime`` exists; ``make runtime-env`` builds it).

The figure printed at the end is the cross-validation figure (out-of-fold, each fold's model never saw its
location): the ensemble itself has no held-out score on this sample.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "real-best.yaml"


def run(cmd: list[str]) -> str:
    """Run ``cmd`` from the repository root, echo its output as it comes, return it; exit on failure."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"real-best: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return "".join(lines)


def parse_metrics(output: str) -> dict[str, str]:
    """``key=value`` lines printed by experiments/train.py."""
    return dict(re.findall(r"^([A-Za-z_]+)=(\S+)$", output, flags=re.M))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="real data folder in the competition layout (default: the real sample)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the recipe (default real-best.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    p.add_argument("--name", default="real-best", help="submission name")
    p.add_argument("--no-verify", action="store_true", help="skip verify-submission")
    args = p.parse_args(argv)
    t0 = time.time()
    py = sys.executable
    sys.path.insert(0, str(ROOT))
    from cloudseg.paths import real_data_dir

    data = Path(args.data).resolve() if args.data else real_data_dir()
    if not (data / "train_metadata.csv").is_file():
        raise SystemExit(f"real-best: {data} has no train_metadata.csv; pass --data DIR (competition layout)")
    train_cmd = [py, "experiments/train.py", "--config", str(args.config), "--set", "cv=true", "--data", str(data)]
    for s in args.sets:
        train_cmd += ["--set", s]
    metrics = parse_metrics(run(train_cmd))
    run_id = metrics.get("run_id")
    if not run_id:
        raise SystemExit("real-best: experiments/train.py printed no run_id=")
    run([py, "experiments/promote.py", "--run-id", run_id, "--metric", "cv_jaccard", "--name", args.name])
    zip_path = ROOT / "submissions" / f"{args.name}.zip"
    if not args.no_verify:
        features = data / "test_features"
        if not features.is_dir():
            raise SystemExit(f"real-best: {features} does not exist; nothing to verify the submission on")
        cmd = [py, "-m", "cloudseg.cli", "verify-submission", str(zip_path), "--features", str(features)]
        if (ROOT / ".venv-runtime" / "bin" / "python").exists():
            cmd.append("--runtime")
        else:
            print("note: .venv-runtime missing (make runtime-env): verifying with this interpreter", flush=True)
        run(cmd)
    print(f"submission: {ROOT / 'submissions' / args.name}/ and {zip_path}")
    print(f"cross-validation figure (pooled leave-one-location-out, out-of-fold; cv run {run_id}): "
          f"cv_jaccard={metrics.get('cv_jaccard', 'nan')} cv_jaccard_clean={metrics.get('cv_jaccard_clean', 'nan')}")
    print(f"wall time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
