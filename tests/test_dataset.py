"""The torch dataset and the transforms: image and mask stay in sync, normalisation as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloudseg.data.dataset import ChipDataset
from cloudseg.data.transforms import Normalization, apply_transform, build_train_transform


def test_sample_dict(tiny_data):
    ds = ChipDataset.from_folder(tiny_data, "train")
    s = ds[0]
    assert s["chip_id"] == "tr00"
    assert s["image"].shape == (4, 512, 512) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (1, 512, 512)
    assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    raw = ds.split.images["tr00"].astype(np.float32) / 10000
    np.testing.assert_allclose(s["image"].numpy(), np.clip(raw, 0, 2), rtol=1e-6)


def test_unlabeled_dataset_has_no_mask(tmp_path):
    from tests.data.fixtures import make_dataset

    ds = ChipDataset.from_folder(make_dataset(tmp_path, 2, split="test", labels=False), "test")
    assert "mask" not in ds[0] and len(ds) == 2


def test_normalization_round_trip():
    norm = Normalization(mean=(0.1, 0.1, 0.1, 0.2), std=(0.5, 0.5, 0.5, 0.5))
    img = np.full((4, 2, 2), 3000, np.uint16)
    img[0, 0, 0] = 65000  # saturated: clipped to 2.0
    out = norm(img)
    assert out[0, 0, 0] == pytest.approx((2.0 - 0.1) / 0.5)
    assert out[3, 1, 1] == pytest.approx((0.3 - 0.2) / 0.5)
    assert Normalization.from_dict(norm.to_dict()) == norm


def test_augmentations_keep_image_and_mask_in_sync():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 10000, (4, 64, 64)).astype(np.uint16)
    mask = (img[0] > 5000).astype(np.uint8)  # mask is a function of band 0, so it must survive any geometry
    t = build_train_transform(32)  # random crop + D4: purely geometric, so the relation must hold exactly
    for _ in range(20):
        out_img, out_mask = apply_transform(t, img, mask)
        assert out_img.shape == (4, 32, 32) and out_mask.shape == (32, 32)
        np.testing.assert_array_equal(out_mask, (out_img[0] > 5000).astype(np.uint8))


def test_strong_augmentation_runs_and_keeps_shapes():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 10000, (4, 64, 64)).astype(np.uint16)
    mask = (rng.uniform(size=(64, 64)) > 0.5).astype(np.uint8)
    t = build_train_transform(48, strength=1.0)
    for _ in range(10):  # every op fires on some draw (each has p <= 0.5)
        out_img, out_mask = apply_transform(t, img, mask)
        assert out_img.shape == (4, 48, 48) and out_img.dtype == np.float32
        assert set(np.unique(out_mask)) <= {0, 1}


def test_seeded_augmentation_repeats_and_other_seeds_differ():
    """Same seed, same crops and warps (albumentations ignores the global seeds); another seed differs."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 10000, (4, 64, 64)).astype(np.uint16)
    mask = (img[0] > 5000).astype(np.uint8)

    def draws(seed):
        t = build_train_transform(32, strength=1.0, seed=seed)
        return [apply_transform(t, img, mask)[0] for _ in range(6)]

    a, b, c = draws(7), draws(7), draws(8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def _draws(data, tmp_path, epochs=(1,), **kw) -> list[str]:
    """Digests of the training images the real Trainer's loader yields for one chip: 8 an epoch, 2 workers."""
    import hashlib

    from cloudseg.config import Config
    from cloudseg.data.validate import validate_split
    from cloudseg.training import Trainer

    cfg = Config(data=str(data), encoder="resnet18", crop_size=64, batch_size=1, steps_per_epoch=8,
                 num_workers=2, num_threads=1, **kw)
    split = validate_split(data, "train", labels=True, load=True)
    trainer = Trainer(cfg, split, ["tr00"], ["tr01"], tmp_path / "state")
    trainer.build()
    out = []
    for epoch in epochs:
        trainer.epoch_sampler.set_epoch(epoch)
        out += [hashlib.sha1(batch["image"].numpy().tobytes()).hexdigest()[:12] for batch in trainer.train_loader]
    return out


def test_loader_workers_draw_distinct_augmentations_and_repeat_them_on_a_rerun(tiny_data, tmp_path):
    """With 2 workers, 8 draws of one chip are 8 distinct images (a worker that copies its parent's generator
    replays it: 4), each epoch draws anew, and the same config draws the same on a re-run."""
    first = _draws(tiny_data, tmp_path, epochs=(1, 2))
    assert len(first) == 16
    assert len(set(first[:8])) == 8, "two workers repeated each other's augmentations"
    assert len(set(first)) == 16, "epoch 2 repeated epoch 1's augmentations"
    assert _draws(tiny_data, tmp_path / "again", epochs=(1, 2)) == first
    assert set(_draws(tiny_data, tmp_path / "seed1", seed=1)).isdisjoint(first[:8])


def test_worker_seeds_differ_by_each_of_seed_rank_epoch_and_worker():
    from cloudseg.data.transforms import worker_seed

    base = (0, 0, 1, 0)
    seeds = {worker_seed(*base)}
    for i in range(4):
        changed = list(base)
        changed[i] += 1
        seeds.add(worker_seed(*changed))
    assert len(seeds) == 5 and worker_seed(*base) == worker_seed(*base)
    assert worker_seed(-1, 0, 1, 0) != worker_seed(1, 0, 1, 0)
