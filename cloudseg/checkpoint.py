"""Checkpoints that describe themselves and load under the competition runtime's torch 1.8.

A model checkpoint holds only tensors and plain Python types::

    {"format": "cloudseg-checkpoint", "format_version": 1,
     "model": {"arch": "Unet", "encoder_name": "resnet18", "in_channels": 4, "classes": 1, "kwargs": {}},
     "state_dict": {name: fp32 tensor}, "normalization": {...}, "threshold": 0.5,
     "bands": ["B02", "B03", "B04", "B08"], "config": {...}, "cloudseg_version": "...", "epoch": 3,
     "metrics": {"best_val_jaccard": 0.81}}

so inference rebuilds the model from the file alone (``smp.create_model(arch, encoder_name=..., ...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import cloudseg
from cloudseg.data.io import BANDS

FORMAT = "cloudseg-checkpoint"
FORMAT_VERSION = 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under ``torch.compile`` / DataParallel / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def fp32_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model, float tensors in fp32, contiguous, on CPU."""
    out = {}
    for k, v in unwrap(model).state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        out[k] = v.contiguous().clone()
    return out


def _plain(value: Any) -> Any:
    """Convert config values to plain types (torch 1.8 unpickles nothing else)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def make_checkpoint(
    model: torch.nn.Module,
    model_args: dict,
    normalization: dict,
    threshold: float,
    config: dict,
    epoch: int,
    metrics: dict | None = None,
    bands: tuple[str, ...] | list[str] = BANDS,
) -> dict:
    """Assemble the self-describing checkpoint dict (see the module docstring); ``bands`` are the model's input
    channels in order (``model_args["in_channels"]`` of them)."""
    if len(bands) != int(model_args.get("in_channels", len(BANDS))):
        raise ValueError(f"{len(bands)} bands {list(bands)} for a model of in_channels={model_args.get('in_channels')}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": _plain(model_args),
        "state_dict": fp32_state_dict(model),
        "normalization": _plain(normalization),
        "threshold": float(threshold),
        "bands": [str(b) for b in bands],
        "config": _plain(config),
        "cloudseg_version": cloudseg.__version__,
        "epoch": int(epoch),
        "metrics": _plain(metrics or {}),
    }


def save_checkpoint(ckpt: dict, path: Path | str) -> Path:
    """Write atomically (temp file + rename) so a kill mid-write never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path | str) -> dict:
    """Load a model checkpoint on CPU and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cloudseg checkpoint (no format={FORMAT!r} entry)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """Rebuild the model from a checkpoint alone, weights loaded, in eval mode."""
    from cloudseg.models import build_model

    args = dict(ckpt["model"])
    model = build_model(args["arch"], args["encoder_name"], encoder_weights=None,
                        in_channels=args.get("in_channels", 4), classes=args.get("classes", 1),
                        **args.get("kwargs", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
