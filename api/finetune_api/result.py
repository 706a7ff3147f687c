"""What a trainer pod reports: one `TrainerResult`, carried as the pod's termination message.

The trainer writes `result.to_message()` to the result file; the kubelet keeps at most 4 KiB of
it, and with FallbackToLogsOnError a crash before it leaves the log tail instead. The operator
reads it back with `TrainerResult.parse`, which never raises: whatever the message holds, it gets
a result or None. The verdict (reason) travels here, typed; exit codes only tell the Job's
podFailurePolicy whether another attempt could help.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from finetune_api.constants import Reason
from finetune_api.pod import HUB_TOKEN_ENVS, PERMANENT_EXIT_CODES, ExitCode

# The kubelet's cap on one container's termination message.
MAX_MESSAGE_BYTES = 4096
# parse() reads no more than this: anything longer did not come from to_message().
MAX_PARSE_BYTES = 16 * 1024
MAX_METRICS = 32
# Phase stamps (finetune_api.phases): a dozen are defined; the rest is room for new ones.
MAX_PHASES = 24
# Generated samples (evaluation.samples, at most 16 in the spec): what the result keeps of each
# field, enough for the model card; the termination message keeps MESSAGE_SAMPLE_CHARS of each
# of the first MESSAGE_SAMPLES, and drops them before it cuts anything else.
MAX_SAMPLES = 16
SAMPLE_CHARS = 2000
MESSAGE_SAMPLES = 3
MESSAGE_SAMPLE_CHARS = 120
# A message holds an error and a bounded log tail (finetune_trainer.logtail): room for both,
# with the rest of the result still inside MAX_MESSAGE_BYTES.
MAX_MESSAGE_CHARS = 3072

# Hub user tokens (hf_ and alphanumerics; scrub any, not only ours) and bearer credentials.
_HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def scrub(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with the Hub tokens of `env` (default: this process's; the push token HF_TOKEN and
    the read tokens, pod.HUB_TOKEN_ENVS), anything shaped like a Hub token, and bearer
    credentials replaced by ***. The one scrubber: everything that may quote a request or an
    exception passes through it before a log, result or status."""
    values = os.environ if env is None else env
    for name in HUB_TOKEN_ENVS:
        token = values.get(name, "").strip()
        if token:
            text = text.replace(token, "***")
    return _BEARER.sub(r"\1***", _HUB_TOKEN.sub("***", text))


def _clipped(limit: int) -> BeforeValidator:
    """Cut over-long text instead of rejecting it: a long message must not lose the verdict."""

    def clip(value: Any) -> Any:
        return value[:limit] if isinstance(value, str) else value

    return BeforeValidator(clip)


class Score(BaseModel):
    model_config = ConfigDict(frozen=True)

    before: float | None = None
    after: float | None = None


class Sample(BaseModel):
    """One evaluation prompt, its reference answer, and what the model generated for it before
    and after training: so a person can see what changed."""

    model_config = ConfigDict(frozen=True)

    prompt: Annotated[str, _clipped(SAMPLE_CHARS)] = ""
    reference: Annotated[str, _clipped(SAMPLE_CHARS)] = ""
    before: Annotated[str, _clipped(SAMPLE_CHARS)] | None = None
    after: Annotated[str, _clipped(SAMPLE_CHARS)] | None = None

    def shortened(self, chars: int) -> dict[str, str]:
        """The fields cut to `chars` characters each (… marks a cut), for the 4 KiB message."""
        return {
            k: v if len(v) <= chars else v[: chars - 1] + "…"
            for k, v in self.model_dump(exclude_none=True).items()
        }


def _clip_dict(limit: int) -> BeforeValidator:
    def clip(value: Any) -> Any:
        return dict(list(value.items())[:limit]) if isinstance(value, dict) else value

    return BeforeValidator(clip)


def _clip_list(limit: int) -> BeforeValidator:
    def clip(value: Any) -> Any:
        return value[:limit] if isinstance(value, list) else value

    return BeforeValidator(clip)


class TrainerResult(BaseModel):
    """Rank 0's account of one attempt. Other ranks report their rank and status, and repeat a
    failed verdict's whole account (the Job's failure may show their pod before rank 0's)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    status: Literal["Succeeded", "Failed"]
    # A finetune_api.constants.Reason value.
    reason: Annotated[str, _clipped(128)] = ""
    message: Annotated[str, _clipped(MAX_MESSAGE_CHARS)] = ""
    evaluation: dict[Annotated[str, _clipped(128)], Score] = Field(default_factory=dict)
    # Answers generated for the first evaluation.samples prompts, when a generation metric ran.
    samples: Annotated[list[Sample], _clip_list(MAX_SAMPLES)] = Field(default_factory=list)
    repo: Annotated[str, _clipped(256)] | None = None
    revision: Annotated[str, _clipped(64)] | None = None
    url: Annotated[str, _clipped(2048)] | None = None
    # Where the push landed: the branch of a commit, or the ref and page of the pull request that
    # output.hub.createPr opened (status.result has the same fields).
    branch: Annotated[str, _clipped(128)] | None = None
    pr_revision: Annotated[str, _clipped(64)] | None = None
    pr_url: Annotated[str, _clipped(2048)] | None = None
    artifact: Literal["adapter", "merged", "full"] = "adapter"
    # The commits the hf:// model, dataset and model.vae were loaded at (every rank loads the
    # same one); unset for a file:// source (status.sources has the same fields).
    model_revision: Annotated[str, _clipped(64)] | None = None
    dataset_revision: Annotated[str, _clipped(64)] | None = None
    vae_revision: Annotated[str, _clipped(64)] | None = None
    steps: int | None = Field(None, ge=0)
    train_loss: float | None = None
    resumed_from_step: int | None = Field(None, ge=0)
    # Real (non-pad) tokens per second over all ranks, for this attempt's training loop after
    # its first optimizer step (warm-up and compiling are not throughput).
    tokens_per_second: float | None = Field(None, ge=0)
    # Set by ranks other than 0, whose result says only that they finished (or, for a failed
    # verdict, repeats rank 0's).
    rank: int | None = Field(None, ge=0)
    # Whether another attempt could change a failed verdict, where its reason leaves that open:
    # PushFailed is retryable after 503s but not after a 403. Unset: the reason decides.
    retryable: bool | None = None
    # Rank 0's phase stamps (finetune_api.phases names, Unix seconds): where the attempt's time
    # went before its first step and after its last. Stamps the trainer did not reach are absent.
    phases: Annotated[dict[Annotated[str, _clipped(32)], float], _clip_dict(MAX_PHASES)] = Field(
        default_factory=dict
    )

    @property
    def succeeded(self) -> bool:
        return self.status == "Succeeded"

    @property
    def exit_code(self) -> ExitCode:
        """The exit code that carries this verdict to the Job's podFailurePolicy."""
        if self.succeeded:
            return ExitCode.OK
        if self.reason in PERMANENT_REASONS:
            return PERMANENT_REASONS[self.reason]
        # A permanent failure with no code of its own: the spec (its credentials or names) is
        # what has to change, so it exits as an invalid spec does.
        return ExitCode.INVALID_SPEC if self.retryable is False else ExitCode.RETRYABLE

    @property
    def permanent(self) -> bool:
        """Whether another attempt could not change the verdict (a bad spec, a missed gate, a
        source that does not exist, a push the Hub refused)."""
        return self.exit_code in PERMANENT_EXIT_CODES

    def to_message(self) -> str:
        """Compact JSON of at most MAX_MESSAGE_BYTES with the message scrubbed. The message is
        cut first, then the last metrics: what the operator acts on is kept whole."""
        # The other ranks report only what they set (a failure's reason and message).
        other_rank = self.rank is not None
        doc = self.model_dump(
            mode="json", by_alias=True, exclude_defaults=other_rank, exclude_none=not other_rank
        )
        if not doc.get("phases"):
            doc.pop("phases", None)
        if "message" in doc:
            doc["message"] = scrub(doc["message"])
        if self.samples:
            doc["samples"] = [
                {k: scrub(v) for k, v in s.shortened(MESSAGE_SAMPLE_CHARS).items()}
                for s in self.samples[:MESSAGE_SAMPLES]
            ]
        else:
            doc.pop("samples", None)
        text = _compact(doc)
        # Samples are for people, and the model card has them whole: they go first.
        while len(text.encode()) > MAX_MESSAGE_BYTES and doc.get("samples"):
            doc["samples"].pop()
            if not doc["samples"]:
                del doc["samples"]
            text = _compact(doc)
        # Then the phase stamps: timings, not the verdict.
        if len(text.encode()) > MAX_MESSAGE_BYTES and doc.get("phases"):
            del doc["phases"]
            text = _compact(doc)
        overflow = len(text.encode()) - MAX_MESSAGE_BYTES
        if overflow > 0:
            message = doc.get("message", "").encode()
            doc["message"] = message[: max(0, len(message) - overflow - 8)].decode(
                errors="ignore"
            ) + ("…" if message else "")
            text = _compact(doc)
        while len(text.encode()) > MAX_MESSAGE_BYTES and doc.get("evaluation"):
            doc["evaluation"].popitem()
            text = _compact(doc)
        return text

    @classmethod
    def parse(cls, message: str | None) -> TrainerResult | None:
        """The result in a termination message, or None; never raises. A field that does not
        validate is dropped rather than costing the whole result."""
        if not message or len(message) > MAX_PARSE_BYTES:
            return None
        try:
            data = json.loads(message)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        if isinstance(data.get("samples"), list):
            data["samples"] = data["samples"][:MAX_SAMPLES]
        if isinstance(data.get("evaluation"), dict):
            data["evaluation"] = dict(list(data["evaluation"].items())[:MAX_METRICS])
        for _ in range(2):
            try:
                return cls.model_validate(data)
            except ValidationError as exc:
                bad = {e["loc"][0] for e in exc.errors() if e["loc"]}
                if "status" in bad or not bad:
                    return None
                data = {k: v for k, v in data.items() if k not in bad}
            except (TypeError, ValueError, RecursionError):
                return None
        return None


# The trainer's verdicts that no other attempt could change, with the exit code each ends with.
PERMANENT_REASONS: Final = {
    Reason.INVALID_SPEC: ExitCode.INVALID_SPEC,
    Reason.EVALUATION_GATE_FAILED: ExitCode.GATE_FAILED,
    # Bad input, like a bad spec: exit code 3 already fails the gang at once, and the verdict
    # (which input) travels in the reason.
    Reason.INVALID_DATASET: ExitCode.INVALID_SPEC,
    # The spec names a model or dataset that the endpoint does not have.
    Reason.MODEL_NOT_FOUND: ExitCode.INVALID_SPEC,
    Reason.DATASET_NOT_FOUND: ExitCode.INVALID_SPEC,
    # The same pod on the same node sees the same hardware: retrying cannot help.
    Reason.ACCELERATOR_UNAVAILABLE: ExitCode.INVALID_SPEC,
    # The same spec on the same devices runs out at the same step (device_memory.py).
    Reason.DEVICE_OUT_OF_MEMORY: ExitCode.INVALID_SPEC,
}


def _compact(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
