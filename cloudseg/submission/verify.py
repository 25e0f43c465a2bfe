"""Run a submission zip the way the competition runtime does, then apply the runtime's own checks.

``verify_submission`` unzips into a fresh ``<tmp>/codeexecution`` tree, copies the test features to
``codeexecution/data/test_features`` (read-only; hashed before and after because root can write anyway), runs
``python main.py`` there with ``CLOUDSEG_ROOT`` set, the network blocked and a time limit, streams its output,
and then checks the predictions (none missing, none extra, PIL opens each as 512x512, values {0, 1}, at most
524,288 bytes), scores them when labels are given, and reports main.py's throughput and the time 10,980 chips
would take here.

main.py runs in a sandbox close to the runtime's:

* as an unprivileged user (``nobody`` when verify runs as root; otherwise the current user, who is not root);
* with an environment built from an allow-list (``ENV_ALLOW``: PATH, locale, thread counts, device choice),
  HOME and TMPDIR in a scratch folder, so tracking URIs and credentials of the caller never reach it;
* with the data read-only, only ``predictions/`` and the scratch home writable; any file created, changed or
  removed elsewhere in the unpacked submission or the scratch area is a failure naming the file;
* without network: a fresh network namespace (``unshare -n``); a submission whose ``inference.json`` declares a
  STAC API (models with supplementary bands) gets, as root, one door out: a relay inside the namespace to an
  allow-listing proxy outside that passes only that API's host and its declared asset hosts
  (``cloudseg/submission/netproxy.py``). As root, a mount namespace also hides folders
  the unprivileged user cannot enter (e.g. ``/root``) behind an empty tmpfs, binding back only the
  interpreter's own folders. Always, an audit hook (``sitecustomize.py`` on ``PYTHONPATH``) refuses and
  reports every internet socket connect or name lookup made by main.py's own interpreter.

Where the network namespace cannot be made, verify fails unless ``allow_network_check_skip`` is given: the
audit hook alone does not see a child started with ``python -I`` (it ignores ``PYTHONPATH``), which can then
reach any server the machine reaches; the last lines then say the check was weaker.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from cloudseg.paths import RUNTIME_PYTHON

MAX_BYTES = 524_288  # the runtime's limit per prediction file
CHIP_SIZE = 512
TEST_CHIPS = 10_980  # size of the competition's test set, for the time projection
DEFAULT_TIMEOUT_S = 14_400  # the runtime's 4 hours
NETWORK_MARK = "cloudseg-network-guard: blocked"
MAX_LISTED = 20  # per kind of failure; the rest is counted
UNSHARE = "unshare"  # the network-namespace tool; tests point it at a missing name for the no-namespace path
UNPRIVILEGED_USER = "nobody"  # whom main.py runs as when verify runs as root
# The caller's variables main.py may see (the runtime hands it a clean environment); everything else is
# withheld, e.g. MLFLOW_TRACKING_URI or a DB=... URL with a password.
ENV_ALLOW = frozenset({
    "PATH", "LANG", "LANGUAGE", "TZ", "TERM", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER", "CLOUDSEG_DEVICE", "CLOUDSEG_TORCH_THREADS", "CLOUDSEG_IO_NICE",
})
ENV_ALLOW_PREFIXES = ("LC_",)

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

_GUARD = '''"""Installed by cloudseg verify-submission: refuse and report internet connections from Python."""
import os
import sys


_ALLOWED = frozenset(h for h in os.environ.get("CLOUDSEG_NETWORK_ALLOW", "").split(",") if h)


def _cloudseg_network_guard(event, args):
    if event not in ("socket.connect", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname",
                     "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        return
    if event in ("socket.connect", "socket.sendto"):
        import socket
        if getattr(args[0], "family", None) == getattr(socket, "AF_UNIX", None):
            return  # local IPC, not network
        target = args[1]
    else:
        target = args[0]
    host = target[0] if isinstance(target, tuple) and target else target
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host in _ALLOWED:
        return  # the submission's declared STAC endpoint (its name and addresses)
    message = "%s %s %r (pid %d)" % ("''' + NETWORK_MARK + '''", event, target, os.getpid())
    path = os.environ.get("CLOUDSEG_NETWORK_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(message + "\\n")
    sys.stderr.write(message + "\\n")
    raise PermissionError(message)


sys.addaudithook(_cloudseg_network_guard)
'''


@dataclass
class VerifyResult:
    """What ``verify_submission`` found. ``ok`` is True only when every check passed."""

    ok: bool
    failures: list[str]
    n_chips: int
    n_predictions: int
    returncode: int | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    chips_per_s: float | None = None
    chips_per_s_source: str = ""
    projected_s: float | None = None  # for TEST_CHIPS chips on this machine
    jaccard: float | None = None
    network: str = ""
    python: str = ""
    log: list[str] = field(default_factory=list)

    @property
    def last_line(self) -> str:
        if not self.ok:
            return f"verify failed: {len(self.failures)} problem(s)"
        return f"jaccard={self.jaccard:.10f}" if self.jaccard is not None else "checks passed"


def runtime_python() -> Path:
    """The competition runtime's interpreter (``.venv-runtime/bin/python``); raises when it was not built."""
    if not RUNTIME_PYTHON.is_file():
        raise FileNotFoundError(f"{RUNTIME_PYTHON} does not exist: run make runtime-env")
    return RUNTIME_PYTHON


def write_network_guard(folder: Path | str) -> Path:
    """Write the audit-hook ``sitecustomize.py`` into ``folder`` (for PYTHONPATH); returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_GUARD)
    return folder


def _fmt_s(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _listed(prefix: str, items: list[str]) -> list[str]:
    """One failure line per item, capped at MAX_LISTED plus a count of the rest."""
    lines = [f"{prefix}{it}" for it in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"{prefix}... and {len(items) - MAX_LISTED} more")
    return lines


# ------------------------------------------------------------------------------------------------- zip checks

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
        except SyntaxError as exc:
            problems.append(f"{name}: does not parse as Python 3.9 (line {exc.lineno}: {exc.msg})")
            continue
        for node in ast.walk(tree):
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


def check_zip(zip_path: Path | str) -> tuple[list[str], bool]:
    """Layout checks on the archive itself.

    Returns:
        (problems, safe_to_extract): safe is False when a member would land outside the extraction folder.
    """
    zip_path = Path(zip_path)
    problems: list[str] = []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        return [f"{zip_path}: not a readable zip ({exc})"], False
    safe = True
    sources: dict[str, str] = {}
    with zf:
        names = zf.namelist()
        if "main.py" not in names:
            nested = [n for n in names if n.endswith("/main.py")]
            where = f" (found {nested[0]}: it must be at the root, not in a folder)" if nested else ""
            problems.append(f"{zip_path}: main.py is not at the zip root{where}")
        for info in zf.infolist():
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
                sources[name] = zf.read(info).decode("utf-8", errors="replace")
    return problems + check_sources(sources), safe


# -------------------------------------------------------------------------------------------------- data tree

def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (symlinks followed), keyed by relative path; folders map to ''."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        out[rel_dir + "/"] = ""
        for f in sorted(filenames):
            h = hashlib.sha256()
            with open(os.path.join(dirpath, f), "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[os.path.normpath(os.path.join(rel_dir, f))] = h.hexdigest()
    return out


def _set_tree_mode(root: Path, writable: bool) -> None:
    """Read-only (dirs 0555, files 0444) or back to writable for clean-up."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755 if writable else 0o555)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o644 if writable else 0o444)


def chip_ids(features: Path) -> list[str]:
    """Chip folders as the runtime sees them: sub-folders not starting with '.'."""
    return sorted(p.name for p in features.iterdir() if p.is_dir() and not p.name.startswith("."))


# -------------------------------------------------------------------------------------------- running main.py

@dataclass
class Sandbox:
    """How main.py is started: a command prefix (namespaces, user switch) and what that amounts to."""

    prefix: list[str]
    user: str
    network: str
    isolated: bool  # True when main.py has its own network namespace
    uid: int | None = None  # the user main.py runs as, when verify switches users
    gid: int | None = None
    popen: dict = field(default_factory=dict)  # extra subprocess.Popen keywords
    weaker: list[str] = field(default_factory=list)  # checks this sandbox does not make


def _network_namespace() -> tuple[list[str] | None, str]:
    """(``unshare -n`` command, '') when a network namespace can be made here, else (None, why not).

    A user that is not root needs a user namespace for it too: ``-c`` maps the user to itself (so main.py
    keeps no capabilities once it execs), else ``-r`` (older util-linux; mapped to root in there, with no more
    rights outside than before).
    """
    unshare = shutil.which(UNSHARE)
    if not unshare:
        return None, f"{UNSHARE} not installed"
    tries = [[unshare, "-n"]] if os.geteuid() == 0 else [[unshare, "-c", "-n"], [unshare, "-r", "-n"]]
    why = ""
    for cmd in tries:
        try:
            r = subprocess.run(cmd + ["true"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
            continue
        if r.returncode == 0:
            return cmd, ""
        why = (r.stderr.decode(errors="replace").strip() or f"exit {r.returncode}").splitlines()[0]
    return None, why


def _closed_ancestor(path: Path) -> Path | None:
    """The topmost folder at or above ``path`` that other users may not enter (no o+x), or None."""
    for p in [*reversed(path.parents), path][1:]:
        if p.is_dir() and not p.stat().st_mode & stat.S_IXOTH:
            return p
    return None


def _interpreter_dirs(python: str) -> list[Path]:
    """Folders ``python`` needs: its base installation, its prefix (a venv), its real executable's folder."""
    code = ("import os, sys; print(sys.base_prefix); print(sys.prefix); "
            "print(os.path.realpath(sys.executable))")
    r = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise FileNotFoundError(f"{python} does not run: {(r.stderr.strip() or r.stdout.strip())[:300]}")
    base, prefix, exe = r.stdout.strip().splitlines()[-3:]
    return [Path(base), Path(prefix), Path(exe).parent, Path(python).parent]


def _root_sandbox(unshare: str, python: str, work: Path, hold: Path, uid: int, gid: int) -> list[str]:
    """Command prefix that, as root, enters new mount + network namespaces and becomes ``uid``.

    Folders the user could not enter (e.g. ``/root`` holding a pyenv interpreter, or pytest's 0700 temporary
    root) are covered by an empty tmpfs, and only the interpreter's folders and ``work`` are bound back, so
    the interpreter runs and nothing else of those folders is visible.
    """
    keeps: dict[Path, list[Path]] = {}
    for path in [p.resolve() for p in (*_interpreter_dirs(python), work)]:
        closed = _closed_ancestor(path)
        if closed is not None and not any(k == path or k in path.parents for k in keeps.get(closed, [])):
            keeps.setdefault(closed, []).append(path)
    lines = ["set -e"]
    n = 0
    for closed, paths in keeps.items():
        spots = []
        for path in paths:
            spot = hold / str(n)
            n += 1
            spot.mkdir()
            lines.append(f"mount --bind {_q(path)} {_q(spot)}")
            spots.append((path, spot))
        lines.append(f"mount -t tmpfs -o mode=0755,size=1m cloudseg-verify {_q(closed)}")
        for path, spot in spots:
            lines += [f"mkdir -p {_q(path)}", f"mount --bind {_q(spot)} {_q(path)}"]
    lines.append(f'exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "$@"')
    script = hold / "enter.sh"
    script.write_text("\n".join(lines) + "\n")
    return [unshare, "-m", "-n", "--", "sh", str(script)]


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def make_sandbox(python: str, work: Path, hold: Path) -> Sandbox:
    """Choose how main.py runs here: as whom, and whether the network is cut (see the module docstring)."""
    unshare, why = _network_namespace()
    root = os.geteuid() == 0
    uid = gid = None
    user = pwd.getpwuid(os.geteuid()).pw_name
    if root:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
        uid, gid, user = entry.pw_uid, entry.pw_gid, UNPRIVILEGED_USER
    if unshare:
        network = "network namespace without interfaces (unshare -n) + audit-hook guard"
        if root:
            return Sandbox(_root_sandbox(unshare[0], python, work, hold, uid, gid), user, network, True, uid,
                           gid)
        return Sandbox(unshare + ["--"], user, network, True)
    network = f"NOT isolated (no network namespace: {why}); audit-hook guard and dead proxy variables only"
    weaker = [f"network not isolated ({UNSHARE} -n: {why}): the audit hook sees only main.py's own "
              "interpreter, so a child started with python -I could reach the network unseen"]
    popen = {"user": uid, "group": gid, "extra_groups": []} if root else {}
    closed = [(p, _closed_ancestor(p.resolve())) for p in (*_interpreter_dirs(python), work)] if root else []
    closed = [(p, c) for p, c in closed if c is not None]
    if closed:  # without a mount namespace the unprivileged user could not even start the interpreter
        weaker.append(f"main.py ran as root, not {UNPRIVILEGED_USER}: {closed[0][0]} is inside "
                      f"{closed[0][1]}, which {UNPRIVILEGED_USER} cannot enter, and no mount namespace "
                      "can be made to open it")
        popen, uid, gid, user = {}, None, None, pwd.getpwuid(os.geteuid()).pw_name
    return Sandbox([], user, network, False, uid, gid, popen, weaker)


def sandbox_env(home: Path, codeexecution: Path, guard_dir: Path, net_log: Path,
                allow_hosts: list[str] = (), proxy: str | None = None) -> tuple[dict, list[str]]:
    """main.py's environment from the allow-list, and the names of the caller's variables withheld.

    ``allow_hosts`` (a STAC submission's endpoint: its name and addresses) are the only hosts the audit hook lets
    main.py's Python reach, directly (``NO_PROXY``) rather than through the dead proxy; with ``proxy`` (the relay
    to ``netproxy.AllowProxy`` inside the namespace) every request goes through it instead."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES)}
    blackhole = proxy or "http://127.0.0.1:9"  # discard port: connections fail at once
    direct = "" if proxy else ",".join(allow_hosts)  # with the relay, every request goes through it
    if proxy:
        allow_hosts = ["127.0.0.1"]  # the relay; the proxy behind it checks the real destinations
    env.setdefault("PATH", os.defpath)
    env.update(
        HOME=str(home), TMPDIR=str(home / "tmp"), CLOUDSEG_ROOT=str(codeexecution), PYTHONPATH=str(guard_dir),
        PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
        HTTP_PROXY=blackhole, HTTPS_PROXY=blackhole, http_proxy=blackhole, https_proxy=blackhole,
        ALL_PROXY=blackhole, NO_PROXY=direct, no_proxy=direct,
        CLOUDSEG_NETWORK_LOG=str(net_log), CLOUDSEG_NETWORK_ALLOW=",".join(allow_hosts),
    )
    return env, sorted(set(os.environ) - set(env))


def _snapshot(root: Path, skip: set[Path]) -> dict[str, tuple]:
    """(kind, size, ctime, mtime) of everything under ``root`` but ``skip``; ctime changes on any write."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            st = os.lstat(here / name)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[str(here / name)] = (stat.S_IFMT(st.st_mode), size, st.st_ctime_ns, st.st_mtime_ns)
    return out


def _writes_elsewhere(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    lines = []
    for path in sorted(set(before) | set(after)):
        if path not in before:
            lines.append(f"{path} (created)")
        elif path not in after:
            lines.append(f"{path} (removed)")
        elif before[path] != after[path] and before[path][0] != stat.S_IFDIR:  # folders change with files
            lines.append(f"{path} (changed)")
    return lines


def _own(path: Path, sandbox: Sandbox, mode: int) -> None:
    """Make ``path`` (a new folder) writable by the user main.py runs as, and by nobody else."""
    path.mkdir(parents=True, exist_ok=True)
    if sandbox.uid is not None:
        os.chown(path, sandbox.uid, sandbox.gid)
    os.chmod(path, mode)


def _set_submission_mode(codeexecution: Path, skip: set[Path], writable: bool) -> None:
    """The unpacked submission read-only for its owner too (a non-root run owns it), or back for clean-up."""
    for dirpath, dirnames, filenames in os.walk(codeexecution):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        os.chmod(here, 0o755 if writable else 0o555)
        for f in filenames:
            if not (here / f).is_symlink():
                os.chmod(here / f, 0o644 if writable else 0o444)


def _run_main(cmd: list[str], cwd: Path, env: dict, timeout: float, echo: Callable[[str], None],
              popen: dict) -> tuple[int | None, bool, float, list[str]]:
    """Run ``cmd`` in ``cwd``, streaming its lines.

    Returns:
        (returncode, timed_out, wall_s, lines).
    """
    lines: list[str] = []
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                            start_new_session=True, **popen)

    def pump() -> None:
        assert proc.stdout is not None  # set by stdout=PIPE; not validation
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            echo(f"[main.py] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=10)
    return proc.returncode, timed_out, time.time() - start, lines


# ------------------------------------------------------------------------------------------ prediction checks

def check_predictions(pred_dir: Path, ids: list[str]) -> list[str]:
    """The runtime's checks; each failure names the file."""
    if not pred_dir.is_dir():
        return [f"{pred_dir}: main.py wrote no predictions folder"]
    import numpy as np
    from PIL import Image

    expected = {f"{c}.tif" for c in ids}
    present = set(os.listdir(pred_dir))
    failures = _listed("missing prediction: ", [str(pred_dir / n) for n in sorted(expected - present)])
    failures += _listed("extra file: ", [str(pred_dir / n) for n in sorted(present - expected)])
    size, shape, values, unreadable = [], [], [], []
    for name in sorted(expected & present):
        path = pred_dir / name
        n_bytes = path.stat().st_size
        if n_bytes > MAX_BYTES:
            size.append(f"{path}: {n_bytes:,} bytes > {MAX_BYTES:,}")
        try:
            with Image.open(path) as img:
                arr = np.array(img)
        except Exception as exc:  # PIL raises several types for bad files
            unreadable.append(f"{path}: PIL cannot open it ({exc})")
            continue
        if arr.shape != (CHIP_SIZE, CHIP_SIZE):
            shape.append(f"{path}: shape {arr.shape}, expected ({CHIP_SIZE}, {CHIP_SIZE})")
        bad = np.setdiff1d(np.unique(arr), [0, 1])
        if bad.size:
            values.append(f"{path}: values {bad[:5].tolist()} not in {{0, 1}}")
    for prefix, items in (("unreadable: ", unreadable), ("wrong shape: ", shape), ("bad values: ", values),
                          ("too large: ", size)):
        failures += _listed(prefix, items)
    return failures


_PIL_CHECK = """
import sys, numpy as np
from PIL import Image
bad = 0
for p in sys.argv[1:]:
    try:
        with Image.open(p) as img:
            a = np.array(img)
        if a.shape != (512, 512):
            raise ValueError("shape %s" % (a.shape,))
    except Exception as exc:
        bad += 1
        print("%s: %s" % (p, exc))
sys.exit(1 if bad else 0)
"""


def _check_with_interpreter(python: str, pred_dir: Path, ids: list[str]) -> list[str]:
    """Open every prediction with the PIL of ``python`` (the runtime's pillow 8.2 under --runtime)."""
    paths = [str(pred_dir / f"{c}.tif") for c in ids if (pred_dir / f"{c}.tif").is_file()]
    failures = []
    for i in range(0, len(paths), 500):  # stay far below the argument-length limit
        r = subprocess.run([python, "-c", _PIL_CHECK, *paths[i:i + 500]], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": ""})
        if r.returncode:
            failures += [f"PIL of {python}: {ln}" for ln in (r.stdout + r.stderr).strip().splitlines()]
    return failures[:MAX_LISTED]


def _throughput(lines: list[str], n_pred: int, wall_s: float) -> tuple[float | None, str, float | None]:
    """chips/s (preferring main.py's own figure) and the projected seconds for TEST_CHIPS chips."""
    for line in reversed(lines):
        m = re.search(r"throughput chips_per_s=([0-9.eE+-]+)", line)
        if m and float(m.group(1)) > 0:
            cps = float(m.group(1))
            startup = max(0.0, wall_s - n_pred / cps)
            source = "main.py's own log: first read to last write, interpreter start and model load excluded"
            return cps, source, TEST_CHIPS / cps + startup
    if n_pred and wall_s > 0:
        cps = n_pred / wall_s
        return cps, "timed subprocess, interpreter start and model load included", TEST_CHIPS / cps
    return None, "", None


# ------------------------------------------------------------------------------------------------ entry point

def verify_submission(
    zip_path: Path | str,
    features: Path | str,
    labels: Path | str | None = None,
    python: Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    echo: Callable[[str], None] = print,
    keep: Path | str | None = None,
    allow_network_check_skip: bool = False,
) -> VerifyResult:
    """Verify a submission zip end to end (see the module docstring).

    Args:
        zip_path: the submission zip (``main.py`` at its root).
        features: a folder of chip folders (``<chip_id>/B02.tif ...``), the runtime's ``data/test_features``.
        labels: optional folder of ``<chip_id>.tif`` labels; when given, the pooled Jaccard is computed.
        python: interpreter for main.py (default: the current one; ``runtime_python()`` for the runtime's).
        timeout: seconds main.py may run (the runtime allows 4 hours).
        echo: where progress and main.py's streamed output go; the last line echoed is ``result.last_line``.
        keep: run in this (new or empty) folder and leave it in place, instead of a deleted temporary one.
        allow_network_check_skip: where no network namespace can be made, run anyway with the audit hook as
            the only network check (weaker: a ``python -I`` child is not seen) instead of failing.
    """
    zip_path, features = Path(zip_path), Path(features)
    python = str(python or sys.executable)
    if not zip_path.is_file():
        raise FileNotFoundError(f"submission zip {zip_path} does not exist")
    if not features.is_dir():
        raise FileNotFoundError(f"features folder {features} does not exist")
    if labels is not None and not Path(labels).is_dir():
        raise FileNotFoundError(f"labels folder {labels} does not exist")
    ids = chip_ids(features)
    result = VerifyResult(ok=False, failures=[], n_chips=len(ids), n_predictions=0, python=python)
    echo(f"verify {zip_path} on {len(ids)} chips from {features}")

    zip_problems, safe = check_zip(zip_path)
    result.failures += zip_problems
    for p in zip_problems:
        echo(f"FAIL {p}")
    if not safe or any("main.py is not at the zip root" in p for p in zip_problems) or \
            any("not a readable zip" in p for p in zip_problems):
        echo(result.last_line)
        return result

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cloudseg-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    hold = Path(tempfile.mkdtemp(prefix="cloudseg-verify-mounts-"))  # mount points outside any closed folder
    codeexecution = work / "codeexecution"
    data, pred_dir = codeexecution / "data", codeexecution / "predictions"
    home, net_dir = work / "home", work / "network"
    weaker: list[str] = []
    proxy = None
    try:
        os.chmod(work, 0o755)  # mkdtemp makes it 0700: the unprivileged user must enter it
        sandbox = make_sandbox(python, work, hold)
        result.network = sandbox.network
        echo(f"python: {python}")
        echo(f"network: {result.network}")
        if not sandbox.isolated and not allow_network_check_skip:
            result.failures.append(
                f"no network namespace for main.py ({sandbox.weaker[0]}); run verify where `{UNSHARE} -n` "
                "works (e.g. as root), or pass --allow-network-check-skip to accept the weaker check")
            raise _Stop
        weaker += sandbox.weaker
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(codeexecution)
        shutil.copytree(features, data / "test_features", symlinks=False)
        metadata = features.with_name(features.name.removesuffix("_features") + "_metadata.csv")
        if features.name.endswith("_features") and metadata.is_file():  # chip times, for STAC-band submissions
            shutil.copyfile(metadata, data / "test_metadata.csv")
        stac = _stac_of(codeexecution)
        allow_hosts = _endpoint_hosts(str(stac.get("url") or "")) if stac else []
        allow_hosts += [str(h) for h in (stac or {}).get("asset_hosts") or []]
        if stac and sandbox.uid is not None and sandbox.isolated:  # root: a door out of the namespace
            from cloudseg.submission.netproxy import RELAY, AllowProxy

            (work / "proxy").mkdir(mode=0o700)
            proxy = AllowProxy(work / "proxy" / "stac.sock", allow_hosts, NETWORK_MARK)
            (hold / "relay.py").write_text(RELAY)
            _add_relay(sandbox, python, hold / "relay.py", RELAY_PORT, proxy.path)
            reach = (f"main.py reaches it through an allow-listing proxy (127.0.0.1:{RELAY_PORT} in its namespace); "
                     "any other host is refused and reported")
        elif stac and sandbox.isolated:
            reach = ("main.py has no network in its namespace, so every chip takes its documented fallback (the "
                     "training mean): this checks the fallback path and the format, not the fetched pixels")
        elif stac:
            reach = "the audit hook lets main.py's Python reach only that endpoint"
        if stac:
            echo(f"network: this submission fetches bands {','.join(stac.get('bands') or [])} from "
                 f"{stac.get('url')} (allowed: {', '.join(allow_hosts)}); {reach}")
        before = hash_tree(data)
        _set_tree_mode(data, writable=False)
        guard = write_network_guard(work / "guard")
        for folder, mode in ((pred_dir, 0o755), (home, 0o700), (home / "tmp", 0o700), (net_dir, 0o700)):
            _own(folder, sandbox, mode)
        writable = {data, pred_dir, home, net_dir}
        _set_submission_mode(codeexecution, writable, writable=False)
        env, withheld = sandbox_env(home, codeexecution, guard, net_dir / "network.log", allow_hosts,
                                    f"http://127.0.0.1:{RELAY_PORT}" if proxy else None)
        passed = sorted(k for k in env if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES))
        echo(f"user: {sandbox.user}; environment: allow-listed {passed}, HOME and TMPDIR in {home}, verify's "
             f"own settings; withheld from main.py: {', '.join(withheld) or 'none'}")
        probe = _probe(sandbox, python, codeexecution, env)
        if probe:
            result.failures.append(probe)
            raise _Stop
        scratch = _snapshot(work, writable)
        echo(f"time limit: {timeout:.0f} s; running main.py in {codeexecution}")
        rc, result.timed_out, result.wall_s, result.log = _run_main(
            sandbox.prefix + [python, "main.py"], codeexecution, env, timeout, echo, sandbox.popen)
        result.returncode = rc
        if result.timed_out:
            result.failures.append(f"main.py exceeded the time limit of {timeout:.0f} s and was killed")
        elif rc != 0:
            last = next((ln.strip() for ln in reversed(result.log) if ln.strip()), "")
            result.failures.append(f"main.py exited with status {rc}" + (f" (last line: {last[:300]})"
                                                                        if last else ""))
        attempts = [ln for ln in result.log if NETWORK_MARK in ln]
        if proxy:
            attempts += proxy.refused
            echo(f"network: {len(proxy.passed)} connection(s) through the STAC proxy, {len(proxy.refused)} refused")
        net_log = net_dir / "network.log"
        if net_log.is_file():
            attempts += net_log.read_text().splitlines()
        if attempts:
            result.failures.append(f"main.py tried to use the network: {attempts[0]}")
        written = _writes_elsewhere(scratch, _snapshot(work, writable))  # before chmod touches ctimes
        _set_submission_mode(codeexecution, writable, writable=True)
        result.failures += _listed("main.py wrote outside predictions/ and the scratch home: ", written)
        _set_tree_mode(data, writable=True)
        after = hash_tree(data)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            result.failures += _listed("main.py changed the read-only data: ",
                                       [str(data / c) for c in changed])

        pred_failures = check_predictions(pred_dir, ids)
        if python != sys.executable and pred_dir.is_dir():
            pred_failures += _check_with_interpreter(python, pred_dir, ids)
        result.failures += pred_failures
        result.n_predictions = sum((pred_dir / f"{c}.tif").is_file() for c in ids) if pred_dir.is_dir() else 0
        result.chips_per_s, result.chips_per_s_source, result.projected_s = _throughput(
            result.log, result.n_predictions, result.wall_s)

        if labels is not None and not pred_failures:
            from cloudseg.metrics import score_folders

            try:
                result.jaccard = score_folders(pred_dir, labels).score()
            except Exception as exc:  # missing predictions for labels, empty union
                result.failures.append(f"scoring against {labels} failed: {exc}")
    except _Stop:
        pass
    finally:
        if proxy is not None:
            proxy.close()
        if codeexecution.exists():
            _set_submission_mode(codeexecution, {data}, writable=True)
        if data.exists():
            _set_tree_mode(data, writable=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(hold, ignore_errors=True)

    result.ok = not result.failures
    echo(f"predictions: {result.n_predictions}/{result.n_chips}; main.py wall time {result.wall_s:.1f} s")
    if result.chips_per_s:
        echo(f"throughput: {result.chips_per_s:.3f} chips/s ({result.chips_per_s_source})")
        over = result.projected_s > DEFAULT_TIMEOUT_S
        on_cpu = any(re.search(r"\bdevice=cpu\b", ln) for ln in result.log)
        note = ""
        if over:
            note = " over the limit here" + (" (main.py ran on CPU; the runtime has a GPU)" if on_cpu else "")
        echo(f"projected time for {TEST_CHIPS:,} chips here: {_fmt_s(result.projected_s)} "
             f"(limit {_fmt_s(DEFAULT_TIMEOUT_S)}){note}")
    for f in result.failures[len(zip_problems):]:
        echo(f"FAIL {f}")
    if result.jaccard is not None:
        echo(f"pooled Jaccard on {labels}: {result.jaccard:.10f}")
    for w in weaker:
        echo(f"WARNING weaker check: {w} (accepted with --allow-network-check-skip)")
    echo(result.last_line)
    return result


RELAY_PORT = 3128  # inside main.py's own network namespace, where nothing else listens


def _add_relay(sandbox: Sandbox, python: str, relay: Path, port: int, sock: Path) -> None:
    """Start ``netproxy.RELAY`` in the root sandbox's entry script, as root, just before it becomes the user."""
    script = Path(sandbox.prefix[-1])
    lines = script.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("exec setpriv"))
    lines.insert(at, f"{_q(Path(python))} -I {_q(relay)} {port} {_q(sock)} $$")
    script.write_text("\n".join(lines) + "\n")


def _endpoint_hosts(url: str) -> list[str]:
    """A URL's host name and the addresses it resolves to here (what the audit hook sees main.py connect to)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname:
        return []
    hosts = [parts.hostname]
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        hosts += sorted({info[4][0] for info in socket.getaddrinfo(parts.hostname, port)} - {parts.hostname})
    except OSError:  # not resolvable here: main.py will not reach it either
        pass
    return hosts


def _stac_of(codeexecution: Path) -> dict | None:
    """The ``stac`` entry of the submission's inference.json (models with supplementary bands), if any."""
    import json

    try:
        return json.loads((codeexecution / "assets" / "inference.json").read_text()).get("stac") or None
    except (OSError, ValueError, AttributeError):
        return None


class _Stop(Exception):
    """A sandbox problem that ends the run before main.py starts; already recorded as a failure."""


def _probe(sandbox: Sandbox, python: str, codeexecution: Path, env: dict) -> str:
    """'' when ``python`` starts in the sandbox and can read the submission and the data; else the failure."""
    code = ("import os, sys\n"
            "root = os.environ['CLOUDSEG_ROOT']\n"
            "open(os.path.join(root, 'main.py'), 'rb').close()\n"
            "os.listdir(os.path.join(root, 'data', 'test_features'))\n")
    try:
        r = subprocess.run(sandbox.prefix + [python, "-c", code], cwd=codeexecution, env=env,
                           capture_output=True, text=True, timeout=120, **sandbox.popen)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not start as user {sandbox.user} in the sandbox: {exc}"
    if r.returncode:
        why = ((r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return (f"{python} cannot run main.py as user {sandbox.user} in the sandbox: {why[:300]} "
                "(the interpreter, the submission and the data must be readable by that user)")
    return ""
