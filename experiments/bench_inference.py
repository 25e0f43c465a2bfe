"""How close the submission's main.py pipeline comes to the model's pure forward speed.

    python experiments/bench_inference.py [--n-chips 200] [--arch Unet] [--encoder resnet18] [--batch-size 8]
        [--tta none] [--decoder-channels 32,16,8,8,8] [--repeats R] [--runtime | --python PATH]

Writes ``--n-chips`` synthetic 512x512 chips (cloudseg.data.synthetic, deflate GeoTIFFs as write_tif
writes them) and a random-weight checkpoint of the model into a submission made from the main.py template,
then, all with the same interpreter, torch threads (main.py's own ``configure_torch``), device, batch size,
precision and TTA:

- main.py: ``python main.py`` on all chips; its own ``throughput chips_per_s`` line counts from the first
  read to the last write, so interpreter start and model load are excluded;
- pure forward: main.py's own ``predict_masks`` (normalise, forward per TTA view, mean probability,
  threshold, copy back) on one pre-built batch held on the device, for the same number of chips, half
  measured just before and half just after the main.py run, so a drift in machine load hits both sides.

With ``--repeats R`` the three runs are repeated R times and each side's best round is used (the least
disturbed one: on a shared machine other processes slow either side at random).

Last line: ``ratio=<main.py chips/s / pure forward chips/s>`` (goal >= 0.85).
Also reported: the serial cost of reading and writing one chip, which the pipeline has to hide.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from cloudseg.data.io import BANDS, write_tif  # noqa: E402

# Runs under the benchmarked interpreter (maybe Python 3.9 / torch 1.8): uses only main.py's own functions.
FORWARD_SCRIPT = """
import importlib.util, sys, time
import torch
folder, n_chips, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("bench_main", folder + "/main.py")
main = importlib.util.module_from_spec(spec)
spec.loader.exec_module(main)
from pathlib import Path
config = main.load_inference_config(Path(folder))
device = main.pick_device()
threads = main.configure_torch(device)
members, bands, threshold = main.load_members(config, device, Path(folder))
views = main.tta_views(str(config["tta"]))
amp = bool(config.get("amp")) and device.type == "cuda"
gen = torch.Generator().manual_seed(0)
x = (torch.rand(batch_size, len(bands), 512, 512, generator=gen) * 8000.0).to(device)
main.predict_masks(members, x, views, threshold, amp)  # warm-up: kernel selection, allocator
done, t0 = 0, time.time()
while done < n_chips:
    b = min(batch_size, n_chips - done)
    main.predict_masks(members, x[:b], views, threshold, amp)
    done += b
seconds = time.time() - t0
print("forward chips=%d seconds=%.3f chips_per_s=%.4f device=%s threads=%d torch=%s"
      % (done, seconds, done / seconds, device, threads, torch.__version__))
"""


# Serial cost of main.py's reading and writing per chip (same interpreter): what the pipeline must hide.
IO_SCRIPT = """
import importlib.util, os, sys, tempfile, time
from pathlib import Path
folder, features, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("bench_main", folder + "/main.py")
main = importlib.util.module_from_spec(spec)
spec.loader.exec_module(main)
chips = main.list_chips(features)[:n]
t0 = time.time()
for c in chips:
    image, problems = main.read_chip(features / c, main.DEFAULT_BANDS)
read_s = time.time() - t0
mask = (image[0] > image[0].mean()).astype("uint8")
out = Path(tempfile.mkdtemp())
t0 = time.time()
for c in chips:
    main.write_prediction(out / (c + ".tif"), mask)
write_s = time.time() - t0
print("io chips=%d read_s=%.4f write_s=%.4f" % (len(chips), read_s, write_s))
"""


def make_chips(features: Path, n: int, distinct: int, seed: int) -> None:
    """``n`` chip folders: ``distinct`` synthetic chips, the rest byte copies (reading costs the same)."""
    from cloudseg.data.synthetic import generate_chip

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = features / f"b{i:05d}"
        if i < distinct:
            bands, _ = generate_chip(rng)
            for name, arr in zip(BANDS, bands):
                write_tif(folder / f"{name}.tif", arr)
        else:
            shutil.copytree(features / f"b{i % distinct:05d}", folder)


def make_model_checkpoint(path: Path, arch: str, encoder: str, decoder_channels: list[int] | None) -> Path:
    """Random-weight model saved in the cloudseg checkpoint format."""
    import torch

    from cloudseg.checkpoint import make_checkpoint, save_checkpoint
    from cloudseg.data.transforms import Normalization

    kwargs = {"decoder_channels": decoder_channels} if decoder_channels else {}
    try:
        from cloudseg.models import build_model
    except ImportError:  # before cloudseg.models exists: smp directly
        import segmentation_models_pytorch as smp

        def build_model(arch, encoder, encoder_weights=None, in_channels=4, classes=1, **kw):
            return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights,
                                    in_channels=in_channels, classes=classes, **kw)
    torch.manual_seed(0)
    model = build_model(arch, encoder, encoder_weights=None, in_channels=4, classes=1, **kwargs)
    args = {"arch": arch, "encoder_name": encoder, "in_channels": 4, "classes": 1, "kwargs": kwargs}
    ckpt = make_checkpoint(model, args, Normalization().to_dict(), 0.5, {"bench": True}, epoch=0)
    return save_checkpoint(ckpt, path)


def forward(python: str, folder: Path, n: int, batch_size: int, env: dict) -> dict:
    r = subprocess.run([python, "-c", FORWARD_SCRIPT, str(folder), str(n), str(batch_size)], env=env,
                       capture_output=True, text=True)
    m = re.search(r"forward chips=(\d+) seconds=([0-9.]+) chips_per_s=([0-9.]+) device=(\S+) threads=(\d+) "
                  r"torch=(\S+)", r.stdout)
    if r.returncode or not m:
        raise RuntimeError(f"pure-forward run failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return {"chips": int(m[1]), "seconds": float(m[2]), "cps": float(m[3]), "device": m[4],
            "threads": int(m[5]), "torch": m[6]}


def io_costs(python: str, folder: Path, features: Path, n: int, env: dict) -> tuple[dict, dict]:
    r = subprocess.run([python, "-c", IO_SCRIPT, str(folder), str(features), str(n)], env=env,
                       capture_output=True, text=True)
    m = re.search(r"io chips=(\d+) read_s=([0-9.]+) write_s=([0-9.]+)", r.stdout)
    if r.returncode or not m:
        raise RuntimeError(f"I/O timing failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    n, read_s, write_s = int(m[1]), float(m[2]), float(m[3])
    return ({"chips": n, "seconds": read_s, "cps": n / read_s},
            {"chips": n, "seconds": write_s, "cps": n / write_s})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-chips", type=int, default=200, help="chips main.py predicts (definition: >= 200)")
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--decoder-channels", default="",
                   help="comma-separated decoder widths, e.g. 128,64,32,16,8 (default: the architecture's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tta", default="none", choices=["none", "hflip", "flip", "flip4", "d4"])
    p.add_argument("--num-workers", type=int, default=2, help="main.py reader threads")
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    p.add_argument("--distinct", type=int, default=50, help="distinct synthetic chips; the rest are copies")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runtime", action="store_true", help="use .venv-runtime/bin/python (runtime versions)")
    g.add_argument("--python", help="interpreter for main.py and the forward runs (default: this one)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of forward/main.py/forward; the ratio uses the best round of each side")
    p.add_argument("--workdir", type=Path, help="keep chips and submission here, not in a temporary folder")
    args = p.parse_args(argv)
    if args.n_chips < 200:
        print(f"note: --n-chips {args.n_chips} < 200: below the benchmark's definition", file=sys.stderr)

    from cloudseg.submission import write_submission
    from cloudseg.submission.verify import runtime_python

    python = str(runtime_python()) if args.runtime else (args.python or sys.executable)
    decoder = [int(v) for v in args.decoder_channels.split(",")] if args.decoder_channels else None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cloudseg-bench-inference-"))
    try:
        root = work / "codeexecution"
        features = root / "data" / "test_features"
        t = time.time()
        if not features.is_dir() or len(os.listdir(features)) != args.n_chips:
            shutil.rmtree(root, ignore_errors=True)
            make_chips(features, args.n_chips, min(args.distinct, args.n_chips), seed=0)
        shutil.rmtree(root / "predictions", ignore_errors=True)
        print(f"chips: {args.n_chips} in {features} ({time.time() - t:.0f} s to prepare)")
        ckpt = make_model_checkpoint(work / "model.pt", args.arch, args.encoder, decoder)
        sub = write_submission(work / "submission", [ckpt], tta=args.tta, batch_size=args.batch_size,
                               num_workers=args.num_workers, amp=args.amp)
        env = {**os.environ, "CLOUDSEG_ROOT": str(root), "PYTHONPATH": "", "PYTHONUNBUFFERED": "1"}

        load = [os.getloadavg()[0]]
        reads, writes = io_costs(python, sub, features, min(50, args.n_chips), env)
        half = args.n_chips // 2
        rounds = []
        for r in range(args.repeats):
            before = forward(python, sub, half, args.batch_size, env)
            print(f"round {r + 1}: pure forward (before): {before['cps']:.3f} chips/s", flush=True)
            shutil.rmtree(root / "predictions", ignore_errors=True)
            proc = subprocess.run([python, "main.py"], cwd=sub, env=env, capture_output=True, text=True)
            m = re.search(r"^throughput chips_per_s=([0-9.]+) chips=(\d+) seconds=([0-9.]+)", proc.stdout,
                          re.M)
            if proc.returncode or not m:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                raise RuntimeError(f"main.py failed (exit {proc.returncode})")
            pipe = {"chips": int(m[2]), "seconds": float(m[3]), "cps": float(m[1])}
            d = re.search(r"compute_s=([0-9.]+) wait_input_s=([0-9.]+) wait_output_s=([0-9.]+)", proc.stdout)
            if d:
                pipe.update(compute_s=float(d[1]), wait_input_s=float(d[2]), wait_output_s=float(d[3]))
            print(f"round {r + 1}: main.py: {pipe['cps']:.3f} chips/s", flush=True)
            after = forward(python, sub, args.n_chips - half, args.batch_size, env)
            print(f"round {r + 1}: pure forward (after): {after['cps']:.3f} chips/s", flush=True)
            chips, seconds = before["chips"] + after["chips"], before["seconds"] + after["seconds"]
            rounds.append((pipe, before, after, {"chips": chips, "seconds": seconds, "cps": chips / seconds}))
            load.append(os.getloadavg()[0])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    dec = f" decoder={decoder}" if decoder else ""
    print()
    print(f"model={args.arch}/{args.encoder}{dec} batch={args.batch_size} tta={args.tta} amp={args.amp} "
          f"device={before['device']} torch_threads={before['threads']} readers={args.num_workers} "
          f"torch={before['torch']} python={python}")
    print(f"1-minute load average at start / after each round: {' / '.join(f'{v:.1f}' for v in load)} "
          f"on {os.cpu_count()} CPUs (other processes share the cores: compare the before/after rows)")
    print(f"| {'measure':<46} | {'chips':>6} | {'seconds':>8} | {'chips/s':>8} |")
    print(f"|{'-' * 48}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    rows = []
    for r, (pipe, before, after, pure) in enumerate(rounds):
        tag = f"round {r + 1}: " if len(rounds) > 1 else ""
        rows += [(f"{tag}main.py: read + forward + write", pipe),
                 (f"{tag}pure forward, before main.py", before), (f"{tag}pure forward, after main.py", after),
                 (f"{tag}pure forward, both halves", pure)]
    best_pipe = max((rd[0] for rd in rounds), key=lambda d: d["cps"])
    best_pure = max((rd[3] for rd in rounds), key=lambda d: d["cps"])
    if len(rounds) > 1:  # the least disturbed round of each side
        rows += [("best main.py round", best_pipe), ("best pure-forward round", best_pure)]
    rows += [("read_chip alone, 1 thread (hidden by overlap)", reads),
             ("write_prediction alone, 1 thread (hidden)", writes)]
    for name, r in rows:
        print(f"| {name:<46} | {r['chips']:>6} | {r['seconds']:>8.1f} | {r['cps']:>8.3f} |")
    for r, (pipe, *_) in enumerate(rounds):
        if "compute_s" in pipe:  # measured inside main.py, so other processes' load affects both parts alike
            print(f"main.py round {r + 1}: of {pipe['seconds']:.1f} s, its model thread spent "
                  f"{pipe['compute_s']:.1f} s computing, {pipe['wait_input_s']:.1f} s waiting for input and "
                  f"{pipe['wait_output_s']:.1f} s waiting for writers "
                  f"(compute share {pipe['compute_s'] / pipe['seconds']:.3f})")
    print(f"ratio={best_pipe['cps'] / best_pure['cps']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
