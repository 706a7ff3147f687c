#!/usr/bin/env bash
# Build the operator, trainer and Hub-double images from the Dockerfile, with pinned version tags.
#
#   hack/images.sh [operator|trainer|hub-double|all]      (default: all: the three)
#
# hub-double is the Hub-API test double the kind e2e runs in-cluster (tests/kind/manifests/
# hub.yaml): standard library only, a few MB on top of the base; it ships with no release.
#
# Env:
#   BASE_IMAGE       python base (default: finetune-local/python-base:bookworm, the debootstrap
#                    image from hack/kind/build-base-image.sh; no registry is needed. On a laptop
#                    BASE_IMAGE=python:3.11-slim works too.)
#   TORCH_INDEX_URL  e.g. https://download.pytorch.org/whl/cpu for a CPU-only trainer image;
#                    empty (default) = torch from PyPI, which includes the CUDA wheels (~6 GB).
#   VERSION          image tag (default: the version in pyproject.toml, 0.1.0)
#   OPERATOR_IMAGE / TRAINER_IMAGE   repositories (default finetune-operator / finetune-trainer,
#                    the chart's defaults)
#   HUB_DOUBLE_IMAGE repository of the test double (default finetune-hub-double)
#   EXTRA_CA_DIR     PEM *.crt files that pip inside the build must trust, passed as the
#                    EXTRA_CA_CERTS build arg (default /usr/local/share/ca-certificates, where
#                    update-ca-certificates takes local CAs from; a TLS-intercepting proxy's CA
#                    lives there). Set it empty to pass none.
#   DOCKER           docker CLI (default: docker)
# Prints the built image references on stdout, one a line; timings and sizes go to stderr and
# to $FINETUNE_CACHE/build-times.log. Builds run under `nice -n 10`.
set -euo pipefail

# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-docker}"
BASE_IMAGE="${BASE_IMAGE:-finetune-local/python-base:bookworm}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "${ROOT}/pyproject.toml" | head -n1)}"
[[ -n "$VERSION" ]] || die "no version in pyproject.toml; set VERSION"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-finetune-operator}"
TRAINER_IMAGE="${TRAINER_IMAGE:-finetune-trainer}"
HUB_DOUBLE_IMAGE="${HUB_DOUBLE_IMAGE:-finetune-hub-double}"

targets=()
[[ $# -gt 0 ]] || set -- all
for arg in "$@"; do
  case "$arg" in
    all) targets+=(operator trainer hub-double) ;;
    operator | trainer | hub-double) targets+=("$arg") ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    *) die "unknown target: $arg (operator|trainer|hub-double|all)" ;;
  esac
done

"$DOCKER" info >/dev/null 2>&1 || die "docker is not running (see hack/kind/docker-setup.sh)"
"$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
  || log "base image ${BASE_IMAGE} is not local; docker will try to pull it"

mkdir -p "$FINETUNE_CACHE"
EXTRA_CA_DIR="${EXTRA_CA_DIR-/usr/local/share/ca-certificates}"
extra_ca=""
if [[ -n "$EXTRA_CA_DIR" && -d "$EXTRA_CA_DIR" ]]; then
  extra_ca=$(find "$EXTRA_CA_DIR" -name '*.crt' -type f -print0 | sort -z | xargs -0 -r cat)
  [[ -z "$extra_ca" ]] || log "passing the CA certificates in ${EXTRA_CA_DIR} to the build"
fi
vcs_ref=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)
# The commit date, not now: an unchanged tree must give the same image ID, or every build
# forces a multi-GB reload into kind.
build_date=$(git -C "$(dirname "$0")/.." log -1 --format=%cd --date=iso-strict 2>/dev/null || echo unknown)

for target in "${targets[@]}"; do
  case "$target" in
    operator) ref="${OPERATOR_IMAGE}:${VERSION}" cache_stage=operator-deps ;;
    trainer) ref="${TRAINER_IMAGE}:${VERSION}" cache_stage=trainer-deps ;;
    hub-double) ref="${HUB_DOUBLE_IMAGE}:${VERSION}" cache_stage=hub-double-build ;;
  esac
  log "building ${ref} (target ${target}, base ${BASE_IMAGE})"
  start=$(date +%s)
  nice -n 10 "$DOCKER" build "$ROOT" \
    --target "$target" \
    --tag "$ref" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    --build-arg EXTRA_CA_CERTS="$extra_ca" \
    --build-arg VERSION="$VERSION" \
    --build-arg VCS_REF="$vcs_ref" \
    --build-arg BUILD_DATE="$build_date" >&2
  # Tag the dependency stage too (a cache hit, so instant): the legacy builder keeps stages as
  # untagged images, and only a tag tells this build's cache from the superseded ones, which
  # (multi-GB for the trainer) are pruned next. Without that, each rebuild leaks ~6 GB of disk.
  # (The Hub double has no dependencies: its tagged stage is its install, kept for the same reason.)
  "$DOCKER" build "$ROOT" --target "$cache_stage" --tag "${ref%:*}-${cache_stage##*-}:cache" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    --build-arg EXTRA_CA_CERTS="$extra_ca" >/dev/null
  "$DOCKER" image prune --force >/dev/null
  secs=$(($(date +%s) - start))
  size=$("$DOCKER" image inspect --format '{{.Size}}' "$ref")
  log "${ref}: $((size / 1024 / 1024)) MiB in ${secs}s"
  printf '%s image=%s seconds=%s bytes=%s host_cpus=%s\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$ref" "$secs" "$size" "$(nproc)" >>"${FINETUNE_CACHE}/build-times.log"
  echo "$ref"
done
