#!/usr/bin/env bash
# verify-submission runs main.py in a bubblewrap sandbox (README, "The competition runtime"): a private file system,
# PID and network namespaces. Install Debian's bubblewrap where it is missing and this user can (root with
# apt-get); otherwise say so: verify still runs, names the protections it lacks and what it still checks.
#
# Usage: bash scripts/ensure_bwrap.sh   (exit 0: bwrap is there; 1: it is not)
set -uo pipefail

log() { echo "[bwrap] $*"; }

if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing Debian's bubblewrap (verify-submission's sandbox)"
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap >/dev/null 2>&1; }
  if install || { apt-get update -q >/dev/null 2>&1 && install; }; then
    log "$(bwrap --version)"
    exit 0
  fi
fi
log "bubblewrap is not installed (sudo apt-get install bubblewrap): verify-submission will run main.py with" \
    "reduced protection and say which" >&2
exit 1
