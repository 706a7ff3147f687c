#!/usr/bin/env bash
# Install and start Debian's Docker engine so kind can run on this VM (offline).
#  - docker.io (dockerd 20.10), jq, the runc wrapper that drops CAP_SYS_RESOURCE
#    (made the default runtime in /etc/docker/daemon.json).
#  - Starts exactly one dockerd (no systemd here): background, log in
#    /var/log/dockerd.log. Idempotent.
source "$(dirname "$0")/common.sh"

[ "$(id -u)" = 0 ] || die "run as root"

need=()
for p in docker.io jq debootstrap containernetworking-plugins; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null
  # policy-rc.d: keep the package from trying to start services through init scripts.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

install -m 0755 "$KIND_DIR/runc-nosysres" /usr/local/bin/runc-nosysres

mkdir -p /etc/docker
want='{"runtimes":{"runc-nosysres":{"path":"/usr/local/bin/runc-nosysres"}},"default-runtime":"runc-nosysres"}'
restart=0
if [ ! -f /etc/docker/daemon.json ] || [ "$(jq -cS . /etc/docker/daemon.json 2>/dev/null)" != "$(echo "$want" | jq -cS .)" ]; then
  echo "$want" | jq . >/etc/docker/daemon.json
  restart=1
fi

dockerd_pids() { pgrep -x dockerd || true; }

if [ -n "$(dockerd_pids)" ] && [ $restart = 1 ]; then
  log "daemon.json changed: restarting dockerd"
  for p in $(dockerd_pids); do kill "$p"; done
  for _ in $(seq 60); do [ -z "$(dockerd_pids)" ] && break; sleep 1; done
fi

if [ -z "$(dockerd_pids)" ]; then
  # Debian's containerd package may not be running either; dockerd starts its own
  # managed containerd when /run/containerd/containerd.sock is absent.
  log "starting dockerd (log: /var/log/dockerd.log)"
  # setsid: dockerd must outlive the process group of whatever ran this script. Every inherited
  # descriptor above stderr is closed first: one may hold a lock (`flock /tmp/kind.lock make
  # test` passes its lock's fd down), and a daemon that keeps it holds the lock for good.
  setsid nohup python3 -c 'import os, sys; os.closerange(3, 65536); os.execv(sys.argv[1], sys.argv[1:])' \
    /usr/sbin/dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
fi

for _ in $(seq 60); do
  $DOCKER info >/dev/null 2>&1 && break
  sleep 1
done
$DOCKER info >/dev/null 2>&1 || die "dockerd did not come up; see /var/log/dockerd.log"
[ "$(dockerd_pids | wc -w)" = 1 ] || die "expected exactly one dockerd, found: $(dockerd_pids)"
log "docker ready: server $($DOCKER version -f '{{.Server.Version}}'), default runtime $($DOCKER info -f '{{.DefaultRuntime}}'), cgroup $($DOCKER info -f '{{.CgroupDriver}}/{{.CgroupVersion}}')"
