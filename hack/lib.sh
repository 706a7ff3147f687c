# shellcheck shell=bash
# Shared helpers for hack/*.sh. Source it; it defines variables and functions only.

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
FINETUNE_CACHE="${FINETUNE_CACHE:-${HOME}/.cache/finetune-operator}"

K8S_BIN_DIR="${FINETUNE_CACHE}/k8s/${K8S_VERSION}/bin"
ETCD_BIN_DIR="${FINETUNE_CACHE}/etcd/${ETCD_VERSION}/bin"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the version string a binary reports, or nothing if it is missing/broken.
binary_version() {
  local name="$1" path
  case "$name" in
    etcd) path="${ETCD_BIN_DIR}/etcd" ;;
    *) path="${K8S_BIN_DIR}/${name}" ;;
  esac
  [[ -x "$path" ]] || return 0
  case "$name" in
    etcd) "$path" --version 2>/dev/null | sed -n 's/^etcd Version: \(.*\)$/v\1/p' ;;
    kubectl) "$path" version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -n1 ;;
    kubeadm) "$path" version -o short 2>/dev/null ;;
    *) "$path" --version 2>/dev/null | sed -n 's/^Kubernetes \(.*\)$/\1/p' ;;
  esac
}

# True if the cached binary exists and reports the expected version.
binary_ok() {
  local name="$1" want
  if [[ "$name" == etcd ]]; then want="$ETCD_VERSION"; else want="$K8S_VERSION"; fi
  [[ "$(binary_version "$name")" == "$want" ]]
}

# Pick a free TCP port on 127.0.0.1 (the kernel chooses; tiny race is acceptable).
free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}
