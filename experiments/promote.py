"""Promote the best MLflow run(s) into a zip-ready competition submission.

    python experiments/promote.py [--experiment NAME] [--study NAME] [--run-id ID]... [--metric NAME]
                                  [--top-k K] [--name NAME] [--tta flip|none|...] [--batch-size N]

Writes ``submissions/<name>/`` (``main.py`` at the root, ``assets/``, ``MANIFEST.json``) and
``submissions/<name>.zip``. Only FINISHED runs with the metric and a checkpoint are considered; a cv run is
promoted as the ensemble of its folds' models. The submission must parse as Python 3.9 and import only the
runtime's packages, and every model must exist with the same weights layout in the runtime's smp 0.2.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudseg.paths import SUBMISSIONS_DIR  # noqa: E402
from cloudseg.submission import MAIN_TEMPLATE  # noqa: E402


class PromoteError(RuntimeError):
    """The selection cannot be promoted; the message says why and what to do."""


@dataclass
class Member:
    run_id: str
    metric: str
    value: float
    checkpoint: Path  # local copy
    config: dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", help="MLflow experiment to search (default: every experiment)")
    p.add_argument("--study", help="only trials of this Optuna study (tag cloudseg.study)")
    p.add_argument("--run-id", dest="run_ids", action="append", default=[], help="explicit run (repeatable)")
    p.add_argument("--metric", default=None, help="ranking metric (default best_val_jaccard; cv_jaccard for cv)")
    p.add_argument("--top-k", type=int, default=1, help="ensemble the top K runs (averaged probabilities)")
    p.add_argument("--name", default="best", help="submission name: submissions/<name>/ and <name>.zip")
    p.add_argument("--tta", default="flip", help="test-time augmentation in main.py: none, hflip, flip, flip4, d4")
    p.add_argument("--batch-size", type=int, default=8, help="chips per forward pass in main.py")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the members' stored thresholds, averaged)")
    return p.parse_args(argv)


def select_runs(client, args: argparse.Namespace) -> list[tuple[object, str]]:
    """(run, metric) pairs to promote, best first. Raises PromoteError on an empty or invalid selection."""
    from mlflow.exceptions import MlflowException

    from cloudseg.tracking.runs import has_checkpoint

    if args.run_ids:
        chosen = []
        for rid in args.run_ids:
            try:
                run = client.get_run(rid)
            except MlflowException as exc:
                raise PromoteError(f"run {rid} does not exist in this tracking store ({exc})") from exc
            metric = args.metric or ("cv_jaccard" if run.data.tags.get("cloudseg.kind") == "cv"
                                     else "best_val_jaccard")
            if run.info.status != "FINISHED":
                raise PromoteError(f"run {rid} is {run.info.status}, not FINISHED: only completed runs are promoted")
            if metric not in run.data.metrics:
                raise PromoteError(f"run {rid} has no metric {metric!r}; it has {sorted(run.data.metrics)}")
            chosen.append((run, metric))
        return chosen
    if args.experiment:
        exp = client.get_experiment_by_name(args.experiment)
        if exp is None:
            raise PromoteError(f"no MLflow experiment named {args.experiment!r}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    metric = args.metric or "best_val_jaccard"
    filters = ["attributes.status = 'FINISHED'"]
    if args.study:
        filters.append(f"tags.`cloudseg.study` = '{args.study}'")
        filters.append("tags.`cloudseg.kind` = 'trial'")
    runs = client.search_runs(exp_ids, " and ".join(filters), max_results=5000,
                              order_by=[f"metrics.`{metric}` DESC"])
    runs = [r for r in runs if metric in r.data.metrics and "cloudseg.kind" in r.data.tags]
    if metric == "cv_jaccard":
        runs = [r for r in runs if r.data.tags["cloudseg.kind"] == "cv"]
    else:
        runs = [r for r in runs if r.data.tags["cloudseg.kind"] in ("train", "trial")]
    where = f"experiment {args.experiment!r}" if args.experiment else "any experiment"
    if args.study:
        where += f", study {args.study!r}"
    if not runs:
        raise PromoteError(f"no FINISHED run with metric {metric!r} in {where}; train or sweep first, or pass "
                           "--run-id")
    usable = [r for r in runs if metric == "cv_jaccard" or has_checkpoint(client, r.info.run_id)]
    if not usable:
        raise PromoteError(f"none of the {len(runs)} FINISHED runs in {where} has a checkpoint artifact")
    return [(r, metric) for r in usable[: args.top_k]]


def fetch_members(client, chosen, dst: Path) -> list[Member]:
    """Download each chosen run's checkpoint (a cv run contributes every fold's)."""
    from cloudseg import tracking
    from cloudseg.tracking.runs import has_checkpoint

    members = []
    for run, metric in chosen:
        value = float(run.data.metrics[metric])
        if run.data.tags.get("cloudseg.kind") == "cv":
            folds = client.search_runs([run.info.experiment_id],
                                       f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                                       "attributes.status = 'FINISHED'")
            if not folds:
                raise PromoteError(f"cv run {run.info.run_id} has no FINISHED fold runs to ensemble")
            sources = [f.info.run_id for f in sorted(folds, key=lambda f: int(f.data.tags.get("cloudseg.fold", 0)))]
        else:
            sources = [run.info.run_id]
        for rid in sources:
            if not has_checkpoint(client, rid):
                raise PromoteError(f"run {rid} has no checkpoint artifact (checkpoint/best.pt)")
            local = tracking.download(rid, "checkpoint/best.pt", dst / rid)
            config = json.loads(Path(tracking.download(rid, "config.json", dst / rid)).read_text())
            members.append(Member(rid, metric, value, local, config))
    return members


def check_runtime_models(members: list[Member]) -> list[dict]:
    from cloudseg.checkpoint import load_checkpoint
    from cloudseg.models import runtime_support

    described = []
    for m in members:
        ckpt = load_checkpoint(m.checkpoint)
        args = ckpt["model"]
        ok, why = runtime_support(args["arch"], args["encoder_name"], **(args.get("kwargs") or {}))
        if not ok:
            raise PromoteError(f"run {m.run_id}: {args['arch']} + {args['encoder_name']} cannot be promoted: {why}")
        described.append({"run_id": m.run_id, "arch": args["arch"], "encoder": args["encoder_name"],
                          "threshold": ckpt["threshold"], "epoch": ckpt["epoch"], "runtime": why})
    return described


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_submission(name: str, members: list[Member], described: list[dict], args: argparse.Namespace,
                     out_root: Path = SUBMISSIONS_DIR) -> tuple[Path, Path]:
    from cloudseg import __version__
    from cloudseg import submission as layout
    from cloudseg.submission.verify import check_sources
    from cloudseg.tracking import git_info

    if not name or "/" in name or name.startswith("."):
        raise PromoteError(f"--name {name!r}: use a plain folder name")
    sources = {"main.py": MAIN_TEMPLATE.read_text()}
    problems = check_sources(sources)
    if problems:
        raise PromoteError("the submission code fails the runtime checks:\n  " + "\n  ".join(problems))
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    threshold = args.threshold if args.threshold is not None else \
        float(sum(d["threshold"] for d in described) / len(described))
    try:
        layout.write_submission(tmp, [m.checkpoint for m in members], threshold=round(threshold, 4), tta=args.tta,
                                batch_size=args.batch_size)
    except ValueError as exc:  # e.g. an unknown --tta
        raise PromoteError(str(exc)) from exc
    inference = json.loads((tmp / "assets" / "inference.json").read_text())
    configs = {}
    for m in members:
        configs[m.run_id] = m.config
        (tmp / "assets" / f"config_{m.run_id}.json").write_text(json.dumps(m.config, indent=2, sort_keys=True))
    commit, dirty = git_info()
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cloudseg_version": __version__, "git_commit": commit, "git_dirty": dirty,
        "runs": [{"run_id": m.run_id, "metric": m.metric, "value": m.value} for m in members],
        "members": described, "inference": inference, "config": configs,
        "sha256": {str(p.relative_to(tmp)): sha256(p) for p in files},
    }
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    final = out_root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    zip_path = layout.zip_submission(final, out_root / f"{name}.zip")
    return final, zip_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlflow
    from mlflow.tracking import MlflowClient

    from cloudseg import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    tracking.echo_stores()
    client = MlflowClient()
    try:
        chosen = select_runs(client, args)
        with tracking.scratch_dir() as tmp:
            members = fetch_members(client, chosen, Path(tmp))
            described = check_runtime_models(members)
            folder, zip_path = write_submission(args.name, members, described, args)
    except PromoteError as exc:
        print(f"promote refused: {exc}", file=sys.stderr)
        return 2
    for run, metric in chosen:
        print(f"promoted run {run.info.run_id} ({metric}={run.data.metrics[metric]:.6f})")
    print(f"members={len(members)} folder={folder}")
    print(f"zip={zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
