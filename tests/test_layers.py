"""The house's layers: only ``cloudseg/tracking/`` (and ``experiments/``) may import MLflow or Optuna."""

from __future__ import annotations

import ast
from pathlib import Path

from cloudseg.paths import REPO_ROOT

TRACKERS = ("mlflow", "optuna", "optuna_dashboard")


def tracker_imports(path: Path) -> list[str]:
    """``module:line`` of every import of MLflow or Optuna in a Python file, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [f"{n}:{node.lineno}" for n in names if n.split(".")[0] in TRACKERS]
    return found


def test_only_tracking_imports_mlflow_or_optuna():
    offenders = {}
    for path in sorted((REPO_ROOT / "cloudseg").rglob("*.py")):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[:2] == ("cloudseg", "tracking"):
            continue
        hits = tracker_imports(path)
        if hits:
            offenders[str(rel)] = hits
    assert not offenders, f"MLflow/Optuna imported outside cloudseg/tracking/: {offenders}"


def test_the_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mlflow.tracking import MlflowClient\n    import optuna.trial\n")
    assert tracker_imports(probe) == ["mlflow.tracking:2", "optuna.trial:3"]
