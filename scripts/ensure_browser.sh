#!/usr/bin/env bash
# A headless Chromium for the browser test (tests/test_ui.py) and `make screenshots`: the system's own package
# (Debian/Ubuntu: chromium), installed with apt where it is missing and this shell is root; never a browser build
# that Playwright downloads. Exits 1, saying why, where none can be had (the browser test then skips, or fails
# under CI=true).
set -euo pipefail
if [ -n "${CLOUDSEG_CHROMIUM:-}" ]; then
  [ -x "$CLOUDSEG_CHROMIUM" ] && exit 0
  echo "[browser] CLOUDSEG_CHROMIUM=$CLOUDSEG_CHROMIUM is not executable" >&2; exit 1
fi
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[browser] installing Debian's chromium with apt-get (once; a few minutes)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq chromium >/dev/null && command -v chromium >/dev/null; then
    exit 0
  fi
fi
echo "[browser] no Chromium here and none can be installed (needs apt-get as root): install the chromium package" \
  "or set CLOUDSEG_CHROMIUM to a Chromium/Chrome executable" >&2
exit 1
