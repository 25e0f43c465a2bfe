"""What a supplementary band costs: ``cloudseg add-bands`` per chip, and main.py's extra time per chip.

    python experiments/bench_stac.py [--n-chips 48] [--workers 8] [--runtime | --python PATH]

Against a local STAC API (``rustac serve`` over items made from the chips, COG assets served with range
requests by uvicorn: experiments/stac_local.py, which the tests use too), on 127.0.0.1, so the figures are this
machine's cost of the work (search, window read, resampling, writing) without the Planetary Computer's network
latency; over the internet each chip waits on one search and one ranged read per band, which ``--workers``
overlaps.

1. ``add-bands --bands B11`` on ``--n-chips`` fresh chips: seconds per chip written, and what that projects to for
   the 11,748 training chips;
2. main.py (same interpreter, same random-weight Unet/resnet18, TTA none) on the same chips without B11 on disk:
   a 4-band model, then a 5-band model that fetches B11 for each chip; each run's own ``throughput`` line
   (first read to last write; interpreter start and model load excluded) gives its seconds per chip.

Last line: ``add_band_s_per_chip=<x> main_extra_s_per_chip=<y>``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # stac_local, beside this file

TRAIN_CHIPS = 11_748


def make_submission(folder: Path, bands: tuple[str, ...], stac_url: str) -> Path:
    import torch

    from cloudseg.checkpoint import make_checkpoint, save_checkpoint
    from cloudseg.data.transforms import Normalization
    from cloudseg.models import build_model, model_args
    from cloudseg.submission import write_submission

    torch.manual_seed(0)
    n = len(bands)
    model = build_model("Unet", "resnet18", in_channels=n)
    norm = Normalization(mean=(0.0,) * n, std=(1.0,) * n)
    ckpt = save_checkpoint(make_checkpoint(model, model_args("Unet", "resnet18", in_channels=n), norm.to_dict(),
                                           0.5, {}, 0, bands=bands), folder.with_suffix(".pt"))
    stac = {"url": stac_url, "collection": "sentinel-2-l2a", "bands": [b for b in bands if b not in bands[:4]],
            "budget_s": 60, "workers": 8} if n > 4 else None
    return write_submission(folder, [ckpt], tta="none", stac=stac)


def run_main(python: str, folder: Path, root: Path) -> tuple[float, str]:
    shutil.rmtree(root / "predictions", ignore_errors=True)
    env = {"PATH": os.environ["PATH"], "CLOUDSEG_ROOT": str(root), "HOME": str(root)}
    out = subprocess.run([python, "main.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"main.py failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    cps = float(re.findall(r"throughput chips_per_s=([0-9.]+)", out.stdout)[-1])
    stac = next((ln for ln in out.stdout.splitlines() if ln.startswith("stac fetched=")), "")
    return 1.0 / cps, stac


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-chips", type=int, default=48)
    p.add_argument("--workers", type=int, default=8, help="add-bands chips fetched at once")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--runtime", action="store_true", help="run main.py with .venv-runtime/bin/python")
    g.add_argument("--python", help="interpreter for main.py (default: this one)")
    args = p.parse_args(argv)

    from cloudseg.data.io import features_dir, metadata_path
    from cloudseg.data.stac import add_bands
    from cloudseg.paths import RUNTIME_PYTHON
    from stac_local import build_catalog, spread_chips, start_file_server, start_stac_server, write_chips

    python = str(RUNTIME_PYTHON) if args.runtime else (args.python or sys.executable)
    work = Path(tempfile.mkdtemp(prefix="cloudseg-bench-stac-"))
    servers = []
    try:
        data = write_chips(work / "data", args.n_chips, split="test")
        spread_chips(data, "test")
        catalog = work / "catalog"
        (catalog / "assets").mkdir(parents=True)
        servers.append(start_file_server(catalog / "assets"))
        build_catalog(data, ("test",), catalog, servers[0].url, bands=("B11",), decoys=True)
        servers.append(start_stac_server(catalog))
        url = servers[1].url

        # 1. add-bands on a copy (main.py below must find no B11 on disk)
        added = shutil.copytree(data, work / "added")
        res = add_bands(added, "B11", "test", url, workers=args.workers, progress=False)
        if res.failed:
            raise SystemExit(f"add-bands failed for {len(res.failed)} chips: {sorted(res.failed.items())[:3]}")
        add_s = res.seconds_per_chip

        # 2. main.py, 4-band vs 5-band (fetching B11)
        root = work / "codeexecution"
        shutil.copytree(features_dir(data, "test"), root / "data" / "test_features")
        shutil.copyfile(metadata_path(data, "test"), root / "data" / "test_metadata.csv")
        four = make_submission(work / "sub4", ("B02", "B03", "B04", "B08"), url)
        five = make_submission(work / "sub5", ("B02", "B03", "B04", "B08", "B11"), url)
        run_main(python, four, root)  # warm-up: page cache, first-import costs
        s4, _ = run_main(python, four, root)
        s5, stac_line = run_main(python, five, root)
        if f"stac fetched={args.n_chips} fallback=0" not in stac_line:
            raise SystemExit(f"main.py did not fetch every chip's B11: {stac_line!r}")
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)

    extra = s5 - s4
    print(f"{'step':<44} {'s/chip':>8}")
    print(f"{'add-bands B11 (' + str(args.workers) + ' workers, local server)':<44} {add_s:>8.4f}")
    print(f"{'  projected for ' + format(TRAIN_CHIPS, ',') + ' training chips':<44} {add_s * TRAIN_CHIPS / 60:>7.1f}m")
    print(f"{'main.py, 4-band model':<44} {s4:>8.4f}")
    print(f"{'main.py, 5-band model fetching B11':<44} {s5:>8.4f}")
    print(f"interpreter: {python}; chips: {args.n_chips}")
    print(f"add_band_s_per_chip={add_s:.4f} main_extra_s_per_chip={extra:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
