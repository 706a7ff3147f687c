#!/usr/bin/env bash
# The kind end-to-end flow, step by step, for people (and a future `make demo`): the same steps
# tests/kind/test_e2e.py automates and asserts on.
#
#   hack/e2e.sh            # all steps: cluster, images, chart, Hub double, example job, result
#   hack/e2e.sh clean      # delete the demo namespace (the cluster and the release stay)
#
# Steps (each idempotent; a warm re-run skips the build and image loads):
#   1. hack/kind/cluster.sh up
#   2. hack/images.sh operator|trainer|hub-double, each only when its sources changed since its
#      last build                               (SKIP_BUILD=1 to use the local images as they are)
#   3. cluster.sh load, only where a node lacks the local image ID (the trainer image is ~6 GB)
#   4. the chart's CRD, then helm upgrade --install into finetune-system, wait for Available,
#      and `helm test`: the operator reconciles a FineTuneJob
#   5. namespace $NS: Secret hub-token (random), the Hub-API test double seeded with
#      hf://org/tiny and hf://org/tiny-data (tests/kind/manifests/hub.yaml); an earlier run's
#      FineTuneJob is deleted and the double restarted empty, so each run trains from step 0
#   6. examples/tiny-cpu.yaml applied there, watched until Succeeded or Failed
#   7. the pushed revision's files, as the Hub double lists them
#
# Env: NS (default finetune-demo), SKIP_BUILD=1 (never build), TIMEOUT (seconds for the job, default 1800),
#      VERSION (image tag, default from pyproject.toml).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FINETUNE_CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune-operator}"
NS="${NS:-finetune-demo}"
TIMEOUT="${TIMEOUT:-1800}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "${ROOT}/pyproject.toml" | head -n1)}"
OPERATOR_IMAGE="finetune-operator:${VERSION}"
TRAINER_IMAGE="finetune-trainer:${VERSION}"
HUB_DOUBLE_IMAGE="finetune-hub-double:${VERSION}"
DOCKER=docker; [[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
KUBECTL="${FINETUNE_CACHE}/k8s/${K8S_VERSION:-v1.34.4}/bin/kubectl"
[[ -x "$KUBECTL" ]] || KUBECTL=$(command -v kubectl)
KUBECONFIG="$("${ROOT}/hack/kind/cluster.sh" kubeconfig)"
export KUBECONFIG

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
kc() { "$KUBECTL" "$@"; }
step() { STEP_T0=$SECONDS; log "== $*"; }
done_step() { log "   took $((SECONDS - STEP_T0))s"; }

if [[ "${1:-}" == clean ]]; then
  kc delete namespace "$NS" --ignore-not-found --wait=false
  exit 0
fi

T0=$SECONDS
step "1. cluster"
"${ROOT}/hack/kind/cluster.sh" up
done_step

step "2. images"
# images.sh labels each build with its commit, so a build after any commit is a new image ID and
# a new kind load (multi-GB for the trainer). Build an image only when the hash of its own
# sources moved (hack/image_context.py, as the kind suite does).
context_hash() { DOCKER="$DOCKER" python3 "${ROOT}/hack/image_context.py" "$1"; }
STAMPS="${FINETUNE_CACHE}/kind-e2e/images-sh"
mkdir -p "$STAMPS"
if [[ "${SKIP_BUILD:-}" != 1 ]]; then
  for target in operator trainer hub-double; do
    ctx=$(context_hash "$target")
    ref="finetune-${target}:${VERSION}"
    id=$("$DOCKER" image inspect -f '{{.Id}}' "$ref" 2>/dev/null || true)
    if [[ -n "$id" && "$(cat "${STAMPS}/${ref/:/_}" 2>/dev/null)" == "${ctx} ${id}" ]]; then
      log "   ${ref}: sources unchanged since its build; not rebuilding"
    else
      "${ROOT}/hack/images.sh" "$target" >/dev/null
      echo "${ctx} $("$DOCKER" image inspect -f '{{.Id}}' "$ref")" >"${STAMPS}/${ref/:/_}"
    fi
  done
fi
done_step

step "3. images on the nodes"
# The Hub double last: below its few-KB venv it is the runtime base the other two brought.
"${ROOT}/hack/kind/cluster.sh" load "$OPERATOR_IMAGE" "$TRAINER_IMAGE" "$HUB_DOUBLE_IMAGE"
done_step

step "4. operator chart"
HELM="$("${ROOT}/hack/helm.sh")"
image_id=$("$DOCKER" image inspect -f '{{.Id}}' "$OPERATOR_IMAGE")
# The chart installs and upgrades the CRD (crds.install); --take-ownership adopts one that an
# earlier install left outside the release. The local images have no registry.
"$HELM" upgrade --install finetune-operator "${ROOT}/charts/finetune-operator" \
  --namespace finetune-system --create-namespace --take-ownership \
  --set-string image.registry= --set-string trainer.image.registry= \
  --set image.repository=finetune-operator --set-string image.tag="$VERSION" \
  --set image.pullPolicy=IfNotPresent \
  --set trainer.image.repository=finetune-trainer --set-string trainer.image.tag="$VERSION" \
  --set trainer.image.pullPolicy=IfNotPresent \
  --set-json 'extraEnv=[{"name":"FINETUNE_PROGRESS_SECONDS","value":"2"}]' \
  --set-string "podAnnotations.finetune\.dev/image-id=${image_id/:/-}" \
  --wait --timeout 5m
kc -n finetune-system wait --for=condition=Available deployment/finetune-operator --timeout=300s
# The chart's own test: the operator reconciles (and deletes) a suspended FineTuneJob.
"$HELM" test finetune-operator --namespace finetune-system --logs --timeout 3m >&2
done_step

step "5. namespace ${NS}: Hub token and the Hub-API test double"
kc create namespace "$NS" --dry-run=client -o yaml | kc apply -f -
if kc -n "$NS" get ftj tiny-cpu >/dev/null 2>&1; then
  # A run before this one: the job goes, and the double (whose store lives as long as its pod)
  # starts empty below, so that this run trains from step 0 rather than find its last one's
  # checkpoint branch, or a repo its pod no longer holds.
  log "   deleting the FineTuneJob of an earlier run, and the Hub double's store with it"
  kc -n "$NS" delete ftj tiny-cpu --wait --timeout=300s
  fresh=1
fi
if ! kc -n "$NS" get secret hub-token >/dev/null 2>&1; then
  # From stdin: the token is in no command line.
  head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' | sed 's/^/demo/' \
    | kc -n "$NS" create secret generic hub-token --from-file=token=/dev/stdin
fi
kc -n "$NS" create configmap hub-seed --from-file="${ROOT}/tests/kind/manifests/seed_tiny.py" \
  --dry-run=client -o yaml | kc -n "$NS" apply -f -
# The seed init container runs from the trainer image (torch), the double from its own.
sed -e "s#image: finetune-trainer:.*#image: ${TRAINER_IMAGE}#" \
    -e "s#image: finetune-hub-double:.*#image: ${HUB_DOUBLE_IMAGE}#" \
    "${ROOT}/tests/kind/manifests/hub.yaml" | kc -n "$NS" apply -f -
[[ -z "${fresh:-}" ]] || kc -n "$NS" rollout restart deployment/hub
kc -n "$NS" rollout status deployment/hub --timeout=600s
done_step

step "6. examples/tiny-cpu.yaml"
sed -e "s/namespace: finetune-demo/namespace: ${NS}/" \
    -e "s#http://hub.finetune-demo.svc#http://hub.${NS}.svc#" "${ROOT}/examples/tiny-cpu.yaml" \
  | kc apply -f -
deadline=$((SECONDS + TIMEOUT)); last=""
while :; do
  phase=$(kc -n "$NS" get ftj tiny-cpu -o jsonpath='{.status.phase}')
  line=$(kc -n "$NS" get ftj tiny-cpu --no-headers)
  [[ "$line" == "$last" ]] || { log "   ${line}"; last=$line; }
  [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
  ((SECONDS < deadline)) || { log "timed out after ${TIMEOUT}s"; exit 1; }
  sleep 3
done
kc -n "$NS" get ftj tiny-cpu -o wide
kc -n "$NS" get pods -o wide
kc -n "$NS" get ftj tiny-cpu -o jsonpath='{.status}' | jq .
done_step
[[ "$phase" == Succeeded ]] || { log "FineTuneJob ${phase}: kubectl -n ${NS} describe ftj tiny-cpu"; exit 1; }

step "7. the pushed revision in the Hub double"
revision=$(kc -n "$NS" get ftj tiny-cpu -o jsonpath='{.status.result.revision}')
repo=$(kc -n "$NS" get ftj tiny-cpu -o jsonpath='{.status.result.repo}')
kc -n "$NS" exec deploy/hub -c hub -- python -c '
import json, sys, urllib.request
repo, rev = sys.argv[1], sys.argv[2]
req = urllib.request.Request(f"http://127.0.0.1:8080/api/models/{repo}/revision/{rev}")
req.add_header("Authorization", "Bearer " + open("/secrets/token").read().strip())
info = json.load(urllib.request.urlopen(req, timeout=10))
print(f"{repo}@{rev}:", ", ".join(sorted(s["rfilename"] for s in info["siblings"])))
' "$repo" "$revision"
done_step
log "e2e flow done in $((SECONDS - T0))s (hack/e2e.sh clean removes namespace ${NS})"
