"""Which device and precision a run uses, decided once, with the reason where a GPU cannot be used.

A torch wheel carries kernels for a list of GPU generations (``torch.cuda.get_arch_list()``). On a GPU older than
the list, torch imports, ``torch.cuda.is_available()`` says True, and the first kernel fails with "no kernel image
is available for execution on the device", a message nobody connects to the wheel. ``resolve_device`` runs one
tiny kernel before anything else and, where it fails, names the GPU, its compute capability, the build and what
to install instead.

``precision=auto`` by what the device computes fast:

| device | auto | why |
|---|---|---|
| CUDA, sm_80 and newer (A100, H100, RTX 30xx+) | bf16 autocast | fp32's range, tensor cores, no loss scaling |
| CUDA, sm_70 to sm_7x (V100, T4, RTX 20xx) | fp16 AMP with GradScaler | tensor cores, but no bf16 |
| CUDA, older (P100, K80, ...) | fp32 | no tensor cores: fp16 gains little and needs loss scaling |
| CPU with AVX512-BF16 / AMX | bf16 autocast | native bf16 |
| other CPUs | fp32 | bf16 is emulated there, several times slower |
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the last torch wheels with kernels for GPUs older than sm_75 (PyTorch's CUDA support matrix, release 2.14)
LEGACY_INDEX = "https://download.pytorch.org/whl/cu126"


class DeviceError(RuntimeError):
    """The configured device cannot run this torch build; the message names the GPU, the build and the fix."""


def capability(index: int = 0) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def describe_gpu(index: int = 0) -> str:
    """``"NVIDIA A100-SXM4-40GB (sm_80)"``."""
    major, minor = capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def describe_build() -> str:
    """``"torch 2.14.1+cu130 (CUDA 13.0, kernels for sm_75, sm_80, ...)"``."""
    cuda = torch.version.cuda
    if not cuda:
        return f"torch {torch.__version__} (CPU-only build)"
    return f"torch {torch.__version__} (CUDA {cuda}, kernels for {', '.join(torch.cuda.get_arch_list()) or '?'})"


def install_advice(cap: tuple[int, int]) -> str:
    """What to install for a GPU of compute capability ``cap`` that this build cannot drive."""
    base = torch.__version__.split("+")[0]
    if cap >= (7, 5):
        return ("this build lists the GPU's generation, so the driver is the likely cause: update the NVIDIA "
                "driver to one that supports CUDA " + str(torch.version.cuda) + ", or reinstall torch")
    if cap >= (5, 0):
        return (f"install the CUDA 12.6 build, the last with kernels for sm_50 to sm_70 (Maxwell, Pascal, "
                f"Volta): pip install 'torch=={base}' --index-url {LEGACY_INDEX} (and torchvision from the "
                "same index)")
    return ("no torch 2.x wheel has kernels for Kepler (sm_3x, e.g. Tesla K80): train on a newer GPU or with "
            "device=cpu; a K80 runs submissions under the competition runtime's torch 1.8.1")


_WARNED: set[int] = set()  # GPUs whose fallback to the CPU was already reported


@functools.lru_cache(maxsize=None)
def kernel_problem(index: int) -> str | None:
    """Run one tiny kernel on GPU ``index``; the error it raised, or None when it ran (cached per process)."""
    try:
        with torch.cuda.device(index):  # the probe's context on this GPU only (not also GPU 0, for every rank)
            x = torch.arange(8, dtype=torch.float32, device=torch.device("cuda", index))
            if float((x * 2).sum().item()) != 56.0:  # .item() waits for the kernel: asynchronous errors surface
                return "a kernel ran but returned a wrong result"
    except Exception as exc:  # RuntimeError / torch.AcceleratorError / AssertionError on CPU-only builds
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first}"
    return None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a process trains or predicts on.

    Args:
        name: ``auto`` (CUDA where a kernel runs on it, else the CPU, with a warning naming why), ``cuda`` (or an
            error naming the GPU, the build and the fix) or ``cpu``.
        local_rank: under torchrun each rank takes the GPU of its local rank.

    Raises:
        DeviceError: ``cuda`` asked for and unusable.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device={name!r}: use auto, cpu or cuda")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise DeviceError(f"device=cuda but torch sees no CUDA device ({describe_build()}); use device=auto "
                              "or device=cpu")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"local rank {local_rank} needs GPU {local_rank} but {count} are visible; start "
                          f"torchrun with --nproc_per_node={count} or fewer (or check CUDA_VISIBLE_DEVICES)")
    problem = kernel_problem(local_rank)
    if problem is None:
        return torch.device("cuda", local_rank)
    try:
        gpu, advice = describe_gpu(local_rank), install_advice(capability(local_rank))
    except Exception:  # the driver could not even describe the GPU
        gpu, advice = f"GPU {local_rank}", "check the NVIDIA driver (nvidia-smi) and the torch build"
    msg = f"{gpu} cannot run {describe_build()}: a first kernel failed ({problem}). Fix: {advice}"
    if name == "cuda":
        raise DeviceError(msg)
    if local_rank not in _WARNED:  # once per process, however often the device is resolved
        _WARNED.add(local_rank)
        print(f"warning: {msg}. device=auto: using the CPU instead", file=sys.stderr, flush=True)
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere (e.g. AVX2-only CPUs) bf16 autocast
    is emulated and several times slower than fp32, so ``precision=auto`` stays in fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(device: torch.device) -> str:
    """``precision=auto`` on ``device`` (the table in this module's docstring)."""
    if device.type == "cuda":
        cap = capability(device.index or 0)
        return "bf16" if cap >= (8, 0) else "fp16" if cap >= (7, 0) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def resolve_precision(setting: str, device: torch.device) -> str:
    """The precision a run uses (``fp32``, ``bf16`` or ``fp16``) for config key ``precision`` on ``device``.

    Raises:
        DeviceError: bf16 asked for on a GPU without bf16 arithmetic (before sm_80).
    """
    if setting == "auto":
        return auto_precision(device)
    if setting not in PRECISIONS:
        raise DeviceError(f"precision={setting!r}: use auto, fp32, bf16 or fp16")
    if setting == "bf16" and device.type == "cuda" and capability(device.index or 0) < (8, 0):
        raise DeviceError(f"precision=bf16 on {describe_gpu(device.index or 0)}: bf16 needs sm_80 or newer; use "
                          "precision=fp16 (with loss scaling) or auto")
    return setting
