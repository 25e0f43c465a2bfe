"""Cloud masks for scenes of any size: sliding 512x512 windows, blended, read and written window by window.

Input: a folder of ``B02.tif B03.tif B04.tif B08.tif`` (any size, one grid) or one 4-band GeoTIFF in that band
order; uint16 reflectance x 10,000 as in the competition data; 0 in every band is nodata. Output: a tiled (512),
deflate-compressed GeoTIFF on exactly the input's grid, uint8 1 = cloud / 0 = clear (or probability 0-100),
255 = nodata.

How it stays fast and flat in memory whatever the scene size:
    * windows are visited row by row; reader threads (each with its own file handles) read them ahead of the
      model, and windows that are nodata in every band are never sent to the model;
    * each window's probabilities are weighted by a raised-cosine taper over the overlap (the tapers of two
      neighbours sum to one, so there are no seams) and added to an accumulator one window tall and one scene
      wide; rows no later window can reach are finished, thresholded and written by a writer thread in
      512-row strips that match the output's tiles. Memory is O(window height x scene width).

The models, threshold and TTA come with the model reference, as in the submission's ``main.py``: a submission
folder or zip (``assets/inference.json``), or a list of cloudseg checkpoints (threshold: the mean of their
stored thresholds, as promote writes it). This module does not import MLflow: run ids and ``models:/`` URIs are
turned into such paths by ``cloudseg.tracking.models.resolve_model_ref``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from cloudseg.checkpoint import load_checkpoint, model_from_checkpoint
from cloudseg.data.io import BANDS
from cloudseg.data.transforms import Normalization

TILE = 512  # window side: the competition chips' size, which the models were trained on
NODATA = 255  # output value where the input is 0 in every band
DEFAULT_OVERLAP = 64  # pixels shared by neighbouring windows; 64 costs (512/448)^2 = 1.31x the forwards
DEFAULT_BATCH = 8  # windows per forward when the reference does not say
DEFAULT_TTA = "flip"  # as main.py's default
# GDAL's block cache (decoded tiles of every open file). Its default, 5% of RAM, lets RSS grow with the scene up
# to GBs; two rows of input tiles (what overlapping windows re-read) need ~90 MB at 10,980 pixels wide.
GDAL_CACHE_BYTES = 128 * 2**20
TTA_VIEWS = {"none": [()], "hflip": [(), (-1,)], "flip": [(), (-1,), (-2,)], "flip4": [(), (-1,), (-2,), (-2, -1)]}
TTA_CHOICES = (*TTA_VIEWS, "d4")


class PredictError(ValueError):
    """Bad input or model reference; the message names the file or value and what to do."""


# ------------------------------------------------------------------------------------------------------ models

@dataclass
class Member:
    """One model of the ensemble, its bands (positions in the read stack) and its normalisation."""

    model: torch.nn.Module
    band_index: list[int]
    norm: Normalization
    classes: int


@dataclass
class Ensemble:
    """The models of a reference with the decisions that come with it (threshold, TTA, batch, precision)."""

    members: list[Member]
    bands: list[str]  # union of the members' bands, in reading order
    threshold: float
    tta: str = DEFAULT_TTA
    batch_size: int = DEFAULT_BATCH
    amp: bool = False  # fp16 autocast, CUDA only (as main.py's inference.json "amp")
    sources: list[str] = field(default_factory=list)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present and a tiny kernel runs on it, else CPU (saying why); ``cuda`` on a GPU this torch
    build cannot drive is refused with the GPU, the build and the fix (``cloudseg.devices.resolve_device``)."""
    from cloudseg.devices import DeviceError, resolve_device

    if name not in ("auto", "cpu", "cuda"):
        raise PredictError(f"--device {name!r}: use auto, cpu or cuda")
    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise PredictError(f"--device {name}: {exc}") from None


def load_ensemble(checkpoints: Sequence[Path | str], device: torch.device, threshold: float | None = None,
                  tta: str = DEFAULT_TTA, batch_size: int = DEFAULT_BATCH, amp: bool = False) -> Ensemble:
    """Rebuild every checkpoint's model on ``device``.

    Args:
        threshold: None: the mean of the checkpoints' stored thresholds (what promote writes for them).
    """
    if not checkpoints:
        raise PredictError("the model reference holds no checkpoint")
    if tta not in TTA_CHOICES:
        raise PredictError(f"tta {tta!r} is not one of {', '.join(TTA_CHOICES)}")
    loaded = []
    for path in checkpoints:
        try:
            loaded.append((Path(path), load_checkpoint(path)))
        except Exception as exc:  # missing, truncated, not a checkpoint
            raise PredictError(f"{path}: not a readable cloudseg checkpoint ({exc})") from exc
    bands: list[str] = []
    for _, ckpt in loaded:
        bands += [b for b in ckpt.get("bands") or BANDS if b not in bands]
    members = []
    for path, ckpt in loaded:
        try:
            model = model_from_checkpoint(ckpt).to(device)
        except Exception as exc:
            raise PredictError(f"{path}: cannot rebuild its model ({exc})") from exc
        norm = Normalization.from_dict(ckpt.get("normalization") or Normalization().to_dict())
        members.append(Member(model, [bands.index(b) for b in ckpt.get("bands") or BANDS], norm,
                              int(ckpt["model"].get("classes", 1))))
    if threshold is None:
        stored = [float(c["threshold"]) for _, c in loaded if c.get("threshold") is not None]
        threshold = sum(stored) / len(stored) if stored else 0.5
    return Ensemble(members, bands, float(threshold), tta, max(1, int(batch_size)), bool(amp),
                    [str(p) for p, _ in loaded])


def load_submission(ref: Path | str, device: torch.device, workdir: Path | str) -> Ensemble:
    """The ensemble of a submission folder or zip (``assets/inference.json``, else every ``assets/*.pt``).

    A zip's assets are extracted under ``workdir``.
    """
    ref = Path(ref)
    if ref.is_file():
        if not zipfile.is_zipfile(ref):
            raise PredictError(f"{ref}: not a readable zip file (a submission zip holds main.py and assets/)")
        folder = Path(workdir) / "submission"
        with zipfile.ZipFile(ref) as zf:
            names = [n for n in zf.namelist() if n.startswith("assets/") and ".." not in n]
            if not names:
                raise PredictError(f"{ref}: zip has no assets/ folder; not a cloudseg submission")
            zf.extractall(folder, names)
    elif ref.is_dir():
        folder = ref
    else:
        raise PredictError(f"{ref}: not a submission folder or zip")
    assets = folder / "assets"
    config: dict = {}
    if (assets / "inference.json").is_file():
        try:
            config = json.loads((assets / "inference.json").read_text())
        except ValueError as exc:
            raise PredictError(f"{ref}: assets/inference.json is not valid JSON ({exc})") from exc
        paths = [folder / rel for rel in config.get("models") or []]
    else:
        paths = sorted(assets.glob("*.pt"))
    if not paths:
        raise PredictError(f"{ref}: no model checkpoint in assets/ (expected assets/model_<k>.pt)")
    threshold = config.get("threshold")
    if threshold is None and paths:  # main.py: the first checkpoint's stored threshold
        threshold = _stored_threshold(paths[0])
    return load_ensemble(paths, device, threshold, str(config.get("tta") or DEFAULT_TTA),
                         int(config.get("batch_size") or DEFAULT_BATCH), bool(config.get("amp")))


def _stored_threshold(path: Path) -> float | None:
    try:
        return load_checkpoint(path).get("threshold")
    except Exception as exc:
        raise PredictError(f"{path}: not a readable cloudseg checkpoint ({exc})") from exc


def load_reference(ref: Path | str | Sequence[Path | str], device: torch.device, workdir: Path | str) -> Ensemble:
    """A submission folder or zip, one checkpoint file, or a list of checkpoints -> the ensemble."""
    if isinstance(ref, (list, tuple)):
        return load_ensemble(ref, device)
    ref = Path(ref)
    if ref.is_file() and ref.suffix != ".zip" and not _is_submission_zip(ref):
        return load_ensemble([ref], device)  # a checkpoint (torch.save writes zip archives too)
    if ref.exists():
        return load_submission(ref, device, workdir)
    raise PredictError(f"--model {ref}: no such submission folder, zip or checkpoint")


def _is_submission_zip(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.startswith("assets/") for n in zf.namelist())


def _views(name: str) -> list[tuple[Callable, Callable]]:
    """(forward, inverse) pairs for each TTA view."""
    if name == "d4":
        def rot(k: int, t: bool):
            def fwd(x):
                return torch.rot90(x.transpose(-1, -2) if t else x, k, dims=(-2, -1))

            def inv(y):
                y = torch.rot90(y, -k, dims=(-2, -1))
                return y.transpose(-1, -2) if t else y
            return fwd, inv
        return [rot(k, t) for t in (False, True) for k in range(4)]

    def flip(dims):
        def f(x):
            return x.flip(dims) if dims else x
        return f, f
    return [flip(d) for d in TTA_VIEWS[name]]


def forward_probabilities(ens: Ensemble, x: torch.Tensor, tta: str | None = None) -> torch.Tensor:
    """Mean cloud probability over models and TTA views.

    Args:
        x: raw reflectance x 10,000 in ``ens.bands`` order, on the models' device. Shape: (B, C, H, W) float32.

    Returns:
        Shape: (B, H, W) float32 in [0, 1].
    """
    views = _views(tta or ens.tta)
    total = None
    with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=ens.amp and x.is_cuda):
        for m in ens.members:
            xm = x[:, m.band_index] if m.band_index != list(range(x.shape[1])) else x
            mean = torch.tensor(m.norm.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(m.norm.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            xm = (torch.clamp(xm / m.norm.divisor, 0.0, m.norm.clip) - mean) / std
            for fwd, inv in views:
                logits = inv(m.model(fwd(xm)).float())
                p = torch.sigmoid(logits[:, 0]) if m.classes == 1 else torch.softmax(logits, 1)[:, 1]
                total = p if total is None else total + p
    return total / float(len(ens.members) * len(views))


# ------------------------------------------------------------------------------------------------------- input

@dataclass(frozen=True)
class Grid:
    """Where a raster lies: size, CRS and transform."""

    width: int
    height: int
    crs: object
    transform: object


class Scene:
    """A scene opened for window reads: one file per band, or one multi-band file. Thread-safe (each reading
    thread gets its own GDAL handles)."""

    def __init__(self, path: Path | str, bands: Sequence[str] = BANDS):
        self.path = Path(path)
        self.bands = list(bands)
        if self.path.is_dir():
            self.files = [self.path / f"{b}.tif" for b in self.bands]
            missing = [f.name for f in self.files if not f.is_file()]
            if missing:
                raise PredictError(f"{self.path}: missing band file(s) {', '.join(missing)} (needs "
                                   f"{' '.join(b + '.tif' for b in self.bands)})")
            self.indexes = [[1] for _ in self.files]
        elif self.path.is_file():
            extra = [b for b in self.bands if b not in BANDS]
            if extra:
                raise PredictError(f"{self.path}: the model needs band(s) {', '.join(extra)} beyond a 4-band "
                                   f"file's {','.join(BANDS)}; give a folder of <band>.tif files instead")
            self.files = [self.path]
            self.indexes = [[BANDS.index(b) + 1 for b in self.bands]]
        else:
            raise PredictError(f"{self.path}: no such folder or file")
        self.grid = self._check()
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()

    def _open(self, path: Path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(path)
        except Exception as exc:  # rasterio raises several types for corrupt files
            raise PredictError(f"{path}: unreadable raster ({exc})") from exc

    def _check(self) -> Grid:
        grids = []
        self.block_rows: list[int] = []
        for path, idx in zip(self.files, self.indexes):
            with self._open(path) as src:
                want = 1 if self.path.is_dir() else len(BANDS)
                if src.count != want:
                    raise PredictError(f"{path}: {src.count} band(s), expected {want}"
                                       + ("" if want == 1 else f" in the order {','.join(BANDS)}"))
                bad = [d for d in src.dtypes if d != "uint16"]
                if bad:
                    raise PredictError(f"{path}: dtype {bad[0]}, expected uint16 reflectance x 10,000")
                grids.append((path, Grid(src.width, src.height, src.crs, src.transform)))
                self.block_rows.append(src.block_shapes[0][0])
        first_path, first = grids[0]
        for path, g in grids[1:]:
            if g != first:
                raise PredictError(f"bands are not on one grid: {path.name} is {g.width}x{g.height} "
                                   f"{g.crs} {tuple(g.transform)[:6]}, {first_path.name} is {first.width}x"
                                   f"{first.height} {first.crs} {tuple(first.transform)[:6]}")
        return first

    def _handle(self, i: int):
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if i not in handles:
            handles[i] = self._open(self.files[i])
            with self._lock:
                self._opened.append(handles[i])
        return handles[i]

    def read_file(self, i: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Raw reflectance of one window of file ``i`` (its bands among ``bands``).
        Shape: (len(indexes[i]), height, width) uint16."""
        try:
            return self._handle(i).read(self.indexes[i], window=Window(col, row, width, height))
        except rasterio.errors.RasterioIOError as exc:
            raise PredictError(f"{self.files[i]}: cannot read rows {row}-{row + height - 1} ({exc})") from exc

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Raw reflectance of one window. Shape: (len(bands), height, width) uint16."""
        parts = [self.read_file(i, row, col, height, width) for i in range(len(self.files))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def strip_rows(self) -> int:
        """Rows per whole-width read: TILE rounded up to the files' block height, so that strips start on block
        boundaries and no block is decoded twice (files with blocks over 2 x TILE rows: TILE, and GDAL's cache)."""
        bh = max(self.block_rows)
        return -(-TILE // bh) * bh if bh <= 2 * TILE else TILE

    def close(self) -> None:
        with self._lock:
            for h in self._opened:
                h.close()
            self._opened = []


# ---------------------------------------------------------------------------------------------------- windows

def window_starts(size: int, tile: int = TILE, overlap: int = DEFAULT_OVERLAP) -> list[int]:
    """Window origins along one axis: every ``tile - overlap`` pixels, the last flush with the edge."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def taper(tile: int = TILE, overlap: int = DEFAULT_OVERLAP) -> np.ndarray:
    """Blending weight of a window: raised cosine over ``overlap`` pixels at each side, 1 inside.

    Two neighbours' ramps sum to one across their shared band; every weight is > 0 so a window alone at the
    scene's edge still counts. Shape: (tile, tile) float32.
    """
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        ramp = np.sin(0.5 * math.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[tile - overlap:] = ramp[::-1]
    return np.outer(w, w).astype(np.float32)


@dataclass
class PredictStats:
    windows: int
    skipped: int  # nodata in every band: never sent to the model
    pixels: int  # scene pixels
    seconds: float  # first read to output closed (model loading excluded)

    @property
    def pixels_per_s(self) -> float:
        return self.pixels / max(self.seconds, 1e-9)


def _io_priority() -> None:
    """Reader and writer threads at nice 19 on CPU, so they fill the forward's gaps instead of stalling its
    OpenMP threads (per-thread nice on Linux; elsewhere nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _progress(total: int):
    from tqdm.auto import tqdm

    quiet = os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(os.environ.get("TQDM_DISABLE"))
    return tqdm(total=total, unit="win", desc="predict", disable=quiet, dynamic_ncols=True)


def _read_ahead(scene: Scene, windows: list[tuple[int, int]], io_nice: bool,
                ahead: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col, window reflectance) for each window, in the given (row-major) order.

    The scene is read once, in whole-width strips of ``scene.strip_rows`` rows, each band file by its own thread
    and handle, up to ``ahead`` strips beyond those the current window needs. Reading window by window instead
    decoded each input block up to four times (overlapping windows straddle blocks, and every reading thread had
    its own handles and so its own cached blocks). Windows are copied out of the strips, so a strip is freed once
    the windows are below it: memory holds ``ahead + 2`` strips at most.
    """
    g = scene.grid
    rows = scene.strip_rows
    n_strips = -(-g.height // rows)
    n_bands = len(scene.bands)
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"read{i}", initializer=_io_priority if io_nice else None)
             for i in range(len(scene.files))]
    strips: dict[int, list[Future]] = {}

    def request(k: int) -> None:
        if k < n_strips and k not in strips:
            r0 = k * rows
            strips[k] = [pool.submit(scene.read_file, i, r0, 0, min(rows, g.height - r0), g.width)
                         for i, pool in enumerate(pools)]

    def cut(r: int, c: int, h: int, w: int) -> np.ndarray:
        out = np.empty((n_bands, h, w), np.uint16)
        for k in range(r // rows, (r + h - 1) // rows + 1):
            top, bottom = max(r, k * rows), min(r + h, (k + 1) * rows)
            band = 0
            for fut in strips[k]:
                part = fut.result()
                out[band:band + part.shape[0], top - r:bottom - r] = part[:, top - k * rows:bottom - k * rows,
                                                                          c:c + w]
                band += part.shape[0]
        return out

    try:
        for r, c in windows:
            h, w = min(TILE, g.height - r), min(TILE, g.width - c)
            first, last = r // rows, (r + h - 1) // rows
            for k in [k for k in strips if k < first]:
                del strips[k]
            for k in range(first, last + 1 + ahead):
                request(k)
            yield r, c, cut(r, c, h, w)
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)


def _pad(x: np.ndarray) -> np.ndarray:
    """Mirror-pad a (C, h, w) window to (C, TILE, TILE) (scenes smaller than a window)."""
    h, w = x.shape[1:]
    if (h, w) == (TILE, TILE):
        return x
    return np.pad(x, ((0, 0), (0, TILE - h), (0, TILE - w)), mode="symmetric")


class _StripWriter:
    """Finished rows -> the output file in 512-row strips (whole tiles), on one writer thread."""

    def __init__(self, dst, width: int, height: int, io_nice: bool):
        self.dst, self.width, self.height = dst, width, height
        self.chunks: list[np.ndarray] = []
        self.start = 0  # first row held in chunks
        self.held = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="write", initializer=_io_priority if io_nice else None)
        self.last: Future | None = None

    def add(self, rows: np.ndarray) -> None:
        self.chunks.append(rows)
        self.held += rows.shape[0]
        if self.held >= TILE or self.start + self.held >= self.height:
            self._flush()

    def _flush(self) -> None:
        data = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        n = (data.shape[0] // TILE) * TILE if self.start + data.shape[0] < self.height else data.shape[0]
        strip, rest = data[:n], data[n:]
        if self.last is not None:
            self.last.result()  # one strip in flight at most: memory stays flat
        self.last = self.pool.submit(self.dst.write, strip, 1, window=Window(0, self.start, self.width, n))
        self.start += n
        self.chunks, self.held = ([rest] if rest.shape[0] else []), rest.shape[0]

    def close(self) -> None:
        if self.last is not None:
            self.last.result()
        self.pool.shutdown()


def check_out(input_path: Path | str, out: Path | str, files: Sequence[Path] = ()) -> None:
    """Refuse an ``--out`` that is a folder or would overwrite the input (its file, or one of its band ``files``).

    Raises:
        PredictError: naming the path and what to give instead.
    """
    input_path, out = Path(input_path), Path(out)
    inputs = {input_path.resolve(), *(Path(f).resolve() for f in files)}
    if out.resolve() in inputs:
        raise PredictError(f"--out {out} is the input {input_path if out.resolve() == input_path.resolve() else out}"
                           ": predict would overwrite what it reads; give a new file, e.g. --out cloud_mask.tif")
    if out.is_dir():
        raise PredictError(f"--out {out} is an existing folder: give the GeoTIFF file to write, e.g. "
                           f"--out {out / 'cloud_mask.tif'}")


def predict_scene(
    input_path: Path | str,
    ensemble: Ensemble,
    out: Path | str,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int | None = None,
    tta: str | None = None,
    probabilities: bool = False,
    device: torch.device | None = None,
) -> PredictStats:
    """Predict a scene window by window and write ``out`` on the input's grid.

    Args:
        input_path: folder of ``<band>.tif`` files, or one 4-band GeoTIFF (B02, B03, B04, B08).
        overlap: pixels shared by neighbouring windows, 0 <= overlap < 512 (blended with ``taper``).
        batch_size, tta: None: the ensemble's.
        probabilities: write the cloud probability x 100 (0-100) instead of the 0/1 mask.

    Raises:
        PredictError: bad input (missing band, grids differ, dtype) or arguments.
    """
    if not 0 <= overlap < TILE:
        raise PredictError(f"--overlap {overlap}: must be >= 0 and < {TILE}")
    tta = tta or ensemble.tta
    if tta not in TTA_CHOICES:
        raise PredictError(f"--tta {tta!r}: use one of {', '.join(TTA_CHOICES)}")
    batch_size = max(1, int(batch_size or ensemble.batch_size))
    device = device or next(ensemble.members[0].model.parameters()).device
    out = Path(out)
    check_out(input_path, out)
    scene = Scene(input_path, ensemble.bands)
    check_out(input_path, out, scene.files)
    g = scene.grid
    windows = [(r, c) for r in window_starts(g.height, TILE, overlap) for c in window_starts(g.width, TILE, overlap)]
    weight = taper(TILE, overlap)
    io_nice = device.type == "cpu"
    acc = np.zeros((TILE, g.width), np.float32)  # sum of weight x probability, rows [base, base + TILE)
    wsum = np.zeros((TILE, g.width), np.float32)
    valid = np.zeros((TILE, g.width), bool)
    base = 0

    profile = dict(driver="GTiff", width=g.width, height=g.height, count=1, dtype="uint8", crs=g.crs,
                   transform=g.transform, nodata=NODATA, tiled=True, blockxsize=TILE, blockysize=TILE,
                   compress="deflate", BIGTIFF="IF_SAFER")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    stats = PredictStats(len(windows), 0, g.width * g.height, 0.0)

    def finish(upto: int, writer: _StripWriter) -> None:
        """Rows [base, upto) are final: threshold them, hand them to the writer, shift the accumulator."""
        nonlocal base
        n = upto - base
        if n <= 0:
            return
        p = np.divide(acc[:n], np.maximum(wsum[:n], 1e-12, out=wsum[:n]), out=acc[:n])  # in place: rows done
        if probabilities:
            rows = np.round(np.multiply(p, 100, out=p)).astype(np.uint8)
        else:
            rows = (p >= ensemble.threshold).astype(np.uint8)
        rows[~valid[:n]] = NODATA
        writer.add(rows)
        for a in (acc, wsum, valid):
            a[:TILE - n] = a[n:].copy()
            a[TILE - n:] = 0
        base = upto

    def flush_batch(batch: list, writer: _StripWriter) -> None:
        """Forward a batch of (row, col, h, w, image or None, valid) and accumulate, in window order."""
        images = [b[4] for b in batch if b[4] is not None]
        probs = iter(())
        if images:
            x = torch.from_numpy(np.stack(images).astype(np.float32))
            if device.type == "cuda":
                x = x.pin_memory().to(device, non_blocking=True)
            probs = iter(forward_probabilities(ensemble, x, tta).cpu().numpy())
        for r, c, h, w, image, ok in batch:
            if r > base:
                finish(r, writer)
            valid[r - base:r - base + h, c:c + w] = ok
            if image is not None:
                p = next(probs)[:h, :w]
                acc[r - base:r - base + h, c:c + w] += weight[:h, :w] * p
                wsum[r - base:r - base + h, c:c + w] += weight[:h, :w]

    t0 = time.perf_counter()
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(tmp, "w", **profile) as dst, \
                _progress(len(windows)) as bar:
            writer = _StripWriter(dst, g.width, g.height, io_nice)
            try:
                batch: list = []
                n_images = 0
                for r, c, data in _read_ahead(scene, windows, io_nice):
                    ok = data.any(axis=0)
                    image = _pad(data) if ok.any() else None
                    stats.skipped += image is None
                    # a skipped window keeps no mask (all False) and a run of them is flushed at once,
                    # so mostly-nodata scenes hold no more than a batch either
                    batch.append((r, c, data.shape[1], data.shape[2], image, ok if image is not None else False))
                    n_images += image is not None
                    if n_images == batch_size or n_images == 0 or len(batch) >= 4 * batch_size:
                        flush_batch(batch, writer)
                        bar.update(len(batch))
                        batch, n_images = [], 0
                flush_batch(batch, writer)
                bar.update(len(batch))
                finish(g.height, writer)
            finally:
                writer.close()
        tmp.replace(out)
    finally:
        scene.close()
        if tmp.exists():
            tmp.unlink()
    stats.seconds = time.perf_counter() - t0
    return stats
