#!/usr/bin/env bash
# Installs Debian's redis-server when it is missing, without starting the system
# service: `personalize stack up` runs its own redis-server on loopback, and a
# service auto-started by the package would take the default port 6379.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "redis-server is missing and this is not a Debian-like system: install redis-server (7.x) and re-run" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "redis-server is missing: run 'apt-get install redis-server' as root, then re-run" >&2
    exit 1
  fi
fi
echo "installing redis-server from Debian's packages (service not started)"
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends redis-server >/dev/null
command -v redis-server >/dev/null
redis-server --version
