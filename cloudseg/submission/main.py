"""On Cloud N submission: predict a cloud mask for every test chip.

This file is copied unchanged into every submission as ``main.py``. It is self-contained and runs under the
competition runtime (Python 3.9, torch 1.8, segmentation-models-pytorch 0.2.1): it imports only numpy, torch,
segmentation_models_pytorch, rasterio (tifffile or PIL as fallbacks), PIL and the standard library, and opens no
network connection, except for models that read supplementary bands (below).

Contract:
    reads   $CLOUDSEG_ROOT/data/test_features/<chip_id>/B02.tif B03.tif B04.tif B08.tif (root: /codeexecution)
    writes  $CLOUDSEG_ROOT/predictions/<chip_id>.tif   512x512 uint8 {0, 1} TIFF (about 262 kB uncompressed)
    folders starting with '.' and plain files under test_features are not chips.

Assets, relative to this file's folder::

    assets/inference.json  {"models": ["assets/model_0.pt", ...],  # checkpoints; ensemble = mean probability
                            "threshold": 0.5,       # null or absent: the first checkpoint's stored threshold
                            "tta": "flip",          # none | hflip | flip (id+h+v) | flip4 (+hv) | d4
                            "batch_size": 8, "num_workers": 2,  # chips per forward; reader threads
                            "amp": false,           # fp16 autocast on CUDA only
                            "compression": null}    # PIL TIFF compression of predictions (null = none)
    assets/model_<k>.pt    {"model": {"arch", "encoder_name", "in_channels", "classes", "kwargs"},
                            "state_dict", "normalization": {"divisor", "clip", "mean", "std"},
                            "threshold", "bands": ["B02", "B03", "B04", "B08"], ...}

Supplementary bands: where a model reads bands the test chips do not have (e.g. B11, SCL), ``inference.json`` has
``"stac": {"url", "collection", "budget_s", "workers"}`` (``stac_bands.py`` lies beside this file). Each chip's
missing bands are then fetched from that STAC API (the only network the runtime allows; ``CLOUDSEG_STAC_URL``
overrides the URL), by the chip's bounds and its ``datetime`` in ``$CLOUDSEG_ROOT/data/test_metadata.csv``, on
``workers`` reader threads, each chip within ``budget_s`` seconds. Fallback: a band that cannot be had (no
metadata row, no matching item, the server failing or too slow) is filled with its training mean, i.e. the model
sees 0 after normalisation, the value it saw most; the chip still gets a prediction, its ``ERROR chip=`` line says
why, and the last lines list every chip that used the fallback.

Without inference.json every ``assets/*.pt`` is used with the defaults above. Each checkpoint's normalisation
(``(clip(x / divisor, 0, clip) - mean) / std`` per band) and band order are applied exactly as in training.

Pipeline: reader threads decode chips ahead of the model (bounded prefetch), the main thread runs batched
forwards (CUDA when it works, else CPU fp32 with all cores), writer threads save masks, so reading,
computing and writing overlap (on CPU the I/O threads run at nice 19, so they fill the forward's gaps rather
than stall its OpenMP threads). Progress lines (chips done, chips/s, projected time left) go to stdout; the
last line reports ``throughput chips_per_s=<x>`` measured from the first read to the last write (model
loading excluded).

Fallbacks for bad input; each chip with any problem gets exactly one line ``ERROR chip=<id> ...`` naming the
file(s), and one bad chip never stops the run:
    * a band file that is missing, unreadable, truncated, empty or not a TIFF is replaced, pixel by pixel, by
      the mean of the chip's readable bands (clouds are bright in all four bands, so brightness survives);
    * a band of the wrong shape (e.g. 511x512) is resized to 512x512 by nearest neighbour;
    * a band file with several layers contributes its first layer; non-finite values become 0;
    * a chip with no readable band gets an all-zero (clear) prediction;
    * a batch whose forward fails is retried chip by chip; a chip still failing gets an all-zero prediction;
    * a failed write is retried once.
Exit status 0 when every chip has a prediction file, 1 otherwise.
"""

import json
import os
import queue
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

# No hub downloads, ever: weights come only from assets/ (set before smp/timm are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHIP_SIZE = 512
DEFAULT_BANDS = ("B02", "B03", "B04", "B08")
DEFAULT_ROOT = "/codeexecution"
DEFAULTS = {"threshold": None, "tta": "flip", "batch_size": 8, "num_workers": 2, "amp": False,
            "compression": None}
LOG_EVERY_S = 30.0  # progress line at most this often...
LOG_EVERY_CHIPS = 500  # ...or after this many chips
HERE = Path(__file__).resolve().parent

_log_lock = threading.Lock()


def log(message: str) -> None:
    """Print one line to stdout at once (the runtime keeps stdout as the log); safe from any thread. A chip name
    that is not valid UTF-8 is shown with its odd bytes escaped instead of breaking the line."""
    line = message.encode("utf-8", "backslashreplace").decode("utf-8") + "\n"
    with _log_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return "%d:%02d:%02d" % (seconds // 3600, seconds % 3600 // 60, seconds % 60)


# ---------------------------------------------------------------------------------------------------- reading

def _read_rasterio(path: Path) -> np.ndarray:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if _utf8(path):
            with rasterio.open(str(path)) as src:
                return src.read()  # (bands, H, W)
        with open(path, "rb") as fh, rasterio.open(fh) as src:  # GDAL cannot open a name that is not UTF-8
            return src.read()


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:  # a folder name with bytes that are not UTF-8 (kept as surrogates by Python)
        return False


def _read_tifffile(path: Path) -> np.ndarray:
    import tifffile

    with open(path, "rb") as fh:  # a file object: any folder name, UTF-8 or not
        return np.asarray(tifffile.imread(fh))


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img)


def _pick_reader() -> Callable[[Path], np.ndarray]:
    for name, reader in (("rasterio", _read_rasterio), ("tifffile", _read_tifffile)):
        try:
            __import__(name)
            return reader
        except ImportError:
            continue
    return _read_pil


_read_file = _pick_reader()


def _reason(exc: BaseException) -> str:
    """First line of an exception's message, with its cause when the message only points there."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        detail = str(cause).strip().splitlines()[0]
        if detail not in text:
            text += " <- " + detail
    return text[:240]


def resize_nearest(band: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``size`` x ``size``. Shape: (H, W) -> (size, size)."""
    rows = (np.arange(size) * band.shape[0]) // size
    cols = (np.arange(size) * band.shape[1]) // size
    return band[rows[:, None], cols[None, :]]


def read_band(path: Path) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Read one band file as float32 512x512, repairing what can be repaired.

    Returns:
        (band, problem): band is None when nothing usable was read; problem is None when the file was clean,
        else a short text naming the file and what was done. Shape of band: (512, 512).
    """
    if not path.is_file():
        return None, "%s: missing" % path
    try:
        data = _read_file(path)
    except Exception as exc:  # truncated, corrupt or not a TIFF: the readers raise many types
        return None, "%s: unreadable (%s)" % (path, _reason(exc))
    problems = []
    data = np.asarray(data)
    if data.ndim == 3:
        if data.shape[0] != 1:
            problems.append("%d layers, first used" % data.shape[0])
        data = data[0]
    if data.ndim != 2 or data.size == 0:
        return None, "%s: no 2-D pixel data (shape %s)" % (path, tuple(data.shape))
    if data.shape != (CHIP_SIZE, CHIP_SIZE):
        problems.append("shape %dx%d resized to %dx%d" % (data.shape[0], data.shape[1], CHIP_SIZE, CHIP_SIZE))
        data = resize_nearest(data)
    band = data.astype(np.float32)
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(band).all():
        problems.append("non-finite values set to 0")
        band = np.nan_to_num(band, nan=0.0, posinf=0.0, neginf=0.0)
    return band, ("%s: %s" % (path, ", ".join(problems)) if problems else None)


def read_chip(folder: Path, bands: Sequence[str],
              supplement: Optional["Supplement"] = None) -> Tuple[Optional[np.ndarray], List[str]]:
    """Read a chip's bands as raw float32 reflectance x 10,000 with the fallbacks of the module docstring; with
    ``supplement``, its supplementary bands that the folder lacks are fetched (or filled: see the docstring).

    Returns:
        (image, problems): image is None when no band was readable. Shape of image: (len(bands), 512, 512).
    """
    arrays = []  # type: List[Optional[np.ndarray]]
    problems = []  # type: List[str]
    fetched = {}  # type: Dict[str, np.ndarray]
    if supplement is not None:
        lacking = [b for b in supplement.bands if b in bands and not (folder / (b + ".tif")).is_file()]
        if lacking:
            fetched = supplement.get(folder, lacking, problems)
    for name in bands:
        if name in fetched:
            arrays.append(fetched[name])
            continue
        band, problem = read_band(folder / (name + ".tif"))
        arrays.append(band)
        if problem:
            problems.append(problem)
    readable = [a for a in arrays if a is not None]
    if not readable:
        return None, problems
    if len(readable) < len(arrays):
        fill = np.mean(np.stack(readable), axis=0, dtype=np.float32)
        arrays = [a if a is not None else fill for a in arrays]
        problems.append("missing band(s) filled with the mean of the readable ones")
    return np.stack(arrays), problems


class Supplement(object):
    """Supplementary bands from a STAC API for chips that lack them (see the module docstring)."""

    def __init__(self, bands: Sequence[str], fill: Dict[str, float], stac: Dict[str, Any],
                 metadata_csv: Path) -> None:
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        import stac_bands

        self.module = stac_bands
        self.bands = list(bands)
        self.fill = dict(fill)  # band -> raw value used when the band cannot be had
        url = os.environ.get("CLOUDSEG_STAC_URL") or stac.get("url") or stac_bands.PLANETARY_COMPUTER
        self.fetcher = stac_bands.StacBands(url, stac.get("collection") or stac_bands.DEFAULT_COLLECTION,
                                            timeout_s=float(stac.get("timeout_s", 20.0)),
                                            retries=int(stac.get("retries", stac_bands.RETRIES)))
        self.budget_s = float(stac.get("budget_s", 60.0))
        self.workers = max(1, int(stac.get("workers", 8)))
        # a dead or unreachable API must not cost budget_s per chip for every chip: after this many chips in a
        # row fail, or once total_budget_s is spent on fetching, the remaining chips use the fallback at once
        self.max_failures_in_row = max(1, int(stac.get("max_failures_in_row", 16)))
        self.total_budget_s = float(stac.get("total_budget_s", 2 * 3600.0))
        self.started = time.time()
        self.in_row = 0
        self.gave_up = None  # type: Optional[str]
        self.times = {}  # type: Dict[str, str]
        self.metadata_problem = None  # type: Optional[str]
        if metadata_csv.is_file():
            import csv

            with open(str(metadata_csv), newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if row.get("chip_id") and row.get("datetime"):
                        self.times[row["chip_id"]] = row["datetime"]
        else:
            self.metadata_problem = "no %s: no chip can be matched to an acquisition" % metadata_csv
        self.lock = threading.Lock()
        self.fetched, self.fallback = 0, []  # type: int, List[str]
        self.seconds = 0.0

    def describe(self) -> str:
        return ("stac url=%s collection=%s bands=%s budget_s=%.0f workers=%d metadata_rows=%d"
                % (self.fetcher.url, self.fetcher.collection, ",".join(self.bands), self.budget_s, self.workers,
                   len(self.times)))

    def get(self, folder: Path, bands: Sequence[str], problems: List[str]) -> Dict[str, np.ndarray]:
        """The chip's ``bands`` as float32 (fetched, else filled); appends what went wrong to ``problems``."""
        t = time.time()
        chip = folder.name
        try:
            if self.metadata_problem or self.gave_up:
                raise self.module.FetchError(self.metadata_problem or self.gave_up)
            if time.time() - self.started > self.total_budget_s:
                with self.lock:
                    self._give_up("the STAC time budget of %.0f s for the run is spent" % self.total_budget_s)
                raise self.module.FetchError(self.gave_up)
            if chip not in self.times:
                raise self.module.FetchError("no datetime for the chip in test_metadata.csv")
            grid = self.module.chip_grid(folder / (DEFAULT_BANDS[0] + ".tif"))
            when = self.module.parse_time(self.times[chip])
            arrays, _ = self.module.run_with_budget(lambda: self.fetcher.fetch(grid, when, bands), self.budget_s)
            out = {b: arrays[b].astype(np.float32) for b in bands}
            with self.lock:
                self.fetched += 1
                self.in_row = 0
                self.seconds += time.time() - t
            return out
        except Exception as exc:  # FetchError, or anything else: the chip still gets a prediction
            problems.append("%s: STAC fetch failed (%s); filled with the training mean (fallback)"
                            % (",".join(bands), _reason(exc)))
            with self.lock:
                self.fallback.append(chip)
                self.seconds += time.time() - t
                self.in_row += 1
                if self.in_row >= self.max_failures_in_row and not (self.gave_up or self.metadata_problem):
                    self._give_up("%d chips in a row failed to fetch" % self.in_row)
            return {b: np.full((CHIP_SIZE, CHIP_SIZE), self.fill.get(b, 0.0), dtype=np.float32) for b in bands}

    def _give_up(self, why: str) -> None:
        """Stop fetching: every later chip uses the fallback at once (logged once)."""
        if not self.gave_up:
            self.gave_up = "STAC given up: %s" % why
            log("ERROR %s; the remaining chips use the fallback" % self.gave_up)

    def report(self) -> None:
        log("stac fetched=%d fallback=%d seconds_per_chip=%.3f"
            % (self.fetched, len(self.fallback), self.seconds / max(self.fetched + len(self.fallback), 1)))
        if self.fallback:
            log("stac fallback chips (%d): %s" % (len(self.fallback), " ".join(sorted(self.fallback))))


def band_fill(members: Sequence["Member"], bands: Sequence[str]) -> Dict[str, float]:
    """Each band's training mean in raw units (mean x divisor), from the first model that reads it."""
    fill = {}
    for k, name in enumerate(bands):
        for m in members:
            if k in m.band_index:
                pos = m.band_index.index(k)
                fill[name] = float(m.mean.view(-1)[pos].item()) * m.divisor
                break
    return fill


def list_chips(features: Path) -> List[str]:
    """Chip ids: the sub-folders of ``features`` whose names do not start with '.', sorted."""
    return sorted(p.name for p in features.iterdir() if p.is_dir() and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------- models

class Member(object):
    """One model of the ensemble with the input it expects."""

    def __init__(self, path: Path, model: torch.nn.Module, band_index: List[int],
                 normalization: Dict[str, Any], classes: int, device: torch.device) -> None:
        self.path = path
        self.model = model
        self.band_index = band_index  # positions of this model's bands in the chip tensor
        self.divisor = float(normalization.get("divisor", 10000.0))
        self.clip = float(normalization.get("clip", 2.0))
        n = len(band_index)
        self.mean = torch.tensor([float(v) for v in normalization.get("mean", [0.0] * n)],
                                 dtype=torch.float32, device=device).view(1, n, 1, 1)
        self.std = torch.tensor([float(v) for v in normalization.get("std", [1.0] * n)],
                                dtype=torch.float32, device=device).view(1, n, 1, 1)
        self.classes = classes

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly the training normalisation, in float32. Shape: (B, C_all, H, W) -> (B, C_model, H, W)."""
        if self.band_index != list(range(x.shape[1])):
            x = x[:, self.band_index]
        x = torch.clamp(x / self.divisor, 0.0, self.clip)
        return (x - self.mean) / self.std


def _smp_class(arch: str) -> Callable[..., torch.nn.Module]:
    import segmentation_models_pytorch as smp

    names = [n for n in dir(smp)
             if isinstance(getattr(smp, n), type) and issubclass(getattr(smp, n), torch.nn.Module)]
    for n in names:
        if n.lower() == arch.lower():
            return getattr(smp, n)
    raise ValueError("architecture %r is not in segmentation_models_pytorch %s; it has %s"
                     % (arch, getattr(smp, "__version__", "?"), sorted(names)))


def load_inference_config(base: Path = HERE) -> Dict[str, Any]:
    """Read ``assets/inference.json`` (or default to every ``assets/*.pt``), filling defaults."""
    path = base / "assets" / "inference.json"
    config = dict(DEFAULTS)
    if path.is_file():
        with open(str(path)) as fh:
            config.update(json.load(fh))
    else:
        config["models"] = [str(p.relative_to(base)) for p in sorted((base / "assets").glob("*.pt"))]
        log("no %s: using %d checkpoint(s) found in assets/" % (path, len(config["models"])))
    if not config.get("models"):
        raise FileNotFoundError("no model checkpoint listed in %s and none found in %s"
                                % (path, base / "assets"))
    return config


def set_static_paddings(model: torch.nn.Module, paddings: Dict[str, List[int]], path: Path) -> None:
    """The "same" paddings the weights were trained with (EfficientNet encoders): this smp version may compute
    some differently from its nominal image size (cloudseg.checkpoint.static_paddings)."""
    modules = dict(model.named_modules())
    for name, pad in paddings.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "static_padding"):
            raise RuntimeError("%s: a static padding is recorded for %r, which this model does not have" % (path, name))
        module.static_padding = torch.nn.ZeroPad2d(tuple(pad)) if any(pad) else torch.nn.Identity()


def load_members(config: Dict[str, Any], device: torch.device,
                 base: Path = HERE) -> Tuple[List[Member], List[str], float]:
    """Rebuild each checkpoint's model on ``device`` in eval mode.

    Returns:
        (members, bands, threshold): the models, the union of their bands in reading order, and the threshold
        (inference.json's, else the first checkpoint's, else 0.5).
    """
    loaded = []
    bands = []  # type: List[str]
    for rel in config["models"]:
        path = (base / rel).resolve()
        if not path.is_file():
            raise FileNotFoundError("checkpoint %s listed in inference.json does not exist" % path)
        ckpt = torch.load(str(path), map_location="cpu")
        if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
            raise ValueError("%s is not a cloudseg checkpoint (needs 'model' and 'state_dict')" % path)
        for b in ckpt.get("bands") or DEFAULT_BANDS:
            if b not in bands:
                bands.append(b)
        loaded.append((path, ckpt))
    members = []
    for path, ckpt in loaded:
        args = dict(ckpt["model"])
        in_channels = int(args.get("in_channels", 4))
        classes = int(args.get("classes", 1))
        kwargs = dict(args.get("kwargs") or {})
        model = _smp_class(args["arch"])(encoder_name=args["encoder_name"], encoder_weights=None,
                                         in_channels=in_channels, classes=classes, **kwargs)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise RuntimeError("%s: weights do not fit %s/%s under this smp version: %s"
                               % (path, args["arch"], args["encoder_name"], str(exc)[:500]))
        set_static_paddings(model, ckpt.get("static_padding") or {}, path)
        model_bands = list(ckpt.get("bands") or DEFAULT_BANDS)
        if len(model_bands) != in_channels:
            raise ValueError("%s: %d bands %s but in_channels=%d"
                             % (path, len(model_bands), model_bands, in_channels))
        model.to(device).eval()
        members.append(Member(path, model, [bands.index(b) for b in model_bands],
                              dict(ckpt.get("normalization") or {}), classes, device))
    threshold = config.get("threshold")
    if threshold is None:
        threshold = loaded[0][1].get("threshold", 0.5)
    return members, bands, float(0.5 if threshold is None else threshold)


# -------------------------------------------------------------------------------------------------- inference

View = Tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _rot(k: int, transpose: bool) -> View:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if transpose:
            x = x.transpose(-1, -2)
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    def inverse(y: torch.Tensor) -> torch.Tensor:
        y = torch.rot90(y, -k, dims=(-2, -1)) if k else y
        return y.transpose(-1, -2) if transpose else y

    return forward, inverse


def _flip(dims: Tuple[int, ...]) -> View:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.flip(dims) if dims else x

    return f, f


def tta_views(name: str) -> List[View]:
    """(forward, inverse) pairs for test-time augmentation: none, hflip, flip (id+h+v), flip4 (+hv), d4."""
    table = {
        "none": [()],
        "hflip": [(), (-1,)],
        "flip": [(), (-1,), (-2,)],
        "flip4": [(), (-1,), (-2,), (-2, -1)],
    }
    if name in table:
        return [_flip(d) for d in table[name]]
    if name == "d4":
        return [_rot(k, t) for t in (False, True) for k in range(4)]
    raise ValueError("unknown tta %r in inference.json; use one of %s" % (name, sorted(table) + ["d4"]))


def predict_probabilities(members: Sequence[Member], x: torch.Tensor, views: Sequence[View],
                          amp: bool = False) -> torch.Tensor:
    """Mean cloud probability over models and TTA views.

    Args:
        x: raw reflectance x 10,000 on the models' device. Shape: (B, C, H, W) float32.

    Returns:
        Shape: (B, H, W) float32 in [0, 1].
    """
    total = None
    use_amp = bool(amp) and x.is_cuda
    with torch.no_grad():
        for m in members:
            xm = m.normalize(x)
            for forward, inverse in views:
                if use_amp:
                    with torch.cuda.amp.autocast():
                        logits = m.model(forward(xm))
                else:  # no autocast context at all: newer torch warns that torch.cuda.amp is deprecated
                    logits = m.model(forward(xm))
                logits = inverse(logits.float())
                p = torch.sigmoid(logits[:, 0]) if m.classes == 1 else torch.softmax(logits, dim=1)[:, 1]
                total = p if total is None else total + p
    return total / float(len(members) * len(views))


def predict_masks(members: Sequence[Member], x: torch.Tensor, views: Sequence[View], threshold: float,
                  amp: bool = False) -> np.ndarray:
    """Binary masks (1 = cloud where probability >= threshold). Shape: (B, C, H, W) -> (B, H, W) uint8."""
    probs = predict_probabilities(members, x, views, amp)
    return (probs >= threshold).to(torch.uint8).cpu().numpy()


def background_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux nice values are per thread).

    On CPU the forward's OpenMP threads occupy every core; a reader or writer thread that preempts one of them
    stalls the whole parallel region, which costs far more than the read itself. At nice 19 the I/O threads
    run in the gaps instead. Elsewhere (no per-thread nice, or not allowed) this does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pick_device() -> torch.device:
    """CUDA when present and working (a tiny kernel runs), else CPU. ``CLOUDSEG_DEVICE`` overrides."""
    forced = os.environ.get("CLOUDSEG_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        try:
            (torch.ones(2, device="cuda") * 2).sum().item()
            return torch.device("cuda")
        except Exception as exc:  # e.g. a GPU this torch build has no kernels for
            log("CUDA present but unusable (%s): running on CPU" % _reason(exc))
    return torch.device("cpu")


def configure_torch(device: torch.device) -> int:
    """Thread and kernel settings; returns torch's intra-op thread count.

    CPU: all available cores (``CLOUDSEG_TORCH_THREADS`` overrides) since the forward dominates. CUDA: cuDNN
    deterministic with fixed algorithms so a prediction does not depend on its batch.
    """
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("CLOUDSEG_TORCH_THREADS") or available_cpus()))
    else:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------------- writing

def write_prediction(path: Path, mask: np.ndarray, compression: Optional[str] = None) -> None:
    """Write a uint8 {0, 1} mask as a single-page TIFF that PIL opens; atomic (temporary name + rename)."""
    from PIL import Image

    tmp = path.with_name("." + path.name + ".partial")
    kwargs = {"compression": compression} if compression else {}
    try:
        Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(str(tmp), format="TIFF", **kwargs)
        os.replace(str(tmp), str(path))
    finally:
        if tmp.exists():  # a failed write leaves no stray file for the runtime's "extra files" check
            tmp.unlink()


# --------------------------------------------------------------------------------------------------- pipeline

class Batch(NamedTuple):
    """Chips read together: every chip has an id and a list of problems; only readable ones are in ``x``."""

    ids: List[str]
    problems: List[List[str]]  # per chip, appended to until its prediction is written
    good: List[int]  # positions (in ids) of the chips stacked in x
    x: Optional[torch.Tensor]  # raw reflectance (len(good), C, 512, 512) float32; None when none readable


def safe_read(folder: Path, bands: Sequence[str],
              supplement: Optional[Supplement] = None) -> Tuple[Optional[np.ndarray], List[str]]:
    """``read_chip`` that never raises: a reader bug must not cost more than this chip."""
    try:
        return read_chip(folder, bands, supplement)
    except Exception as exc:
        return None, ["%s: unexpected read failure (%r)" % (folder, exc)]


def make_batch(items: List[Tuple[str, Optional[np.ndarray], List[str]]], pin: bool) -> Batch:
    """Stack the readable images of ``(chip, image, problems)`` items (pinned for a fast copy to CUDA)."""
    good = [i for i, (_, image, _) in enumerate(items) if image is not None]
    x = None
    if good:
        x = torch.from_numpy(np.stack([items[i][1] for i in good]))
        if pin:
            x = x.pin_memory()
    return Batch([c for c, _, _ in items], [p for _, _, p in items], good, x)


def read_batches(features: Path, chips: Sequence[str], bands: Sequence[str], batch_size: int,
                 num_workers: int, io_init: Optional[Callable[[], None]],
                 supplement: Optional[Supplement] = None) -> Iterator[List[tuple]]:
    """``(chip, image, problems)`` items in chip order, ``batch_size`` at a time (the last may be shorter).

    ``num_workers`` threads read up to ``max(2 * batch_size, 2 * num_workers)`` chips ahead of the batch in
    assembly, so the next batch is mostly decoded when the model asks for it.
    """
    ahead = max(2 * batch_size, 2 * num_workers)
    with ThreadPoolExecutor(num_workers, thread_name_prefix="read", initializer=io_init) as readers:
        window = deque(readers.submit(safe_read, features / c, bands, supplement) for c in chips[:ahead])
        items = []  # type: List[tuple]
        for i, chip in enumerate(chips):
            image, problems = window.popleft().result()
            if i + ahead < len(chips):
                window.append(readers.submit(safe_read, features / chips[i + ahead], bands, supplement))
            items.append((chip, image, problems))
            if len(items) == batch_size or i == len(chips) - 1:
                yield items
                items = []


class BatchReader(object):
    """Reads batches on a producer thread, at most 3 ahead of the model; ``get()`` is None after the last."""

    def __init__(self, features: Path, chips: Sequence[str], bands: Sequence[str], batch_size: int,
                 num_workers: int, pin: bool, io_nice: bool, supplement: Optional[Supplement] = None) -> None:
        self.queue = queue.Queue(maxsize=3)  # type: queue.Queue
        self.error = None  # type: Optional[BaseException]
        args = (features, chips, bands, batch_size, num_workers, pin, io_nice, supplement)
        self.thread = threading.Thread(target=self._produce, args=args, name="producer", daemon=True)
        self.thread.start()

    def _produce(self, features: Path, chips: Sequence[str], bands: Sequence[str], batch_size: int,
                 num_workers: int, pin: bool, io_nice: bool, supplement: Optional[Supplement]) -> None:
        try:
            if io_nice:
                background_priority()
            io_init = background_priority if io_nice else None
            for items in read_batches(features, chips, bands, batch_size, num_workers, io_init, supplement):
                self.queue.put(make_batch(items, pin))
        except BaseException as exc:
            self.error = exc
        finally:
            self.queue.put(None)

    def get(self) -> Optional[Batch]:
        return self.queue.get()


def predict_batch(batch: Batch, members: Sequence[Member], views: Sequence[View], threshold: float, amp: bool,
                  device: torch.device) -> List[np.ndarray]:
    """One mask per chip of ``batch``; all-zero (with a problem noted) where a chip has no usable prediction.

    A batch whose forward fails (e.g. out of memory) is retried chip by chip. Shape of each mask: (512, 512).
    """
    masks = [np.zeros((CHIP_SIZE, CHIP_SIZE), dtype=np.uint8) for _ in batch.ids]
    for i, problems in enumerate(batch.problems):
        if i not in batch.good:
            problems.append("no readable band: all-zero prediction")
    if batch.x is None:
        return masks
    failed = None
    try:
        out = predict_masks(members, batch.x.to(device, non_blocking=True), views, threshold, amp)
        for j, i in enumerate(batch.good):
            masks[i] = out[j]
    except Exception as exc:
        failed = _reason(exc)
    if failed is None:
        return masks
    # Retried here, after the except block: inside it the exception's traceback still holds the failed forward's
    # frames and their tensors, so a CUDA out-of-memory would find the memory it ran out of still taken.
    log("batch of %d chips failed (%s): retrying chip by chip" % (len(batch.good), failed))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for j, i in enumerate(batch.good):
        try:
            masks[i] = predict_masks(members, batch.x[j:j + 1].to(device), views, threshold, amp)[0]
        except Exception as exc2:
            batch.problems[i].append("model failed (%s): all-zero prediction" % _reason(exc2))
    return masks


def save_prediction(path: Path, mask: np.ndarray, compression: Optional[str]) -> Optional[str]:
    """``write_prediction`` with one retry (transient I/O errors); returns the problem when both fail."""
    try:
        try:
            write_prediction(path, mask, compression)
        except Exception:
            write_prediction(path, mask, compression)
    except Exception as exc:
        return "%s: write failed (%r)" % (path, exc)
    return None


class Progress(object):
    """Counts written chips and logs progress lines (chips, chips/s, time left) from any thread."""

    def __init__(self, total: int, start: float) -> None:
        self.total, self.start, self.done = total, start, 0
        self.last_time, self.last_done = start, 0
        self.lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            now = time.time()
            due = (now - self.last_time >= LOG_EVERY_S or self.done - self.last_done >= LOG_EVERY_CHIPS
                   or self.done == self.total or self.last_done == 0)
            if due:
                self.last_time, self.last_done = now, self.done
                elapsed = max(now - self.start, 1e-9)
                rate = self.done / elapsed
                left = (self.total - self.done) / rate if rate > 0 else float("nan")
                log("progress chips=%d/%d (%.1f%%) chips_per_s=%.2f elapsed=%s eta=%s"
                    % (self.done, self.total, 100.0 * self.done / max(self.total, 1), rate, _fmt_s(elapsed),
                       _fmt_s(left) if left == left else "?"))


class PredictionWriter(object):
    """Writes masks on 2 threads, bounded backlog; logs each chip's problems once, then counts it done."""

    def __init__(self, out_dir: Path, compression: Optional[str], backlog: int, progress: Progress,
                 io_init: Optional[Callable[[], None]]) -> None:
        self.out_dir, self.compression, self.progress = out_dir, compression, progress
        self.slots = threading.BoundedSemaphore(backlog)  # bounds masks held in memory for a writer
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="write", initializer=io_init)
        self.failed = []  # type: List[str]

    def submit(self, chip: str, mask: np.ndarray, problems: List[str]) -> float:
        """Queue one chip's mask; returns the seconds spent waiting for room in the backlog."""
        t = time.time()
        self.slots.acquire()
        waited = time.time() - t
        self.pool.submit(self._write, chip, mask, problems)
        return waited

    def _write(self, chip: str, mask: np.ndarray, problems: List[str]) -> None:
        try:
            failure = save_prediction(self.out_dir / (chip + ".tif"), mask, self.compression)
        finally:
            self.slots.release()
        if failure:
            problems = problems + [failure]
            self.failed.append(chip)
        if problems:
            log("ERROR chip=%s %s" % (chip, "; ".join(problems)))
        self.progress.add()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True)


def report_done(chips: Sequence[str], out_dir: Path, seconds: float, failed_writes: int,
                timings: Dict[str, float]) -> List[str]:
    """Log the summary and throughput lines; returns the chips without a prediction file."""
    missing = [c for c in chips if not (out_dir / (c + ".tif")).is_file()]
    log("done chips=%d predictions=%d missing=%d write_failures=%d seconds=%.1f compute_s=%.1f "
        "wait_input_s=%.1f wait_output_s=%.1f"
        % (len(chips), len(chips) - len(missing), len(missing), failed_writes, seconds, timings["compute"],
           timings["wait_input"], timings["wait_output"]))
    log("throughput chips_per_s=%.4f chips=%d seconds=%.3f"
        % (len(chips) / max(seconds, 1e-9), len(chips), seconds))
    if missing:
        log("ERROR %d chip(s) have no prediction, e.g. %s" % (len(missing), missing[:10]))
    return missing


def run(root: Path, base: Path = HERE) -> int:
    """Predict every chip of ``root/data/test_features`` into ``root/predictions``; returns the exit code."""
    features, out_dir = root / "data" / "test_features", root / "predictions"
    if not features.is_dir():
        log("ERROR features folder %s does not exist" % features)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_inference_config(base)
    device = pick_device()
    threads = configure_torch(device)
    t_load = time.time()
    members, bands, threshold = load_members(config, device, base)
    views = tta_views(str(config["tta"]))
    batch_size = max(1, int(config["batch_size"]))
    num_workers = max(1, int(config["num_workers"]))
    amp = bool(config.get("amp")) and device.type == "cuda"
    chips = list_chips(features)
    supplement = None
    extra = [b for b in bands if b not in DEFAULT_BANDS]
    if extra:
        supplement = Supplement(extra, band_fill(members, bands), dict(config.get("stac") or {}),
                                root / "data" / "test_metadata.csv")
        num_workers = max(num_workers, supplement.workers)  # readers mostly wait on the network
        log(supplement.describe())
        if supplement.metadata_problem:
            log("ERROR %s" % supplement.metadata_problem)
    log("models=%d [%s] bands=%s tta=%s(%d views) threshold=%.4f batch_size=%d readers=%d device=%s amp=%s "
        "torch_threads=%d load_s=%.1f torch=%s"
        % (len(members), ", ".join(m.path.name for m in members), ",".join(bands), config["tta"], len(views),
           threshold, batch_size, num_workers, device, amp, threads, time.time() - t_load, torch.__version__))
    log("start chips=%d features=%s predictions=%s" % (len(chips), features, out_dir))
    if not chips:
        log("no chip folders in %s: nothing to do" % features)
        return 0

    # see background_priority; on GPU the cores are free for I/O anyway. CLOUDSEG_IO_NICE=0 turns it off.
    io_nice = device.type == "cpu" and os.environ.get("CLOUDSEG_IO_NICE", "1") != "0"
    t0 = time.time()
    reader = BatchReader(features, chips, bands, batch_size, num_workers, device.type == "cuda", io_nice, supplement)
    # Where the model's thread spends its time: waiting for input or for writers means the pipeline, not the
    # model, limits the speed.
    timings = {"wait_input": 0.0, "compute": 0.0, "wait_output": 0.0}
    progress = Progress(len(chips), t0)
    with PredictionWriter(out_dir, config.get("compression") or None, 4 * batch_size, progress,
                          background_priority if io_nice else None) as writer:
        while True:
            t = time.time()
            batch = reader.get()
            timings["wait_input"] += time.time() - t
            if batch is None:
                break
            t = time.time()
            masks = predict_batch(batch, members, views, threshold, amp, device)
            timings["compute"] += time.time() - t
            for chip, mask, problems in zip(batch.ids, masks, batch.problems):
                timings["wait_output"] += writer.submit(chip, mask, problems)
    reader.thread.join()
    seconds = time.time() - t0
    if reader.error is not None:
        log("ERROR reading pipeline stopped: %r" % (reader.error,))
    if supplement is not None:
        supplement.report()
    return 1 if report_done(chips, out_dir, seconds, len(writer.failed), timings) else 0


def main() -> int:
    root = Path(os.environ.get("CLOUDSEG_ROOT") or DEFAULT_ROOT)
    try:
        return run(root)
    except Exception as exc:  # model/asset problems: fail loudly with the reason on stdout
        import traceback

        log("ERROR run failed: %r" % (exc,))
        log(traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main())
