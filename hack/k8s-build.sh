#!/usr/bin/env bash
# Build Kubernetes and etcd binaries from the Go module proxy into a versioned cache.
#
#   hack/k8s-build.sh [controlplane|node|all|<binary>...]   (default: all)
#
#   controlplane = etcd kube-apiserver kube-controller-manager kube-scheduler kubectl
#   node         = kubelet kubeadm kube-proxy
#   all          = controlplane, then node
#
# Env: K8S_VERSION (v1.34.4), ETCD_VERSION (v3.6.16), FINETUNE_CACHE (~/.cache/finetune-operator),
#      K8S_BUILD_P (go build -p, default: Go's default = number of CPUs).
# Binaries that already exist and report the right version are skipped.
# Output: $FINETUNE_CACHE/k8s/$K8S_VERSION/bin/*  and  $FINETUNE_CACHE/etcd/$ETCD_VERSION/bin/etcd
set -euo pipefail

# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONTROLPLANE_K8S=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
NODE_K8S=(kubelet kubeadm kube-proxy)

export GOMODCACHE="${FINETUNE_CACHE}/go/mod"
export GOCACHE="${FINETUNE_CACHE}/go/build"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-mod=mod -buildvcs=false"

want_etcd=0
want_k8s=()
[[ $# -gt 0 ]] || set -- all
for arg in "$@"; do
  case "$arg" in
    all) want_etcd=1; want_k8s+=("${CONTROLPLANE_K8S[@]}" "${NODE_K8S[@]}") ;;
    controlplane) want_etcd=1; want_k8s+=("${CONTROLPLANE_K8S[@]}") ;;
    node) want_k8s+=("${NODE_K8S[@]}") ;;
    etcd) want_etcd=1 ;;
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl | kubelet | kubeadm | kube-proxy)
      want_k8s+=("$arg") ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown target: $arg" ;;
  esac
done

mkdir -p "$FINETUNE_CACHE" "$K8S_BIN_DIR" "$ETCD_BIN_DIR" "$GOMODCACHE" "$GOCACHE"
TIMES_FILE="${FINETUNE_CACHE}/build-times.log"

# Serialise concurrent builds (tests may call this while a background build runs).
exec 9>"${FINETUNE_CACHE}/.k8s-build.lock"
if ! flock -n 9; then
  log "another k8s-build.sh holds ${FINETUNE_CACHE}/.k8s-build.lock; waiting"
  flock 9
fi

record_time() { # phase seconds
  printf '%s k8s=%s etcd=%s phase=%s seconds=%s host_cpus=%s\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$K8S_VERSION" "$ETCD_VERSION" "$1" "$2" "$(nproc)" >>"$TIMES_FILE"
}

p_flag=()
[[ -z "${K8S_BUILD_P:-}" ]] || p_flag=(-p "$K8S_BUILD_P")

# ---- etcd -------------------------------------------------------------------
build_etcd() {
  if binary_ok etcd; then log "etcd ${ETCD_VERSION}: cached"; return; fi
  local src="${FINETUNE_CACHE}/etcd/${ETCD_VERSION}/src" start
  start=$(date +%s)
  log "etcd ${ETCD_VERSION}: building"
  mkdir -p "$src"
  (
    cd "$src"
    [[ -f go.mod ]] || go mod init local/etcdbuild >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
    go build "${p_flag[@]}" -trimpath -ldflags "-s -w" -o "${ETCD_BIN_DIR}/etcd.tmp" go.etcd.io/etcd/server/v3
  )
  mv -f "${ETCD_BIN_DIR}/etcd.tmp" "${ETCD_BIN_DIR}/etcd"
  binary_ok etcd || die "etcd reports '$(binary_version etcd)', want ${ETCD_VERSION}"
  record_time etcd $(($(date +%s) - start))
}

# ---- kubernetes -------------------------------------------------------------
K8S_SRC="${FINETUNE_CACHE}/k8s/${K8S_VERSION}/src"

prepare_k8s_module() {
  [[ -f "${K8S_SRC}/.ready" ]] && return
  log "k8s ${K8S_VERSION}: preparing wrapper module in ${K8S_SRC}"
  rm -rf "$K8S_SRC"
  mkdir -p "$K8S_SRC"
  (
    cd "$K8S_SRC"
    go mod init local/k8sbuild >/dev/null 2>&1
    local upstream go_line godebug mods m
    upstream=$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | jq -r .GoMod)
    [[ -f "$upstream" ]] || die "could not download k8s.io/kubernetes@${K8S_VERSION} go.mod"
    go_line=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$upstream")
    [[ -z "$go_line" ]] || go mod edit -go="$go_line"
    # Same GODEBUG defaults as the upstream build.
    godebug=$(sed -n 's/^godebug \(.*\)$/\1/p' "$upstream")
    for g in $godebug; do go mod edit -godebug="$g"; done
    # Staging modules: k8s.io/X => ./staging/src/k8s.io/X  becomes  k8s.io/X => k8s.io/X@v0.<minor>.<patch>
    mods=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$upstream")
    [[ -n "$mods" ]] || die "no staging replaces found in $upstream"
    for m in $mods; do go mod edit -replace="${m}=${m}@v0.${K8S_VERSION#v1.}"; done
    log "k8s ${K8S_VERSION}: $(wc -w <<<"$mods") staging replaces"
    go get "k8s.io/kubernetes@${K8S_VERSION}"
  )
  touch "${K8S_SRC}/.ready"
}

k8s_ldflags() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local pkg flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
    flags+=" -X ${pkg}.gitMajor=1"
    flags+=" -X ${pkg}.gitMinor=${minor}"
    flags+=" -X ${pkg}.gitTreeState=clean"
    flags+=" -X ${pkg}.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  printf '%s' "$flags"
}

build_k8s() { # phase-name bin...
  local phase="$1"; shift
  local todo=() b pkgs=() start
  for b in "$@"; do
    if binary_ok "$b"; then log "${b} ${K8S_VERSION}: cached"; else todo+=("$b"); fi
  done
  [[ ${#todo[@]} -gt 0 ]] || return 0
  prepare_k8s_module
  start=$(date +%s)
  log "k8s ${K8S_VERSION}: building ${todo[*]}"
  for b in "${todo[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/${b}"); done
  local out="${K8S_BIN_DIR}/.tmp.$$"
  rm -rf "$out"; mkdir -p "$out"
  (
    cd "$K8S_SRC"
    go build "${p_flag[@]}" -trimpath -tags selinux,notest -ldflags "$(k8s_ldflags)" -o "$out/" "${pkgs[@]}"
  )
  for b in "${todo[@]}"; do mv -f "$out/$b" "${K8S_BIN_DIR}/$b"; done
  rmdir "$out"
  for b in "${todo[@]}"; do
    binary_ok "$b" || die "$b reports '$(binary_version "$b")', want ${K8S_VERSION}"
  done
  record_time "$phase(${todo[*]})" $(($(date +%s) - start))
}

dedup() { printf '%s\n' "$@" | awk 'NF && !seen[$0]++'; }

total_start=$(date +%s)
[[ $want_etcd -eq 0 ]] || build_etcd
if [[ ${#want_k8s[@]} -gt 0 ]]; then
  mapfile -t want_k8s < <(dedup "${want_k8s[@]}")
  cp_first=() rest=()
  for b in "${want_k8s[@]}"; do
    case " ${CONTROLPLANE_K8S[*]} " in *" $b "*) cp_first+=("$b") ;; *) rest+=("$b") ;; esac
  done
  [[ ${#cp_first[@]} -eq 0 ]] || build_k8s controlplane "${cp_first[@]}"
  [[ ${#rest[@]} -eq 0 ]] || build_k8s node "${rest[@]}"
fi
elapsed=$(($(date +%s) - total_start))
[[ $elapsed -lt 5 ]] || record_time "total($*)" "$elapsed"

log "done in ${elapsed}s"
echo "K8S_BIN_DIR=${K8S_BIN_DIR}"
echo "ETCD_BIN_DIR=${ETCD_BIN_DIR}"
