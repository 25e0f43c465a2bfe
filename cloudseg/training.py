"""The training loop: plain PyTorch, CPU and CUDA, resumable. Returns metrics and calls callbacks.

It never imports MLflow or Optuna: ``experiments/`` and ``cloudseg.tracking`` wire those in through callbacks
(``on_epoch_end`` may raise to stop a run, e.g. ``optuna.TrialPruned``).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from cloudseg import distributed as dist
from cloudseg.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint, unwrap
from cloudseg.config import Config, config_bands
from cloudseg.data.bands import BANDS
from cloudseg.data.dataset import ChipDataset, EpochSampler
from cloudseg.data.transforms import Normalization, build_train_transform, fit_normalization
from cloudseg.data.validate import ValidatedSplit
from cloudseg.devices import DTYPES, DeviceError, describe_gpu, resolve_precision
from cloudseg.devices import resolve_device as _resolve_device
from cloudseg.losses import build_loss
from cloudseg.metrics import JaccardAccumulator, ThresholdSweep
from cloudseg.models import build_model, freeze_unused, model_args


class Callback(Protocol):
    def __call__(self, epoch: int, metrics: dict) -> None: ...


@dataclass
class EvalResult:
    """Validation of one model on one fold."""

    jaccard: float  # pooled at the threshold used
    threshold: float
    per_chip: JaccardAccumulator
    sweep: ThresholdSweep
    probs: dict[str, np.ndarray] = field(default_factory=dict)  # chip id -> (H, W) float16, for kept chips


@dataclass
class FitResult:
    best_val_jaccard: float
    best_epoch: int
    threshold: float  # the chosen decision threshold (tuned on validation when cfg.tune_threshold)
    epochs_run: int
    stopped_early: bool
    history: list[dict]
    checkpoint: Path  # best model, self-describing (cloudseg.checkpoint format)
    final_eval: EvalResult  # kept model re-evaluated at ``threshold``
    fixed_eval: EvalResult  # kept model at the configured threshold (nothing tuned on validation labels)
    wall_s: float


def quiet() -> bool:
    """Progress bars off under CI or when asked (TQDM_DISABLE); one line per epoch is printed regardless."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(os.environ.get("TQDM_DISABLE"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA where a first kernel runs (else the CPU, with a warning saying why); under torchrun each rank
    takes the GPU of its local rank. See ``cloudseg.devices``."""
    return _resolve_device(name, dist.local_rank())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of config key ``precision`` on ``device`` (None: fp32); ``auto`` by what the device
    computes fast (``cloudseg.devices.auto_precision``)."""
    return DTYPES[resolve_precision(precision, device)]


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning on CUDA: each run feeds one input size (its crop in training, full chips in validation),
    so the fastest convolution algorithm is searched once per shape and pays back at every step after."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def loader_options(device: torch.device, num_workers: int) -> dict:
    """DataLoader options for batches bound to ``device``: page-locked batches on CUDA, so the ``non_blocking``
    copies overlap with compute (from pageable memory they are synchronous)."""
    return {"num_workers": num_workers, "pin_memory": device.type == "cuda"}


def use_channels_last(setting: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    """``auto``: NHWC on CUDA and under CPU bf16 autocast; on CPU in fp32 oneDNN's NCHW kernels measured faster."""
    if setting == "auto":
        return device.type == "cuda" or dtype is not None
    return setting == "true"


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(cfg: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 1% of the peak (per optimiser step)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.2
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))


def augment_rng_holders(transform) -> list:
    """The albumentations pipeline and each of its transforms, depth first: with ``Compose(seed=)`` every one
    holds its own ``random_generator`` (numpy) and ``py_random`` (python)."""
    out, stack = [], [transform]
    while stack:
        t = stack.pop(0)
        if getattr(t, "random_generator", None) is not None and getattr(t, "py_random", None) is not None:
            out.append(t)
        stack[:0] = list(getattr(t, "transforms", None) or [])
    return out


def read_init_checkpoint(path: Path) -> dict:
    """The checkpoint config key init_from resolved to (a file)."""
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} is not a checkpoint file")
    return load_checkpoint(path)


def load_init_weights(model: torch.nn.Module, args: dict, ckpt: dict, path: Path) -> None:
    """Load the init_from checkpoint ``ckpt`` (read from ``path``) into ``model``; refuse another model."""
    theirs = {k: ckpt["model"].get(k) for k in ("arch", "encoder_name", "in_channels", "classes")}
    mine = {k: args.get(k) for k in theirs}
    if theirs != mine:
        raise ValueError(f"init_from: {path} holds {theirs['arch']}+{theirs['encoder_name']} "
                         f"({theirs['in_channels']} bands, {theirs['classes']} classes) but the config builds "
                         f"{mine['arch']}+{mine['encoder_name']} ({mine['in_channels']} bands, {mine['classes']} "
                         "classes); set arch and encoder to match")
    model.load_state_dict(ckpt["state_dict"])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: ChipDataset,
    device: torch.device,
    dtype: torch.dtype | None,
    threshold: float,
    batch_size: int = 4,
    channels_last: bool = True,
    keep_probs: set[str] | None = None,
    num_workers: int = 0,
) -> EvalResult:
    """Competition Jaccard of ``model`` on ``dataset`` (full chips), plus a threshold sweep. Under torchrun each
    rank passes its shard of the chips (possibly none) and every rank gets the counts of all of them."""
    # The plain module, not DDP's wrapper: DDP's forward broadcasts buffers at the first call after training, a
    # collective a rank with an empty shard would never join. Every rank joins this broadcast instead, so all
    # validate with rank 0's BatchNorm statistics (the ones its checkpoint holds).
    model = unwrap(model)
    dist.broadcast_buffers(model)
    model.eval()
    acc, sweep, kept = JaccardAccumulator(), ThresholdSweep(), {}
    local, local_kept = acc, kept
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(device, num_workers))
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        probs = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        masks = batch["mask"][:, 0].numpy().astype(np.uint8)
        for chip_id, p, m in zip(batch["chip_id"], probs, masks):
            sweep.update(p, m)
            acc.add(chip_id, (p >= threshold).astype(np.uint8), m)
            if keep_probs and chip_id in keep_probs:
                kept[chip_id] = p.astype(np.float16)
    if dist.active():  # each rank scored its shard: sum the counts, so the figure is one process's figure
        sweep.pos, sweep.neg = dist.sum_arrays(sweep.pos, sweep.neg)
        acc, kept = JaccardAccumulator(), {}
        for per, probs in dist.gather((local.per_chip(), local_kept)):
            for r in per.itertuples():
                acc.add_counts(r.chip_id, r.intersection, r.union)
            kept.update(probs)
    try:
        j = acc.score()
    except ValueError:  # no cloud anywhere in this fold nor predicted: perfect by convention of "nothing to find"
        j = 1.0
    return EvalResult(j, threshold, acc, sweep, kept)


class Trainer:
    """Fits one model on one (train_ids, val_ids) split and keeps a resumable state in ``state_dir``.

    ``state_dir/last.pt`` holds everything needed to resume after the last completed epoch (model, optimiser,
    scheduler, scaler, RNG states, history); ``state_dir/best.pt`` is the best model as a self-describing
    checkpoint. Both are written atomically at the end of each epoch.
    """

    def __init__(
        self,
        cfg: Config,
        split: ValidatedSplit,
        train_ids: list[str],
        val_ids: list[str],
        state_dir: Path | str,
        callbacks: list[Callback] | None = None,
        init_weights: Path | str | None = None,
    ):
        self.cfg, self.split = cfg, split
        # starting weights: a cloudseg checkpoint file (entry points resolve config key init_from to one)
        self.init_weights = Path(init_weights) if init_weights is not None else None
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        self.state_dir = Path(state_dir)
        self.callbacks = list(callbacks or [])
        self.device = resolve_device(cfg.device)
        if dist.active() and "cuda" in (self.device.type, dist.device().type) and self.device != dist.device():
            raise DeviceError(f"device={cfg.device} resolves to {self.device} but this rank joined its process "
                              f"group on {dist.device()}; give the same --set device=... to every torchrun rank")
        self.precision = resolve_precision(cfg.precision, self.device)  # fp32 | bf16 | fp16, as the run records
        self.dtype = DTYPES[self.precision]
        self.channels_last = use_channels_last(cfg.channels_last, self.device, self.dtype)
        configure_backends(self.device)
        self.bands = config_bands(cfg)
        if tuple(split.bands) != self.bands:
            raise ValueError(f"the split was read with bands {','.join(split.bands)} but the config's bands are "
                             f"{cfg.bands}")
        self.start = read_init_checkpoint(self.init_weights) if self.init_weights is not None else None
        if self.start is not None and list(self.start.get("bands", BANDS)) == list(self.bands):
            # a model keeps the normalisation its starting weights learned with (ukis-csmask's differs from ours)
            self.normalization = Normalization.from_dict(self.start["normalization"])
        else:
            self.normalization = fit_normalization(split, self.train_ids, self.bands, BANDS)
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)

    def describe(self) -> dict[str, str]:
        """Run tags: the device and precision this run resolved to (``auto`` decides by the hardware)."""
        tags = {"cloudseg.device": self.device.type, "cloudseg.precision": self.precision}
        if self.device.type == "cuda":
            tags["cloudseg.gpu"] = describe_gpu(self.device.index or 0)
        return tags

    # -------------------------------------------------------------- pieces
    def build(self):
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.model_args = model_args(cfg.arch, cfg.encoder, in_channels=len(self.bands))
        model = build_model(cfg.arch, cfg.encoder, encoder_weights=cfg.encoder_weights or None,
                            in_channels=len(self.bands))
        if self.start is not None:
            load_init_weights(model, self.model_args, self.start, self.init_weights)
        self.frozen = freeze_unused(model, len(self.bands))  # e.g. EfficientNet's classifier head: DDP needs it
        model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist.active():
            if cfg.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        self.loss_fn = build_loss(cfg.loss)
        rank, world = dist.rank(), dist.world()
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} is the global batch: it must divide by the {world} ranks")
        # each rank augments with its own seed (rank 0's is the config's: one process draws what it always drew);
        # a DataLoader worker reseeds its copy from (seed, rank, epoch, worker id) instead (ChipDataset)
        transform = build_train_transform(cfg.crop_size or None, cfg.aug_strength, seed=cfg.seed + rank)
        self.transform = transform
        self.train_ds = ChipDataset(self.split, self.train_ids, transform, self.normalization,
                                    augment_seed=(cfg.seed, rank))
        self.val_ds = ChipDataset(self.split, self.val_ids[rank::world], None, self.normalization)
        n = len(self.train_ds)
        per_epoch = cfg.steps_per_epoch or max(1, n // cfg.batch_size if n >= cfg.batch_size else 1)
        self.steps_per_epoch = per_epoch
        self.generator = torch.Generator().manual_seed(cfg.seed)
        sampler = RandomSampler(self.train_ds, replacement=n < per_epoch * cfg.batch_size,
                                num_samples=per_epoch * cfg.batch_size, generator=self.generator)
        if world > 1:  # every rank draws the same global epoch and trains on its share of each global batch
            sampler = dist.ShardSampler(sampler, rank, world)
        self.epoch_sampler = EpochSampler(sampler)  # each index carries its epoch into the workers
        self.train_loader = DataLoader(self.train_ds, batch_size=cfg.batch_size // world,
                                       sampler=self.epoch_sampler, drop_last=True,
                                       persistent_workers=cfg.num_workers > 0,
                                       **loader_options(self.device, cfg.num_workers))
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer, per_epoch)
        # fp16 needs loss scaling on any device (its range underflows small gradients); CPU runs it too, so the
        # path CUDA takes is rehearsed where no GPU is (tests/test_devices.py)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def train_one_epoch(self, epoch: int) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        self.epoch_sampler.set_epoch(epoch)
        losses, n_chips = [], 0
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=quiet())
        for batch in bar:
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["mask"].to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.dtype):
                logits = model(x)
            loss = self.loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}; lower lr or use fp32")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            losses.append(loss.item())
            n_chips += x.shape[0]
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        dt = time.perf_counter() - t0
        if dist.active():  # the run's loss and throughput, over every rank's chips
            total, = dist.sum_arrays(np.array([float(np.sum(losses)), float(len(losses)), float(n_chips)]))
            return {"train_loss": total[0] / total[1], "chips_per_s": total[2] / dt,
                    "lr": self.optimizer.param_groups[0]["lr"]}
        return {"train_loss": float(np.mean(losses)), "chips_per_s": n_chips / dt,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _checkpoint(self, epoch: int, threshold: float, metrics: dict) -> dict:
        return make_checkpoint(unwrap(self.model), self.model_args, self.normalization.to_dict(), threshold,
                               self.cfg.to_dict(), epoch, metrics, bands=self.bands)

    def _save_state(self, epoch: int, best: float, best_epoch: int, history: list[dict], since_best: int) -> None:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "sampler": self.generator.get_state(), "augment": self._augment_rng()}
        ranks = dist.gather(rng)  # each rank's own generators (rank 0's alone without torchrun)
        if not dist.is_main():
            return
        state = {
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "best": best, "best_epoch": best_epoch, "history": history, "since_best": since_best,
            "rng": ranks[0], "rng_ranks": ranks, "world_size": dist.world(),
            "config": self.cfg.to_dict(),
        }
        tmp = self.state_dir / "last.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.state_dir / "last.pt")

    def _load_state(self) -> dict | None:
        path = self.state_dir / "last.pt"
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        rng = ranks[dist.rank()] if len(ranks) == dist.world() else state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["sampler"])
        saved = rng.get("augment")
        holders = augment_rng_holders(self.transform)
        if saved and len(saved) == len(holders):
            for t, (np_state, py_state) in zip(holders, saved):
                t.random_generator.bit_generator.state = np_state
                t.py_random.setstate(py_state)
        return state

    def _augment_rng(self) -> list:
        """The augmentation pipeline's own generators, in pipeline order (albumentations draws from these, not the
        global seeds). DataLoader workers reseed their copies from (seed, rank, epoch, worker id) instead, so a
        resume with workers repeats their augmentations from the epoch alone."""
        return [(t.random_generator.bit_generator.state, t.py_random.getstate())
                for t in augment_rng_holders(self.transform)]

    # -------------------------------------------------------------- loop
    def fit(self) -> FitResult:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.build()
        state = self._load_state()
        start, best, best_epoch, history, since_best = 1, -1.0, 0, [], 0
        if state is not None:
            start, best, best_epoch = state["epoch"] + 1, state["best"], state["best_epoch"]
            history, since_best = state["history"], state["since_best"]
            print(f"resuming from {self.state_dir / 'last.pt'} after epoch {state['epoch']}", flush=True)
        stopped_early = False
        epoch = start - 1
        plot_ids = set(self.val_ids[: cfg.plot_chips])
        kept_ev = None  # the kept model's evaluation from this process, so the end needs no second pass
        for epoch in range(start, cfg.epochs + 1):
            metrics = self.train_one_epoch(epoch)
            metrics["epoch"] = epoch
            validated = epoch % cfg.val_every == 0 or epoch == cfg.epochs
            if validated:
                ev = evaluate(self.model, self.val_ds, self.device, self.dtype, cfg.threshold, cfg.val_batch_size,
                              self.channels_last, keep_probs=plot_ids, num_workers=cfg.num_workers)
                metrics["val_jaccard"] = ev.jaccard
                if ev.jaccard > best or cfg.keep == "last":
                    best, best_epoch, since_best, kept_ev = ev.jaccard, epoch, 0, ev
                    if dist.is_main():
                        save_checkpoint(self._checkpoint(epoch, cfg.threshold, {"val_jaccard": ev.jaccard}),
                                        self.state_dir / "best.pt")
                else:
                    since_best += 1
            history.append(metrics)
            for cb in self.callbacks:  # logging first, so a state on disk implies its epoch was logged
                cb(epoch, dict(metrics))
            self._save_state(epoch, best, best_epoch, history, since_best)
            val = f"val_jaccard={metrics['val_jaccard']:.4f} " if validated else ""
            if dist.is_main():
                mem = (f" gpu_peak_gb={torch.cuda.max_memory_allocated(self.device) / 1e9:.2f}"
                       if self.device.type == "cuda" else "")
                print(f"epoch {epoch}/{cfg.epochs} train_loss={metrics['train_loss']:.4f} {val}"
                      f"chips/s={metrics['chips_per_s']:.2f}{mem}", flush=True)
            if validated and cfg.early_stopping and since_best >= cfg.early_stopping:
                stopped_early = True
                break
        # The kept model's evaluation (again only when it was kept before a resume), the threshold, the checkpoint.
        dist.barrier()  # rank 0 has written best.pt
        ckpt = load_checkpoint(self.state_dir / "best.pt")
        unwrap(self.model).load_state_dict(ckpt["state_dict"])
        if kept_ev is not None and ckpt.get("epoch") == best_epoch:
            ev = kept_ev
        else:
            ev = evaluate(self.model, self.val_ds, self.device, self.dtype, cfg.threshold, cfg.val_batch_size,
                          self.channels_last, keep_probs=plot_ids, num_workers=cfg.num_workers)
        fixed = ev
        threshold = cfg.threshold
        if cfg.tune_threshold:
            try:
                threshold, _ = ev.sweep.best()
            except ValueError:
                threshold = cfg.threshold
        if threshold != cfg.threshold:
            ev = evaluate(self.model, self.val_ds, self.device, self.dtype, threshold, cfg.val_batch_size,
                          self.channels_last, keep_probs=plot_ids, num_workers=cfg.num_workers)
        final = self._checkpoint(ckpt["epoch"], threshold, {"best_val_jaccard": best, "val_jaccard_at_threshold":
                                                            ev.jaccard})
        path = self.state_dir / "best.pt"
        if dist.is_main():
            save_checkpoint(final, path)
        dist.barrier()
        return FitResult(best, best_epoch, threshold, epoch, stopped_early, history, path, ev, fixed,
                         time.perf_counter() - t_start)


def predict_probs(ckpt_path: Path | str, dataset: ChipDataset, device: str = "auto", precision: str = "auto",
                  batch_size: int = 4) -> dict[str, np.ndarray]:
    """Cloud probabilities of a checkpoint's model on full chips. Returns chip id -> (H, W) float32."""
    ckpt = load_checkpoint(ckpt_path)
    dev = resolve_device(device)
    dtype = autocast_dtype(precision, dev)
    nhwc = use_channels_last("auto", dev, dtype)
    model = model_from_checkpoint(ckpt).to(dev)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    out = {}
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            x = batch["image"].to(dev)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, dtype):
                p = torch.sigmoid(model(x).float())[:, 0].cpu().numpy()
            out.update(zip(batch["chip_id"], p))
    return out
