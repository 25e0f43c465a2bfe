"""Model references in MLflow: run ids and ``models:/<name>@<alias>`` -> local files; registering submissions.

A registered model ``<name>`` (the submission name) gets one version per promote. Each version's artifacts are
the ``submission/`` folder of a small registration run that holds the submission zip and its ``MANIFEST.json``;
its source run is the run that trained the model (promote passes the best member's), so the UI's "Source run"
leads to the training, and its description says what the submission is (``version_description``). The version
carries tags (run ids, metric, git commit, ``cloudseg.zip_sha256``, ``cloudseg.registration_run``) and the
alias (``champion`` by default) moves to it.

    version = register_submission("real-best", zip_path, manifest_path, {"cloudseg.run_ids": "a,b"})
    resolve_model_ref("models:/real-best@champion", dst)   # -> dst/.../real-best.zip
    resolve_model_ref("<32-hex run id>", dst)              # -> [checkpoint, ...] (a cv run: its folds')
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cloudseg.paths import tracking_uri
from cloudseg.tracking.promote import sha256

REGISTRY_EXPERIMENT = "registry"  # experiment of the registration runs
DEFAULT_ALIAS = "champion"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelRefError(LookupError):
    """A run id or models:/ URI that does not resolve; the message says which and why."""


def is_run_id(ref: str) -> bool:
    """Whether ``ref`` looks like an MLflow run id (32 lowercase hex digits)."""
    return bool(_RUN_ID.match(ref))


def is_model_uri(ref: str) -> bool:
    return ref.startswith("models:/")


def _client() -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def register_submission(name: str, zip_path: Path | str, manifest_path: Path | str, tags: dict | None = None,
                        alias: str = DEFAULT_ALIAS, experiment: str = REGISTRY_EXPERIMENT,
                        source_run_id: str | None = None, description: str | None = None) -> str:
    """Register a promoted submission as a new version of registered model ``name`` and move ``alias`` to it.

    Args:
        zip_path, manifest_path: the submission zip and its MANIFEST.json, logged as artifacts
            ``submission/<zip name>`` and ``submission/MANIFEST.json`` of a registration run in ``experiment``.
        tags: version tags, e.g. ``{"cloudseg.run_ids": "...", "cloudseg.metric": "cv_jaccard",
            "cloudseg.metric_value": "0.91"}``; values become strings. ``cloudseg.zip_sha256``,
            ``cloudseg.zip_name``, ``cloudseg.registration_run`` and (unless given) ``cloudseg.git_commit`` are
            added.
        source_run_id: the run that trained the model, the version's source run (default: the registration run).
            A tracking server that keeps artifacts as local files accepts only a source inside the source run's
            artifacts; there the registration run stays the source run and tag ``cloudseg.source_run`` names
            the training run.
        description: the version's description (Markdown; ``version_description``).

    Returns:
        The new version number (a string, as MLflow gives it).
    """
    from cloudseg.tracking import git_info, setup

    zip_path, manifest_path = Path(zip_path), Path(manifest_path)
    for p in (zip_path, manifest_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist: promote the submission first")
    version_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    version_tags["cloudseg.zip_sha256"] = sha256(zip_path)
    version_tags["cloudseg.zip_name"] = zip_path.name
    if "cloudseg.git_commit" not in version_tags:
        version_tags["cloudseg.git_commit"] = git_info()[0]
    exp_id = setup(experiment)
    client = MlflowClient()
    run = client.create_run(exp_id, run_name=f"register-{name}",
                            tags={"cloudseg.registered_model": name, **version_tags})
    run_id = run.info.run_id
    try:
        client.log_artifact(run_id, str(zip_path), "submission")
        client.log_artifact(run_id, str(manifest_path), "submission")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    try:
        client.create_registered_model(name, description="cloudseg competition submission (zip + MANIFEST.json)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another promote created it first: fine
            raise
    source = f"{run.info.artifact_uri}/submission"
    version_tags["cloudseg.registration_run"] = run_id
    if source_run_id:
        version_tags["cloudseg.source_run"] = source_run_id
    try:
        version = client.create_model_version(name, source, run_id=source_run_id or run_id, tags=version_tags,
                                              description=description)
    except MlflowException as exc:
        if not source_run_id or exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        # a server keeping local-file artifacts wants the source inside the source run's own artifacts
        version = client.create_model_version(name, source, run_id=run_id, tags=version_tags,
                                              description=description)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def cost_line(cost: dict | None) -> str:
    """MANIFEST.json's ``cost`` block in one line (what promote prints), or why there is none."""
    if not cost:
        return "cost: not estimated (MANIFEST.json has no cost block)"
    return (f"cost: {cost.get('forwards_per_chip', '?')} forwards/chip, {cost.get('gflop_per_chip', '?')} "
            f"GFLOP/chip, K80 projected {cost.get('k80_projected_h', '?')} h "
            f"({cost.get('k80_projected_h_low', '?')}-{cost.get('k80_projected_h_high', '?')} h) for 10,980 chips")


def version_description(manifest: dict, source_run_id: str, client: MlflowClient | None = None) -> str:
    """A model version's description (Markdown): the submission's name, its members with their runs and scores,
    the run that trained it (``source_run_id``), the git commit and the cost line, from its MANIFEST.json."""
    client = client or _client()

    def run_label(run_id: str) -> tuple[str, str]:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return "(run not found)", "-"
        best = run.data.metrics.get("best_val_jaccard")
        return run.info.run_name or "-", f"{best:.4f}" if best is not None else "-"

    name = manifest.get("name", "?")
    members = manifest.get("runs", [])
    which = f", the best of its {len(members)} members" if len(members) > 1 else ""
    source_name = run_label(source_run_id)[0]
    lines = [f"cloudseg submission **{name}** (`{name}.zip`). Source run: {source_name} (`{source_run_id}`{which}), "
             "the run that trained it.", "", "Members:"]
    described = {m.get("run_id"): m for m in manifest.get("members", [])}
    for i, r in enumerate(members):
        rid = r.get("run_id", "?")
        m = described.get(rid, {})
        run_name, best = run_label(rid)
        lines.append(f"- model {i}: {run_name} (`{rid}`), {m.get('arch', '?')} {m.get('encoder', '')}, "
                     f"best_val_jaccard {best}; ranked by {r.get('metric', '?')}="
                     f"{float(r.get('value', float('nan'))):.4f}")
    dirty = " (uncommitted changes)" if manifest.get("git_dirty") else ""
    lines += ["", f"Git commit: `{manifest.get('git_commit', 'unknown')}`{dirty}", "",
              cost_line(manifest.get("cost"))]
    return "\n".join(lines)


def resolve_model_ref(ref: str, dst: Path | str) -> Path | list[Path]:
    """Download what a run id or ``models:/`` URI points at into ``dst``.

    Returns:
        ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the submission zip (its sha256 checked
        against the version's tag). A run id: its ``checkpoint/best.pt``; a cv parent run: its FINISHED folds'
        checkpoints in fold order (the ensemble promote would build).

    Raises:
        ModelRefError: unknown run, model, alias or version, or nothing to predict with behind it.
    """
    dst = Path(dst)
    if is_model_uri(ref) or is_run_id(ref):
        try:
            client = _client()
            return (_resolve_model_uri if is_model_uri(ref) else _resolve_run)(client, ref, dst)
        except MlflowException as exc:  # store unreachable, bad schema, ...: still one line
            raise ModelRefError(f"--model {ref}: MLflow store {tracking_uri()} failed "
                                f"({str(exc).splitlines()[0][:200]})") from exc
    raise ModelRefError(f"--model {ref!r}: not a submission folder/zip, an MLflow run id (32 hex digits) or "
                        "models:/<name>@<alias>")


def _resolve_model_uri(client: MlflowClient, ref: str, dst: Path) -> Path:
    m = _MODEL_URI.match(ref)
    if not m:
        raise ModelRefError(f"--model {ref!r}: write models:/<name>@<alias> or models:/<name>/<version>")
    name = m["name"]
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(name, m["alias"])
        else:
            mv = client.get_model_version(name, m["version"])
    except MlflowException as exc:
        raise ModelRefError(f"--model {ref}: no such registered model version in {tracking_uri()} "
                            f"({str(exc).splitlines()[0][:200]})") from exc
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst)))
    except Exception as exc:
        raise ModelRefError(f"--model {ref}: cannot download version {mv.version}'s artifacts from {mv.source} "
                            f"({exc})") from exc
    zips = sorted(local.glob("*.zip")) if local.is_dir() else [local]
    if not zips:
        raise ModelRefError(f"--model {ref}: version {mv.version} ({mv.source}) holds no submission zip")
    expected = (mv.tags or {}).get("cloudseg.zip_sha256")
    if expected and sha256(zips[0]) != expected:
        raise ModelRefError(f"--model {ref}: {zips[0].name} does not match the sha256 registered with version "
                            f"{mv.version}; the artifact store was changed")
    return zips[0]


def _resolve_run(client: MlflowClient, run_id: str, dst: Path) -> list[Path]:
    from cloudseg.tracking import download
    from cloudseg.tracking.runs import has_checkpoint

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ModelRefError(f"--model {run_id}: no such run in {tracking_uri()}") from exc
    sources = [run_id]
    if run.data.tags.get("cloudseg.kind") == "cv":
        folds = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and "
                                   "attributes.status = 'FINISHED'")
        if not folds:
            raise ModelRefError(f"--model {run_id}: cv run has no FINISHED fold runs to ensemble")
        sources = [f.info.run_id for f in sorted(folds, key=lambda f: int(f.data.tags.get("cloudseg.fold", 0)))]
    paths = []
    for rid in sources:
        if not has_checkpoint(client, rid):
            raise ModelRefError(f"--model {run_id}: run {rid} has no checkpoint/best.pt artifact")
        paths.append(download(rid, "checkpoint/best.pt", dst / rid))
    return paths
