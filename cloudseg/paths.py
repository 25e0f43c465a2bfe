"""Where things live. Paths are relative to the repository root, never to the current directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
SYNTHETIC_DIR = DATA_DIR / "synthetic"
MLFLOW_DB = REPO_ROOT / "mlflow.db"
MLARTIFACTS = REPO_ROOT / "mlartifacts"
OPTUNA_DB = REPO_ROOT / "optuna.db"
SUBMISSIONS_DIR = REPO_ROOT / "submissions"
CONFIGS_DIR = REPO_ROOT / "experiments" / "configs"
RUNTIME_PYTHON = REPO_ROOT / ".venv-runtime" / "bin" / "python"


def real_data_dir() -> Path:
    """The real On Cloud N sample: ``$CLOUDSEG_REAL_DATA`` or ``../shared/data/oncloudn`` beside the checkout."""
    env = os.environ.get("CLOUDSEG_REAL_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data" / "oncloudn").resolve()


def tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or the repository's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLFLOW_DB}"


def optuna_storage() -> str:
    """Default Optuna storage URL (the repository's sqlite file)."""
    return f"sqlite:///{OPTUNA_DB}"
