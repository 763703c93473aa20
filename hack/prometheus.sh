#!/usr/bin/env bash
# A throwaway Prometheus for tests: installs Debian's `prometheus` package when the binary is missing, then
# runs it in the foreground on loopback with the given config and a fresh temporary TSDB.
#
#   hack/prometheus.sh install                      # only make sure the binary exists; prints its path
#   hack/prometheus.sh run CONFIG PORT [DATA_DIR [EXTRA_FLAG...]]
#       exec prometheus on 127.0.0.1:PORT (SIGTERM stops it); extra flags go to prometheus, e.g.
#       --web.config.file=web.yml for basic auth
#
# The caller (a pytest fixture) owns the process: `run` execs, so its PID is Prometheus's PID.
set -euo pipefail

find_prometheus() {
  if command -v prometheus >/dev/null 2>&1; then command -v prometheus; return 0; fi
  [ -x /usr/bin/prometheus ] && { echo /usr/bin/prometheus; return 0; }
  return 1
}

install_prometheus() {
  if find_prometheus >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "error: prometheus is not installed and installing it needs root (apt-get install -y prometheus)" >&2
    exit 2
  fi
  echo "[prometheus] installing Debian's prometheus package ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  # The package's postinst would start a system service; there is no init here and we want none.
  if ! apt-get install -y --no-install-recommends prometheus >&2; then
    echo "[prometheus] apt-get install failed; refreshing the package lists and retrying ..." >&2
    apt-get update >&2
    apt-get install -y --no-install-recommends prometheus >&2
  fi
  find_prometheus >/dev/null || { echo "error: prometheus still not found after install" >&2; exit 2; }
}

case "${1:-}" in
  install)
    install_prometheus
    find_prometheus
    ;;
  run)
    config="${2:?usage: hack/prometheus.sh run CONFIG PORT [DATA_DIR]}"
    port="${3:?usage: hack/prometheus.sh run CONFIG PORT [DATA_DIR]}"
    data="${4:-$(mktemp -d -t prometheus-data.XXXXXX)}"
    shift 3; [ $# -gt 0 ] && shift
    [ -f "$config" ] || { echo "error: config file $config does not exist" >&2; exit 2; }
    case "$port" in ''|*[!0-9]*) echo "error: PORT must be a number, got '$port'" >&2; exit 2;; esac
    install_prometheus
    exec "$(find_prometheus)" \
      --config.file="$config" \
      --storage.tsdb.path="$data" \
      --web.listen-address="127.0.0.1:$port" \
      --log.level=warn \
      "$@"
    ;;
  *)
    echo "usage: hack/prometheus.sh install | run CONFIG PORT [DATA_DIR]" >&2
    exit 2
    ;;
esac
