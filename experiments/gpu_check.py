"""``make gpu-check``: every CUDA path cloudseg has, run for real on this machine's GPUs (sized for ~5 minutes).

    python experiments/gpu_check.py [--keep] [--rehearse-on-cpu]

Steps, in order; the first that fails ends the check:

1. ``probe``: one tiny kernel on every visible GPU (``cloudseg.devices``): its name, compute capability, the torch
   build. A GPU this build has no kernels for fails here, with what to install.
2. ``train-fp32``, ``train-fp16``, ``train-bf16``: gpu.yaml's recipe (Unet efficientnet-b1, full 512 chips, loader
   workers, cuDNN autotuning), 2 short epochs through ``experiments/train.py``, in each precision the GPU
   computes: fp32 always, fp16 with loss scaling from sm_60, bf16 from sm_80.
3. ``torchrun``: the same recipe over every visible GPU (NCCL) in the precision ``auto`` picks; with one GPU,
   one rank (NCCL between GPUs needs two).
4. ``promote``: the fp32 run, promoted as ``experiments/promote.py`` does, into a submission folder.
5. ``main-fp32``, ``main-amp``: that submission's main.py on held-out chips, on the GPU, in fp32 then with AMP
   (inference.json ``"amp": true``); both scored, and their masks must agree.
6. ``predict``: ``cloudseg predict`` on a whole 4,096 x 4,096 scene with ``--device cuda``.

Then a table (chips/s in training and inference, peak GPU memory) and the last line ``gpu_check=ok <figures>``
or ``gpu_check=fail <step>: <reason>``. Without a GPU it says so and exits 0 (``gpu_check=skip ...``).

Everything it writes (synthetic chips, MLflow runs, the submission, predictions) goes to one temporary folder,
removed at the end unless ``--keep``: the user's MLflow store, ``submissions/`` and ``data/`` are never touched.
``--rehearse-on-cpu`` runs the same steps on the CPU, shrunk (tests/test_gpu_check.py), so the script itself is
known to work on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


class CheckFailed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason


@dataclass
class Plan:
    """What the check runs: the real sizes on a GPU, shrunk ones for a CPU rehearsal."""

    device: str  # cuda | cpu
    precisions: list[str]
    ranks: int
    batch_per_rank: int = 8  # torchrun's global batch is this times the ranks
    train_chips: int = 64
    locations: int = 6  # synthetic locations: enough for gpu.yaml's folds
    test_chips: int = 16
    sets: list[str] = field(default_factory=list)  # on top of gpu.yaml
    scene: int = 4096
    step_timeout_s: int = 240  # a step that hangs (a rank waiting in a collective, a stuck driver) fails, named


def gpu_plan() -> Plan | str:
    """The plan for this machine's GPUs, or why there is nothing to check."""
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA GPU visible (torch {torch.__version__}, "
                f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    from cloudseg.devices import capability

    cap = capability(0)
    precisions = ["fp32"] + (["fp16"] if cap >= (6, 0) else []) + (["bf16"] if cap >= (8, 0) else [])
    # batch 8 (gpu.yaml trains 24): efficientnet-b1 on 512 chips then fits the smallest GPU worth training on (16 GB)
    sets = ["epochs=2", "steps_per_epoch=10", "batch_size=8", "val_batch_size=4", "num_workers=4",
            "early_stopping=0"]
    return Plan("cuda", precisions, torch.cuda.device_count(), sets=sets)


def cpu_plan() -> Plan:
    """The same steps on the CPU, shrunk to seconds each (a light encoder; fp32 and one autocast precision, fp16's
    loss scaling being rehearsed in tests/test_devices.py): rehearses the script where there is no GPU."""
    sets = ["epochs=1", "steps_per_epoch=2", "batch_size=4", "crop_size=64", "val_batch_size=2", "num_workers=2",
            "num_threads=1", "encoder=resnet18", "plot_chips=1"]
    return Plan("cpu", ["fp32", "bf16"], 2, batch_per_rank=2, train_chips=12, locations=4, test_chips=4,
                sets=sets, scene=1024, step_timeout_s=900)


class Check:
    def __init__(self, plan: Plan, work: Path):
        self.plan, self.work = plan, work
        self.rows: list[tuple[str, str, str, str]] = []  # step, chips/s (or Mpix/s), peak GPU GB, note
        self.figures: dict[str, str] = {}
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                    "CLOUDSEG_MLARTIFACTS": str(work / "mlartifacts"), "CLOUDSEG_STATE_ROOT": str(work / "state"),
                    "TQDM_DISABLE": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        if plan.device == "cpu":
            self.env["OMP_NUM_THREADS"] = "1"
        self.data = work / "data"
        self.runs: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers
    def sh(self, step: str, cmd: list[str], env: dict | None = None) -> str:
        """Run ``cmd``; its output, or CheckFailed naming the step and the output's last lines."""
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=self.plan.step_timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks on SIGTERM; a plain process just ends
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise CheckFailed(step, f"no result after {self.plan.step_timeout_s} s: "
                                    f"{' '.join(map(str, cmd))}") from None
        if proc.returncode != 0:
            tail = " | ".join(line.strip() for line in out.strip().splitlines()[-6:])
            raise CheckFailed(step, f"exit code {proc.returncode}: {tail}")
        return out

    def row(self, step: str, rate: str, mem: str = "-", note: str = "") -> None:
        self.rows.append((step, rate, mem, note))
        print(f"[gpu-check] {step:11s} {rate:>12s} {mem:>9s}  {note}", flush=True)

    def train_args(self, precision: str) -> list[str]:
        sets = [*self.plan.sets, f"device={self.plan.device}", f"precision={precision}", "experiment=gpu-check",
                "n_folds=4"]
        return ["--config", REPO / "experiments" / "configs" / "gpu.yaml", "--data", self.data,
                *[x for s in sets for x in ("--set", s)]]

    @staticmethod
    def last_epoch(step: str, out: str) -> tuple[float, str]:
        """chips/s and peak GPU memory of the last epoch line experiments/train.py printed."""
        lines = re.findall(r"^epoch \d+/\d+ .*$", out, flags=re.M)
        if not lines or "run_id=" not in out:
            raise CheckFailed(step, "experiments/train.py printed no epoch line or no run_id")
        rate = float(re.search(r"chips/s=([\d.]+)", lines[-1]).group(1))
        mem = re.search(r"gpu_peak_gb=([\d.]+)", lines[-1])
        return rate, mem.group(1) if mem else "-"

    # ------------------------------------------------------------------ steps
    def probe(self) -> None:
        import torch

        from cloudseg.devices import DeviceError, describe_build, describe_gpu, resolve_device

        if self.plan.device == "cpu":
            self.row("probe", "-", note="rehearsal on the CPU: no kernel probe")
            return
        for i in range(torch.cuda.device_count()):
            try:
                resolve_device("cuda", i)
            except DeviceError as exc:
                raise CheckFailed("probe", str(exc)) from None
            self.row("probe", "-", note=f"GPU {i}: {describe_gpu(i)}")
        self.figures["sm"] = "".join(map(str, torch.cuda.get_device_capability(0)))
        print(f"[gpu-check] {describe_build()}", flush=True)

    def synth(self) -> None:
        self.sh("data", [PY, "-m", "cloudseg.cli", "synth", "--out", self.data, "--n", self.plan.train_chips,
                         "--seed", "0", "--test", self.plan.test_chips, "--locations", self.plan.locations])

    def train(self, precision: str) -> None:
        step = f"train-{precision}"
        out = self.sh(step, [PY, REPO / "experiments" / "train.py", *self.train_args(precision)])
        rate, mem = self.last_epoch(step, out)
        self.runs[precision] = re.findall(r"^run_id=(\w+)$", out, flags=re.M)[-1]
        self.figures[f"train_{precision}_chips_s"] = f"{rate:.3g}"
        self.row(step, f"{rate:.3g} chips/s", mem, f"run {self.runs[precision]}")
        self.peak(mem)

    def torchrun(self) -> None:
        n = self.plan.ranks
        out = self.sh("torchrun", [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                                   REPO / "experiments" / "train.py", *self.train_args("auto"),
                                   "--set", f"batch_size={self.plan.batch_per_rank * n}"])
        rate, mem = self.last_epoch("torchrun", out)
        if out.count("run_id=") != 1:
            raise CheckFailed("torchrun", f"{out.count('run_id=')} ranks reported a run (rank 0 alone should)")
        self.figures["torchrun_ranks"] = str(n)
        note = f"{n} ranks" if n > 1 else "1 GPU: one rank (NCCL between GPUs needs 2+)"
        self.figures["torchrun_chips_s"] = f"{rate:.3g}"
        self.row("torchrun", f"{rate:.3g} chips/s", mem, note)
        self.peak(mem)

    def promote(self) -> Path:
        """The fp32 run as experiments/promote.py promotes it, written here instead of submissions/."""
        out = self.sh("promote", [PY, Path(__file__).resolve(), "--promote-into", self.work / "submissions",
                                  self.runs["fp32"]])
        folder = self.work / "submissions" / "gpu-check"
        if not (folder / "main.py").is_file():
            raise CheckFailed("promote", f"no main.py in {folder}: {out.strip()[-300:]}")
        self.row("promote", "-", note=str(folder))
        return folder

    def main_py(self, folder: Path, amp: bool) -> dict:
        step = "main-amp" if amp else "main-fp32"
        sub = self.work / step / "code"
        shutil.copytree(folder, sub)
        settings = json.loads((sub / "assets" / "inference.json").read_text())
        settings["amp"] = amp
        (sub / "assets" / "inference.json").write_text(json.dumps(settings))
        root = self.work / step
        (root / "data").mkdir(parents=True)
        (root / "data" / "test_features").symlink_to(self.data / "test_features")
        env = {**self.env, "CLOUDSEG_ROOT": str(root), "CLOUDSEG_DEVICE": self.plan.device}
        out = self.sh(step, [PY, sub / "main.py"], env=env)
        rate = re.search(r"throughput chips_per_s=([\d.]+)", out)
        used = re.search(r"device=(\S+) amp=(\w+)", out)
        if rate is None or used is None:
            raise CheckFailed(step, "main.py printed no throughput or device line")
        if self.plan.device == "cuda" and (not used.group(1).startswith("cuda") or used.group(2) != str(amp)):
            raise CheckFailed(step, f"main.py ran on {used.group(1)} with amp={used.group(2)}, not cuda/{amp}")
        score = self.sh(step, [PY, "-m", "cloudseg.cli", "score", root / "predictions", self.data / "test_labels"])
        jaccard = re.findall(r"^jaccard=([\d.]+)$", score, flags=re.M)[-1]
        self.figures[f"{step.replace('-', '_')}_chips_s"] = f"{float(rate.group(1)):.3g}"
        self.row(step, f"{float(rate.group(1)):.3g} chips/s", "-", f"jaccard={float(jaccard):.4f}")
        return {"dir": root / "predictions", "jaccard": float(jaccard)}

    def agree(self, fp32: dict, amp: dict) -> None:
        from cloudseg.data.io import read_label

        same = total = 0
        for path in sorted(fp32["dir"].glob("*.tif")):
            a, b = read_label(path), read_label(amp["dir"] / path.name)
            same, total = same + int((a == b).sum()), total + a.size
        if not total or same / total < 0.99:
            raise CheckFailed("main-amp", f"AMP masks agree with fp32 on {same / max(total, 1):.2%} of pixels "
                                          "(< 99%)")

    def predict(self, folder: Path) -> None:
        import numpy as np

        from cloudseg.data.io import BANDS, read_chip, write_tif

        n = self.plan.scene
        chips = sorted(p for p in (self.data / "test_features").iterdir() if p.is_dir())
        tiles = [read_chip(c) for c in chips]
        per_side = n // 512
        scene = np.zeros((len(BANDS), n, n), dtype=np.uint16)
        for k in range(per_side * per_side):
            r, c = divmod(k, per_side)
            scene[:, r * 512:(r + 1) * 512, c * 512:(c + 1) * 512] = tiles[k % len(tiles)]
        for b, band in enumerate(BANDS):
            write_tif(self.work / "scene" / f"{band}.tif", scene[b])
        out = self.sh("predict", [PY, "-m", "cloudseg.cli", "predict", self.work / "scene", "--model", folder,
                                  "--out", self.work / "scene.tif", "--device", self.plan.device])
        rate = re.search(r"pixels_per_s=([\d.]+)", out)
        if rate is None or not (self.work / "scene.tif").is_file():
            raise CheckFailed("predict", "cloudseg predict wrote no scene mask or no throughput line")
        mpix = float(rate.group(1)) / 1e6
        self.figures["predict_mpix_s"] = f"{mpix:.3g}"
        self.row("predict", f"{mpix:.3g} Mpix/s", "-", f"{n} x {n} scene")

    def peak(self, mem: str) -> None:
        if mem != "-":
            self.figures["peak_gpu_gb"] = f"{max(float(mem), float(self.figures.get('peak_gpu_gb', 0))):.2f}"

    def run(self) -> None:
        t0 = time.time()
        self.probe()
        self.synth()
        for precision in self.plan.precisions:
            self.train(precision)
        self.torchrun()
        folder = self.promote()
        fp32 = self.main_py(folder, amp=False)
        amp = self.main_py(folder, amp=True)
        self.agree(fp32, amp)
        self.predict(folder)
        self.figures["wall_s"] = f"{time.time() - t0:.0f}"


def promote_into(out_root: Path, run_id: str) -> int:
    """``--promote-into DIR RUN_ID``: promote one run as experiments/promote.py does, into DIR/gpu-check/."""
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking
    from cloudseg.tracking import promote as pm

    tracking.connect()
    args = pm.parse_args(["--run-id", run_id, "--name", "gpu-check", "--no-register"])
    client = MlflowClient()
    chosen = pm.select_runs(client, args)
    with tracking.scratch_dir() as tmp:
        members = pm.fetch_members(client, chosen, Path(tmp))
        described = pm.check_runtime_models(members)
        folder, _ = pm.write_submission(args.name, members, described, args, out_root=out_root)
    print(f"folder={folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--rehearse-on-cpu", action="store_true", help="run the steps on the CPU, shrunk")
    p.add_argument("--promote-into", nargs=2, metavar=("DIR", "RUN_ID"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.promote_into:
        return promote_into(Path(args.promote_into[0]), args.promote_into[1])
    plan = cpu_plan() if args.rehearse_on_cpu else gpu_plan()
    if isinstance(plan, str):
        print(f"[gpu-check] {plan}: nothing to check here. Run `make gpu-check` on a machine with a GPU.")
        print("gpu_check=skip no GPU")
        return 0
    work = Path(tempfile.mkdtemp(prefix="cloudseg-gpu-check-"))
    print(f"[gpu-check] {plan.device}, precisions {', '.join(plan.precisions)}, {plan.ranks} rank(s); "
          f"throw-away folder {work} (MLflow store, chips, submission)", flush=True)
    print(f"[gpu-check] {'step':11s} {'rate':>12s} {'peak GB':>9s}  note", flush=True)
    check = Check(plan, work)
    try:
        check.run()
    except CheckFailed as exc:
        print(f"gpu_check=fail {exc.step}: {exc.reason}")
        return 1
    finally:
        if args.keep:
            print(f"[gpu-check] kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("gpu_check=ok " + " ".join(f"{k}={v}" for k, v in check.figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
