"""Download On Cloud N chips (from the dataset's ``final`` folder or a mirror) into the competition layout.

The source is a base URL (or folder) holding::

    public/train_metadata.csv   public/train_features/<chip>/<band>.tif   public/train_labels/<chip>.tif
    private/test_metadata.csv   private/test_features/<chip>/<band>.tif   private/test_labels/<chip>.tif

Every file is derived from the metadata's chip ids (nothing is listed), fetched with fsspec (aiohttp
underneath) by a pool of threads, written to a hidden ``.<name>.part`` beside its final name and renamed only
once its size matches what the server reported and rasterio reads it as a 512x512 single-band TIF. A re-run
skips complete files.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
from fsspec.callbacks import Callback

from cloudseg.data.io import BANDS, CHIP_SIZE, ChipReadError, read_band

DEFAULT_SOURCE = "https://data.source.coop/radiantearth/cloud-cover-detection-challenge/final"
SPLITS = {"train": "public", "test": "private"}  # split -> folder of the source that holds it
RETRIES = 5  # attempts after the first, per file, on timeouts, resets, 5xx and short bodies
BACKOFF_S = 0.5  # first retry delay; doubles each attempt (0.5, 1, 2, 4, 8 s), with up to 25% jitter
CONNECT_TIMEOUT_S = 30
READ_TIMEOUT_S = 60  # between two reads of a body: a stalled server counts as a timeout
DRY_RUN_EXACT_FILES = 2000  # a dry run asks the size of every file up to this many, else of a sample
DRY_RUN_SAMPLE = 100
MANIFEST = "download.json"


class DownloadUsageError(ValueError):
    """A bad argument (URL, split, location, destination, number). The CLI exits with status 2."""


class SourceError(RuntimeError):
    """The source cannot be reached or does not hold the dataset. The message names the URL."""


class DownloadError(RuntimeError):
    """Some chips could not be downloaded; the others completed. ``result`` says which."""

    def __init__(self, message: str, result: DownloadResult):
        super().__init__(message)
        self.result = result


class _Stopped(Exception):
    """Raised inside a transfer when the run is being stopped (Ctrl-C or an unreachable server)."""


class _Incomplete(Exception):
    """The body ended short of the size the server reported, or the file is not a readable chip."""


@dataclass(frozen=True)
class FileTask:
    split: str
    chip_id: str
    remote: str
    local: Path


@dataclass
class SplitReport:
    """What one split of a run chose and did; goes into ``download.json``."""

    chips: int = 0
    files: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes: int = 0  # on disk, of the chosen files that are complete
    bytes_downloaded: int = 0
    complete_chips: list[str] = field(default_factory=list)
    missing_chips: dict[str, list[str]] = field(default_factory=dict)  # chip -> files absent on the server
    failed: dict[str, str] = field(default_factory=dict)  # remote file -> last error


@dataclass
class DownloadResult:
    dest: Path
    source: str
    splits: dict[str, SplitReport]

    @property
    def ok(self) -> bool:
        return all(not r.missing_chips and not r.failed for r in self.splits.values())


@dataclass
class DryRunReport:
    chips: dict[str, int]
    locations: dict[str, int]
    files: dict[str, int]
    bytes: int | None  # None: the server reports no size
    estimated_from: int | None = None  # number of files the byte figure was extrapolated from


# ----------------------------------------------------------------------------------------------- source


def open_source(source: str):
    """The fsspec filesystem and base path for ``source`` (http(s) URL, ``file://`` URL or a folder).

    Raises:
        DownloadUsageError: the URL is malformed, uses another scheme, or the folder does not exist.
    """
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise DownloadUsageError(f"--source {source!r} is not a valid URL (no host)")
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        # trust_env: honour HTTP(S)_PROXY / NO_PROXY like other download tools do. identity: a gzipped body
        # would not match the Content-Length the size check compares against.
        fs = HTTPFileSystem(client_kwargs={"timeout": timeout, "trust_env": True}, skip_instance_cache=True,
                            headers={"Accept-Encoding": "identity"})
        return fs, source.rstrip("/")
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
    elif parts.scheme == "" or len(parts.scheme) == 1:  # a plain path (len 1: a Windows drive letter)
        path = Path(source).expanduser()
    else:
        raise DownloadUsageError(f"--source {source!r}: unsupported scheme '{parts.scheme}'; give an "
                                 "http(s):// URL, a file:// URL or a folder")
    if not path.is_dir():
        raise DownloadUsageError(f"--source {source!r}: folder {path} does not exist")
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(path.resolve())


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: timeouts, refused or reset connections, 5xx/408/429, bodies cut short."""
    if isinstance(exc, _Incomplete):
        return True
    if isinstance(exc, FileNotFoundError):  # fsspec's info() wraps what made HEAD and GET fail
        return exc.__cause__ is not None and _is_transient(exc.__cause__)
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - only local sources then
        aiohttp = None
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientResponseError):
            return exc.status >= 500 or exc.status in (408, 429)
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    return isinstance(exc, (TimeoutError, ConnectionError))


def _is_unreachable(exc: BaseException) -> bool:
    """The server itself is gone (not one file): stop the run rather than retry every file."""
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        return _is_unreachable(exc.__cause__)
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectorError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, ConnectionRefusedError)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None:
        text = f"{text} ({cause or type(cause).__name__})"
    return text.splitlines()[0] if text else type(exc).__name__


def _retrying(call, stop: threading.Event | None = None, retries: int | None = None):
    """``call()`` with exponential backoff on transient errors; the last error propagates."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == retries or not _is_transient(exc):
                raise
            delay = BACKOFF_S * 2**attempt * (1 + 0.25 * random.random())
            if stop is not None and stop.wait(delay):
                raise _Stopped() from exc
            if stop is None:
                time.sleep(delay)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_remote_metadata(fs, base: str, split: str) -> pd.DataFrame:
    """The source's ``<split>_metadata.csv`` as strings.

    Raises:
        SourceError: unreachable after retries, or not there (the URL is named).
    """
    url = _join(base, SPLITS[split], f"{split}_metadata.csv")
    try:
        raw = _retrying(lambda: fs.cat_file(url))
    except FileNotFoundError as exc:
        if _is_transient(exc):
            raise SourceError(f"cannot reach {url}: {_describe(exc)}") from exc
        raise SourceError(f"{url} not found: --source must be the folder holding public/ and private/ "
                          f"(default {DEFAULT_SOURCE})") from exc
    except Exception as exc:
        raise SourceError(f"cannot reach {url}: {_describe(exc)}") from exc
    try:
        meta = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise SourceError(f"{url}: not a readable CSV ({exc})") from exc
    missing = [c for c in ("chip_id", "location") if c not in meta.columns]
    if missing:
        raise SourceError(f"{url}: missing column(s) {missing}")
    return meta


# -------------------------------------------------------------------------------------------- selection


def select_chips(meta: pd.DataFrame, locations: list[str] | None = None, max_chips: int | None = None,
                 seed: int = 0) -> pd.DataFrame:
    """The chips to fetch: rows of ``locations`` (all if None), then at most ``max_chips`` of them.

    The sample is stratified by location: each location's chips are shuffled (seeded), each chip gets the key
    ``(rank + 0.5) / chips in its location``, and the lowest keys win, so every location contributes in
    proportion to its size, the same seed gives the same chips, and a larger N only adds chips. The server's
    row order is kept.
    """
    if locations is not None:
        meta = meta[meta["location"].isin(locations)]
    if max_chips is None or max_chips >= len(meta):
        return meta
    shuffled = meta.sample(frac=1.0, random_state=seed)
    groups = shuffled.groupby("location", sort=False)
    key = (groups.cumcount() + 0.5) / groups["location"].transform("size")
    chosen = key.sort_values(kind="stable").index[:max_chips]
    return meta.loc[meta.index.isin(chosen)]


def parse_locations(text: str | None, known: set[str]) -> list[str] | None:
    """``A,B`` -> ["A", "B"], checked against the locations the source's metadata has.

    Raises:
        DownloadUsageError: naming the unknown locations and listing the valid ones.
    """
    if text is None:
        return None
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    if not wanted:
        raise DownloadUsageError(f"--locations {text!r} names no location")
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise DownloadUsageError(f"--locations: unknown location(s) {', '.join(unknown)}; valid: "
                                 f"{', '.join(sorted(known))}")
    return wanted


def file_tasks(base: str, dest: Path, split: str, chip_ids: list[str]) -> list[FileTask]:
    """Every file of the chosen chips (four bands and the label), remote and local."""
    folder = SPLITS[split]
    tasks = []
    for chip in chip_ids:
        for band in BANDS:
            tasks.append(FileTask(split, chip, _join(base, folder, f"{split}_features", chip, f"{band}.tif"),
                                  dest / f"{split}_features" / chip / f"{band}.tif"))
        tasks.append(FileTask(split, chip, _join(base, folder, f"{split}_labels", f"{chip}.tif"),
                              dest / f"{split}_labels" / f"{chip}.tif"))
    return tasks


# ---------------------------------------------------------------------------------------------- transfer


class _ByteCounter(Callback):
    """fsspec callback: records the size the server announced, counts bytes, aborts when the run stops."""

    def __init__(self, stop: threading.Event, on_bytes):
        super().__init__()
        self.stop, self.on_bytes, self.seen = stop, on_bytes, 0

    def relative_update(self, inc: int = 1) -> None:
        if self.stop.is_set():
            raise _Stopped()
        self.seen += inc
        self.on_bytes(inc)


def _check_chip_file(path: Path, decode: bool) -> None:
    """Raise ChipReadError unless ``path`` is a one-band CHIP_SIZE-square TIF (decoded fully if asked)."""
    if decode:
        arr = read_band(path)
        shape = arr.shape
    else:
        import rasterio

        try:
            with rasterio.open(path) as src:
                shape, count = (src.height, src.width), src.count
        except Exception as exc:
            raise ChipReadError(f"{path}: unreadable TIF ({exc})") from exc
        if count != 1:
            raise ChipReadError(f"{path}: expected 1 band, found {count}")
    if shape != (CHIP_SIZE, CHIP_SIZE):
        raise ChipReadError(f"{path}: {shape[0]}x{shape[1]}, expected {CHIP_SIZE}x{CHIP_SIZE}")


def _remote_size(fs, remote: str, stop: threading.Event) -> int | None:
    return _retrying(lambda: fs.info(remote).get("size"), stop)


def _is_complete(fs, task: FileTask, stop: threading.Event) -> bool:
    """An existing local file is kept when its size is the server's and it opens as a chip."""
    try:
        size = _remote_size(fs, task.remote, stop)
    except FileNotFoundError as exc:
        if _is_transient(exc):
            raise
        size = None  # gone from the server: keep the local copy if it decodes, never delete it
    if size is not None and task.local.stat().st_size != size:
        return False
    try:
        _check_chip_file(task.local, decode=size is None)  # without a size to compare, decode every pixel
    except ChipReadError:
        return False
    return True


def _fetch_once(fs, task: FileTask, tmp: Path, stop: threading.Event, on_bytes) -> int:
    counter = _ByteCounter(stop, on_bytes)
    with open(tmp, "wb") as out:
        fs.get_file(task.remote, out, callback=counter)
    actual = tmp.stat().st_size
    if counter.seen == 0:  # local sources copy without calling back
        on_bytes(actual)
    expected = counter.size if counter.size is not None else fs.info(task.remote).get("size")
    if expected is not None and actual != expected:
        raise _Incomplete(f"{task.remote}: got {actual} of {expected} bytes")
    try:
        _check_chip_file(tmp, decode=True)
    except ChipReadError as exc:
        raise _Incomplete(f"{task.remote}: {exc}") from exc
    return actual


def fetch_file(fs, task: FileTask, stop: threading.Event, on_bytes=lambda n: None) -> tuple[str, int, str]:
    """Make ``task.local`` a complete copy of ``task.remote``.

    Returns:
        (status, bytes, error): status ``skipped`` (already complete), ``downloaded``, ``missing`` (the server
        has no such file) or ``failed`` (``error`` says why); bytes is the file's size when complete.
    Raises:
        _Stopped: the run is stopping; nothing was left under the final name.
    """
    if stop.is_set():
        raise _Stopped()
    try:
        if task.local.is_file() and _is_complete(fs, task, stop):
            return "skipped", task.local.stat().st_size, ""
    except FileNotFoundError as exc:
        if not _is_transient(exc):
            return "missing", 0, _describe(exc)
        return "failed", 0, _describe(exc)
    except _Stopped:
        raise
    except Exception as exc:
        return "failed", 0, _describe(exc)
    task.local.parent.mkdir(parents=True, exist_ok=True)
    tmp = task.local.with_name(f".{task.local.name}.part")  # hidden: validate and chip listings ignore it
    try:
        size = _retrying(lambda: _fetch_once(fs, task, tmp, stop, on_bytes), stop)
        if stop.is_set():
            raise _Stopped()
        os.replace(tmp, task.local)
        return "downloaded", size, ""
    except FileNotFoundError as exc:
        return ("failed" if _is_transient(exc) else "missing"), 0, _describe(exc)
    except _Stopped:
        raise
    except Exception as exc:
        if _is_unreachable(exc):
            stop.set()  # every other file would fail the same way after its own retries
        return "failed", 0, _describe(exc)
    finally:
        tmp.unlink(missing_ok=True)


def _quiet() -> bool:
    truthy = ("1", "true", "yes")
    return os.environ.get("CI", "").lower() in truthy or os.environ.get("TQDM_DISABLE", "").lower() in truthy


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def run_tasks(fs, tasks: list[FileTask], workers: int) -> dict[FileTask, tuple[str, int, str]]:
    """Fetch ``tasks`` in ``workers`` threads under one progress bar (files, bytes, rate, ETA).

    On Ctrl-C every transfer stops at its next chunk, partial files are removed and KeyboardInterrupt is
    re-raised.
    """
    from tqdm.auto import tqdm

    stop = threading.Event()
    lock = threading.Lock()
    moved = [0]
    start = time.monotonic()

    def on_bytes(n: int) -> None:
        with lock:
            moved[0] += n

    results: dict[FileTask, tuple[str, int, str]] = {}
    bar = tqdm(total=len(tasks), unit="file", desc="download", disable=True if _quiet() else None,
               file=sys.stderr, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudseg-download")
    futures = {pool.submit(fetch_file, fs, t, stop, on_bytes): t for t in tasks}
    try:
        for fut in as_completed(futures):
            task = futures[fut]
            try:
                results[task] = fut.result()
            except _Stopped:
                results[task] = ("failed", 0, "stopped: the source became unreachable")
            bar.update(1)
            rate = moved[0] / max(time.monotonic() - start, 1e-6)
            bar.set_postfix_str(f"{human_bytes(moved[0])}, {human_bytes(rate)}/s", refresh=False)
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # transfers raise _Stopped and delete their .part files
        bar.close()
        raise
    pool.shutdown(wait=True)
    bar.close()
    return results


# ------------------------------------------------------------------------------------------------- driver


def check_dest(dest: Path, create: bool) -> None:
    """Raise DownloadUsageError unless ``dest`` is (or can be made) a writable folder."""
    if dest.exists() and not dest.is_dir():
        raise DownloadUsageError(f"--dest {dest} exists and is not a folder")
    if not create:
        probe = dest
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise DownloadUsageError(f"--dest {dest} is not writable ({probe} denies writing)")
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DownloadUsageError(f"--dest {dest} is not writable ({exc.strerror or exc})") from exc


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise DownloadUsageError(f"--workers {workers}: must be at least 1")


def _splits(split: str) -> list[str]:
    if split == "all":
        return list(SPLITS)
    if split not in SPLITS:
        raise DownloadUsageError(f"--split {split!r}: choose one of train, test, all")
    return [split]


def plan(source: str, split: str = "all", locations: str | None = None, max_chips: int | None = None,
         seed: int = 0):
    """Read the source's metadata and choose chips. Returns (fs, base, {split: chosen metadata rows}).

    ``max_chips`` applies to each split. Raises DownloadUsageError or SourceError.
    """
    splits = _splits(split)
    if max_chips is not None and max_chips < 1:
        raise DownloadUsageError(f"--max-chips {max_chips}: must be at least 1")
    fs, base = open_source(source)
    metas = {s: read_remote_metadata(fs, base, s) for s in splits}
    known = set().union(*(set(m["location"]) for m in metas.values()))
    wanted = parse_locations(locations, known)
    chosen = {s: select_chips(m, wanted, max_chips, seed) for s, m in metas.items()}
    return fs, base, chosen


def dry_run(source: str, split: str = "all", locations: str | None = None, max_chips: int | None = None,
            seed: int = 0, workers: int = 8, dest: Path | None = None) -> DryRunReport:
    """Count the chips, files and bytes a download would fetch; writes nothing."""
    _check_workers(workers)
    if dest is not None:
        check_dest(Path(dest), create=False)
    fs, base, chosen = plan(source, split, locations, max_chips, seed)
    tasks = [t for s, m in chosen.items() for t in file_tasks(base, Path("."), s, list(m["chip_id"]))]
    sample = tasks
    if len(tasks) > DRY_RUN_EXACT_FILES:
        sample = random.Random(seed).sample(tasks, DRY_RUN_SAMPLE)
    stop = threading.Event()
    sizes = []
    if sample:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            sizes = list(pool.map(lambda t: _safe_size(fs, t.remote, stop), sample))
    total = None
    if sizes and all(s is not None for s in sizes):
        total = round(sum(sizes) * len(tasks) / len(sample))
    elif not sizes:
        total = 0
    return DryRunReport(
        chips={s: len(m) for s, m in chosen.items()},
        locations={s: m["location"].nunique() for s, m in chosen.items()},
        files={s: sum(t.split == s for t in tasks) for s in chosen},
        bytes=total,
        estimated_from=len(sample) if sample is not tasks else None,
    )


def _safe_size(fs, remote: str, stop: threading.Event) -> int | None:
    try:
        return _remote_size(fs, remote, stop)
    except Exception:
        return None


def _previous_splits(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()).get("splits", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _drop_chip(dest: Path, split: str, chip: str) -> None:
    """Remove what this source cannot complete, so the folder stays a valid dataset of the other chips."""
    for band in BANDS:
        (dest / f"{split}_features" / chip / f"{band}.tif").unlink(missing_ok=True)
    folder = dest / f"{split}_features" / chip
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    (dest / f"{split}_labels" / f"{chip}.tif").unlink(missing_ok=True)


def download(dest: Path | str, source: str = DEFAULT_SOURCE, split: str = "all", locations: str | None = None,
             max_chips: int | None = None, seed: int = 0, workers: int = 8) -> DownloadResult:
    """Download the chosen chips into ``dest`` in the competition layout and write ``download.json``.

    ``<split>_metadata.csv`` lists the chosen chips whose files are all complete. Chips the server lacks are
    removed from ``dest``; files that failed for other reasons are fetched by the next run.

    Raises:
        DownloadUsageError: a bad argument. SourceError: metadata unreachable or absent.
        DownloadError: some chips are missing or failed (the others completed); ``.result`` has the details.
    """
    dest = Path(dest)
    _check_workers(workers)
    _splits(split)
    check_dest(dest, create=False)
    fs, base, chosen = plan(source, split, locations, max_chips, seed)
    check_dest(dest, create=True)
    tasks = [t for s, m in chosen.items() for t in file_tasks(base, dest, s, list(m["chip_id"]))]
    results = run_tasks(fs, tasks, workers)

    reports = {}
    for s, meta in chosen.items():
        rep = reports[s] = SplitReport(chips=len(meta), files=sum(t.split == s for t in tasks))
        if meta.empty:  # e.g. --locations of the other split only: leave this split out of dest
            continue
        by_chip: dict[str, list[tuple[FileTask, tuple[str, int, str]]]] = {}
        for t in tasks:
            if t.split == s:
                by_chip.setdefault(t.chip_id, []).append((t, results[t]))
        for chip, items in by_chip.items():
            statuses = {st for _, (st, _, _) in items}
            for t, (st, n, err) in items:
                rep.downloaded += st == "downloaded"
                rep.skipped += st == "skipped"
                rep.bytes_downloaded += n if st == "downloaded" else 0
                if st == "failed":
                    rep.failed[t.remote] = err
            if "missing" in statuses:
                rep.missing_chips[chip] = [t.remote for t, (st, _, _) in items if st == "missing"]
                _drop_chip(dest, s, chip)
            elif statuses <= {"downloaded", "skipped"}:
                rep.complete_chips.append(chip)
                rep.bytes += sum(n for _, (_, n, _) in items)
        keep = meta[meta["chip_id"].isin(rep.complete_chips)]
        _write_atomic(dest / f"{s}_metadata.csv", keep.to_csv(index=False))

    result = DownloadResult(dest, source, reports)
    from cloudseg import __version__

    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    selection = {"locations": locations, "max_chips": max_chips, "seed": seed}
    splits = _previous_splits(dest / MANIFEST)  # a run of one split keeps the other's record
    for s, r in reports.items():
        splits[s] = {"source": source, "date": date, "selection": selection, "chips": r.chips,
                     "complete_chips": len(r.complete_chips), "files": r.files, "downloaded": r.downloaded,
                     "skipped": r.skipped, "bytes": r.bytes, "bytes_downloaded": r.bytes_downloaded,
                     "missing_chips": r.missing_chips, "failed": r.failed}
    manifest = {
        "source": source,
        "date": date,
        "cloudseg_version": __version__,
        "complete": all(not v.get("missing_chips") and not v.get("failed") for v in splits.values()),
        "chips": sum(v.get("complete_chips", 0) for v in splits.values()),
        "bytes": sum(v.get("bytes", 0) for v in splits.values()),
        "splits": splits,
    }
    _write_atomic(dest / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if not result.ok:
        lines = []
        for s, r in reports.items():
            if r.missing_chips:
                lines.append(f"{s}: {len(r.missing_chips)} chip(s) missing on the server: "
                             f"{', '.join(sorted(r.missing_chips))} (first absent file: "
                             f"{next(iter(r.missing_chips.values()))[0]})")
            if r.failed:
                first = next(iter(r.failed.items()))
                lines.append(f"{s}: {len(r.failed)} file(s) failed, e.g. {first[0]}: {first[1]}; run again "
                             "to fetch the rest")
        raise DownloadError("; ".join(lines), result)
    return result
