"""Paired comparison of two MLflow runs scored on the same chips: gather their per-chip counts, bootstrap the
difference of their pooled Jaccards, print a table and log the outcome as a run of kind ``compare``.

What is compared, per run kind:

- ``train`` / ``trial`` (one fold): ``per_chip_jaccard.csv``, columns ``intersection_fixed`` /
  ``union_fixed``: the kept model at the configured threshold, the counts behind ``best_val_jaccard``. The
  tuned-threshold columns (``val_jaccard_at_threshold``) are not used: that threshold was chosen on these very
  labels.
- ``cv``: ``cv_per_chip.csv``, the out-of-fold counts ``cv_jaccard`` pools (also ``_fixed``).
- ``repeat``: its FINISHED children (tag ``mlflow.parentRunId``), one column per seed (tag ``cloudseg.seed``);
  all children must be scored on the same chips.

A run's figure is the mean over its seeds of each seed's pooled Jaccard (one seed: the pooled Jaccard itself).
The bootstrap (``cloudseg.stats.paired_bootstrap``) resamples locations when either run is cross-validated
(out-of-fold scores: a location is the unit of independence), else chips; the same draw serves both runs.
Seeds are resampled as well: column by column for both runs when both are repeats over the same seeds, else
independently per run.

The outcome goes to a new small run (``cloudseg.kind=compare``, tags ``cloudseg.compare.run_a`` /
``cloudseg.compare.run_b``) in run A's experiment, never onto the compared runs, whose artifacts stay what
training left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from cloudseg import stats, tracking
from cloudseg.data import sources
from cloudseg.tracking import runs

# --metric values: the subset scored, or the MLflow metric whose subset it is
METRICS = {"all": "all", "clean": "clean", "cv_jaccard": "all", "cv_jaccard_clean": "clean",
           "best_val_jaccard": "all"}
SCORED_KINDS = ("train", "trial", "cv")  # kinds with per-chip counts of their own
SHOW_IDS = 5  # chip ids named in a refusal


class CompareError(ValueError):
    """Two runs that cannot be compared; the message names the run, the chips or the value and what to do."""


@dataclass
class RunScores:
    """One run's per-chip counts, one column per seed, rows in ``chips`` order (sorted ids)."""

    run_id: str
    kind: str
    name: str
    experiment_id: str
    chips: np.ndarray  # chip ids. Shape: (n_chips,)
    inter: np.ndarray  # Shape: (n_chips, n_seeds)
    union: np.ndarray  # Shape: (n_chips, n_seeds)
    seeds: list[str]
    locations: np.ndarray | None  # Shape: (n_chips,); None when no artifact had them
    cross_validated: bool  # out-of-fold over every location (cv, or a repeat of cv runs)
    members: list[str] = field(default_factory=list)  # the runs the counts come from (children of a repeat)

    def subset(self, keep: np.ndarray) -> RunScores:
        loc = None if self.locations is None else self.locations[keep]
        return RunScores(self.run_id, self.kind, self.name, self.experiment_id, self.chips[keep],
                         self.inter[keep], self.union[keep], self.seeds, loc, self.cross_validated,
                         self.members)


@dataclass
class Comparison:
    """Two runs paired on the same chips and the bootstrap of their difference (A - B)."""

    a: RunScores
    b: RunScores
    metric: str  # "all" or "clean"
    unit: str  # "chip" or "location"
    n_suspect: int  # chips left out for metric "clean"
    boot: stats.Bootstrap
    n_boot: int
    seed: int
    groups: np.ndarray  # the unit each chip is resampled in (its location, or its own id). Shape: (n_chips,)


def metric_subset(metric: str) -> str:
    """``all`` or ``clean`` for a ``--metric`` value (also the MLflow names and their ``_mean`` forms)."""
    key = metric[:-len("_mean")] if metric.endswith("_mean") else metric
    if key not in METRICS:
        raise CompareError(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
    return METRICS[key]


# ---------------------------------------------------------------------- gathering one run's counts
def _read_counts(run, artifact: str) -> pd.DataFrame:
    run_id = run.info.run_id
    with tracking.scratch_dir() as tmp:
        try:
            path = tracking.download(run_id, artifact, tmp)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise CompareError(f"run {run_id} ({run.data.tags.get('cloudseg.kind', '?')}) has no {artifact} "
                               f"artifact: was it interrupted before its final evaluation?") from exc
        df = pd.read_csv(path, dtype={"chip_id": str})
    missing = {"chip_id", "intersection_fixed", "union_fixed"} - set(df.columns)
    if missing:
        raise CompareError(f"{artifact} of run {run_id} lacks columns {sorted(missing)}")
    dup = df["chip_id"][df["chip_id"].duplicated()].unique().tolist()
    if dup:
        raise CompareError(f"{artifact} of run {run_id} scores {len(dup)} chip(s) twice, e.g. "
                           f"{dup[:SHOW_IDS]}")
    return df.sort_values("chip_id").reset_index(drop=True)


def _seed_of(run, fallback: int) -> str:
    return run.data.tags.get("cloudseg.seed") or run.data.params.get("seed") or str(fallback)


def _seed_order(run) -> tuple[int, str]:
    seed = _seed_of(run, 0)
    return (int(seed) if seed.lstrip("-").isdigit() else 0), seed


def _differ(a: set, b: set, a_name: str, b_name: str) -> str:
    only_a, only_b = sorted(a - b), sorted(b - a)
    return (f"{len(only_a)} only in {a_name} ({', '.join(only_a[:SHOW_IDS]) or '-'}"
            f"{', ...' if len(only_a) > SHOW_IDS else ''}), {len(only_b)} only in {b_name} "
            f"({', '.join(only_b[:SHOW_IDS]) or '-'}{', ...' if len(only_b) > SHOW_IDS else ''}); "
            f"{len(a & b)} in common")


def gather(run_id: str) -> RunScores:
    """A run's per-chip counts at the configured threshold (see the module docstring for each kind).

    Raises:
        runs.RunError: no such run.
        CompareError: a kind without per-chip counts, a missing artifact, or repeat children on different
            chips.
    """
    run = runs.get_run(run_id)
    kind = run.data.tags.get("cloudseg.kind", "")
    if kind == "repeat":
        client = MlflowClient()
        kids = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                  "attributes.status = 'FINISHED'", max_results=1000)
        kids = [k for k in kids if k.data.tags.get("cloudseg.kind") in SCORED_KINDS]
        if not kids:
            raise CompareError(f"repeat run {run_id} has no FINISHED child run with per-chip scores")
        kids.sort(key=_seed_order)
        parts = [gather(k.info.run_id) for k in kids]
        first = parts[0]
        for p in parts[1:]:
            if not np.array_equal(p.chips, first.chips):
                raise CompareError(
                    f"the children of repeat run {run_id} are not scored on the same chips: child {p.run_id} "
                    f"(seed {p.seeds[0]}) vs {first.run_id} (seed {first.seeds[0]}): "
                    f"{_differ(set(p.chips), set(first.chips), p.run_id[:8], first.run_id[:8])}. Single-fold "
                    "runs validate on other chips for each seed (the seed shuffles the folds); repeat cv "
                    "runs, or n_folds=0, instead")
        locs = next((p.locations for p in parts if p.locations is not None), None)
        return RunScores(run_id, kind, run.info.run_name, run.info.experiment_id, first.chips,
                         np.hstack([p.inter for p in parts]), np.hstack([p.union for p in parts]),
                         [_seed_of(k, i) for i, k in enumerate(kids)], locs,
                         all(p.cross_validated for p in parts), [p.run_id for p in parts])
    if kind not in SCORED_KINDS:
        raise CompareError(f"run {run_id} is of kind {kind or '(untagged)'!r}: compare takes runs of kind "
                           f"{', '.join(SCORED_KINDS)} or repeat")
    df = _read_counts(run, "cv_per_chip.csv" if kind == "cv" else "per_chip_jaccard.csv")
    locs = df["location"].astype(str).to_numpy() if "location" in df.columns else None
    return RunScores(run_id, kind, run.info.run_name, run.info.experiment_id,
                     df["chip_id"].to_numpy(dtype=str), df[["intersection_fixed"]].to_numpy(np.int64),
                     df[["union_fixed"]].to_numpy(np.int64),
                     [_seed_of(run, 0)], locs, kind == "cv", [run_id])


# ---------------------------------------------------------------------- what the data folder knows
def data_root(scores: RunScores) -> tuple[Path, object]:
    """(data folder, config) a run was trained on: tag ``cloudseg.data`` when that folder still exists, else
    its ``config.json`` ``data`` resolved by ``sources.resolve_data``; for a repeat without them, its first
    child's."""
    last = None
    for rid in dict.fromkeys([scores.run_id, *scores.members]):
        try:
            cfg = runs.config_of(rid)
        except Exception as exc:  # noqa: BLE001 - a repeat parent may carry no config.json of its own
            last = exc
            continue
        tag = runs.get_run(rid).data.tags.get("cloudseg.data")
        if tag and Path(tag).is_dir():
            return Path(tag), cfg
        try:
            return sources.resolve_data(cfg.data, cfg.synthetic_n), cfg
        except FileNotFoundError as exc:
            last = exc
    raise CompareError(f"cannot find the data folder of run {scores.run_id}: {last}")


def suspects_of(scores: RunScores) -> set[str]:
    """The suspect-label ids the run's config scores apart (``sources.suspect_ids`` on its data folder)."""
    root, cfg = data_root(scores)
    return sources.suspect_ids(cfg, root)


def locations_of(scores: RunScores) -> np.ndarray:
    """Each chip's location: from the run's own artifact, else the data folder's ``train_metadata.csv``."""
    if scores.locations is not None:
        return scores.locations
    root, _ = data_root(scores)
    meta = pd.read_csv(root / "train_metadata.csv", dtype={"chip_id": str}).set_index("chip_id")
    unknown = sorted(set(scores.chips) - set(meta.index))
    if unknown:
        raise CompareError(f"chips of run {scores.run_id} missing from {root / 'train_metadata.csv'}: "
                           f"{unknown[:SHOW_IDS]}")
    return meta.loc[scores.chips, "location"].astype(str).to_numpy()


# ---------------------------------------------------------------------- the comparison
def compare(run_a: str, run_b: str, metric: str = "all", n_boot: int = 10_000, seed: int = 0) -> Comparison:
    """Pair two runs chip by chip and bootstrap the difference of their figures (A - B).

    Raises:
        runs.RunError: an unknown run id.
        CompareError: runs scored on different chips (named), a bad metric, or nothing left to score.
    """
    subset = metric_subset(metric)
    for rid in (run_a, run_b):  # both ids known before any download
        runs.get_run(rid)
    a, b = gather(run_a), gather(run_b)
    if not np.array_equal(a.chips, b.chips):
        raise CompareError(f"runs {run_a} and {run_b} are not scored on the same chips: "
                           f"{_differ(set(a.chips), set(b.chips), 'A', 'B')}. Compare runs validated on the "
                           "same chips (same data, fold, n_folds and seed, or cv runs of the same data)")
    n_suspect = 0
    if subset == "clean":
        bad = suspects_of(a) | suspects_of(b)
        keep = ~np.isin(a.chips, sorted(bad))
        n_suspect = int((~keep).sum())
        if not keep.any():
            raise CompareError(f"every chip of runs {run_a} and {run_b} is a suspect label: nothing clean to "
                               "score")
        a, b = a.subset(keep), b.subset(keep)
    unit = "location" if a.cross_validated or b.cross_validated else "chip"
    groups = a.chips
    if unit == "location":
        groups = locations_of(a) if a.locations is not None or b.locations is None else locations_of(b)
    paired = a.kind == b.kind == "repeat" and a.seeds == b.seeds
    try:
        boot = stats.paired_bootstrap(a.inter, a.union, b.inter, b.union, groups, n_boot, seed, paired)
    except ValueError as exc:
        raise CompareError(f"runs {run_a} and {run_b}: {exc}") from exc
    return Comparison(a, b, subset, unit, n_suspect, boot, n_boot, seed, np.asarray(groups))


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def summary(cmp: Comparison) -> list[dict]:
    """One row per run: id, name, kind, seeds, chips, figure, per-seed figures and their t interval."""
    rows = []
    for label, s in (("A", cmp.a), ("B", cmp.b)):
        per = stats.pooled_per_seed(s.inter, s.union)
        finite = per[np.isfinite(per)]
        mean, sd, lo, hi = stats.mean_sd_ci(finite) if finite.size else (np.nan,) * 4
        rows.append({"side": label, "run_id": s.run_id, "name": s.name, "kind": s.kind,
                     "n_seeds": len(s.seeds), "chips": len(s.chips), "figure": stats.figure(s.inter, s.union),
                     "per_seed": dict(zip(s.seeds, per.tolist())), "sd": sd, "ci_low": lo, "ci_high": hi,
                     "members": s.members})
    return rows


def by_group(cmp: Comparison) -> list[dict]:
    """Each resampled unit's own figure for A and B and their difference, largest |difference| first.

    Shows where a difference comes from: one location carrying it reads very differently from every location
    agreeing.
    """
    rows = []
    for g in np.unique(cmp.groups):
        keep = cmp.groups == g
        a = stats.figure(cmp.a.inter[keep], cmp.a.union[keep])
        b = stats.figure(cmp.b.inter[keep], cmp.b.union[keep])
        rows.append({"group": str(g), "chips": int(keep.sum()), "a": a, "b": b, "delta": a - b})
    return sorted(rows, key=lambda r: -abs(r["delta"]) if np.isfinite(r["delta"]) else 0.0)


def format_groups(cmp: Comparison) -> str:
    """The ``by_group`` rows as text (locations only: a table of every chip would bury the result)."""
    lines = [f"  {cmp.unit:24} {'chips':>5} {'A':>9} {'B':>9} {'A - B':>10}"]
    for r in by_group(cmp):
        lines.append(f"  {r['group'][:24]:24} {r['chips']:>5} {_fmt(r['a']):>9} {_fmt(r['b']):>9} "
                     f"{r['delta']:>+10.6f}")
    return "\n".join(lines)


def format_table(cmp: Comparison) -> str:
    """The human-readable table printed before the last line."""
    head = f"{'':2}{'run':34} {'kind':7} {'seeds':>5} {'chips':>6} {'jaccard':>9}"
    lines = [f"{head}  per seed (sd, 95% t interval)"]
    for r in summary(cmp):
        per = " ".join(f"s{k}={_fmt(v)}" for k, v in r["per_seed"].items())
        if r["n_seeds"] > 1:
            per += f"  sd={_fmt(r['sd'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        name = f"{r['run_id'][:8]} ({r['name']})"[:34]
        lines.append(f"{r['side']:2}{name:34} {r['kind']:7} {r['n_seeds']:>5} {r['chips']:>6} "
                     f"{_fmt(r['figure']):>9}  {per}")
    b = cmp.boot
    left_out = f" ({cmp.n_suspect} suspect chips left out)" if cmp.metric == "clean" else ""
    dropped = f"; {b.n_dropped} replicates without a union dropped" if b.n_dropped else ""
    seeds = "paired" if b.paired_seeds else "drawn per run"
    if cmp.unit == "location":
        lines.append(format_groups(cmp))
    lines.append(f"metric={cmp.metric}{left_out}; bootstrap over {b.n_groups} {cmp.unit}s, {cmp.n_boot} "
                 f"replicates (seed {cmp.seed}), seeds {seeds}{dropped}")
    if cmp.unit == "location" and b.n_groups < 10:
        lines.append(f"note: only {b.n_groups} locations to resample; the interval is rough (likely too "
                     "narrow)")
    return "\n".join(lines)


def last_line(cmp: Comparison) -> str:
    b = cmp.boot
    return f"delta={_fmt(b.delta)} ci_low={_fmt(b.ci_low)} ci_high={_fmt(b.ci_high)} verdict={b.verdict}"


def delta_figure(cmp: Comparison, path: Path | str | None = None):
    """Histogram of the bootstrap differences, the observed one and the interval; saved when given a path."""
    from matplotlib.figure import Figure

    b = cmp.boot
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(b.deltas, bins=min(60, max(10, len(np.unique(b.deltas)))), color="#9ecae1", edgecolor="white")
    ax.axvspan(b.ci_low, b.ci_high, color="#fdd49e", alpha=0.5, label="95% interval", zorder=0)
    ax.axvline(b.delta, color="#d62728", label=f"observed {b.delta:+.4f}")
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"Jaccard A - B ({cmp.metric}; resampled by {cmp.unit})")
    ax.set_ylabel("replicates")
    ax.set_title(f"{cmp.a.run_id[:8]} vs {cmp.b.run_id[:8]}: {b.verdict}", fontsize=10)
    ax.legend(fontsize=8)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def _plain(obj):
    """``obj`` with NaN as None, so ``compare.json`` is strict JSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def log_comparison(cmp: Comparison) -> str:
    """Log the comparison as a FINISHED run of kind ``compare`` in run A's experiment; returns its id."""
    client = MlflowClient()
    b = cmp.boot
    tags = {**tracking.base_tags("compare"), "cloudseg.compare.run_a": cmp.a.run_id,
            "cloudseg.compare.run_b": cmp.b.run_id, "cloudseg.compare.verdict": b.verdict}
    run = client.create_run(cmp.a.experiment_id, tags=tags,
                            run_name=f"compare-{cmp.a.run_id[:8]}-vs-{cmp.b.run_id[:8]}")
    run_id = run.info.run_id
    with tracking.run_status(run_id):
        tracking.log_params(run_id, {"run_a": cmp.a.run_id, "run_b": cmp.b.run_id, "metric": cmp.metric,
                                     "unit": cmp.unit, "n_boot": cmp.n_boot, "seed": cmp.seed})
        rows = summary(cmp)
        figures = {"delta": b.delta, "ci_low": b.ci_low, "ci_high": b.ci_high, "a_jaccard": rows[0]["figure"],
                   "b_jaccard": rows[1]["figure"], "n_groups": b.n_groups}
        for k, v in figures.items():
            client.log_metric(run_id, k, float(v))
        outcome = {"runs": rows, "metric": cmp.metric, "unit": cmp.unit, "n_boot": cmp.n_boot,
                   "seed": cmp.seed, "delta": b.delta, "ci_low": b.ci_low, "ci_high": b.ci_high,
                   "verdict": b.verdict, "n_suspect": cmp.n_suspect, "by_group": by_group(cmp)}
        tracking.log_json(run_id, _plain(outcome), "compare.json")
        with tracking.scratch_dir() as tmp:
            png = Path(tmp) / "compare_delta.png"
            delta_figure(cmp, png)
            tracking.log_file(run_id, png, "plots")
    return run_id
