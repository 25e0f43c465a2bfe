"""Losses: values by hand on 1x1x1x3 tensors, spec parsing, all-clear batches, fp32 under autocast."""

from __future__ import annotations

import math

import pytest
import segmentation_models_pytorch as smp
import torch

from cloudseg.losses import LOSSES, WeightedSum, build_loss

LN3 = math.log(3.0)


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


# Logits ln 3, -ln 3, 0 give probabilities p = 0.75, 0.25, 0.5; targets t = 1, 0, 1.
LOGITS = _t([LN3, -LN3, 0.0])
TARGET = _t([1.0, 0.0, 1.0])
# Soft counts for these: TP = sum(p t) = 0.75 + 0.5 = 1.25; sum p = 1.5; sum t = 2;
# FP = sum(p (1 - t)) = 0.25; FN = sum((1 - p) t) = 0.25 + 0.5 = 0.75; soft union U = 1.5 + 2 - 1.25 = 2.25.
HAND = {
    # p_t = 0.75, 0.75, 0.5: mean(-ln p_t) = (2 ln(4/3) + ln 2) / 3
    "bce": (2 * math.log(4 / 3) + math.log(2)) / 3,
    # 1 - (2 * 1.25 + 1) / (3.5 + 1) = 1 / 4.5
    "dice": 1 / 4.5,
    # 1 - 2.5 / 3.5 = 2 / 7
    "dice(smooth=0)": 2 / 7,
    # 1 - (1.25 + 1) / (2.25 + 1) = 1 / 3.25
    "jaccard": 1 / 3.25,
    # 1 - 1.25 / 2.25 = 4 / 9
    "jaccard(smooth=0)": 4 / 9,
    # 1 - 1.25 / (1.25 + 0.3 * 0.25 + 0.7 * 0.75) = 1 - 1.25 / 1.85 = 12 / 37
    "tversky(alpha=0.3, beta=0.7, smooth=0)": 12 / 37,
    # alpha = beta = 0.5 is Dice when smooth = 0: 1 - 1.25 / (1.25 + 0.125 + 0.375) = 2 / 7
    "tversky(smooth=0)": 2 / 7,
    # default smooth 1 (not doubled like Dice's): 1 - 2.25 / 2.75 = 2 / 11
    "tversky": 2 / 11,
    # mean((1 - p_t)^2 * -ln p_t) = (2 * 0.0625 ln(4/3) + 0.25 ln 2) / 3
    "focal": (2 * 0.0625 * math.log(4 / 3) + 0.25 * math.log(2)) / 3,
    # alpha_t = 0.25, 0.75, 0.25: (0.25 * 0.0625 ln(4/3) + 0.75 * 0.0625 ln(4/3) + 0.25 * 0.25 ln 2) / 3
    "focal(alpha=0.25)": (0.0625 * math.log(4 / 3) + 0.0625 * math.log(2)) / 3,
    # hinge errors 1 - logit * (2t - 1) = 1 - ln 3, 1 - ln 3, 1; only the error 1 (a positive, first after
    # sorting) is > 0; Lovász gradient there: 1 - (2 - 1) / (2 + 0) = 0.5, so the loss is 1 * 0.5
    "lovasz": 0.5,
}


@pytest.mark.parametrize("spec", sorted(HAND))
def test_values_by_hand(spec):
    assert build_loss(spec)(LOGITS, TARGET).item() == pytest.approx(HAND[spec], rel=1e-6, abs=1e-7)


def test_lovasz_by_hand_with_two_positive_errors():
    # logits 2, -1, 0.5; targets 1, 1, 0 -> errors -1, 2, 1.5; sorted 2 (t=1), 1.5 (t=0), -1 (t=1).
    # cumsum t = 1, 1, 2 -> intersection 2 - cumsum = 1, 1, 0; union 2 + cumsum(1 - t) = 2, 3, 3;
    # Jaccard loss 1 - I/U = 1/2, 2/3, 1 -> gradient 1/2, 1/6, 1/3; loss = 2 * 1/2 + 1.5 * 1/6 + 0 = 1.25.
    assert build_loss("lovasz")(_t([2.0, -1.0, 0.5]), _t([1.0, 1.0, 0.0])).item() == pytest.approx(1.25)


def test_combinations_are_weighted_sums():
    assert build_loss("0.5*bce+0.5*dice")(LOGITS, TARGET).item() == pytest.approx(
        0.5 * HAND["bce"] + 0.5 * HAND["dice"], rel=1e-6)
    assert build_loss(" Jaccard + 0.1 * focal ")(LOGITS, TARGET).item() == pytest.approx(
        HAND["jaccard"] + 0.1 * HAND["focal"], rel=1e-6)
    loss = build_loss("2e-1*tversky(alpha=0.3, beta=0.7, smooth=0)+1e+0*lovasz")
    assert isinstance(loss, WeightedSum)
    assert [(w, n) for w, n, _ in loss.terms] == [(0.2, "tversky"), (1.0, "lovasz")]
    assert loss(LOGITS, TARGET).item() == pytest.approx(0.2 * 12 / 37 + 0.5, rel=1e-6)
    parts = loss.components(LOGITS, TARGET)
    assert list(parts) == ["0:tversky", "1:lovasz"] and parts["1:lovasz"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("spec,fragment", [
    ("", "non-empty string"),
    ("   ", "non-empty string"),
    ("bce+", "cannot parse term ''"),
    ("0.5*", "cannot parse term '0.5*'"),
    ("0.5*bce*2", "cannot parse term '0.5*bce*2'"),
    ("bce++dice", "cannot parse term ''"),
    ("-1*bce", "cannot parse term '-1*bce'"),
    ("0*bce", "weight of bce must be a positive number"),
    ("diec", "unknown loss 'diec'; valid: bce, dice, jaccard, lovasz, focal, tversky"),
    ("dice(alpha=1)", "dice has no parameter 'alpha'; valid: smooth"),
    ("lovasz(smooth=1)", "lovasz has no parameter 'smooth'; valid: none"),
    ("tversky(alpha=x)", "tversky parameter alpha='x' is not a number"),
    ("tversky(alpha)", "is not of the form key=value"),
    ("focal(gamma=2", "unbalanced '('"),
    ("focal(alpha=1.5)", "alpha must lie in (0, 1)"),
])
def test_malformed_specs_raise_clear_errors(spec, fragment):
    with pytest.raises(ValueError) as err:
        build_loss(spec)
    assert fragment in str(err.value)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_clear_batch_is_not_a_silent_zero(name):
    target = torch.zeros(2, 1, 8, 8)
    loss = build_loss(name)
    cloudy = torch.full_like(target, 10.0, requires_grad=True)  # confident cloud everywhere, truly clear
    wrong = loss(cloudy, target)
    assert wrong.item() > 0.9, f"{name}: {wrong.item()}"
    wrong.backward()
    # and it pushes the prediction towards clear: gradient descent lowers the logits (dL/dlogit >= 0 everywhere,
    # > 0 somewhere), so one step moves the predicted cloud down
    assert (cloudy.grad >= 0).all() and (cloudy.grad > 0).any(), f"{name}: {cloudy.grad.min().item()}"
    right = loss(torch.full_like(target, -10.0), target)  # confident clear: near zero
    assert 0 <= right.item() < 0.01, f"{name}: {right.item()}"


def test_overlap_losses_on_an_all_clear_batch_by_hand():
    # No positives, p = 0.5 everywhere on 4 pixels: sum p = 2, TP = 0, FP = 2.
    logits, target = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert build_loss("dice")(logits, target).item() == pytest.approx(1 - 1 / 3)  # 1 - (0 + 1) / (2 + 0 + 1)
    assert build_loss("jaccard")(logits, target).item() == pytest.approx(1 - 1 / 3)  # U = 2
    # 1 - (0 + 1) / (0 + 0.25 * 2 + 1)
    assert build_loss("tversky(alpha=0.25)")(logits, target).item() == pytest.approx(1 - 1 / 1.5)
    assert build_loss("lovasz")(logits, target).item() == pytest.approx(1.0)  # relu(1 + max logit 0)


def test_agrees_with_smp_losses_where_the_batch_has_clouds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g) * 3
    target = (torch.rand(3, 1, 16, 16, generator=g) > 0.6).float()
    pairs = [
        ("lovasz", smp.losses.LovaszLoss("binary", per_image=False, from_logits=True)),
        ("dice(smooth=0)", smp.losses.DiceLoss("binary", from_logits=True, smooth=0.0, eps=0.0)),
        ("jaccard(smooth=0)", smp.losses.JaccardLoss("binary", from_logits=True, smooth=0.0, eps=0.0)),
        ("tversky(alpha=0.3, beta=0.7, smooth=0)",
         smp.losses.TverskyLoss("binary", from_logits=True, smooth=0.0, eps=0.0, alpha=0.3, beta=0.7)),
        ("focal(gamma=2)", smp.losses.FocalLoss("binary", gamma=2.0)),
    ]
    for spec, reference in pairs:
        assert build_loss(spec)(logits, target).item() == pytest.approx(reference(logits, target).item(),
                                                                        rel=1e-5), spec


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fp32_under_bf16_autocast(name):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 1, 8, 8, generator=g) * 2).to(torch.bfloat16)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    expected = build_loss(name)(logits.float(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = build_loss(name)(logits, target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_target_without_channel_axis_and_shape_mismatch():
    loss = build_loss("bce")
    assert loss(LOGITS, TARGET.squeeze(1)).item() == pytest.approx(HAND["bce"], rel=1e-6)
    with pytest.raises(ValueError, match=r"logits \(1, 1, 1, 3\) and target \(1, 1, 1, 4\) differ"):
        loss(LOGITS, _t([1.0, 0.0, 1.0, 0.0]))
