"""No phoning home unasked: the libraries' usage telemetry and update checks are off in cloudseg's processes.

``import cloudseg`` (done first by the ``cloudseg`` CLI, by ``experiments/*.py`` and by the notebooks) sets the
switches below in ``os.environ`` unless the user has set them already, so they hold before MLflow,
albumentations or huggingface_hub are imported, and every subprocess (sweep workers, DataLoader workers,
torchrun ranks) inherits them. Set ``CLOUDSEG_TELEMETRY=1`` to leave every library's own default alone.

This module imports nothing heavy: ``cloudseg/__init__.py`` calls :func:`apply_defaults` on every import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

OPT_IN_VAR = "CLOUDSEG_TELEMETRY"

#: variable -> value that turns the phoning home off, each read by the library named beside it.
DEFAULTS: dict[str, str] = {
    # MLflow 3: usage records to *.mlflow-telemetry.io from a background thread started by `import mlflow`, and
    # the UI's telemetry config. Read by mlflow.telemetry.utils.is_telemetry_disabled (MLFLOW_DISABLE_TELEMETRY,
    # a boolean variable: only true/false/1/0). The same thread sets and pops _MLFLOW_TELEMETRY_SESSION_ID in
    # os.environ, which races with code iterating os.environ (#20: KeyError in a sweep worker).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # albumentations >= 1.4: `import albumentations` asks pypi.org for a newer version (check_version.py).
    "NO_ALBUMENTATIONS_UPDATE": "1",
    # huggingface_hub (timm's and smp's hub downloads): usage pings of huggingface_hub.utils.send_telemetry;
    # read once, at import, by huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY.
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

_TRUE = {"1", "true", "yes", "on"}


def opted_in(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the user asked for the libraries' own defaults (``CLOUDSEG_TELEMETRY=1``/true/yes/on)."""
    environ = os.environ if environ is None else environ
    return environ.get(OPT_IN_VAR, "").strip().lower() in _TRUE


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of :data:`DEFAULTS` that is not set yet (``setdefault``); nothing when opted in.

    Returns the variables this call set. Where MLflow was imported before cloudseg, its telemetry client is
    dropped as well (MLflow rechecks the switch on every event, so no further record is queued).
    """
    environ = os.environ if environ is None else environ
    if opted_in(environ):
        return {}
    applied = {}
    for name, value in DEFAULTS.items():
        if name not in environ:
            environ[name] = value
            applied[name] = value
    if environ is os.environ and "MLFLOW_DISABLE_TELEMETRY" in applied and "mlflow.telemetry.client" in sys.modules:
        _drop_mlflow_client()
    return applied


def _drop_mlflow_client() -> None:
    # only an MLflow that someone else already imported: this module never imports it (tests/test_layers.py)
    client = sys.modules.get("mlflow.telemetry.client")
    try:
        client.set_telemetry_client()  # rechecks is_telemetry_disabled(): None when the switch is on
    except Exception:  # noqa: BLE001 - best effort; never break `import cloudseg` over telemetry
        pass
