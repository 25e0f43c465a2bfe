"""What a test needs beyond the base install, and what it says when that is missing.

Outside CI a missing piece skips the test with a reason that names what to install or build; under ``CI=true``
the same is a failure (``tests.services.unavailable``), so a CI run never passes by skipping. ``make test`` and
``-ra`` in pytest's ``addopts`` list every skip with its reason at the end of a run.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from cloudseg.paths import RUNTIME_PYTHON
from tests.services import unavailable

DEV_EXTRA = "pip install -e '.[dev]'"


def runtime_python() -> Path:
    """``.venv-runtime``'s interpreter (the competition runtime's Python 3.9, torch 1.8.1, smp 0.2.1)."""
    if not RUNTIME_PYTHON.is_file():
        unavailable(f"{RUNTIME_PYTHON} is not built: run `make runtime-env`")
    return RUNTIME_PYTHON


def module(name: str, package: str) -> ModuleType:
    """Import ``name``, a module of the dev extra's ``package``; skips (fails under CI=true) naming the install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"needs {package} (module {name}: {exc}): {DEV_EXTRA} or pip install '{package}'")
