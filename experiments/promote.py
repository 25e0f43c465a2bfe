"""Promote the best MLflow run(s) into a zip-ready competition submission.

    python experiments/promote.py [--experiment NAME] [--study NAME] [--run-id ID]... [--metric NAME]
                                  [--top-k K] [--name NAME] [--tta flip|none|...] [--batch-size N]

Writes ``submissions/<name>/`` (``main.py`` at the root, ``assets/``, ``MANIFEST.json``) and
``submissions/<name>.zip``. Only FINISHED runs with the metric and a checkpoint are considered; a cv run is
promoted as the ensemble of its folds' models. The submission must parse as Python 3.9 and import only the
runtime's packages, and every model must exist with the same weights layout in the runtime's smp 0.2.1.
The work is done by ``cloudseg.tracking.promote``.
"""

from __future__ import annotations

import sys

from cloudseg.tracking.promote import main

if __name__ == "__main__":
    sys.exit(main())
