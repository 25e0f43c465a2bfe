"""Segmentation models by name: smp architectures x smp/timm encoders, 4 bands in, one cloud logit out.

The registry answers two questions: can the installed smp build a pair (``build_model``), and can the
competition runtime's smp 0.2.1 load a checkpoint of that pair (``runtime_support``). Only pairs that pass the
second can be promoted into a submission; the facts about smp 0.2.1 come from the static table in
``cloudseg.runtime_compat``.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch

from cloudseg import runtime_compat as rc
from cloudseg.data.io import BANDS

# Every smp architecture cloudseg knows; the ones the installed smp lacks are left out of ARCHITECTURES.
_ARCH_NAMES = ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3", "DeepLabV3Plus", "MAnet", "Linknet", "PSPNet",
               "PAN", "UPerNet", "Segformer", "DPT")
ARCHITECTURES: dict[str, type[torch.nn.Module]] = {n: getattr(smp, n) for n in _ARCH_NAMES if hasattr(smp, n)}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def canonical_arch(arch: str) -> str:
    """The registry spelling of an architecture name (case-insensitive, like ``smp.create_model``).

    Raises:
        ValueError: the name is not in ``ARCHITECTURES``; the message lists the valid names.
    """
    by_lower = {a.lower(): a for a in ARCHITECTURES}
    if not isinstance(arch, str) or arch.lower() not in by_lower:
        valid = sorted(ARCHITECTURES)
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(valid)}."
                         f"{_suggest(str(arch), valid)}")
    return by_lower[arch.lower()]


def encoder_names() -> list[str]:
    """The installed smp's encoder names (any ``tu-<timm model>`` is valid on top of these)."""
    return list(smp.encoders.get_encoder_names())


def check_encoder(encoder: str) -> str:
    """Return ``encoder`` if the installed smp can build it, else raise.

    Valid: ``smp.encoders.get_encoder_names()``, the deprecated ``timm-*`` names smp still maps to ``tu-``
    encoders, and ``tu-<timm model>[.<pretrained tag>]``.

    Raises:
        ValueError: unknown name; the message lists the valid smp encoder names and the ``tu-`` rule.
    """
    if not isinstance(encoder, str) or not encoder:
        raise ValueError(f"encoder name must be a non-empty string, got {encoder!r}")
    names = encoder_names()
    if encoder in names:
        return encoder
    legacy = getattr(smp.encoders, "is_equivalent_to_timm_universal", None)
    if encoder.startswith("timm-") and legacy is not None and legacy(encoder):
        return encoder
    if encoder.startswith("tu-"):
        model = encoder[3:]
        if timm.is_model(model):
            return encoder
        base = model.split(".")[0]
        raise ValueError(f"unknown timm model {model!r} in encoder {encoder!r} (timm {timm.__version__});"
                         f"{_suggest(base, timm.list_models()) or ' see timm.list_models().'}")
    raise ValueError(f"unknown encoder {encoder!r}; valid: {', '.join(names)}, or 'tu-<timm model name>' "
                     f"for any timm model (timm.list_models()).{_suggest(encoder, names)}")


def build_model(
    arch: str,
    encoder: str,
    encoder_weights: str | None = None,
    in_channels: int = len(BANDS),
    classes: int = 1,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build an smp segmentation model by name; output is raw logits (no activation).

    Args:
        arch: an ``ARCHITECTURES`` key (case-insensitive), e.g. "Unet".
        encoder: an smp encoder name or ``tu-<timm model>``, e.g. "resnet34".
        encoder_weights: None (random init; the default, and the only choice offline). "imagenet" downloads
            weights and smp adapts the first convolution to ``in_channels`` bands; ``tu-`` encoders take True.
        in_channels: input bands (4: B02, B03, B04, B08).
        classes: output channels (1: the cloud logit).
        **kwargs: passed to the architecture's constructor (e.g. ``decoder_attention_type="scse"``).

    Returns:
        The model. Shape: (N, in_channels, H, W) -> (N, classes, H, W); H and W must suit the architecture
        (multiples of 32 always do; PAN needs at least 128).

    Raises:
        ValueError: unknown architecture or encoder (the message lists the valid names), or smp refuses the
            pair.
    """
    name = canonical_arch(arch)
    check_encoder(encoder)
    try:
        return ARCHITECTURES[name](encoder_name=encoder, encoder_weights=encoder_weights,
                                   in_channels=in_channels, classes=classes, **kwargs)
    except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as e:
        raise ValueError(f"smp {smp.__version__} cannot build {name} with encoder {encoder!r} "
                         f"and arguments {kwargs}: {type(e).__name__}: {e}") from e


def model_args(arch: str, encoder: str, in_channels: int = len(BANDS), classes: int = 1,
               **kwargs: Any) -> dict:
    """The plain dict stored as ``checkpoint["model"]``; ``build_model`` rebuilds the model from it.

    Returns:
        ``{"arch", "encoder_name", "in_channels", "classes", "kwargs"}`` with the canonical architecture name.
    """
    return {"arch": canonical_arch(arch), "encoder_name": check_encoder(encoder),
            "in_channels": int(in_channels), "classes": int(classes), "kwargs": dict(kwargs)}


def freeze_unused(model: torch.nn.Module, in_channels: int = len(BANDS)) -> list[str]:
    """Stop gradients for the parameters the forward never reaches; returns their names.

    smp's EfficientNet encoders (``efficientnet-*`` and ``timm-efficientnet-*``) keep the ImageNet classifier's
    last 1x1 convolution and its BatchNorm (``_conv_head``/``_bn1``, ``conv_head``/``bn2``), but a segmentation
    forward stops at the last block's features, so these three tensors never get a gradient. DDP waits for a
    gradient of every parameter that requires one and fails at the second step ("Expected to have finished
    reduction in the prior iteration"). Frozen, they stay in the state dict, so checkpoints, main.py under smp
    0.2.1 and ukis-csmask's weights load as before, and no figure changes: a parameter without a gradient was
    never updated (AdamW skips it). DDP's ``find_unused_parameters=True`` would also work, at the cost of a
    graph traversal every step.

    Found by one forward and backward pass on a zero input in eval mode (no BatchNorm statistic moves, no random
    number is drawn). A model that refuses the probe input is left as it is.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for size in (64, 256):  # 64 suits most; a few architectures need larger inputs
            try:
                with torch.enable_grad():
                    out = model(torch.zeros(1, in_channels, size, size, device=device))
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    out.float().sum().backward()
                break
            except (RuntimeError, ValueError):
                model.zero_grad(set_to_none=True)
        else:
            return []
        unused = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        model.zero_grad(set_to_none=True)
        for _, p in unused:
            p.requires_grad_(False)
        return [n for n, _ in unused]
    finally:
        model.train(was_training)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _in_table(table: dict, arch: str, encoder: str) -> str | None:
    """The reason under which ``{reason: {arch: encoders}}`` lists the pair, if it does."""
    for reason, by_arch in table.items():
        if encoder in by_arch.get(arch, ()):
            return reason
    return None


@functools.lru_cache(maxsize=256)
def _current_signature(arch: str, encoder: str) -> str:
    # Built on the meta device: only keys and shapes are read, so no memory or init time is spent on weights.
    with torch.device("meta"):
        model = build_model(arch, encoder, encoder_weights=None, in_channels=4, classes=1)
    return rc.state_dict_signature(model.state_dict())


def runtime_support(arch: str, encoder: str, strict: bool = True, **kwargs: Any) -> tuple[bool, str]:
    """Whether a checkpoint of this pair, trained here, loads in the competition runtime's smp 0.2.1.

    Checks, in order: smp 0.2.1 has the architecture; it has the encoder (``tu-`` encoders: timm 0.4.12
    builds the model as a feature extractor); it can build the pair; it accepts every constructor argument;
    and, for default arguments with 4 bands and 1 class, the installed smp builds the pair with the same
    state_dict keys and shapes as smp 0.2.1 did (``runtime_compat.RUNTIME_LAYOUTS``). Only a pair that passes
    all can be promoted.

    Args:
        arch: architecture name (any case).
        encoder: encoder name.
        strict: when the table holds no layout for the pair (non-default ``kwargs``, a ``tu-`` model outside
            the recorded list), answer False; with ``strict=False`` answer True and say it is unchecked.
        **kwargs: the architecture arguments the model was built with (``checkpoint["model"]["kwargs"]``).

    Returns:
        ``(ok, reason)``: the reason says why not, or what was checked.
    """
    by_lower = {a.lower(): a for a in rc.RUNTIME_ARCH_ORDER}
    name = by_lower.get(str(arch).lower())
    if name is None:
        return False, (f"{arch} does not exist in smp {rc.RUNTIME_SMP_VERSION} (the competition runtime); "
                       f"it has {', '.join(rc.RUNTIME_ARCH_ORDER)}")
    if encoder.startswith("tu-"):
        model = encoder[3:]
        if "." in model:
            return False, (f"timm {rc.RUNTIME_TIMM_VERSION} has no pretrained tags: use "
                           f"'tu-{model.split('.')[0]}' instead of {encoder!r}")
        if model in rc.RUNTIME_TIMM_OTHER_MODELS:
            return False, (f"timm {rc.RUNTIME_TIMM_VERSION} has {model} but smp {rc.RUNTIME_SMP_VERSION} "
                           "cannot use it as an encoder (no 5-stage features_only mode)")
        if model not in rc.RUNTIME_TIMM_ENCODERS:
            return False, f"timm {rc.RUNTIME_TIMM_VERSION} (the competition runtime) has no model {model!r}"
    elif encoder not in rc.RUNTIME_ENCODERS:
        return False, (f"encoder {encoder!r} does not exist in smp {rc.RUNTIME_SMP_VERSION} "
                       "(the competition runtime)")
    error = _in_table(rc.RUNTIME_BUILD_ERRORS, name, encoder)
    if error is not None:
        return False, f"smp {rc.RUNTIME_SMP_VERSION} cannot build {name} with {encoder}: {error}"
    unknown = sorted(set(kwargs) - rc.RUNTIME_ARCH_KWARGS[name])
    if unknown:
        return False, f"smp {rc.RUNTIME_SMP_VERSION}'s {name} has no argument(s) {', '.join(unknown)}"

    recorded = rc.RUNTIME_LAYOUTS.get(encoder)
    expected = recorded[rc.RUNTIME_ARCH_ORDER.index(name)] if recorded is not None and not kwargs else None
    if expected is None:
        why = "non-default arguments" if kwargs else f"{encoder} (outside the recorded tu- list)"
        msg = (f"{name}/{encoder} exists in smp {rc.RUNTIME_SMP_VERSION}, but its state_dict layout is not "
               f"recorded for {why}; load a checkpoint under .venv-runtime to check")
        return (not strict), msg
    try:
        here = _current_signature(name, encoder)
    except ValueError as e:
        return False, f"the installed smp cannot build {name}/{encoder}: {e}"
    if here != expected:
        known = _in_table(rc.LAYOUT_MISMATCHES_AT_GENERATION, name, encoder)
        return False, (f"{name}/{encoder} exists in smp {rc.RUNTIME_SMP_VERSION} but its state_dict layout "
                       f"differs from smp {smp.__version__}'s" + (f" ({known})" if known else ""))
    return True, (f"{name}/{encoder} exists in smp {rc.RUNTIME_SMP_VERSION} with the same state_dict keys "
                  f"and shapes as smp {smp.__version__}")
