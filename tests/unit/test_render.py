"""Golden-file tests of the pure renderers.

Regenerate after an intended change:  UPDATE_GOLDEN=1 pytest tests/unit/test_render.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import pod
from finetune_api.v1alpha1 import (
    MUTABLE_RUN_POLICY_FIELDS,
    OWN_KEY_PREFIXES,
    FineTuneJob,
    RunPolicy,
    SecretKeyRef,
)
from finetune_api.validation import ManifestError, load_manifest, parse_manifest
from finetune_operator import naming
from finetune_operator.checkpoints import CheckpointStore, choose
from finetune_operator.podspec import SCRAPE_ANNOTATIONS
from finetune_operator.render import (
    owner_reference,
    render_checkpoint_claim,
    render_configmap,
    render_job,
    render_manifests,
    render_service,
)
from finetune_operator.settings import Settings

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name.removesuffix(".input.yaml") for p in GOLDEN.glob("*.input.yaml"))
SETTINGS = Settings(trainer_image="ghcr.io/finetune-operator/trainer:test")


def _render(case: str) -> list[dict[str, Any]]:
    return render_manifests(load_manifest(GOLDEN / f"{case}.input.yaml"), SETTINGS)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    text = yaml.safe_dump_all(_render(case), sort_keys=False)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_cases_cover_every_accelerator() -> None:
    assert {"cpu", "gpu", "tpu"} <= set(CASES)


def _job(case: str) -> dict[str, Any]:
    return next(d for d in _render(case) if d["kind"] == "Job")


def _container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def _env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(job)["env"]}


def test_rendezvous_env_points_at_rank0_through_the_rendezvous_service() -> None:
    _cm, svc, rdzv, job = _render("cpu")
    env = _env(job)
    # One virtual IP for completion index 0, whichever pod that is (see naming).
    assert env["MASTER_ADDR"] == rdzv["metadata"]["name"] == "smollm2-news-lora-rendezvous"
    assert rdzv["spec"]["type"] == "ClusterIP"
    assert rdzv["spec"]["selector"] == {
        **svc["spec"]["selector"],
        "batch.kubernetes.io/job-completion-index": "0",
    }
    assert rdzv["spec"]["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]
    assert rdzv["spec"]["publishNotReadyAddresses"] is True
    assert env["MASTER_PORT"] == "29500"
    assert env["NNODES"] == "2"
    assert env["NODE_RANK"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["LOG_LEVEL"] == "debug"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    assert {p["port"] for p in svc["spec"]["ports"]} == {29500, 9400}


def test_each_hub_token_reaches_the_pod_from_its_secret_under_its_own_name() -> None:
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    spec = ftj.spec.model_copy(deep=True)
    spec.model = spec.model.model_copy(
        update={"token_secret_ref": SecretKeyRef(name="model-read", key="m")}
    )
    spec.dataset = spec.dataset.model_copy(
        update={"source": "hf://org/data", "token_secret_ref": SecretKeyRef(name="data-read")}
    )
    rendered = render_manifests(ftj.model_copy(update={"spec": spec}), SETTINGS)
    job = next(d for d in rendered if d["kind"] == "Job")
    env = _env(job)
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["FINETUNE_MODEL_TOKEN"] == {"secretKeyRef": {"name": "model-read", "key": "m"}}
    assert env["FINETUNE_DATASET_TOKEN"] == {"secretKeyRef": {"name": "data-read", "key": "token"}}
    # Only ever from the Secret: no token value in the manifest, and each name set once.
    names = [e["name"] for e in _container(job)["env"]]
    for name in pod.HUB_TOKEN_ENVS:
        assert names.count(name) == 1
        assert all("value" not in e for e in _container(job)["env"] if e["name"] == name)
    # Without read tokens the pod gets the push token alone, as before.
    plain = _env(_job("cpu"))
    assert "HF_TOKEN" in plain
    assert not {pod.MODEL_TOKEN_ENV, pod.DATASET_TOKEN_ENV} & set(plain)


def test_cpu_pods_preload_the_images_tcmalloc_unless_the_template_names_ld_preload() -> None:
    assert _env(_job("cpu"))[pod.PRELOAD_ENV] == pod.CPU_ALLOCATOR == "libtcmalloc_minimal.so.4"
    # Accelerator jobs keep the C library's malloc (not measured there).
    assert pod.PRELOAD_ENV not in _env(_job("gpu"))
    assert pod.PRELOAD_ENV not in _env(_job("tpu"))
    # The user's LD_PRELOAD, an empty one too, is the only one: the container's env names it once.
    for value in ("/opt/jemalloc/libjemalloc.so.2", ""):
        doc = yaml.safe_load((GOLDEN / "cpu.input.yaml").read_text())
        doc["spec"]["template"]["env"].append({"name": "LD_PRELOAD", "value": value})
        rendered = render_manifests(parse_manifest(doc), SETTINGS)
        env = _container(next(d for d in rendered if d["kind"] == "Job"))["env"]
        assert [e for e in env if e["name"] == pod.PRELOAD_ENV] == [
            {"name": pod.PRELOAD_ENV, "value": value}
        ]


def test_gpu_pods_get_expandable_segments_unless_the_template_sets_the_allocator() -> None:
    setting = {pod.CUDA_ALLOC_CONF_ENV: "expandable_segments:True"}
    assert _env(_job("gpu"))[pod.CUDA_ALLOC_CONF_ENV] == setting[pod.CUDA_ALLOC_CONF_ENV]
    for other in ("cpu", "tpu"):
        assert not set(pod.CUDA_ALLOC_CONF_ENVS) & set(_env(_job(other)))
    # Either of torch's names in template.env, empty too, is the user's setting and the only one.
    for name, value in (
        ("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync"),
        (pod.CUDA_ALLOC_CONF_ENV, ""),
    ):
        doc = yaml.safe_load((GOLDEN / "gpu.input.yaml").read_text())
        doc["spec"].setdefault("template", {}).setdefault("env", []).append(
            {"name": name, "value": value}
        )
        rendered = render_manifests(parse_manifest(doc), SETTINGS)
        env = _container(next(d for d in rendered if d["kind"] == "Job"))["env"]
        assert [e for e in env if e["name"] in pod.CUDA_ALLOC_CONF_ENVS] == [
            {"name": name, "value": value}
        ]


def _threads(resources: dict[str, Any], processes: int = 1, env: Any = ()) -> list[Any]:
    """The OMP_NUM_THREADS entries of the cpu case's container for these resources."""
    doc = yaml.safe_load((GOLDEN / "cpu.input.yaml").read_text())
    doc["spec"]["resources"].update(resources, processesPerNode=processes)
    doc["spec"]["template"]["env"].extend(env)
    rendered = render_manifests(parse_manifest(doc), SETTINGS)
    container = _container(next(d for d in rendered if d["kind"] == "Job"))
    return [e.get("value") for e in container["env"] if e["name"] == pod.THREADS_ENV]


def test_each_process_gets_threads_for_its_share_of_the_pods_cpu() -> None:
    # The limit, else the request, split over the pod's processes, rounded down, at least 1.
    assert _threads({"requests": {"cpu": "250m"}, "limits": {}}) == ["1"]
    assert _threads({"requests": {"cpu": 8}, "limits": {}}, processes=2) == ["4"]
    assert _threads({"requests": {"cpu": "2"}, "limits": {"cpu": "7500m"}}, processes=2) == ["3"]
    assert _threads({"requests": {"cpu": "1"}, "limits": {}}, processes=4) == ["1"]
    # No CPU named: unset, and the trainer splits the cores it sees (env.omp_threads).
    assert _threads({"requests": {"memory": "1Gi"}, "limits": {}}) == []
    # A CPU the API server will refuse is left to it: the Job's creation says what is wrong.
    assert _threads({"requests": {"cpu": "two"}, "limits": {}}) == []
    # The user's own value is the only one.
    own = [{"name": "OMP_NUM_THREADS", "value": "6"}]
    assert _threads({"requests": {"cpu": 2}, "limits": {}}, env=own) == ["6"]


def test_job_is_an_indexed_gang_that_fails_fast() -> None:
    spec = _job("cpu")["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"]["values"] == [3, 4]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # runPolicy.ttlSecondsAfterFinished (3600 here) is run by the operator, after the verdict.
    assert "ttlSecondsAfterFinished" not in spec


def test_pod_passes_restricted_pod_security() -> None:
    pod = _job("cpu")["spec"]["template"]["spec"]
    # Non-root, but no fixed UID, GID or fsGroup: OpenShift's restricted-v2 assigns its own and
    # refuses any other; elsewhere the image's numeric USER (1000) applies.
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The trainer never calls the API server, so its pods carry no ServiceAccount token.
    assert pod["automountServiceAccountToken"] is False
    sc = _container(_job("cpu"))["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in _container(_job("cpu"))["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/checkpoints", "/etc/finetune"} <= mounts


def test_gpu_resources_queue_and_overrides() -> None:
    job = _job("gpu")
    res = _container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True  # Kueue admits by unsuspending
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert _container(job)["image"] == "registry.example/trainer:custom"
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["priorityClassName"] == "training"
    assert pod["serviceAccountName"] == "trainer"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"] == {"claimName": "ckpt"}
    assert "data" in vols


def test_tpu_node_selectors_and_suspend() -> None:
    job = _job("tpu")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "2x4",
    }
    assert _container(job)["resources"]["limits"]["google.com/tpu"] == "4"
    assert job["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_configmap_holds_spec_only_never_status_or_env_values() -> None:
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    ftj_with_status = ftj.model_copy(update={"status": None})
    cm = render_configmap(ftj_with_status, owner_reference("x", "uid"))
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    assert doc["metadata"] == {"name": "smollm2-news-lora", "namespace": "ml"}
    assert "env" not in doc["spec"]["template"]
    # The trainer reads it back as the spec, less the env and the fields it never reads.
    assert set(doc["spec"]["runPolicy"]) == {"backoffLimit", "hangTimeoutSeconds"}
    policy = RunPolicy(backoffLimit=2)
    assert parse_manifest(doc).spec == ftj.spec.model_copy(
        update={
            "template": ftj.spec.template.model_copy(update={"env": []}),
            "run_policy": policy,
        }
    )


def test_configmap_is_the_same_whatever_the_mutable_fields_say() -> None:
    """An edit the API allows while the job runs (a suspend, a deadline, serving) leaves what the
    pods read as it was: the kubelet would otherwise swap their ConfigMap volume under them."""
    doc = yaml.safe_load((GOLDEN / "cpu.input.yaml").read_text())
    before = render_configmap(parse_manifest(doc), owner_reference("x", "uid"))
    assert set(MUTABLE_RUN_POLICY_FIELDS) < set(RunPolicy.model_json_schema()["properties"])
    doc["spec"]["runPolicy"].update(
        suspend=True, activeDeadlineSeconds=60, ttlSecondsAfterFinished=5, pendingTimeoutSeconds=30
    )
    assert set(MUTABLE_RUN_POLICY_FIELDS) <= set(doc["spec"]["runPolicy"])
    doc["spec"]["serve"] = {"engine": "transformers"}
    edited = parse_manifest(doc)
    assert edited.spec.run_policy.suspend and edited.spec.serve is not None
    assert render_configmap(edited, owner_reference("x", "uid")) == before
    # An immutable field does reach the pods.
    doc["spec"]["runPolicy"]["hangTimeoutSeconds"] = 120
    assert render_configmap(parse_manifest(doc), owner_reference("x", "uid")) != before


def test_children_are_owned_and_labelled() -> None:
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    owner = owner_reference(ftj.metadata.name, "1234")
    store = choose(ftj, default_storage_class=True)
    for obj in (
        render_configmap(ftj, owner),
        render_service(ftj, owner),
        render_checkpoint_claim(ftj, owner),
        render_job(ftj, owner, 3, SETTINGS, store),
    ):
        assert obj["metadata"]["ownerReferences"] == [owner]
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
        assert obj["metadata"]["labels"]["finetune.dev/job-name"] == "smollm2-news-lora"
    job = render_job(ftj, owner, 3, SETTINGS, store)
    assert job["metadata"]["labels"]["finetune.dev/attempt"] == "3"
    assert job["spec"]["template"]["metadata"]["labels"]["finetune.dev/attempt"] == "3"


def test_the_hub_cache_is_on_the_checkpoint_claim_when_there_is_one() -> None:
    """With a claim (the user's, mounted on every pod, or a one-node gang's own), the sources
    are fetched onto it once for the job; without one each pod's /tmp keeps its own copy."""
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    owner = owner_reference(ftj.metadata.name, "1234")
    with_claim = render_job(ftj, owner, 1, SETTINGS, CheckpointStore("Volume", claim_name="c"))
    assert _env(with_claim)[pod.HF_HUB_CACHE_ENV] == pod.SOURCE_CACHE_DIR
    assert pod.SOURCE_CACHE_DIR.startswith(pod.CHECKPOINT_DIR + "/")
    for kind in ("HubBranch", "Ephemeral"):
        job = render_job(ftj, owner, 1, SETTINGS, CheckpointStore(kind))  # type: ignore[arg-type]
        assert pod.HF_HUB_CACHE_ENV not in _env(job)
        assert _env(job)["HF_HOME"] == pod.HF_HOME


def test_render_is_deterministic() -> None:
    assert _render("gpu") == _render("gpu")


def test_default_resources_apply_only_to_jobs_that_set_none() -> None:
    defaults = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    settings = Settings(trainer_default_resources=defaults)
    own = load_manifest(GOLDEN / "gpu.input.yaml")
    assert own.spec.resources.requests
    # The job's own requests and limits win whole; the defaults are not merged into them.
    mine = _container(render_manifests(own, settings)[-1])["resources"]
    assert mine == _container(_job("gpu"))["resources"]

    bare = own.model_copy(deep=True)
    bare.spec.resources.requests, bare.spec.resources.limits = {}, {}
    res = _container(render_manifests(bare, settings)[-1])["resources"]
    # The accelerator's extended resource and the cache's local storage still go on top.
    assert res == {
        "requests": {
            "cpu": "2",
            "ephemeral-storage": "20Gi",
            "memory": "8Gi",
            "nvidia.com/gpu": "8",
        },
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "8"},
    }
    without_defaults = _container(render_manifests(bare, Settings())[-1])["resources"]
    assert without_defaults == {
        "requests": {"ephemeral-storage": "20Gi", "nvidia.com/gpu": "8"},
        "limits": {"nvidia.com/gpu": "8"},
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{cpu: 2}", "is not JSON"),
        ('{"request": {"cpu": "2"}}', "only requests and limits"),
        ('{"requests": {"cpu": true}}', "requests must map resource names to quantities"),
    ],
)
def test_malformed_default_resources_stop_the_operator(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"FINETUNE_TRAINER_DEFAULT_RESOURCES": value})


# ---- spec.template's pod settings ---------------------------------------------------------------


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def _with_template(case: str, **template: Any) -> FineTuneJob:
    """A golden input with spec.template fields set, validated as a manifest would be."""
    doc = yaml.safe_load((GOLDEN / f"{case}.input.yaml").read_text())
    doc["spec"].setdefault("template", {}).update(template)
    return parse_manifest(doc)


def _render_job(ftj: FineTuneJob, settings: Settings = SETTINGS) -> dict[str, Any]:
    return next(d for d in render_manifests(ftj, settings) if d["kind"] == "Job")


def test_pod_settings_reach_the_pod_spec() -> None:
    pod = _pod(_job("podsettings"))
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror.pull-secret"}]
    assert pod["schedulerName"] == "volcano"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["terminationGracePeriodSeconds"] == 300
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000650000,
        "runAsGroup": 0,
        "fsGroup": 1000650000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_unset_pod_settings_leave_kubernetes_defaults() -> None:
    pod = _pod(_job("cpu"))
    for field in (
        "imagePullSecrets",
        "schedulerName",
        "runtimeClassName",
        "topologySpreadConstraints",
        "terminationGracePeriodSeconds",
    ):
        assert field not in pod, field


def test_topology_spread_counts_the_gang_unless_told_otherwise() -> None:
    zone, host = _pod(_job("podsettings"))["topologySpreadConstraints"]
    # No labelSelector: the gang's own pods, which Kubernetes' default (none) would not count.
    assert zone == {
        "maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": naming.selector_labels("spread-lora")},
        "minDomains": 2,
        "nodeTaintsPolicy": "Honor",
    }
    assert host == {
        "maxSkew": 2,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {
            "matchExpressions": [
                {"key": "team", "operator": "In", "values": ["nlp"]},
                {"key": "finetune.dev/job-name", "operator": "Exists"},
            ]
        },
        "matchLabelKeys": ["finetune.dev/attempt"],
    }
    # The selector matches the labels the gang's pods carry.
    labels = _job("podsettings")["spec"]["template"]["metadata"]["labels"]
    assert zone["labelSelector"]["matchLabels"].items() <= labels.items()


def test_an_empty_label_selector_stays_empty() -> None:
    """`labelSelector: {}` selects every pod in Kubernetes; it is not the unset default."""
    constraint = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {},
    }
    ftj = _with_template("cpu", topologySpreadConstraints=[constraint])
    assert _pod(_render_job(ftj))["topologySpreadConstraints"] == [constraint]


def test_template_labels_and_annotations_are_merged_onto_the_pods() -> None:
    job = _job("podsettings")
    meta = job["spec"]["template"]["metadata"]
    assert meta["labels"] == {
        "sidecar.istio.io/inject": "false",
        "team": "nlp",
        **naming.attempt_labels("spread-lora", 1),
    }
    assert meta["annotations"] == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        "example.com/owner": "nlp-team@example.com",
        **SCRAPE_ANNOTATIONS,
    }
    # Only the pods get them: the Job and the other children keep the operator's labels alone.
    assert "team" not in job["metadata"]["labels"]
    assert "annotations" not in job["metadata"]


def test_the_operators_own_pod_keys_win_and_are_refused_by_the_schema() -> None:
    meta = _job("cpu")["spec"]["template"]["metadata"]
    # Every key the operator puts on the pods is one the schema keeps users from setting...
    for field, keys in (("labels", meta["labels"]), ("annotations", meta["annotations"])):
        for key in keys:
            with pytest.raises(ManifestError) as err:
                _with_template("cpu", **{field: {key: "mine"}})
            assert [e.path for e in err.value.errors] == [f"spec.template.{field}"], key
            assert key in str(err.value) or key.startswith(OWN_KEY_PREFIXES)
    # ... and should one get past it (a spec built in code), the operator's value still wins.
    ftj = load_manifest(GOLDEN / "cpu.input.yaml")
    ftj.spec.template.labels = {"finetune.dev/attempt": "7", "app.kubernetes.io/component": "x"}
    ftj.spec.template.annotations = {"prometheus.io/scrape": "false"}
    forced = _render_job(ftj)["spec"]["template"]["metadata"]
    assert forced["labels"] == meta["labels"]
    assert forced["annotations"] == meta["annotations"]


def test_cache_size_sizes_the_tmp_volume_and_requests_local_storage() -> None:
    job = _job("podsettings")
    tmp = next(v for v in _pod(job)["volumes"] if v["name"] == "tmp")
    assert tmp == {"name": "tmp", "emptyDir": {"sizeLimit": "64Gi"}}
    # /tmp is where HF_HOME (the cache) and HOME live.
    env = _env(job)
    assert env["HF_HOME"].startswith("/tmp/") and env["HOME"] == "/tmp"
    assert _container(job)["resources"]["requests"]["ephemeral-storage"] == "64Gi"
    default = _job("cpu")
    tmp = next(v for v in _pod(default)["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"sizeLimit": "20Gi"}
    assert _container(default)["resources"]["requests"]["ephemeral-storage"] == "20Gi"


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        # The job's own request wins; the volume keeps cacheSize as its limit.
        (
            {"requests": {"ephemeral-storage": "100Gi"}},
            {"requests": {"ephemeral-storage": "100Gi"}},
        ),
        # A limit alone: Kubernetes defaults the request to it, so none is added.
        ({"limits": {"ephemeral-storage": "50Gi"}}, {"limits": {"ephemeral-storage": "50Gi"}}),
    ],
)
def test_the_jobs_own_ephemeral_storage_wins(
    resources: dict[str, Any], expected: dict[str, Any]
) -> None:
    doc = yaml.safe_load((GOLDEN / "cpu.input.yaml").read_text())
    doc["spec"]["resources"] = {"nodes": 2, **resources}
    job = _render_job(parse_manifest(doc))
    assert _container(job)["resources"] == expected
    tmp = next(v for v in _pod(job)["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"sizeLimit": "20Gi"}


def test_operator_default_ephemeral_storage_is_kept() -> None:
    defaults = {"requests": {"cpu": "1", "ephemeral-storage": "5Gi"}}
    bare = load_manifest(GOLDEN / "cpu.input.yaml")
    bare.spec.resources.requests, bare.spec.resources.limits = {}, {}
    job = _render_job(bare, Settings(trainer_default_resources=defaults))
    assert _container(job)["resources"] == defaults
