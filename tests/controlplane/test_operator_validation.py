"""Bad input: the API server (schema + CEL) and parse_manifest reject the same manifests.

Each row is created on the real API server with strict field validation, as `kubectl apply` creates
a new object, and must be refused with a message naming the field, and must also be refused by
`parse_manifest`, which proves the CRD's rules and the Python rules agree. No operator runs here;
only the CRD is needed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.kube import Kube, refusal

from finetune_api.validation import ManifestError, parse_manifest
from finetune_operator.render import render_manifests
from finetune_operator.settings import Settings

pytest_plugins = ["fixtures.operator"]

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bad"},
    "spec": {"model": {"source": "hf://org/model"}, "dataset": {"source": "hf://org/data"}},
}


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value


_DELETE = object()
# output.hub on an endpoint that needs no token, so that only the rule under test refuses it.
OPEN_HUB = {"repo": "o/r", "endpoint": "http://hub"}
CLS = {"spec.model.task": "sequence-classification", "spec.model.numLabels": 2}
EMB = {"spec.model.task": "sentence-embedding"}

T2I = {"spec.model.task": "text-to-image"}
SPREAD = {
    "maxSkew": 1,
    "topologyKey": "kubernetes.io/hostname",
    "whenUnsatisfiable": "DoNotSchedule",
}
# id, changes (dotted path -> value), substring the error must contain
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no-model", {"spec.model": _DELETE}, "model"),
    ("no-model-source", {"spec.model.source": _DELETE}, "source"),
    ("model-source-scheme", {"spec.model.source": "s3://bucket/m"}, "spec.model.source"),
    ("dataset-source-scheme", {"spec.dataset.source": "http://x/d"}, "spec.dataset.source"),
    ("task-enum", {"spec.model.task": "translation"}, "task"),
    ("numlabels-on-causal", {"spec.model.numLabels": 3}, "numLabels"),
    ("cls-needs-numlabels", {"spec.model.task": "sequence-classification"}, "numLabels"),
    ("numlabels-min", {**CLS, "spec.model.numLabels": 1}, "numLabels"),
    (
        "split-and-fraction",
        {"spec.dataset.evalSplit": "test", "spec.dataset.evalFraction": 0.1},
        "evalFraction",
    ),
    ("fraction-max", {"spec.dataset.evalFraction": 0.9}, "evalFraction"),
    ("prompt-without-response", {"spec.dataset.promptField": "q"}, "responseField"),
    (
        "messages-and-prompt",
        {
            "spec.dataset.messagesField": "m",
            "spec.dataset.promptField": "q",
            "spec.dataset.responseField": "a",
        },
        "messagesField",
    ),
    ("generation-metric-without-prompts", {"spec.evaluation.metrics": ["chrf"]}, "metrics"),
    ("exact-match-on-cls", {**CLS, "spec.evaluation.metrics": ["exact_match"]}, "metrics"),
    ("max-new-tokens-max", {"spec.evaluation.maxNewTokens": 4096}, "maxNewTokens"),
    ("samples-max", {"spec.evaluation.samples": 17}, "samples"),
    ("peft-method-enum", {"spec.peft.method": "prefix"}, "method"),
    ("peft-r-min", {"spec.peft.r": 0}, "r"),
    ("peft-dropout-max", {"spec.peft.dropout": 0.95}, "dropout"),
    (
        "target-modules-max",
        {"spec.peft.targetModules": [f"m{i}" for i in range(65)]},
        "targetModules",
    ),
    ("epochs-min", {"spec.training.epochs": 0}, "epochs"),
    ("max-steps-min", {"spec.training.maxSteps": 0}, "maxSteps"),
    ("lr-positive", {"spec.training.learningRate": 0}, "learningRate"),
    ("precision-enum", {"spec.training.precision": "int8"}, "precision"),
    ("seq-length-min", {"spec.training.maxSeqLength": 4}, "maxSeqLength"),
    ("qlora-needs-gpu", {"spec.peft.method": "qlora"}, "peft.method"),
    ("gate-not-computed", {"spec.evaluation.gates": {"bleu": 0.5}}, "gates"),
    ("perplexity-on-cls", {**CLS, "spec.evaluation.metrics": ["perplexity"]}, "metrics"),
    ("accuracy-on-causal", {"spec.evaluation.metrics": ["accuracy"]}, "metrics"),
    ("ndcg-on-causal", {"spec.evaluation.metrics": ["cosine_ndcg@10"]}, "metrics"),
    ("accuracy-on-embedding", {**EMB, "spec.evaluation.metrics": ["accuracy"]}, "metrics"),
    (
        "embedding-gate-not-computed",
        {**EMB, "spec.evaluation.gates": {"spearman_cosine": 0.5}},
        "gates",
    ),
    ("negative-field-on-causal", {"spec.dataset.negativeField": "neg"}, "negativeField"),
    (
        "embedding-same-columns",
        {**EMB, "spec.dataset.anchorField": "q", "spec.dataset.positiveField": "q"},
        "positiveField",
    ),
    # text-to-image: its fields only with it, LoRA only, no merge, its own metric.
    ("snr-gamma-on-causal", {"spec.training.snrGamma": 5.0}, "snrGamma"),
    ("resolution-on-cls", {**CLS, "spec.training.resolution": 64}, "resolution"),
    ("random-flip-on-causal", {"spec.training.randomFlip": True}, "randomFlip"),
    ("noise-offset-on-cls", {**CLS, "spec.training.noiseOffset": 0.1}, "noiseOffset"),
    ("vae-on-causal", {"spec.model.vae": {"source": "hf://madebyollin/sdxl-vae"}}, "vae"),
    ("text-encoder-on-causal", {"spec.training.trainTextEncoder": True}, "trainTextEncoder"),
    ("vae-repo-id", {**T2I, "spec.model.vae": {"source": "hf://org/a--b"}}, "'--'"),
    ("fsdp-on-embedding", {**EMB, "spec.training.strategy": "fsdp"}, "strategy"),
    # sentence-embedding: Matryoshka sizes only with it, each once, scored only as listed.
    ("matryoshka-on-causal", {"spec.training.matryoshkaDims": [64]}, "matryoshkaDims"),
    ("matryoshka-size-twice", {**EMB, "spec.training.matryoshkaDims": [64, 64]}, "each size once"),
    ("unknown-embedding-metric", {**EMB, "spec.evaluation.metrics": ["cosine_ndcg@5"]}, "only"),
    (
        "metric-of-an-untrained-size",
        {
            **EMB,
            "spec.training.matryoshkaDims": [64],
            "spec.evaluation.metrics": ["dim_32_cosine_ndcg@10"],
        },
        "dim_<d>_<name>",
    ),
    ("score-on-causal", {"spec.dataset.scoreField": "s"}, "scoreField"),
    # GradCache: sentence-embedding's in-batch negatives only, in mini-batches of a larger batch.
    ("cached-on-causal", {"spec.training.cachedMiniBatchSize": 2}, "cachedMiniBatchSize"),
    (
        "cached-not-smaller",
        {**EMB, "spec.training.batchSizePerDevice": 8, "spec.training.cachedMiniBatchSize": 8},
        "smaller than batchSizePerDevice",
    ),
    (
        "cached-scored-pairs",
        {**EMB, "spec.dataset.scoreField": "s", "spec.training.cachedMiniBatchSize": 2},
        "CoSENTLoss",
    ),
    (
        "score-and-negatives",
        {**EMB, "spec.dataset.scoreField": "s", "spec.dataset.negativeField": "n"},
        "scoreField",
    ),
    (
        "retrieval-of-scored-pairs",
        {**EMB, "spec.dataset.scoreField": "s", "spec.evaluation.metrics": ["cosine_ndcg@10"]},
        "of scored pairs",
    ),
    (
        "gate-on-an-unscored-size",
        {
            **EMB,
            "spec.training.matryoshkaDims": [64],
            "spec.evaluation.gates": {"dim_32_cosine_ndcg@10": 0.5},
        },
        "gates",
    ),
    ("image-samples-on-causal", {"spec.evaluation.imageSamples": {"count": 1}}, "imageSamples"),
    (
        "warmup-steps-and-ratio",
        {"spec.training.warmupSteps": 10, "spec.training.warmupRatio": 0.03},
        "warmupRatio",
    ),
    (
        "constant-with-a-warmup",
        {"spec.training.lrSchedulerType": "constant", "spec.training.warmupRatio": 0.03},
        "lrSchedulerType",
    ),
    ("lr-scheduler-enum", {"spec.training.lrSchedulerType": "polynomial"}, "lrSchedulerType"),
    ("warmup-ratio-below-1", {"spec.training.warmupRatio": 1.0}, "warmupRatio"),
    ("t2i-full-fine-tune", {**T2I, "spec.peft.method": "none"}, "peft.method"),
    ("t2i-rslora", {**T2I, "spec.peft.useRslora": True}, "useRslora"),
    ("rslora-full-fine-tune", {"spec.peft": {"method": "none", "useRslora": True}}, "useRslora"),
    ("dora-full-fine-tune", {"spec.peft": {"method": "none", "useDora": True}}, "useDora"),
    ("t2i-dora", {**T2I, "spec.peft.useDora": True}, "useDora"),
    (
        "dora-adapter-on-vllm",
        {
            "spec.peft.useDora": True,
            "spec.output.hub": OPEN_HUB,
            "spec.serve": {"engine": "vllm"},
        },
        "serve.engine",
    ),
    ("t2i-merge", {**T2I, "spec.output.hub": {**OPEN_HUB, "merge": True}}, "merge"),
    ("denoising-loss-on-causal", {"spec.evaluation.metrics": ["denoising_loss"]}, "metrics"),
    ("perplexity-on-t2i", {**T2I, "spec.evaluation.metrics": ["perplexity"]}, "metrics"),
    (
        "t2i-prediction-type-enum",
        {**T2I, "spec.training.predictionType": "sample"},
        "predictionType",
    ),
    ("hub-repo-pattern", {"spec.output.hub": {"repo": "bad repo!"}}, "repo"),
    # What huggingface_hub's validate_repo_id refuses, refused before any training.
    ("hub-repo-part-length", {"spec.output.hub": {"repo": "org/" + "m" * 97}}, "repo"),
    ("hub-repo-double-dash", {"spec.output.hub": {"repo": "org/a--b"}}, "repo"),
    ("hub-repo-dot-git", {"spec.output.hub": {"repo": "org/m.git"}}, "repo"),
    ("model-double-dot", {"spec.model.source": "hf://org/a..b"}, "spec.model.source"),
    ("dataset-dot-git", {"spec.dataset.source": "hf://org/d.git"}, "spec.dataset.source"),
    (
        "hub-endpoint-pattern",
        {"spec.output.hub": {"repo": "o/r", "endpoint": "ftp://x"}},
        "endpoint",
    ),
    (
        "secret-name-empty",
        {"spec.output.hub": {"repo": "o/r", "tokenSecretRef": {"name": ""}}},
        "name",
    ),
    # A push to huggingface.co (no endpoint, or that one) with no token from anywhere.
    ("hub-push-without-token", {"spec.output.hub": {"repo": "o/r"}}, "tokenSecretRef"),
    (
        "hub-push-to-huggingface-co-without-token",
        {"spec.output.hub": {"repo": "o/r", "endpoint": "https://huggingface.co"}},
        "tokenSecretRef",
    ),
    (
        "hub-license-id",
        {"spec.output.hub": {"repo": "o/r", "endpoint": "http://hub", "license": "Apache 2.0"}},
        "license",
    ),
    # Where the push lands: a branch name git and the Hub take, and a PR only against main.
    *(
        (f"hub-branch-{name}", {"spec.output.hub": {**OPEN_HUB, "branch": branch}}, "hub.branch")
        for name, branch in (
            ("pattern", "a b"),
            ("under-refs", "refs/pr/1"),
            ("lock", "x.lock"),
            ("dots", "a..b"),
            ("commit-id", "0123456789abcdef0123456789abcdef01234567"),
            ("head", "HEAD"),
            ("checkpoint-branch", "finetune-checkpoints"),
        )
    ),
    (
        "hub-pr-on-a-branch",
        {"spec.output.hub": {**OPEN_HUB, "branch": "dev", "createPr": True}},
        "createPr",
    ),
    # A read token belongs to an hf:// source.
    (
        "model-token-on-file",
        {"spec.model": {"source": "file:///m", "tokenSecretRef": {"name": "r"}}},
        "spec.model.tokenSecretRef",
    ),
    (
        "dataset-token-on-file",
        {"spec.dataset": {"source": "file:///d.jsonl", "tokenSecretRef": {"name": "r"}}},
        "spec.dataset.tokenSecretRef",
    ),
    (
        "read-token-is-no-push-token",
        {
            "spec.model.tokenSecretRef": {"name": "r"},
            "spec.output.hub": {"repo": "o/r"},
        },
        "output.hub.tokenSecretRef",
    ),
    ("accelerator-enum", {"spec.resources.accelerator": {"type": "amd.com/gpu"}}, "type"),
    ("cpu-count", {"spec.resources.accelerator": {"type": "cpu", "count": 2}}, "count"),
    ("gpu-count", {"spec.resources.accelerator": {"type": "nvidia.com/gpu", "count": 0}}, "count"),
    (
        "tpu-needs-tpu",
        {"spec.resources.accelerator": {"type": "google.com/tpu", "count": 4}},
        "tpu",
    ),
    (
        "tpu-topology",
        {
            "spec.resources.accelerator": {
                "type": "google.com/tpu",
                "count": 4,
                "tpu": {"accelerator": "v5", "topology": "big"},
            }
        },
        "topology",
    ),
    (
        "more-ranks-than-gpus",
        {
            "spec.resources.processesPerNode": 8,
            "spec.resources.accelerator": {"type": "nvidia.com/gpu", "count": 2},
        },
        "processesPerNode",
    ),
    (
        "fsdp-qlora",
        {
            "spec.training.strategy": "fsdp",
            "spec.peft.method": "qlora",
            "spec.resources.accelerator": {"type": "nvidia.com/gpu", "count": 1},
        },
        "strategy",
    ),
    ("fsdp-fp16", {"spec.training.strategy": "fsdp", "spec.training.precision": "fp16"}, "fp16"),
    ("strategy-enum", {"spec.training.strategy": "deepspeed"}, "strategy"),
    ("nodes-min", {"spec.resources.nodes": 0}, "nodes"),
    ("nodes-max", {"spec.resources.nodes": 300}, "nodes"),
    ("backoff-min", {"spec.runPolicy.backoffLimit": -1}, "backoffLimit"),
    ("deadline-min", {"spec.runPolicy.activeDeadlineSeconds": 0}, "activeDeadlineSeconds"),
    ("queue-name-length", {"spec.runPolicy.queueName": "q" * 64}, "queueName"),
    ("hang-timeout-min", {"spec.runPolicy.hangTimeoutSeconds": 5}, "hangTimeoutSeconds"),
    ("pending-timeout-min", {"spec.runPolicy.pendingTimeoutSeconds": 10}, "pendingTimeoutSeconds"),
    # spec.template's pod settings: what Kubernetes would refuse on the pods, and our own keys.
    ("cache-size-quantity", {"spec.template.cacheSize": "20 GB"}, "cacheSize"),
    ("pull-secret-name", {"spec.template.imagePullSecrets": [{"name": "Bad_Name"}]}, "name"),
    (
        "pull-secrets-max",
        {"spec.template.imagePullSecrets": [{"name": f"s{i}"} for i in range(5)]},
        "imagePullSecrets",
    ),
    ("label-key-format", {"spec.template.labels": {"bad key": "v"}}, "spec.template.labels"),
    ("label-value-format", {"spec.template.labels": {"team": "-x"}}, "spec.template.labels"),
    (
        "label-own-key",
        {"spec.template.labels": {"app.kubernetes.io/managed-by": "me"}},
        "app.kubernetes.io/managed-by",
    ),
    (
        "annotation-own-key",
        {"spec.template.annotations": {"prometheus.io/scrape": "false"}},
        "prometheus.io/scrape",
    ),
    ("scheduler-name-format", {"spec.template.schedulerName": "My_Sched"}, "schedulerName"),
    ("run-as-root", {"spec.template.securityContext": {"runAsUser": 0}}, "runAsUser"),
    (
        "grace-period-negative",
        {"spec.template.terminationGracePeriodSeconds": -1},
        "terminationGracePeriodSeconds",
    ),
    (
        "spread-max-items",
        {"spec.template.topologySpreadConstraints": [SPREAD] * 4},
        "topologySpreadConstraints",
    ),
    (
        "spread-min-domains",
        {
            "spec.template.topologySpreadConstraints": [
                {**SPREAD, "whenUnsatisfiable": "ScheduleAnyway", "minDomains": 2}
            ]
        },
        "minDomains",
    ),
    ("name-too-long", {"metadata.name": "a" * 51}, "metadata.name"),
    ("name-with-dots", {"metadata.name": "a.b"}, "metadata.name"),
    ("unknown-field", {"spec.model.flavour": "x"}, "flavour"),
]


def manifest(changes: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        _set(doc, path, value)
    if namespace:
        doc["metadata"]["namespace"] = namespace
    return doc


@pytest.fixture(scope="module")
def bad_ns(kube: Kube) -> Iterator[str]:
    """One namespace for the whole table: rejected objects leave nothing behind to isolate."""
    name = kube.create_namespace("ftj-bad")
    yield name
    kube.delete("Namespace", name, missing_ok=True)


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize(("changes", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_by_api_server_and_python(
    crd: str, kube: Kube, bad_ns: str, changes: dict[str, Any], field: str
) -> None:
    doc = manifest(changes, bad_ns)
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc)
    assert field in str(info.value), f"python: {info.value}"
    # A create, not a server-side apply: SSA answers an undeclared field with a 500.
    refused = refusal(lambda: kube.create(doc), json.dumps(doc))
    # 422 Invalid (schema, CEL) or 400 BadRequest (strict decoding of an unknown field).
    assert refused.status in (400, 422), refused
    assert field in refused.message, refused.message


def test_valid_base_is_accepted(crd: str, kube: Kube, namespace: str) -> None:
    doc = manifest({}, namespace)
    parse_manifest(doc)
    kube.apply(doc)
    assert kube.get("FineTuneJob", "bad", namespace) is not None


@pytest.mark.parametrize(
    "changes",
    [
        # Triplets, gated on the default metrics, a Matryoshka size's among them.
        {
            "spec.dataset.anchorField": "query",
            "spec.dataset.positiveField": "document",
            "spec.dataset.negativeField": "hard",
            "spec.evaluation.gates": {"cosine_ndcg@10": 0.5, "dim_64_cosine_ndcg@10": 0.4},
        },
        # Scored pairs, gated on their default metric, at a Matryoshka size too.
        {
            "spec.dataset.scoreField": "similarity",
            "spec.evaluation.gates": {"spearman_cosine": 0.5, "dim_64_spearman_cosine": 0.4},
        },
    ],
    ids=["triplets", "scored-pairs"],
)
def test_sentence_embedding_is_accepted(
    crd: str, kube: Kube, namespace: str, changes: dict[str, Any]
) -> None:
    doc = manifest({**EMB, "spec.training.matryoshkaDims": [384, 64], **changes}, namespace)
    parse_manifest(doc)
    kube.apply(doc)
    stored = kube.get("FineTuneJob", "bad", namespace)
    assert stored["spec"]["training"]["matryoshkaDims"] == [384, 64]
    for path, value in changes.items():  # stored as sent
        node = stored
        for key in path.split("."):
            node = node[key]
        assert node == value, path


def test_hub_options_are_accepted(crd: str, kube: Kube, namespace: str) -> None:
    doc = manifest(
        {
            "spec.model.tokenSecretRef": {"name": "model-read"},
            "spec.dataset.tokenSecretRef": {"name": "data-read", "key": "t"},
            "spec.output.hub": {**OPEN_HUB, "branch": "experiments/run-1.2"},
        },
        namespace,
    )
    parse_manifest(doc)
    kube.apply(doc)
    pr = manifest({"spec.output.hub": {**OPEN_HUB, "createPr": True, "branch": "main"}}, namespace)
    pr["metadata"]["name"] = "bad-pr"
    parse_manifest(pr)
    kube.apply(pr)
    hub = kube.get("FineTuneJob", "bad", namespace)["spec"]["output"]["hub"]
    assert (hub["branch"], hub["createPr"]) == ("experiments/run-1.2", False)  # the default
    assert kube.get("FineTuneJob", "bad-pr", namespace)["spec"]["output"]["hub"]["createPr"]


def test_a_dora_is_accepted_sharded_and_served_merged_by_vllm(
    crd: str, kube: Kube, namespace: str
) -> None:
    doc = manifest(
        {
            "spec.peft": {"method": "qlora", "useDora": True},
            "spec.resources.accelerator": {"type": "nvidia.com/gpu", "count": 1},
            "spec.output.hub": {**OPEN_HUB, "merge": True},
            "spec.serve": {"engine": "vllm"},
        },
        namespace,
    )
    assert parse_manifest(doc).spec.peft.use_dora
    kube.apply(doc)
    assert kube.get("FineTuneJob", "bad", namespace)["spec"]["peft"]["useDora"] is True
    # Sharded too (tests/trainer/test_sharded_gangs.py trains it).
    sharded = manifest({"spec.peft.useDora": True, "spec.training.strategy": "fsdp"}, namespace)
    sharded["metadata"]["name"] = "dora-fsdp"
    assert parse_manifest(sharded).spec.training.strategy == "fsdp"
    kube.apply(sharded)
    assert kube.get("FineTuneJob", "dora-fsdp", namespace)["spec"]["peft"]["useDora"] is True


def test_spec_is_immutable_but_suspend_is_not(crd: str, kube: Kube, namespace: str) -> None:
    kube.apply(manifest({}, namespace))

    def patch(spec: dict[str, Any]) -> None:
        kube.patch("FineTuneJob", "bad", namespace, {"spec": spec})

    refused = refusal(lambda: patch({"model": {"source": "hf://org/other"}}), "a new model")
    assert "immutable" in refused.message, refused.message
    refused = refusal(lambda: patch({"runPolicy": {"backoffLimit": 7}}), "a new backoffLimit")
    assert "immutable" in refused.message, refused.message
    refused = refusal(lambda: patch({"runPolicy": {"hangTimeoutSeconds": 90}}), "a new timeout")
    assert "immutable" in refused.message, refused.message
    for field, value in (
        ("suspend", True),
        ("activeDeadlineSeconds", 60),
        ("ttlSecondsAfterFinished", 5),
        ("pendingTimeoutSeconds", 1800),
    ):
        patch({"runPolicy": {field: value}})
    got = kube.get("FineTuneJob", "bad", namespace)
    assert got is not None
    assert got["spec"]["runPolicy"]["suspend"] is True
    assert got["spec"]["runPolicy"]["pendingTimeoutSeconds"] == 1800


def test_the_api_server_names_an_own_key(crd: str, kube: Kube, bad_ns: str) -> None:
    """The CRD's messageExpression names the key, where the Python message lists the rule."""
    doc = manifest({"spec.template.labels": {"team": "a", "finetune.dev/attempt": "1"}}, bad_ns)
    refused = refusal(lambda: kube.create(doc), "a label of the operator's own")
    assert refused.status == 422, refused
    assert "labels may not set finetune.dev/attempt," in refused.message, refused.message


POD_SETTINGS = Path(__file__).parents[1] / "unit" / "golden" / "podsettings.input.yaml"


def test_pod_settings_are_accepted_and_render_a_job_kubernetes_accepts(
    crd: str, kube: Kube, namespace: str
) -> None:
    doc = yaml.safe_load(POD_SETTINGS.read_text())
    doc["metadata"]["namespace"] = namespace
    created = kube.create(doc)
    # The API server defaults as the models do, and keeps every field (no pruning).
    ftj = parse_manifest(created)
    assert ftj.spec == parse_manifest(doc).spec
    bare = kube.create(manifest({"metadata.name": "bare"}, namespace))
    assert bare["spec"]["template"]["cacheSize"] == "20Gi"
    # The Job rendered from them passes the API server's own pod validation (a dry run: no
    # kubelet or controller acts on it).
    job = next(m for m in render_manifests(ftj, Settings()) if m["kind"] == "Job")
    query = {"dryRun": "All", "fieldValidation": "Strict", "fieldManager": "controlplane-tests"}
    accepted = kube.request("POST", kube.path("Job", namespace), job, query)
    pod = accepted["spec"]["template"]["spec"]
    assert (
        pod["topologySpreadConstraints"]
        == job["spec"]["template"]["spec"]["topologySpreadConstraints"]
    )
    assert pod["securityContext"]["runAsUser"] == 1000650000
    assert pod["terminationGracePeriodSeconds"] == 300
    labels = accepted["spec"]["template"]["metadata"]["labels"]
    assert labels["sidecar.istio.io/inject"] == "false"


REPO = Path(__file__).resolve().parents[2]
# The examples users apply (examples/) and those `finetune example NAME` prints.
EXAMPLES = sorted(REPO.glob("examples/*.yaml")) + sorted(
    REPO.glob("trainer/finetune_trainer/examples/*.yaml")
)


def test_every_example_is_accepted_and_renders_children_kubernetes_accepts(
    crd: str, kube: Kube, namespace: str
) -> None:
    """Each example, created as `kubectl apply` would (a dry run, strict field validation), is
    accepted by the schema and CEL and defaulted as the models default it, and every child the
    operator renders for it (the Job, the Services, a claim, a serving Deployment) passes the
    API server's own validation: GPU counts, tolerations and resources included."""
    assert len(EXAMPLES) >= 8, EXAMPLES
    query = {"dryRun": "All", "fieldValidation": "Strict", "fieldManager": "controlplane-tests"}
    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        doc["metadata"]["namespace"] = namespace
        accepted = kube.request("POST", kube.path("FineTuneJob", namespace), doc, query)
        job = parse_manifest(accepted)
        assert job.spec == parse_manifest(doc).spec, path.name
        kinds = []
        for child in render_manifests(job, Settings()):
            kube.request("POST", kube.path(child["kind"], namespace), child, query)
            kinds.append(child["kind"])
        assert "Job" in kinds, (path.name, kinds)
