"""Does pruning pay? The same Optuna study with and without its pruner, over several sampler seeds.

    python experiments/bench_sweep.py [--config experiments/configs/bench-sweep.yaml] [--space FILE]
        [--seeds 0,1,2] [--n-trials 8] [--chips 24] [--jobs 2] [--budget 1200] [--set key=value]...

For each seed the study runs twice from the same TPE seed: once with the config's pruner, once with
``pruner=none``. Each arm is a process with one torch thread; ``--jobs`` of them run at once, the unpruned (longest)
arms first. Each arm is a real study with ``experiments/sweep.py``'s objective (every trial a nested MLflow run in
experiment ``bench-sweep``; its Optuna storage under ``.cache/bench_sweep/``). The search space is the shipped one
beside the config (``space.yaml`` unless ``<config>-space.yaml`` exists).

An epoch is one ``val_jaccard`` report to the pruner (the config validates every epoch), so a trial pruned after
its second epoch counts 2. ``best``
is the study's best ``best_val_jaccard`` (complete trials only). Last line, each the mean over the seeds:
``epochs_saved=<1 - epochs(pruned) / epochs(unpruned)> best_delta=<best(pruned) - best(unpruned)>``.

Noise, from the seeds themselves: the standard deviation of the unpruned arm's best over the seeds (how much the
best moves with nothing but the sampler seed changed), and the standard error of the mean ``best_delta``.
``--budget`` caps the whole benchmark: no trial starts after it, and an arm cut short is flagged in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudseg.paths import CONFIGS_DIR, REPO_ROOT  # noqa: E402

CACHE = REPO_ROOT / ".cache" / "bench_sweep"
EXPERIMENT = "bench-sweep"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIGS_DIR / "bench-sweep.yaml", help="base training config")
    p.add_argument("--space", type=Path, default=None, help="search space (default: the one beside the config)")
    p.add_argument("--seeds", default="0,1,2", help="sampler (and training) seeds, comma-separated")
    p.add_argument("--n-trials", type=int, default=8, help="trials per study")
    p.add_argument("--chips", type=int, default=24,
                   help="synthetic chips the studies train and validate on (0 = the config's data as it is)")
    p.add_argument("--jobs", type=int, default=2, help="arms (one torch thread each) running at once")
    p.add_argument("--budget", type=float, default=1200.0, help="seconds; no trial starts after this")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one arm (JSON spec)
    return p.parse_args(argv)


def bench_data(chips: int) -> Path:
    """A small synthetic dataset for the benchmark's studies: locations of 6 chips, so a 4-fold split validates on
    6 full chips (generated once, then reused)."""
    from cloudseg.data.synthetic import is_complete, write_synthetic

    path = CACHE / f"synthetic-{chips}"
    if not is_complete(path):
        write_synthetic(path, chips, seed=0, n_test=2, n_locations=max(2, chips // 6), overwrite=True)
    return path


def run_arm(spec: dict) -> dict:
    """One study (one seed, one arm) in this process; returns what the table needs."""
    import optuna
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking
    from cloudseg.config import load_config
    from cloudseg.data.sources import load_split
    from cloudseg.tracking.runs import start_run
    from cloudseg.tracking.study import load_space, make_storage, open_study, space_beside, trial_objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    sets = [*spec["sets"], f"seed={spec['seed']}", f"pruner={spec['pruner']}", "num_threads=1",
            f"experiment={EXPERIMENT}"]
    cfg = load_config(spec["config"], sets, data=spec.get("data"))
    space = load_space(spec["space"] or space_beside(spec["config"]))
    CACHE.mkdir(parents=True, exist_ok=True)
    name = spec["study"]
    storage = make_storage(f"sqlite:///{CACHE / (name + '.db')}")
    study = open_study(name, storage, space, cfg, seed=spec["seed"])
    tracking.setup(EXPERIMENT)
    root, split = load_split(cfg)
    parent = start_run(cfg, "sweep", {"cloudseg.study": name, "cloudseg.bench": "sweep",
                                      "cloudseg.arm": spec["pruner"]}, run_name=name)
    objective = trial_objective(study, cfg, space, root, split, parent, name)
    with tracking.run_status(parent):
        while len(study.trials) < spec["n_trials"] and time.time() < spec["deadline"]:
            study.optimize(objective, n_trials=1, catch=(Exception,))
        result = summarize_study(study, spec)
        client = MlflowClient()
        for key in ("epochs", "best", "trials", "pruned", "failed"):
            if result[key] is not None:
                client.log_metric(parent, key, float(result[key]))
    result["wall_s"] = time.time() - t0
    result["parent_run"] = parent
    return result


def summarize_study(study, spec: dict) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return {
        "seed": spec["seed"], "pruner": spec["pruner"], "study": spec["study"],
        "trials": len(done),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "epochs": sum(len(t.intermediate_values) for t in done),
        "best": max((t.value for t in complete), default=None),
        "cut_short": len(done) < spec["n_trials"],
        "errors": sorted({t.user_attrs["error"] for t in trials if "error" in t.user_attrs}),
    }


def collect(rc: int, spec: dict) -> dict:
    """An arm's result, or a clear exit when it failed or completed no trial."""
    out, log = Path(spec["out"]), CACHE / f"{spec['study']}.log"
    if rc != 0 or not out.is_file():
        raise SystemExit(f"bench_sweep: study {spec['study']} failed (exit {rc}); see {log}")
    r = json.loads(out.read_text())
    for err in r["errors"]:
        print(f"seed {r['seed']} {r['pruner']}: a trial failed: {err}", flush=True)
    if r["best"] is None:
        raise SystemExit(f"bench_sweep: study {spec['study']} has no complete trial; see {log}")
    return r


def aggregate(results: list[dict], pruner: str) -> dict:
    """Per-seed and mean ``epochs_saved`` / ``best_delta`` from the arms' results, with the seeds' noise."""
    import numpy as np

    by = {(r["seed"], r["pruner"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    saved, delta, base = [], [], []
    for s in seeds:
        p, u = by.get((s, pruner)), by.get((s, "none"))
        if not p or not u or not u["epochs"]:
            continue
        saved.append(1.0 - p["epochs"] / u["epochs"])
        if p["best"] is not None and u["best"] is not None:
            delta.append(p["best"] - u["best"])
        if u["best"] is not None:
            base.append(u["best"])
    nan = float("nan")
    return {
        "seeds": seeds,
        "epochs_saved_per_seed": saved, "best_delta_per_seed": delta,
        "epochs_saved": float(np.mean(saved)) if saved else nan,
        "best_delta": float(np.mean(delta)) if delta else nan,
        "best_delta_sem": float(np.std(delta, ddof=1) / np.sqrt(len(delta))) if len(delta) > 1 else nan,
        "unpruned_best_sd": float(np.std(base, ddof=1)) if len(base) > 1 else nan,
    }


def print_table(results: list[dict], agg: dict) -> None:
    print()
    print(f"{'seed':>4} {'arm':<10} {'trials':>6} {'pruned':>6} {'failed':>6} {'epochs':>6} {'best':>8} "
          f"{'wall_s':>7}  study")
    for r in sorted(results, key=lambda r: (r["seed"], r["pruner"] == "none")):
        best = f"{r['best']:.4f}" if r["best"] is not None else "nan"
        flag = "  (cut short by --budget)" if r["cut_short"] else ""
        print(f"{r['seed']:>4} {r['pruner']:<10} {r['trials']:>6} {r['pruned']:>6} {r['failed']:>6} "
              f"{r['epochs']:>6} {best:>8} {r['wall_s']:>7.0f}  {r['study']}{flag}")
    print("per seed: epochs_saved " + ", ".join(f"{v:.3f}" for v in agg["epochs_saved_per_seed"])
          + "; best_delta " + ", ".join(f"{v:+.4f}" for v in agg["best_delta_per_seed"]))
    sem, sd = agg["best_delta_sem"], agg["unpruned_best_sd"]
    print(f"noise: unpruned best varies by sd {sd:.4f} over the seeds; mean best_delta {agg['best_delta']:+.4f} "
          f"has standard error {sem:.4f}")
    if sem == sem and sd == sd:
        within = abs(agg["best_delta"]) <= max(2 * sem, sd)
        print(f"best_delta within noise (|delta| <= max(2 x standard error, seed sd)): {'yes' if within else 'no'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        result = run_arm(spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return 0

    from cloudseg.config import load_config

    t0 = time.time()
    cfg = load_config(args.config, args.sets)  # fails early on a bad key
    if cfg.pruner == "none":
        raise SystemExit("bench_sweep: the config's pruner is 'none'; nothing to compare (--set pruner=median)")
    data = str(bench_data(args.chips)) if args.chips else None
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    stamp = time.strftime("%m%d-%H%M%S")
    deadline = t0 + args.budget
    print(f"bench_sweep: {len(seeds)} seeds x 2 arms ({cfg.pruner} | none), {args.n_trials} trials each, "
          f"config {args.config.name}, data {data or cfg.data}, budget {args.budget:.0f}s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    # every arm is its own process and study; --jobs of them run at once, the unpruned (longest) arms first
    queue = []
    for pruner in ("none", cfg.pruner):
        for seed in seeds:
            study = f"bench-sweep-{stamp}-s{seed}-{pruner}"
            queue.append({"config": str(args.config), "space": str(args.space) if args.space else None,
                          "sets": args.sets, "data": data, "seed": seed, "pruner": pruner, "study": study,
                          "n_trials": args.n_trials, "deadline": deadline, "out": str(CACHE / f"{study}.json")})
    results, running = [], []
    while queue or running:
        while queue and len(running) < args.jobs:
            spec = queue.pop(0)
            log = open(CACHE / f"{spec['study']}.log", "w")
            proc = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(spec)], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running.append((proc, spec, log))
        time.sleep(1)
        for item in [x for x in running if x[0].poll() is not None]:
            running.remove(item)
            proc, spec, log = item
            log.close()
            results.append(collect(proc.returncode, spec))
            r = results[-1]
            print(f"seed {r['seed']} {r['pruner']}: {r['trials']} trials, {r['pruned']} pruned, {r['epochs']} "
                  f"epochs, best {r['best']}, {r['wall_s']:.0f}s (elapsed {time.time() - t0:.0f}s)", flush=True)
    agg = aggregate(results, cfg.pruner)
    print_table(results, agg)
    print(f"wall time {time.time() - t0:.0f}s; MLflow experiment {EXPERIMENT}; Optuna storages in {CACHE}")
    print(f"epochs_saved={agg['epochs_saved']:.4f} best_delta={agg['best_delta']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
