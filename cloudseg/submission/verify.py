"""Run a submission zip the way the competition runtime does, then apply the runtime's own checks.

``verify_submission`` first checks the zip from its own directory, unpacking nothing: paths that would leave its
folder, the folders the runtime mounts itself (``data/``, ``predictions/``), limits on the unpacked size, the
number of files and the compression ratio (``ZipLimits``), caches and secrets, and its Python sources (3.9
grammar, runtime imports; read in bounded chunks). It then unpacks into a fresh ``codeexecution`` tree, copies
the test features to ``codeexecution/data/test_features`` (read-only; hashed before and after), runs
``python main.py`` there in a sandbox (``cloudseg/submission/sandbox.py``) with a time limit, streams its output,
and then checks the predictions (none missing, none extra, regular files only, PIL opens each as 512x512, values
{0, 1}, at most 524,288 bytes), in the sandbox too and on what is left of the same clock, scores them when labels
are given (labels main.py never saw), and reports main.py's throughput and the time 10,980 chips would take here.

The sandbox (bubblewrap where it is installed) shows main.py its folder, ``data/`` (read-only), ``predictions/``
(empty at the start), a private ``/tmp`` and ``/dev/shm``, the system's read-only files and its interpreter, and
nothing else of the machine; it has its own PID namespace (no process outlives it: the ones main.py left are
named, and a failure) and network namespace, runs as an unprivileged user (``nobody`` when verify runs as root)
with an environment built from an allow-list (``ENV_ALLOW``: PATH, locale, thread counts, device choice), so
tracking URIs and credentials of the caller never reach it. Any file created, changed or removed in verify's
folder outside ``predictions/`` and the scratch folders is a failure naming the file. A submission whose
``inference.json`` declares a STAC API (models with supplementary bands) gets one door out: a relay inside the
namespace to an allow-listing proxy outside that passes only that API's host and its declared asset hosts
(``cloudseg/submission/netproxy.py``). Always, an audit hook (``sitecustomize.py`` on ``PYTHONPATH``) refuses and
reports every internet socket connect or name lookup made by main.py's own interpreter.

Where a protection cannot be had here (bubblewrap missing, no namespaces, not root), verify says which one is
missing and what it still checks. Where not even a network namespace can be made, verify fails unless
``allow_network_check_skip`` is given: the audit hook alone does not see a child started with ``python -I`` (it
ignores ``PYTHONPATH``), which can then reach any server the machine reaches.

On any exit (main.py's time limit, Ctrl-C, SIGTERM, even SIGKILL of verify itself) main.py's sandbox ends and
verify's folders are removed: a janitor process outside verify's process group carries that out if verify dies
first.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cloudseg.paths import RUNTIME_PYTHON
from cloudseg.submission.sandbox import (
    LEFTOVER_MARK,
    Janitor,
    Layout,
    Sandbox,
    end_leftovers,
    inside_python,
    make_sandbox,
    namespace_of,
)
from cloudseg.submission.zipcheck import (  # noqa: F401  (check_sources, RUNTIME_IMPORTS: promote's and tests')
    RUNTIME_IMPORTS,
    ZipLimits,
    check_sources,
    check_zip,
    extract,
    free_bytes,
    unpacked_size,
)

MAX_BYTES = 524_288  # the runtime's limit per prediction file
CHIP_SIZE = 512
TEST_CHIPS = 10_980  # size of the competition's test set, for the time projection
DEFAULT_TIMEOUT_S = 14_400  # the runtime's 4 hours
CHECK_MIN_S = 30.0  # the prediction check gets what is left of main.py's clock, and at least this
NETWORK_MARK = "cloudseg-network-guard: blocked"
CHECK_MARK = "cloudseg-verify-check:"
MAX_LISTED = 20  # per kind of failure; the rest is counted
MAX_LINE = 10_000  # characters of one line of main.py's output kept (a line without end is cut)
# The caller's variables main.py may see (the runtime hands it a clean environment); everything else is
# withheld, e.g. MLFLOW_TRACKING_URI or a DB=... URL with a password.
ENV_ALLOW = frozenset({
    "PATH", "LANG", "LANGUAGE", "TZ", "TERM", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER", "CLOUDSEG_DEVICE", "CLOUDSEG_TORCH_THREADS", "CLOUDSEG_IO_NICE",
})
ENV_ALLOW_PREFIXES = ("LC_",)

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
    sandbox: str = ""
    python: str = ""
    log: list[str] = field(default_factory=list)
    reduced: list[str] = field(default_factory=list)  # protections missing here (also printed as WARNING lines)

    @property
    def last_line(self) -> str:
        if not self.ok:
            return f"verify failed: {len(self.failures)} problem(s)"
        return f"jaccard={self.jaccard:.10f}" if self.jaccard is not None else "checks passed"


class Interrupted(KeyboardInterrupt):
    """verify received SIGTERM: like Ctrl-C, it ends main.py's sandbox and removes its folders on the way out."""


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


# -------------------------------------------------------------------------------------------------- data tree

def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, keyed by relative path; folders map to '', anything else
    (a link, a FIFO) to its kind. Nothing is followed and nothing but regular files is opened."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        out[rel_dir + "/"] = ""
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            key = os.path.normpath(os.path.join(rel_dir, f))
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                out[key] = f"not a regular file (mode {stat.filemode(mode)})"
                continue
            h = hashlib.sha256()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[key] = h.hexdigest()
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

def sandbox_env(home: Path | str, codeexecution: Path | str, guard_dir: Path | str, net_log: Path | str,
                allow_hosts: list[str] = (), proxy: str | None = None,
                tmp: Path | str | None = None) -> tuple[dict, list[str]]:
    """main.py's environment from the allow-list, and the names of the caller's variables withheld.

    Paths are as main.py sees them (inside the sandbox). ``allow_hosts`` (a STAC submission's endpoint: its name
    and addresses) are the only hosts the audit hook lets main.py's Python reach, directly (``NO_PROXY``) rather
    than through the dead proxy; with ``proxy`` (the relay to ``netproxy.AllowProxy`` inside the namespace) every
    request goes through it instead. ``tmp`` defaults to ``<home>/tmp``."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES)}
    blackhole = proxy or "http://127.0.0.1:9"  # discard port: connections fail at once
    direct = "" if proxy else ",".join(allow_hosts)  # with the relay, every request goes through it
    if proxy:
        allow_hosts = ["127.0.0.1"]  # the relay; the proxy behind it checks the real destinations
    env.setdefault("PATH", os.defpath)
    env.update(
        HOME=str(home), TMPDIR=str(tmp if tmp is not None else Path(home) / "tmp"), CLOUDSEG_ROOT=str(codeexecution),
        PYTHONPATH=str(guard_dir), PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1",
        HF_HUB_OFFLINE="1", HTTP_PROXY=blackhole, HTTPS_PROXY=blackhole, http_proxy=blackhole,
        https_proxy=blackhole, ALL_PROXY=blackhole, NO_PROXY=direct, no_proxy=direct,
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


@dataclass
class _Run:
    returncode: int | None
    timed_out: bool
    wall_s: float
    lines: list[str]
    left: list[str]  # processes main.py left running, named by the sandbox's launcher as main.py ended
    survived: list[str]  # processes still alive once the sandbox had ended (killed by verify)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # already gone
        pass


def _pump(stream, lines: list[str], echo: Callable[[str], None]) -> None:
    """Read main.py's output line by line, each cut at MAX_LINE characters (a line may never end)."""
    cut = False
    while True:
        raw = stream.readline(MAX_LINE)
        if not raw:
            return
        ended = raw.endswith(b"\n")
        if not cut:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not ended:
                line += " [line cut by verify]"
            lines.append(line)
            echo(f"[main.py] {line}")
        cut = not ended


def _run_main(sandbox: Sandbox, cmd: list[str], cwd: Path, env: dict, timeout: float,
              echo: Callable[[str], None], janitor: Janitor) -> _Run:
    """Run ``cmd`` (a sandbox command) in ``cwd``, streaming its lines, and end everything it started."""
    lines: list[str] = []
    info_r = info_w = None
    if sandbox.kind == "bwrap":  # bubblewrap says which PID namespace it made
        info_r, info_w = os.pipe()
        cmd = [cmd[0], "--info-fd", str(info_w), *cmd[1:]]
    start = time.time()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                pass_fds=(info_w,) if info_w is not None else (), **sandbox.popen)
    finally:
        if info_w is not None:
            os.close(info_w)
    janitor.end_group(proc.pid)
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines, echo), daemon=True)
    reader.start()
    timed_out, namespace = False, None
    try:
        try:
            namespace = namespace_of(proc, sandbox, info_r)
        finally:
            if info_r is not None:
                os.close(info_r)
        proc.wait(timeout=max(0.0, start + timeout - time.time()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:  # the time limit, Ctrl-C or SIGTERM: end the sandbox with everything in it
            _kill_group(proc.pid)
            proc.wait()
    wall_s = time.time() - start
    reader.join(timeout=10)
    left = [ln.split(LEFTOVER_MARK, 1)[1].strip() for ln in lines if LEFTOVER_MARK in ln]
    survived = end_leftovers(namespace, proc.pid)
    return _Run(proc.returncode, timed_out, wall_s, lines, left, survived)


def _run_quiet(sandbox: Sandbox, cmd: list[str], cwd: Path, env: dict, timeout: float,
               stdin: str = "") -> tuple[int | None, str]:
    """Run a sandbox command to its end or ``timeout`` (then end it all); (returncode or None, output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                            **sandbox.popen)
    try:
        out, _ = proc.communicate(stdin, timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        return None, ""
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()


# ------------------------------------------------------------------------------------------ prediction checks

# Run in the sandbox, as main.py's user, by main.py's interpreter (so the runtime's pillow under --runtime):
# python -I -c CHECK PRED_DIR MAX_BYTES SIZE, chip ids as JSON on stdin; one line CHECK_MARK + JSON out. Opens
# only regular files with one name, never following a link, never blocking on a FIFO, reading at most
# MAX_BYTES + 1 bytes, and decodes only images that state the expected size.
_PRED_CHECK = r"""
import io, json, os, stat, sys
pred_dir, max_bytes, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
out = {"dir": "", "missing": [], "extra": [], "special": [], "large": [], "unreadable": [], "shape": [],
       "values": [], "regular": 0}
KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))

def kind_of(st, name):
    for test, kind in KINDS:
        if test(st.st_mode):
            return kind + (" to " + os.readlink(name, dir_fd=dfd) if kind == "a symbolic link" else "")
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink != 1:
        return "a hard link (one of %d names of one file)" % st.st_nlink
    return ""

try:
    dfd = os.open(pred_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
except OSError as exc:
    out["dir"] = str(exc)
else:
    import numpy as np
    from PIL import Image
    present = set(os.listdir(dfd))
    expected = set(c + ".tif" for c in ids)
    out["missing"], out["extra"] = sorted(expected - present), sorted(present - expected)
    for name in sorted(expected & present):
        try:
            kind = kind_of(os.stat(name, dir_fd=dfd, follow_symlinks=False), name)
            if kind:
                out["special"].append([name, kind])
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dfd)
        except OSError as exc:
            out["unreadable"].append([name, "cannot be opened (%s)" % exc])
            continue
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            kind = kind_of(st, name)
            if kind:  # swapped since the look above
                out["special"].append([name, kind])
                continue
            out["regular"] += 1
            if st.st_size > max_bytes:
                out["large"].append([name, st.st_size])
                continue
            data = fh.read(max_bytes + 1)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.size != (size, size):
                    bands = len(img.getbands())
                    out["shape"].append([name, [img.size[1], img.size[0]] + ([bands] if bands > 1 else [])])
                    continue
                arr = np.array(img)
        except Exception as exc:
            out["unreadable"].append([name, "PIL cannot open it (%s)" % exc])
            continue
        if arr.shape != (size, size):
            out["shape"].append([name, list(arr.shape)])
            continue
        bad = np.setdiff1d(np.unique(arr), [0, 1])
        if bad.size:
            out["values"].append([name, bad[:5].tolist()])
print("%s %s" % (sys.argv[4], json.dumps(out)), flush=True)
"""


def check_predictions(sandbox: Sandbox, python: str, ids: list[str], env: dict,
                      timeout: float) -> tuple[list[str], int]:
    """The runtime's checks on main.py's predictions, run in the sandbox; (failures naming each file, number of
    regular prediction files)."""
    pred_dir = sandbox.layout.predictions
    cmd = sandbox.command([inside_python(python), "-I", "-c", _PRED_CHECK, sandbox.path(pred_dir), str(MAX_BYTES),
                           str(CHIP_SIZE), CHECK_MARK], writable=False)
    rc, out = _run_quiet(sandbox, cmd, sandbox.layout.codeexecution, env, timeout, json.dumps(ids))
    if rc is None:
        return [f"the check of {pred_dir} did not finish within {timeout:.0f} s (what was left of the time "
                "limit): its files were not checked"], 0
    found = [ln.split(CHECK_MARK, 1)[1] for ln in out.splitlines() if CHECK_MARK in ln]
    if rc or not found:
        why = (out.strip().splitlines() or [f"exit {rc}"])[-1][:300]
        return [f"the check of {pred_dir} failed to run with {python}: {why}"], 0
    res = json.loads(found[-1])
    if res["dir"]:
        return [f"{pred_dir}: main.py left no predictions folder ({res['dir']})"], 0

    def path(name: str) -> Path:
        return pred_dir / name

    failures = _listed("missing prediction: ", [str(path(n)) for n in res["missing"]])
    failures += _listed("extra file: ", [str(path(n)) for n in res["extra"]])
    failures += _listed("not a regular file: ", [f"{path(n)}: {k} (verify opens regular files only, as the "
                                                 "runtime's checks expect)" for n, k in res["special"]])
    failures += _listed("unreadable: ", [f"{path(n)}: {why}" for n, why in res["unreadable"]])
    failures += _listed("wrong shape: ", [f"{path(n)}: shape {tuple(s)}, expected ({CHIP_SIZE}, {CHIP_SIZE})"
                                          for n, s in res["shape"]])
    failures += _listed("bad values: ", [f"{path(n)}: values {v} not in {{0, 1}}" for n, v in res["values"]])
    failures += _listed("too large: ", [f"{path(n)}: {b:,} bytes > {MAX_BYTES:,}" for n, b in res["large"]])
    return failures, int(res["regular"])


def _lock(folder: Path, sandbox: Sandbox) -> None:
    """Give main.py's folder back to root before verify reads it as root (nothing can swap a file in then)."""
    if sandbox.uid is None or not folder.is_dir():
        return
    os.chown(folder, 0, 0, follow_symlinks=False)
    os.chmod(folder, 0o755)
    for entry in os.scandir(folder):
        os.chown(entry.path, 0, 0, follow_symlinks=False)


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


def describe(sandbox: Sandbox) -> str:
    """One line: what main.py sees and runs as."""
    if sandbox.kind == "bwrap":
        return ("bubblewrap: main.py sees /codeexecution (its folder, data/ read-only, predictions/ empty and "
                "writable), a private empty /tmp, /var/tmp and /dev/shm, the system's read-only files and its "
                f"interpreter, nothing else of this machine; its own PID, network and IPC namespaces; user "
                f"{sandbox.user}")
    pid = "its own PID namespace" if sandbox.pid_namespace else "its own process group"
    if sandbox.kind == "unshare":
        return f"unshare: {pid} and network namespace; user {sandbox.user}"
    return f"no namespaces: {pid}; user {sandbox.user}"


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
    limits: ZipLimits = ZipLimits(),
) -> VerifyResult:
    """Verify a submission zip end to end (see the module docstring).

    Args:
        zip_path: the submission zip (``main.py`` at its root).
        features: a folder of chip folders (``<chip_id>/B02.tif ...``), the runtime's ``data/test_features``.
        labels: optional folder of ``<chip_id>.tif`` labels; when given, the pooled Jaccard is computed.
        python: interpreter for main.py (default: the current one; ``runtime_python()`` for the runtime's).
        timeout: seconds main.py may run (the runtime allows 4 hours); the prediction check gets what is left.
        echo: where progress and main.py's streamed output go; the last line echoed is ``result.last_line``.
        keep: run in this (new or empty) folder and leave it in place, instead of a deleted temporary one.
        allow_network_check_skip: where no network namespace can be made, run anyway with the audit hook as
            the only network check (weaker: a ``python -I`` child is not seen) instead of failing.
        limits: what the zip may unpack to (checked from its directory before unpacking).

    Raises:
        KeyboardInterrupt: Ctrl-C, or ``Interrupted`` on SIGTERM; main.py's sandbox is ended and verify's
            folders are removed first.
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

    zip_problems, safe = check_zip(zip_path, limits)
    result.failures += zip_problems
    for p in zip_problems:
        echo(f"FAIL {p}")
    if not safe or any("main.py is not at the zip root" in p for p in zip_problems) or \
            any("not a readable zip" in p for p in zip_problems):
        echo("nothing was unpacked")
        echo(result.last_line)
        return result

    janitor = Janitor()  # removes the folders below and ends main.py's sandbox should verify die first
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cloudseg-verify-"))
    if not keep:
        janitor.remove(work)
    work.mkdir(parents=True, exist_ok=True)
    hold = Path(tempfile.mkdtemp(prefix="cloudseg-verify-mounts-"))  # outside any folder the user cannot enter
    janitor.remove(hold)
    layout = Layout(work, hold, Path(labels).resolve() if labels is not None else None)
    codeexecution, data, pred_dir = layout.codeexecution, layout.codeexecution / "data", layout.predictions
    net_dir = layout.network
    weaker: list[str] = []
    proxy = None
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):  # noqa: ARG001
            raise Interrupted(f"verify received signal {signum}")

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for folder in (work, hold):
            os.chmod(folder, 0o755)  # mkdtemp makes them 0700: the unprivileged user must enter them
        sandbox = make_sandbox(python, layout)
        result.network, result.sandbox, result.reduced = sandbox.network, describe(sandbox), sandbox.reduced
        echo(f"python: {python}")
        echo(f"sandbox: {result.sandbox}")
        echo(f"network: {result.network}")
        for r in sandbox.reduced:
            echo(f"WARNING reduced protection: {r}")
        if not sandbox.isolated and not allow_network_check_skip:
            result.failures.append(
                f"no network namespace for main.py ({sandbox.weaker[0]}); run verify where `unshare -n` "
                "works (e.g. as root), or pass --allow-network-check-skip to accept the weaker check")
            raise _Stop
        weaker += sandbox.weaker
        need, free = unpacked_size(zip_path), free_bytes(work)
        if need > free:
            result.failures.append(f"the zip unpacks to {need:,} bytes; {work} has {free:,} free")
            raise _Stop
        try:
            extract(zip_path, codeexecution)
        except Exception as exc:  # BadZipFile (CRC), zlib.error, a directory that lies about sizes
            result.failures.append(f"{zip_path}: does not unpack ({exc})")
            raise _Stop
        shutil.copytree(features, data / "test_features", symlinks=False)
        metadata = features.with_name(features.name.removesuffix("_features") + "_metadata.csv")
        if features.name.endswith("_features") and metadata.is_file():  # chip times, for STAC-band submissions
            shutil.copyfile(metadata, data / "test_metadata.csv")
        stac = _stac_of(codeexecution)
        allow_hosts = _endpoint_hosts(str(stac.get("url") or "")) if stac else []
        allow_hosts += [str(h) for h in (stac or {}).get("asset_hosts") or []]
        relay = None
        if stac and sandbox.can_relay:  # a door out of the namespace
            from cloudseg.submission.netproxy import RELAY, AllowProxy

            layout.proxy.mkdir(mode=0o700)
            proxy = AllowProxy(layout.proxy / "stac.sock", allow_hosts, NETWORK_MARK)
            (hold / "relay.py").write_text(RELAY)
            os.chmod(hold / "relay.py", 0o644)
            relay = [inside_python(python), "-I", sandbox.path(hold / "relay.py"), str(RELAY_PORT),
                     sandbox.path(proxy.path)]
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
        os.chmod(write_network_guard(layout.guard), 0o755)
        os.chmod(layout.guard / "sitecustomize.py", 0o644)
        scratch = [pred_dir, net_dir] + ([] if sandbox.kind == "bwrap" else [work / "home", work / "home" / "tmp"])
        for folder in scratch:
            _own(folder, sandbox, 0o755 if folder == pred_dir else 0o700)
        writable = {data, *scratch, layout.proxy}
        _set_submission_mode(codeexecution, writable, writable=False)
        env, withheld = sandbox_env(sandbox.home, sandbox.path(codeexecution), sandbox.path(layout.guard),
                                    sandbox.path(net_dir / "network.log"), allow_hosts,
                                    f"http://127.0.0.1:{RELAY_PORT}" if proxy else None, tmp=sandbox.tmp)
        passed = sorted(k for k in env if k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES))
        echo(f"user: {sandbox.user}; environment: allow-listed {passed}, HOME and TMPDIR in {sandbox.home}, "
             f"verify's own settings; withheld from main.py: {', '.join(withheld) or 'none'}")
        probe = _probe(sandbox, python, env)
        if probe:
            result.failures.append(probe)
            raise _Stop
        before_files = _snapshot(work, writable)
        echo(f"time limit: {timeout:.0f} s; running main.py in {codeexecution}")
        start = time.time()
        run = _run_main(sandbox, sandbox.command([inside_python(python), "main.py"], relay), codeexecution, env,
                        timeout, echo, janitor)
        result.returncode, result.timed_out, result.wall_s, result.log = (run.returncode, run.timed_out,
                                                                          run.wall_s, run.lines)
        if result.timed_out:
            result.failures.append(f"main.py exceeded the time limit of {timeout:.0f} s and was killed, with "
                                   "every process it had started")
        elif run.returncode != 0:
            last = next((ln.strip() for ln in reversed(result.log) if ln.strip() and LEFTOVER_MARK not in ln), "")
            result.failures.append(f"main.py exited with status {run.returncode}" + (f" (last line: {last[:300]})"
                                                                                    if last else ""))
        if run.left:
            result.failures.append(f"main.py left {len(run.left)} process(es) running when it ended: "
                                   f"{', '.join(run.left[:MAX_LISTED])} (all ended with its sandbox; the runtime "
                                   "would not wait for them either)")
        if run.survived:
            result.failures.append(f"still running after main.py's sandbox ended, killed by verify: "
                                   f"{', '.join(run.survived[:MAX_LISTED])}")
        attempts = [ln for ln in result.log if NETWORK_MARK in ln]
        if proxy:
            attempts += proxy.refused
            echo(f"network: {len(proxy.passed)} connection(s) through the STAC proxy, {len(proxy.refused)} refused")
        net_log = net_dir / "network.log"
        if net_log.is_file() and not net_log.is_symlink():
            with open(net_log, errors="replace") as fh:
                attempts += fh.read(1 << 20).splitlines()
        if attempts:
            result.failures.append(f"main.py tried to use the network: {attempts[0]}")
        written = _writes_elsewhere(before_files, _snapshot(work, writable))  # before chmod touches ctimes
        _set_submission_mode(codeexecution, writable, writable=True)
        result.failures += _listed("main.py wrote outside predictions/ and its scratch folders: ", written)
        _set_tree_mode(data, writable=True)
        after = hash_tree(data)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            result.failures += _listed("main.py changed the read-only data: ",
                                       [str(data / c) for c in changed])

        left_s = max(CHECK_MIN_S, start + timeout - time.time())
        pred_failures, result.n_predictions = check_predictions(sandbox, python, ids, env, left_s)
        result.failures += pred_failures
        result.chips_per_s, result.chips_per_s_source, result.projected_s = _throughput(
            result.log, result.n_predictions, result.wall_s)

        if labels is not None and not pred_failures:
            from cloudseg.metrics import score_folders

            _lock(pred_dir, sandbox)
            try:
                result.jaccard = score_folders(pred_dir, labels).score()
            except Exception as exc:  # missing predictions for labels, empty union, a bad label
                result.failures.append(f"scoring against {labels} failed: {exc}")
    except _Stop:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if proxy is not None:
            proxy.close()
        if codeexecution.exists():
            _set_submission_mode(codeexecution, {data}, writable=True)
        if data.exists():
            _set_tree_mode(data, writable=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(hold, ignore_errors=True)
        janitor.close()

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
    for r in result.reduced:
        echo(f"WARNING reduced protection: {r}")
    echo(result.last_line)
    return result


RELAY_PORT = 3128  # inside main.py's own network namespace, where nothing else listens


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
    try:
        with open(codeexecution / "assets" / "inference.json", errors="replace") as fh:
            return json.loads(fh.read(1 << 20)).get("stac") or None
    except (OSError, ValueError, AttributeError):
        return None


class _Stop(Exception):
    """A sandbox problem that ends the run before main.py starts; already recorded as a failure."""


def _probe(sandbox: Sandbox, python: str, env: dict) -> str:
    """'' when ``python`` starts in the sandbox and can read the submission and the data; else the failure."""
    code = ("import os, sys\n"
            "root = os.environ['CLOUDSEG_ROOT']\n"
            "open(os.path.join(root, 'main.py'), 'rb').close()\n"
            "os.listdir(os.path.join(root, 'data', 'test_features'))\n")
    try:
        rc, out = _run_quiet(sandbox, sandbox.command([inside_python(python), "-c", code]),
                             sandbox.layout.codeexecution, env, 120)
    except OSError as exc:
        return f"{python} does not start as user {sandbox.user} in the sandbox: {exc}"
    if rc is None:
        return f"{python} did not start within 120 s as user {sandbox.user} in the sandbox"
    if rc:
        why = (out.strip().splitlines() or [f"exit {rc}"])[-1]
        return (f"{python} cannot run main.py as user {sandbox.user} in the sandbox: {why[:300]} "
                "(the interpreter, the submission and the data must be readable by that user)")
    return ""
