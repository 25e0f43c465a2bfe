"""Quality on real chips: cloudseg's real-data recipe against a synthetic-only model, the peer ukis-csmask and
two baselines, with pooled leave-one-location-out Jaccard over the real sample.

    python experiments/bench_quality.py [--data DIR] [--config YAML] [--quick] [--set key=value]...

Prints a table (Jaccard on all chips, on clean chips, and per held-out location), the number of recipes tried in
development, a location-bootstrap 95% interval of cloudseg minus the peer, and last the line of INTERFACES.md:
``cloudseg_all=<j> cloudseg_clean=<j> ukis_all=<j> ukis_clean=<j> synthetic_only_all=<j> synthetic_only_clean=<j>``.

Nothing tuned sees the held-out location's labels: the recipe keeps its last epoch at a fixed threshold, the
brightness threshold is fitted on the training locations of each fold, and the synthetic-only model never sees a
real label (it trains the recipe's settings on the synthetic default, or ``real-scratch.yaml``'s when the recipe
starts from ukis-csmask's weights; ``--synthetic-config`` picks others). The peer's figure is its best setting over
the whole sample (generous to the peer); the setting chosen on each fold's training locations is shown beside it.
Each model's training is an MLflow run in experiment ``bench-quality`` (children of one ``bench`` parent run that
also holds the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudseg.config import Config, apply_overrides, load_config  # noqa: E402
from cloudseg.paths import REPO_ROOT  # noqa: E402

EXPERIMENT = "bench-quality"
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "configs" / "real-best.yaml"
FALLBACK_CONFIG = REPO_ROOT / "experiments" / "configs" / "real-sample.yaml"
# the synthetic-only model's settings when the recipe starts from outside weights: the recipe without them
SYNTHETIC_CONFIG = REPO_ROOT / "experiments" / "configs" / "real-scratch.yaml"
DEV_EXPERIMENTS = ("real-sample", "real-best", EXPERIMENT)


@dataclass
class Counts:
    """Per-chip intersection and union of one method's out-of-fold masks."""

    name: str
    inter: dict[str, int] = field(default_factory=dict)
    union: dict[str, int] = field(default_factory=dict)

    def add(self, chip_id: str, inter: int, union: int) -> None:
        self.inter[chip_id], self.union[chip_id] = int(inter), int(union)

    def add_mask(self, chip_id: str, pred: np.ndarray, label: np.ndarray) -> None:
        p, t = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
        self.add(chip_id, int((p & t).sum()), int((p | t).sum()))

    def score(self, ids=None) -> float:
        """Pooled Jaccard (sum of intersections / sum of unions) over ``ids``; nan where the union is 0."""
        ids = list(self.inter) if ids is None else [c for c in ids if c in self.inter]
        u = sum(self.union[c] for c in ids)
        return sum(self.inter[c] for c in ids) / u if u else float("nan")


def pooled_from_counts(inter: np.ndarray, union: np.ndarray) -> float:
    u = float(np.sum(union))
    return float(np.sum(inter)) / u if u else float("nan")


def location_bootstrap(a: Counts, b: Counts, locations: dict[str, str], ids: list[str], n: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """Pooled Jaccard of ``a`` minus ``b`` over ``ids`` and a 95% interval from resampling locations.

    Each replicate draws as many locations as there are, with replacement, and pools every chip of each drawn
    location (a location drawn twice counts twice). Returns (difference, low, high).
    """
    locs = sorted({locations[c] for c in ids})
    per = {loc: [c for c in ids if locations[c] == loc] for loc in locs}
    ia = np.array([sum(a.inter[c] for c in per[loc]) for loc in locs], dtype=float)
    ua = np.array([sum(a.union[c] for c in per[loc]) for loc in locs], dtype=float)
    ib = np.array([sum(b.inter[c] for c in per[loc]) for loc in locs], dtype=float)
    ub = np.array([sum(b.union[c] for c in per[loc]) for loc in locs], dtype=float)
    diff = pooled_from_counts(ia, ua) - pooled_from_counts(ib, ub)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(locs), size=(n, len(locs)))
    ja = ia[draws].sum(1) / np.maximum(ua[draws].sum(1), 1)
    jb = ib[draws].sum(1) / np.maximum(ub[draws].sum(1), 1)
    lo, hi = np.percentile(ja - jb, [2.5, 97.5])
    return float(diff), float(lo), float(hi)


def recipes_tried(experiments=DEV_EXPERIMENTS) -> int:
    """Distinct recipes (configs minus data/fold/naming keys) among cv and bench-recipe runs in the dev experiments."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # the store tracking.setup() pointed MLflow at
    ignore = {"experiment", "run_name", "fold", "cv", "data", "plot_chips", "num_threads", "num_workers", "device"}
    seen = set()
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            continue
        for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000):
            if r.data.tags.get("cloudseg.kind") not in ("cv", "bench-recipe"):
                continue
            seen.add(json.dumps({k: v for k, v in r.data.params.items() if k not in ignore}, sort_keys=True))
    return len(seen)


def train_model(cfg: Config, split, train_ids: list[str], val_ids: list[str], kind: str, tags: dict,
                parent: str, init_weights: Path | None = None):
    """Train one model with ``Trainer`` as an MLflow child run, from ``init_weights`` (a checkpoint file) when
    given; returns (run_id, FitResult)."""
    from cloudseg import tracking
    from cloudseg.tracking.runs import start_run, state_root
    from cloudseg.training import Trainer

    run_id = start_run(cfg, kind, {**tags, "cloudseg.bench_parent": parent}, parent)
    print(f"[{kind}] run {run_id}: {len(train_ids)} training / {len(val_ids)} validation chips", flush=True)
    with tracking.run_status(run_id):
        trainer = Trainer(cfg, split, train_ids, val_ids, state_root() / run_id, [tracking.EpochLogger(run_id)],
                          init_weights=init_weights)
        result = trainer.fit()
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for k, v in {"threshold_tuned": result.threshold, "epochs_run": result.epochs_run, "wall_s": result.wall_s,
                     "val_jaccard_at_threshold": result.final_eval.jaccard}.items():
            client.log_metric(run_id, k, float(v))
        client.log_artifact(run_id, str(result.checkpoint), "checkpoint")
    return run_id, result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="real data folder (default: cloudseg.paths.real_data_dir())")
    p.add_argument("--config", type=Path, default=None,
                   help="the recipe (default experiments/configs/real-best.yaml, else real-sample.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (also applied to the synthetic-only model)")
    p.add_argument("--quick", action="store_true",
                   help="explore: 3 location folds, 2 epochs, ukis at 30 m only")
    p.add_argument("--folds", type=int, default=None, help="location folds (0 = leave-one-location-out, default)")
    p.add_argument("--mix-synthetic", type=int, default=None,
                   help="synthetic chips added to each fold's training (default: the recipe's mix_synthetic)")
    p.add_argument("--synthetic", default="synthetic", help="synthetic data folder ('synthetic' = data/synthetic)")
    p.add_argument("--synthetic-config", type=Path, default=None,
                   help="settings of the synthetic-only model (default: the recipe's own, or real-scratch.yaml's "
                        "when the recipe starts from ukis-csmask's weights, whose short gentle fine-tune would "
                        "learn nothing from scratch); --set applies to it too")
    p.add_argument("--ukis", default=None,
                   help="ukis settings, e.g. l2a@30,l1c@30,l2a@10,l1c@10 (default all four; --quick: the 30 m ones)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    p.add_argument("--bootstrap", type=int, default=2000, help="location-bootstrap replicates")
    p.add_argument("--oof-out", type=Path, default=REPO_ROOT / ".cache" / "bench_quality" / "oof_probs.npz",
                   help="where the recipe's out-of-fold probabilities are saved (input of cloudseg audit-labels)")
    p.add_argument("--skip", default="", help="comma list of methods to skip: cloudseg,synthetic,ukis (debugging)")
    return p.parse_args(argv)


def quick_overrides(args: argparse.Namespace) -> dict:
    """``--quick`` trains 2 epochs, unless ``--set epochs=`` says otherwise."""
    return {"epochs": 2} if args.quick and not any(s.startswith("epochs=") for s in args.sets) else {}


def recipe_config(args: argparse.Namespace) -> Config:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else FALLBACK_CONFIG)
    cfg = load_config(path, args.sets)
    over = {"experiment": EXPERIMENT, "num_threads": args.threads, "keep": "last", "tune_threshold": False,
            "plot_chips": 10_000, **quick_overrides(args)}  # plot_chips: every held-out chip's probabilities
    return apply_overrides(cfg, over, "bench_quality")


def synthetic_config(args: argparse.Namespace, cfg: Config) -> Config:
    """The synthetic-only model's settings before the synthetic overrides: ``--synthetic-config``, else
    ``SYNTHETIC_CONFIG`` when the recipe starts from ukis-csmask's weights, else the recipe itself."""
    from cloudseg.pretrained import parse_ukis

    path = args.synthetic_config
    if path is None and parse_ukis(cfg.init_from or "") is not None and SYNTHETIC_CONFIG.is_file():
        path = SYNTHETIC_CONFIG
    if path is None:
        return cfg
    return apply_overrides(load_config(path, args.sets), quick_overrides(args), "bench_quality")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    torch.set_num_threads(args.threads)
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking
    from cloudseg.baselines import UkisPeer, all_cloud, fit_brightness_threshold, ukis_available
    from cloudseg.data.dataset import ChipDataset
    from cloudseg.data.splits import location_folds, read_id_list
    from cloudseg.data.validate import validate_split
    from cloudseg.paths import real_data_dir
    from cloudseg.data.sources import resolve_data, suspect_list
    from cloudseg.tracking.runs import config_path, resolve_init, start_run
    from cloudseg.training import predict_probs

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cfg = recipe_config(args)
    root = Path(args.data).resolve() if args.data else real_data_dir()
    real = validate_split(root, "train", labels=True, load=True)
    meta = real.metadata.reset_index()
    locations = dict(zip(meta["chip_id"], meta["location"].astype(str)))
    sus_path = suspect_list(root)
    suspects = read_id_list(sus_path) if sus_path.is_file() else set()
    clean = [c for c in real.ids if c not in suspects]
    n_folds = args.folds if args.folds is not None else (3 if args.quick else 0)
    folds = location_folds(meta, n_folds, cfg.seed)
    excluded = read_id_list(cfg.exclude_ids) if cfg.exclude_ids else set()
    mix_n = args.mix_synthetic if args.mix_synthetic is not None else cfg.mix_synthetic
    settings = args.ukis or ("l2a@30,l1c@30" if args.quick else "l2a@30,l1c@30,l2a@10,l1c@10")
    settings = [s.strip() for s in settings.split(",") if s.strip()]
    print(f"real sample {root}: {len(real.ids)} chips, {len(clean)} clean, {len(set(locations.values()))} "
          f"locations, {len(folds)} folds; recipe epochs={cfg.epochs} crop={cfg.crop_size} arch={cfg.arch} "
          f"encoder={cfg.encoder} mix_synthetic={mix_n}", flush=True)

    exp_id = tracking.setup(EXPERIMENT)
    tracking.close_stale_runs([exp_id])
    parent = start_run(cfg, "bench", {"cloudseg.data": str(root), "cloudseg.quick": str(args.quick).lower(),
                                      "cloudseg.folds": str(len(folds)), "cloudseg.mix_synthetic": str(mix_n)})
    client = MlflowClient()
    methods: dict[str, Counts] = {}
    run_ids: dict[str, list[str]] = {}
    with tracking.run_status(parent):
        # ---------------------------------------------------------- baselines (cheap, first)
        allc = Counts("all_cloud")
        bright = Counts("brightness")
        thresholds = []
        for train_ids, val_ids in folds:
            fit_ids = [c for c in train_ids if c not in excluded]
            bt = fit_brightness_threshold([real.images[c] for c in fit_ids], [real.masks[c] for c in fit_ids])
            thresholds.append(bt.threshold)
            for c in val_ids:
                allc.add_mask(c, all_cloud(real.images[c]), real.masks[c])
                bright.add_mask(c, bt(real.images[c]), real.masks[c])
        methods["all_cloud"], methods["brightness"] = allc, bright
        print(f"brightness thresholds per fold (fitted on training locations): {thresholds}", flush=True)

        # ---------------------------------------------------------- synthetic-only model
        # the recipe's own pretraining when its init_from names a config (trained here, so the benchmark's time
        # includes it; the folds start from it), else synthetic_config's settings on the synthetic default
        pre_path = config_path(cfg.init_from) if cfg.init_from else None
        # a run id or checkpoint file, resolved once; a config's pretraining is trained below
        syn_ckpt = resolve_init(cfg.init_from) if cfg.init_from and pre_path is None else None
        if "synthetic" not in skip:
            from cloudseg.data.splits import fold_split

            if pre_path is not None:
                pover = {"experiment": EXPERIMENT, "num_threads": args.threads}
                if args.quick:
                    pover["epochs"] = 2
                scfg = apply_overrides(load_config(pre_path), pover, f"pretraining {pre_path.name}")
                syn_root = resolve_data(scfg.data, scfg.synthetic_n)
            else:
                base = synthetic_config(args, cfg)
                syn_root = resolve_data(args.synthetic, base.synthetic_n)
                scfg = apply_overrides(base, {"data": str(syn_root), "n_folds": 4, "fold": 0, "keep": "best",
                                              "mix_synthetic": 0, "init_from": "", "tune_threshold": True,
                                              "plot_chips": 6, "exclude_ids": "", "experiment": EXPERIMENT,
                                              "num_threads": args.threads}, "synthetic")
            syn = validate_split(syn_root, "train", labels=True, load=True)
            s_train, s_val = fold_split(syn.metadata.reset_index(), scfg.n_folds, scfg.fold, scfg.seed)
            rid, res = train_model(scfg, syn, s_train, s_val, "bench-synthetic", {"cloudseg.data": str(syn_root)},
                                   parent)
            run_ids["synthetic_only"] = [rid]
            syn_ckpt = res.checkpoint if pre_path is not None else syn_ckpt
            probs = predict_probs(res.checkpoint, ChipDataset(real), batch_size=cfg.val_batch_size)
            sc = Counts("synthetic_only")
            for c, p in probs.items():  # threshold tuned on synthetic validation chips, never on real labels
                sc.add_mask(c, p >= res.threshold, real.masks[c])
            methods["synthetic_only"] = sc
            print(f"[synthetic] all={sc.score():.4f} clean={sc.score(clean):.4f} "
                  f"elapsed {time.time() - t_start:.0f}s", flush=True)

        # ---------------------------------------------------------- cloudseg recipe, out of fold
        oof: dict[str, np.ndarray] = {}
        if "cloudseg" not in skip:
            rec = Counts("cloudseg")
            split = real
            syn_ids: list[str] = []
            if mix_n:
                from cloudseg.data.mixing import merge_splits

                syn = validate_split(resolve_data(args.synthetic, cfg.synthetic_n), "train", labels=True, load=True)
                split, syn_ids = merge_splits(real, syn, min(mix_n, len(syn.ids)), prefix="syn_", seed=cfg.seed)
            run_ids["cloudseg"] = []
            for k, (train_ids, val_ids) in enumerate(folds):
                fcfg = apply_overrides(cfg, {"fold": k, "n_folds": n_folds, "cv": False}, "bench fold")
                fit_ids = [c for c in train_ids if c not in excluded] + syn_ids
                rid, res = train_model(fcfg, split, fit_ids, val_ids, "bench-recipe",
                                       {"cloudseg.fold": str(k), "cloudseg.data": str(root)}, parent, syn_ckpt)
                run_ids["cloudseg"].append(rid)
                per = res.fixed_eval.per_chip.per_chip()
                for r in per.itertuples():
                    rec.add(r.chip_id, r.intersection, r.union)
                oof.update({c: np.asarray(p, dtype=np.float16) for c, p in res.fixed_eval.probs.items()})
                print(f"[cloudseg] fold {k} ({sorted({locations[c] for c in val_ids})}): "
                      f"J={rec.score(val_ids):.4f} elapsed {time.time() - t_start:.0f}s", flush=True)
            methods["cloudseg"] = rec
            if args.oof_out:
                args.oof_out.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(args.oof_out, **oof)
                print(f"out-of-fold probabilities: {args.oof_out}", flush=True)

        # ---------------------------------------------------------- peer: ukis-csmask
        ukis_counts: dict[str, Counts] = {}
        if "ukis" not in skip:
            if not ukis_available():
                print("ukis-csmask is not installed (pip install 'ukis-csmask[cpu]'): peer skipped", flush=True)
            for s in settings if ukis_available() else []:
                level, res_m = s.split("@")
                peer = UkisPeer(level, int(res_m), threads=args.threads)
                uc = Counts(peer.name)
                t0 = time.time()
                for c in real.ids:
                    uc.add_mask(c, peer(real.images[c]), real.masks[c])
                ukis_counts[peer.name] = uc
                methods[peer.name] = uc
                print(f"[ukis] {peer.name}: all={uc.score():.4f} clean={uc.score(clean):.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        best_ukis = None
        if ukis_counts:
            best_ukis = max(ukis_counts.values(), key=lambda u: u.score())
            nested = Counts("ukis_nested")  # setting chosen on each fold's training locations
            for train_ids, val_ids in folds:
                pick = max(ukis_counts.values(), key=lambda u: u.score(train_ids))
                for c in val_ids:
                    nested.add(c, pick.inter[c], pick.union[c])
            methods["ukis_nested"] = nested
            methods["ukis"] = Counts("ukis", best_ukis.inter, best_ukis.union)

        # ---------------------------------------------------------- table
        locs = sorted(set(locations.values()))
        rows = []
        for name, m in methods.items():
            row = {"method": name, "all": m.score(real.ids), "clean": m.score(clean)}
            for loc in locs:
                row[loc] = m.score([c for c in real.ids if locations[c] == loc])
            rows.append(row)
        table = pd.DataFrame(rows).set_index("method")
        pd.set_option("display.width", 200)
        print()
        print(f"pooled out-of-fold Jaccard, {len(real.ids)} chips ({len(clean)} clean), {len(folds)} location folds"
              + (f"; ukis = {best_ukis.name}" if best_ukis else ""))
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
        n_tried = recipes_tried()
        print(f"recipes tried in development (distinct cv/bench-recipe configs in {', '.join(DEV_EXPERIMENTS)}): "
              f"{n_tried}")
        for k, v in {"recipes_tried": n_tried}.items():
            client.log_metric(parent, k, float(v))
        if "cloudseg" in methods and best_ukis is not None:
            for label, ids in (("all", real.ids), ("clean", clean)):
                d, lo, hi = location_bootstrap(methods["cloudseg"], best_ukis, locations, ids, args.bootstrap,
                                               cfg.seed)
                print(f"cloudseg - {best_ukis.name} ({label} chips): {d:+.4f}, location-bootstrap 95% interval "
                      f"[{lo:+.4f}, {hi:+.4f}] ({args.bootstrap} replicates over {len({locations[c] for c in ids})}"
                      f" locations)")
                client.log_metric(parent, f"diff_{label}", d)
                client.log_metric(parent, f"diff_{label}_lo", lo)
                client.log_metric(parent, f"diff_{label}_hi", hi)
        for name, m in methods.items():
            client.log_metric(parent, f"{name}_all", m.score(real.ids))
            client.log_metric(parent, f"{name}_clean", m.score(clean))
        with tracking.scratch_dir() as tmp:
            table.to_csv(Path(tmp) / "bench_quality.csv")
            client.log_artifact(parent, str(Path(tmp) / "bench_quality.csv"))
        wall = time.time() - t_start
        client.log_metric(parent, "wall_s", wall)
        print(f"wall time {wall:.0f}s; MLflow experiment {EXPERIMENT}: parent run {parent}; "
              + "; ".join(f"{k}: {','.join(v)}" for k, v in run_ids.items()))

    def fmt(name: str, part: str) -> str:
        m = methods.get(name)
        if m is None:
            return "nan"
        return f"{m.score(real.ids if part == 'all' else clean):.4f}"

    print(f"cloudseg_all={fmt('cloudseg', 'all')} cloudseg_clean={fmt('cloudseg', 'clean')} "
          f"ukis_all={fmt('ukis', 'all')} ukis_clean={fmt('ukis', 'clean')} "
          f"synthetic_only_all={fmt('synthetic_only', 'all')} synthetic_only_clean={fmt('synthetic_only', 'clean')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
