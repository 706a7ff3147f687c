#!/usr/bin/env bash
# Build the helm CLI from the Go module proxy (no release tarball, no registry) into a versioned
# cache, and print the binary's path on stdout. Logs go to stderr.
#
#   hack/helm.sh            -> /root/.cache/finetune-operator/helm/v3.22.0/helm
#   HELM="$(hack/helm.sh)"; "$HELM" lint charts/finetune-operator
#
# Env: HELM_VERSION (v3.22.0: the newest v3 the proxy served when this was written; list them with
#      `go list -m -versions helm.sh/helm/v3`), FINETUNE_CACHE (~/.cache/finetune-operator).
# GOMODCACHE and GOCACHE are shared with hack/k8s-build.sh, so the k8s.io modules that helm
# needs are usually already downloaded. A cached binary reporting the right version is reused.
# A cold build takes a few minutes on 2 busy cores; run it under `nice -n 10` next to other builds.
set -euo pipefail

# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
HELM_DIR="${FINETUNE_CACHE}/helm/${HELM_VERSION}"
HELM_BIN="${HELM_DIR}/helm"

export GOMODCACHE="${FINETUNE_CACHE}/go/mod"
export GOCACHE="${FINETUNE_CACHE}/go/build"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# `go install pkg@version` builds outside any module; -mod must not be set for that.
export GOFLAGS="-buildvcs=false"

# `helm version --template` prints e.g. v3.22.0 (set by the ldflags below).
helm_ok() { [[ -x "$HELM_BIN" && "$("$HELM_BIN" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]; }

if helm_ok; then
  log "helm ${HELM_VERSION}: cached"
  echo "$HELM_BIN"
  exit 0
fi

mkdir -p "$HELM_DIR" "$GOMODCACHE" "$GOCACHE"
# Serialise concurrent builds (several test processes may call this at once).
exec 9>"${HELM_DIR}/.build.lock"
if ! flock -n 9; then
  log "another hack/helm.sh is building ${HELM_VERSION}; waiting"
  flock 9
fi
if helm_ok; then echo "$HELM_BIN"; exit 0; fi

start=$(date +%s)
log "helm ${HELM_VERSION}: building from the Go module proxy"
mod_dir=$(go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" | jq -r .Dir)
[[ -d "$mod_dir" ]] || die "could not download helm.sh/helm/v3@${HELM_VERSION}"

# The same ldflags as helm's Makefile: the version string, and the Kubernetes version that
# `helm lint`/`helm template` assume for .Capabilities.KubeVersion (client-go v0.X.Y -> 1.X).
client_go=$(sed -n 's#^[[:space:]]*k8s.io/client-go[[:space:]]\+v0\.\([0-9]\+\)\..*#\1#p' "${mod_dir}/go.mod" | head -n1)
[[ -n "$client_go" ]] || die "no k8s.io/client-go requirement in ${mod_dir}/go.mod"
ldflags="-s -w"
ldflags+=" -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1 -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${client_go}"
done

# Install into a temporary GOBIN, then move into place, so an interrupted build leaves no
# half-written binary that a later run would trust.
tmp_bin=$(mktemp -d "${HELM_DIR}/.gobin.XXXXXX")
trap 'rm -rf "$tmp_bin"' EXIT
GOBIN="$tmp_bin" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
mv -f "${tmp_bin}/helm" "$HELM_BIN"
helm_ok || die "built helm reports '$("$HELM_BIN" version --template '{{.Version}}' 2>&1)', want ${HELM_VERSION}"

secs=$(($(date +%s) - start))
printf '%s helm=%s phase=helm seconds=%s host_cpus=%s\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$HELM_VERSION" "$secs" "$(nproc)" >>"${FINETUNE_CACHE}/build-times.log"
log "helm ${HELM_VERSION}: built in ${secs}s"
echo "$HELM_BIN"
