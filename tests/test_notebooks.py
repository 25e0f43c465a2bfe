"""The notebooks run headless (nbclient) against a tiny MLflow store and Optuna study made here, and are
committed without outputs.

The store holds one 2-epoch training run and a 2-trial sweep on six tiny chips, made with the real entry
points (``experiments/train.py``, ``experiments/sweep.py``) in this process. Every notebook runs with its
parameter cell replaced by the same names, defaults overridden where a test says so. One kernel of this
interpreter serves the module and its namespace is reset (``%reset -f``) before each notebook, so each starts
with no variables while mlflow and torch are imported once (about 20 s saved on two busy cores); a last cell
checks the kernel runs this interpreter.
"""

from __future__ import annotations

import ast
import re
import sys

import nbformat
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cloudseg.data.io import read_label, write_tif
from cloudseg.metrics import score_folders
from cloudseg.paths import REPO_ROOT
from tests.data.fixtures import make_dataset

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import sweep as sweep_script  # noqa: E402
import train as train_script  # noqa: E402

NOTEBOOKS = REPO_ROOT / "notebooks"
NAMES = ("01_explore_data.ipynb", "02_compare_runs.ipynb", "03_error_analysis.ipynb")
# FPN + mobilenet_v2 validates 512 px chips about twice as fast as Unet + resnet18 on one CPU thread
TINY = [a for kv in ("arch=FPN", "encoder=mobilenet_v2", "batch_size=2", "crop_size=64", "n_folds=3",
                     "val_batch_size=2", "plot_chips=1", "experiment=nb", "steps_per_epoch=1",
                     "precision=fp32") for a in ("--set", kv)]
SUSPECTS = ("tr01", "tr04", "not_in_this_split")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Six chips over three locations (two on a suspect list), a training run and a 2-trial study."""
    import mlflow

    tmp = tmp_path_factory.mktemp("nbstore")
    data = make_dataset(tmp / "data", n_chips=6)
    (data / "reference").mkdir()
    (data / "reference" / "suspect_label_ids.txt").write_text("\n".join(SUSPECTS) + "\n")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    space = tmp / "space.yaml"
    space.write_text("lr: {type: float, low: 0.0001, high: 0.01, log: true}\n"
                     "loss: {type: categorical, choices: [bce, '0.5*bce+0.5*dice']}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CLOUDSEG_MLARTIFACTS", str(tmp / "mlartifacts"))
        mp.setenv("CLOUDSEG_STATE_ROOT", str(tmp / "state"))
        mlflow.set_tracking_uri(uri)
        try:
            assert train_script.main(["--data", str(data), *TINY, "--set", "epochs=2"]) == 0
            assert sweep_script.main(["--study", "nbstudy", "--n-trials", "2", "--storage", storage,
                                      "--space", str(space), "--data", str(data), *TINY,
                                      "--set", "epochs=1", "--set", "pruner=none"]) == 0
        finally:
            mlflow.set_tracking_uri(None)
    return {"tmp": tmp, "data": data, "uri": uri, "storage": storage}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel of the ``python3`` kernelspec, started in a scratch folder so notebooks write nothing here."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path_factory.mktemp("kernel_cwd")))
    yield km
    km.shutdown_kernel(now=True)


def _parameter_cell(nb) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def _defaults(source: str) -> dict:
    """Name -> literal value of each assignment in a parameter cell."""
    assigns = [node for node in ast.parse(source).body if isinstance(node, ast.Assign)]
    return {t.id: ast.literal_eval(node.value) for node in assigns for t in node.targets}


def execute(name: str, km, **overrides) -> nbformat.NotebookNode:
    """Run a notebook with its parameter cell replaced; a cell error raises nbclient's CellExecutionError."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = _parameter_cell(nb)
    params = _defaults(cell.source)
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise KeyError(f"{name} has no parameter(s) {unknown}; it has {sorted(params)}")
    params.update(overrides)
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(nb, km=km, kernel_name="python3", timeout=300, allow_errors=False)
    try:
        client.execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    assert _text(nb.cells[-1]).strip() == sys.executable, "the notebook ran in another interpreter"
    return nb


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _all_text(nb) -> str:
    return "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")


def _displayed(nb) -> str:
    """The plain-text form of every displayed object (tables)."""
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return "\n".join(o["data"].get("text/plain", "") for o in outputs
                     if o.output_type in ("display_data", "execute_result"))


def _pngs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [], f"{name}: cell {c.get('id')} has outputs; strip them before committing"
        assert c.execution_count is None, f"{name}: cell {c.get('id')} has an execution count"
        compile(c.source, f"{name}:{c.get('id')}", "exec")  # branches a test run skips must parse too
    assert nb.cells[0].cell_type == "markdown", f"{name}: the first cell says what the notebook answers"
    assert _parameter_cell(nb) is code[0], f"{name}: the parameter cell must be the first code cell"
    assert _defaults(code[0].source), f"{name}: the parameter cell assigns nothing"


def test_notebook_folder_holds_exactly_these():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.slow
def test_explore_data(store, kernel):
    nb = execute("01_explore_data.ipynb", kernel, DATA_DIR=str(store["data"]), GALLERY_CHIPS=4)
    text = _all_text(nb)
    assert "6 chips from 3 locations; pixels read for 6 chips; labels: yes" in text
    assert "3 locations, 6 scenes (location-dates)" in text
    fractions = [read_label(store["data"] / "train_labels" / f"tr{i:02d}.tif").mean() for i in range(6)]
    assert f"mean {np.mean(fractions):.3f}, median {np.median(fractions):.3f}" in text
    assert "2 of 6 chips are on the suspect list (3 ids in the list)" in text
    # chips per location, cloud fractions, band histograms, gallery, suspect chips beside their labels
    assert _pngs(nb) == 5


@pytest.mark.slow
def test_compare_runs_draws_the_study_from_its_storage(store, kernel):
    nb = execute("02_compare_runs.ipynb", kernel, TRACKING_URI=store["uri"], EXPERIMENT="nb", STUDY="nbstudy",
                 OPTUNA_STORAGE=store["storage"])
    text = _all_text(nb)
    assert "2 finished runs with best_val_jaccard in experiment 'nb', study 'nbstudy'" in text
    assert "study 'nbstudy' from sqlite:" in text and "2 trials {'COMPLETE': 2}" in text
    names = ("history", "param_importances", "parallel_coordinate", "intermediate_values")
    drawn = [n for n in names if re.search(rf"^{n}$", text, re.M)]
    assert "history" in drawn
    assert _pngs(nb) == 2 + len(drawn)  # metric vs params, learning curves, Optuna figures


@pytest.mark.slow
def test_compare_runs_shows_the_sweeps_logged_figures(store, kernel):
    nb = execute("02_compare_runs.ipynb", kernel, TRACKING_URI=store["uri"], EXPERIMENT="nb",
                 PARAMS=["lr", "loss", "epochs"])
    text = _all_text(nb)
    # the training run and the 2 trials; not the sweep parent
    assert "3 finished runs with best_val_jaccard in experiment 'nb' at" in text
    client = MlflowClient(store["uri"])
    runs = client.search_runs([client.get_experiment_by_name("nb").experiment_id])
    best = max((r for r in runs if "best_val_jaccard" in r.data.metrics),
               key=lambda r: r.data.metrics["best_val_jaccard"])
    value = best.data.metrics["best_val_jaccard"]
    assert f"best: run {best.info.run_id} with best_val_jaccard={value:.4f}" in text
    assert "study 'nbstudy': figures logged by sweep run" in text and "optuna/history.png" in text
    logged = [a for a in text.splitlines() if a.startswith("optuna/") and a.endswith(".png")]
    assert _pngs(nb) == 2 + len(logged)


@pytest.mark.slow
def test_error_analysis_of_the_latest_run(store, kernel):
    # EXPERIMENT=None: the experiment holding the newest finished run, here "nb"
    nb = execute("03_error_analysis.ipynb", kernel, TRACKING_URI=store["uri"], WORST=2)
    text = _all_text(nb)
    client = MlflowClient(store["uri"])
    runs = client.search_runs([client.get_experiment_by_name("nb").experiment_id],
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    latest = next(r for r in runs if r.data.tags["cloudseg.kind"] == "trial")
    assert f"run {latest.info.run_id} (trial," in text
    # the per-chip counts the run logged pool to the figure it logged
    assert f"pooled Jaccard = {latest.data.metrics['val_jaccard_at_threshold']:.6f}" in text
    assert "best threshold on these chips" in text
    assert re.search(r"2 chips: [\d,]+ false-positive and [\d,]+ false-negative pixels", text)
    # per-location bars, worst chips, threshold curve, and the false-positive shares when there are any
    assert _pngs(nb) in (3, 4)


@pytest.mark.slow
def test_error_analysis_of_a_predictions_folder(store, kernel, tmp_path):
    """Predictions = label plus a clear 40x40 corner block: every false positive is known by hand."""
    data, preds = store["data"], tmp_path / "predictions"
    fp = 0
    for i in range(6):
        label = read_label(data / "train_labels" / f"tr{i:02d}.tif")
        pred = label.copy()
        pred[:40, :40] = 1
        fp += int((pred & (1 - label)).sum())
        write_tif(preds / f"tr{i:02d}.tif", pred)
    expected = score_folders(preds, data / "train_labels").score()
    nb = execute("03_error_analysis.ipynb", kernel, PREDICTIONS_DIR=str(preds), DATA_DIR=str(data),
                 SPLIT="train", WORST=2)
    text = _all_text(nb)
    assert f"pooled Jaccard = {expected:.6f}" in text
    assert f"6 chips: {fp:,} false-positive and 0 false-negative pixels" in text
    # the fixture's ground is dark with NIR far above red: neither bright ground nor water
    shares = rf"bright ground\s+0\s+0\.0\s+water\s+0\s+0\.0\s+haze/other\s+{fp}\s+1\.0"
    assert re.search(shares, _displayed(nb))
    assert "no threshold curve" in text
