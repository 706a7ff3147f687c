#!/usr/bin/env bash
# Manage the local kind test cluster (1 control-plane + 1 worker), offline.
#
#   hack/kind/cluster.sh up                  create (or reuse) cluster "finetune", set up pod
#                                            networking, wait for nodes + CoreDNS Ready, make
#                                            sure of the default StorageClass (local-path)
#   hack/kind/cluster.sh stop                stop its nodes' containers (`up` starts them again)
#   hack/kind/cluster.sh down                delete it
#   hack/kind/cluster.sh kubeconfig          print the kubeconfig path to use
#   hack/kind/cluster.sh load IMAGE...       load IMAGE into the nodes that lack that image ID
#                                            (only the missing layers where it can), then drop
#                                            what the reloaded tags superseded
#   hack/kind/cluster.sh network             (re)apply the CNI conflists and routes only
#
# If FINETUNE_KUBE_CONTEXT is set, an existing cluster is used: nothing is created or
# deleted or stopped, `kubeconfig` prints ${KUBECONFIG:-~/.kube/config} and `load` does nothing.
# Prerequisites: hack/kind/docker-setup.sh, hack/kind/build-base-image.sh,
# hack/kind/build-node-image.sh (needs the kube binaries from hack/k8s-build.sh; it also runs
# hack/kind/build-storage-images.sh).
source "$(dirname "$0")/common.sh"

POD_SUBNET=${POD_SUBNET:-10.244.0.0/16}
SERVICE_SUBNET=${SERVICE_SUBNET:-10.96.0.0/16}
KUBECONFIG_FILE=${FINETUNE_KIND_KUBECONFIG:-$FINETUNE_CACHE/kind/$CLUSTER_NAME.kubeconfig}
WAIT_TIMEOUT=${FINETUNE_KIND_WAIT:-300}
KUBECTL=$K8S_BIN/kubectl
[ -x "$KUBECTL" ] || KUBECTL=$(command -v kubectl || true)

kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

cluster_exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; }
node_names() { "$KIND" get nodes --name "$CLUSTER_NAME"; }

# containerd's image ID on a kind node for a docker ref.
node_image_id() {
  $DOCKER exec "$1" crictl inspecti -o json "$(node_ref "$2")" 2>/dev/null | jq -r '.status.id // empty' || true
}

# kind imports with `ctr images import --digests`, which records `import-<date>@<digest>` beside
# the tag, and CRI adds `sha256:<id>`. When the tag moves to a new build, those records keep the
# old image alive: ~13 GB (content and snapshot) per trainer build and node, while kubelet's
# image GC waits for 85% disk use. Drop every such record whose image no tag names any more.
# Done after the load, not before, so the layers the builds share (the multi-GB dependency
# layer) are reused instead of imported and unpacked again.
prune_superseded() {
  local node stale
  for node in $(node_names); do
    stale=$($DOCKER exec "$node" ctr -n k8s.io images ls | awk '
      NR > 1 && NF > 2 { name[NR] = $1; digest[NR] = $3; if ($1 !~ /^(import-|sha256:)/) tagged[$3] = 1 }
      END { for (i in name) if (!(digest[i] in tagged)) print name[i] }')
    if [ -n "$stale" ]; then
      log "$node: dropping superseded images: $(echo "$stale" | tr '\n' ' ')"
      # shellcheck disable=SC2086 # one name per word
      $DOCKER exec "$node" ctr -n k8s.io images rm --sync $stale >/dev/null
    fi
  done
}

load_images() {
  local ref want node missing status
  for ref in "$@"; do
    want=$($DOCKER image inspect -f '{{.Id}}' "$ref") || die "no local image $ref"
    missing=()
    for node in $(node_names); do
      [ "$(node_image_id "$node" "$ref")" = "$want" ] || missing+=("$node")
    done
    if [ ${#missing[@]} -eq 0 ]; then
      log "$ref (${want:7:12}) already on every node"
      continue
    fi
    log "loading $ref (${want:7:12}) into ${missing[*]}"
    # Most reloads follow a code-only rebuild: send only the layers the nodes lack. Otherwise
    # kind's own load, which imports only where the ID differs. (Streaming `docker save` into
    # the nodes instead, to spare kind's temporary 6 GB tar, took 215-247 s against its 153 s.)
    status=0
    python3 "$KIND_DIR/load_layers.py" "$DOCKER" "$ref" "${missing[@]}" || status=$?
    case $status in
      0) ;;
      3)
        # Nothing to share with the nodes' copy (a new dependency layer): drop it first. Kept,
        # it would hold ~13 GB per node (content and snapshot) through an import that needs as
        # much again, and a full disk fails the import.
        # The import records (`import-<date>@<digest>`) that named it go with it.
        for node in "${missing[@]}"; do
          old=$(node_image_id "$node" "$ref")
          if [ -n "$old" ]; then
            $DOCKER exec "$node" crictl rmi "$old" >/dev/null 2>&1 || true
          fi
        done
        prune_superseded
        "$KIND" load docker-image --name "$CLUSTER_NAME" "$ref"
        ;;
      *) die "loading $ref failed" ;;
    esac
  done
  prune_superseded
}

render_config() {
  sed -e "s#@CLUSTER_NAME@#$CLUSTER_NAME#" -e "s#@NODE_IMAGE@#$NODE_IMAGE#" \
      -e "s#@POD_SUBNET@#$POD_SUBNET#" -e "s#@SERVICE_SUBNET@#$SERVICE_SUBNET#" \
      "$KIND_DIR/cluster-config.yaml.tmpl"
}

# Pod networking without kindnetd: each node gets a bridge conflist with its own
# podCIDR (host-local IPAM), and a route to every other node's podCIDR via that
# node's IP on the docker "kind" network. Traffic leaving the pod network is
# masqueraded. Idempotent; safe to re-run (e.g. after a node container restart).
setup_network() {
  local n cidr ip
  declare -A CIDR IP
  for n in $(node_names); do
    for _ in $(seq "$WAIT_TIMEOUT"); do
      cidr=$(kc get node "$n" -o jsonpath='{.spec.podCIDR}' 2>/dev/null || true)
      [ -n "$cidr" ] && break
      sleep 1
    done
    [ -n "$cidr" ] || die "node $n has no podCIDR (is kube-controller-manager allocating node CIDRs?)"
    ip=$($DOCKER inspect -f '{{with index .NetworkSettings.Networks "kind"}}{{.IPAddress}}{{end}}' "$n")
    [ -n "$ip" ] || die "node $n has no IP on the docker network kind"
    CIDR[$n]=$cidr; IP[$n]=$ip
  done
  for n in "${!CIDR[@]}"; do
    $DOCKER exec -i "$n" sh -c 'mkdir -p /etc/cni/net.d && cat >/etc/cni/net.d/10-finetune-bridge.conflist.tmp && mv /etc/cni/net.d/10-finetune-bridge.conflist.tmp /etc/cni/net.d/10-finetune-bridge.conflist' <<JSON
{
  "cniVersion": "0.4.0",
  "name": "finetune-bridge",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "${CIDR[$n]}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
    local m
    for m in "${!CIDR[@]}"; do
      [ "$m" = "$n" ] && continue
      $DOCKER exec "$n" ip route replace "${CIDR[$m]}" via "${IP[$m]}"
    done
    # masquerade pod traffic that leaves the pod network (kindnetd does the same)
    $DOCKER exec "$n" sh -c "iptables -t nat -C POSTROUTING -s ${CIDR[$n]} ! -d $POD_SUBNET -m comment --comment finetune-masq -j MASQUERADE 2>/dev/null || iptables -t nat -A POSTROUTING -s ${CIDR[$n]} ! -d $POD_SUBNET -m comment --comment finetune-masq -j MASQUERADE"
    log "network: $n podCIDR ${CIDR[$n]} ip ${IP[$n]}"
  done
}

wait_ready() {
  local t0=$SECONDS
  kc wait --for=condition=Ready node --all --timeout="${WAIT_TIMEOUT}s" >/dev/null
  log "nodes Ready after $((SECONDS - t0))s"
  kc -n kube-system rollout status deployment/coredns --timeout="${WAIT_TIMEOUT}s" >/dev/null
  log "CoreDNS Ready after $((SECONDS - t0))s"
  kc get nodes -o wide
}

# The default StorageClass as kind installs it (build-storage-images.sh). `kind create` applied
# it already from a node image that ships it; a cluster made from an older node image has
# kind's legacy host-path class `standard` instead, which this replaces (a class's provisioner
# cannot change). Idempotent: images load only where missing, the apply is a no-op when current.
ensure_storage() {
  local images current
  [ -s "$STORAGE_MANIFEST" ] || die "no $STORAGE_MANIFEST (hack/kind/build-storage-images.sh)"
  images=$(sed -n 's/^[[:space:]]*image:[[:space:]]*//p' "$STORAGE_MANIFEST" | sort -u)
  # shellcheck disable=SC2086 # one ref a word
  load_images $images
  current=$(kc get storageclass standard -o jsonpath='{.provisioner}' 2>/dev/null || true)
  if [ -n "$current" ] && [ "$current" != rancher.io/local-path ]; then
    log "replacing StorageClass standard (provisioner $current)"
    kc delete storageclass standard >/dev/null
  fi
  kc apply -f "$STORAGE_MANIFEST" >/dev/null
  kc -n local-path-storage rollout status deployment/local-path-provisioner --timeout="${WAIT_TIMEOUT}s" >/dev/null
  log "default StorageClass standard (rancher.io/local-path) ready"
}

cmd_up() {
  local t0=$SECONDS
  $DOCKER info >/dev/null 2>&1 || die "docker is not running (hack/kind/docker-setup.sh)"
  [ -x "$KIND" ] || die "kind not found at $KIND (hack/kind/build-node-image.sh)"
  [ -x "$KUBECTL" ] || die "kubectl not found in $K8S_BIN"
  $DOCKER image inspect "$NODE_IMAGE" >/dev/null 2>&1 || die "node image $NODE_IMAGE missing (hack/kind/build-node-image.sh)"
  mkdir -p "$(dirname "$KUBECONFIG_FILE")"
  # kind's known-issues: two nodes' systemd+kubelet exhaust the default 128 inotify
  # instances ("too many open files"). Raise host limits only if they are lower.
  [ "$(sysctl -n fs.inotify.max_user_instances)" -ge 512 ] || sysctl -qw fs.inotify.max_user_instances=512
  [ "$(sysctl -n fs.inotify.max_user_watches)" -ge 524288 ] || sysctl -qw fs.inotify.max_user_watches=524288
  if cluster_exists; then
    log "cluster $CLUSTER_NAME exists; reusing it"
    for n in $(node_names); do
      [ "$($DOCKER inspect -f '{{.State.Running}}' "$n")" = true ] || $DOCKER start "$n" >/dev/null
    done
    "$KIND" get kubeconfig --name "$CLUSTER_NAME" >"$KUBECONFIG_FILE"
  else
    local cfg; cfg=$(mktemp); render_config >"$cfg"
    log "kind create cluster --name $CLUSTER_NAME (image $NODE_IMAGE)"
    # --retain keeps failed nodes for `kind export logs` when FINETUNE_KIND_RETAIN=1
    "$KIND" create cluster --config "$cfg" --kubeconfig "$KUBECONFIG_FILE" \
      ${FINETUNE_KIND_RETAIN:+--retain} ${FINETUNE_KIND_VERBOSITY:+-v "$FINETUNE_KIND_VERBOSITY"}
    rm -f "$cfg"
    log "kind create took $((SECONDS - t0))s"
  fi
  setup_network
  wait_ready
  ensure_storage
  log "cluster up in $((SECONDS - t0))s; KUBECONFIG=$KUBECONFIG_FILE"
}

case "${1:-}" in
  up)
    if [ -n "${FINETUNE_KUBE_CONTEXT:-}" ]; then log "FINETUNE_KUBE_CONTEXT=$FINETUNE_KUBE_CONTEXT set: using it as is"; exit 0; fi
    cmd_up ;;
  down)
    if [ -n "${FINETUNE_KUBE_CONTEXT:-}" ]; then log "FINETUNE_KUBE_CONTEXT set: not deleting anything"; exit 0; fi
    if cluster_exists; then "$KIND" delete cluster --name "$CLUSTER_NAME" --kubeconfig "$KUBECONFIG_FILE"; fi
    rm -f "$KUBECONFIG_FILE" ;;
  stop)
    # The nodes' containers stop, and the cluster stays: the next `up` starts them again.
    if [ -n "${FINETUNE_KUBE_CONTEXT:-}" ]; then log "FINETUNE_KUBE_CONTEXT set: not stopping anything"; exit 0; fi
    if cluster_exists; then
      # shellcheck disable=SC2046 # one name a word
      $DOCKER stop $(node_names) >/dev/null
      log "cluster $CLUSTER_NAME stopped"
    fi ;;
  kubeconfig)
    if [ -n "${FINETUNE_KUBE_CONTEXT:-}" ]; then echo "${KUBECONFIG:-$HOME/.kube/config}"; else echo "$KUBECONFIG_FILE"; fi ;;
  load)
    shift
    if [ -n "${FINETUNE_KUBE_CONTEXT:-}" ]; then log "FINETUNE_KUBE_CONTEXT set: not loading $*"; exit 0; fi
    load_images "$@" ;;
  network) setup_network ;;
  *) echo "usage: $0 up|stop|down|kubeconfig|load IMAGE...|network" >&2; exit 2 ;;
esac
