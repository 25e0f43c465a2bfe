"""The MLflow UI on cloudseg's stores, with a way in that opens the runs table with the figures as columns.

MLflow 3.17's UI keeps two choices in the browser (``localStorage``), not on the server: the workflow (it starts
in its GenAI view, whatever an experiment's ``mlflow.experimentKind`` tag says) and each experiment's runs-table
columns (none of the metrics or params until a user picks them). So cloudseg keeps what it can on the server and
hands the browser the rest once:

- every experiment (``tracking.setup``) carries the tag ``mlflow.experimentKind``, a description, and a saved view
  named ``cloudseg`` (tag ``mlflow.sharedViewState.cloudseg``): listed under "Views" in the runs table, opened by
  ``?viewStateShareKey=cloudseg``; its columns are the figures, the recipe and the run's kind;
- ``make ui`` (``python -m cloudseg.tracking.ui``) starts ``mlflow ui --app-name cloudseg`` (this module's
  ``create_app``, an ``mlflow.app`` plugin declared in setup.cfg) and prints the address of its page
  ``/cloudseg``. That page writes into the browser what a user would otherwise click (the model-training view,
  and for each experiment with the saved view, its columns), then opens the experiments list. The UI reads both
  back on every click and reload. An experiment's columns are written once per version of the view, so columns a
  user changes afterwards stay theirs.

The browser test (``tests/test_ui.py``) checks this path in a real headless Chromium: the keys the page writes
are the UI's own, and an MLflow upgrade that changes them fails that test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from importlib import metadata

APP_NAME = "cloudseg"  # mlflow.app entry point: ``mlflow ui --app-name cloudseg``
WAY_IN = "/cloudseg"  # the page make ui prints
VIEW_KEY = "cloudseg"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "cloudseg"  # shown in the runs table's "Views" menu
# few enough to read across a screen: the figures, the recipe keys a study or a comparison changes, the run's kind
# (the UI shows a column only where some run has a value)
VIEW_COLUMNS = (
    *(f"metrics.`{m}`" for m in ("best_val_jaccard", "cv_jaccard", "cv_jaccard_clean", "cv_jaccard_mean",
                                 "cv_jaccard_sd", "threshold_tuned")),
    *(f"params.`{p}`" for p in ("arch", "encoder", "loss", "lr", "epochs", "seed")),
    "tags.`cloudseg.kind`", "tags.`cloudseg.study`", "tags.`cloudseg.pruned`",
)
VIEW_STATE = json.dumps({"selectedColumns": ["attributes.`Run Name`", *VIEW_COLUMNS]})
DESCRIPTION_TAG = "mlflow.note.content"  # an experiment's description in the UI
WROTE_DESCRIPTION_TAG = "cloudseg.description"  # the description cloudseg last wrote: one that differs is the user's
DESCRIPTION = ("cloudseg runs: a sweep row holds its best trial's score and recipe (+ opens its trials); "
               "Views > cloudseg restores these columns.")
# the UI's own localStorage keys (MLflow 3.17), which the way-in page writes
WORKFLOW_KEY, WORKFLOW = "mlflow.workflowType_v1", "machine_learning"
TABLE_STATE_KEY = 'MLflowLocalStorage-1.1-ExperimentPage-["{id}"]-ReactComponentState'


def view_tag_value(now_ms: int | None = None) -> str:
    """The saved view as MLflow 3.17 stores one: name, times, and the runs-table state."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": VIEW_STATE})


def view_is_current(value: str | None) -> bool:
    """Whether an experiment's view tag holds this version's view (its times aside)."""
    try:
        stored = json.loads(value or "")
    except ValueError:
        return False
    return isinstance(stored, dict) and stored.get("name") == VIEW_NAME and stored.get("state") == VIEW_STATE


def tags_to_update(tags: dict[str, str]) -> dict[str, str]:
    """The experiment tags that bring an experiment with ``tags`` to this version's kind, saved view and
    description (a description the user wrote, one that is not what cloudseg last wrote, stays)."""
    from cloudseg.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    out = {}
    if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        out[EXPERIMENT_KIND_TAG] = EXPERIMENT_KIND
    if not view_is_current(tags.get(VIEW_TAG)):
        out[VIEW_TAG] = view_tag_value()
    ours = tags.get(DESCRIPTION_TAG) in (None, "", tags.get(WROTE_DESCRIPTION_TAG))
    if ours and tags.get(DESCRIPTION_TAG) != DESCRIPTION:
        out[DESCRIPTION_TAG] = out[WROTE_DESCRIPTION_TAG] = DESCRIPTION
    return out


def view_columns(value: str | None) -> list[str] | None:
    """The columns of a stored view tag (either MLflow's saved-view form or a bare state), or None."""
    try:
        stored = json.loads(value or "")
        state = json.loads(stored["state"]) if "state" in stored else stored
        columns = state["selectedColumns"]
    except (ValueError, KeyError, TypeError):
        return None
    return [str(c) for c in columns] if isinstance(columns, list) else None


def way_in_page(views: dict[str, list[str]], target: str = "/#/experiments") -> str:
    """The HTML of ``/cloudseg``: write the model-training workflow and, once per view version, each experiment's
    columns (``views``: experiment id -> columns) into the browser's localStorage, then open ``target``."""
    data = json.dumps({"workflowKey": WORKFLOW_KEY, "workflow": WORKFLOW, "tableKey": TABLE_STATE_KEY,
                       "views": views, "target": target}).replace("</", "<\\/")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cloudseg runs</title></head>
<body>
<p>Opening the MLflow runs of this cloudseg checkout... (<a href="{target}">continue</a>)</p>
<script>
const cfg = {data};
try {{
  localStorage.setItem(cfg.workflowKey, JSON.stringify(cfg.workflow));
  for (const [id, columns] of Object.entries(cfg.views)) {{
    const key = cfg.tableKey.replace("{{id}}", id), mark = "cloudseg.view." + id, want = JSON.stringify(columns);
    if (localStorage.getItem(mark) === want) continue;  // set before: columns the user changed since stay
    let state = {{}};
    try {{ state = JSON.parse(localStorage.getItem(key) || "{{}}") || {{}}; }} catch (e) {{ state = {{}}; }}
    state.selectedColumns = columns;
    localStorage.setItem(key, JSON.stringify(state));
    localStorage.setItem(mark, want);
  }}
}} catch (e) {{ console.warn("cloudseg: could not prepare the MLflow UI", e); }}
window.location.replace(cfg.target);
</script>
</body></html>
"""


def stored_views(tracking_uri: str) -> dict[str, list[str]]:
    """Experiment id -> columns of its ``cloudseg`` view, for every active experiment of the store that has one."""
    from mlflow.tracking import MlflowClient

    views = {}
    for exp in MlflowClient(tracking_uri).search_experiments(max_results=1000):
        columns = view_columns(exp.tags.get(VIEW_TAG))
        if columns:
            views[exp.experiment_id] = columns
    return views


def refresh_views(tracking_uri: str) -> list[str]:
    """Give every experiment an older cloudseg made (it has the view tag) this version's view and description
    (``tags_to_update``); returns their names. ``make ui`` calls it, so the page hands the browser the current columns whatever made the store."""
    from mlflow.tracking import MlflowClient

    client, refreshed = MlflowClient(tracking_uri), []
    for exp in client.search_experiments(max_results=1000):
        update = tags_to_update(exp.tags) if VIEW_TAG in exp.tags else {}
        for key, value in update.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
        if update:
            refreshed.append(exp.name)
    return refreshed


def create_app(app=None):
    """The ``mlflow.app`` plugin: MLflow's own server plus the page ``/cloudseg``. Under uvicorn (MLflow's default
    server) it returns the FastAPI app MLflow builds around its Flask app, as MLflow's own auth plugin does."""
    from flask import Response
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app as mlflow_app
    from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR

    app = mlflow_app if app is None else app

    def way_in() -> Response:
        uri = os.environ.get(BACKEND_STORE_URI_ENV_VAR, "")
        try:
            views = stored_views(uri) if uri else {}
        except Exception as exc:  # the store is unreadable: still open the UI, which will say why
            print(f"[ui] cloudseg: cannot read the experiments' views from {uri}: {exc}", file=sys.stderr)
            views = {}
        return Response(way_in_page(views), mimetype="text/html", headers={"Cache-Control": "no-store"})

    app.add_url_rule(WAY_IN, "cloudseg_way_in", way_in, methods=["GET"])
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app


def plugin_installed() -> bool:
    """Whether this environment declares the ``mlflow.app`` entry point (pip install -e ., i.e. make setup)."""
    return any(ep.name == APP_NAME for ep in metadata.entry_points(group="mlflow.app"))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """``make ui``: print the way in, then become ``mlflow ui`` on this checkout's stores."""
    from cloudseg import tracking

    p = argparse.ArgumentParser(description="MLflow UI for this repository's stores (make ui)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000, help="0: any free port")
    args = p.parse_args(argv)
    port = args.port or free_port(args.host)
    uri = tracking.tracking_uri()
    cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "ui", "--workers", "1", "--host", args.host,
           "--port", str(port), "--backend-store-uri", uri,
           "--default-artifact-root", str(tracking.artifacts_root())]
    base = f"http://{args.host}:{port}"
    try:
        refreshed = refresh_views(uri)
    except Exception as exc:  # a store this process cannot write: the UI still opens, with the views it has
        refreshed = []
        print(f"[ui] warning: cannot bring the experiments' views up to date in {uri}: {exc}", flush=True)
    if refreshed:
        print(f"[ui] this version's columns set on: {', '.join(refreshed)}", flush=True)
    if plugin_installed():
        cmd += ["--app-name", APP_NAME]
        print(f"[ui] MLflow UI on {uri}\n[ui] open {base}{WAY_IN}", flush=True)
    else:
        print(f"[ui] MLflow UI on {uri}\n[ui] open {base}/#/experiments?workflowType={WORKFLOW}\n"
              f"[ui] warning: cloudseg's mlflow.app plugin is not installed in {sys.prefix} (run `make setup`); "
              f"without it the UI falls back to its GenAI view on the first click and shows no figure columns "
              f"(pick the saved view \"{VIEW_NAME}\" under Views)", flush=True)
    # the UI needs none of MLflow's background jobs, which start eight processes
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
