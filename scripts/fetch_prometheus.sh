#!/usr/bin/env bash
# Prometheus (server + promtool) and docker-compose's Compose-file schema, from Debian's
# packages, unpacked without installing into $KVEVICT_TOOLS_DIR (default
# ~/.cache/vllm-kvevict/tools): no root needed, nothing outside that folder changes.
#   $KVEVICT_TOOLS_DIR/prometheus/usr/bin/{prometheus,promtool}
#   $KVEVICT_TOOLS_DIR/docker-compose/usr/lib/python3/dist-packages/compose/config/compose_spec.json
# Used by tests/integration/test_metrics_server.py and tests/unit/test_deploy_files.py (they skip
# when the tools are missing and this script was not run). A few seconds; a no-op when present.
set -euo pipefail
DEST=${KVEVICT_TOOLS_DIR:-$HOME/.cache/vllm-kvevict/tools}
mkdir -p "$DEST"

fetch() {  # fetch PACKAGE CHECK_PATH
  local pkg=$1 check=$2
  if [ -e "$DEST/$pkg/$check" ]; then return 0; fi
  local tmp
  tmp=$(mktemp -d)
  # apt-get download needs the package lists; as root (CI, containers) refresh them once.
  if ! (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || {
      echo "[fetch_prometheus] could not download Debian package $pkg (skipping it)"
      rm -rf "$tmp"
      return 0
    }
  fi
  rm -rf "$DEST/$pkg"
  dpkg -x "$tmp"/"$pkg"_*.deb "$DEST/$pkg"
  rm -rf "$tmp"
  echo "[fetch_prometheus] $pkg unpacked into $DEST/$pkg"
}

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
  echo "[fetch_prometheus] no apt-get/dpkg here: Prometheus tests will be skipped"
  exit 0
fi
fetch prometheus usr/bin/prometheus
fetch docker-compose usr/lib/python3/dist-packages/compose/config/compose_spec.json
