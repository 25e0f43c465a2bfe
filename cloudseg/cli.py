"""The ``cloudseg`` command line. Each command imports its heavy modules lazily so ``--help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cloudseg.submission.zipcheck import GIB, ZipLimits

LIMITS = ZipLimits()  # verify-submission's defaults
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

    from cloudseg.metrics import EmptyUnionError, ScoreError, score_folders

    try:
        meta = None
        if by_location is not None:  # read first: a wrong file fails before every chip is read
            try:
                meta = pd.read_csv(by_location, dtype=str, keep_default_na=False)
            except (OSError, ValueError, pd.errors.ParserError) as exc:  # UnicodeDecodeError is a ValueError
                raise ScoreError(f"{by_location}: not a readable metadata CSV ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
            absent = [c for c in ("chip_id", "location") if c not in meta.columns]
            if absent:
                raise ScoreError(f"{by_location}: no {' or '.join(absent)} column (a metadata CSV has chip_id, "
                                 f"location, ...; found {', '.join(map(str, meta.columns[:6]))})")
        acc = score_folders(pred_dir, label_dir)
        total = acc.score()
        if by_chip:
            typer.echo(acc.per_chip().to_string(index=False, float_format=lambda v: f"{v:.6f}"))
        if meta is not None:
            try:
                table = acc.by_location(meta)
            except ValueError as exc:  # chip ids the metadata lacks
                raise ScoreError(f"{by_location}: {exc}") from exc
            typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.6f}"))
    except ScoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except EmptyUnionError as exc:
        typer.echo(f"error: {pred_dir} against {label_dir}: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"chips={len(acc)}")
    typer.echo(f"jaccard={total:.10f}")


@app.command()
def validate(
    data: Path = typer.Argument(..., help="Folder in the competition layout."),
    split: str = typer.Option("train", help="Split prefix: train or test."),
    deep: bool = typer.Option(False, "--deep", help="Decode every pixel (non-binary labels, damage inside a file); "
                              "by default each file's header and last pixel, in parallel, cached by the files."),
    bands: str = typer.Option("B02,B03,B04,B08", "--bands", help="Band files every chip must have (a model's "
                              "config key bands; supplementary ones come from `cloudseg add-bands`)."),
) -> None:
    """Check every chip, label and metadata row of a split; list every problem found."""
    from cloudseg.data.bands import parse_bands
    from cloudseg.data.validate import DatasetError, validate_split

    try:
        result = validate_split(data, split, deep=deep, bands=parse_bands(bands))
    except DatasetError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1)
    except ValueError as exc:  # a malformed --bands
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    n_loc = result.metadata["location"].nunique()
    typer.echo(f"{data} [{split}]: {len(result.ids)} chips, {n_loc} locations, labels={result.has_labels}, "
               f"bands {','.join(result.bands)}, {'every pixel' if deep else 'headers'} checked: ok")


@app.command("verify-submission")
def verify_submission_cmd(
    zip_path: Path = typer.Argument(..., help="Submission zip with main.py at its root."),
    features: Path = typer.Option(..., "--features", help="Folder of chip folders (the runtime's test_features)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of <chip_id>.tif labels: print Jaccard."),
    runtime: bool = typer.Option(False, "--runtime", help="Run main.py with .venv-runtime/bin/python."),
    python: Optional[Path] = typer.Option(None, "--python", help="Run main.py with this interpreter."),
    timeout: float = typer.Option(14400, "--timeout", help="Seconds main.py may run (the runtime allows 4 h)."),
    allow_network_check_skip: bool = typer.Option(
        False, "--allow-network-check-skip",
        help="Where no network namespace can be made (unshare -n), run with the weaker audit-hook check only."),
    max_unpacked_gb: float = typer.Option(
        LIMITS.max_unpacked_bytes / GIB, "--max-unpacked-gb", help="Refuse a zip that unpacks to more GiB (read "
        "from its directory, before unpacking). A real submission is far below: make real-best's six fp32 "
        "efficientnet-b4 checkpoints are about 0.45 GB."),
    max_files: int = typer.Option(LIMITS.max_files, "--max-files", help="Refuse a zip with more files (a "
                                  "promoted zip has 4 plus one per ensemble member)."),
    max_ratio: float = typer.Option(
        LIMITS.max_ratio, "--max-ratio", help="Refuse a zip whose members of 1 MiB or more (or whole) unpack to "
        "more than this many times their packed size: fp32 weights compress ~1.1x, sources ~4x, a zip bomb of "
        "zeros ~1,000x."),
) -> None:
    """Run a submission like the competition runtime (read-only data, no network, time limit) and check it."""
    from cloudseg.submission.verify import runtime_python, verify_submission

    if runtime and python is not None:
        typer.echo("give either --runtime or --python, not both", err=True)
        raise typer.Exit(2)
    if max_unpacked_gb <= 0 or max_files <= 0 or max_ratio <= 0:
        typer.echo("--max-unpacked-gb, --max-files and --max-ratio must be positive", err=True)
        raise typer.Exit(2)
    limits = ZipLimits(int(max_unpacked_gb * GIB), max_files, max_ratio)
    try:
        interpreter = runtime_python() if runtime else python
        result = verify_submission(zip_path, features, labels=labels, python=interpreter, timeout=timeout,
                                   echo=typer.echo, allow_network_check_skip=allow_network_check_skip,
                                   limits=limits)
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (verify.Interrupted)
        typer.echo(f"verify interrupted ({exc or 'Ctrl-C'}): main.py's sandbox was ended and verify's folders "
                   "removed", err=True)
        raise typer.Exit(130)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to create (competition layout)."),
    n: int = typer.Option(96, "--n", help="Training chips."),
    seed: int = typer.Option(0, "--seed", help="Chip i depends only on (seed, split, i)."),
    test: int = typer.Option(0, "--test", help="Labeled held-out test chips, from locations not in train."),
    locations: Optional[int] = typer.Option(None, "--locations", help="Train locations [default: n // 10]."),
    size: int = typer.Option(512, "--size", help="Chip height and width in pixels."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Processes [default: 1]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Write synthetic Sentinel-2 chips with cloud labels in the competition layout."""
    import time

    from cloudseg.data.synthetic import read_summary, write_synthetic

    start = time.perf_counter()
    try:
        path = write_synthetic(out, n, seed=seed, n_test=test, n_locations=locations, size=size,
                               overwrite=overwrite, workers=workers)
    except (FileExistsError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    elapsed = time.perf_counter() - start
    typer.echo(str(path))
    for split, info in read_summary(path)["splits"].items():
        typer.echo(
            f"{split}: {info['chips']} chips, {info['locations']} locations, mean cloud fraction "
            f"{info['mean_cloud_fraction']:.3f}, {info['clear_chips']} clear, "
            f"{info['cloudy_chips']} fully cloudy"
        )
    typer.echo(f"seconds={elapsed:.1f}")


@app.command()
def gallery(
    data: Path = typer.Option(..., "--data", help="Folder in the competition layout."),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    split: str = typer.Option("train", "--split", help="Split prefix: train or test."),
    n: int = typer.Option(12, "--n", help="Chips to show (the first of the metadata)."),
    ncols: int = typer.Option(6, "--ncols", help="Panels per row."),
) -> None:
    """Save a PNG of chips in natural colour with their cloud labels outlined."""
    from cloudseg.data.io import features_dir, labels_dir, load_metadata, read_chip, read_label
    from cloudseg.plots import chip_gallery

    meta = load_metadata(data, split).head(n)
    if meta.empty:
        typer.echo(f"error: {data} has no chips in split '{split}'", err=True)
        raise typer.Exit(1)
    images, labels, titles = [], [], []
    for row in meta.itertuples():
        images.append(read_chip(features_dir(data, split) / row.chip_id))
        label_path = labels_dir(data, split) / f"{row.chip_id}.tif"
        label = read_label(label_path) if label_path.is_file() else None
        labels.append(label)
        cloud = f" cloud {label.mean():.2f}" if label is not None else ""
        titles.append(f"{row.chip_id} {row.location}{cloud}")
    typer.echo(chip_gallery(images, labels, titles, out, ncols=ncols))


@app.command("audit-labels")
def audit_labels(
    data: Path = typer.Option(..., "--data", help="Labeled folder in the competition layout (train split)."),
    out: Path = typer.Option(Path("audit"), "--out", help="Folder for audit.csv and montage.png."),
    probs: Optional[Path] = typer.Option(None, "--probs", help="Out-of-fold probabilities (.npz, chip id -> HxW), "
                                         "e.g. experiments/bench_quality.py's oof_probs.npz."),
    checkpoint: Optional[list[Path]] = typer.Option(None, "--checkpoint", help="Fold checkpoint (repeatable); each "
                                                    "predicts the chips its config held out."),
    ukis: Optional[str] = typer.Option(None, "--ukis", help="Use the peer ukis-csmask's masks instead, e.g. l2a@30 "
                                       "(a model that never saw these labels; needs the bench extra)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Recipe YAML trained here, leave-one-location-out, "
                                          "when neither --probs, --checkpoint nor --ukis is given."),
    threshold: float = typer.Option(0.5, "--threshold", help="Decision threshold on the cloud probability."),
    top: int = typer.Option(10, "--top", help="Chips drawn in the montage, worst first."),
    exclude_out: Optional[Path] = typer.Option(None, "--exclude-out", help="Write the worst chips' ids here (config "
                                               "key exclude_ids accepts the file)."),
    exclude_top: int = typer.Option(5, "--exclude-top", help="How many of the worst chips go into --exclude-out."),
    suspects: Optional[Path] = typer.Option(None, "--suspects", help="Suspect-label ids to score the ranking against "
                                            "(default <data>/reference/suspect_label_ids.txt when present)."),
    threads: int = typer.Option(2, "--threads", help="torch threads when predicting or training."),
) -> None:
    """Rank labeled chips by disagreement between label and out-of-fold prediction; CSV, montage, exclusions."""
    import numpy as np

    from cloudseg import audit
    from cloudseg.data.splits import read_id_list
    from cloudseg.data.validate import validate_split

    split = validate_split(data, "train", labels=True, load=True)
    if probs is not None:
        p = audit.load_probs(probs)
    elif checkpoint:
        import torch

        torch.set_num_threads(threads)
        p = audit.probs_from_checkpoints(checkpoint, split)
    elif ukis:
        from cloudseg.baselines import UkisPeer

        level, _, res_m = ukis.partition("@")
        peer = UkisPeer(level, int(res_m or 30), threads=threads)
        p = {c: peer(split.images[c]).astype(np.float32) for c in split.ids}
    else:
        from cloudseg.config import load_config

        cfg = load_config(config, data=str(Path(data).resolve()))
        p = audit.probs_from_recipe(cfg, split, threads)
    from cloudseg.data.sources import suspect_list

    sus_path = suspects or suspect_list(data)
    sus = read_id_list(sus_path) if sus_path.is_file() else set()
    locations = dict(zip(split.metadata.index, split.metadata["location"].astype(str)))
    table = audit.disagreement_table(p, split.masks, threshold, locations, sus)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "audit.csv", index=False)
    audit.review_montage(table, split.images, split.masks, p, threshold, out / "montage.png", top)
    typer.echo(table.head(top).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {out / 'audit.csv'} and {out / 'montage.png'} ({len(table)} chips ranked)")
    if sus:
        ids = list(table["chip_id"])
        base = sum(c in sus for c in ids)
        for k in (5, 10):
            if k <= len(ids):
                typer.echo(f"precision@{k}={audit.precision_at_k(ids, sus, k):.2f} (base rate {base}/{len(ids)} = "
                           f"{base / len(ids):.2f})")
    if exclude_out is not None:
        ids = list(table["chip_id"].head(exclude_top))
        audit.write_exclusion(ids, exclude_out, f"cloudseg audit-labels: {exclude_top} chips whose label disagrees "
                              "most with the out-of-fold prediction")
        typer.echo(f"exclusion file: {exclude_out} ({len(ids)} ids)")


@app.command()
def predict(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="Folder of B02.tif B03.tif B04.tif B08.tif (any "
                                      "size, one grid), or one 4-band GeoTIFF in the band order B02,B03,B04,B08; "
                                      "uint16 reflectance x 10,000, 0 in every band = nodata."),
    model: str = typer.Option(..., "--model", help="Submission folder or zip (submissions/<name>[.zip]), a "
                              "checkpoint .pt, an MLflow run id (a cv run: its folds' ensemble), or "
                              "models:/<name>@<alias>."),
    out: Path = typer.Option(..., "--out", help="GeoTIFF to write on the input's grid: uint8 1 cloud, 0 clear, "
                             "255 nodata (tiled 512, deflate)."),
    overlap: int = typer.Option(64, "--overlap", help="Pixels shared by neighbouring 512x512 windows (blended)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward (default: the "
                                             "submission's, else 8)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="none, flip (or hflip, flip4, d4) (default: the "
                                      "submission's, else flip)."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Write the cloud probability 0-100."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Predict a cloud mask for a scene of any size with sliding, blended 512x512 windows."""
    import tempfile

    from cloudseg import predict as pr

    ref_path = Path(model)
    with tempfile.TemporaryDirectory(prefix="cloudseg-predict-") as tmp:
        try:
            pr.check_out(input_path, out)  # before the model loads
            dev = pr.pick_device(device)
            if ref_path.exists():
                ref = ref_path
            elif model.startswith("models:/") or len(model) == 32:
                from cloudseg.tracking.models import ModelRefError, resolve_model_ref

                try:
                    ref = resolve_model_ref(model, Path(tmp) / "ref")
                except ModelRefError as exc:
                    raise pr.PredictError(str(exc)) from exc
            else:
                raise pr.PredictError(f"--model {model}: no such submission folder, zip or checkpoint, and not an "
                                      "MLflow run id or models:/<name>@<alias>")
            ensemble = pr.load_reference(ref, dev, tmp)
            typer.echo(f"models={len(ensemble.members)} bands={','.join(ensemble.bands)} tta={tta or ensemble.tta} "
                       f"threshold={ensemble.threshold:.4f} device={dev}", err=True)
            stats = pr.predict_scene(input_path, ensemble, out, overlap=overlap, batch_size=batch_size, tta=tta,
                                     probabilities=probabilities, device=dev)
        except pr.PredictError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
    typer.echo(f"wrote {out} windows={stats.windows} skipped_nodata={stats.skipped}")
    typer.echo(f"throughput pixels_per_s={stats.pixels_per_s:.1f} pixels={stats.pixels} seconds={stats.seconds:.3f}")


@app.command("add-bands")
def add_bands_cmd(
    data: Path = typer.Option(..., "--data", help="Folder in the competition layout."),
    bands: str = typer.Option(..., "--bands", help="Supplementary bands to add, comma-separated (e.g. B11,SCL): "
                              "the collection's asset names."),
    split: str = typer.Option("train", "--split", help="train or test."),
    stac: Optional[str] = typer.Option(None, "--stac", help="STAC API root (default: the Planetary Computer's)."),
    collection: str = typer.Option("sentinel-2-l2a", "--collection", help="STAC collection to search."),
    workers: int = typer.Option(8, "--workers", help="Chips fetched at once."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds per HTTP request (default 30)."),
) -> None:
    """Write <chip>/<band>.tif beside each chip's four bands, from a STAC API (resumable; failures listed)."""
    from cloudseg.data import stac as st

    try:
        result = st.add_bands(data, bands, split, stac or st.PLANETARY_COMPUTER, collection, workers, timeout)
    except (st.AddBandsError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: written bands were kept; run again to resume", err=True)
        raise typer.Exit(130)
    typer.echo(f"{split}: {len(result.done)} chips written, {len(result.skipped)} already complete, "
               f"{len(result.failed)} failed; {result.seconds:.1f} s "
               f"({result.seconds_per_chip:.3f} s per chip written)")
    if result.failed:
        typer.echo(f"error: {len(result.failed)} chip(s) got no {bands}: listed with the reason in {result.report}; "
                   "run again to retry them", err=True)
        raise typer.Exit(1)


@app.command()
def download(
    dest: Path = typer.Option(..., "--dest", help="Folder to fill with the competition layout and download.json."),
    split: str = typer.Option("all", "--split", help="train, test or all."),
    source: Optional[str] = typer.Option(None, "--source", help="Base URL (or folder, file:// URL) holding public/ "
                                         "and private/ (default: Source Cooperative's radiantearth/"
                                         "cloud-cover-detection-challenge/final)."),
    locations: Optional[str] = typer.Option(None, "--locations", help="Only these locations, comma-separated."),
    max_chips: Optional[int] = typer.Option(None, "--max-chips", help="At most N chips per split, sampled by "
                                            "location in proportion (seeded)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --max-chips sample."),
    workers: int = typer.Option(8, "--workers", help="Parallel transfers."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print chips, files and bytes; fetch only the metadata."),
) -> None:
    """Download On Cloud N chips (or a mirror's) into the competition layout; a re-run resumes."""
    from cloudseg.data import download as dl

    source = source or dl.DEFAULT_SOURCE
    try:
        if dry_run:
            rep = dl.dry_run(source, split, locations, max_chips, seed, workers, dest=dest)
            for s in rep.chips:
                typer.echo(f"{s}: {rep.chips[s]} chips, {rep.locations[s]} locations, {rep.files[s]} files")
            if rep.bytes is None:
                size = "unknown"
            elif rep.estimated_from:
                size = f"unknown (about {dl.human_bytes(rep.bytes)}, estimated from {rep.estimated_from} files)"
            else:
                size = f"{rep.bytes} ({dl.human_bytes(rep.bytes)})"
            typer.echo(f"chips={sum(rep.chips.values())} files={sum(rep.files.values())} bytes={size}")
            return
        result = dl.download(dest, source, split, locations, max_chips, seed, workers)
    except dl.DownloadUsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except dl.SourceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    except dl.DownloadError as exc:
        result = exc.result
        typer.echo(f"error: {exc}", err=True)
    except KeyboardInterrupt:
        typer.echo("interrupted: complete files were kept, partial ones removed; run again to resume", err=True)
        raise typer.Exit(130)
    for s, r in result.splits.items():
        typer.echo(f"{s}: {len(r.complete_chips)}/{r.chips} chips complete, {r.downloaded} files downloaded, "
                   f"{r.skipped} already complete, {dl.human_bytes(r.bytes)}")
    typer.echo(f"wrote {dest / dl.MANIFEST}")
    raise typer.Exit(0 if result.ok else 1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
