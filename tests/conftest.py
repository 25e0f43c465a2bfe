"""Shared fixtures. Nothing here downloads; MLflow and Optuna point at temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("TQDM_DISABLE", "1")
# One thread per process: tests start worker subprocesses side by side, and OpenMP threads that outnumber free
# cores spin and slow everything down several times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from cloudseg.paths import real_data_dir  # noqa: E402
from tests.data.fixtures import make_dataset  # noqa: E402

pytest_plugins = ["tests.services"]  # throwaway PostgreSQL + MLflow server for the multi-host tests

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """6 labeled 512x512 chips over 3 locations; read-only by convention (copy before mutating)."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), n_chips=6)


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A fresh, mutable copy-sized dataset for tests that break files on purpose."""
    return make_dataset(tmp_path / "data", n_chips=4, locations=("Alpha", "Beta"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real On Cloud N sample. Skips where absent, except under CI=true where absence is a failure."""
    root = real_data_dir()
    if not (root / "train_metadata.csv").is_file():
        msg = f"real sample not found at {root} (set CLOUDSEG_REAL_DATA or place it at ../shared/data/oncloudn)"
        if IN_CI:
            pytest.fail(msg + " — required under CI=true")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite store, made once: creating one runs every schema migration."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_tmp(tmp_path, monkeypatch, _mlflow_template):
    """A throwaway sqlite MLflow store (a copy of the migrated template); yields its tracking URI."""
    import shutil

    shutil.copyfile(_mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CLOUDSEG_MLARTIFACTS", str(tmp_path / "mlartifacts"))
    monkeypatch.setenv("CLOUDSEG_STATE_ROOT", str(tmp_path / "state"))  # never the checkout's .cache/runs
    import mlflow

    mlflow.set_tracking_uri(uri)  # the process-wide URI outranks the variable once any code has set it
    yield uri
    mlflow.set_tracking_uri(None)
