# shellcheck shell=bash disable=SC2034
# Shared settings for hack/kind/*.sh. Source it; do not run it.
set -euo pipefail

KIND_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$KIND_DIR/../.." && pwd)
FINETUNE_CACHE=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
K8S_VERSION=${K8S_VERSION:-v1.34.4}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CLUSTER_NAME=${CLUSTER_NAME:-finetune}

K8S_BIN=${K8S_BIN:-$FINETUNE_CACHE/k8s/$K8S_VERSION/bin}
KIND_CACHE=$FINETUNE_CACHE/kind
GO_CACHE_ROOT=$FINETUNE_CACHE/go
export GOMODCACHE=${GOMODCACHE:-$GO_CACHE_ROOT/mod}
export GOCACHE=${GOCACHE:-$GO_CACHE_ROOT/build}
export PATH=/usr/local/go/bin:$PATH

BASE_IMAGE=finetune-local/debian-base:$DEBIAN_SUITE
PYTHON_IMAGE=finetune-local/python-base:$DEBIAN_SUITE
NODE_IMAGE=${NODE_IMAGE:-finetune-local/kind-node:$K8S_VERSION}
COMPONENTS_IMAGE=finetune-local/kube-components:$K8S_VERSION
KIND=$KIND_CACHE/$KIND_VERSION/bin/kind

# The default StorageClass, as kind ships it: rancher's local-path-provisioner. kind v0.33 pins
# v0.0.34, for which the Go module proxy serves no zip (403), so the release before it.
# (Kubernetes' own client libraries are all it needs: no replace directives, `go install` works.)
LPP_VERSION=${LPP_VERSION:-v0.0.33}
LPP_BIN=$FINETUNE_CACHE/local-path-provisioner/$LPP_VERSION/bin/local-path-provisioner
LPP_IMAGE=finetune-local/local-path-provisioner:$LPP_VERSION
# kind's manifest with our image names, written by build-storage-images.sh; it is also the node
# image's /kind/manifests/default-storage.yaml, which `kind create cluster` applies.
STORAGE_MANIFEST=$FINETUNE_CACHE/kind/storage/default-storage.yaml

# Debian 12's dockerd is 20.10 (API 1.41). Prefer Debian's CLI, which matches it.
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# etcd binary dir: newest 3.6.x under the cache.
etcd_bin_dir() {
  local d
  d=$(ls -d "$FINETUNE_CACHE"/etcd/v3.6.*/bin "$FINETUNE_CACHE"/etcd/3.6.*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$d" ] && echo "$d"
}

# Time a step and log it.
timed() {
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  log "$name took $((SECONDS - t0))s"
}

# debootstrap_rootfs NAME "pkg1,pkg2,..." -> prints the path of a cached rootfs
# tarball ($FINETUNE_CACHE/rootfs/$DEBIAN_SUITE/NAME-<hash>.tar) built with
# debootstrap --variant=minbase --include=<pkgs>. Heavy (network + dpkg), cached.
debootstrap_rootfs() {
  local name=$1 include=$2
  local key; key=$(printf '%s|%s|%s' "$DEBIAN_SUITE" "$DEBIAN_MIRROR" "$include" | sha256sum | cut -c1-12)
  local dir=$FINETUNE_CACHE/rootfs/$DEBIAN_SUITE
  local tar=$dir/$name-$key.tar
  if [ -s "$tar" ]; then echo "$tar"; return 0; fi
  mkdir -p "$dir" "$FINETUNE_CACHE/debootstrap-debs/$DEBIAN_SUITE"
  local work; work=$(mktemp -d /var/tmp/finetune-rootfs.XXXXXX)
  log "debootstrap $DEBIAN_SUITE ($name) -> $tar"
  local t0=$SECONDS
  # --cache-dir keeps the .debs between variants (base, python, node).
  debootstrap --variant=minbase --include="$include" \
    --cache-dir="$FINETUNE_CACHE/debootstrap-debs/$DEBIAN_SUITE" \
    "$DEBIAN_SUITE" "$work/root" "$DEBIAN_MIRROR" >"$dir/$name-$key.log" 2>&1 \
    || { tail -20 "$dir/$name-$key.log" >&2; rm -rf "$work"; die "debootstrap failed"; }
  # Slim down: apt lists and the .deb cache are not needed in images.
  rm -rf "$work"/root/var/lib/apt/lists/* "$work"/root/var/cache/apt/archives/*.deb \
         "$work"/root/var/log/*.log "$work"/root/debootstrap
  # deb.debian.org in sources.list so images can apt-get later where a mirror is reachable.
  echo "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" >"$work/root/etc/apt/sources.list"
  tar -C "$work/root" --numeric-owner -cf "$tar.tmp" .
  mv "$tar.tmp" "$tar"
  rm -rf "$work"
  log "debootstrap $name took $((SECONDS - t0))s ($(du -h "$tar" | cut -f1))"
  echo "$tar"
}

# import_rootfs TAR IMAGE [docker import --change ...]: import unless IMAGE
# already carries the label finetune.rootfs=<basename of TAR>.
import_rootfs() {
  local tar=$1 image=$2; shift 2
  local stamp; stamp=$(basename "$tar")
  if [ "$($DOCKER image inspect -f '{{index .Config.Labels "finetune.rootfs"}}' "$image" 2>/dev/null || true)" = "$stamp" ]; then
    log "$image is up to date ($stamp)"; return 0
  fi
  log "docker import $tar -> $image"
  $DOCKER import --change "LABEL finetune.rootfs=$stamp" "$@" "$tar" "$image" >/dev/null
}

# containerd's name for a Docker ref: NAME:TAG -> docker.io/library/NAME:TAG, ORG/NAME:TAG ->
# docker.io/ORG/NAME:TAG, a ref with a registry host as it is (load_layers.py's node_ref).
node_ref() {
  case $1 in
    */*) case ${1%%/*} in *.* | *:* | localhost) echo "$1" ;; *) echo "docker.io/$1" ;; esac ;;
    *) echo "docker.io/library/$1" ;;
  esac
}

go_install() { # go_install <module@version> <gobin>
  mkdir -p "$2"
  log "go install $1"
  (cd /tmp && CGO_ENABLED=0 GOBIN=$2 GOFLAGS=-trimpath go install -ldflags '-s -w' "$1")
}

# The kind module's source tree (its base image files, its default storage manifest), from the
# Go module cache.
kind_module() {
  local dir=$GOMODCACHE/sigs.k8s.io/kind@$KIND_VERSION
  [ -d "$dir" ] || (cd /tmp && go mod download "sigs.k8s.io/kind@$KIND_VERSION") >&2
  [ -d "$dir" ] || die "sigs.k8s.io/kind@$KIND_VERSION not in the module cache $GOMODCACHE"
  echo "$dir"
}

image_label() { $DOCKER image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }
files_key() { # cheap content key of files: size+mtime+name (binaries are large)
  stat -L -c '%n %s %Y' "$@" | sha256sum | cut -c1-16
}

# import_dir_image IMAGE KEY DIR [docker import --change ...]: a one-layer image of DIR, built
# unless IMAGE already carries the label finetune.inputs=KEY.
import_dir_image() {
  local image=$1 key=$2 dir=$3; shift 3
  if [ "$(image_label "$image" finetune.inputs)" = "$key" ]; then log "$image is up to date"; return; fi
  chmod 0755 "$dir"  # it becomes the image's /, and mktemp -d makes 0700
  tar -C "$dir" --numeric-owner --owner=0 --group=0 -c . \
    | $DOCKER import --change "LABEL finetune.inputs=$key" "$@" - "$image" >/dev/null
  log "built $image"
}

build_single_binary_image() { # <image> <binary> <path-in-image>
  local image=$1 bin=$2 dest=$3 key; key=$(files_key "$bin")
  if [ "$(image_label "$image" finetune.inputs)" = "$key" ]; then log "$image is up to date"; return; fi
  local d; d=$(mktemp -d)
  install -D -m 0755 "$bin" "$d/$dest"
  mkdir -p "$d/etc/ssl/certs" "$d/tmp"
  cp /etc/ssl/certs/ca-certificates.crt "$d/etc/ssl/certs/" 2>/dev/null || true
  import_dir_image "$image" "$key" "$d" --change "ENTRYPOINT [\"$dest\"]"
  rm -rf "$d"
}
