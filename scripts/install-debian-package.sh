#!/usr/bin/env bash
# Installs a Debian package when the command it provides is missing, without starting any
# system service it ships (a service auto-started by a package would take a default port the
# local stack uses).   Usage: install-debian-package.sh COMMAND PACKAGE
set -euo pipefail
command=$1
package=$2
if command -v "$command" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$command is missing and this is not a Debian-like system: install $package and re-run" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "$command is missing: run 'apt-get install $package' as root, then re-run" >&2
    exit 1
  fi
fi
echo "installing $package from Debian's packages (no service started)"
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
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$package" >/dev/null
command -v "$command" >/dev/null
