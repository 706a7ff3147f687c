"""The contract package: the pod's result message, the rendezvous env, and who imports whom."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
from test_status import RESULT_OK as OK

from finetune_api import pod
from finetune_api.constants import Reason
from finetune_api.result import MAX_MESSAGE_BYTES, MAX_MESSAGE_CHARS, TrainerResult, scrub

ROOT = Path(__file__).resolve().parents[2]


def test_result_round_trips_through_the_message() -> None:
    result = TrainerResult.parse(json.dumps(OK))
    assert result is not None
    assert result.revision == "abc123" and result.steps == 30 and result.train_loss == 0.4
    assert result.evaluation["accuracy"].after == 0.81
    assert TrainerResult.parse(result.to_message()) == result


@pytest.mark.parametrize(
    "message",
    [None, "", "not json", "[1,2]", "{}", '{"status": "Maybe"}', "x" * 100_000, "[" * 10_000],
)
def test_parse_never_raises_and_needs_a_status(message: str | None) -> None:
    assert TrainerResult.parse(message) is None


def test_parse_drops_a_bad_field_but_keeps_the_verdict() -> None:
    doc = {"status": "Failed", "reason": "EvaluationGateFailed", "steps": "many", "repo": 7}
    result = TrainerResult.parse(json.dumps(doc))
    assert result is not None and result.permanent
    assert result.reason == "EvaluationGateFailed" and result.steps is None


def test_parse_clips_long_text_instead_of_rejecting_it() -> None:
    doc = {"status": "Failed", "reason": "TrainingFailed", "message": "m" * 5000}
    result = TrainerResult.parse(json.dumps(doc))
    assert result is not None and len(result.message) == MAX_MESSAGE_CHARS


def test_message_fits_the_kubelet_cap_and_hides_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-not-hub-shaped")
    result = TrainerResult(
        status="Failed",
        reason=Reason.TRAINING_FAILED,
        message="auth s3cr3t-not-hub-shaped and hf_abcdefghij failed " + "x" * 900,
        evaluation={f"metric{i:02d}" + "n" * 100: {"before": 0.1, "after": 0.2} for i in range(32)},
    )
    text = result.to_message()
    assert len(text.encode()) <= MAX_MESSAGE_BYTES
    assert "s3cr3t" not in text and "hf_abcdefghij" not in text
    parsed = TrainerResult.parse(text)
    assert parsed is not None and parsed.reason == "TrainingFailed" and parsed.evaluation


def test_other_ranks_report_a_scrubbed_failure_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-not-hub-shaped")
    done = TrainerResult(status="Succeeded", rank=1)
    assert json.loads(done.to_message()) == {"status": "Succeeded", "rank": 1}
    failed = TrainerResult(
        status="Failed", reason=Reason.COLLECTIVE_TIMEOUT, message="s3cr3t-not-hub-shaped", rank=1
    )
    doc = json.loads(failed.to_message())
    assert doc == {"status": "Failed", "reason": "CollectiveTimeout", "message": "***", "rank": 1}


def test_exit_codes_follow_the_reason() -> None:
    def code(status: str, reason: str) -> int:
        return TrainerResult(status=status, reason=reason).exit_code  # type: ignore[arg-type]

    assert code("Succeeded", Reason.PUSHED) == pod.ExitCode.OK
    assert code("Failed", Reason.INVALID_SPEC) == pod.ExitCode.INVALID_SPEC
    assert code("Failed", Reason.EVALUATION_GATE_FAILED) == pod.ExitCode.GATE_FAILED
    assert code("Failed", Reason.INVALID_DATASET) == pod.ExitCode.INVALID_SPEC
    retryable_reasons = (
        Reason.TRAINING_FAILED,
        Reason.PUSH_FAILED,
        Reason.INTERRUPTED,
        Reason.COLLECTIVE_TIMEOUT,
    )
    for retryable in retryable_reasons:
        assert code("Failed", retryable) == pod.ExitCode.RETRYABLE
    for missing in (Reason.MODEL_NOT_FOUND, Reason.DATASET_NOT_FOUND):
        assert code("Failed", missing) in pod.PERMANENT_EXIT_CODES
    assert set(pod.PERMANENT_EXIT_CODES) == {pod.ExitCode.INVALID_SPEC, pod.ExitCode.GATE_FAILED}


def test_a_refused_push_is_permanent_and_survives_the_message() -> None:
    """PushFailed is retryable after 503s and permanent after a 403: the result says which."""
    refused = TrainerResult(status="Failed", reason=Reason.PUSH_FAILED, retryable=False)
    assert refused.permanent and refused.exit_code in pod.PERMANENT_EXIT_CODES
    parsed = TrainerResult.parse(refused.to_message())
    assert parsed is not None and parsed.permanent
    flaky = TrainerResult(status="Failed", reason=Reason.PUSH_FAILED, retryable=True)
    assert not flaky.permanent and flaky.exit_code == pod.ExitCode.RETRYABLE
    # A reason that is always permanent stays so.
    gate = TrainerResult(status="Failed", reason=Reason.EVALUATION_GATE_FAILED, retryable=True)
    assert gate.exit_code == pod.ExitCode.GATE_FAILED


def test_scrub_bearer_and_hub_tokens() -> None:
    assert scrub("Authorization: Bearer abc.def", {}) == "Authorization: Bearer ***"
    assert scrub("leaked hf_abcdefghijklmnop", {}) == "leaked ***"
    assert scrub("token=s3cr3t here", {"HF_TOKEN": "s3cr3t"}) == "token=*** here"
    assert scrub("nothing to hide", {}) == "nothing to hide"


def test_scrub_hides_the_read_tokens_too() -> None:
    # Tokens of a self-hosted Hub need not look like hf_...: each is hidden by its value.
    env = {"HF_TOKEN": "push-secret", "FINETUNE_MODEL_TOKEN": "model-secret"}
    env["FINETUNE_DATASET_TOKEN"] = "data-secret"
    text = "push-secret, model-secret and data-secret in one message"
    assert scrub(text, env) == "***, *** and *** in one message"
    assert set(pod.HUB_TOKEN_ENVS) == set(env)


def test_result_scrubs_read_tokens_and_carries_where_the_push_landed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FINETUNE_MODEL_TOKEN", "model-secret-value")
    monkeypatch.setenv("FINETUNE_DATASET_TOKEN", "data-secret-value")
    result = TrainerResult(
        status="Succeeded",
        message="read with model-secret-value and data-secret-value",
        repo="org/x",
        revision="a" * 40,
        pr_revision="refs/pr/3",
        pr_url="https://hub/org/x/discussions/3",
    )
    message = result.to_message()
    assert "secret-value" not in message
    assert '"prRevision":"refs/pr/3"' in message  # camelCase on the wire, as the rest
    parsed = TrainerResult.parse(message)
    assert parsed is not None
    assert (parsed.pr_revision, parsed.pr_url, parsed.branch) == (
        "refs/pr/3",
        "https://hub/org/x/discussions/3",
        None,
    )
    on_branch = TrainerResult.parse(TrainerResult(status="Succeeded", branch="exp/1").to_message())
    assert on_branch is not None and on_branch.branch == "exp/1"


def test_rendezvous_env_leaves_the_node_rank_to_the_pod() -> None:
    env = pod.rendezvous_env(nnodes=2, nproc_per_node=4, master_addr="j-0.j")
    assert env == {
        "NNODES": "2",
        "NPROC_PER_NODE": "4",
        "MASTER_ADDR": "j-0.j",
        "MASTER_PORT": "29500",
    }
    local = pod.rendezvous_env(nnodes=2, nproc_per_node=1, master_addr="h", node_rank=1)
    assert local["NODE_RANK"] == "1"


def _imports(package: Path) -> set[str]:
    """Top-level names of every module that the package's files import."""
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_operator_and_trainer_share_only_the_contract() -> None:
    operator = _imports(ROOT / "operator" / "finetune_operator")
    trainer = _imports(ROOT / "trainer" / "finetune_trainer")
    assert "finetune_api" in operator and "finetune_api" in trainer
    assert "finetune_trainer" not in operator
    assert "finetune_operator" not in trainer
    assert not {"finetune_cli", "finetune_hub_double"} & (operator | trainer)


def test_contract_needs_only_pydantic_and_yaml() -> None:
    allowed = {"finetune_api", "pydantic", "yaml", "__future__", *sys.stdlib_module_names}
    assert _imports(ROOT / "api" / "finetune_api") <= allowed


def test_result_carries_the_loaded_commits_bounded() -> None:
    result = TrainerResult(status="Succeeded", model_revision="a" * 40, dataset_revision="b" * 40)
    message = result.to_message()
    assert '"modelRevision":"' + "a" * 40 in message and '"datasetRevision":"' in message
    assert TrainerResult.parse(message) == result
    # Too long is cut, not rejected; a value of the wrong type is dropped, the verdict kept.
    parsed = TrainerResult.parse(
        json.dumps({"status": "Succeeded", "modelRevision": "c" * 500, "datasetRevision": [1]})
    )
    assert parsed is not None and parsed.model_revision == "c" * 64
    assert parsed.dataset_revision is None and parsed.succeeded
