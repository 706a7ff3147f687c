#!/usr/bin/env bash
# Kueue itself, built offline from its pinned Go module, for a run against the real controller:
# the manager binary (cached), an image holding only it, loaded into the kind cluster, and
# Kueue's own install manifests (config/default, rendered with kubectl kustomize) pointing at it.
# Prints the path of the rendered manifests.
#
#   hack/kueue.sh        # -> $FINETUNE_CACHE/kueue/<version>/install.yaml
#
# tests/kind/test_kueue.py applies them (`make test-kueue`). The first build takes several
# minutes on two cores; later runs reuse the binary and the image.
#
# Env: KUEUE_VERSION (default v0.17.0), DOCKER, FINETUNE_CACHE (and hack/kind/cluster.sh's).
set -euo pipefail
HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "${HACK_DIR}/lib.sh"

KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"
DOCKER="${DOCKER:-docker}"
IMAGE="finetune-local/kueue:${KUEUE_VERSION}"
cache="${FINETUNE_CACHE}/kueue/${KUEUE_VERSION}"
binary="${cache}/manager"
manifests="${cache}/install.yaml"
mkdir -p "$cache"

command -v go >/dev/null || die "go is needed to build sigs.k8s.io/kueue@${KUEUE_VERSION}"
# Outside any module, so that no go.mod is read or changed.
src=$(cd / && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kueue@${KUEUE_VERSION}" | jq -r .Dir)
[[ -d "${src}/cmd/kueue" ]] || die "no cmd/kueue in sigs.k8s.io/kueue@${KUEUE_VERSION}"

if [[ ! -x "$binary" ]]; then
  log "kueue ${KUEUE_VERSION}: building the manager (minutes on two cores)"
  # The module cache is read-only; build from a writable copy, as its own main module (its
  # go.mod and go.sum pin the dependencies).
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cp -r "${src}/." "$work"
  chmod -R u+w "$work"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -o "${binary}.tmp" ./cmd/kueue)
  mv -f "${binary}.tmp" "$binary"
fi

if ! "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  log "kueue ${KUEUE_VERSION}: image ${IMAGE}"
  ctx=$(mktemp -d)
  cp "$binary" "${ctx}/manager"
  # Nothing but the static binary, as Kueue's own distroless image; no registry is needed.
  printf 'FROM scratch\nCOPY manager /manager\nUSER 65532:65532\nENTRYPOINT ["/manager"]\n' \
    >"${ctx}/Dockerfile"
  "$DOCKER" build -q -t "$IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
fi
"${HACK_DIR}/kind/cluster.sh" load "$IMAGE" >&2

if [[ ! -s "$manifests" ]]; then
  "${K8S_BIN_DIR}/kubectl" kustomize "${src}/config/default" \
    | sed -e "s#image: .*/kueue/kueue:.*#image: ${IMAGE}#" \
      -e 's#imagePullPolicy: Always#imagePullPolicy: IfNotPresent#' >"${manifests}.tmp"
  grep -q "image: ${IMAGE}" "${manifests}.tmp" || die "kueue's manager image was not replaced"
  mv -f "${manifests}.tmp" "$manifests"
fi
echo "$manifests"
