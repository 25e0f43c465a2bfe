"""How much the training pipeline (data loading + augmentation + bookkeeping) costs over pure compute.

    python experiments/bench_train.py [--config experiments/configs/default.yaml] [--steps 12] [--set k=v]...

Both sides use the same model, batch size, crop, precision, memory format and threads, measured in one process:
- pure: forward + backward + optimiser step on one pre-built batch, again and again;
- pipeline: ``Trainer.train_one_epoch`` of the recipe, i.e. the real in-memory chips, random crop, D4 and
  normalisation through the DataLoader, loss, gradient clipping, scheduler.
Last line: ``overhead=<1 - pipeline chips/s / pure chips/s>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cloudseg.config import apply_overrides, load_config  # noqa: E402
from cloudseg.paths import CONFIGS_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIGS_DIR / "default.yaml")
    p.add_argument("--steps", type=int, default=12, help="timed optimiser steps per side (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2, help="alternate pure/pipeline this many times; best of each")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--data")
    args = p.parse_args(argv)

    from cloudseg.data.sources import fold_ids, load_split
    from cloudseg.training import Trainer, autocast

    cfg = load_config(args.config, args.sets, data=args.data)
    cfg = apply_overrides(cfg, {"steps_per_epoch": args.steps}, "bench")
    root, split = load_split(cfg)
    train_ids, val_ids = fold_ids(cfg, split, cfg.fold)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, split, train_ids, val_ids, tmp)
        trainer.build()
        model, dev = trainer.model, trainer.device
        batch = next(iter(trainer.train_loader))
        x = batch["image"].to(dev).contiguous(memory_format=torch.channels_last if trainer.channels_last else
                                              torch.contiguous_format)
        y = batch["mask"].to(dev)

        def pure(steps: int) -> float:
            model.train()
            t0 = time.perf_counter()
            for _ in range(steps):
                with autocast(dev, trainer.dtype):
                    logits = model(x)
                loss = trainer.loss_fn(logits.float(), y)
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
            return steps * x.shape[0] / (time.perf_counter() - t0)

        def pipeline() -> float:
            return trainer.train_one_epoch(0)["chips_per_s"]

        pure(2)  # warm-up (allocator, autocast caches)
        pure_best, pipe_best = 0.0, 0.0
        for _ in range(args.repeats):
            pure_best = max(pure_best, pure(args.steps))
            pipe_best = max(pipe_best, pipeline())
    overhead = 1 - pipe_best / pure_best
    print(f"{'recipe':<28}{cfg.arch}+{cfg.encoder} batch={cfg.batch_size} crop={cfg.crop_size} "
          f"dtype={trainer.dtype} channels_last={trainer.channels_last} threads={torch.get_num_threads()}")
    print(f"{'pure fwd+bwd chips/s':<28}{pure_best:.3f}")
    print(f"{'pipeline chips/s':<28}{pipe_best:.3f}")
    print(f"overhead={overhead:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
