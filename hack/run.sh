#!/usr/bin/env bash
# `make run`: the whole product on one machine, from `kubectl apply` to an answered request.
#
#   hack/run.sh [up]   control plane (built or reused) -> the chart (CRDs, RBAC; its operator
#                      Deployment scaled to 0) -> the pod executor and the operator as local
#                      background processes -> crds/examples/tiny-cpu.yaml adapted for executed pods
#                      (e2e/manifests/tiny-cpu-local.yaml) -> progress while the group forms -> one
#                      streamed chat completion through the openai client.
#   hack/run.sh down   stop the operator, the executor (which kills every pod process) and the cluster
#                      (LING_RUN_KEEP_CLUSTER=1: leave the cluster up, e.g. while others use it).
#   hack/run.sh status say what runs.
#
# Pid files and logs: $LING_CACHE/run/ (default ~/.cache/ling/run). Everything listens on loopback.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CACHE="${LING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ling}"
BIN="$CACHE/bin"
RUN="$CACHE/run"
PY="$ROOT/.venv/bin/python"
NS="${LING_DEMO_NAMESPACE:-ling-demo}"
NODE="${LING_DEMO_NODE:-ling-local-0}"
POD_CIDR="${LING_DEMO_POD_CIDR:-127.61.0.0/16}"
OPERATOR_METRICS_PORT="${LING_DEMO_METRICS_PORT:-18080}"
MANIFEST="$ROOT/e2e/manifests/tiny-cpu-local.yaml"
START=$(date +%s)
say() { printf '[run %3ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { echo "error: $*" >&2; exit 1; }

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# Start "$@" as a background session leader (so its whole process group can be stopped) with its
# output in $RUN/<name>.log; no shell ever parses the arguments.
start_bg() {
  local name="$1"
  shift
  if alive "$name"; then
    say "$name already runs (pid $(cat "$RUN/$name.pid"))"
    return 0
  fi
  (cd "$ROOT" && exec setsid "$@" >>"$RUN/$name.log" 2>&1 </dev/null) &
  echo $! >"$RUN/$name.pid"
  say "started $name (pid $!, log $RUN/$name.log)"
}

stop_bg() {
  local name="$1" pid i
  [ -f "$RUN/$name.pid" ] || return 0
  pid="$(cat "$RUN/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    # The executor gives each pod up to 30 s to exit, as a kubelet would: wait a little longer.
    for i in $(seq 1 90); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
}

up() {
  mkdir -p "$RUN"
  bash "$HERE/cluster.sh" up
  KC="$(bash "$HERE/cluster.sh" kubeconfig)"
  kc() { "$BIN/kubectl" --kubeconfig "$KC" "$@"; }

  say "installing the chart (CRDs, RBAC, Service); its operator Deployment is scaled to 0 because the"
  say "operator runs here as a local process (the chart's pod would land on a simulated node)"
  # The chart's Role for the watched namespace needs the namespace.
  kc create namespace "$NS" --dry-run=client -o yaml | kc apply -f - >/dev/null
  local crd_flags=() owner
  owner="$(kc get crd lingdeployments.serving.ling.dev -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}' 2>/dev/null || true)"
  if kc get crd lingdeployments.serving.ling.dev >/dev/null 2>&1 && [ "$owner" != ling-operator ]; then
    # A CRD applied without Helm (e.g. by a test session) cannot be adopted: keep it current by hand.
    say "the LingDeployment CRD exists outside Helm: applying crds/ directly, the chart without CRDs"
    kc apply --server-side --force-conflicts -f "$ROOT/crds/serving.ling.dev_lingdeployments.yaml" >/dev/null
    crd_flags=(--set crds.install=false)
  fi
  HELM_CACHE_HOME="$CACHE/helm/cache" HELM_CONFIG_HOME="$CACHE/helm/config" HELM_DATA_HOME="$CACHE/helm/data" \
    "$BIN/helm" --kubeconfig "$KC" upgrade --install ling-operator "$ROOT/charts/ling-operator" \
    --namespace ling-system --create-namespace --set replicaCount=1 "${crd_flags[@]}" \
    --set-json "watchNamespaces=[\"$NS\"]" >"$RUN/helm.log" 2>&1 ||
    { tail -n 20 "$RUN/helm.log" >&2; die "helm install failed (log: $RUN/helm.log)"; }
  kc -n ling-system scale deployment --all --replicas=0 >/dev/null
  kc wait --for=condition=Established crd/lingdeployments.serving.ling.dev --timeout=60s >/dev/null

  start_bg executor "$PY" -m e2e.executor --kubeconfig "$KC" --node "$NODE" --pod-cidr "$POD_CIDR" \
    --state-dir "$RUN/executor"
  local i
  for i in $(seq 1 60); do
    [ "$(kc get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] && break
    alive executor || die "the executor exited; see $RUN/executor.log"
    sleep 1
  done
  say "node $NODE (local execution) is Ready"

  # The pods serve the built-in model, trained once per machine and cached (a few minutes the first
  # time, nothing after). Built here, with its progress bar, so no pod trains it during its startup
  # window; the pods inherit HOME only (e2e/executor PASS_ENV), so it goes where they look for it.
  say "the built-in model: trained once per machine, then cached (python -m ling_runtime.builtin)"
  (cd "$ROOT" && env -u LING_CACHE -u XDG_CACHE_HOME "$PY" -m ling_runtime.builtin build >/dev/null) ||
    die "building the built-in model failed"

  start_bg operator "$PY" -m ling_operator --kubeconfig "$KC" --namespace "$NS" \
    --metrics-address 127.0.0.1 --metrics-port "$OPERATOR_METRICS_PORT" --health-port 0
  kc apply -n "$NS" -f "$MANIFEST"
  say "waiting for the group to form (two pods -> one Ray cluster -> TP 2 shards; first time ~1-3 min)"
  "$PY" -m e2e.demo --kubeconfig "$KC" --namespace "$NS" --name ling-tiny --timeout 900

  local ip
  ip="$(kc get pods -n "$NS" -l serving.ling.dev/deployment=ling-tiny,serving.ling.dev/role=head \
    -o jsonpath='{.items[0].status.podIP}')"
  cat <<MSG

Ling runs on this machine (control plane, executor, operator; pods are local processes on 127.x IPs).
  export PATH="$BIN:\$PATH" KUBECONFIG="$KC"
  kubectl get lingd -n $NS -w                 # groups, ready, TP, MTP, queue depth
  kubectl get pods -n $NS -o wide             # the ranks and their pod IPs
  kubectl describe lingd -n $NS ling-tiny     # conditions and events (scaling, restarts)
Talk to it (any OpenAI client; rank 0 of a Ready group, here $ip):
  curl -s http://$ip:30000/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"ling-tiny","messages":[{"role":"user","content":"What is 7 times 8?"}],"max_tokens":16}'
  curl -s http://$ip:30000/metrics | grep ling_runtime_num_queue_reqs
Operator metrics: http://127.0.0.1:$OPERATOR_METRICS_PORT/metrics   logs: $RUN/
Stop everything (operator, executor and every pod process, the cluster): make down
MSG
}

down() {
  stop_bg operator
  stop_bg executor
  # Should the executor have died hard, nothing its pods started may outlive it.
  (cd "$ROOT" && "$PY" -c 'import sys; from e2e.executor import procs; procs.terminate(None, sys.argv[1] + "/", 0)' "$NODE") || true
  if [ -n "${LING_RUN_KEEP_CLUSTER:-}" ]; then
    say "LING_RUN_KEEP_CLUSTER is set: the cluster keeps running"
  else
    bash "$HERE/cluster.sh" down
  fi
}

status() {
  local name
  for name in executor operator; do
    if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: not running"; fi
  done
  bash "$HERE/cluster.sh" status
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: hack/run.sh [up|down|status]" ;;
esac
