#!/usr/bin/env bash
# Assemble the kind node image finetune-local/kind-node:$K8S_VERSION offline.
#
# Inputs (all local or from the Go module proxy / Debian mirror):
#   kind         go install sigs.k8s.io/kind@$KIND_VERSION      -> $FINETUNE_CACHE/kind/<v>/bin
#   coredns      go install github.com/coredns/coredns@<kubeadm's> -> $FINETUNE_CACHE/coredns/<v>/bin
#   crictl       go install sigs.k8s.io/cri-tools/cmd/crictl     -> $FINETUNE_CACHE/crictl/<v>/bin
#   pause        gcc -static hack/kind/pause.c                   -> $FINETUNE_CACHE/pause/<hash>/pause
#   kube bins    built by hack/k8s-build.sh into $FINETUNE_CACHE/k8s/$K8S_VERSION/bin (not built here)
#   etcd         built by hack/k8s-build.sh into $FINETUNE_CACHE/etcd/v3.6.*/bin
# Images produced (docker):
#   finetune-local/kube-components:$K8S_VERSION, also tagged as every kube-*/etcd name
#     that `kubeadm config images list` prints (their static pod / DaemonSet manifests
#     set `command:`, so one image can serve all of them)
#   registry.k8s.io/coredns/coredns:<v>, registry.k8s.io/pause:<v> (from local binaries)
#   finetune-local/local-path-{provisioner,helper}:<v> (build-storage-images.sh; with kind's
#     manifest in /kind/manifests/default-storage.yaml they make `standard` the default class)
#   finetune-local/kind-node:$K8S_VERSION (with all of the above preloaded in containerd)
#
# Env: FINETUNE_WAIT_K8S=<seconds> waits that long for the kube binaries to appear.
# Idempotent: each image carries a label with a hash of its inputs and is rebuilt only
# when that changes.
source "$(dirname "$0")/common.sh"
export DOCKER_BUILDKIT=0   # Debian's docker 20.10 has no buildx here; the legacy builder works offline

CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}
NODE_PKGS=systemd,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,e2fsprogs,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,socat,iputils-ping,netbase
KUBE_BASE_PKGS=ca-certificates,iptables,nftables,conntrack,ipset,kmod,iproute2,netbase
T_START=$SECONDS

# ---- 1. small tools ------------------------------------------------------------
[ -x "$KIND" ] || timed "kind build" go_install "sigs.k8s.io/kind@$KIND_VERSION" "$(dirname "$KIND")"
KIND_SRC=$(kind_module)/images/base/files
[ -d "$KIND_SRC" ] || die "kind base files not found at $KIND_SRC"

CRICTL=$FINETUNE_CACHE/crictl/$CRICTL_VERSION/bin/crictl
[ -x "$CRICTL" ] || timed "crictl build" go_install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" "$(dirname "$CRICTL")"

pause_hash=$(sha256sum "$KIND_DIR/pause.c" | cut -c1-12)
PAUSE=$FINETUNE_CACHE/pause/$pause_hash/pause
if [ ! -x "$PAUSE" ]; then
  mkdir -p "$(dirname "$PAUSE")"
  gcc -static -Os -s -o "$PAUSE" "$KIND_DIR/pause.c"
fi

# Rootfs tarballs (network + dpkg bound; done before waiting for the kube binaries).
kube_base_tar=$(debootstrap_rootfs kube-base "$KUBE_BASE_PKGS")
node_tar=$(debootstrap_rootfs kind-node "$NODE_PKGS")

# ---- 2. kube binaries (from hack/k8s-build.sh) ----------------------------------
KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubeadm kubelet kubectl)
have_bins() {
  local b
  for b in "${KUBE_BINS[@]}"; do [ -x "$K8S_BIN/$b" ] || return 1; done
  [ -n "$(etcd_bin_dir)" ] && [ -x "$(etcd_bin_dir)/etcd" ]
}
deadline=$((SECONDS + ${FINETUNE_WAIT_K8S:-0}))
until have_bins; do
  if [ $SECONDS -ge $deadline ]; then
    missing=$(for b in "${KUBE_BINS[@]}"; do [ -x "$K8S_BIN/$b" ] || printf '%s ' "$b"; done)
    die "kube binaries missing in $K8S_BIN: ${missing:-none} (etcd: $(etcd_bin_dir || echo missing)). Build them with hack/k8s-build.sh."
  fi
  sleep 20
done
ETCD=$(etcd_bin_dir)/etcd
got=$("$K8S_BIN/kubeadm" version -o short)
[ "$got" = "$K8S_VERSION" ] || die "kubeadm reports $got, want $K8S_VERSION"

mapfile -t KUBEADM_IMAGES < <("$K8S_BIN/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null)
[ ${#KUBEADM_IMAGES[@]} -ge 6 ] || die "kubeadm config images list printed: ${KUBEADM_IMAGES[*]}"
log "kubeadm images: ${KUBEADM_IMAGES[*]}"
COREDNS_IMAGE=$(printf '%s\n' "${KUBEADM_IMAGES[@]}" | grep '/coredns')
PAUSE_IMAGE=$(printf '%s\n' "${KUBEADM_IMAGES[@]}" | grep '/pause:')
mapfile -t COMPONENT_TAGS < <(printf '%s\n' "${KUBEADM_IMAGES[@]}" | grep -v -e '/coredns' -e '/pause:')
COREDNS_VERSION=${COREDNS_IMAGE##*:}

COREDNS=${COREDNS_BIN:-$FINETUNE_CACHE/coredns/$COREDNS_VERSION/bin/coredns}
[ -x "$COREDNS" ] || timed "coredns build" go_install "github.com/coredns/coredns@$COREDNS_VERSION" "$(dirname "$COREDNS")"

# ---- 3. workload images: pause, coredns, kube components -----------------------
build_single_binary_image "$PAUSE_IMAGE" "$PAUSE" /pause
build_single_binary_image "$COREDNS_IMAGE" "$COREDNS" /coredns

import_rootfs "$kube_base_tar" finetune-local/kube-base:"$DEBIAN_SUITE"
comp_key=$(files_key "$kube_base_tar" "$ETCD" "${KUBE_BINS[@]/#/$K8S_BIN/}")
if [ "$(image_label "$COMPONENTS_IMAGE" finetune.inputs)" != "$comp_key" ]; then
  d=$(mktemp -d)
  for b in kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do cp "$K8S_BIN/$b" "$d/"; done
  cp "$ETCD" "$d/etcd"
  cat >"$d/Dockerfile" <<DOCKERFILE
FROM finetune-local/kube-base:$DEBIAN_SUITE
COPY kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd /usr/local/bin/
LABEL finetune.inputs=$comp_key
DOCKERFILE
  timed "components image" $DOCKER build -q -t "$COMPONENTS_IMAGE" "$d" >/dev/null
  rm -rf "$d"
fi
for t in "${COMPONENT_TAGS[@]}"; do $DOCKER tag "$COMPONENTS_IMAGE" "$t"; done
# The default StorageClass's provisioner and helper (a no-op when prereqs.sh built them).
mapfile -t STORAGE_IMAGES < <("$KIND_DIR/build-storage-images.sh")
[ ${#STORAGE_IMAGES[@]} -eq 2 ] || die "build-storage-images.sh printed: ${STORAGE_IMAGES[*]}"
PRELOAD_IMAGES=("${COMPONENT_TAGS[@]}" "$COREDNS_IMAGE" "$PAUSE_IMAGE" "${STORAGE_IMAGES[@]}")

# ---- 4. node rootfs + node image -----------------------------------------------
import_rootfs "$node_tar" finetune-local/kind-node-rootfs:"$DEBIAN_SUITE"

preload_ids=$(for i in "${PRELOAD_IMAGES[@]}"; do echo "$i=$($DOCKER image inspect -f '{{.Id}}' "$i")"; done | sha256sum | cut -c1-16)
node_key=$( (files_key "$node_tar" "$CRICTL" "$K8S_BIN/kubeadm" "$K8S_BIN/kubelet" "$K8S_BIN/kubectl";
             echo "$preload_ids"; cat "$KIND_DIR/node/Dockerfile" "$0" "$STORAGE_MANIFEST"; find "$KIND_SRC" -type f | sort) | sha256sum | cut -c1-16)
if [ "$(image_label "$NODE_IMAGE" finetune.inputs)" = "$node_key" ]; then
  log "$NODE_IMAGE is up to date ($node_key)"; exit 0
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"; [ -n "${bc:-}" ] && $DOCKER rm -f "$bc" >/dev/null 2>&1 || true' EXIT
cp -a "$KIND_SRC" "$ctx/files"
chmod -R u+w "$ctx/files"
# kind's create applies this instead of its legacy host-path StorageClass, as from its own images.
install -D -m 0644 "$STORAGE_MANIFEST" "$ctx/files/kind/manifests/default-storage.yaml"
mkdir -p "$ctx/bin"
cp "$K8S_BIN/kubeadm" "$K8S_BIN/kubelet" "$K8S_BIN/kubectl" "$ctx/bin/"
cp "$CRICTL" "$ctx/crictl"
echo -n "$K8S_VERSION" >"$ctx/version"
cp "$KIND_DIR/node/Dockerfile" "$ctx/Dockerfile"
# containerd config: kind's, adjusted for this VM (see real-cluster-offline.md):
#  - restrict_oom_score_adj = true (the CRI's oom_score_adj=-998 fails under runc here)
#  - no fuse-overlayfs proxy snapshotter (rootless only, not built)
#  - sandbox_image = kubeadm's pause tag
awk -v pause="$PAUSE_IMAGE" '
  /^\[proxy_plugins/ {skip=1; next}
  skip && /^\[/ && !/^\[proxy_plugins/ {skip=0}
  skip {next}
  /^[[:space:]]*sandbox_image[[:space:]]*=/ {sub(/=.*/, "= \"" pause "\"")}
  /^[[:space:]]*restrict_oom_score_adj[[:space:]]*=/ {sub(/=.*/, "= true")}
  {print}' "$KIND_SRC/etc/containerd/config.toml" >"$ctx/containerd-config.toml"
grep -q 'restrict_oom_score_adj = true' "$ctx/containerd-config.toml" || die "containerd config patch failed"

timed "node image (docker build)" $DOCKER build -q --build-arg ROOTFS_IMAGE=finetune-local/kind-node-rootfs:"$DEBIAN_SUITE" \
  -t "$NODE_IMAGE-stage" "$ctx" >/dev/null

# Preload images into containerd's k8s.io namespace (what `kind build node-image` does,
# minus the pulls): start containerd in a throwaway container, import, commit.
t0=$SECONDS
bc=kind-build-$$-$RANDOM
# PID 1 is a bash loop (not `sleep`) so that containerd is reaped when stopped below.
$DOCKER run -d --name "$bc" --entrypoint /bin/bash --security-opt seccomp=unconfined "$NODE_IMAGE-stage" \
  -c 'trap "exit 0" TERM; while :; do sleep 1; done' >/dev/null
$DOCKER exec "$bc" bash -c 'nohup containerd >/tmp/containerd.log 2>&1 &'
$DOCKER exec "$bc" bash -c 'for i in $(seq 30); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 1; done; cat /tmp/containerd.log; exit 1'
$DOCKER save "${PRELOAD_IMAGES[@]}" | $DOCKER exec -i "$bc" \
  ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests -
loaded=$($DOCKER exec "$bc" ctr --namespace=k8s.io images list -q)
for i in "${PRELOAD_IMAGES[@]}"; do
  grep -qxF "$(node_ref "$i")" <<<"$loaded" || die "image $i missing in node containerd: $loaded"
done
$DOCKER exec "$bc" bash -c 'pkill -x containerd; for i in $(seq 30); do pgrep -x containerd >/dev/null || exit 0; sleep 1; done; echo containerd did not stop >&2; exit 1'
$DOCKER exec "$bc" rm -rf /tmp/containerd.log /run/containerd
old_node_id=$($DOCKER image inspect -f '{{.Id}}' "$NODE_IMAGE" 2>/dev/null || true)
# STOPSIGNAL SIGRTMIN+3 and ENV container=docker come from node/Dockerfile (docker 20.10 commit
# cannot set STOPSIGNAL); the container run keeps them, and the check at the end verifies it.
$DOCKER commit \
  --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
  --change 'CMD []' \
  --change 'ENV container=docker' \
  --change "LABEL finetune.inputs=$node_key" \
  "$bc" "$NODE_IMAGE" >/dev/null
$DOCKER rm -f "$bc" >/dev/null; bc=
$DOCKER rmi "$NODE_IMAGE-stage" >/dev/null || true
# drop the previous build unless a (kind node) container still uses it
[ -n "$old_node_id" ] && $DOCKER rmi "$old_node_id" >/dev/null 2>&1 || true
log "preload + commit took $((SECONDS - t0))s"
log "built $NODE_IMAGE ($node_key) in $((SECONDS - T_START))s total"
$DOCKER image inspect -f 'entrypoint={{json .Config.Entrypoint}} cmd={{json .Config.Cmd}} stopsignal={{.Config.StopSignal}}' "$NODE_IMAGE"
[ "$($DOCKER image inspect -f '{{.Config.StopSignal}}' "$NODE_IMAGE")" = "SIGRTMIN+3" ] || die "$NODE_IMAGE lost STOPSIGNAL SIGRTMIN+3"
