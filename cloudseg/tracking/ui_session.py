"""``make ui`` in a subprocess and a fresh headless Chromium on it: what ``make screenshots`` and the browser test
(``tests/test_ui.py``) share.

    with serve(env) as address:                       # python -m cloudseg.tracking.ui --port 0, as make ui runs it
        with chromium(tmp_dir) as page:               # a first-time browser profile
            page.goto(address)

The browser is the system's Chromium (Debian's ``chromium``; ``scripts/ensure_browser.sh`` installs it where it
can), driven by Playwright; never a browser Playwright downloads.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# a quiet browser: without these Chromium keeps calling home (updates, sync, field trials) from a closed network
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps", "--metrics-recording-only")


class BrowserMissing(RuntimeError):
    """No Chromium or no Playwright here; the message says what to install."""


def find_chromium() -> str:
    """The Chromium executable (``CLOUDSEG_CHROMIUM``, else the first on PATH), or BrowserMissing."""
    given = os.environ.get("CLOUDSEG_CHROMIUM")
    if given:
        if not (Path(given).is_file() and os.access(given, os.X_OK)):
            raise BrowserMissing(f"CLOUDSEG_CHROMIUM={given} is not an executable file")
        return given
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing(f"no Chromium on PATH ({', '.join(CHROMIUM_NAMES)}): run `bash scripts/ensure_browser.sh` "
                         "(Debian/Ubuntu: apt-get install chromium), or set CLOUDSEG_CHROMIUM")


def check_browser() -> str:
    """Chromium's path when both it and Playwright are here, else BrowserMissing saying what is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        raise BrowserMissing("Playwright for Python is missing: pip install -e '.[dev]' (make setup)") from exc
    return find_chromium()


@contextlib.contextmanager
def serve(env: dict | None = None, timeout_s: float = 180) -> Iterator[str]:
    """Run ``python -m cloudseg.tracking.ui --port 0`` (``make ui`` on a free port) with ``env`` (e.g.
    ``MLFLOW_TRACKING_URI`` of a throw-away store) and yield the address it prints, once the server answers."""
    proc = subprocess.Popen([sys.executable, "-m", "cloudseg.tracking.ui", "--port", "0"],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []

    def drain() -> None:  # keep reading, or a chatty server blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline, address = time.time() + timeout_s, None
        while address is None or not _answers(address):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"make ui's server did not come up (exit {proc.poll()}):\n"
                                   + "".join(lines)[-3000:])
            if address is None:
                found = [m.group(1) for ln in list(lines) if (m := re.search(r"\[ui\] open (http\S+)", ln))]
                address = found[0] if found else None
            time.sleep(0.3)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _answers(address: str) -> bool:
    root = re.match(r"https?://[^/#?]+", address).group(0)
    try:
        with urllib.request.urlopen(root + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def chromium(profile_dir: Path | str, width: int = 1400, height: int = 900) -> Iterator[object]:
    """A page of a headless Chromium with a fresh profile in ``profile_dir`` (a first-time user's browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile_dir), executable_path=check_browser(),
                                                    headless=True, args=list(CHROMIUM_ARGS),
                                                    viewport={"width": width, "height": height})
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()
