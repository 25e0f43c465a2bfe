"""The ``cloudseg`` command line. Each command imports its heavy modules lazily so ``--help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cloud segmentation of Sentinel-2 chips.")


@app.command()
def score(
    pred_dir: Path = typer.Argument(..., help="Folder of <chip_id>.tif predictions (0/1)."),
    label_dir: Path = typer.Argument(..., help="Folder of <chip_id>.tif labels."),
    by_chip: bool = typer.Option(False, "--by-chip", help="Print the Jaccard of each chip."),
    by_location: Optional[Path] = typer.Option(None, "--by-location", help="Metadata CSV: print per location."),
) -> None:
    """Score predictions with the competition metric (sum of intersections / sum of unions)."""
    import pandas as pd

    from cloudseg.metrics import score_folders

    acc = score_folders(pred_dir, label_dir)
    if by_chip:
        typer.echo(acc.per_chip().to_string(index=False, float_format=lambda v: f"{v:.6f}"))
    if by_location is not None:
        meta = pd.read_csv(by_location, dtype=str, keep_default_na=False)
        typer.echo(acc.by_location(meta).to_string(index=False, float_format=lambda v: f"{v:.6f}"))
    typer.echo(f"chips={len(acc)}")
    typer.echo(f"jaccard={acc.score():.10f}")


@app.command()
def validate(
    data: Path = typer.Argument(..., help="Folder in the competition layout."),
    split: str = typer.Option("train", help="Split prefix: train or test."),
) -> None:
    """Check every chip, label and metadata row of a split; list every problem found."""
    from cloudseg.data.validate import DatasetError, validate_split

    try:
        result = validate_split(data, split)
    except DatasetError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1)
    n_loc = result.metadata["location"].nunique()
    typer.echo(f"{data} [{split}]: {len(result.ids)} chips, {n_loc} locations, labels={result.has_labels}: ok")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
