"""`make screenshots`: the README's MLflow UI pictures, from the demo's store, in a fresh headless Chromium.

    python scripts/screenshots.py [--out docs/images]

Run `make demo` first. The UI (`make ui`'s own command, on a free port) serves a throw-away copy of the store, so
nothing here writes to yours. The browser takes the README's path from the address `make ui` prints: the
experiments list -> the demo experiment's runs table (cloudseg's columns) with its sweep row opened on its trials
-> the chart view -> the registered model's champion version, and writes

    docs/images/mlflow-runs-view.png   the runs table: each sweep row's best score beside its best trial's recipe
    docs/images/mlflow-charts.png      the chart view of the same runs
    docs/images/mlflow-model.png       the `demo` model's champion version: its source run and description

Each step waits for what it shows, and the script fails naming the step that did not appear.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloudseg.paths import MLFLOW_DB  # noqa: E402

EXPERIMENT, MODEL = "demo", "demo"
WIDTH, HEIGHT = 1720, 760


def copy_store(src: Path, dst: Path) -> Path:
    """A consistent copy of a sqlite MLflow store (SQLite's backup API: safe while another process writes)."""
    if not src.is_file():
        raise SystemExit(f"error: no MLflow store at {src}: run `make demo` first")
    with sqlite3.connect(f"file:{src}?mode=ro", uri=True) as source, sqlite3.connect(dst) as copy:
        source.backup(copy)
    return dst


def step(name: str):
    print(f"[screenshots] {name}", flush=True)


def shoot(page, path: Path) -> None:
    page.wait_for_timeout(1500)  # charts and tables finish drawing after the data arrive
    page.screenshot(path=str(path))
    print(f"[screenshots] wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    p.add_argument("--store", type=Path, default=MLFLOW_DB, help="the sqlite MLflow store (default: mlflow.db)")
    args = p.parse_args(argv)
    from cloudseg.tracking import ui_session

    try:
        ui_session.check_browser()
    except ui_session.BrowserMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cloudseg-screenshots-") as tmp:
        store = copy_store(args.store, Path(tmp) / "mlflow.db")
        with ui_session.serve({"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}) as address, \
                ui_session.chromium(Path(tmp) / "profile", WIDTH, HEIGHT) as page:
            page.set_default_timeout(60_000)
            step(f"the address make ui prints: {address}")
            page.goto(address)
            page.get_by_role("link", name=EXPERIMENT, exact=True).wait_for()
            close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
            if close.count():  # MLflow's assistant opens beside everything on a first visit; a user closes it once
                close.first.click()
            page.get_by_role("button", name="Toggle sidebar").click()  # the table gets the width
            step(f"experiments list -> {EXPERIMENT}")
            page.get_by_role("link", name=EXPERIMENT, exact=True).click()
            page.wait_for_url(re.compile(r"/#/experiments/\d+/runs\?"))
            page.wait_for_selector("[role=columnheader][col-id='metrics.`best_val_jaccard`']")
            step("runs table -> the sweep's row, opened on its trials")
            sweep = page.locator(".ag-row", has_text=f"{EXPERIMENT}-worker0").first
            sweep.locator("[col-id='attributes.`Run Name`'] button").first.click()
            page.locator(".ag-row", has_text=f"{EXPERIMENT}-trial0").first.wait_for()
            shoot(page, args.out / "mlflow-runs-view.png")
            step("the chart view")
            page.locator("input[value=CHART]").locator("xpath=..").click(force=True)  # its icon takes the click
            page.get_by_placeholder("Search metric charts").fill("val_jaccard")  # the figures per epoch
            page.locator("canvas, svg.main-svg").first.wait_for()
            shoot(page, args.out / "mlflow-charts.png")
            step(f"Model registry -> {MODEL} -> its champion version")
            page.locator("a[href$='#/models']").first.click()  # the sidebar's Model registry
            page.wait_for_url(re.compile(r"#/models$"))
            try:  # a first visit shows MLflow's announcement of its registry UI; a user answers it once
                page.get_by_role("button", name="Try it now").click(timeout=5_000)
            except PlaywrightTimeout:
                pass
            page.locator(f"a[href$='#/models/{MODEL}']").first.click()
            champion = page.locator("tr, [role=row]", has_text="champion").first
            champion.get_by_role("link", name=re.compile(r"^Version \d+$")).click()
            page.get_by_text("Source run", exact=False).first.wait_for()
            shoot(page, args.out / "mlflow-model.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
