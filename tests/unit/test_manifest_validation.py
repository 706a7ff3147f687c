"""Local manifest validation: every problem reported with its wire field path."""

import copy

import pytest

from finetune_api import ManifestError, parse_manifest
from finetune_api.v1alpha1 import FineTuneJobSpec

VALID = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "news-lora"},
    "spec": {
        "model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
        "dataset": {"source": "file:///data/news.jsonl"},
    },
}


def with_changes(**paths):
    doc = copy.deepcopy(VALID)
    for dotted, value in paths.items():
        *parents, leaf = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


DELETE = object()


def test_valid_manifest_gets_defaults():
    job = parse_manifest(VALID)
    assert job.spec.peft.method == "lora" and job.spec.peft.r == 8
    assert job.spec.training.learning_rate == 2.0e-4
    assert job.spec.resources.nodes == 1
    assert job.metadata.namespace == "default"


@pytest.mark.parametrize(
    ("doc", "path", "fragment"),
    [
        (with_changes(spec__model__task="translation"), "spec.model.task", "causal-lm"),
        (with_changes(spec__peft={"r": 0}), "spec.peft.r", "greater than or equal to 1"),
        (with_changes(spec__training={"learningRate": -1}), "spec.training.learningRate", ""),
        (with_changes(spec__dataset={"textField": "t"}), "spec.dataset.source", "required"),
        (with_changes(spec__peft={"method": "qlora"}), "spec.peft.method", "nvidia.com/gpu"),
        (with_changes(spec__evaluation={"gates": {"accuracy": 0.8}}), "spec.evaluation.gates", ""),
        (with_changes(spec__peft={"rank": 8}), "spec.peft.rank", "Extra inputs"),
        (
            with_changes(spec__runPolicy={"pendingTimeoutSeconds": 10}),
            "spec.runPolicy.pendingTimeoutSeconds",
            "greater than or equal to 30",
        ),
        (with_changes(metadata__name="Bad_Name"), "metadata.name", "DNS-1035"),
        (with_changes(spec__model__source="s3://bucket/model"), "spec.model.source", "pattern"),
        (
            with_changes(
                spec__dataset={"source": "hf://x/y", "evalSplit": "t", "evalFraction": 0.1}
            ),
            "spec.dataset.evalFraction",
            "not both",
        ),
        (
            with_changes(spec__model={"source": "hf://x/y", "numLabels": 3}),
            "spec.model.numLabels",
            "sequence-classification",
        ),
        (
            with_changes(
                spec__resources={
                    "accelerator": {"type": "cpu", "tpu": {"accelerator": "a", "topology": "2x2"}}
                }
            ),
            "spec.resources.accelerator.tpu",
            "google.com/tpu",
        ),
    ],
)
def test_bad_manifest_names_the_field(doc, path, fragment):
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    paths = [e.path for e in err.value.errors]
    assert path in paths, f"{path} not in {paths}"
    assert fragment in str(err.value)


def test_all_problems_are_reported_at_once():
    doc = with_changes(spec__peft={"r": 0, "alpha": 0}, spec__training={"epochs": 0})
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert {e.path for e in err.value.errors} >= {
        "spec.peft.r",
        "spec.peft.alpha",
        "spec.training.epochs",
    }


def test_schema_module_imports_no_heavy_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, finetune_api.crd, finetune_api.validation;"
        "bad = {'torch', 'kopf', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_field_names_match_the_contract():
    wire = {f.alias for f in FineTuneJobSpec.model_fields.values()}
    assert wire == {
        "model",
        "dataset",
        "peft",
        "training",
        "evaluation",
        "output",
        "resources",
        "template",
        "runPolicy",
        "serve",
    }


# Repo ids next to huggingface_hub's verdict on them (utils.validate_repo_id): the schema must
# refuse what the client refuses, or a job trains and then fails to push.
HUB_IDS = [
    ("gpt2", True),
    ("org/model", True),
    ("Org-1/model_v2.1", True),
    ("org/" + "m" * 96, True),
    ("o" * 96 + "/" + "m" * 96, True),
    ("org/model_", True),
    ("org/" + "m" * 97, False),
    ("o" * 97 + "/model", False),
    ("org/a--b", False),
    ("org/a..b", False),
    ("org/model.git", False),
    ("org/model-", False),
    ("org/model.", False),
    ("org/-model", False),
    ("a/b/c", False),
    ("org/bad name", False),
]


@pytest.mark.parametrize(("repo_id", "client_accepts"), HUB_IDS)
def test_hub_ids_are_bounded_as_the_client_bounds_them(repo_id, client_accepts):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        accepted = True
    except HFValidationError:
        accepted = False
    assert accepted == client_accepts, "the table disagrees with this huggingface_hub"
    for field, value in (
        ("spec.output.hub.repo", repo_id),
        ("spec.model.source", f"hf://{repo_id}"),
        ("spec.dataset.source", f"hf://{repo_id}"),
    ):
        *parents, leaf = field.split(".")[1:]
        doc = copy.deepcopy(VALID)
        doc["spec"]["output"] = {"hub": {"repo": "org/out", "tokenSecretRef": {"name": "hf"}}}
        node = doc["spec"]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        if client_accepts:
            parse_manifest(doc)
            continue
        with pytest.raises(ManifestError) as err:
            parse_manifest(doc)
        assert field in [e.path for e in err.value.errors], err.value


def test_local_sources_are_not_held_to_hub_id_rules():
    parse_manifest(with_changes(spec__dataset__source="file:///data/a--b..c.git"))


@pytest.mark.parametrize(
    ("processes", "accelerator", "valid"),
    [
        (2, {"type": "nvidia.com/gpu", "count": 2}, True),
        (1, {"type": "nvidia.com/gpu", "count": 8}, True),  # fewer ranks than GPUs: allowed
        (8, {"type": "nvidia.com/gpu", "count": 2}, False),
        (4, {"type": "cpu", "count": 0}, True),  # CPU ranks share the pod's cores
    ],
)
def test_gpu_ranks_need_a_gpu_each(processes, accelerator, valid):
    doc = with_changes(spec__resources={"processesPerNode": processes, "accelerator": accelerator})
    if valid:
        parse_manifest(doc)
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == ["spec.resources.processesPerNode"]
    assert "accelerator.count" in str(err.value)


HF_TOKEN_FROM_SECRET = {
    "name": "HF_TOKEN",
    "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
}


@pytest.mark.parametrize(
    ("hub", "env", "valid"),
    [
        ({}, [], False),  # huggingface.co, and no token from anywhere
        ({"endpoint": "https://huggingface.co"}, [], False),
        ({"endpoint": "https://www.huggingface.co/"}, [], False),
        ({"tokenSecretRef": {"name": "hf"}}, [], True),
        ({}, [HF_TOKEN_FROM_SECRET], True),
        ({}, [{"name": "HF_TOKEN_PATH", "value": "/x"}], False),
        # Another Hub (a mirror, a self-hosted or open one) decides for itself.
        ({"endpoint": "http://hub.ml.svc:8080"}, [], True),
        ({"endpoint": "https://huggingface.co.mirror.example"}, [], True),
    ],
)
def test_a_push_to_huggingface_co_needs_a_token(hub, env, valid):
    doc = with_changes(
        spec__output={"hub": {"repo": "org/out", **hub}}, spec__template={"env": env}
    )
    if valid:
        parse_manifest(doc)
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == ["spec.output.hub.tokenSecretRef"]
    assert "needs a token" in str(err.value)


# ---- spec.template's pod settings ---------------------------------------------------------------
SPREAD = {
    "maxSkew": 1,
    "topologyKey": "kubernetes.io/hostname",
    "whenUnsatisfiable": "DoNotSchedule",
}


def template(**fields):
    return with_changes(spec__template=fields)


def test_pod_settings_are_accepted_and_default():
    job = parse_manifest(
        template(
            imagePullSecrets=[{"name": "regcred"}],
            labels={"sidecar.istio.io/inject": "false", "team": ""},
            annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
            schedulerName="volcano",
            runtimeClassName="nvidia",
            topologySpreadConstraints=[SPREAD],
            securityContext={"runAsUser": 1000650000, "runAsGroup": 0, "fsGroup": 0},
            cacheSize="1.5Ti",
            terminationGracePeriodSeconds=0,
        )
    )
    tpl = job.spec.template
    assert tpl.termination_grace_period_seconds == 0
    assert tpl.labels == {"sidecar.istio.io/inject": "false", "team": ""}
    assert tpl.topology_spread_constraints[0].label_selector is None
    assert tpl.security_context is not None and tpl.security_context.run_as_group == 0
    assert tpl.cache_size == "1.5Ti"
    bare = parse_manifest(VALID).spec.template
    assert bare.cache_size == "20Gi" and bare.security_context is None
    assert bare.termination_grace_period_seconds is None  # Kubernetes' default, 30


@pytest.mark.parametrize("size", ["20Gi", "500M", "1e9", "1073741824", "0.5Ti", "64k"])
def test_cache_size_takes_kubernetes_quantities(size):
    assert parse_manifest(template(cacheSize=size)).spec.template.cache_size == size


@pytest.mark.parametrize(
    ("fields", "path", "fragment"),
    [
        # Not a quantity: the kubelet would refuse the volume, after the Job was created.
        ({"cacheSize": "20 GB"}, "spec.template.cacheSize", "pattern"),
        ({"cacheSize": "20GiB"}, "spec.template.cacheSize", "pattern"),
        ({"cacheSize": "-1Gi"}, "spec.template.cacheSize", "pattern"),
        ({"cacheSize": 20}, "spec.template.cacheSize", "string"),
        # Too many items, entries or characters.
        (
            {"topologySpreadConstraints": [SPREAD] * 4},
            "spec.template.topologySpreadConstraints",
            "at most 3",
        ),
        (
            {"imagePullSecrets": [{"name": f"s{i}"} for i in range(5)]},
            "spec.template.imagePullSecrets",
            "at most 4",
        ),
        ({"labels": {f"k{i}": "v" for i in range(13)}}, "spec.template.labels", "at most 12"),
        (
            {"annotations": {"example.com/a": "x" * 513}},
            "spec.template.annotations.example.com/a",
            "at most 512",
        ),
        # Collisions with the operator's and the Job controller's own keys.
        (
            {"labels": {"app.kubernetes.io/managed-by": "me"}},
            "spec.template.labels",
            "app.kubernetes.io/managed-by",
        ),
        ({"labels": {"finetune.dev/attempt": "1"}}, "spec.template.labels", "finetune.dev/"),
        ({"labels": {"job-name": "x"}}, "spec.template.labels", "job-name"),
        (
            {"annotations": {"prometheus.io/scrape": "false"}},
            "spec.template.annotations",
            "prometheus.io/scrape",
        ),
        (
            {"annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
            "spec.template.annotations",
            "batch.kubernetes.io/",
        ),
        # Keys and values Kubernetes would refuse on the pods.
        ({"labels": {"bad key": "v"}}, "spec.template.labels", "qualified names"),
        ({"annotations": {"Example.com/a": "v"}}, "spec.template.annotations", "qualified"),
        ({"labels": {"team": "-nlp"}}, "spec.template.labels.team", "pattern"),
        ({"labels": {"team": "n" * 64}}, "spec.template.labels.team", "at most 63"),
        ({"schedulerName": "My_Scheduler"}, "spec.template.schedulerName", "pattern"),
        ({"runtimeClassName": ""}, "spec.template.runtimeClassName", "at least 1"),
        (
            {"terminationGracePeriodSeconds": -1},
            "spec.template.terminationGracePeriodSeconds",
            "greater than or equal to 0",
        ),
        (
            {"terminationGracePeriodSeconds": 86401},
            "spec.template.terminationGracePeriodSeconds",
            "less than or equal to 86400",
        ),
        ({"imagePullSecrets": [{}]}, "spec.template.imagePullSecrets[0].name", "required"),
        # The pods run as non-root: UID 0 could only fail at the kubelet.
        ({"securityContext": {"runAsUser": 0}}, "spec.template.securityContext.runAsUser", ""),
        (
            {"securityContext": {"runAsUser": 1, "seLinuxOptions": {}}},
            "spec.template.securityContext.seLinuxOptions",
            "Extra inputs",
        ),
        # Topology spread as Kubernetes validates it.
        (
            {"topologySpreadConstraints": [{**SPREAD, "maxSkew": 0}]},
            "spec.template.topologySpreadConstraints[0].maxSkew",
            "",
        ),
        (
            {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]},
            "spec.template.topologySpreadConstraints[0].whenUnsatisfiable",
            "required",
        ),
        (
            {
                "topologySpreadConstraints": [
                    {**SPREAD, "whenUnsatisfiable": "ScheduleAnyway", "minDomains": 2}
                ]
            },
            "spec.template.topologySpreadConstraints[0].minDomains",
            "DoNotSchedule",
        ),
        (
            {
                "topologySpreadConstraints": [
                    {
                        **SPREAD,
                        "labelSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]},
                    }
                ]
            },
            "spec.template.topologySpreadConstraints[0].labelSelector.matchExpressions[0].values",
            "non-empty for In",
        ),
    ],
)
def test_bad_pod_settings_name_the_field(fields, path, fragment):
    with pytest.raises(ManifestError) as err:
        parse_manifest(template(**fields))
    paths = [e.path for e in err.value.errors]
    assert path in paths, f"{path} not in {paths}"
    assert fragment in str(err.value)


# ---- Hub options: read tokens, branch, createPr ---------------------------------------------

PUSH = {"repo": "org/out", "tokenSecretRef": {"name": "hf"}}
# Branch names next to git's verdict (check-ref-format, narrowed as the Hub double narrows it).
BRANCHES = [
    ("main", True),
    ("dev", True),
    ("experiments/run-1", True),
    ("v1.0", True),
    ("team_a/exp.2/final", True),
    ("b" * 128, True),
    ("b" * 129, False),
    ("HEAD", False),
    ("refs/pr/1", False),
    ("refs/heads/dev", False),
    ("a..b", False),
    ("x.lock", False),
    ("x.lock/y", False),
    ("x.", False),
    ("a/.b", False),
    ("-x", False),
    ("a//b", False),
    ("a/", False),
    ("a b", False),
    ("a~1", False),
    ("0123456789abcdef0123456789abcdef01234567", False),  # reads as a commit id
]


@pytest.mark.parametrize(("branch", "valid"), BRANCHES)
def test_output_branch_follows_git_and_hub_rules(branch, valid, tmp_path):
    doc = with_changes(spec__output={"hub": {**PUSH, "branch": branch}})
    if valid:
        assert parse_manifest(doc).spec.output.hub.branch == branch
        # What the schema lets through, the Hub double's create_branch takes too.
        from finetune_hub_double.store import Store

        store = Store(tmp_path)
        store.create_repo("model", "org/out")
        if branch != "main":
            store.create_branch("model", "org/out", branch)
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == ["spec.output.hub.branch"]


@pytest.mark.parametrize(
    ("hub", "valid"),
    [
        ({"createPr": True}, True),
        ({"createPr": True, "branch": "main"}, True),  # main is where the PR goes anyway
        ({"createPr": True, "branch": "dev"}, False),
        ({"createPr": False, "branch": "dev"}, True),
    ],
)
def test_create_pr_goes_against_main_only(hub, valid):
    doc = with_changes(spec__output={"hub": {**PUSH, **hub}})
    if valid:
        assert parse_manifest(doc).spec.output.hub.create_pr is hub["createPr"]
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == ["spec.output.hub.createPr"]
    assert "not both" in str(err.value)


def test_output_branch_is_not_the_checkpoint_branch():
    clash = with_changes(spec__output={"hub": {**PUSH, "branch": "finetune-checkpoints"}})
    with pytest.raises(ManifestError) as err:
        parse_manifest(clash)
    assert [e.path for e in err.value.errors] == ["spec.output.hub.branch"]
    moved = with_changes(
        spec__output={
            "hub": {**PUSH, "branch": "finetune-checkpoints"},
            "checkpoints": {"hubBranch": "ck"},
        }
    )
    assert parse_manifest(moved).spec.output.hub.branch == "finetune-checkpoints"


@pytest.mark.parametrize(
    ("section", "source", "valid"),
    [
        ("model", "hf://org/base", True),
        ("model", "file:///models/base", False),
        ("dataset", "hf://org/data", True),
        ("dataset", "file:///data/news.jsonl", False),
    ],
)
def test_read_tokens_are_for_hub_sources_only(section, source, valid):
    doc = copy.deepcopy(VALID)
    doc["spec"][section] = {"source": source, "tokenSecretRef": {"name": "reader"}}
    if valid:
        ref = getattr(parse_manifest(doc).spec, section).token_secret_ref
        assert (ref.name, ref.key) == ("reader", "token")
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == [f"spec.{section}.tokenSecretRef"]


def test_a_read_token_is_no_push_token():
    """The push to huggingface.co still needs output.hub's token: a read token cannot push."""
    doc = with_changes(
        spec__model={"source": "hf://org/base", "tokenSecretRef": {"name": "reader"}},
        spec__output={"hub": {"repo": "org/out"}},
    )
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == ["spec.output.hub.tokenSecretRef"]


def test_token_secrets_name_their_field_and_env_push_first():
    doc = with_changes(
        spec__model={"source": "hf://org/base", "tokenSecretRef": {"name": "m", "key": "k"}},
        spec__dataset={"source": "hf://org/data", "tokenSecretRef": {"name": "d"}},
        spec__output={"hub": PUSH},
    )
    tokens = parse_manifest(doc).spec.token_secrets()
    assert [(t.field, t.env, t.ref.name, t.ref.key) for t in tokens] == [
        ("output.hub.tokenSecretRef", "HF_TOKEN", "hf", "token"),
        ("model.tokenSecretRef", "FINETUNE_MODEL_TOKEN", "m", "k"),
        ("dataset.tokenSecretRef", "FINETUNE_DATASET_TOKEN", "d", "token"),
    ]
    assert parse_manifest(VALID).spec.token_secrets() == []


def test_strategy_and_gradient_checkpointing_default():
    training = parse_manifest(VALID).spec.training
    assert (training.strategy, training.gradient_checkpointing, training.precision) == (
        "ddp",
        None,
        "auto",
    )
    fsdp = parse_manifest(with_changes(spec__training={"strategy": "fsdp"})).spec.training
    assert fsdp.strategy == "fsdp"


GPU = {"type": "nvidia.com/gpu", "count": 1}


@pytest.mark.parametrize(
    ("strategy", "method", "precision", "path"),
    [
        ("fsdp", "qlora", "auto", "spec.training.strategy"),
        ("fsdp", "lora", "fp16", "spec.training.precision"),
        ("fsdp", "lora", "bf16", None),
        ("fsdp", "none", "auto", None),
        ("ddp", "qlora", "fp16", None),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(strategy, method, precision, path):
    doc = with_changes(
        spec__training={"strategy": strategy, "precision": precision},
        spec__peft={"method": method},
        spec__resources={"accelerator": GPU},
    )
    if path is None:
        parse_manifest(doc)
        return
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert [e.path for e in err.value.errors] == [path]


@pytest.mark.parametrize(
    ("revision", "valid"),
    [
        ("main", True),
        ("v1.0", True),
        ("a" * 40, True),
        (None, True),
        ("", False),
        ("x" * 128, True),
        ("x" * 129, False),
    ],
)
def test_dataset_revision_is_validated_as_the_model_s(revision, valid):
    """dataset.revision is a bounded, non-empty string like model.revision (both at most as
    long as a branch); unset is main."""
    for section, source in (("dataset", "hf://org/data"), ("model", "hf://org/base")):
        doc = copy.deepcopy(VALID)
        doc["spec"][section] = {**doc["spec"][section], "source": source, "revision": revision}
        if valid:
            assert getattr(parse_manifest(doc).spec, section).revision == revision
            continue
        with pytest.raises(ManifestError) as err:
            parse_manifest(doc)
        assert [e.path for e in err.value.errors] == [f"spec.{section}.revision"]


def test_dataset_revision_is_in_the_crd_beside_the_model_s():
    from finetune_api.crd import to_structural

    spec = to_structural(FineTuneJobSpec)["properties"]
    model, dataset = spec["model"]["properties"], spec["dataset"]["properties"]
    assert dataset["revision"]["maxLength"] == model["revision"]["maxLength"] == 128
    assert dataset["revision"]["description"].startswith("revision is the Hub branch")
