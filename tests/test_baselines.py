"""Baselines and the ukis-csmask wrapper: hand-computed masks and thresholds on tiny chips."""

from __future__ import annotations

import numpy as np
import pytest

from cloudseg import baselines
from cloudseg.baselines import BrightnessThreshold, all_cloud, fit_brightness_threshold, visible_brightness


def _chip(values: list[list[float]]) -> np.ndarray:
    """A (4, H, W) uint16 chip whose blue, green and red all equal ``values`` (reflectance) and NIR is 0."""
    v = (np.asarray(values, dtype=np.float64) * 10000).astype(np.uint16)
    return np.stack([v, v, v, np.zeros_like(v)])


def test_all_cloud_is_ones_of_the_chip_size():
    m = all_cloud(np.zeros((4, 3, 5), dtype=np.uint16))
    assert m.shape == (3, 5) and m.dtype == np.uint8 and m.min() == 1


def test_visible_brightness_averages_blue_green_red_only():
    chip = np.zeros((4, 1, 2), dtype=np.uint16)
    chip[0], chip[1], chip[2], chip[3] = 1000, 2000, 6000, 9999  # NIR must not count
    np.testing.assert_allclose(visible_brightness(chip), [[0.3, 0.3]], rtol=1e-6)


def test_fit_brightness_threshold_separates_bright_clouds_from_dark_ground():
    # ground 0.10, clouds 0.50: every candidate in (0.10, 0.50] is perfect; the first, 0.12, wins
    images = [_chip([[0.1, 0.5], [0.5, 0.1]]), _chip([[0.1, 0.1], [0.1, 0.5]])]
    labels = [np.array([[0, 1], [1, 0]]), np.array([[0, 0], [0, 1]])]
    bt = fit_brightness_threshold(images, labels)
    assert bt.threshold == pytest.approx(0.12)
    np.testing.assert_array_equal(bt(images[0]), labels[0])


def test_fit_brightness_threshold_tradeoff_matches_hand_count():
    # brightness 0.2 (cloud), 0.3 (clear), 0.4 (cloud). Candidates 0.2, 0.3, 0.4:
    # t=0.2 -> pred all 3: I=2, U=3 (0.667); t=0.3 -> pred {0.3, 0.4}: I=1, U=3 (0.333); t=0.4 -> I=1, U=2 (0.5)
    images = [_chip([[0.2, 0.3, 0.4]])]
    labels = [np.array([[1, 0, 1]])]
    bt = fit_brightness_threshold(images, labels, candidates=np.array([0.2, 0.3, 0.4]))
    assert bt.threshold == pytest.approx(0.2)
    bt2 = fit_brightness_threshold(images, labels, candidates=np.array([0.3, 0.4]))
    assert bt2.threshold == pytest.approx(0.4)


def test_fit_brightness_threshold_rejects_no_chips():
    with pytest.raises(ValueError, match="no training chips"):
        fit_brightness_threshold([], [])


def test_brightness_threshold_call_is_inclusive():
    np.testing.assert_array_equal(BrightnessThreshold(0.3)(_chip([[0.2999, 0.3, 0.9]])), [[0, 1, 1]])


def test_score_predictor_pools_counts():
    images = {"a": _chip([[0.1, 0.9]]), "b": _chip([[0.9, 0.9]])}
    labels = {"a": np.array([[0, 1]]), "b": np.array([[0, 0]])}
    acc = baselines.score_predictor(all_cloud, images, labels)
    # a: I=1 U=2; b: I=0 U=2 -> 1/4
    assert acc.score() == pytest.approx(0.25)


def test_ukis_maps_only_the_cloud_class_to_cloud(monkeypatch):
    monkeypatch.setattr(baselines, "ukis_available", lambda: True)
    peer = baselines.UkisPeer("l2a", 30)
    monkeypatch.setattr(baselines.UkisPeer, "classes", lambda self, image: np.array([[0, 1], [2, 1]], np.uint8))
    np.testing.assert_array_equal(peer(np.zeros((4, 2, 2), np.uint16)), [[0, 1], [0, 1]])  # shadow (2) is clear
    assert peer.name == "ukis_l2a_30m"


@pytest.mark.parametrize("level,res", [("l3", 30), ("l2a", 20)])
def test_ukis_rejects_unknown_settings(level, res):
    with pytest.raises(ValueError, match="ukis"):
        baselines.UkisPeer(level, res)


def test_resize_area_then_nearest_roundtrip_shapes():
    x = np.arange(36, dtype=np.float32).reshape(1, 6, 6)
    small = baselines._resize(x, 2, "area")
    assert small.shape == (1, 2, 2)
    assert small[0, 0, 0] == pytest.approx(np.mean(x[0, :3, :3]))  # 3x3 block average: 10 m -> 30 m
    assert baselines._resize(small, 6, "nearest").shape == (1, 6, 6)
