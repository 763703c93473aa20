#!/usr/bin/env bash
# Build the local control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# etcd, kwok, kwokctl, helm) from Go modules into a version-keyed cache outside the repo.
# Idempotent and resumable: a finished binary is never rebuilt; Go's module and build caches make
# an interrupted build continue where it stopped.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
CACHE="${LING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ling}"
TOOLS="$CACHE/tools"
LOGS="$CACHE/logs"
mkdir -p "$TOOLS" "$LOGS"

export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=mod -modcacherw -buildvcs=false"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"


START=$(date +%s)
say() { printf '[tools %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# step NAME CMD...: run CMD with its output in a log; on failure name the step and the log.
# Go is needed only when something is missing: a machine with a full cache builds nothing.
step() {
  local name="$1"; shift
  local log="$LOGS/$name.log"
  if ! command -v go >/dev/null 2>&1; then
    echo "error: step '$name' needs the Go toolchain, which is not on PATH; install Go >= 1.26" \
      "(https://go.dev/doc/install) and re-run 'make tools'" >&2
    exit 2
  fi
  say "$name ..."
  # Not `if ! "$@"`: bash ignores errexit inside a function called as a condition, so a failing
  # `go get` in the middle of a step would not stop it. A subshell outside any condition keeps -e.
  local rc=0
  set +e
  ( set -e; "$@" ) >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "error: step '$name' failed; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    echo "full log: $log   (re-run 'make tools' to resume)" >&2
    exit 1
  fi
}

have() { local d="$1"; shift; for b in "$@"; do [ -x "$d/bin/$b" ] || return 1; done; }

# --- Kubernetes: a throw-away wrapper module replacing every staging module by its published tag.
k8s_wrapper() {
  local dir="$1" stg="v0.${K8S_VERSION#v1.}"
  mkdir -p "$dir/src" && cd "$dir/src"
  [ -f go.mod ] || go mod init local.invalid/ling-k8s-bin
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  local godebug
  godebug=$(awk '$1=="godebug" {print $2}' "$gomod" | head -n1)
  [ -n "$godebug" ] && go mod edit -godebug="$godebug"
  for m in $(awk '$1 ~ /^k8s\.io\/[a-z0-9-]+$/ && $2 == "v0.0.0" {print $1}' "$gomod") \
           k8s.io/sample-cli-plugin k8s.io/sample-controller; do
    go mod edit -replace="$m=$m@$stg"
  done
  go get "k8s.io/kubernetes@$K8S_VERSION"
}
k8s_build() {
  local dir="$1" minor now ldf=""
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$now"
  done
  cd "$dir/src"
  go build -trimpath -tags "selinux,notest,grpcnotrace" -ldflags "-s -w $ldf" -o "$dir/bin/" "k8s.io/kubernetes/cmd/$2"
}

K8S_DIR="$TOOLS/kubernetes-$K8S_VERSION"
if have "$K8S_DIR" kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  say "kubernetes $K8S_VERSION: cached"
else
  mkdir -p "$K8S_DIR/bin"
  step k8s-modules k8s_wrapper "$K8S_DIR"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [ -x "$K8S_DIR/bin/$c" ] || step "k8s-$c" k8s_build "$K8S_DIR" "$c"
  done
fi

# --- etcd: its server module replaces its siblings with ../ paths, so wrap it the same way.
etcd_build() {
  local dir="$1" v="$ETCD_VERSION"
  mkdir -p "$dir/src" && cd "$dir/src"
  [ -f go.mod ] || go mod init local.invalid/ling-etcd-bin
  for m in api/v3 client/pkg/v3 client/v3 pkg/v3 server/v3; do
    go mod edit -replace="go.etcd.io/etcd/$m=go.etcd.io/etcd/$m@$v"
  done
  go get "go.etcd.io/etcd/server/v3@$v"
  go build -trimpath -ldflags "-s -w" -o "$dir/bin/etcd" go.etcd.io/etcd/server/v3
}
ETCD_DIR="$TOOLS/etcd-$ETCD_VERSION"
if have "$ETCD_DIR" etcd; then say "etcd $ETCD_VERSION: cached"; else step etcd etcd_build "$ETCD_DIR"; fi

# --- kwok, kwokctl, helm: plain modules, go install works.
KWOK_DIR="$TOOLS/kwok-$KWOK_VERSION"
if have "$KWOK_DIR" kwok kwokctl; then say "kwok $KWOK_VERSION: cached"; else
  step kwok env GOBIN="$KWOK_DIR/bin" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
fi
HELM_DIR="$TOOLS/helm-$HELM_VERSION"
# helm's own version string is a source default ("v4.3") unless stamped; charts and tests read it.
if have "$HELM_DIR" helm && [ "$("$HELM_DIR/bin/helm" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; then
  say "helm $HELM_VERSION: cached"
else
  step helm env GOBIN="$HELM_DIR/bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
fi

# One directory of symlinks that everything else puts on PATH.
BIN="$CACHE/bin"
mkdir -p "$BIN"
for b in "$K8S_DIR"/bin/* "$ETCD_DIR"/bin/* "$KWOK_DIR"/bin/* "$HELM_DIR"/bin/*; do
  ln -sfn "$b" "$BIN/$(basename "$b")"
done
say "done: binaries in $BIN ($(du -sh "$TOOLS" | cut -f1) in $TOOLS)"
