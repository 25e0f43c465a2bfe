"""The one way out of verify's network namespace: an allow-listing HTTP proxy for a STAC submission.

A submission whose models read supplementary bands fetches them from a STAC API, the only network the competition
runtime allows. To run it under verify with that endpoint reachable and nothing else, main.py's namespace keeps its
isolation and gets one door:

* inside the namespace, ``RELAY`` (run by the sandbox's launcher, as root where verify is, before main.py starts
  as the unprivileged user) brings the loopback interface up where it is down, listens on ``127.0.0.1:<port>``
  and carries each connection, byte for byte, to a Unix socket in verify's work folder (Unix sockets live in the
  file system, not in a network namespace); it exits when main.py does;
* outside, ``AllowProxy`` serves that socket as an HTTP proxy: ``CONNECT host:port`` (HTTPS) and absolute-URI
  requests (HTTP) pass only when ``host`` matches an allowed pattern (the STAC API's host and the asset hosts its
  submission declares); anything else gets 403 and is recorded, and verify reports it as a network use;
* main.py's environment names the relay as ``HTTP(S)_PROXY`` (requests, and libcurl under GDAL, honour it).

Plain-HTTP requests are forwarded with ``Connection: close``, so a kept-alive connection can never carry a second
request to another host past the check.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import socket
import threading
from pathlib import Path

HEAD_LIMIT = 64 * 1024
CONNECT_TIMEOUT_S = 30.0


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for sock in (a, b):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# Run inside the namespace by the sandbox's launcher: python RELAY PORT SOCKET PID. Binds before it forks and
# prints the child's pid, so the launcher continues only once the port listens; the child relays until process
# PID (the launcher) is gone. It carries bytes with the proxy's own _pipe (its source is put into the script: the
# relay runs with the sandbox's interpreter, which cannot import cloudseg).
_RELAY = r'''
import fcntl, os, socket, struct, sys, threading, time
port, target, watch = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
# a socket path is limited to 107 bytes: reach it through its folder's descriptor, whatever the folder's depth
folder = os.open(os.path.dirname(target) or ".", os.O_RDONLY | os.O_DIRECTORY)
target = "/proc/self/fd/%d/%s" % (folder, os.path.basename(target))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
if not flags & 0x1:  # bubblewrap brings loopback up itself; unshare -n leaves it down
    fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH", b"lo", flags | 0x1))  # SIOCSIFFLAGS: IFF_UP
s.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(64)
child = os.fork()
if child:
    print(child, flush=True)  # the launcher leaves the relay out of the processes main.py left behind
    os._exit(0)
devnull = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(devnull, fd)

# PIPE
def serve(conn):
    up = socket.socket(socket.AF_UNIX)
    try:
        up.connect(target)
    except OSError:
        conn.close()
        return
    threading.Thread(target=_pipe, args=(conn, up), daemon=True).start()
    _pipe(up, conn)

def accept():
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
while True:
    try:
        os.kill(watch, 0)
    except OSError:
        os._exit(0)
    time.sleep(0.5)
'''


def _relay_script() -> str:
    head, body = _RELAY.split("# PIPE\n")
    return head + inspect.getsource(_pipe) + "\n" + body


RELAY = _relay_script()


def host_allowed(host: str, patterns: list[str]) -> bool:
    """Whether ``host`` matches one of ``patterns`` (exact names or addresses, or globs like ``*.blob.core...``)."""
    host = host.strip("[]").lower()
    return any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


class AllowProxy:
    """An HTTP proxy on a Unix socket that lets through only ``allowed`` hosts; ``refused`` lists the rest."""

    def __init__(self, path: Path, allowed: list[str], mark: str):
        self.path, self.allowed, self.mark = Path(path), list(allowed), mark
        self.refused: list[str] = []
        self.passed: list[str] = []
        self._lock = threading.Lock()
        self.path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:  # a socket path is limited to 107 bytes: bind through the folder's descriptor, whatever its depth
            self.server.bind(f"/proc/self/fd/{folder}/{self.path.name}")
        finally:
            os.close(folder)
        os.chmod(self.path, 0o600)
        self.server.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, name="allow-proxy", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self.server.close()
        finally:
            self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _refuse(self, conn: socket.socket, what: str) -> None:
        with self._lock:
            self.refused.append(f"{self.mark} proxy refused {what} (not the declared STAC endpoint)")
        body = f"cloudseg verify: {what} is not the submission's declared STAC endpoint\n".encode()
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data or len(head) > HEAD_LIMIT:
                    conn.close()
                    return
                head += data
            head, rest = head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = (lines[0].split(" ", 2) + ["", ""])[:3]
            if method.upper() == "CONNECT":
                host, _, port = target.rpartition(":")
                port_n = int(port) if port.isdigit() else 443
                if not host_allowed(host, self.allowed):
                    return self._refuse(conn, target)
                upstream = socket.create_connection((host.strip("[]"), port_n), timeout=CONNECT_TIMEOUT_S)
                upstream.settimeout(None)
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:
                from urllib.parse import urlsplit

                url = urlsplit(target)
                if url.scheme != "http" or not url.hostname:
                    return self._refuse(conn, target[:200])
                if not host_allowed(url.hostname, self.allowed):
                    return self._refuse(conn, f"{url.hostname}:{url.port or 80}")
                upstream = socket.create_connection((url.hostname, url.port or 80), timeout=CONNECT_TIMEOUT_S)
                upstream.settimeout(None)
                path = url.path or "/"
                if url.query:
                    path += "?" + url.query
                headers = [h for h in lines[1:] if h.split(":", 1)[0].strip().lower()
                           not in ("proxy-connection", "connection", "keep-alive", "proxy-authorization")]
                out = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close", "", ""])
                upstream.sendall(out.encode("latin-1") + rest)
            with self._lock:
                self.passed.append(target)
            threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
            _pipe(upstream, conn)
        except OSError:
            try:
                conn.close()
            except OSError:
                pass
