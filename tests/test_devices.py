"""The branches only a GPU takes, rehearsed on CPU: the kernel probe and its message, precision=auto by compute
capability, what a run on a GPU records and tunes, fp16 with loss scaling, loader workers for validation.

A GPU is faked by patching what torch reports about it (``is_available``, name, capability); the kernel probe
itself runs for real, so on a machine without a GPU it fails as it would on a GPU the build has no kernels for.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cloudseg import devices
from cloudseg.checkpoint import unwrap
from cloudseg.config import Config
from cloudseg.data.sources import fold_ids
from cloudseg.data.validate import validate_split
from cloudseg.devices import DeviceError, resolve_device, resolve_precision
from cloudseg.training import Trainer, loader_options


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make torch report one GPU of the given name and capability; returns the setter."""
    def gpu(name: str, cap: tuple[int, int], kernels_run: bool | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
        if kernels_run:  # a GPU this build drives (the probe cannot run here: no driver)
            monkeypatch.setattr(devices, "kernel_problem", lambda i: None)

    probe = devices.kernel_problem
    probe.cache_clear()  # the probe's answers are cached per process: none may leak into or out of a fake
    devices._WARNED.clear()
    yield gpu
    probe.cache_clear()
    devices._WARNED.clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe must fail for real: needs a machine with no GPU")
def test_a_gpu_the_build_cannot_drive_is_named_with_the_fix(fake_gpu, capsys):
    fake_gpu("Tesla K80", (3, 7))
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda")
    msg = str(err.value)
    # which GPU, which build (its kernel list), the probe's own error, what to do
    assert "Tesla K80 (sm_37)" in msg and f"torch {torch.__version__}" in msg
    assert ", ".join(torch.cuda.get_arch_list()) in msg and "a first kernel failed (" in msg
    assert "Kepler" in msg and "device=cpu" in msg
    # device=auto: falls back to the CPU and says why
    assert resolve_device("auto") == torch.device("cpu")
    assert "Tesla K80 (sm_37)" in capsys.readouterr().err
    assert resolve_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""  # said once
    # a Volta is told which wheel has its kernels
    devices.kernel_problem.cache_clear()
    fake_gpu("Tesla V100-SXM2-16GB", (7, 0))
    with pytest.raises(DeviceError, match=r"Tesla V100-SXM2-16GB \(sm_70\).*download.pytorch.org/whl/cu126"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe must fail for real: needs a machine with no GPU")
def test_whole_scene_predict_refuses_such_a_gpu_with_the_same_reason(fake_gpu):
    from cloudseg.predict import PredictError, pick_device

    fake_gpu("Tesla P100-PCIE-16GB", (6, 0))
    with pytest.raises(PredictError, match=r"--device cuda: Tesla P100-PCIE-16GB \(sm_60\) cannot run"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


def test_a_gpu_that_runs_the_probe_is_used_per_local_rank(fake_gpu):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0), kernels_run=True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="local rank 1 needs GPU 1 but 1 are visible"):
        resolve_device("cuda", local_rank=1)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("cap, auto", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"),
                                       ((6, 0), "fp32"), ((3, 7), "fp32")])
def test_precision_auto_follows_the_compute_capability(fake_gpu, cap, auto):
    fake_gpu("some GPU", cap)
    gpu = torch.device("cuda", 0)
    assert resolve_precision("auto", gpu) == auto
    assert resolve_precision("fp32", gpu) == "fp32" and resolve_precision("fp16", gpu) == "fp16"
    if cap < (8, 0):
        with pytest.raises(DeviceError, match="bf16 needs sm_80"):
            resolve_precision("bf16", gpu)


def test_precision_auto_on_cpu_follows_native_bf16(monkeypatch):
    for fast, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_precision("auto", torch.device("cpu")) == want


def _trainer(data: Path, tmp_path: Path, **kw) -> Trainer:
    kw = {"data": str(data), "encoder": "resnet18", "n_folds": 3, "crop_size": 64, "batch_size": 2,
          "steps_per_epoch": 2, "epochs": 1, "val_batch_size": 2, "plot_chips": 0, "num_threads": 1, **kw}
    cfg = Config(**kw)
    split = validate_split(data, "train", labels=True, load=True)
    train_ids, val_ids = fold_ids(cfg, split)
    return Trainer(cfg, split, train_ids, val_ids, tmp_path / "state")


def test_a_run_on_a_gpu_records_what_auto_chose_and_tunes_cudnn(fake_gpu, tiny_data, tmp_path, monkeypatch):
    fake_gpu("Tesla V100-SXM2-16GB", (7, 0), kernels_run=True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    trainer = _trainer(tiny_data, tmp_path, device="auto", precision="auto")
    assert trainer.device == torch.device("cuda", 0)
    assert trainer.precision == "fp16" and trainer.dtype == torch.float16
    assert trainer.describe() == {"cloudseg.device": "cuda", "cloudseg.precision": "fp16",
                                  "cloudseg.gpu": "Tesla V100-SXM2-16GB (sm_70)"}
    assert torch.backends.cudnn.benchmark  # fixed-size input: autotuned convolutions pay back
    # batches bound for the GPU are page-locked, so non_blocking copies overlap with compute
    assert loader_options(trainer.device, 3) == {"num_workers": 3, "pin_memory": True}
    assert loader_options(torch.device("cpu"), 3) == {"num_workers": 3, "pin_memory": False}


def test_fp16_goes_through_the_grad_scaler_which_skips_an_overflowing_step(tiny_data, tmp_path):
    """The loss-scaling path CUDA takes with fp16, run on the CPU: an overflowing step leaves every weight as it
    was and halves the scale; the next step trains."""
    trainer = _trainer(tiny_data, tmp_path, device="cpu", precision="fp16", steps_per_epoch=1)
    trainer.build()
    assert trainer.scaler.is_enabled() and trainer.dtype == torch.float16
    start = trainer.scaler.get_scale()
    loss_fn, calls = trainer.loss_fn, []

    def overflowing_once(logits, y):
        calls.append(1)
        loss = loss_fn(logits, y)
        return loss * 1e38 if len(calls) == 1 else loss  # finite, but its scaled gradients are not

    trainer.loss_fn = overflowing_once
    params = lambda: [p.detach().clone() for p in unwrap(trainer.model).parameters()]  # noqa: E731
    before = params()
    trainer.train_one_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(before, params())), "an overflowing step changed the weights"
    assert trainer.scaler.get_scale() == start / 2
    trainer.train_one_epoch(2)
    assert not all(torch.equal(a, b) for a, b in zip(before, params()))


def test_validation_reads_chips_in_the_loader_workers(tiny_data, tmp_path, monkeypatch):
    from cloudseg.data.dataset import ChipDataset

    log = tmp_path / "val_pids"
    real = ChipDataset.__getitem__

    def getitem(self, index):
        if self.transform is None:  # the validation set
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        return real(self, index)

    monkeypatch.setattr(ChipDataset, "__getitem__", getitem)
    trainer = _trainer(tiny_data, tmp_path, device="cpu", precision="fp32", num_workers=2, tune_threshold=False)
    trainer.fit()
    pids = {int(p) for p in log.read_text().split()}
    assert pids and os.getpid() not in pids, pids
