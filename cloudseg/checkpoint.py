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


def static_paddings(model: torch.nn.Module) -> dict[str, list[int]]:
    """The fixed paddings of "same"-padding convolutions (EfficientNet encoders), by module name.

    They are computed from the encoder's nominal image size when the model is built, and smp versions compute some
    differently: smp 0.6 pads the first stride-2 5x5 convolution of efficientnet-b4 (``encoder._blocks.6``) by
    (2, 2, 2, 2), the competition runtime's smp 0.2.1 by (1, 2, 1, 2), which moves every feature after it. A
    checkpoint records the paddings its weights were trained with, and every loader (``model_from_checkpoint``,
    main.py) applies them. Empty for encoders without such convolutions.
    """
    out = {}
    for name, module in unwrap(model).named_modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, torch.nn.ZeroPad2d):
            out[name] = [int(p) for p in pad.padding]
        elif isinstance(pad, torch.nn.Identity):
            out[name] = [0, 0, 0, 0]
    return out


def apply_static_paddings(model: torch.nn.Module, paddings: dict[str, list[int]]) -> None:
    """Set the recorded ``static_paddings`` on a freshly built model (in place)."""
    modules = dict(model.named_modules())
    for name, pad in paddings.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "static_padding"):
            raise ValueError(f"checkpoint records a static padding for {name!r}, which this model does not have")
        module.static_padding = torch.nn.ZeroPad2d(tuple(pad)) if any(pad) else torch.nn.Identity()


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
    ckpt = {
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
    paddings = static_paddings(model)
    if paddings:
        ckpt["static_padding"] = paddings
    return ckpt


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
    apply_static_paddings(model, ckpt.get("static_padding") or {})
    return model.eval()
