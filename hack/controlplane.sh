#!/usr/bin/env bash
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) as host processes on 127.0.0.1. No kubelet: pods are created
# (e.g. by the Job controller) but stay Pending/unscheduled.
#
#   hack/controlplane.sh up     start (idempotent), wait until usable, print kubeconfig path
#   hack/controlplane.sh down   stop the processes and delete $CONTROLPLANE_DIR
#   hack/controlplane.sh env    print shell exports (eval "$(hack/controlplane.sh env)")
#   hack/controlplane.sh status exit 0 if all processes run
#
# Env:
#   CONTROLPLANE_DIR        state dir (default: $FINETUNE_CACHE/controlplane/default)
#   CONTROLPLANE_WATCH_PID  if set on `up`: a watchdog runs `down` once this pid exits
#   CONTROLPLANE_TIMEOUT    seconds `up` waits for readiness (default 120)
#   K8S_VERSION / ETCD_VERSION / FINETUNE_CACHE as in hack/k8s-build.sh (binaries must be built)
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
source "${HACK_DIR}/lib.sh"

DIR="${CONTROLPLANE_DIR:-${FINETUNE_CACHE}/controlplane/default}"
TIMEOUT="${CONTROLPLANE_TIMEOUT:-120}"
MARKER="${DIR}/.finetune-controlplane"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler)
SERVICE_CIDR="10.96.0.0/12"
SERVICE_API_IP="10.96.0.1"

KUBECTL="${K8S_BIN_DIR}/kubectl"

usage() { sed -n '2,17p' "$0"; }

# ---------------------------------------------------------------------------
# processes

pid_of() { cat "${DIR}/pids/$1.pid" 2>/dev/null || true; }

# Alive and really ours: the command line must mention our state dir.
proc_alive() {
  local pid
  pid="$(pid_of "$1")"
  [[ -n "$pid" && -r "/proc/${pid}/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -qF -- "$DIR"
}

all_alive() {
  local c
  for c in "${COMPONENTS[@]}"; do proc_alive "$c" || return 1; done
}

start_proc() { # name binary args...
  local name="$1" bin="$2"; shift 2
  log "starting ${name}"
  # Background jobs of a non-interactive shell survive the script exiting.
  nohup "$bin" "$@" >"${DIR}/logs/${name}.log" 2>&1 </dev/null &
  echo $! >"${DIR}/pids/${name}.pid"
}

stop_all() {
  local c pid i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c="${COMPONENTS[$i]}"
    if proc_alive "$c"; then
      pid="$(pid_of "$c")"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do proc_alive "$c" || break; sleep 0.2; done
      if proc_alive "$c"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
  done
  # The watchdog, if any.
  pid="$(pid_of watchdog)"
  if [[ -n "$pid" && "$pid" != "${WATCHDOG_SELF:-}" ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "controlplane.sh"; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
}

fail_with_logs() {
  local f
  for f in "${DIR}"/logs/*.log; do
    [[ -f "$f" ]] || continue
    printf '\n===== %s (last 25 lines) =====\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
  die "$*"
}

# wait_for <description> <command...>: poll until the command succeeds.
wait_for() {
  local what="$1"; shift
  local deadline=$(($(date +%s) + TIMEOUT)) c
  until "$@" >/dev/null 2>&1; do
    for c in "${COMPONENTS[@]}"; do
      [[ -f "${DIR}/pids/${c}.pid" ]] && ! proc_alive "$c" && fail_with_logs "${c} exited while waiting for ${what}"
    done
    [[ $(date +%s) -lt $deadline ]] || fail_with_logs "timed out after ${TIMEOUT}s waiting for ${what}"
    sleep 0.3
  done
}

# ---------------------------------------------------------------------------
# PKI

gen_pki() {
  local pki="${DIR}/pki"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=finetune-test-ca" 2>/dev/null

    # serving cert for the apiserver
    cat >apiserver.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:${SERVICE_API_IP}
EOF
    sign_cert apiserver "/CN=kube-apiserver" apiserver.ext

    # client certs
    cat >client.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    sign_cert admin "/O=system:masters/CN=kubernetes-admin" client.ext
    sign_cert controller-manager "/CN=system:kube-controller-manager" client.ext
    sign_cert scheduler "/CN=system:kube-scheduler" client.ext

    # service-account token signing key pair
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
}

sign_cert() { # name subject extfile   (cwd = pki)
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

write_kubeconfig() { # file client-name
  local pki="${DIR}/pki"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: finetune-test
  cluster:
    server: https://127.0.0.1:${API_PORT}
    certificate-authority-data: $(base64 -w0 <"${pki}/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 <"${pki}/$2.crt")
    client-key-data: $(base64 -w0 <"${pki}/$2.key")
contexts:
- name: finetune-test
  context:
    cluster: finetune-test
    user: $2
current-context: finetune-test
EOF
  chmod 600 "$1"
}

# ---------------------------------------------------------------------------
# commands

cmd_up() {
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    binary_ok "$b" || die "${b} ${K8S_VERSION}/${ETCD_VERSION} not built; run hack/k8s-build.sh controlplane"
  done

  if [[ -f "$MARKER" ]] && all_alive && [[ -f "${DIR}/kubeconfig" ]]; then
    log "control plane already running in ${DIR}"
    echo "${DIR}/kubeconfig"
    return
  fi
  if [[ -f "$MARKER" ]]; then
    log "stale control plane state in ${DIR}; cleaning"
    stop_all
    rm -rf "$DIR"
  elif [[ -d "$DIR" && -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    die "${DIR} exists, is not empty and is not a control-plane dir"
  fi

  local t0
  t0=$(date +%s.%N)
  mkdir -p "${DIR}/logs" "${DIR}/pids" "${DIR}/etcd"
  touch "$MARKER"
  chmod 700 "$DIR" "${DIR}/etcd"

  # Five distinct free ports, chosen while all are held open.
  read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT < <(python3 - <<'PY'
import socket
socks = []
for _ in range(5):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
  )
  cat >"${DIR}/ports.env" <<EOF
ETCD_PORT=${ETCD_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
API_PORT=${API_PORT}
KCM_PORT=${KCM_PORT}
SCHED_PORT=${SCHED_PORT}
EOF

  gen_pki
  local pki="${DIR}/pki"
  write_kubeconfig "${DIR}/kubeconfig" admin
  write_kubeconfig "${DIR}/controller-manager.kubeconfig" controller-manager
  write_kubeconfig "${DIR}/scheduler.kubeconfig" scheduler

  start_proc etcd "${ETCD_BIN_DIR}/etcd" \
    --name=finetune \
    --data-dir="${DIR}/etcd" \
    --listen-client-urls="http://127.0.0.1:${ETCD_PORT}" \
    --advertise-client-urls="http://127.0.0.1:${ETCD_PORT}" \
    --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster="finetune=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --unsafe-no-fsync=true \
    --log-level=warn
  wait_for "etcd health" curl -fsS "http://127.0.0.1:${ETCD_PORT}/health"

  start_proc kube-apiserver "${K8S_BIN_DIR}/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:${ETCD_PORT}" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="${API_PORT}" \
    --cert-dir="${pki}/generated" \
    --tls-cert-file="${pki}/apiserver.crt" \
    --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --profiling=false \
    --v=1
  wait_for "kube-apiserver /readyz" "$KUBECTL" --kubeconfig="${DIR}/kubeconfig" get --raw=/readyz

  # No cloud provider and no nodes: leave out controllers that only manage nodes/clouds. No
  # kubelet either, and the tests play one: the pod garbage collector would mark a deleted pod
  # that a test's kubelet is still stopping Failed, since no pod here was ever scheduled.
  # The node lifecycle controller runs, on a short clock: a test's Node whose heartbeat (its
  # Lease) stops is marked Unknown, and its pods not ready, after 6 s instead of 50.
  start_proc kube-controller-manager "${K8S_BIN_DIR}/kube-controller-manager" \
    --kubeconfig="${DIR}/controller-manager.kubeconfig" \
    --authentication-kubeconfig="${DIR}/controller-manager.kubeconfig" \
    --authorization-kubeconfig="${DIR}/controller-manager.kubeconfig" \
    --authentication-skip-lookup=true \
    --bind-address=127.0.0.1 \
    --secure-port="${KCM_PORT}" \
    --cert-dir="${DIR}/kcm-certs" \
    --controllers='*,-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller,-node-ipam-controller,-pod-garbage-collector-controller' \
    --service-account-private-key-file="${pki}/sa.key" \
    --root-ca-file="${pki}/ca.crt" \
    --cluster-signing-cert-file="${pki}/ca.crt" \
    --cluster-signing-key-file="${pki}/ca.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --use-service-account-credentials=true \
    --node-monitor-period=1s \
    --node-monitor-grace-period=6s \
    --leader-elect=false \
    --profiling=false \
    --v=1

  start_proc kube-scheduler "${K8S_BIN_DIR}/kube-scheduler" \
    --kubeconfig="${DIR}/scheduler.kubeconfig" \
    --authentication-kubeconfig="${DIR}/scheduler.kubeconfig" \
    --authorization-kubeconfig="${DIR}/scheduler.kubeconfig" \
    --authentication-skip-lookup=true \
    --bind-address=127.0.0.1 \
    --secure-port="${SCHED_PORT}" \
    --cert-dir="${DIR}/scheduler-certs" \
    --leader-elect=false \
    --profiling=false \
    --v=1

  wait_for "kube-controller-manager /healthz" curl -fsSk "https://127.0.0.1:${KCM_PORT}/healthz"
  wait_for "kube-scheduler /healthz" curl -fsSk "https://127.0.0.1:${SCHED_PORT}/healthz"
  wait_for "ServiceAccount default/default" \
    "$KUBECTL" --kubeconfig="${DIR}/kubeconfig" -n default get serviceaccount default

  if [[ -n "${CONTROLPLANE_WATCH_PID:-}" ]]; then
    start_watchdog "$CONTROLPLANE_WATCH_PID"
  fi

  log "control plane up in $(python3 -c "print(round($(date +%s.%N) - ${t0}, 1))")s: https://127.0.0.1:${API_PORT} (${DIR})"
  echo "${DIR}/kubeconfig"
}

# Runs `down` once the given pid is gone (e.g. a pytest process killed with SIGKILL).
start_watchdog() {
  local watch="$1"
  # shellcheck disable=SC2016  # expanded by the inner bash
  nohup bash -c '
    while kill -0 "$1" 2>/dev/null && [[ -f "$2" ]]; do sleep 2; done
    [[ -f "$2" ]] && WATCHDOG_SELF=$$ CONTROLPLANE_DIR="$3" "$4" down
  ' controlplane.sh-watchdog "$watch" "$MARKER" "$DIR" "${HACK_DIR}/controlplane.sh" \
    >>"${DIR}/logs/watchdog.log" 2>&1 </dev/null &
  echo $! >"${DIR}/pids/watchdog.pid"
}

cmd_down() {
  if [[ ! -e "$DIR" ]]; then
    log "nothing to do: ${DIR} does not exist"
    return
  fi
  [[ -f "$MARKER" ]] || die "${DIR} is not a control-plane dir (no marker); refusing to delete"
  stop_all
  rm -rf "$DIR"
  log "control plane in ${DIR} stopped and removed"
}

cmd_env() {
  [[ -f "${DIR}/ports.env" ]] || die "no control plane in ${DIR}"
  # shellcheck disable=SC1091
  source "${DIR}/ports.env"
  echo "export KUBECONFIG=${DIR}/kubeconfig"
  echo "export CONTROLPLANE_DIR=${DIR}"
  echo "export PATH=${K8S_BIN_DIR}:${ETCD_BIN_DIR}:\$PATH"
  echo "# apiserver https://127.0.0.1:${API_PORT}  etcd http://127.0.0.1:${ETCD_PORT}  logs ${DIR}/logs"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) all_alive ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
