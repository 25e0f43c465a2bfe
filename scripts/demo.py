"""`make demo`: the main job on the synthetic default, printing progress.

Stages run in order; each prints what it did and where its output landed.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from cloudseg.data.validate import validate_split
from cloudseg.metrics import JaccardAccumulator
from cloudseg.paths import REPO_ROOT, real_data_dir


def stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


def main() -> int:
    t0 = time.time()
    print(f"repository: {REPO_ROOT}")
    stage("data: real sample")
    real = real_data_dir()
    if (real / "train_metadata.csv").is_file():
        split = validate_split(real, "train", load=True)
        acc = JaccardAccumulator()
        for chip_id in split.ids:
            acc.add(chip_id, np.ones((512, 512), np.uint8), split.masks[chip_id])
        print(f"{real}: {len(split.ids)} chips validated; all-cloud baseline jaccard={acc.score():.10f}")
    else:
        print(f"real sample not found at {real}: skipped")
    print(f"\ndemo finished in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
