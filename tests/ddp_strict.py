"""NCCL's device rule, rehearsed on CPU: a rank's collectives take tensors on the rank's own device only.

NCCL refuses CPU tensors; gloo takes them. On a CPU-only machine a collective handed a CPU tensor therefore passes,
and the same code fails on the first multi-GPU run. Installed in each torchrun rank (``tests/test_ddp.py`` loads
it from a ``sitecustomize`` hook), this module:

- gives each rank a collective device that is not the CPU but holds real data on any torch build: ``lazy``
  (torch's lazy-tensor device on its TorchScript backend) stands in for the rank's GPU;
- routes the tensor collectives ``cloudseg.distributed`` makes (through its ``dist`` name) through a check that
  raises, as NCCL would, for a tensor on any other device; accepted ones run on gloo through a CPU copy;
- appends each accepted collective's name to ``$CLOUDSEG_TEST_PIDS/collectives.rank<R>``, so a test can see that
  the check ran (a rehearsal that never ran proves nothing).

DDP's own gradient buckets and torch's object collectives are torch's business and bypass the check.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as td

TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
                      "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or lists/tuples of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    return []


def _swap(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor (alone or in lists/tuples) replaced by ``fn(tensor)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(x, fn) for x in obj)
    return obj


class StrictDist:
    """``torch.distributed`` as seen by ``cloudseg.distributed``, with the tensor collectives checked."""

    def __init__(self, expected: Callable[[], torch.device], log: Callable[[str], None] = lambda name: None):
        self._expected, self._log = expected, log

    def __getattr__(self, name: str) -> Any:
        real = getattr(td, name)
        if name not in TENSOR_COLLECTIVES:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            want = self._expected()
            found = _tensors([args, list(kwargs.values())])
            for t in found:
                if t.device != want:
                    raise RuntimeError(f"{name} was handed a tensor on {t.device}, but this rank's collectives "
                                       f"take tensors on {want} only (NCCL: tensors must be on the rank's GPU)")
            host = {id(t): t.cpu() for t in found}
            out = real(*_swap(args, lambda t: host[id(t)]),
                       **{k: _swap(v, lambda t: host[id(t)]) for k, v in kwargs.items()})
            for t in found:  # results back onto the rank's device, where the caller reads them
                t.copy_(host[id(t)].to(t.device))
            self._log(name)
            return out

        return call


def install() -> None:
    """Make this torchrun rank's collectives strict (call before ``cloudseg.distributed.setup``)."""
    import torch._lazy.ts_backend

    import cloudseg.distributed as cd

    try:
        torch._lazy.ts_backend.init()
        rank_device = torch.device("lazy", 0)
        torch.zeros(1, device=rank_device).cpu()
    except Exception as exc:  # a torch without the lazy backend: this rehearsal needs another stand-in device
        raise RuntimeError(f"tests/ddp_strict.py: torch {torch.__version__} has no usable 'lazy' device ({exc}); "
                           "the NCCL rehearsal needs a non-CPU device that holds data") from exc
    real_setup = cd.setup
    logs = os.environ.get("CLOUDSEG_TEST_PIDS")

    def log(name: str) -> None:
        if logs:
            with open(os.path.join(logs, f"collectives.rank{os.environ.get('RANK', '0')}"), "a") as f:
                f.write(name + "\n")

    def setup(*args: Any, **kwargs: Any) -> None:
        real_setup(*args, **kwargs)
        if cd.active():
            cd._DEVICE = rank_device

    cd.setup = setup
    cd.dist = StrictDist(cd.device, log)
