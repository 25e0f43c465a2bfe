"""Segmentation losses by name, and weighted sums of them parsed from a config string.

Every loss takes raw logits and {0, 1} float targets and returns a scalar. Shape: logits (N, 1, H, W),
targets (N, 1, H, W) or (N, H, W). The arithmetic runs in fp32 with autocast switched off, so bf16/fp16
training does not round the sums of a few hundred thousand pixels.

All-clear batches (no cloud pixel in the target) never give a silent zero for a wrong prediction:
- bce, focal: per-pixel, so a pixel predicted cloud on clear ground always costs.
- dice, jaccard, tversky: pooled over the whole batch (like the competition's pooled Jaccard), with an
  additive ``smooth`` (default 1) in numerator and denominator. With no positives the loss is
  ``1 - smooth / (smooth + k * predicted cloud mass)``: about 1 for a confident cloud prediction over a chip,
  about 0 for a confident clear one. (smp's DiceLoss/JaccardLoss return 0 there, whatever the prediction.)
- lovasz: the Lovász hinge over the whole batch; with no positives it reduces to the largest hinge error,
  i.e. ``relu(1 + max logit)``.

Spec grammar (``build_loss``): terms joined by ``+``, each ``[weight *] name [(param=value, ...)]``, e.g.
``"0.5*bce+0.5*dice"``, ``"jaccard + 0.1*focal(gamma=2)"``, ``"tversky(alpha=0.3, beta=0.7)"``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn


class _Loss(nn.Module):
    """Base: checks shapes, casts to fp32 and disables autocast before calling ``_compute``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss.

        Shape: logits (N, 1, H, W); target (N, 1, H, W) or (N, H, W), values in {0, 1}.
        """
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        if logits.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: logits {tuple(logits.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._compute(logits.float(), target.float())

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BCELoss(_Loss):
    """Binary cross-entropy on logits, mean over pixels.

    Args:
        pos_weight: weight of the cloud class (1 = plain BCE).
    """

    def __init__(self, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.pos_weight = float(pos_weight)

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pw = None if self.pos_weight == 1.0 else torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


class DiceLoss(_Loss):
    """Soft Dice loss pooled over the batch: ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)``.

    Args:
        smooth: additive term; keeps all-clear batches defined (see the module docstring).
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = float(smooth)

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        inter = (p * target).sum()
        return 1 - (2 * inter + self.smooth) / (p.sum() + target.sum() + self.smooth).clamp_min(1e-7)


class JaccardLoss(_Loss):
    """Soft Jaccard (IoU) loss pooled over the batch: ``1 - (I + smooth) / (U + smooth)``.

    ``I = sum(p t)``, ``U = sum(p) + sum(t) - I``.

    Args:
        smooth: additive term; keeps all-clear batches defined (see the module docstring).
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = float(smooth)

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        inter = (p * target).sum()
        union = p.sum() + target.sum() - inter
        return 1 - (inter + self.smooth) / (union + self.smooth).clamp_min(1e-7)


class TverskyLoss(_Loss):
    """Tversky loss pooled over the batch: ``1 - (TP + smooth) / (TP + alpha FP + beta FN + smooth)``.

    Soft counts: ``TP = sum(p t)``, ``FP = sum(p (1 - t))``, ``FN = sum((1 - p) t)``. With smooth = 0,
    alpha = beta = 0.5 is Dice; beta > alpha penalises missed cloud more than false cloud.

    Args:
        alpha: weight of false positives.
        beta: weight of false negatives.
        smooth: additive term; keeps all-clear batches defined.
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"tversky: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        tp = (p * target).sum()
        fp = (p * (1 - target)).sum()
        fn = ((1 - p) * target).sum()
        denom = (tp + self.alpha * fp + self.beta * fn + self.smooth).clamp_min(1e-7)
        return 1 - (tp + self.smooth) / denom


class FocalLoss(_Loss):
    """Sigmoid focal loss, mean over pixels: ``alpha_t (1 - p_t)^gamma * BCE``.

    Args:
        gamma: focusing exponent (0 = BCE).
        alpha: weight of the cloud class in (0, 1); None weighs both classes 1.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal: gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0 < alpha < 1:
            raise ValueError(f"focal: alpha must lie in (0, 1), got {alpha}")
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = torch.exp(-bce)  # probability given to the true class, computed stably from the BCE itself
        loss = (1 - p_t) ** self.gamma * bce
        if self.alpha is not None:
            loss = (self.alpha * target + (1 - self.alpha) * (1 - target)) * loss
        return loss.mean()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al., 2018)."""
    total = gt_sorted.sum()
    inter = total - gt_sorted.cumsum(0)
    union = total + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - inter / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class LovaszHingeLoss(_Loss):
    """Lovász hinge loss (binary), over all pixels of the batch at once, like the pooled competition metric.

    Hinge errors ``1 - logit * (2t - 1)`` are sorted in decreasing order and weighted by the Lovász gradient
    of the Jaccard loss. Not normalised to [0, 1]: it is in logit units.
    """

    def _compute(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.reshape(-1), target.reshape(-1)
        errors = 1 - logits * (2 * target - 1)
        errors_sorted, order = torch.sort(errors, descending=True)
        return torch.dot(F.relu(errors_sorted), _lovasz_grad(target[order]))


# name -> (class, {parameter: type}); the registry every spec is checked against.
LOSSES: dict[str, tuple[type[_Loss], dict[str, type]]] = {
    "bce": (BCELoss, {"pos_weight": float}),
    "dice": (DiceLoss, {"smooth": float}),
    "jaccard": (JaccardLoss, {"smooth": float}),
    "lovasz": (LovaszHingeLoss, {}),
    "focal": (FocalLoss, {"gamma": float, "alpha": float}),
    "tversky": (TverskyLoss, {"alpha": float, "beta": float, "smooth": float}),
}


class WeightedSum(nn.Module):
    """``sum_i w_i * loss_i(logits, target)``, built from a spec by ``build_loss``.

    Attributes:
        spec: the spec string it was built from.
        terms: (weight, name, module) triples.
    """

    def __init__(self, terms: list[tuple[float, str, nn.Module]], spec: str) -> None:
        super().__init__()
        self.spec = spec
        self.weights = [w for w, _, _ in terms]
        self.names = [n for _, n, _ in terms]
        self.losses = nn.ModuleList([m for _, _, m in terms])

    @property
    def terms(self) -> list[tuple[float, str, nn.Module]]:
        return list(zip(self.weights, self.names, self.losses, strict=True))

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's unweighted value, keyed ``"<index>:<name>"`` (for logging).

        Shape: as ``forward``.
        """
        pairs = enumerate(zip(self.names, self.losses, strict=True))
        return {f"{i}:{n}": m(logits, target) for i, (n, m) in pairs}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar weighted sum. Shape: logits (N, 1, H, W); target (N, 1, H, W) or (N, H, W)."""
        total = None
        for w, m in zip(self.weights, self.losses, strict=True):
            value = w * m(logits, target)
            total = value if total is None else total + value
        return total

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_TERM = re.compile(rf"^\s*(?:(?P<w>{_NUMBER})\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*"
                   r"(?:\((?P<args>[^()]*)\))?\s*$")


def _split_terms(spec: str) -> list[str]:
    """Split at top-level '+' (not inside parentheses, not in an exponent like 1e+3)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"loss spec {spec!r}: unbalanced ')' at position {i}")
        elif ch == "+" and depth == 0 and not re.search(r"[0-9.][eE]$", spec[start:i]):
            terms.append(spec[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"loss spec {spec!r}: unbalanced '('")
    terms.append(spec[start:])
    return terms


def _parse_params(name: str, args: str, spec: str) -> dict[str, float]:
    allowed = LOSSES[name][1]
    params: dict[str, float] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"loss spec {spec!r}: {name} parameter {item!r} is not of the form key=value")
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"loss spec {spec!r}: {name} has no parameter {key!r}; valid: {valid}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"loss spec {spec!r}: {name} parameter {key}={value!r} "
                             "is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"loss spec {spec!r}: {name} parameter {key}={value!r} is not finite")
        params[key] = number
    return params


def build_loss(spec: str) -> WeightedSum:
    """Build a loss from a spec such as ``"0.5*bce+0.5*dice"`` (grammar in the module docstring).

    Args:
        spec: names from ``LOSSES`` (case-insensitive), optional positive weights and parameters.

    Returns:
        A module mapping (logits, target) to a scalar. Shape: logits (N, 1, H, W); target (N, 1, H, W).

    Raises:
        ValueError: empty or malformed spec, unknown loss (the message lists the valid names), unknown or
            non-numeric parameter, or a weight that is not positive.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss spec must be a non-empty string like '0.5*bce+0.5*dice', got {spec!r}")
    terms = []
    for raw in _split_terms(spec):
        m = _TERM.match(raw)
        if m is None:
            raise ValueError(f"loss spec {spec!r}: cannot parse term {raw.strip()!r}; expected "
                             f"'[weight*]name[(key=value,...)]' with name in {', '.join(LOSSES)}")
        name = m.group("name").lower()
        if name not in LOSSES:
            raise ValueError(f"loss spec {spec!r}: unknown loss {m.group('name')!r}; "
                             f"valid: {', '.join(LOSSES)}")
        weight = float(m.group("w")) if m.group("w") else 1.0
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"loss spec {spec!r}: weight of {name} must be a positive number, got {weight}")
        params = _parse_params(name, m.group("args") or "", spec)
        terms.append((weight, name, LOSSES[name][0](**params)))
    return WeightedSum(terms, spec)
