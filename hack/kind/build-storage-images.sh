#!/usr/bin/env bash
# The cluster's default StorageClass, built offline the way kind ships it: rancher's
# local-path-provisioner (StorageClass `standard`, default, WaitForFirstConsumer, Delete).
#
#   local-path-provisioner  go install github.com/rancher/local-path-provisioner@$LPP_VERSION
#                           -> $FINETUNE_CACHE/local-path-provisioner/<v>/bin
#   busybox                 Debian's busybox-static (apt-get download)
#                           -> $FINETUNE_CACHE/busybox/<suite>/{busybox,copyright,version}
# Images produced (docker), each rebuilt only when its input changed:
#   finetune-local/local-path-provisioner:$LPP_VERSION   the binary alone (kind's is distroless)
#   finetune-local/local-path-helper:<busybox version>   /bin/{sh,mkdir,rm}, what the helper pod
#                                                        that makes and removes volume dirs runs
# Manifest: $STORAGE_MANIFEST, kind's own (pkg/build/nodeimage/const_storage.go in the kind
# module) with these two image names. build-node-image.sh preloads the images and ships the
# manifest as /kind/manifests/default-storage.yaml, which `kind create cluster` applies;
# `cluster.sh up` applies it to a cluster made from an older node image.
# Prints the two image refs, one a line. Idempotent; a warm run takes about a second.
source "$(dirname "$0")/common.sh"

BUSYBOX_DIR=$FINETUNE_CACHE/busybox/$DEBIAN_SUITE

fetch_busybox() {
  [ -x "$BUSYBOX_DIR/busybox" ] && [ -s "$BUSYBOX_DIR/version" ] && return 0
  local d; d=$(mktemp -d)
  log "apt-get download busybox-static"
  # `apt-get download` needs the package lists, which a purged machine may lack.
  (cd "$d" && { apt-get download -q busybox-static >/dev/null 2>&1 \
    || { apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null && apt-get download -q busybox-static >/dev/null; }; }) \
    || die "apt-get download busybox-static failed"
  dpkg-deb -x "$d"/busybox-static_*.deb "$d/x"
  mkdir -p "$BUSYBOX_DIR"
  install -m 0644 "$d/x/usr/share/doc/busybox-static/copyright" "$BUSYBOX_DIR/copyright"
  install -m 0755 "$d/x/bin/busybox" "$BUSYBOX_DIR/busybox.tmp"
  dpkg-deb -f "$d"/busybox-static_*.deb Version >"$BUSYBOX_DIR/version"
  mv "$BUSYBOX_DIR/busybox.tmp" "$BUSYBOX_DIR/busybox"
  rm -rf "$d"
}

# The helper pod runs `/bin/sh /script/setup|teardown`, which call mkdir and rm (kind's
# images/local-path-helper stages the same three from Debian).
build_helper_image() { # <image>
  local image=$1 d a key; key=$(files_key "$BUSYBOX_DIR/busybox" "$BUSYBOX_DIR/copyright")
  d=$(mktemp -d)
  install -D -m 0755 "$BUSYBOX_DIR/busybox" "$d/bin/busybox"
  for a in sh mkdir rm; do ln -s busybox "$d/bin/$a"; done
  install -D -m 0644 "$BUSYBOX_DIR/copyright" "$d/usr/share/doc/busybox-static/copyright"
  mkdir -p "$d/tmp"
  import_dir_image "$image" "$key" "$d" --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]'
  rm -rf "$d"
}

# kind's manifest, the Go string constant between its backquotes, with its two image names
# (spliced in by `+` in Go) replaced by ours.
render_manifest() { # <provisioner image> <helper image>
  local src; src=$(kind_module)/pkg/build/nodeimage/const_storage.go
  [ -f "$src" ] || die "kind's storage manifest not found at $src"
  awk -v prov="$1" -v helper="$2" '
    /^const defaultStorageManifest = `/ { on = 1; next }
    on && /^`$/ { exit }
    on { gsub(/` \+ storageProvisionerImage \+ `/, prov); gsub(/` \+ storageHelperImage \+ `/, helper); print }
  ' "$src"
}

check_manifest() { # <file> <provisioner image> <helper image>: fail loudly if kind's layout moved
  local f=$1 want
  for want in 'provisioner: rancher.io/local-path' 'storageclass.kubernetes.io/is-default-class: "true"' \
              'volumeBindingMode: WaitForFirstConsumer' 'reclaimPolicy: Delete' 'name: standard' \
              "image: $2" "image: $3" "- $3"; do
    grep -qF -- "$want" "$f" || die "rendered storage manifest lacks '$want' (kind's const_storage.go changed?)"
  done
  ! grep -q '`' "$f" || die "rendered storage manifest still holds Go syntax"
}

T0=$SECONDS
[ -x "$LPP_BIN" ] || timed "local-path-provisioner build" go_install \
  "github.com/rancher/local-path-provisioner@$LPP_VERSION" "$(dirname "$LPP_BIN")"
fetch_busybox
# Debian's version as a tag: 1:1.35.0-4+deb12u1+b1 -> 1.35.0-4-deb12u1-b1
HELPER_IMAGE=finetune-local/local-path-helper:$(sed -e 's/^[0-9]*://' -e 's/[^A-Za-z0-9_.-]/-/g' "$BUSYBOX_DIR/version")

$DOCKER info >/dev/null 2>&1 || die "docker is not running (hack/kind/docker-setup.sh)"
build_single_binary_image "$LPP_IMAGE" "$LPP_BIN" /usr/local/bin/local-path-provisioner
build_helper_image "$HELPER_IMAGE"
$DOCKER run --rm --entrypoint /bin/sh "$HELPER_IMAGE" -c 'mkdir -p /tmp/a/b && rm -r /tmp/a' \
  || die "$HELPER_IMAGE cannot run sh, mkdir and rm"

mkdir -p "$(dirname "$STORAGE_MANIFEST")"
render_manifest "$LPP_IMAGE" "$HELPER_IMAGE" >"$STORAGE_MANIFEST.tmp"
check_manifest "$STORAGE_MANIFEST.tmp" "$LPP_IMAGE" "$HELPER_IMAGE"
mv "$STORAGE_MANIFEST.tmp" "$STORAGE_MANIFEST"
log "storage images and manifest ready in $((SECONDS - T0))s ($STORAGE_MANIFEST)"
echo "$LPP_IMAGE"
echo "$HELPER_IMAGE"
