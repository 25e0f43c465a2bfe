"""Checks on a submission zip made from its own directory, before anything is unpacked, and a bounded unpack.

A zip's central directory states each member's name, size unpacked and size packed. From it alone verify refuses a
zip that would land outside its folder, unpack to more than ``ZipLimits`` allow (a zip bomb), ship the folders the
runtime mounts itself (``data/``, ``predictions/``), or hold caches and secrets. Python sources are read in bounded
chunks (at most ``MAX_SOURCE_BYTES`` each) and checked for Python 3.9 grammar and runtime imports; code too odd to
check (nested so deep the parser gives up) is a failed check, never a crash.
"""

from __future__ import annotations

import ast
import re
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

GIB = 1 << 30
MAX_SOURCE_BYTES = 4 << 20  # 100x the main.py template (41 kB); a .py beyond it is not code a person wrote
RATIO_FROM_BYTES = 1 << 20  # tiny members compress arbitrarily well (an empty __init__.py): judge sizable ones
MOUNTED = ("data", "predictions")  # the runtime puts these beside main.py itself

# Top-level modules a submission may import: the runtime's packages (COMPETITION.md), the packages they pull
# in that code commonly imports, and the standard library.
RUNTIME_IMPORTS = frozenset({
    "numpy", "torch", "torchvision", "segmentation_models_pytorch", "timm", "pandas", "rasterio", "tifffile",
    "PIL", "sklearn", "skimage", "scipy", "albumentations", "ttach", "loguru", "typer", "tqdm",
    "pystac_client", "planetary_computer", "xarray", "stackstac", "pytorch_lightning", "efficientnet_pytorch",
    "pretrainedmodels", "cv2", "yaml", "affine", "click", "requests", "pystac",  # the last two: pystac-client's
})

_FORBIDDEN_PARTS = {"__pycache__", ".ipynb_checkpoints", ".git", ".env", ".netrc", ".pypirc", ".aws", ".ssh",
                    "id_rsa", "id_ed25519", "credentials", "credentials.json", ".mlflow", "mlruns"}
_FORBIDDEN_SUFFIXES = {".pyc", ".pyo", ".ipynb", ".pem", ".key", ".p12", ".pfx", ".db"}


@dataclass(frozen=True)
class ZipLimits:
    """What a submission zip may unpack to. The defaults sit far above a real submission: ``make real-best``'s
    zip holds six fp32 efficientnet-b4 checkpoints, about 0.45 GB that barely compress (ratio ~1.1); its sources
    compress about 4x. A zip bomb packs gigabytes of zeros into megabytes (ratio ~1,000)."""

    max_unpacked_bytes: int = 10 * GIB  # ~20x real-best's
    max_files: int = 10_000  # a promoted zip has 4 + one per ensemble member
    max_ratio: float = 100.0  # unpacked / packed, for members (and the whole) of at least RATIO_FROM_BYTES


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n:,} bytes"


def check_limits(infos: list[zipfile.ZipInfo], limits: ZipLimits) -> list[str]:
    """Size, count and compression-ratio problems of a zip, from its directory alone."""
    problems = []
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if len(infos) > limits.max_files:
        problems.append(f"{len(infos):,} files in the zip, over the limit of {limits.max_files:,} (--max-files)")
    if total > limits.max_unpacked_bytes:
        problems.append(f"the zip unpacks to {_size(total)}, over the limit of {_size(limits.max_unpacked_bytes)} "
                        "(--max-unpacked-gb)")
    ratios = [(i.file_size / max(i.compress_size, 1), i) for i in infos if i.file_size >= RATIO_FROM_BYTES]
    bombs = sorted((r for r in ratios if r[0] > limits.max_ratio), key=lambda r: -r[0])
    for ratio, info in bombs[:5]:
        problems.append(f"{info.filename}: {_size(info.file_size)} packed into {_size(info.compress_size)} (ratio "
                        f"{ratio:,.0f}, over the limit of {limits.max_ratio:g}: a zip bomb? --max-ratio)")
    if len(bombs) > 5:
        problems.append(f"... and {len(bombs) - 5} more members over the compression-ratio limit")
    whole = total / max(packed, 1)
    if not bombs and total >= RATIO_FROM_BYTES and whole > limits.max_ratio:
        problems.append(f"the zip's {_size(total)} are packed into {_size(packed)} (ratio {whole:,.0f}, over the "
                        f"limit of {limits.max_ratio:g}: a zip bomb? --max-ratio)")
    return problems


def check_sources(sources: dict[str, str]) -> list[str]:
    """Python files of a submission must parse as Python 3.9 and import only runtime packages or each other.

    Args:
        sources: relative path -> file text for every ``.py`` file of the submission.
    """
    local = {PurePosixPath(p).parts[0].removesuffix(".py") for p in sources}
    local |= {PurePosixPath(p).stem for p in sources}
    allowed = RUNTIME_IMPORTS | set(sys.stdlib_module_names) | local | {"__future__"}
    problems = []
    for name, text in sorted(sources.items()):
        try:
            tree = ast.parse(text, filename=name, feature_version=(3, 9))
            nodes = list(ast.walk(tree))
        except SyntaxError as exc:
            problems.append(f"{name}: does not parse as Python 3.9 (line {exc.lineno}: {exc.msg})")
            continue
        except Exception as exc:  # RecursionError, MemoryError: nesting deeper than the parser goes
            problems.append(f"{name}: cannot be checked ({type(exc).__name__}: {str(exc)[:200] or 'parser gave up'}"
                            "); the runtime's Python would likely fail on it too")
            continue
        for node in nodes:
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            for mod in mods:
                top = mod.split(".")[0]
                if top not in allowed:
                    problems.append(
                        f"{name}: line {node.lineno} imports {mod!r}, which the runtime does not have")
    return problems


def _read_source(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """The member's text, read in bounded chunks; None when it is (or turns out) over MAX_SOURCE_BYTES."""
    if info.file_size > MAX_SOURCE_BYTES:
        return None
    chunks, n = [], 0
    with zf.open(info) as fh:
        while n <= MAX_SOURCE_BYTES:
            chunk = fh.read(1 << 16)
            if not chunk:
                return b"".join(chunks).decode("utf-8", errors="replace")
            chunks.append(chunk)
            n += len(chunk)
    return None


def check_zip(zip_path: Path | str, limits: ZipLimits = ZipLimits()) -> tuple[list[str], bool]:
    """Layout, limit and source checks on the archive itself; nothing is unpacked.

    Returns:
        (problems, safe_to_extract): safe is False when a member would land outside the extraction folder or
        clash with a folder the runtime mounts, or the zip is over a limit.
    """
    zip_path = Path(zip_path)
    problems: list[str] = []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return [f"{zip_path}: not a readable zip ({exc})"], False
    safe = True
    sources: dict[str, str] = {}
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if "main.py" not in names:
            nested = [n for n in names if n.endswith("/main.py")]
            where = f" (found {nested[0]}: it must be at the root, not in a folder)" if nested else ""
            problems.append(f"{zip_path}: main.py is not at the zip root{where}")
        limit_problems = check_limits(infos, limits)
        problems += limit_problems
        safe = not limit_problems
        mounted = sorted({n.split("/")[0] for n in names if n.split("/")[0] in MOUNTED})
        for top in mounted:
            what = "the test features, read-only" if top == "data" else "main.py's output, empty at the start"
            problems.append(f"{top}/: the runtime mounts {top}/ beside main.py itself ({what}), so a zip may not "
                            f"ship it; leave {top}/ out of the zip")
            safe = False
        for info in infos:
            name = info.filename
            parts = [p for p in re.split(r"[/\\]", name) if p]
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                problems.append(f"{name}: absolute path in the zip")
                safe = False
            if ".." in parts:
                problems.append(f"{name}: '..' in a zip path")
                safe = False
            if stat.S_ISLNK(info.external_attr >> 16):
                problems.append(f"{name}: symbolic link in the zip")
                safe = False
            bad = [p for p in parts if p in _FORBIDDEN_PARTS or p.startswith(".env")
                   or "secret" in p.lower() or PurePosixPath(p).suffix.lower() in _FORBIDDEN_SUFFIXES]
            if bad:
                problems.append(f"{name}: caches, notebooks, stores or secrets do not belong in a submission")
            if name.endswith(".py") and not info.is_dir():
                try:
                    text = _read_source(zf, info)
                except Exception as exc:  # BadZipFile, zlib.error, NotImplementedError: a damaged member
                    problems.append(f"{name}: cannot be read from the zip ({exc})")
                    safe = False
                    continue
                if text is None:
                    problems.append(f"{name}: a {_size(info.file_size)} Python source, over the "
                                    f"{MAX_SOURCE_BYTES >> 20} MiB verify reads to check it (sources that size are "
                                    "not code: ship data as an asset)")
                else:
                    sources[name] = text
    return problems + check_sources(sources), safe


def unpacked_size(zip_path: Path | str) -> int:
    """Bytes the zip states it unpacks to (its directory's sum)."""
    with zipfile.ZipFile(zip_path) as zf:
        return sum(i.file_size for i in zf.infolist())


def extract(zip_path: Path | str, dest: Path) -> None:
    """Unpack a zip that ``check_zip`` found safe, writing no member past the size its directory states.

    Raises:
        ValueError: a member unpacks to more than its stated size (a directory that lies).
    """
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            target = dest / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            n = 0
            with zf.open(info) as src, open(target, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > info.file_size:
                        raise ValueError(f"{info.filename}: unpacks to more than the {info.file_size:,} bytes "
                                         "its zip directory states")
                    out.write(chunk)


def free_bytes(folder: Path) -> int:
    """Free space where ``folder`` lives."""
    return shutil.disk_usage(folder).free
