#!/usr/bin/env bash
# Build or install everything the test suites and the demo need, each step cached by version:
# Kubernetes and etcd from source, Docker's engine, the base and kind node images (with the
# local-path provisioner behind the default StorageClass), helm and Prometheus. Two lanes run side by side, because one is CPU-bound (Go builds) and the other
# mostly waits on the network and the disk (apt, debootstrap). A warm machine takes seconds.
#
#   hack/prereqs.sh            # everything
#   hack/prereqs.sh controlplane   # only what tests/controlplane needs
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}
logs="$cache/prereqs-logs"
mkdir -p "$logs"

if [[ "${1:-all}" == controlplane ]]; then
  exec "$root/hack/k8s-build.sh" controlplane
fi

lane() { # name command...: run a lane with its output in a log, shown only if it fails
  local name=$1 start=$SECONDS
  shift
  if "$@" >"$logs/$name.log" 2>&1; then
    echo "prereqs: $name ready in $((SECONDS - start))s"
  else
    echo "prereqs: $name FAILED after $((SECONDS - start))s; last lines of $logs/$name.log:" >&2
    tail -n 40 "$logs/$name.log" >&2
    return 1
  fi
}

go_lane() {
  "$root/hack/k8s-build.sh" all
  "$root/hack/helm.sh" >/dev/null
}
system_lane() {
  "$root/hack/kind/docker-setup.sh"
  "$root/hack/kind/build-base-image.sh"
  # A small Go build, here to use the CPU this lane leaves idle while it waits on the network.
  "$root/hack/kind/build-storage-images.sh" >/dev/null
  "$root/hack/prometheus.sh" >/dev/null
}

lane go go_lane &
go_pid=$!
lane system system_lane &
system_pid=$!
status=0
wait "$go_pid" || status=1
wait "$system_pid" || status=1
((status == 0)) || exit 1
# Needs both lanes: the kube binaries and the base rootfs.
lane node-image "$root/hack/kind/build-node-image.sh"

# Every Go-built output is now cached by version, so CI drops Go's 5 GB build cache: the disk,
# not the time, is the tighter limit there (the trainer image alone fills ~20 GB across kind).
if [[ "${CI:-}" == true ]]; then
  rm -rf "$cache/go/build"
fi
