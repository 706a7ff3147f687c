#!/usr/bin/env bash
# Kueue's own Workload CRD (workloads.kueue.x-k8s.io), taken from the pinned Kueue release's Go
# module (sigs.k8s.io/kueue on the Go module proxy) and cached; prints the file's path.
#
#   hack/kueue-crd.sh        # -> $FINETUNE_CACHE/kueue/<version>/kueue.x-k8s.io_workloads.yaml
#
# tests/controlplane/test_suspend.py installs it so that the operator reads and patches real
# Workloads through a real API server. Kueue's controller itself is not run there (building it
# takes longer than the whole control-plane suite; see that test's docstring).
#
# Env: KUEUE_VERSION (default v0.17.0), FINETUNE_CACHE as in hack/lib.sh.
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "${HACK_DIR}/lib.sh"

KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"
CRD="config/components/crd/bases/kueue.x-k8s.io_workloads.yaml"
out="${FINETUNE_CACHE}/kueue/${KUEUE_VERSION}/$(basename "$CRD")"

if [[ ! -s "$out" ]]; then
  command -v go >/dev/null || die "go is needed to download sigs.k8s.io/kueue@${KUEUE_VERSION}"
  log "kueue ${KUEUE_VERSION}: downloading the module for its Workload CRD"
  # Outside any module, so that no go.mod is read or changed.
  dir=$(cd / && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kueue@${KUEUE_VERSION}" | jq -r .Dir)
  [[ -f "${dir}/${CRD}" ]] || die "no ${CRD} in sigs.k8s.io/kueue@${KUEUE_VERSION}"
  mkdir -p "$(dirname "$out")"
  cp "${dir}/${CRD}" "${out}.tmp"
  mv -f "${out}.tmp" "$out"
fi
echo "$out"
