"""How close ``cloudseg predict`` on a whole scene comes to the model's pure forward speed, and its peak RSS.

    python experiments/bench_predict.py [--size 10980] [--arch Unet] [--encoder timm-mobilenetv3_large_100]
        [--overlap 64] [--batch-size 8] [--tta none] [--device cpu] [--forward-windows N] [--workdir DIR]

Writes a ``--size`` x ``--size`` synthetic scene (B02/B03/B04/B08 as tiled, deflate uint16 GeoTIFFs, every
window valid: seeded cloud chips tiled edge to edge, written window by window; kept in ``--workdir`` and
reused) and a random-weight checkpoint of the model, then, with the same interpreter, torch threads, device,
batch size, precision and TTA:

- predict: ``cloudseg predict`` in a subprocess (its own ``throughput pixels_per_s`` line counts from the first
  window read to the output file closed: interpreter start and model load are excluded); its peak RSS is the
  child's ``ru_maxrss``;
- pure forward: ``cloudseg.predict.forward_probabilities`` (normalise, forward per TTA view, mean probability,
  copy back to the host) on batches already in memory, for as many windows as predict sent to the model
  (``--forward-windows`` times fewer, scaled up, to save time), half measured just before and half just after
  the predict run, so a drift in machine load hits both sides.

pixels/s on both sides counts the scene's pixels, so ratio = forward time of the windows / predict time.
Last line: ``ratio=<predict pixels/s / pure forward pixels/s> peak_rss_gb=<predict's peak RSS>``
(goals: ratio >= 0.85, peak RSS <= 2.5 GB).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from cloudseg.data.io import BANDS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=10980, help="scene height and width (a Sentinel-2 tile: 10980)")
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="timm-mobilenetv3_large_100", help="the default recipe's encoder")
    p.add_argument("--overlap", type=int, default=64, help="as cloudseg predict's default")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tta", default="none", help="none, flip, ... (the same on both sides)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--forward-windows", type=int, default=0,
                   help="time the pure forward on this many windows and scale (0: as many as predict ran)")
    p.add_argument("--repeats", type=int, default=1,
                   help="repeat forward/predict/forward R times; each side's best round counts (shared machines)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the scene here and reuse it (default: temp)")
    return p.parse_args(argv)


def make_scene(folder: Path, size: int) -> Path:
    """Four band files of ``size`` x ``size``, written one 512-row strip at a time (memory stays small)."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(size):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint16", crs="EPSG:32736",
                   transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 9000000.0), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate")
    files = [rasterio.open(folder / f"{b}.tif", "w", **profile) for b in BANDS]
    tiles = _chip_tiles(8)
    try:
        for i, row in enumerate(range(0, size, 512)):
            h = min(512, size - row)
            strip = np.concatenate([tiles[(i * 7 + j) % len(tiles)] for j in range((size + 511) // 512)], axis=2)
            for k, dst in enumerate(files):
                dst.write(strip[k, :h, :size], 1, window=Window(0, row, size, h))
    finally:
        for dst in files:
            dst.close()
    done.write_text(str(size))
    return folder


def _chip_tiles(n: int) -> list[np.ndarray]:
    """``n`` seeded 512x512 cloud chips (bright ellipses on dark ground, no nodata pixel)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    out = []
    for _ in range(n):
        cloud = np.zeros((512, 512), bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, 512, 2)
            ry, rx = rng.uniform(40, 160, 2)
            cloud |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ground = np.array([400, 700, 600, 2800], np.float32)[:, None, None]
        bright = np.array([6000, 5800, 5600, 6200], np.float32)[:, None, None]
        img = np.where(cloud[None], bright, ground) + rng.normal(0, 150, (4, 512, 512))
        out.append(np.clip(img, 1, 18000).astype(np.uint16))
    return out


def make_checkpoint_file(path: Path, arch: str, encoder: str) -> Path:
    import torch

    from cloudseg.checkpoint import make_checkpoint, save_checkpoint
    from cloudseg.data.transforms import Normalization
    from cloudseg.models import build_model, model_args

    torch.manual_seed(0)
    model = build_model(arch, encoder)
    return save_checkpoint(make_checkpoint(model, model_args(arch, encoder), Normalization().to_dict(), 0.5, {},
                                           epoch=0), path)


def time_forward(ens, batches: list, n_windows: int, batch_size: int, tta: str, device) -> float:
    """Seconds to run ``forward_probabilities`` over ``n_windows`` windows (cycling ``batches``)."""
    import torch

    from cloudseg.predict import forward_probabilities

    left, i = n_windows, 0
    t = time.perf_counter()
    while left > 0:
        x = batches[i % len(batches)][: min(batch_size, left)]
        forward_probabilities(ens, x, tta).cpu().numpy()
        left -= x.shape[0]
        i += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from cloudseg import predict as pr

    tmp = tempfile.TemporaryDirectory(prefix="bench-predict-")
    work = args.workdir or Path(tmp.name)
    t = time.perf_counter()
    scene = make_scene(work / f"scene{args.size}", args.size)
    scene_s = time.perf_counter() - t
    ckpt = make_checkpoint_file(Path(tmp.name) / "model.pt", args.arch, args.encoder)
    device = pr.pick_device(args.device)
    ens = pr.load_ensemble([ckpt], device, tta=args.tta, batch_size=args.batch_size)
    starts = pr.window_starts(args.size, pr.TILE, args.overlap)
    n_windows = len(starts) ** 2  # the scene has no nodata: predict forwards every window
    fwd_windows = min(n_windows, args.forward_windows or n_windows)
    reader = pr.Scene(scene)
    batches = []
    for b in range(2):  # two distinct batches of real windows, resident on the device
        xs = [reader.read(starts[b], starts[k % len(starts)], pr.TILE, pr.TILE) for k in range(args.batch_size)]
        batches.append(torch.from_numpy(np.stack(xs).astype(np.float32)).to(device))
    reader.close()
    time_forward(ens, batches, args.batch_size, args.batch_size, args.tta, device)  # warm-up
    half = fwd_windows // 2
    out = Path(tmp.name) / "mask.tif"
    cmd = [sys.executable, "-m", "cloudseg.cli", "predict", str(scene), "--model", str(ckpt), "--out", str(out),
           "--overlap", str(args.overlap), "--batch-size", str(args.batch_size), "--tta", args.tta,
           "--device", args.device]
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    predict_rounds, forward_rounds = [], []
    for _ in range(max(1, args.repeats)):
        before = time_forward(ens, batches, half, args.batch_size, args.tta, device)
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        predict_wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        after = time_forward(ens, batches, fwd_windows - half, args.batch_size, args.tta, device)
        m = re.search(r"throughput pixels_per_s=([\d.]+) pixels=(\d+) seconds=([\d.]+)", proc.stdout)
        if not m:
            print(f"no throughput line in cloudseg predict's output:\n{proc.stdout}", file=sys.stderr)
            return 1
        predict_rounds.append(float(m[3]))
        forward_rounds.append((before + after) * n_windows / fwd_windows)
        print(f"round {len(predict_rounds)}: predict {predict_rounds[-1]:.1f} s, pure forward "
              f"{forward_rounds[-1]:.1f} s", flush=True)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # kB on Linux: max child
    predict_s, forward_s = min(predict_rounds), min(forward_rounds)
    pixels = args.size * args.size
    predict_pps, forward_pps = pixels / predict_s, pixels / forward_s
    rows = [
        ("scene", f"{args.size}x{args.size} ({pixels / 1e6:.1f} Mpx), generated in {scene_s:.1f} s"),
        ("model", f"{args.arch} + {args.encoder}, batch {args.batch_size}, tta {args.tta}, fp32, {device}, "
                  f"torch threads {torch.get_num_threads()}"),
        ("windows", f"{n_windows} at overlap {args.overlap} (pure forward timed on {fwd_windows})"),
        ("predict", f"{predict_s:.1f} s first read -> file closed ({predict_wall:.1f} s wall with start-up), "
                    f"{predict_pps / 1e6:.3f} Mpx/s"),
        ("pure forward", f"{forward_s:.1f} s for the same windows, {forward_pps / 1e6:.3f} Mpx/s "
                         f"({forward_s / n_windows * 1000:.0f} ms/window)"),
        ("predict peak RSS", f"{peak_rss_gb:.2f} GB"),
        ("full 10980^2 at this speed", f"{10980 ** 2 / predict_pps / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"ratio={predict_pps / forward_pps:.3f} peak_rss_gb={peak_rss_gb:.2f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
