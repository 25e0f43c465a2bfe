"""`make demo`: the whole loop on the synthetic default, printing progress.

synthetic chips -> short Optuna study (every trial an MLflow run) -> promote the best run -> verify the zip
(Jaccard on the synthetic held-out split, and on the real sample when present) -> where things are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloudseg.paths import RUNTIME_PYTHON, SUBMISSIONS_DIR, real_data_dir, tracking_uri  # noqa: E402

PY = sys.executable
STUDY = os.environ.get("DEMO_STUDY", "demo")
N_TRIALS = os.environ.get("DEMO_TRIALS", "3")


def stage(name: str) -> float:
    print(f"\n=== {name} ===", flush=True)
    return time.time()


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True)


def main() -> int:
    t0 = time.time()
    print(f"repository: {REPO}\nMLflow: {tracking_uri()}\nOptuna: {REPO / 'optuna.db'}")
    stage("1/4 synthetic chips (data/synthetic, generated on first use)")
    from cloudseg.data.synthetic import ensure_synthetic_default

    data = ensure_synthetic_default()
    print(f"data: {data}")
    stage(f"2/4 Optuna study '{STUDY}' ({N_TRIALS} trials; re-running resumes it)")
    run([PY, "experiments/sweep.py", "--config", "experiments/configs/demo.yaml", "--study", STUDY,
         "--n-trials", N_TRIALS])
    stage("3/4 promote the best trial")
    run([PY, "experiments/promote.py", "--study", STUDY, "--name", "demo"])
    zip_path = SUBMISSIONS_DIR / "demo.zip"
    stage("4/4 verify the submission as the competition runtime would run it")
    runtime = ["--runtime"] if RUNTIME_PYTHON.exists() else []
    if not runtime:
        print("(.venv-runtime not built: verifying with this interpreter; `make runtime-env` builds the "
              "competition's Python 3.9 / torch 1.8 environment)")
    cloudseg = [PY, "-m", "cloudseg.cli", "verify-submission", zip_path]
    run([*cloudseg, "--features", data / "test_features", "--labels", data / "test_labels", *runtime])
    real = real_data_dir()
    if (real / "train_labels").is_dir():
        print(f"\nreal sample at {real} (a model trained on synthetic chips only):")
        run([*cloudseg, "--features", real / "train_features", "--labels", real / "train_labels", *runtime])
    print(f"\nsubmission: {zip_path}  (folder {SUBMISSIONS_DIR / 'demo'})")
    print("compare the runs: make ui, then open the address it prints (http://127.0.0.1:5000/cloudseg); "
          "study figures: make dashboard")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
