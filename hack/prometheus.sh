#!/usr/bin/env bash
# Install Prometheus (which ships promtool) from Debian if it is missing, then print the paths of
# both binaries, one per line: `prometheus=/usr/bin/prometheus` and `promtool=/usr/bin/promtool`.
# The Debian package does not start its service here, and this script does not start it either:
# tests run their own `prometheus` on 127.0.0.1 with a temporary storage folder.
set -euo pipefail

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  log "installing the Debian prometheus package (provides prometheus and promtool)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: the node exporter and friends are not needed to run tests.
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

for bin in prometheus promtool; do
  path=$(command -v "$bin") || { log "ERROR: $bin not found after install"; exit 1; }
  echo "$bin=$path"
done
