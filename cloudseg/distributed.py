"""One training run over several processes (``torchrun``): who this process is, and the few collectives the
training loop needs. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every function is the
single-process identity, so a plain ``python experiments/train.py`` runs exactly as before.

Written on raw ``torch.distributed`` (NCCL on CUDA, gloo on CPU): the loop is already plain PyTorch, and what
DDP adds to it here is a sharded sampler, gradient all-reduce and summed validation counts.

Every collective cloudseg makes itself goes through this module, and every tensor it hands one is on ``device()``:
NCCL takes only tensors on the rank's own GPU (gloo takes CPU tensors and hides the difference), so a CPU tensor
here is a multi-GPU run that fails at the first epoch's end. ``tests/test_ddp.py`` rehearses that rule on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_DEVICE = torch.device("cpu")  # where this rank's collectives take tensors (set by setup)


def setup(device: str = "auto") -> None:
    """Join the process group ``torchrun`` describes (idempotent; nothing without torchrun): NCCL where this rank
    trains on a GPU (config key ``device``, resolved as the training loop resolves it), gloo on the CPU."""
    global _DEVICE
    if not launched() or dist.is_initialized():
        return
    from cloudseg.devices import resolve_device

    dev = resolve_device(device, local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)  # bound to the rank's GPU: barriers know which one
    else:
        dist.init_process_group("gloo")
    _DEVICE = dev


def device() -> torch.device:
    """The device this rank's collectives take tensors on: its GPU under NCCL, the CPU under gloo."""
    return _DEVICE


def teardown() -> None:
    global _DEVICE
    if dist.is_initialized():
        dist.destroy_process_group()
    _DEVICE = torch.device("cpu")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sum_arrays(*arrays: np.ndarray) -> list[np.ndarray]:
    """Element-wise sums over the ranks (int64 or float64 arrays keep their dtype)."""
    if not active():
        return list(arrays)
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out.append(t.cpu().numpy())
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. Every rank calls it, whatever it does next,
    so a rank with nothing to validate still joins the collective the others make."""
    if not active():
        return
    for buf in module.buffers():
        t = buf.to(device())
        dist.broadcast(t, src=0)
        if t is not buf:
            buf.copy_(t.to(buf.device))


class ShardSampler(Sampler):
    """Rank ``r``'s share of another sampler's sequence: items ``r, r + world, r + 2 world, ...``.

    Every rank draws the same global sequence (same generator seed), so the epoch as a whole is what one process
    would draw, and a global batch of ``batch_size`` is ``batch_size / world`` chips on each rank.
    """

    def __init__(self, base: Sampler, rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def __iter__(self) -> Iterator[int]:
        for i, idx in enumerate(self.base):
            if i % self.world == self.rank:
                yield idx

    def __len__(self) -> int:
        return (len(self.base) - self.rank + self.world - 1) // self.world


def failure_marker(state_dir: Path | str, r: int | None = None) -> Path:
    """Where a rank that raised leaves its error, so rank 0 can end the run FAILED rather than KILLED when
    ``torchrun`` stops it because another rank died (one host; state folders shared)."""
    return Path(state_dir) / f"rank{rank() if r is None else r}.failed"
