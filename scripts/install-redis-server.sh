#!/usr/bin/env bash
# Installs Debian's redis-server when it is missing, without starting the system
# service: `personalize stack up` runs its own redis-server on loopback, and a
# service auto-started by the package would take the default port 6379.
set -euo pipefail
bash "$(dirname "$0")/install-debian-package.sh" redis-server redis-server
redis-server --version
