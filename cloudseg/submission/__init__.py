"""Competition submissions: the ``main.py`` template, assembling, zipping and verifying a submission folder.

A submission folder (what ``experiments/promote.py`` writes, and what ``main.py`` expects)::

    main.py                  copy of cloudseg/submission/main.py (self-contained, runtime versions only)
    assets/model_<k>.pt      cloudseg checkpoints (cloudseg.checkpoint.make_checkpoint), k = 0, 1, ...
    assets/inference.json    {"models": ["assets/model_0.pt", ...], "threshold": 0.5 | null, "tta": "flip",
                              "batch_size": 8, "num_workers": 2, "amp": false, "compression": null}
    MANIFEST.json            written by promote (run ids, metrics, git commit, config, sha256 of every file)
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

MAIN_TEMPLATE = Path(__file__).resolve().with_name("main.py")
TTA_CHOICES = ("none", "hflip", "flip", "flip4", "d4")
_SKIP_PARTS = {"__pycache__", ".ipynb_checkpoints", ".git"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".tmp", ".partial"}


def write_submission(
    folder: Path | str,
    checkpoints: list[Path | str],
    threshold: float | None = None,
    tta: str = "flip",
    batch_size: int = 8,
    num_workers: int = 2,
    amp: bool = False,
    compression: str | None = None,
) -> Path:
    """Copy the main.py template and the checkpoints into ``folder`` and write ``assets/inference.json``.

    Args:
        checkpoints: cloudseg checkpoint files, copied to ``assets/model_<k>.pt`` in order (the ensemble).
        threshold: cloud where mean probability >= threshold; None: the first checkpoint's stored threshold.
        tta: one of ``TTA_CHOICES``; predictions are averaged in probability space.

    Returns:
        The folder.
    """
    folder = Path(folder)
    if not checkpoints:
        raise ValueError("a submission needs at least one checkpoint")
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta={tta!r} is not one of {TTA_CHOICES}")
    assets = folder / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MAIN_TEMPLATE, folder / "main.py")
    models = []
    for k, ckpt in enumerate(checkpoints):
        ckpt = Path(ckpt)
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        shutil.copyfile(ckpt, assets / f"model_{k}.pt")
        models.append(f"assets/model_{k}.pt")
    inference = {"models": models, "threshold": threshold, "tta": tta, "batch_size": int(batch_size),
                 "num_workers": int(num_workers), "amp": bool(amp), "compression": compression}
    (assets / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    return folder


def zip_submission(folder: Path | str, zip_path: Path | str) -> Path:
    """Zip ``folder`` with ``main.py`` at the root and relative paths only; caches and temp files left out."""
    folder, zip_path = Path(folder), Path(zip_path)
    if not (folder / "main.py").is_file():
        raise FileNotFoundError(f"{folder / 'main.py'} does not exist: not a submission folder")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(zip_path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_dir() or _SKIP_PARTS & set(rel.parts) or path.suffix in _SKIP_SUFFIXES:
                continue
            zf.write(path, rel.as_posix())
    tmp.replace(zip_path)
    return zip_path
