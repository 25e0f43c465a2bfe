"""Competition submissions: the ``main.py`` template, assembling, zipping and verifying a submission folder.

A submission folder (what ``experiments/promote.py`` writes, and what ``main.py`` expects)::

    main.py                  copy of cloudseg/submission/main.py (self-contained, runtime versions only)
    stac_bands.py            copy of cloudseg/submission/stac_bands.py, which main.py imports only where a model
                             reads supplementary bands (inference.json then has "stac": {...})
    assets/model_<k>.pt      cloudseg checkpoints (cloudseg.checkpoint.make_checkpoint), k = 0, 1, ...
    assets/inference.json    {"models": ["assets/model_0.pt", ...], "threshold": 0.5 | null, "tta": "flip",
                              "batch_size": 8, "num_workers": 2, "amp": false, "compression": null}
    MANIFEST.json            written by promote (run ids, metrics, git commit, config, sha256 of every file)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

MAIN_TEMPLATE = Path(__file__).resolve().with_name("main.py")
STAC_TEMPLATE = Path(__file__).resolve().with_name("stac_bands.py")  # beside main.py where models need STAC bands
TTA_CHOICES = ("none", "hflip", "flip", "flip4", "d4")
# Left out of zips besides every name starting with '.' (.env, .git, .ipynb_checkpoints, ...).
_SKIP_PARTS = {"__pycache__", "mlruns", "mlartifacts"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".tmp", ".partial", ".db", ".sqlite"}
_KEY_SUFFIXES = {".pem", ".key", ".p12", ".pfx"}


def write_submission(
    folder: Path | str,
    checkpoints: list[Path | str],
    threshold: float | None = None,
    tta: str = "flip",
    batch_size: int = 8,
    num_workers: int = 2,
    amp: bool = False,
    compression: str | None = None,
    stac: dict | None = None,
) -> Path:
    """Copy the main.py template and the checkpoints into ``folder`` and write ``assets/inference.json``.

    Args:
        checkpoints: cloudseg checkpoint files, copied to ``assets/model_<k>.pt`` in order (the ensemble).
        threshold: cloud where mean probability >= threshold; None: the first checkpoint's stored threshold.
        tta: one of ``TTA_CHOICES``; predictions are averaged in probability space.
        stac: for models reading supplementary bands, where main.py fetches them (``{"url", "collection",
            "budget_s", "workers"}``). ``stac_bands.py`` is always copied beside main.py (which imports it only then).

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
    shutil.copyfile(STAC_TEMPLATE, folder / "stac_bands.py")
    models = []
    for k, ckpt in enumerate(checkpoints):
        ckpt = Path(ckpt)
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        _copy_checkpoint(ckpt, assets / f"model_{k}.pt")
        models.append(f"assets/model_{k}.pt")
    inference = {"models": models, "threshold": threshold, "tta": tta, "batch_size": int(batch_size),
                 "num_workers": int(num_workers), "amp": bool(amp), "compression": compression}
    if stac:
        inference["stac"] = dict(stac)
    (assets / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    return folder


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint, adding the record of its "same" paddings (``checkpoint.static_paddings``) where it was
    written before checkpoints kept one: its weights were trained under this smp, so this smp's paddings are theirs,
    and main.py needs them where the runtime's smp computes others (EfficientNet encoders)."""
    from cloudseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, static_paddings

    ckpt = load_checkpoint(src)
    paddings = {} if "static_padding" in ckpt else static_paddings(model_from_checkpoint(ckpt))
    if paddings:
        save_checkpoint({**ckpt, "static_padding": paddings}, dst)
    else:
        shutil.copyfile(src, dst)


class SubmissionLinkError(ValueError):
    """A symbolic link in a submission folder points outside it (zipping it would pack a foreign file)."""


def submission_files(folder: Path | str) -> tuple[list[str], list[str]]:
    """What ``zip_submission`` packs from ``folder`` and what it leaves out.

    Packed: regular files, and links to regular files inside ``folder`` (as the file's contents). Left out:
    dotfiles and dot-folders (``.env``, ``.git``, ...), notebooks, caches, temporary files, stores and key
    files, links to folders, and anything that is not a regular file (sockets, pipes, devices).

    Returns:
        (packed, left_out): packed relative POSIX paths, sorted; left_out lines ``<path> (<why>)``.

    Raises:
        SubmissionLinkError: a symbolic link points outside ``folder`` (or nowhere); the message names it.
    """
    folder = Path(folder)
    top = folder.resolve()
    packed: list[str] = []
    left_out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # never descends into linked folders
        here = Path(dirpath)
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.exists() or not target.is_relative_to(top):
                    raise SubmissionLinkError(
                        f"{path} is a symbolic link to {os.readlink(path)}, outside {folder}: replace it "
                        f"with a copy of the file it should hold, or remove it")
            why = _left_out_because(name, path)
            if name in dirnames:
                if why or path.is_symlink():
                    dirnames.remove(name)
                    left_out.append(f"{rel}/ ({why or 'link to a folder'})")
                continue
            if why:
                left_out.append(f"{rel} ({why})")
            else:
                packed.append(rel)
    return sorted(packed), left_out


def _left_out_because(name: str, path: Path) -> str:
    """Why ``path`` does not belong in a submission zip; '' when it does."""
    if name.startswith("."):
        return "dotfile"
    if name in _SKIP_PARTS:
        return "cache or store"
    suffix = Path(name).suffix.lower()
    if suffix == ".ipynb":
        return "notebook"
    if suffix in _SKIP_SUFFIXES:
        return "cache, temporary or store file"
    if suffix in _KEY_SUFFIXES or "secret" in name.lower() or name.lower().startswith("credentials"):
        return "key or secret"
    if not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
        return "not a regular file"
    return ""


def zip_submission(folder: Path | str, zip_path: Path | str,
                   echo: Callable[[str], None] | None = print) -> Path:
    """Zip ``folder`` with ``main.py`` at the root and relative paths only (see ``submission_files``).

    Args:
        echo: gets one line ``left out: <path> (<why>)`` per thing not packed; None for silence.

    Returns:
        The zip path. ``submission_files(folder)[1]`` lists what was left out.

    Raises:
        SubmissionLinkError: a symbolic link in ``folder`` points outside it; nothing is written.
    """
    folder, zip_path = Path(folder), Path(zip_path)
    if not (folder / "main.py").is_file():
        raise FileNotFoundError(f"{folder / 'main.py'} does not exist: not a submission folder")
    packed, left_out = submission_files(folder)
    if "main.py" not in packed:
        raise FileNotFoundError(f"{folder / 'main.py'} is not a regular file of the folder: {left_out}")
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(zip_path.suffix + ".tmp")
    skip = {zip_path.resolve(), tmp.resolve()}  # a zip written inside the folder does not pack itself
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in packed:
            path = folder / rel
            if path.resolve() not in skip:
                zf.write(path.resolve(), rel)  # resolved: a link inside the folder goes in as its file
    tmp.replace(zip_path)
    if echo is not None:
        for line in left_out:
            echo(f"left out: {line}")
    return zip_path
