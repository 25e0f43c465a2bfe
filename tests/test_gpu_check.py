"""``make gpu-check`` (experiments/gpu_check.py): it says so where there is no GPU, and its steps work end to end,
rehearsed on the CPU, without touching the user's stores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloudseg.paths import REPO_ROOT

SCRIPT = str(REPO_ROOT / "experiments" / "gpu_check.py")
STEPS = ["probe", "train-fp32", "train-bf16", "torchrun", "promote", "main-fp32", "main-amp", "predict"]


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, SCRIPT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: gpu_check would run the real check")
def test_without_a_gpu_it_says_so_and_exits_0():
    res = _run()
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert "no CUDA GPU visible" in res.stdout and lines[-1] == "gpu_check=skip no GPU"


@pytest.mark.slow
@pytest.mark.ddp
def test_every_step_runs_rehearsed_on_the_cpu_in_a_throwaway_folder(tmp_path):
    stores = [REPO_ROOT / "mlflow.db", REPO_ROOT / "submissions" / "gpu-check"]
    before = {p: p.stat().st_mtime_ns if p.exists() else None for p in stores}
    res = _run("--rehearse-on-cpu")
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-3000:]
    last = out.strip().splitlines()[-1]
    figures = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert last.startswith("gpu_check=ok ")
    assert {"train_fp32_chips_s", "train_bf16_chips_s", "torchrun_chips_s", "main_fp32_chips_s", "main_amp_chips_s",
            "predict_mpix_s"} <= set(figures) and figures["torchrun_ranks"] == "2"
    assert all(float(figures[k]) > 0 for k in figures if k.endswith(("_chips_s", "_mpix_s")))
    ran = re.findall(r"^\[gpu-check\] (\S+) ", out, flags=re.M)
    assert [s for s in ran if s in STEPS] == STEPS  # each step, in the documented order
    assert all(float(j) > 0 for j in re.findall(r"jaccard=([\d.]+)", out))  # main.py's masks were scored
    work = Path(re.search(r"throw-away folder (\S+)", out).group(1))
    assert not work.exists(), "the temporary folder was left behind"
    assert {p: p.stat().st_mtime_ns if p.exists() else None for p in stores} == before  # user's stores untouched
