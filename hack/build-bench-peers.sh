#!/usr/bin/env bash
# Build the controllers that bench/operator compares our operator with: KubeRay's ray-operator and
# the LeaderWorkerSet controller, from their Go modules at the versions pinned in
# bench/operator/versions.env, into a version-keyed cache outside the repo
# (~/.cache/ling/tools/{kuberay,lws}-<version>/bin). Their CRDs stay in the Go module cache
# (`go env GOMODCACHE`/<module>@<version>/config/crd/bases); `crd-dirs` prints where.
#
#   hack/build-bench-peers.sh            build what is missing (idempotent, resumable)
#   hack/build-bench-peers.sh crd-dirs   print "kuberay <dir>" and "lws <dir>" (downloads the modules if needed)
#
# Neither go.mod has replace directives (checked for the pinned versions), so a wrapper module that
# just requires the module builds it against exactly the dependency versions its authors pinned.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../bench/operator/versions.env
source "$HERE/../bench/operator/versions.env"
CACHE="${LING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ling}"
TOOLS="$CACHE/tools"
LOGS="$CACHE/logs"
mkdir -p "$TOOLS" "$LOGS"

export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-modcacherw -buildvcs=false"
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

if ! command -v go >/dev/null 2>&1; then
  echo "error: the Go toolchain is not on PATH; install Go >= 1.26 (https://go.dev/doc/install) and re-run $0" >&2
  exit 2
fi

KUBERAY_MOD=github.com/ray-project/kuberay/ray-operator
LWS_MOD=sigs.k8s.io/lws
KUBERAY_DIR="$TOOLS/kuberay-$KUBERAY_VERSION"
LWS_DIR="$TOOLS/lws-$LWS_VERSION"

START=$(date +%s)
say() { printf '[bench-peers %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# step NAME CMD...: run CMD with its output in a log; on failure name the step and the log.
step() {
  local name="$1"; shift
  local log="$LOGS/$name.log"
  say "$name ..."
  if ! "$@" >"$log" 2>&1; then
    echo "error: step '$name' failed; last lines of $log:" >&2
    tail -n 25 "$log" >&2
    echo "full log: $log   (re-run $0 to resume)" >&2
    exit 1
  fi
}

# mod_dir MODULE VERSION: the module's extracted source in the module cache (downloads it once).
mod_dir() {
  go mod download -json "$1@$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}

if [ "${1:-}" = crd-dirs ]; then
  echo "kuberay $(mod_dir "$KUBERAY_MOD" "$KUBERAY_VERSION")/config/crd/bases"
  echo "lws $(mod_dir "$LWS_MOD" "$LWS_VERSION")/config/crd/bases"
  exit 0
fi

# wrap_build DIR NAME MODULE VERSION PKG: build PKG into DIR/bin/NAME through a throw-away wrapper
# module that requires MODULE@VERSION. Not `go install PKG@VERSION`: that also asks the proxy for the
# module's version list (to look for a deprecation notice), and the proxy refuses the list for LWS.
# A wrapper with the one requirement resolves to the module's own go.mod pins (MVS over its graph).
# Called under `step`, where errexit is off: every command checks its own status.
wrap_build() {
  local dir="$1" name="$2" mod="$3" version="$4" pkg="$5"
  mkdir -p "$dir/src" "$dir/bin" && cd "$dir/src" || return 1
  [ -f go.mod ] || go mod init local.invalid/ling-bench-peer || return 1
  go mod edit -require="$mod@$version" || return 1
  go build -mod=mod -trimpath -ldflags "-s -w" -o "$dir/bin/$name.tmp" "$pkg" || return 1
  mv "$dir/bin/$name.tmp" "$dir/bin/$name"
}

if [ -x "$KUBERAY_DIR/bin/ray-operator" ]; then say "kuberay $KUBERAY_VERSION: cached"; else
  step "kuberay-$KUBERAY_VERSION" wrap_build "$KUBERAY_DIR" ray-operator "$KUBERAY_MOD" "$KUBERAY_VERSION" "$KUBERAY_MOD"
fi
if [ -x "$LWS_DIR/bin/lws-controller" ]; then say "lws $LWS_VERSION: cached"; else
  step "lws-$LWS_VERSION" wrap_build "$LWS_DIR" lws-controller "$LWS_MOD" "$LWS_VERSION" "$LWS_MOD/cmd"
fi
say "done: $KUBERAY_DIR/bin/ray-operator, $LWS_DIR/bin/lws-controller"
