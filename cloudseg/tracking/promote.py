"""Promote: the best MLflow run(s) -> a zip-ready competition submission folder.

How promote finds a run's config and weights: ``select_runs`` ranks FINISHED runs by their metric (a cv run
stands for the ensemble of its folds); ``fetch_members`` takes each model run's config from
``runs.config_of`` (its ``config.json``) and its weights from ``runs.checkpoint_of`` (``checkpoint/best.pt``).
``write_submission`` lays them out with ``cloudseg.submission`` and keeps no local path in what it writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cloudseg.paths import REPO_ROOT, SUBMISSIONS_DIR, SYNTHETIC_DIR, real_data_dir
from cloudseg.submission import MAIN_TEMPLATE

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
    p.add_argument("--metric", default=None, help="ranking metric (default best_val_jaccard; cv_jaccard for cv; "
                   "<figure>_mean for a repeat parent, whose children are promoted as an ensemble)")
    p.add_argument("--top-k", type=int, default=1, help="ensemble the top K runs (averaged probabilities)")
    p.add_argument("--name", default="best", help="submission name: submissions/<name>/ and <name>.zip")
    p.add_argument("--tta", default="flip", help="test-time augmentation in main.py: none, hflip, flip, flip4, d4")
    p.add_argument("--batch-size", type=int, default=8, help="chips per forward pass in main.py")
    p.add_argument("--alias", default="champion", help="registry alias moved to the new model version")
    p.add_argument("--no-register", action="store_true",
                   help="write the folder and zip only, without a version in MLflow's model registry")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold (default: the members' stored thresholds, averaged)")
    p.add_argument("--stac", default=None, help="STAC API main.py fetches supplementary bands from, for models "
                   "that read any (default: the Planetary Computer's, the one the runtime allows)")
    p.add_argument("--collection", default="sentinel-2-l2a", help="STAC collection of those bands")
    return p.parse_args(argv)


def default_metric(run) -> str:
    """A run's ranking figure: ``cv_jaccard`` for a cv run, a repeat parent's mean of its children's figure
    (``cv_jaccard_mean`` or ``best_val_jaccard_mean``), else ``best_val_jaccard``."""
    kind = run.data.tags.get("cloudseg.kind")
    if kind == "repeat":
        return "cv_jaccard_mean" if "cv_jaccard_mean" in run.data.metrics else "best_val_jaccard_mean"
    return "cv_jaccard" if kind == "cv" else "best_val_jaccard"


def _children(client, run) -> list:
    kids = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and "
                              "attributes.status = 'FINISHED'")
    key = "cloudseg.seed" if run.data.tags.get("cloudseg.kind") == "repeat" else "cloudseg.fold"
    return sorted(kids, key=lambda r: int(r.data.tags.get(key, 0)))


def model_runs(client, run) -> list[str]:
    """The run ids whose checkpoints make up ``run``'s model: a cv run's folds, a repeat parent's children
    (each of them a cv run's folds where the children are cv runs), else the run itself."""
    kind = run.data.tags.get("cloudseg.kind")
    if kind not in ("cv", "repeat"):
        return [run.info.run_id]
    kids = _children(client, run)
    if not kids:
        raise PromoteError(f"{kind} run {run.info.run_id} has no FINISHED child runs to ensemble")
    return [rid for k in kids for rid in model_runs(client, k)]


def _pruned(run) -> bool:
    """A trial the pruner stopped: FINISHED, but never a model to promote."""
    return run.data.tags.get("cloudseg.pruned") == "true"


def source_run(client, run) -> str:
    """The run that trained the model promoted for ``run`` (the registered version's source run): the run itself,
    or for a cv or repeat run the member run with the best ``best_val_jaccard`` of its own."""
    ids = model_runs(client, run)
    if len(ids) == 1:
        return ids[0]
    scores = {rid: client.get_run(rid).data.metrics.get("best_val_jaccard", float("-inf")) for rid in ids}
    return max(ids, key=lambda rid: scores[rid])  # max keeps the first of equals: the lowest fold or seed


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
            metric = args.metric or default_metric(run)
            if run.info.status != "FINISHED":
                raise PromoteError(f"run {rid} is {run.info.status}, not FINISHED: only completed runs are promoted")
            if _pruned(run):
                raise PromoteError(f"run {rid} is a pruned trial (tag cloudseg.pruned=true): it stopped before its "
                                   "last epoch; promote a trial that completed")
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
    runs = [r for r in runs if metric in r.data.metrics and "cloudseg.kind" in r.data.tags and not _pruned(r)]
    if metric.endswith("_mean"):
        runs = [r for r in runs if r.data.tags["cloudseg.kind"] == "repeat"]
    elif metric.startswith("cv_jaccard"):
        runs = [r for r in runs if r.data.tags["cloudseg.kind"] == "cv"]
    else:
        runs = [r for r in runs if r.data.tags["cloudseg.kind"] in ("train", "trial")]
    where = f"experiment {args.experiment!r}" if args.experiment else "any experiment"
    if args.study:
        where += f", study {args.study!r}"
    if not runs:
        raise PromoteError(f"no FINISHED run with metric {metric!r} in {where}; train or sweep first, or pass "
                           "--run-id")
    usable = [r for r in runs if r.data.tags["cloudseg.kind"] in ("cv", "repeat")
              or has_checkpoint(client, r.info.run_id)]
    if not usable:
        raise PromoteError(f"none of the {len(runs)} FINISHED runs in {where} has a checkpoint artifact")
    return [(r, metric) for r in usable[: args.top_k]]


def fetch_members(client, chosen, dst: Path) -> list[Member]:
    """Download each chosen run's checkpoints and configs (``model_runs``: a cv run contributes every fold's, a
    repeat parent every child's)."""
    from cloudseg.tracking.runs import RunError, checkpoint_of, config_of

    members = []
    for run, metric in chosen:
        value = float(run.data.metrics[metric])
        for rid in model_runs(client, run):
            try:
                local = checkpoint_of(rid, dst / rid)
                config = config_of(rid).to_dict()
            except RunError as exc:
                raise PromoteError(str(exc)) from exc
            members.append(Member(rid, metric, value, local, config))
    return members


def check_runtime_models(members: list[Member]) -> list[dict]:
    from cloudseg.checkpoint import load_checkpoint
    from cloudseg.data.bands import BANDS
    from cloudseg.models import runtime_support

    described = []
    for m in members:
        ckpt = load_checkpoint(m.checkpoint)
        args = ckpt["model"]
        ok, why = runtime_support(args["arch"], args["encoder_name"], **(args.get("kwargs") or {}))
        if not ok:
            raise PromoteError(f"run {m.run_id}: {args['arch']} + {args['encoder_name']} cannot be promoted: {why}")
        described.append({"run_id": m.run_id, "arch": args["arch"], "encoder": args["encoder_name"],
                          "threshold": ckpt["threshold"], "epoch": ckpt["epoch"], "runtime": why,
                          "bands": list(ckpt.get("bands") or BANDS)})
    return described


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


PATH_KEYS = ("data", "exclude_ids", "suspect_ids", "init_from")  # config keys that may hold a local path


def _file_digest(path: Path) -> str:
    return f"sha256:{sha256(path)[:16]}"


def portable_config(config: dict) -> dict:
    """``config`` without local paths: ``data`` as the config's own words (``synthetic``, ``real``), relative to
    the repository root, or ``folder:<name>``; id lists and checkpoint files as the sha256 of their contents; YAML
    configs relative to the repository root (else their file name)."""
    out = dict(config)
    for key in PATH_KEYS:
        value = str(out.get(key, "") or "")
        if not value or value in ("synthetic", "real", "auto") or "/" not in value and not Path(value).exists():
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        path = path.resolve()
        if key == "data":
            if path == SYNTHETIC_DIR.resolve():
                out[key] = "synthetic"
            elif path == real_data_dir():
                out[key] = "real"
            elif path.is_relative_to(REPO_ROOT):
                out[key] = path.relative_to(REPO_ROOT).as_posix()
            else:
                out[key] = f"folder:{path.name}"
        elif path.suffix in (".yaml", ".yml"):
            out[key] = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name
        elif path.is_file():
            out[key] = _file_digest(path)
        else:
            out[key] = f"missing:{path.name}"
    return out


def _portable_checkpoint(path: Path) -> None:
    """Rewrite a copied checkpoint's embedded config with ``portable_config``."""
    from cloudseg.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    ckpt["config"] = portable_config(ckpt.get("config") or {})
    save_checkpoint(ckpt, path)


def write_submission(name: str, members: list[Member], described: list[dict], args: argparse.Namespace,
                     out_root: Path | None = None) -> tuple[Path, Path]:
    from cloudseg import __version__
    from cloudseg import submission as layout
    from cloudseg.data.bands import BANDS
    from cloudseg.submission.verify import check_sources
    from cloudseg.tracking import git_info

    if not name or "/" in name or name.startswith("."):
        raise PromoteError(f"--name {name!r}: use a plain folder name")
    out_root = SUBMISSIONS_DIR if out_root is None else out_root
    extra = sorted({b for d in described for b in d["bands"] if b not in BANDS})
    stac = None
    if extra:
        from cloudseg.submission.stac_bands import PLANETARY_COMPUTER

        url = args.stac or PLANETARY_COMPUTER
        stac = {"url": url, "collection": args.collection, "bands": extra, "budget_s": 60, "workers": 8,
                # where the API's assets live (verify lets main.py reach these and the API's own host only)
                "asset_hosts": ["*.blob.core.windows.net"] if url == PLANETARY_COMPUTER else []}
    sources = {"main.py": MAIN_TEMPLATE.read_text(), "stac_bands.py": layout.STAC_TEMPLATE.read_text()}
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
                                batch_size=args.batch_size, stac=stac)
    except ValueError as exc:  # e.g. an unknown --tta
        raise PromoteError(str(exc)) from exc
    inference = json.loads((tmp / "assets" / "inference.json").read_text())
    for model in inference["models"]:
        _portable_checkpoint(tmp / model)
    configs = {}
    for m in members:
        configs[m.run_id] = portable_config(m.config)
        (tmp / "assets" / f"config_{m.run_id}.json").write_text(json.dumps(configs[m.run_id], indent=2,
                                                                           sort_keys=True))
    commit, dirty = git_info()
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cloudseg_version": __version__, "git_commit": commit, "git_dirty": dirty,
        "runs": [{"run_id": m.run_id, "metric": m.metric, "value": m.value} for m in members],
        "members": described, "inference": inference, "config": configs,
        # what main.py needs beyond the runtime's packages and the test chips: the network it uses, if any
        "network": ({"stac": stac["url"], "collection": stac["collection"], "bands": extra,
                     "why": "supplementary bands the test chips lack are fetched for each chip"} if stac else None),
        "sha256": {str(p.relative_to(tmp)): sha256(p) for p in files},
    }
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    final = out_root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    zip_path = layout.zip_submission(final, out_root / f"{name}.zip")
    return final, zip_path




def main(argv: list[str] | None = None) -> int:
    """``experiments/promote.py``: select, fetch, check, write and zip; exit 2 with the reason when refused."""
    import sys

    from mlflow.tracking import MlflowClient

    from cloudseg import tracking

    args = parse_args(argv)
    tracking.connect()
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
    if not args.no_register:
        from cloudseg.tracking.models import register_submission, version_description

        run, metric = chosen[0]
        source = source_run(client, run)
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        version = register_submission(args.name, zip_path, folder / "MANIFEST.json", alias=args.alias, tags={
            "cloudseg.run_ids": ",".join(r.info.run_id for r, _ in chosen), "cloudseg.metric": metric,
            "cloudseg.metric_value": f"{run.data.metrics[metric]:.6f}",
            "cloudseg.members": ",".join(m.run_id for m in members)},
            source_run_id=source, description=version_description(manifest, source, client))
        print(f"registered model {args.name!r} version {version}, alias {args.alias!r} "
              f"(MLflow UI: Models; predict with --model models:/{args.name}@{args.alias})")
    return 0
