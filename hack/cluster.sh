#!/usr/bin/env bash
# The local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
# and kwok-controller as plain processes (kwokctl's binary runtime), on loopback only, using only the
# binaries that hack/build-tools.sh built into ~/.cache/ling. Nothing is downloaded.
#
#   hack/cluster.sh up          start it (idempotent) and wait until the API and the GPU nodes are ready
#   hack/cluster.sh down        stop every process and remove every file `up` made
#   hack/cluster.sh status      say what runs (components, pids, RSS, nodes)
#   hack/cluster.sh healthy     exit 0 when the API answers /readyz and every component runs, else 1
#                               (quiet; for scripts)
#   hack/cluster.sh kubeconfig  print the kubeconfig path
#
# Environment: LING_CACHE (default ~/.cache/ling), KWOK_WORKDIR (default $LING_CACHE/cluster),
# LING_APISERVER_PORT (default 16443). The kubeconfig is $KWOK_WORKDIR/kubeconfig; ~/.kube/config is
# never touched.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
CACHE="${LING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ling}"
BIN="$CACHE/bin"
export KWOK_WORKDIR="${KWOK_WORKDIR:-$CACHE/cluster}"
NAME=ling
CLUSTER_DIR="$KWOK_WORKDIR/clusters/$NAME"
KUBECONFIG_PATH="$KWOK_WORKDIR/kubeconfig"
API_PORT="${LING_APISERVER_PORT:-16443}"
LOGS="$CACHE/logs"
TOOLS=(kwokctl kwok etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
# The processes kwokctl runs for the cluster, by the names of their pid files. /readyz alone says
# nothing of the scheduler or the controller-manager: a cluster without them answers and never
# schedules a pod.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok-controller)
# kwokctl finds kubectl on PATH; ours must win over any system kubectl of another minor version.
export PATH="$BIN:$PATH"
# Make kwokctl's version checks agree with what we built, and never let it reach for the network.
export KWOK_KUBE_VERSION="$K8S_VERSION" KWOK_VERSION="$KWOK_VERSION" KWOK_ETCD_VERSION="${ETCD_VERSION#v}"
export KWOK_KUBECTL_BINARY="$BIN/kubectl"

START=$(date +%s)
say() { printf '[cluster %3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { echo "error: $*" >&2; exit 1; }
kc() { kubectl --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# Every tool must be present and runnable; a missing one means `make tools`, a broken one a rebuild.
check_tools() {
  local missing=() b target
  for b in "${TOOLS[@]}"; do
    if [ ! -e "$BIN/$b" ]; then
      missing+=("$b")
      continue
    fi
    target="$(readlink -f "$BIN/$b")"
    local probe=(--version)
    [ "$b" = kubectl ] && probe=(version --client)
    if [ ! -x "$target" ] || ! "$target" "${probe[@]}" >/dev/null 2>&1; then
      die "the cached binary $target is broken (cannot run '$b ${probe[*]}'); remove its directory \
($(dirname "$(dirname "$target")")) and run 'make tools' to rebuild it"
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v go >/dev/null 2>&1; then
      die "missing control-plane binaries (${missing[*]}) in $BIN and no Go toolchain on PATH to build them; \
install Go >= 1.26 (https://go.dev/doc/install), then run 'make tools'"
    fi
    die "missing control-plane binaries (${missing[*]}) in $BIN; run 'make tools' (builds them once: ~10-20 min cold on 2 cores)"
  fi
}

# One `up`/`down` at a time on this machine (several test sessions may share it). The daemons that
# kwokctl starts must not inherit fd 9 (every kwokctl call closes it), or they would hold the lock.
lock() {
  local f="$CACHE/cluster.lock"
  mkdir -p "$CACHE" "$LOGS"
  exec 9>"$f"
  flock -w 600 9 || die "another 'hack/cluster.sh' has held $f for 10 minutes; see 'ps -ef | grep cluster.sh'"
}

api_ready() {
  [ -f "$KUBECONFIG_PATH" ] || return 1
  [ "$(kc get --raw=/readyz --request-timeout=5s 2>/dev/null)" = "ok" ]
}

healthy() { api_ready && [ -z "$(dead_components)" ]; }

# Who listens on a TCP port of loopback (empty when free).
port_user() { ss -Hltnp "sport = :$1" 2>/dev/null || true; }

# Is pid $1 still one of this cluster's components? (pids get reused; a zombie has no cmdline)
ours() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF "$CLUSTER_DIR/"; }

# The components whose process is gone (no pid file, or its pid is no longer ours), one per line.
dead_components() {
  local comp f
  for comp in "${COMPONENTS[@]}"; do
    f="$CLUSTER_DIR/pids/$comp.pid"
    if [ ! -f "$f" ] || ! ours "$(tr -dc '0-9' <"$f")"; then echo "$comp"; fi
  done
}

# Start the dead components again, keeping etcd's data (every object survives). `kwokctl start`
# starts a component only when its pid file is missing, so the stale files go first.
revive() {
  local dead comp i
  dead="$(dead_components)"
  [ -n "$dead" ] || return 0
  say "restarting dead components: $(echo $dead) (logs: $CLUSTER_DIR/logs/)"
  for comp in $dead; do rm -f "$CLUSTER_DIR/pids/$comp.pid"; done
  kwokctl start cluster --name "$NAME" >>"$LOGS/cluster-up.log" 2>&1 9>&- || return 1
  for i in $(seq 1 60); do
    healthy && return 0
    sleep 1
  done
  return 1
}

component_pids() {
  local f
  for f in "$CLUSTER_DIR"/pids/*.pid; do
    [ -f "$f" ] || continue
    printf '%s %s\n' "$(basename "$f" .pid)" "$(tr -dc '0-9' <"$f")"
  done
}

ensure_objects() {
  # The Stage CRD is created by kwokctl; the stages are ours (hack/kwok/stages, kwok's defaults
  # plus label-triggered failure stages), so a test can also add its own at run time.
  local i
  for i in $(seq 1 30); do
    kc get crd stages.kwok.x-k8s.io >/dev/null 2>&1 && break
    sleep 1
  done
  kc wait --for=condition=Established crd/stages.kwok.x-k8s.io --timeout=30s >/dev/null
  kc apply -f "$HERE/kwok/stages/" >/dev/null
  # A node's pod CIDR is immutable, so a simulated node left from an older nodes.yaml (another
  # address layout) is deleted and created again; the pod GC collects pods that were bound to it.
  local node cidr have
  while read -r node cidr; do
    have=$(kc get node "$node" -o jsonpath='{.spec.podCIDR}' 2>/dev/null || true)
    if [ -n "$have" ] && [ "$have" != "$cidr" ]; then
      say "recreating simulated node $node (pod CIDR $have -> $cidr)"
      kc delete node "$node" --wait=true >/dev/null
    fi
  done < <(awk '/^  name: /{n=$2} /^  podCIDR: /{print n, $2}' "$HERE/kwok/nodes.yaml")
  # Client-side apply creates a missing node with its status (GPU capacity); an existing one is kept.
  kc apply -f "$HERE/kwok/nodes.yaml" >/dev/null
  kc wait --for=condition=Ready node -l type=kwok --timeout=90s >/dev/null ||
    die "the simulated nodes did not become Ready; see kwok-controller's log: $CLUSTER_DIR/logs/kwok-controller.log"
}

report() {
  local n
  n=$(kc get nodes -l type=kwok --no-headers 2>/dev/null | wc -l)
  say "ready: Kubernetes $K8S_VERSION on https://127.0.0.1:$API_PORT with $n simulated H200 nodes (8 GPUs each)"
  echo "  kubeconfig: $KUBECONFIG_PATH"
  echo "  try:        $BIN/kubectl --kubeconfig $KUBECONFIG_PATH get nodes -L nvidia.com/gpu.product,topology.kubernetes.io/zone"
  echo "  logs:       $CLUSTER_DIR/logs/   stop: make cluster-down"
}

create() {
  local user
  user="$(port_user "$API_PORT")"
  if [ -n "$user" ]; then
    die "port $API_PORT (kube-apiserver) on this machine is already in use:
  $user
stop that process, or pick another port: LING_APISERVER_PORT=<free port> make cluster-up"
  fi
  mkdir -p "$KWOK_WORKDIR" "$LOGS"
  local log="$LOGS/cluster-up.log"
  say "creating cluster '$NAME' (kwokctl binary runtime, workdir $KWOK_WORKDIR) ..."
  if ! kwokctl create cluster --name "$NAME" --runtime binary \
    --config "$HERE/kwok/kwokctl.yaml" \
    --kubeconfig "$KUBECONFIG_PATH" \
    --kube-apiserver-port "$API_PORT" \
    --kube-apiserver-binary "$BIN/kube-apiserver" \
    --kube-controller-manager-binary "$BIN/kube-controller-manager" \
    --kube-scheduler-binary "$BIN/kube-scheduler" \
    --etcd-binary "$BIN/etcd" \
    --kwok-controller-binary "$BIN/kwok" \
    --wait 120s >"$log" 2>&1 9>&-; then
    echo "error: 'kwokctl create cluster' failed; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    echo "component logs: $CLUSTER_DIR/logs/   (clean up with 'make cluster-down', then retry)" >&2
    exit 1
  fi
}

up() {
  check_tools
  lock
  local created=0
  if healthy; then
    say "cluster '$NAME' is already running (all ${#COMPONENTS[@]} components)"
  elif [ -d "$CLUSTER_DIR" ] && revive; then
    say "cluster '$NAME' is running again"
  elif [ -d "$CLUSTER_DIR" ]; then
    # Components restarted but the API still does not answer (a broken etcd, say): a fresh cluster
    # takes ~10 s and is predictable.
    say "cluster '$NAME' exists but is not answering; recreating it (old logs: $LOGS/cluster-previous/)"
    rm -rf "$LOGS/cluster-previous"
    cp -r "$CLUSTER_DIR/logs" "$LOGS/cluster-previous" 2>/dev/null || true
    teardown
    create
    created=1
  else
    create
    created=1
  fi
  local i
  for i in $(seq 1 60); do
    healthy && break
    sleep 1
  done
  healthy || die "the API server did not become ready; see $CLUSTER_DIR/logs/kube-apiserver.log"
  ensure_objects
  # A test session's fixture may stop a cluster that a fixture created, never one a person asked for.
  if [ -n "${LING_STARTED_BY_FIXTURE:-}" ]; then
    [ "$created" = 1 ] && touch "$KWOK_WORKDIR/started-by-fixture"
  else
    rm -f "$KWOK_WORKDIR/started-by-fixture"
  fi
  report
}

teardown() {
  local comps
  comps="$(component_pids)"
  if [ -d "$CLUSTER_DIR" ]; then
    kwokctl delete cluster --name "$NAME" --kubeconfig "$KUBECONFIG_PATH" >"$LOGS/cluster-down.log" 2>&1 9>&- ||
      echo "warning: 'kwokctl delete cluster' failed (see $LOGS/cluster-down.log); ending what is left" >&2
  fi
  # A crashed or interrupted run can leave processes behind: end them by their recorded pids,
  # forcefully if they ignore SIGTERM for 10 s (kube-apiserver can, with etcd gone).
  local comp pid i
  while read -r comp pid; do
    [ -n "$pid" ] && ours "$pid" || continue
    echo "stopping leftover $comp (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 20); do
      ours "$pid" || break
      sleep 0.5
    done
    if ours "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  done <<<"$comps"
  rm -rf "$CLUSTER_DIR" "$KUBECONFIG_PATH" "$KWOK_WORKDIR/cache"
  rmdir "$KWOK_WORKDIR/clusters" 2>/dev/null || true
}

down() {
  lock
  if [ ! -d "$CLUSTER_DIR" ] && [ ! -f "$KUBECONFIG_PATH" ]; then
    rm -rf "$KWOK_WORKDIR/fixture-users" "$KWOK_WORKDIR/started-by-fixture"
    rmdir "$KWOK_WORKDIR" 2>/dev/null || true
    say "cluster '$NAME' is not running; nothing to remove"
    return 0
  fi
  teardown
  # The test fixtures' bookkeeping (which sessions use the cluster, whether one of them created it).
  rm -rf "$KWOK_WORKDIR/fixture-users" "$KWOK_WORKDIR/started-by-fixture"
  rmdir "$KWOK_WORKDIR" 2>/dev/null || true
  say "cluster '$NAME' stopped; removed $CLUSTER_DIR and $KUBECONFIG_PATH"
}

status() {
  if [ ! -d "$CLUSTER_DIR" ]; then
    echo "cluster '$NAME': not created (run 'make cluster-up')"
    return 0
  fi
  local comp pid rss total=0 state
  echo "cluster '$NAME' (workdir $CLUSTER_DIR)"
  for comp in "${COMPONENTS[@]}"; do
    pid="$({ tr -dc '0-9' <"$CLUSTER_DIR/pids/$comp.pid"; } 2>/dev/null || true)"
    if [ -n "$pid" ] && ours "$pid"; then
      rss=$(ps -o rss= -p "$pid" | tr -d ' ')
      total=$((total + rss))
      state="running  pid $pid  rss $((rss / 1024)) MiB"
    else
      state="NOT running"
    fi
    printf '  %-24s %s\n' "$comp" "$state"
  done
  echo "  total rss: $((total / 1024)) MiB"
  if api_ready; then
    echo "  api: https://127.0.0.1:$API_PORT ready; kubeconfig $KUBECONFIG_PATH"
    kc get nodes -L nvidia.com/gpu.product,topology.kubernetes.io/zone,topology.ling.dev/rack 2>/dev/null | sed 's/^/  /'
  else
    echo "  api: NOT answering (logs: $CLUSTER_DIR/logs/; restart: make cluster-up)"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  healthy) healthy ;;
  kubeconfig) echo "$KUBECONFIG_PATH" ;;
  *)
    echo "usage: $0 up|down|status|healthy|kubeconfig" >&2
    exit 2
    ;;
esac
