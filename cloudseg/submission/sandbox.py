"""Where verify-submission runs main.py: its own file system, processes and network, as an unprivileged user.

Preferred: bubblewrap (``bwrap``, Debian's ``bubblewrap``, the sandbox Flatpak uses) builds main.py a new root:

* ``/codeexecution`` (its unpacked folder, read-only), ``/codeexecution/data`` (read-only),
  ``/codeexecution/predictions`` (the one writable folder on disk), a private empty ``/tmp``, ``/var/tmp`` and
  ``/dev/shm`` (tmpfs: gone with the sandbox), the system's read-only files (``/usr``, ``/etc``, ``/lib*``,
  ``/sys``), a minimal ``/dev`` (plus the NVIDIA devices where there are some), its own ``/proc``, and the
  interpreter's folders read-only; nothing else of the machine: no labels, no home, no project folder;
* its own PID namespace (when the launcher ends, the kernel ends every process left in it; the launcher names
  them first), network namespace (loopback only), IPC and UTS namespaces; ``--die-with-parent`` ends it all
  when verify itself dies;
* as root, main.py runs as ``nobody`` (``setpriv``: every capability dropped, no new privileges); otherwise as the
  calling user inside a user namespace.

Where bubblewrap is missing or cannot start, ``unshare`` (util-linux) gives network and PID namespaces and, as
root, a mount namespace in which the labels folder, ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are covered by empty
tmpfs (and folders ``nobody`` cannot enter too, binding back only the interpreter's); where no namespace can be
made at all, main.py runs in its own process group, which verify ends after it. ``Sandbox.reduced`` says which
protection is missing and what is still checked.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BWRAP = "bwrap"  # bubblewrap; tests point it at a missing name for the fallback paths
UNSHARE = "unshare"  # util-linux; likewise
UNPRIVILEGED_USER = "nobody"  # whom main.py runs as when verify runs as root
LEFTOVER_MARK = "cloudseg-verify: left running:"
INSIDE_ROOT = "/codeexecution"  # main.py's folder as the runtime (and bubblewrap) shows it
INSIDE_VERIFY = "/cloudseg-verify"  # verify's own files inside the bubblewrap sandbox
# The system's read-only files main.py may see (and nothing else of the host's file system but its interpreter).
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/sys")
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable places, private to main.py where it can be had


@dataclass
class Layout:
    """Verify's folders on the host, and the labels main.py must not see."""

    work: Path  # verify's folder: codeexecution/, network/, proxy/ (and home/ outside bubblewrap)
    hold: Path  # launcher scripts, the relay, mount points; outside any folder the user cannot enter
    labels: Path | None = None

    @property
    def codeexecution(self) -> Path:
        return self.work / "codeexecution"

    @property
    def predictions(self) -> Path:
        return self.codeexecution / "predictions"

    @property
    def network(self) -> Path:
        return self.work / "network"

    @property
    def proxy(self) -> Path:
        return self.work / "proxy"

    @property
    def guard(self) -> Path:
        return self.hold / "guard"


@dataclass
class Sandbox:
    """How main.py (and verify's checks of its output) are started, and what that amounts to."""

    kind: str  # "bwrap", "unshare" or "none"
    layout: Layout
    user: str
    network: str
    isolated: bool  # main.py has its own network namespace
    pid_namespace: bool  # no process outlives the sandbox
    private_fs: bool  # main.py sees only its folders, its interpreter and the system's files
    uid: int | None = None  # the user main.py runs as, when verify (root) switches users
    gid: int | None = None
    unshare: list[str] = field(default_factory=list)  # the unshare command that works here
    drop: list[str] = field(default_factory=list)  # setpriv prefix, for a launcher running as root
    mounts: list[str] = field(default_factory=list)  # shell lines of the root unshare launcher
    popen: dict = field(default_factory=dict)  # extra subprocess.Popen keywords
    weaker: list[str] = field(default_factory=list)  # network checks not made (see --allow-network-check-skip)
    reduced: list[str] = field(default_factory=list)  # other protections missing, and what is still checked
    python_dirs: list[Path] = field(default_factory=list)  # the interpreter's folders (bubblewrap binds them)
    _n: int = 0

    @property
    def can_relay(self) -> bool:
        """Whether a relay to the STAC proxy can listen inside main.py's network namespace."""
        return self.isolated and (self.kind == "bwrap" or self.uid is not None)

    def path(self, host: Path) -> str:
        """Where main.py sees ``host`` (one of the layout's folders, or a file in one)."""
        if self.kind != "bwrap":
            return str(host)
        lay = self.layout
        for base, inside in ((lay.codeexecution, INSIDE_ROOT), (lay.hold, f"{INSIDE_VERIFY}/hold"),
                             (lay.network, f"{INSIDE_VERIFY}/network"), (lay.proxy, f"{INSIDE_VERIFY}/proxy")):
            if host == base or base in host.parents:
                return inside + ("/" + str(host.relative_to(base)) if host != base else "")
        raise ValueError(f"{host} is not inside the sandbox")

    @property
    def home(self) -> str:
        return "/tmp" if self.kind == "bwrap" else str(self.layout.work / "home")

    @property
    def tmp(self) -> str:
        return "/tmp" if self.kind == "bwrap" else str(self.layout.work / "home" / "tmp")

    def command(self, argv: list[str], relay: list[str] | None = None, writable: bool = True) -> list[str]:
        """The command line that runs ``argv`` (paths as main.py sees them) in the sandbox.

        Args:
            relay: for a STAC submission, the relay's command, started inside the network namespace first.
            writable: predictions/ writable (main.py) or read-only (verify's check of the predictions).
        """
        self._n += 1
        script = self.layout.hold / f"launch-{self._n}.sh"
        script.write_text(launcher(self, relay))
        os.chmod(script, 0o644)
        inside = self.path(script) if self.kind == "bwrap" else str(script)
        if self.kind == "bwrap":
            return bwrap_argv(self, writable) + ["--", "/bin/sh", inside, *argv]
        if self.kind == "unshare":
            return self.unshare + ["--", "/bin/sh", inside, *argv]
        return ["/bin/sh", inside, *argv]


def launcher(sandbox: Sandbox, relay: list[str] | None) -> str:
    """The shell script that starts ``"$@"`` in the sandbox, then names the processes it left behind.

    It runs as PID 2 (bubblewrap) or PID 1 (unshare) of main.py's PID namespace, as root when verify is: so the
    user main.py runs as cannot end it or hide from it. Processes other than itself, PID 1 and the relay are
    what main.py left running; once the script ends, the kernel ends them with the namespace.
    """
    lines = ["# written by cloudseg verify-submission", *sandbox.mounts, "set +e", "relay="]
    if relay:
        cmd = " ".join(_q(a) for a in relay)
        lines.append(f'relay=$({cmd} $$) || {{ echo "cloudseg-verify: the STAC relay did not start" >&2; exit 125; }}')
    lines += [" ".join(_q(a) for a in sandbox.drop) + ' "$@"' if sandbox.drop else '"$@"', "rc=$?"]
    if sandbox.pid_namespace:
        lines += [
            "for d in /proc/[0-9]*; do",
            "  p=${d#/proc/}",
            '  case " 1 $$ $relay " in *" $p "*) continue;; esac',
            '  line=; read -r line < "$d/stat" 2>/dev/null || continue',
            "  state=${line##*) }; state=${state%% *}",
            '  [ "$state" = Z ] && continue',  # ended, not yet reaped
            "  name=${line#*(}; name=${name%)*}",
            f'  echo "{LEFTOVER_MARK} pid $p ($name)"',
            "done",
        ]
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def _q(text: str | Path) -> str:
    return "'" + str(text).replace("'", "'\\''") + "'"


# ------------------------------------------------------------------------------------------------- bubblewrap

def bwrap_argv(sandbox: Sandbox, writable: bool) -> list[str]:
    """bubblewrap's options for main.py's root (see the module docstring)."""
    lay = sandbox.layout
    args = [shutil.which(BWRAP) or BWRAP, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    made: set[str] = {"/"}

    def dirs_to(path: str) -> None:  # every folder above a mount point, enterable by main.py's user
        for parent in reversed(Path(path).parents):
            if str(parent) not in made:
                made.add(str(parent))
                args.extend(["--perms", "0755", "--dir", str(parent)])

    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
        made.add(d)
    args += ["--dev", "/dev", "--proc", "/proc"]
    made |= {"/dev", "/proc"}
    for d in TMP_DIRS:
        dirs_to(d)
        args += ["--perms", "1777", "--tmpfs", d]
    for dev in sorted(glob.glob("/dev/nvidia*")):  # the GPU, for a main.py that uses CUDA
        args += ["--dev-bind", dev, dev]
    for d in interpreter_binds(sandbox):
        dirs_to(d)
        args += ["--ro-bind", d, d]
        made.add(d)
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):  # on the allow-list: where CUDA may live
        if d and os.path.isabs(d) and not _under(d, made):
            dirs_to(d)
            args += ["--ro-bind-try", d, d]
    dirs_to(f"{INSIDE_VERIFY}/x")
    dirs_to(f"{INSIDE_ROOT}/x")
    args += ["--ro-bind", str(lay.codeexecution), INSIDE_ROOT,
             "--bind" if writable else "--ro-bind", str(lay.predictions), f"{INSIDE_ROOT}/predictions",
             "--ro-bind", str(lay.hold), f"{INSIDE_VERIFY}/hold"]
    if writable:
        args += ["--bind", str(lay.network), f"{INSIDE_VERIFY}/network"]
        if lay.proxy.is_dir():
            args += ["--bind", str(lay.proxy), f"{INSIDE_VERIFY}/proxy"]
    return args + ["--chdir", INSIDE_ROOT]


def _under(path: str, roots: set[str]) -> bool:
    p = Path(path)
    return any(r != "/" and (p == Path(r) or Path(r) in p.parents) for r in roots)


def interpreter_binds(sandbox: Sandbox) -> list[str]:
    """The interpreter's folders outside the system's, outermost only (bound read-only where they are)."""
    dirs = sorted({str(p) for p in sandbox.python_dirs})
    out: list[str] = []
    for d in dirs:
        if not _under(d, set(SYSTEM_DIRS) | set(out)):
            out.append(d)
    return out



def interpreter_dirs(python: str) -> list[Path]:
    """Folders ``python`` needs (resolved): its base installation, its prefix (a venv), its real executable's."""
    code = ("import os, sys; print(sys.base_prefix); print(sys.prefix); "
            "print(os.path.realpath(sys.executable))")
    r = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise FileNotFoundError(f"{python} does not run: {(r.stderr.strip() or r.stdout.strip())[:300]}")
    base, prefix, exe = r.stdout.strip().splitlines()[-3:]
    return [Path(base).resolve(), Path(prefix).resolve(), Path(exe).parent, Path(python).parent.resolve()]


def inside_python(python: str) -> str:
    """``python`` by its folder's real path: the sandbox binds the real folders, not the links to them."""
    return str(Path(python).parent.resolve() / Path(python).name)


def _bwrap_works(root: bool) -> str:
    """'' when bubblewrap can make the sandbox's namespaces here, else why not."""
    bwrap = shutil.which(BWRAP)
    if not bwrap:
        return f"{BWRAP} is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent"]
    for d in ("/usr", "/bin", "/lib", "/lib64"):
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    try:
        r = subprocess.run(cmd + ["--proc", "/proc", "--", "/bin/sh", "-c", "exit 0"], capture_output=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{BWRAP} does not start: {exc}"
    if r.returncode:
        why = (r.stderr.decode(errors="replace").strip() or f"exit {r.returncode}").splitlines()[0]
        hint = "" if root else " (it needs unprivileged user namespaces, or run verify as root)"
        return f"{BWRAP} cannot make the sandbox here: {why}{hint}"
    return ""


# ---------------------------------------------------------------------------------------------------- unshare

def network_namespace() -> tuple[list[str] | None, bool, str]:
    """(``unshare`` command, with a PID namespace?, '') where a network namespace can be made, else (None, False, why).

    A user that is not root needs a user namespace too: ``-c`` maps the user to itself (so main.py keeps no
    capabilities once it execs), else ``-r`` (older util-linux). Each is tried with a PID namespace first.
    """
    unshare = shutil.which(UNSHARE)
    if not unshare:
        return None, False, f"{UNSHARE} not installed"
    users = [[]] if os.geteuid() == 0 else [["-c"], ["-r"]]
    pid = ["-p", "-f", "--kill-child", "--mount-proc"]
    mount = ["-m"] if os.geteuid() == 0 else []
    why = ""
    for user in users:
        for extra in (pid, []):
            cmd = [unshare, *user, *mount, "-n", *extra]
            try:
                r = subprocess.run(cmd + ["true"], capture_output=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired) as exc:
                why = str(exc)
                continue
            if r.returncode == 0:
                return cmd, bool(extra), ""
            why = (r.stderr.decode(errors="replace").strip() or f"exit {r.returncode}").splitlines()[0]
    return None, False, why


def closed_ancestor(path: Path) -> Path | None:
    """The topmost folder at or above ``path`` that other users may not enter (no o+x), or None."""
    for p in [*reversed(path.parents), path][1:]:
        if p.is_dir() and not p.stat().st_mode & stat.S_IXOTH:
            return p
    return None


def cover_mounts(keep: list[Path], covers: list[Path], hold: Path) -> list[str]:
    """Shell lines (root, in a fresh mount namespace) hiding each of ``covers`` behind an empty tmpfs, then
    binding back the ``keep`` folders inside them, so those stay where they are and nothing else there shows.

    Each kept folder is first bound to a spot on a small staging tmpfs mounted over a folder outside every cover
    (``/mnt``: the mount namespace is private, so the host's ``/mnt`` is untouched), detached at the end.
    """
    def overlaps(a: Path, b: Path) -> bool:
        return a == b or a in b.parents or b in a.parents

    outer: list[Path] = []
    for c in sorted({c.resolve() for c in covers if c.is_dir()}, key=lambda p: len(p.parts)):
        if not any(o == c or o in c.parents for o in outer):
            outer.append(c)
    stage = next((Path(d) for d in ("/mnt", "/media", "/srv") if Path(d).is_dir()
                  and not any(overlaps(Path(d), p) for p in (*outer, *keep))), None)
    if stage is None:
        stage = hold / "stage"
        stage.mkdir(exist_ok=True)
    lines = ["set -e", f"mount -t tmpfs -o mode=0700,size=1m cloudseg-verify-stage {_q(stage)}"]
    n = 0
    for cover in outer:
        spots = []
        for path in keep:
            if (cover == path or cover in path.parents) and not any(path != k and k in path.parents
                                                                     for k, _ in spots):
                spot = stage / str(n)
                n += 1
                lines += [f"mkdir {_q(spot)}", f"mount --bind {_q(path)} {_q(spot)}"]
                spots.append((path, spot))
        mode = "1777" if str(cover) in TMP_DIRS else "0755"
        lines.append(f"mount -t tmpfs -o mode={mode},size=64m cloudseg-verify {_q(cover)}")
        for path, spot in spots:
            lines += [f"mkdir -p {_q(path)}", f"mount --bind {_q(spot)} {_q(path)}"]
    lines.append(f"umount -R -l {_q(stage)}")
    return lines


# ------------------------------------------------------------------------------------------------- the choice

def make_sandbox(python: str, layout: Layout) -> Sandbox:
    """Choose how main.py runs here (see the module docstring); ``reduced`` lists what is missing."""
    root = os.geteuid() == 0
    uid = gid = None
    user = pwd.getpwuid(os.geteuid()).pw_name
    if root:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
        uid, gid, user = entry.pw_uid, entry.pw_gid, UNPRIVILEGED_USER
    drop = ([shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"] if root else [])
    dirs = interpreter_dirs(python)
    why_bwrap = _bwrap_works(root)
    if not why_bwrap:
        return Sandbox("bwrap", layout, user, "network namespace with loopback only (bubblewrap) + audit-hook guard",
                       True, True, True, uid, gid, drop=drop, python_dirs=dirs)
    missing_fs = (f"no private file system for main.py ({why_bwrap}): it can read whatever user {user} may read "
                  "on this machine")
    unshare, pid_ns, why = network_namespace()
    if unshare:
        network = "network namespace without interfaces (unshare -n) + audit-hook guard"
        if root:
            keep = [p for p in (*dirs, layout.work.resolve(), layout.hold.resolve())]
            covers = [c for c in (closed_ancestor(p) for p in keep) if c is not None]
            covers += [Path(t) for t in TMP_DIRS] + ([layout.labels] if layout.labels else [])
            sb = Sandbox("unshare", layout, user, network, True, pid_ns, False, uid, gid, unshare=unshare,
                         drop=drop, mounts=cover_mounts(keep, covers, layout.hold))
            sb.reduced.append(missing_fs + "; still checked: the labels folder, /tmp, /var/tmp and /dev/shm are "
                              "hidden behind empty private folders, the data is read-only, writes inside verify's "
                              "folder are named, the network is cut")
        else:
            sb = Sandbox("unshare", layout, user, network, True, pid_ns, False, unshare=unshare)
            sb.reduced.append(missing_fs + f", your own files (the labels) included, and write where you may; "
                              "still checked: writes inside verify's folder are named, the network is cut")
        if not pid_ns:
            sb.reduced.append("no PID namespace (unshare -p): a process main.py detaches from its group may "
                              "outlive verify; still checked: its process group is ended and named")
        return sb
    network = f"NOT isolated (no network namespace: {why}); audit-hook guard and dead proxy variables only"
    weaker = [f"network not isolated ({UNSHARE} -n: {why}): the audit hook sees only main.py's own "
              "interpreter, so a child started with python -I could reach the network unseen"]
    popen = {"user": uid, "group": gid, "extra_groups": []} if root else {}
    closed = [(p, closed_ancestor(p)) for p in (*dirs, layout.work.resolve())] if root else []
    closed = [(p, c) for p, c in closed if c is not None]
    if closed:  # without a mount namespace the unprivileged user could not even start the interpreter
        weaker.append(f"main.py ran as root, not {UNPRIVILEGED_USER}: {closed[0][0]} is inside "
                      f"{closed[0][1]}, which {UNPRIVILEGED_USER} cannot enter, and no mount namespace "
                      "can be made to open it")
        popen, uid, gid, user = {}, None, None, pwd.getpwuid(os.geteuid()).pw_name
    sb = Sandbox("none", layout, user, network, False, False, False, uid, gid, popen=popen, weaker=weaker)
    sb.reduced.append(missing_fs)
    sb.reduced.append("no PID namespace: a process main.py detaches from its group may outlive verify; still "
                      "checked: its process group is ended and named")
    return sb


# --------------------------------------------------------------------------------------------- the processes

def namespace_of(proc: subprocess.Popen, sandbox: Sandbox, info_fd: int | None) -> str | None:
    """The PID namespace main.py runs in ('pid:[N]'), to find what is left in it; None without one."""
    if info_fd is not None:  # bubblewrap writes {"child-pid": ..., "pid-namespace": N} once it has made it
        raw = b""
        while True:
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            raw += chunk
            try:
                return f"pid:[{json.loads(raw)['pid-namespace']}]"
            except (ValueError, KeyError):
                continue
        return None
    if sandbox.kind != "unshare" or not sandbox.pid_namespace:
        return None
    host = os.readlink("/proc/self/ns/pid")
    for _ in range(400):  # unshare makes it a moment after it starts
        try:
            ns = os.readlink(f"/proc/{proc.pid}/ns/pid_for_children")
        except OSError:
            return None
        if ns != host:
            return ns
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return None


def processes_in(namespace: str) -> list[tuple[int, str]]:
    """(pid, name) of every process in PID namespace ``namespace``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry}/comm") as fh:
                found.append((int(entry), fh.read().strip()))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def end_leftovers(namespace: str | None, pgid: int) -> list[str]:
    """Kill what is left of main.py's sandbox after its launcher ended; one line per process found alive."""
    left: list[str] = []
    if namespace:
        deadline = time.time() + 5  # the kernel is ending them as the namespace's first process exits
        while time.time() < deadline:
            alive = processes_in(namespace)
            if not alive:
                break
            time.sleep(0.05)
        for pid, name in processes_in(namespace):
            left.append(f"pid {pid} ({name})")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    try:
        os.killpg(pgid, 0)
    except OSError:
        return left
    left.append(f"process group {pgid}")
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    return left


# ---------------------------------------------------------------------------------------------------- janitor

_JANITOR = r'''
import os, shutil, signal, stat, sys
fd = int(sys.argv[1])
groups, paths, buf = [], [], b""
while True:
    chunk = os.read(fd, 65536)
    if not chunk:
        break
    buf += chunk
    *lines, buf = buf.split(b"\n")
    for line in lines:
        kind, _, arg = line.decode("utf-8", "surrogateescape").partition(" ")
        if kind == "done":
            sys.exit(0)
        (groups if kind == "kill" else paths).append(arg)
for g in groups:
    try:
        os.killpg(int(g), signal.SIGKILL)
    except OSError:
        pass
def writable(func, path, exc):
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass
for p in paths:
    shutil.rmtree(p, onerror=writable)
'''


class Janitor:
    """A process that ends main.py's sandbox and removes verify's folders if verify dies before it has.

    It reads orders from a pipe; when the pipe closes without ``done`` (verify killed, even with SIGKILL), it
    carries them out. Its own session keeps it out of a Ctrl-C meant for verify's process group.
    """

    def __init__(self) -> None:
        r, self._w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _JANITOR, str(r)], pass_fds=(r,),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(r)

    def _send(self, line: str) -> None:
        os.write(self._w, (line + "\n").encode("utf-8", "surrogateescape"))

    def remove(self, path: Path) -> None:
        self._send(f"rm {path}")

    def end_group(self, pgid: int) -> None:
        self._send(f"kill {pgid}")

    def close(self) -> None:
        """verify has cleaned up itself: the janitor leaves without doing anything."""
        try:
            self._send("done")
        finally:
            os.close(self._w)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
