"""FineTuneJob v1alpha1: the one schema behind the CRD, the operator and the trainer.

The CRD's OpenAPI is generated from these models (`python -m finetune_api.crd`), and the
trainer reads a manifest through them. Field names are the wire (camelCase) names of the public
contract in docs/api.md. This module imports neither kopf nor torch.
"""

import math
import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from finetune_api.constants import (
    API_VERSION,
    GROUP,
    KIND,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    MAX_NAME_LENGTH,
    Phase,
)
from finetune_api.metrics import (
    DEFAULT_METRICS,
    GENERATION_METRICS,
    SCORED_PAIR_METRICS,
    TRUNCATED_PREFIX,
    TRUNCATED_PREFIX_PATTERN,
    effective_metrics,
    embedding_metrics,
    foreign_metrics,
    metrics_of,
    needs_generation,
)
from finetune_api.pod import (
    DATASET_TOKEN_ENV,
    HF_TOKEN_ENV,
    KUBERNETES_GRACE_PERIOD_SECONDS,
    MODEL_TOKEN_ENV,
)
from finetune_api.rules import Rule, TransitionRule

# Bounded building blocks: every string, list and map in a CRD needs a bound, or CEL rules exceed
# the API server's cost budget.
ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=253)]
# A dataset column: 64 characters is plenty, and keeps the largest spec under SPEC_MAX_BYTES
# as fields are added.
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
PathStr = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# The spec must stay small whatever a user puts in it: kubectl apply keeps a copy of the whole
# object in an annotation (256 kB for all of them), and the children repeat most of it.
# tests/unit/test_crd.py adds up the worst case of every bounded field against SPEC_MAX_BYTES.
ENV_VALUE_MAX_LENGTH = 1024
SPEC_MAX_BYTES = 192 * 1024
Quantity = Annotated[
    int | Annotated[str, StringConstraints(max_length=64)],
    Field(description="A Kubernetes quantity, such as 2, 500m or 8Gi."),
]
# Hub ids as huggingface_hub accepts them (utils.validate_repo_id), which a longer or odd name
# fails only once the job has trained: an optional namespace and a name, `gpt2` or `org/name`,
# each 1-96 of letters, digits, `_`, `-` and `.`, ending in a letter, digit or `_`. The client's
# other refusals ("--", "..", a ".git" ending) are `_hub_id_rule`s.
MAX_HUB_PART_LENGTH = 96
_HUB_PART = rf"[A-Za-z0-9]([A-Za-z0-9._-]{{0,{MAX_HUB_PART_LENGTH - 2}}}[A-Za-z0-9_])?"
_HUB_ID = rf"{_HUB_PART}(/{_HUB_PART})?"
MAX_HUB_ID_LENGTH = 2 * MAX_HUB_PART_LENGTH + 1
SOURCE_PATTERN = rf"^(hf://{_HUB_ID}|file:///.+)$"
REPO_PATTERN = rf"^{_HUB_ID}$"
# A branch to push to, as git (check-ref-format) and so the Hub accept it, narrowed as the Hub
# double narrows it: parts of letters, digits, '_', '.' and '-' split by '/', each starting with a
# letter or digit. `_BRANCH_RULE` says the rest, which a pattern cannot say.
MAX_BRANCH_LENGTH = 128
BRANCH_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"
DEFAULT_BRANCH = "main"
# A source's revision: a branch, tag or commit, as long as a branch may be here. One type for the
# model's and the dataset's, which also keeps the largest spec under SPEC_MAX_BYTES.
Revision = Annotated[str, StringConstraints(min_length=1, max_length=MAX_BRANCH_LENGTH)]
UnstructuredObject = Annotated[
    dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
]

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
SENTENCE_EMBEDDING = "sentence-embedding"
TEXT_TO_IMAGE = "text-to-image"
Task = Literal[
    "causal-lm",
    "sequence-classification",
    "sentence-embedding",
    "text-to-image",
]


def _hub_id_ok(repo_id: str) -> bool:
    return "--" not in repo_id and ".." not in repo_id and not repo_id.endswith(".git")


def _hub_id_rule(field: Literal["repo", "source"]) -> Rule:
    """The client's refusals that the pattern cannot say, on `field`: the repo id of `repo`, or
    of a `source` when it is hf://<repo id>. (The wire and Python names of both are the same.)"""
    ok = f"!self.{field}.contains('--') && !self.{field}.contains('..') && "
    ok += f"!self.{field}.endsWith('.git')"

    def check(model: Any) -> bool:
        value: str = getattr(model, field)
        if field == "source" and not value.startswith("hf://"):
            return True
        return _hub_id_ok(value.removeprefix("hf://"))

    return Rule(
        cel=f"!self.source.startsWith('hf://') || ({ok})" if field == "source" else ok,
        message="a Hub repo id may not hold '--' or '..' or end in '.git' (huggingface_hub "
        "refuses them)",
        check=check,
        field=field,
    )


def _branch_ok(branch: str) -> bool:
    """The git ref rules that BRANCH_PATTERN cannot say (the CEL of HubOutput's branch rule)."""
    return (
        branch != "HEAD"
        and ".." not in branch
        and not branch.startswith("refs/")
        and re.search(r"[.](lock)?(/|$)", branch) is None
        and re.fullmatch(r"[0-9a-f]{40}", branch) is None
    )


class ApiModel(BaseModel):
    """Base for every schema object: camelCase on the wire, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )
    __rules__: ClassVar[tuple[Rule | TransitionRule, ...]] = ()


class SecretKeyRef(ApiModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(
        description="name of the Secret in the FineTuneJob's namespace."
    )
    key: ShortStr = Field("token", description="key in the Secret. Default token.")


class TokenSecret(NamedTuple):
    """A Hub token the pods get from a Secret: the spec field naming it, and the env var."""

    field: str
    env: str
    ref: SecretKeyRef


def _read_token_rule() -> Rule:
    """A source's own Hub token only means something for an hf:// source."""
    return Rule(
        cel="!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
        message="tokenSecretRef is only for an hf:// source",
        check=lambda m: m.token_secret_ref is None or m.source.startswith("hf://"),
        field="tokenSecretRef",
    )


class VaeSpec(ApiModel):
    source: Annotated[str, StringConstraints(max_length=1024, pattern=SOURCE_PATTERN)] = Field(
        description="source is the VAE: hf://<repo id> of a repo whose root is a diffusers "
        "AutoencoderKL (config.json and its weights), or file:///<path> to such a folder. "
        "Required."
    )
    revision: Revision | None = Field(
        None,
        description="revision is the Hub branch, tag or commit of an hf:// VAE, resolved to a "
        "commit once as model.revision (status.sources.vaeRevision). Unset: main.",
    )

    __rules__ = (_hub_id_rule("source"),)


class ModelSpec(ApiModel):
    source: Annotated[str, StringConstraints(max_length=1024, pattern=SOURCE_PATTERN)] = Field(
        description="source is the base model: hf://<repo id> on the Hub (or the endpoint in "
        "output.hub.endpoint), or file:///<path> to a model folder in a mounted volume. Required."
    )
    revision: Revision | None = Field(
        None,
        description="revision is the Hub branch, tag or commit to load; rank 0 resolves it to "
        "a commit once, and every rank and attempt loads that commit (status.sources). Unset: "
        "main. Only an hf:// source has revisions; a file:// one ignores it.",
    )
    task: Task = Field(
        CAUSAL_LM,
        description="task is causal-lm (next-token prediction on text or prompt/response pairs), "
        "sequence-classification (a new classification head), sentence-embedding (a "
        "sentence-transformers model trained on anchor/positive(/negative) rows with "
        "MultipleNegativesRankingLoss), or text-to-image (LoRA on the UNet attention of a "
        "diffusers Stable Diffusion or SDXL pipeline, trained on captioned images; source is the "
        "pipeline's folder or Hub repo). Default causal-lm.",
    )
    num_labels: int | None = Field(
        None,
        ge=2,
        le=10000,
        description="numLabels is the number of classes; required for sequence-classification, "
        "not allowed otherwise.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="tokenSecretRef names the Secret key holding the Hub token that downloads "
        "an hf:// model (a read token is enough). It reaches the pods as FINETUNE_MODEL_TOKEN "
        "and is used for the model (and model.vae) alone. Unset: the push token of "
        "output.hub.tokenSecretRef, else none.",
    )
    vae: VaeSpec | None = Field(
        None,
        description="vae (text-to-image only) replaces the pipeline's own VAE, as diffusers' "
        "--pretrained_vae_model_name_or_path: for SDXL in fp16, the fp16-fix VAE "
        "(hf://madebyollin/sdxl-vae-fp16-fix), which runs in fp16 where SDXL's own VAE "
        "overflows and so is kept in fp32. It loads at the precision of the other frozen parts, "
        "with the model's token, encodes the training and evaluation images, decodes the "
        "samples, and the card names it. Unset: the pipeline's vae folder.",
    )

    __rules__ = (
        _hub_id_rule("source"),
        _read_token_rule(),
        Rule(
            cel="!has(self.numLabels) || self.task == 'sequence-classification'",
            message="numLabels is only allowed with task sequence-classification",
            check=lambda m: m.num_labels is None or m.task == SEQUENCE_CLASSIFICATION,
            field="numLabels",
        ),
        Rule(
            cel="self.task != 'sequence-classification' || has(self.numLabels)",
            message="numLabels is required with task sequence-classification",
            check=lambda m: m.task != SEQUENCE_CLASSIFICATION or m.num_labels is not None,
            field="numLabels",
        ),
    )


class DatasetSpec(ApiModel):
    source: Annotated[str, StringConstraints(max_length=1024, pattern=SOURCE_PATTERN)] = Field(
        description="source is the data: hf://<repo id>, or file:///<file or folder>. The format "
        "follows the extension: .json, .jsonl, .csv, .parquet (optionally compressed), or a "
        "folder written by datasets' save_to_disk. Required."
    )
    config: ShortStr | None = Field(None, description="config is the Hub dataset config name.")
    revision: Revision | None = Field(
        None,
        description="revision is the Hub branch, tag or commit of an hf:// dataset to load, as "
        "model.revision: resolved to a commit once, which every rank and attempt loads "
        "(status.sources). Unset: main. A file:// source ignores it.",
    )
    train_split: ShortStr = Field("train", description="trainSplit is the split to train on.")
    eval_split: ShortStr | None = Field(
        None,
        description="evalSplit is the split to evaluate on. Not together with evalFraction. With "
        "neither, the dataset's test or validation split is used if it has one, else a seeded "
        "0.1 fraction of the training split.",
    )
    eval_fraction: float | None = Field(
        None,
        ge=0.001,
        le=0.5,
        description="evalFraction holds out this seeded fraction of trainSplit for evaluation. "
        "Not together with evalSplit.",
    )
    text_field: ShortStr = Field(
        "text", description="textField is the text column for causal-lm and classification."
    )
    prompt_field: ShortStr | None = Field(
        None,
        description="promptField is the prompt column of instruction data; with responseField "
        "it replaces textField, and the chat template is applied when the tokenizer has one.",
    )
    response_field: ShortStr | None = Field(
        None, description="responseField is the response column; set together with promptField."
    )
    messages_field: ColumnName | None = Field(
        None,
        description="messagesField is the column of chat data for causal-lm: per row an "
        "OpenAI-style list of {role, content} messages, roles system (optional, first), user and "
        "assistant, ending with an assistant turn. The tokenizer's chat template renders them, "
        "the loss counts assistant turns only, and generation metrics generate the last "
        "assistant turn. Replaces textField; not together with promptField and responseField. "
        "Unset: no chat data.",
    )
    label_field: ShortStr = Field(
        "label",
        description="labelField is the label column for sequence-classification: integers "
        "0..numLabels-1, or strings mapped to ids in sorted order.",
    )
    anchor_field: ColumnName = Field(
        "anchor",
        description="anchorField is the anchor (query) column for sentence-embedding. Default "
        "anchor.",
    )
    positive_field: ColumnName = Field(
        "positive",
        description="positiveField is the column of the text that matches the anchor (a "
        "document) for sentence-embedding. Default positive.",
    )
    negative_field: ColumnName | None = Field(
        None,
        description="negativeField is an optional column of a hard negative for each anchor, "
        "sentence-embedding only. Unset: pairs, with the other rows' positives as negatives.",
    )
    score_field: ColumnName | None = Field(
        None,
        description="scoreField (sentence-embedding only) is the column of each pair's "
        "similarity score, from 0 (unrelated) to 1 (the same meaning), as STS benchmarks give "
        "it normalised: the rows are then scored pairs of anchorField and positiveField, "
        "trained with sentence-transformers' CoSENTLoss (which it recommends for them over "
        "CosineSimilarityLoss) in place of MultipleNegativesRankingLoss, and scored by "
        "spearman_cosine "
        "against those scores. Not with negativeField. Unset: every pair is a match.",
    )
    image_field: ColumnName = Field(
        "image",
        description="imageField is the image column for text-to-image: a `datasets` Image "
        "feature, as an imagefolder (images plus a metadata.jsonl naming each file_name) loads "
        "it. Default image.",
    )
    caption_field: ColumnName = Field(
        "text",
        description="captionField is the caption column for text-to-image. Default text, the "
        "column an imagefolder's metadata.jsonl usually names.",
    )
    max_samples: int | None = Field(
        None, ge=1, description="maxSamples caps the number of training examples, for trials."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="tokenSecretRef names the Secret key holding the Hub token that downloads "
        "an hf:// dataset (a read token is enough). It reaches the pods as "
        "FINETUNE_DATASET_TOKEN and is used for the dataset alone. Unset: the push token of "
        "output.hub.tokenSecretRef, else none.",
    )

    __rules__ = (
        _hub_id_rule("source"),
        _read_token_rule(),
        Rule(
            cel="!(has(self.evalSplit) && has(self.evalFraction))",
            message="set evalSplit or evalFraction, not both",
            check=lambda d: d.eval_split is None or d.eval_fraction is None,
            field="evalFraction",
        ),
        Rule(
            cel="has(self.promptField) == has(self.responseField)",
            message="promptField and responseField must be set together",
            check=lambda d: (d.prompt_field is None) == (d.response_field is None),
            field="responseField",
        ),
        Rule(
            cel="self.anchorField != self.positiveField && (!has(self.negativeField) || "
            "(self.negativeField != self.anchorField && self.negativeField != self.positiveField))",
            message="anchorField, positiveField and negativeField must name different columns",
            check=lambda d: (
                len({d.anchor_field, d.positive_field, d.negative_field} - {None})
                == (3 if d.negative_field else 2)
            ),
            field="positiveField",
        ),
        Rule(
            cel="!has(self.scoreField) || (!has(self.negativeField) && "
            "self.scoreField != self.anchorField && self.scoreField != self.positiveField)",
            message="scoreField scores (anchorField, positiveField) pairs: a column of its own, "
            "not with negativeField",
            check=lambda d: (
                d.score_field is None
                or (
                    d.negative_field is None
                    and d.score_field not in (d.anchor_field, d.positive_field)
                )
            ),
            field="scoreField",
        ),
        Rule(
            cel="!(has(self.messagesField) && has(self.promptField))",
            message="set messagesField or promptField and responseField, not both",
            check=lambda d: d.messages_field is None or d.prompt_field is None,
            field="messagesField",
        ),
    )


class PeftSpec(ApiModel):
    method: Literal["lora", "qlora", "none"] = Field(
        "lora",
        description="method is lora, qlora (a 4-bit base through bitsandbytes; needs "
        "nvidia.com/gpu) or none (full fine-tuning). Default lora.",
    )
    r: int = Field(8, ge=1, le=1024, description="r is the LoRA rank. Default 8.")
    alpha: int = Field(
        16, ge=1, le=4096, description="alpha is the LoRA scaling alpha. Default 16."
    )
    dropout: float = Field(
        0.05, ge=0, le=0.9, description="dropout on the LoRA input. Default 0.05."
    )
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=64,
        description="targetModules are module names to adapt. Empty: all linear layers of the "
        "base model except the output head.",
    )
    use_rslora: bool = Field(
        False,
        description="useRslora scales the adapter's update by alpha/sqrt(r) instead of alpha/r "
        "(rank-stabilized LoRA, peft's use_rslora), so that a larger r learns as fast rather "
        "than slower; saved in adapter_config.json, which peft, the merge and vLLM read. Not "
        "with method none, nor with text-to-image (diffusers' LoRA loader scales by alpha/r). "
        "Default false.",
    )
    use_dora: bool = Field(
        False,
        description="useDora trains a weight-decomposed LoRA (DoRA, peft's use_dora): each "
        "adapted weight's magnitude is learnt apart from its direction, which the LoRA matrices "
        "change; often closer to a full fine-tune at the same r, for slower steps. Saved in "
        "adapter_config.json, which peft and the merge read; vLLM and TGI cannot load such an "
        "adapter, so serve.engine vllm or tgi needs output.hub.merge. Works with strategy fsdp; "
        "not with method none or text-to-image. Default false.",
    )

    __rules__ = (
        Rule(
            cel="!self.useRslora || self.method != 'none'",
            message="useRslora scales a LoRA: not with method none",
            check=lambda p: not p.use_rslora or p.method != "none",
            field="useRslora",
        ),
        Rule(
            cel="!self.useDora || self.method != 'none'",
            message="useDora decomposes a LoRA: not with method none",
            check=lambda p: not p.use_dora or p.method != "none",
            field="useDora",
        ),
    )


class TrainingSpec(ApiModel):
    epochs: int = Field(1, ge=1, le=1000, description="epochs over the training split. Default 1.")
    max_steps: int | None = Field(
        None, ge=1, description="maxSteps is the number of optimizer steps; overrides epochs."
    )
    learning_rate: float = Field(
        2.0e-4, gt=0, le=1, description="learningRate is the peak learning rate. Default 2e-4."
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="warmupSteps of linear warm-up from 0 to learningRate, before the schedule "
        "(lrSchedulerType) takes over. Default 0.",
    )
    warmup_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="warmupRatio is warmupSteps as a fraction of all optimizer steps, rounded "
        "up (transformers' warmup_ratio); not with warmupSteps. Unset: warmupSteps.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear",
        description="lrSchedulerType is how the learning rate moves after the warm-up, by "
        "transformers' scheduler names: linear (down to 0 at the last step), cosine (half a "
        "cosine down to 0), constant (no warm-up either), constant_with_warmup. Default linear.",
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="weightDecay for AdamW. Default 0.")
    max_grad_norm: float = Field(
        1.0, ge=0, description="maxGradNorm clips gradients; 0 disables clipping. Default 1."
    )
    batch_size_per_device: int = Field(
        4, ge=1, le=4096, description="batchSizePerDevice is the micro-batch of each rank."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="gradientAccumulationSteps per optimizer step. Default 1."
    )
    max_seq_length: int = Field(
        512, ge=8, le=131072, description="maxSeqLength in tokens; longer text is truncated."
    )
    packing: bool = Field(
        True,
        description="packing concatenates causal-lm examples into full maxSeqLength blocks so no "
        "compute is spent on padding. Default true.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="precision is the dtype the base weights load in and compute with: bf16 or "
        "fp16 load them at half the memory of fp32 and train under autocast, with the trainable "
        "LoRA weights kept in fp32; auto is bf16 on a GPU that supports it, else fp32. "
        "Default auto.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="strategy is how ranks share the model: ddp keeps a whole copy on every "
        "rank; fsdp shards the weights, gradients and optimizer state over the ranks (torch "
        "FSDP2, one shard unit per transformer layer), for a model that does not fit one "
        "device. Default ddp.",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="gradientCheckpointing recomputes activations in the backward pass instead "
        "of keeping them (the transformer's layers; for text-to-image, the UNet's blocks): less "
        "memory for about a third more compute. Default unset: on for peft.method qlora, off "
        "otherwise.",
    )
    compile: bool | None = Field(
        None,
        description="compile compiles each transformer layer with torch.compile (one layer's "
        "graph, reused by all of them; evaluation runs uncompiled): the first steps take "
        "seconds to tens of seconds longer, later steps are faster. Default unset: on for "
        "model.task causal-lm on nvidia.com/gpu with peft.method lora or none and strategy "
        "ddp, off otherwise.",
    )
    seed: int = Field(42, ge=0, description="seed for weights, shuffling and splits. Default 42.")
    checkpoint_every_steps: int = Field(
        100, ge=1, description="checkpointEverySteps saves a resumable checkpoint. Default 100."
    )
    checkpoint_every_seconds: int | None = Field(
        None,
        ge=1,
        le=86400,
        description="checkpointEverySeconds also saves a checkpoint at the first step that ends "
        "this long after the last save (or after this attempt began training), whichever of it "
        "and checkpointEverySteps comes first: it bounds what a fault costs in time, where the "
        "length of a step is not known in advance (another GPU, another sequence length). "
        "Every rank saves at the same step: the step's one collective carries whether any "
        "rank's interval is up. Unset: by steps only.",
    )
    checkpoints_to_keep: int = Field(
        2,
        ge=1,
        le=100,
        description="checkpointsToKeep: older checkpoints are deleted. The store holds one more "
        "while the next is written; a store that is full keeps fewer (every checkpoint but the "
        "newest is deleted, with a warning) and fails the job only when it cannot hold the "
        "newest and the next. Default 2.",
    )
    # text-to-image only (FineTuneJobSpec's rules say so).
    resolution: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="resolution (text-to-image only) in pixels: images are resized (shorter "
        "side) and cropped to resolution x resolution (centerCrop), and samples are generated "
        "at it (the pipeline wants a multiple of 8). Unset: the pipeline's own, the UNet's "
        "sample size times the VAE's downscaling factor.",
    )
    center_crop: bool | None = Field(
        None,
        description="centerCrop (text-to-image only): true cuts each resized training image's "
        "square from its centre; false from a place drawn at random each time the image is "
        "used (diffusers' --center_crop). Evaluation images are always cut from the centre. "
        "Unset: true.",
    )
    random_flip: bool | None = Field(
        None,
        description="randomFlip (text-to-image only): true mirrors each training image left to "
        "right with probability 0.5 each time it is used (diffusers' --random_flip). Unset: "
        "false.",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None,
        description="predictionType (text-to-image only) is the UNet's training target: epsilon "
        "(the noise) or v_prediction (the velocity). Unset: the pipeline scheduler's own.",
    )
    snr_gamma: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="snrGamma (text-to-image only) weights each example's loss by "
        "min(SNR, snrGamma) / SNR at its timestep (Min-SNR weighting; 5 is the recommended "
        "value). Unset: the plain mean squared error.",
    )
    noise_offset: float | None = Field(
        None,
        gt=0,
        le=1,
        description="noiseOffset (text-to-image only) adds to each training example's noise one "
        "value per latent channel, drawn from a normal distribution of this standard deviation "
        "(diffusers' --noise_offset, offset noise; 0.05 to 0.1 are usual), so that the LoRA can "
        "learn images darker or brighter overall than the base draws. Evaluation noise is left "
        "plain. Unset: none.",
    )
    train_text_encoder: bool | None = Field(
        None,
        description="trainTextEncoder (text-to-image only) also trains a LoRA on the attention "
        "of the text encoder (both of SDXL's), as diffusers' --train_text_encoder: q_proj, "
        "k_proj, v_proj and out_proj at peft.r and peft.alpha. The pushed LoRA file holds the "
        "encoders' layers beside the UNet's, and load_lora_weights loads them all. Unset: false.",
    )
    # sentence-embedding only.
    matryoshka_dims: (
        Annotated[
            list[Annotated[int, Field(ge=1, le=65536)]],
            Field(min_length=1, max_length=8),
        ]
        | None
    ) = Field(
        None,
        description="matryoshkaDims (sentence-embedding only) trains Matryoshka embeddings, "
        "as sentence-transformers' MatryoshkaLoss: the loss is the sum of "
        "MultipleNegativesRankingLoss over the embedding cut to each of these leading sizes "
        "(and normalised), so that SentenceTransformer(repo, truncate_dim=d) keeps most of its "
        "quality at a size d. List the model's full size too (768 for a base model): only "
        "the listed sizes are trained. Every size must be at most the model's; a larger one "
        "fails the job with InvalidSpec. Each size is scored as dim_<size>_<metric> in "
        "evaluation.metrics. Unset: the whole embedding only.",
    )
    cached_mini_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="cachedMiniBatchSize (sentence-embedding only) trains with gradient caching "
        "(GradCache), as sentence-transformers' CachedMultipleNegativesRankingLoss: each "
        "column of a rank's batch is embedded this many rows at a time, first without "
        "gradients; the loss of the whole batch gives the gradient of every embedding; then "
        "each mini-batch is embedded again and takes its share of that gradient. The loss and "
        "the gradients are those of batchSizePerDevice in one pass, but only one mini-batch's "
        "activations are held at a time, so batchSizePerDevice, and with it the in-batch "
        "negatives, can grow past what fits in memory, for one more forward pass. Smaller than "
        "batchSizePerDevice; not with dataset.scoreField. Unset: the batch in one pass.",
    )

    __rules__ = (
        Rule(
            cel="!(has(self.warmupRatio) && self.warmupSteps > 0)",
            message="set warmupSteps or warmupRatio, not both",
            check=lambda t: t.warmup_ratio is None or t.warmup_steps == 0,
            field="warmupRatio",
        ),
        Rule(
            cel="self.lrSchedulerType != 'constant' || "
            "(self.warmupSteps == 0 && !has(self.warmupRatio))",
            message="lrSchedulerType constant has no warm-up: use constant_with_warmup, or drop "
            "warmupSteps and warmupRatio",
            check=lambda t: (
                t.lr_scheduler_type != "constant"
                or (t.warmup_steps == 0 and t.warmup_ratio is None)
            ),
            field="lrSchedulerType",
        ),
        Rule(
            cel="!has(self.matryoshkaDims) || "
            "self.matryoshkaDims.all(d, self.matryoshkaDims.exists_one(e, e == d))",
            message="matryoshkaDims lists each size once",
            check=lambda t: len(set(t.matryoshka_sizes)) == len(t.matryoshka_sizes),
            field="matryoshkaDims",
        ),
        Rule(
            cel="!has(self.cachedMiniBatchSize) || "
            "self.cachedMiniBatchSize < self.batchSizePerDevice",
            message="cachedMiniBatchSize must be smaller than batchSizePerDevice: a mini-batch "
            "of the whole batch holds as much in memory and embeds every row twice",
            check=lambda t: (
                t.cached_mini_batch_size is None
                or t.cached_mini_batch_size < t.batch_size_per_device
            ),
            field="cachedMiniBatchSize",
        ),
    )

    @property
    def crops_centre(self) -> bool:
        """Whether text-to-image cuts a training image's centre square: centerCrop, unset true."""
        return self.center_crop is not False

    @property
    def matryoshka_sizes(self) -> tuple[int, ...]:
        """matryoshkaDims largest first, as MatryoshkaLoss orders them; () when unset."""
        return tuple(sorted(self.matryoshka_dims or (), reverse=True))

    def warmup_for(self, total_steps: int) -> int:
        """The warm-up steps of a run of `total_steps`: warmupSteps, or warmupRatio of the
        steps rounded up, as transformers' TrainingArguments.get_warmup_steps."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(total_steps * self.warmup_ratio)


class ImageSampleSpec(ApiModel):
    # 8 prompts of 160 characters: a CLIP text encoder reads 77 tokens, and the spec stays small.
    prompts: list[Annotated[str, StringConstraints(min_length=1, max_length=160)]] = Field(
        default_factory=list,
        max_length=8,
        description="prompts to generate the samples from, in turn: sample i is prompts[i mod "
        "len(prompts)]. Empty: the distinct captions of the evaluation split, in order.",
    )
    count: int = Field(
        4, ge=0, le=16, description="count of sample images; 0 generates none. Default 4."
    )
    inference_steps: int = Field(
        25, ge=1, le=500, description="inferenceSteps of the pipeline per sample. Default 25."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=50,
        description="guidanceScale of classifier-free guidance; 1 or less turns it off. "
        "Unset: the pipeline's own, 7.5 for Stable Diffusion and 5 for SDXL.",
    )


class EvaluationSpec(ApiModel):
    metrics: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=16,
        description="metrics to compute before and after training. Built in and offline-safe: "
        "perplexity and loss (causal-lm); exact_match, rouge, bleu and chrf (causal-lm with "
        "promptField/responseField or messagesField: scored on text generated for the "
        "evaluation prompts); accuracy, f1, precision, recall (sequence-classification); "
        "cosine_ndcg@10, cosine_mrr@10, cosine_map@100, cosine_accuracy@1, cosine_recall@10, "
        "spearman_cosine (sentence-embedding, sentence-transformers' evaluator keys; with "
        "training.matryoshkaDims also each at a size d, as dim_<d>_<name>, "
        "e.g. dim_64_cosine_ndcg@10); denoising_loss (text-to-image). Other names load "
        "through `evaluate` from the Hub, for causal-lm and sequence-classification. Empty: "
        "perplexity for causal-lm, accuracy for sequence-classification, cosine_ndcg@10, "
        "cosine_mrr@10 and cosine_accuracy@1 for sentence-embedding (and "
        "dim_<d>_cosine_ndcg@10 for each size d of training.matryoshkaDims), denoising_loss "
        "for text-to-image.",
    )
    gates: dict[Annotated[str, StringConstraints(max_length=128)], float] = Field(
        default_factory=dict,
        max_length=16,
        description="gates map a computed metric to its threshold after training: a minimum, or a "
        "maximum for perplexity, loss and denoising_loss. A missed gate pushes nothing and fails "
        "the job with reason EvaluationGateFailed.",
    )
    max_samples: int | None = Field(
        None, ge=1, description="maxSamples caps the evaluation split, for trials."
    )
    image_samples: ImageSampleSpec | None = Field(
        None,
        description="imageSamples (text-to-image only): after training, count images generated "
        "with the fine-tuned pipeline at fixed seeds (training.seed + i), pushed as "
        "samples/NN.png and shown in the model card. Unset: count 4 from the evaluation captions.",
    )
    max_new_tokens: int = Field(
        64,
        ge=1,
        le=2048,
        description="maxNewTokens bounds each generated answer (greedy decoding) of a generation "
        f"metric ({', '.join(GENERATION_METRICS)}). Default 64.",
    )
    samples: int = Field(
        3,
        ge=0,
        le=16,
        description="samples is how many evaluation prompts, with the answers generated before "
        "and after training, go into the model card and (shortened) the result, when a "
        "generation metric is computed. 0: none. Default 3.",
    )


class HubOutput(ApiModel):
    repo: Annotated[str, StringConstraints(max_length=MAX_HUB_ID_LENGTH, pattern=REPO_PATTERN)] = (
        Field(
            description="repo is the Hub repository id to push to, such as my-org/my-model: an "
            "optional namespace and a name of at most 96 characters each, as huggingface_hub "
            "accepts. Required."
        )
    )
    private: bool = Field(
        True,
        description="private keeps the repo private: a new repo is created private, and an "
        "existing public one is made private before anything is uploaded to it (the token must "
        "be allowed to change its settings; if not, nothing is pushed and the job fails with "
        "PushFailed). false creates a public repo, and never makes a private one public. "
        "Default true.",
    )
    merge: bool = Field(
        False,
        description="merge pushes the base with the adapter merged in; false pushes the adapter.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description="tokenSecretRef names the Secret key holding the Hub token that pushes (it "
        "must be allowed to write to repo). It reaches the pods as HF_TOKEN and never appears in "
        "the spec, status or logs. It also downloads an hf:// model or dataset that has no "
        "tokenSecretRef of its own.",
    )
    branch: (
        Annotated[str, StringConstraints(max_length=MAX_BRANCH_LENGTH, pattern=BRANCH_PATTERN)]
        | None
    ) = Field(
        None,
        description="branch of repo to commit the result to, created from main when missing, "
        "such as experiments/run-1: a git branch name (not HEAD, not under refs/, not 40 hex "
        "digits, no '..', no part ending in '.' or '.lock'). Not with createPr, except main. "
        "Unset: main.",
    )
    create_pr: bool = Field(
        False,
        description="createPr opens a pull request against main with the result (the commit "
        "lands on refs/pr/N, and main is left as it is) instead of committing to main; status "
        "records the pull request's ref and URL. Each push opens a new one. Not with a branch "
        "other than main: huggingface_hub opens upload pull requests against main only. "
        "Default false.",
    )
    endpoint: Annotated[str, StringConstraints(max_length=1024, pattern=r"^https?://.+")] | None = (
        Field(
            None,
            description="endpoint of a Hub mirror or self-hosted Hub, used for hf:// sources and "
            "the push. Unset: huggingface.co.",
        )
    )
    license: (
        Annotated[str, StringConstraints(max_length=64, pattern=r"^[a-z0-9][a-z0-9.+-]*$")] | None
    ) = Field(
        None,
        description="license is the Hub license id written as the model card's `license:`, "
        "such as apache-2.0, mit or llama3.1. Unset: the base model's license (with its "
        "license_name and license_link for `other`), read at push time from its Hub card for "
        "an hf:// base or from the README.md of a file:// base; none when it has none.",
    )

    __rules__ = (
        _hub_id_rule("repo"),
        Rule(
            cel="!has(self.branch) || (self.branch != 'HEAD' && !self.branch.contains('..')"
            " && !self.branch.startsWith('refs/') && !self.branch.matches('[.](lock)?(/|$)')"
            " && !self.branch.matches('^[0-9a-f]{40}$'))",
            message="branch must be a branch name git and the Hub accept: not HEAD, not under "
            "refs/, not 40 hex digits (a commit id), no '..', no part ending in '.' or '.lock'",
            check=lambda h: h.branch is None or _branch_ok(h.branch),
            field="branch",
        ),
        Rule(
            cel=f"!self.createPr || !has(self.branch) || self.branch == '{DEFAULT_BRANCH}'",
            message="createPr opens a pull request against main, and huggingface_hub cannot "
            "open one against another branch: set createPr or branch, not both",
            check=lambda h: not h.create_pr or h.branch in (None, DEFAULT_BRANCH),
            field="createPr",
        ),
    )


class PersistentVolumeClaimRef(ApiModel):
    claim_name: ShortStr = Field(description="claimName of a PersistentVolumeClaim.")


ClaimRetention = Literal["Retain", "Delete"]


class ClaimRetentionPolicy(ApiModel):
    """What becomes of the claim the operator made for the checkpoints once the FineTuneJob has
    ended, as a StatefulSet's persistentVolumeClaimRetentionPolicy: Retain releases it from the
    FineTuneJob's ownership, so that deleting the FineTuneJob leaves it (and what it holds), and
    a FineTuneJob made again with the same name adopts it and resumes from it."""

    when_failed: ClaimRetention = Field(
        "Retain",
        description="whenFailed: Retain keeps the claim of a Failed FineTuneJob when the "
        "FineTuneJob is deleted, so that one made again with the same name (and training spec) "
        "resumes from its newest checkpoint, or pushes its kept result without training; "
        "delete the claim yourself when you do not. Delete: it is deleted with the "
        "FineTuneJob. Default Retain.",
    )
    when_succeeded: ClaimRetention = Field(
        "Delete",
        description="whenSucceeded: as whenFailed, for a Succeeded FineTuneJob, whose result "
        "was pushed. Default Delete.",
    )
    when_deleted: ClaimRetention = Field(
        "Delete",
        description="whenDeleted: Retain keeps the claim of a FineTuneJob deleted before it "
        "ended (pending, running or suspended), so that one made again with the same name and "
        "training spec (another output.hub.repo, say) resumes where it stopped. The operator "
        "first stops the gang, whose pods save a checkpoint at SIGTERM, then releases the "
        "claim; until then the FineTuneJob stays, held by the finalizer finetune.dev/finalizer, "
        "which it carries only while it has not ended, only with this set and only on a claim "
        "the operator made (a deletion while no operator runs waits for one). Delete: it is "
        "deleted with the FineTuneJob, as its other children. Default Delete.",
    )


class CheckpointStorage(ApiModel):
    """Where rank 0 keeps checkpoints so that a restarted gang resumes. Unset fields pick the
    first durable store available: your claim; for a one-node gang a claim the operator makes
    from the default StorageClass; for a multi-node gang with output.hub a branch of the repo."""

    persistent_volume_claim: PersistentVolumeClaimRef | None = Field(
        None,
        description="persistentVolumeClaim is a claim you provide, mounted on every pod; for "
        "more than one node it must be ReadWriteMany. Any claim also holds the hf:// model and "
        "dataset (hub-cache/), fetched once for every pod and attempt. Unset: the operator "
        "chooses (see size).",
    )
    size: Quantity = Field(
        "30Gi",
        description="size of the ReadWriteOnce claim the operator creates for a one-node gang, "
        "owned by the FineTuneJob and deleted with it (unless claimRetentionPolicy keeps it); "
        "a kept claim that a FineTuneJob of the same name adopts is expanded to this size "
        "where its StorageClass allows expansion. It holds the hf:// model and "
        "dataset too (as much as template.cacheSize allows a pod, plus 10Gi of checkpoints: "
        "room for training.checkpointsToKeep + 1 of them). Default 30Gi.",
    )
    storage_class_name: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        None,
        description="storageClassName of the claim the operator creates. Unset: the cluster's "
        "default StorageClass.",
    )
    claim_retention_policy: ClaimRetentionPolicy = Field(
        ClaimRetentionPolicy(),
        description="claimRetentionPolicy says whether the claim the operator creates outlives "
        "the FineTuneJob once it has Failed (whenFailed, default Retain) or Succeeded "
        "(whenSucceeded, default Delete), or when it is deleted before it ended (whenDeleted, "
        "default Delete). Your own persistentVolumeClaim is never deleted.",
    )
    hub_branch: Annotated[
        str, StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ] = Field(
        "finetune-checkpoints",
        description="hubBranch of output.hub.repo where a multi-node gang without a shared "
        "claim mirrors each checkpoint. Default finetune-checkpoints.",
    )


class OutputSpec(ApiModel):
    hub: HubOutput | None = Field(
        None, description="hub is where the result is pushed. Unset: no push."
    )
    checkpoints: CheckpointStorage = Field(
        default_factory=CheckpointStorage,
        description="checkpoints storage. Default: the first durable store available.",
    )

    __rules__ = (
        Rule(
            cel="!has(self.hub) || !has(self.hub.branch)"
            " || self.hub.branch != self.checkpoints.hubBranch",
            message="hub.branch must differ from checkpoints.hubBranch, the branch checkpoints "
            "are mirrored to",
            check=lambda o: (
                o.hub is None or o.hub.branch is None or o.hub.branch != o.checkpoints.hub_branch
            ),
            field="hub.branch",
        ),
    )


class TpuSpec(ApiModel):
    accelerator: ShortStr = Field(
        description="accelerator is the GKE TPU type, such as tpu-v5-lite-podslice."
    )
    topology: Annotated[str, StringConstraints(max_length=32, pattern=r"^\d+(x\d+){1,2}$")] = Field(
        description="topology is the GKE TPU topology, such as 2x4."
    )


class AcceleratorSpec(ApiModel):
    type: Literal["cpu", "nvidia.com/gpu", "google.com/tpu"] = Field(
        "cpu", description="type is cpu, nvidia.com/gpu or google.com/tpu. Default cpu."
    )
    count: int = Field(
        0, ge=0, le=64, description="count of accelerators per pod; 0 for cpu. Default 0."
    )
    tpu: TpuSpec | None = Field(
        None, description="tpu node selectors; required with, and only with, google.com/tpu."
    )

    __rules__ = (
        Rule(
            cel="self.type == 'google.com/tpu' ? has(self.tpu) : !has(self.tpu)",
            message="tpu is required with type google.com/tpu and not allowed otherwise",
            check=lambda a: (a.type == "google.com/tpu") == (a.tpu is not None),
            field="tpu",
        ),
        Rule(
            cel="self.type == 'cpu' ? self.count == 0 : self.count >= 1",
            message="count must be 0 for cpu and at least 1 for an accelerator",
            check=lambda a: a.count == 0 if a.type == "cpu" else a.count >= 1,
            field="count",
        ),
    )


class ResourcesSpec(ApiModel):
    nodes: int = Field(1, ge=1, le=256, description="nodes is the number of pods in the gang.")
    processes_per_node: int = Field(
        1,
        ge=1,
        le=64,
        description="processesPerNode is the number of ranks per pod, usually its accelerators; "
        "with nvidia.com/gpu at most accelerator.count, one GPU per rank. Default 1.",
    )
    accelerator: AcceleratorSpec = Field(
        default_factory=AcceleratorSpec, description="accelerator of each pod. Default cpu."
    )
    requests: dict[Annotated[str, StringConstraints(max_length=253)], Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="requests of each pod's trainer container, such as {cpu: 2, memory: 8Gi}.",
    )
    limits: dict[Annotated[str, StringConstraints(max_length=253)], Quantity] = Field(
        default_factory=dict,
        max_length=16,
        description="limits of each pod's trainer container. The accelerator count is added.",
    )

    __rules__ = (
        Rule(
            cel="self.accelerator.type != 'nvidia.com/gpu'"
            " || self.processesPerNode <= self.accelerator.count",
            message="processesPerNode may not exceed accelerator.count with nvidia.com/gpu: each "
            "rank needs a GPU of its own",
            check=lambda r: (
                r.accelerator.type != "nvidia.com/gpu"
                or r.processes_per_node <= r.accelerator.count
            ),
            field="processesPerNode",
        ),
    )


class EnvVar(ApiModel):
    name: ShortStr = Field(description="name of the environment variable.")
    value: Annotated[str, StringConstraints(max_length=ENV_VALUE_MAX_LENGTH)] | None = Field(
        None,
        description=f"value of the variable, at most {ENV_VALUE_MAX_LENGTH} characters; put "
        "longer values in a ConfigMap and reference it with valueFrom.",
    )
    value_from: UnstructuredObject | None = Field(
        None, description="valueFrom, as in a container's env (secretKeyRef, configMapKeyRef...)."
    )


class VolumeMount(ApiModel):
    # A volume's name is a DNS-1123 label, as the API server checks it in the pod.
    name: Annotated[str, StringConstraints(min_length=1, max_length=63)] = Field(
        description="name of a volume in template.volumes (at most 63 characters)."
    )
    mount_path: PathStr = Field(description="mountPath in the trainer container.")
    sub_path: PathStr | None = Field(None, description="subPath within the volume.")
    read_only: bool = Field(False, description="readOnly mounts the volume read-only.")


# ---- pod settings of spec.template --------------------------------------------------------------
# Object names as Kubernetes checks them (a DNS-1123 subdomain): Secrets, RuntimeClasses and
# schedulers. No backslash, so that CEL's string escapes leave the expressions alone.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DnsSubdomain = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
]
# A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at most 63
# letters, digits, '-', '_' and '.' that starts and ends with a letter or digit. Kubernetes allows
# 317 characters in all; 128 holds every key in use (sidecar.istio.io/inject,
# cluster-autoscaler.kubernetes.io/safe-to-evict) and keeps the spec's worst case in budget.
MAX_KEY_LENGTH = 128
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MetadataKey = Annotated[str, StringConstraints(max_length=MAX_KEY_LENGTH)]
PodLabelValue = Annotated[
    str, StringConstraints(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
]
ANNOTATION_VALUE_MAX_LENGTH = 512
# Pod labels and annotations the operator and the Job controller set on trainer pods. The gang is
# found by them (the Service's selector, status, the PodMonitor) and NODE_RANK is read from the
# completion-index annotation, so template.labels and template.annotations may not set them.
OWN_POD_LABELS = (LABEL_MANAGED_BY, LABEL_COMPONENT, "job-name", "controller-uid")
OWN_POD_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")
OWN_KEY_PREFIXES = (f"{GROUP}/", "batch.kubernetes.io/")
# A byte size as a Kubernetes quantity string: 20Gi, 500M, 1e9.
SIZE_PATTERN = r"^([0-9]+([.][0-9]+)?|[.][0-9]+)([KMGTPE]i|[kMGTPE]|[eE][0-9]+)?$"
MAX_UID = 2**31 - 1


def _is_own_key(key: str, own: tuple[str, ...]) -> bool:
    return key in own or key.startswith(OWN_KEY_PREFIXES)


def _own_key_rule(field: Literal["labels", "annotations"], own: tuple[str, ...]) -> Rule:
    """template.labels or template.annotations may not set a key of the operator's own."""
    names = ", ".join(f"'{k}'" for k in own)
    prefixes = " || ".join(f"k.startsWith('{p}')" for p in OWN_KEY_PREFIXES)
    keys = f"k in [{names}] || {prefixes}"
    listed = ", ".join(own) + ", or any key under " + " or ".join(OWN_KEY_PREFIXES)
    return Rule(
        cel=f"!self.{field}.exists(k, {keys})",
        message=f"{field} may not set a key that the operator or the Job controller sets: {listed}",
        check=lambda t: not any(_is_own_key(k, own) for k in getattr(t, field)),
        field=field,
        # The API server's message names the offending key itself.
        message_expression=f"'{field} may not set ' + self.{field}.filter(k, {keys})[0] + "
        f"', a key that the operator or the Job controller sets ({listed})'",
    )


def _key_format_rule(field: Literal["labels", "annotations"]) -> Rule:
    return Rule(
        cel=f"self.{field}.all(k, k.matches('{QUALIFIED_NAME_PATTERN}'))",
        message=f"{field} keys must be qualified names: an optional DNS subdomain prefix and '/', "
        "then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
        "digit",
        check=lambda t: all(re.fullmatch(QUALIFIED_NAME_PATTERN, k) for k in getattr(t, field)),
        field=field,
    )


class LocalObjectReference(ApiModel):
    name: DnsSubdomain = Field(description="name of the object in the FineTuneJob's namespace.")


class LabelSelectorRequirement(ApiModel):
    key: MetadataKey = Field(description="key is the label key the selector applies to.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="operator is In, NotIn, Exists or DoesNotExist."
    )
    values: list[PodLabelValue] = Field(
        default_factory=list,
        max_length=4,
        description="values: at least one for In and NotIn, none for Exists and DoesNotExist.",
    )

    __rules__ = (
        Rule(
            cel="(self.operator in ['In', 'NotIn']) == (size(self.values) > 0)",
            message="values must be non-empty for In and NotIn, and empty for Exists and "
            "DoesNotExist",
            check=lambda r: (r.operator in ("In", "NotIn")) == bool(r.values),
            field="values",
        ),
    )


class LabelSelector(ApiModel):
    match_labels: dict[MetadataKey, PodLabelValue] = Field(
        default_factory=dict, max_length=4, description="matchLabels: every pair must match."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        max_length=2,
        description="matchExpressions: every requirement must hold.",
    )


class TopologySpreadConstraint(ApiModel):
    """Kubernetes' TopologySpreadConstraint, whose labelSelector defaults to the gang's pods."""

    max_skew: int = Field(
        ge=1,
        le=MAX_UID,
        description="maxSkew is the largest allowed difference in matching pods between two "
        "topology domains. Required.",
    )
    topology_key: MetadataKey = Field(
        description="topologyKey is the node label whose values are the domains, such as "
        "topology.kubernetes.io/zone or kubernetes.io/hostname. Required."
    )
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        description="whenUnsatisfiable is DoNotSchedule or ScheduleAnyway. Required."
    )
    label_selector: LabelSelector | None = Field(
        None,
        description="labelSelector of the pods counted in each domain. Unset: this "
        "FineTuneJob's trainer pods (not Kubernetes' default, which counts none).",
    )
    min_domains: int | None = Field(
        None,
        ge=1,
        le=MAX_UID,
        description="minDomains is the least number of eligible domains; only with DoNotSchedule.",
    )
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(
        None,
        description="nodeAffinityPolicy: Honor counts only the nodes the pods' nodeSelector and "
        "affinity allow, Ignore counts all. Unset: Honor.",
    )
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(
        None,
        description="nodeTaintsPolicy: Honor leaves out nodes with taints the pods do not "
        "tolerate, Ignore counts all. Unset: Ignore.",
    )
    match_label_keys: list[MetadataKey] = Field(
        default_factory=list,
        max_length=2,
        description="matchLabelKeys are pod label keys whose values the pod's own are added "
        "to labelSelector with.",
    )

    __rules__ = (
        Rule(
            cel="!has(self.minDomains) || self.whenUnsatisfiable == 'DoNotSchedule'",
            message="minDomains is only allowed with whenUnsatisfiable DoNotSchedule",
            check=lambda c: c.min_domains is None or c.when_unsatisfiable == "DoNotSchedule",
            field="minDomains",
        ),
    )


class PodSecurityContext(ApiModel):
    """The identity fields of a pod's securityContext; the operator sets the rest (runAsNonRoot,
    the seccomp profile) and the trainer container's own, which the restricted profile needs."""

    run_as_user: int | None = Field(
        None,
        ge=1,
        le=MAX_UID,
        description="runAsUser is the UID of the trainer (not 0: the pods run as non-root). "
        "Unset: the image's user (1000), or the one the platform assigns, such as OpenShift's "
        "restricted-v2.",
    )
    run_as_group: int | None = Field(
        None, ge=0, le=MAX_UID, description="runAsGroup is the primary GID. Unset: the image's."
    )
    fs_group: int | None = Field(
        None,
        ge=0,
        le=MAX_UID,
        description="fsGroup owns the pods' volumes, for storage that the trainer's user "
        "cannot otherwise write (many block-storage claims). Unset: none, or the platform's.",
    )


class TemplateSpec(ApiModel):
    image: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        None, description="image of the trainer. Unset: the trainer image the operator runs with."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="env added to the trainer container."
    )
    node_selector: dict[Annotated[str, StringConstraints(max_length=317)], LabelValue] = Field(
        default_factory=dict, max_length=32, description="nodeSelector of the pods."
    )
    tolerations: list[UnstructuredObject] = Field(
        default_factory=list, max_length=32, description="tolerations of the pods."
    )
    affinity: UnstructuredObject | None = Field(None, description="affinity of the pods.")
    priority_class_name: ShortStr | None = Field(None, description="priorityClassName of the pods.")
    service_account_name: ShortStr | None = Field(
        None, description="serviceAccountName of the pods. Unset: the namespace's default."
    )
    volumes: list[UnstructuredObject] = Field(
        default_factory=list, max_length=32, description="volumes added to the pods."
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=32, description="volumeMounts added to the trainer."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        max_length=4,
        description="imagePullSecrets name Secrets in the FineTuneJob's namespace that the "
        "kubelet pulls the pods' images with, added to the ServiceAccount's own.",
    )
    labels: dict[MetadataKey, PodLabelValue] = Field(
        default_factory=dict,
        max_length=12,
        description="labels added to the pods, such as sidecar.istio.io/inject. The operator's "
        "own keys (app.kubernetes.io/managed-by, app.kubernetes.io/component, finetune.dev/*) "
        "and the Job controller's (job-name, controller-uid, batch.kubernetes.io/*) are refused.",
    )
    annotations: dict[
        MetadataKey, Annotated[str, StringConstraints(max_length=ANNOTATION_VALUE_MAX_LENGTH)]
    ] = Field(
        default_factory=dict,
        max_length=8,
        description="annotations added to the pods, such as "
        "cluster-autoscaler.kubernetes.io/safe-to-evict, at most "
        f"{ANNOTATION_VALUE_MAX_LENGTH} characters each. The operator's own keys "
        "(prometheus.io/scrape, prometheus.io/port, prometheus.io/path, finetune.dev/*) and the "
        "Job controller's (batch.kubernetes.io/*) are refused.",
    )
    scheduler_name: DnsSubdomain | None = Field(
        None,
        description="schedulerName of the scheduler that places the pods, such as a gang "
        "scheduler. Unset: the cluster's default scheduler.",
    )
    runtime_class_name: DnsSubdomain | None = Field(
        None,
        description="runtimeClassName of the RuntimeClass the pods run with, such as nvidia or "
        "a sandbox. Unset: the node's default runtime.",
    )
    topology_spread_constraints: list[TopologySpreadConstraint] = Field(
        default_factory=list,
        max_length=3,
        description="topologySpreadConstraints of the pods across zones or nodes, as in a pod "
        "spec; a constraint without labelSelector counts this FineTuneJob's trainer pods.",
    )
    security_context: PodSecurityContext | None = Field(
        None,
        description="securityContext sets the pods' runAsUser, runAsGroup and fsGroup. Unset: "
        "the image's user and group (1000), or those the platform assigns (OpenShift's "
        "restricted-v2); the pods always run as non-root.",
    )
    cache_size: Annotated[str, StringConstraints(max_length=64, pattern=SIZE_PATTERN)] = Field(
        "20Gi",
        description="cacheSize is the size of each pod's /tmp emptyDir, which holds the Hugging "
        "Face cache (HF_HOME: the downloaded model and dataset) and the artifact before its "
        "push: its sizeLimit (the kubelet evicts a pod that writes more) and the trainer's "
        "ephemeral-storage request, unless resources.requests or resources.limits name "
        "ephemeral-storage. A quantity such as 20Gi; it must hold the base model (hf:// sources "
        "larger than it fail the job before their download). Default 20Gi.",
    )
    termination_grace_period_seconds: int | None = Field(
        None,
        ge=0,
        le=86400,
        description="terminationGracePeriodSeconds of the pods: how long a trainer that gets "
        "SIGTERM (its pod deleted, evicted, preempted, drained or suspended) has to finish its "
        "step and save a checkpoint before it is killed. A save that does not fit is lost, and "
        "the gang resumes from the last periodic checkpoint instead. Raise it where one step and "
        "one save take longer (full fine-tuning of a large model writes its optimizer state "
        "too). A restart after a failure waits for the failed attempt's pods to stop: a frozen "
        "rank (a stopped process) holds it this long, where one stuck in a collective ends "
        "itself (runPolicy.hangTimeoutSeconds). Unset: Kubernetes' default, 30. The condition "
        "SavesOnStop says whether the last step and checkpoint would fit in it.",
    )

    __rules__ = (
        _key_format_rule("labels"),
        _own_key_rule("labels", OWN_POD_LABELS),
        _key_format_rule("annotations"),
        _own_key_rule("annotations", OWN_POD_ANNOTATIONS),
    )

    def grace_period_seconds(self) -> int:
        """The pods' termination grace period: what a stop's step and save must fit in."""
        grace = self.termination_grace_period_seconds
        return KUBERNETES_GRACE_PERIOD_SECONDS if grace is None else grace


# What may change after creation. These steer the operator (and serve its result), never the
# trainer: the trainer's copy of the spec leaves them out (the operator's render.trainer_manifest),
# so that an edit to them does not rewrite what the running pods read.
MUTABLE_RUN_POLICY_FIELDS = (
    "suspend",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "pendingTimeoutSeconds",
)
MUTABLE_SPEC_PATHS = ("serve", *(f"runPolicy.{f}" for f in MUTABLE_RUN_POLICY_FIELDS))


def _listed(names: tuple[str, ...]) -> str:
    """`a, b and c`, as the validation messages list fields."""
    return f"{', '.join(names[:-1])} and {names[-1]}"


class RunPolicy(ApiModel):
    suspend: bool = Field(
        False,
        description="suspend stops the gang and keeps its progress: each pod gets SIGTERM, saves "
        "a checkpoint within its termination grace period and exits (reason Interrupted); "
        "condition Suspended turns True once the pods are gone (Suspending until then). false "
        "resumes, from that checkpoint. Without queueName it sets the Job's spec.suspend; with "
        "queueName it sets the Kueue Workload's spec.active instead (Kueue owns the Job's). "
        "Default false. Mutable.",
    )
    backoff_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="backoffLimit is the number of gang restarts after a failure, each resuming "
        "from the last checkpoint. Restarts after a disruption (a pod evicted, preempted, "
        "drained or deleted, or lost with its node; counted in status.disruptions) do not "
        "count. Default 3.",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="activeDeadlineSeconds bounds the whole job's run time, all attempts "
        "together: wall-clock seconds from status.startTime (the first attempt running), "
        "suspended time included. Each attempt's Job gets what is left; when it runs out the "
        "job fails with reason DeadlineExceeded, whatever backoffLimit allows. Unset: no "
        "deadline. Mutable.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="ttlSecondsAfterFinished deletes the finished Job and its pods this long "
        "after status.completionTime. The operator runs it once it has recorded the outcome "
        "(not the Job's own TTL, which could delete a Job before its outcome was read). Mutable.",
    )
    queue_name: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        None,
        description="queueName is a Kueue LocalQueue, passed on as the kueue.x-k8s.io/queue-name "
        "label; the Job is then created suspended for Kueue to admit, and Kueue alone sets its "
        "spec.suspend (suspend goes through the Workload's spec.active). Unset: no Kueue.",
    )
    hang_timeout_seconds: int = Field(
        60,
        ge=10,
        le=86400,
        description="hangTimeoutSeconds is the least time a rank waits for a training step to "
        "complete before it deems the gang hung (a rank stuck in a collective or stopped): the "
        "limit is the larger of this and 3 x the p99 of recent step times. The rank then ends "
        "the attempt with reason CollectiveTimeout and the gang restarts from its checkpoint. "
        "Evaluation's batches, and the forward of each token it generates, are timed the same "
        "way. Loading, writing a checkpoint and the push are not (a checkpoint's gathers across "
        "ranks are). Default 60.",
    )
    pending_timeout_seconds: int = Field(
        600,
        ge=30,
        le=86400,
        description="pendingTimeoutSeconds is how long an attempt's pods may stay unable to start, "
        "counted from when the attempt's Job started (its creation, or the moment a suspended or "
        "queued Job was resumed or admitted). While a pod is stuck (ImagePullBackOff, "
        "ErrImagePull, InvalidImageName, CreateContainerConfigError, CreateContainerError, "
        "Unschedulable, or FailedCreate when the pods cannot be created at all) the Running "
        "condition carries that reason at once; a pod still stuck when this time is up fails the "
        "job with reason PendingTimeout and its Job is deleted. Pods that are only slow (image "
        "pulls, scheduling in progress) never fail. Default 600. Mutable.",
    )

    __rules__ = (
        TransitionRule(
            cel="self.backoffLimit == oldSelf.backoffLimit"
            " && self.hangTimeoutSeconds == oldSelf.hangTimeoutSeconds"
            " && has(self.queueName) == has(oldSelf.queueName)"
            " && (!has(self.queueName) || self.queueName == oldSelf.queueName)",
            message=f"runPolicy is immutable except {_listed(MUTABLE_RUN_POLICY_FIELDS)}",
        ),
    )


# The spec sections that may never change after creation; runPolicy has its own rule.
IMMUTABLE_SPEC_FIELDS = (
    "model",
    "dataset",
    "peft",
    "training",
    "evaluation",
    "output",
    "resources",
    "template",
)


# ---- serving ------------------------------------------------------------------------------------
# The engines spec.serve renders. transformers (`transformers serve`) runs on CPU from the
# trainer image; vllm and tgi are GPU servers with images of their own.
ServeEngine = Literal["transformers", "vllm", "tgi"]
SERVE_ENGINES: tuple[str, ...] = ("transformers", "vllm", "tgi")
# Kept small (8 names of at most 63 characters) for the spec's size budget (SPEC_MAX_BYTES).
ResourceMap = dict[Annotated[str, StringConstraints(max_length=63)], Quantity]


class ServeResources(ApiModel):
    requests: ResourceMap = Field(
        default_factory=dict,
        max_length=8,
        description="requests of the serving container, such as {cpu: 1, memory: 2Gi}. Unset: "
        "none (the namespace's defaults).",
    )
    limits: ResourceMap = Field(
        default_factory=dict,
        max_length=8,
        description="limits of the serving container, such as {nvidia.com/gpu: 1}. Unset: none.",
    )


class ServeSpec(ApiModel):
    """Serve the pushed revision behind an OpenAI-compatible API, once the job has Succeeded
    (which it does only when its evaluation gates passed)."""

    engine: ServeEngine = Field(
        "transformers",
        description="engine is transformers (`transformers serve`, runs on CPU, from the "
        "trainer image), vllm (LoRA through --enable-lora --lora-modules) or tgi "
        "(LORA_ADAPTERS; requests name the adapter with adapter_id). vllm and tgi shard the "
        "model over every GPU of resources' nvidia.com/gpu (--tensor-parallel-size, NUM_SHARD). "
        "Default transformers.",
    )
    replicas: int = Field(
        1, ge=1, le=64, description="replicas of the serving Deployment. Default 1."
    )
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        None,
        description="image of the serving container. Unset: the operator's image for the "
        "engine (the trainer image for transformers; the chart's serve.vllmImage or "
        "serve.tgiImage).",
    )
    resources: ServeResources = Field(
        default_factory=ServeResources,
        description="resources of the serving container. Default: none.",
    )


# The metric vocabulary lives in finetune_api.metrics; these spell it in CEL.
def _cel_list(names: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{m}'" for m in names) + "]"


def _spelled(names: tuple[str, ...]) -> str:
    """Names as a sentence lists them: "a, b and c"."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _cel_by_task(lists: dict[str, list[str]]) -> str:
    """A CEL map literal from each task to a list of metric names, indexed by the spec's task."""
    entries = ", ".join(f"'{task}': {_cel_list(names)}" for task, names in lists.items())
    return f"{{{entries}}}[self.model.task]"


_TASKS: tuple[str, ...] = get_args(Task)


def _truncated_cel(name: str, scores: str) -> str:
    """CEL: whether the string `name` is metrics.truncated(d, s) for a size d of
    training.matryoshkaDims and a score s in the CEL list `scores`. It takes the name apart
    rather than spelling each size's names: the API server's cost estimate of a string built
    from a number is unbounded."""
    start = len(TRUNCATED_PREFIX)
    size_end = f"{name}.indexOf('_', {start})"
    return (
        f"(has(self.training.matryoshkaDims) && {name}.matches('^{TRUNCATED_PREFIX_PATTERN}') "
        f"&& int({name}.substring({start}, {size_end})) in self.training.matryoshkaDims "
        f"&& {name}.substring({size_end} + 1) in {scores})"
    )


# sentence-embedding's rows are scored pairs (dataset.scoreField).
_SCORED_CEL = f"(self.model.task == '{SENTENCE_EMBEDDING}' && has(self.dataset.scoreField))"
# metrics.default_metrics, in CEL.
_DEFAULTS_CEL = (
    f"({_SCORED_CEL} ? {_cel_list(SCORED_PAIR_METRICS)} : "
    f"{_cel_by_task({t: DEFAULT_METRICS[t] for t in _TASKS})})"
)
# Whether the metric named `k` is computed (metrics.effective_metrics): one of those listed, or
# with none listed one of the task's defaults, or the first of them at a Matryoshka size.
_COMPUTED_CEL = (
    "(size(self.evaluation.metrics) > 0 ? k in self.evaluation.metrics : "
    f"(k in {_DEFAULTS_CEL} || {_truncated_cel('k', f'[{_DEFAULTS_CEL}[0]]')}))"
)
# The tasks whose every score is their own library's evaluator (sentence-transformers',
# diffusers' UNet loss): no other name means anything to them, where causal-lm and
# sequence-classification load any other name through `evaluate`.
_LIBRARY_SCORED = (SENTENCE_EMBEDDING, TEXT_TO_IMAGE)
_LIBRARY_SCORES_CEL = (
    f"({_SCORED_CEL} ? {_cel_list(SCORED_PAIR_METRICS)} : "
    f"{_cel_by_task({t: list(metrics_of(t)) for t in _LIBRARY_SCORED})})"
)
_FOREIGN_METRICS_CEL = _cel_by_task(
    {t: list(foreign_metrics(t)) for t in _TASKS if t not in _LIBRARY_SCORED}
)
_FOREIGN_METRICS_MESSAGE = (
    "evaluation.metrics names a built-in metric of another task; "
    + "; ".join(f"{t} computes {', '.join(metrics_of(t))}" for t in _TASKS)
)


def _library_scores(spec: Any) -> tuple[str, ...]:
    """What a _LIBRARY_SCORED task can compute, for the spec's task and matryoshkaDims."""
    task = spec.model.task
    if task == SENTENCE_EMBEDDING:
        return embedding_metrics(
            spec.training.matryoshka_dims, spec.dataset.score_field is not None
        )
    return metrics_of(task)


# output.hub.endpoint when it names huggingface.co itself (the default when it is unset): one
# regular expression for CEL (RE2) and Python, with no backslash for CEL's string escapes.
_HUGGINGFACE_CO = "^https?://(www[.])?huggingface[.]co/?$"


def _only_for_task(task: str, path: str, wire: str) -> Rule:
    """`path` (a wire path under spec, Python attribute `wire` of its parent) is set only with
    model.task `task`."""
    parent, _, _ = path.rpartition(".")

    def check(spec: Any) -> bool:
        owner = spec
        for part in parent.split("."):
            owner = getattr(owner, part)
        return getattr(owner, wire) is None or spec.model.task == task

    return Rule(
        cel=f"!has(self.{path}) || self.model.task == '{task}'",
        message=f"{path} is only for model.task {task}",
        check=check,
        field=path,
    )


def _text_to_image_only(path: str, wire: str) -> Rule:
    return _only_for_task(TEXT_TO_IMAGE, path, wire)


def _plain_lora_for_text_to_image(wire: str, attr: str, why: str) -> Rule:
    """A rule that keeps the LoRA variant peft.<wire> off text-to-image, whose pushed LoRA is
    `why`."""
    return Rule(
        cel=f"self.model.task != '{TEXT_TO_IMAGE}' || !self.peft.{wire}",
        message=f"text-to-image pushes a LoRA {why}: peft.{wire} must be false",
        check=lambda s: s.model.task != TEXT_TO_IMAGE or not getattr(s.peft, attr),
        field=f"peft.{wire}",
    )


_TEXT_TO_IMAGE_RULES = (
    _text_to_image_only("training.resolution", "resolution"),
    _text_to_image_only("training.centerCrop", "center_crop"),
    _text_to_image_only("training.randomFlip", "random_flip"),
    _text_to_image_only("training.predictionType", "prediction_type"),
    _text_to_image_only("training.snrGamma", "snr_gamma"),
    _text_to_image_only("training.noiseOffset", "noise_offset"),
    _text_to_image_only("training.trainTextEncoder", "train_text_encoder"),
    _text_to_image_only("model.vae", "vae"),
    _text_to_image_only("evaluation.imageSamples", "image_samples"),
    _plain_lora_for_text_to_image(
        "useRslora", "use_rslora", "that diffusers loads scaled by alpha/r"
    ),
    _plain_lora_for_text_to_image("useDora", "use_dora", "that diffusers loads as plain LoRA"),
    Rule(
        cel=f"self.model.task != '{TEXT_TO_IMAGE}' || self.peft.method == 'lora'",
        message="text-to-image trains a LoRA on the UNet: peft.method must be lora",
        check=lambda s: s.model.task != TEXT_TO_IMAGE or s.peft.method == "lora",
        field="peft.method",
    ),
    Rule(
        cel=f"self.model.task != '{TEXT_TO_IMAGE}' || !has(self.output.hub) "
        "|| !self.output.hub.merge",
        message="text-to-image pushes its LoRA (pytorch_lora_weights.safetensors): "
        "output.hub.merge must be false",
        check=lambda s: (
            s.model.task != TEXT_TO_IMAGE or s.output.hub is None or not s.output.hub.merge
        ),
        field="output.hub.merge",
    ),
)


class FineTuneJobSpec(ApiModel):
    model: ModelSpec = Field(description="model is the base model and the task.")
    dataset: DatasetSpec = Field(description="dataset to train and evaluate on.")
    peft: PeftSpec = Field(default_factory=PeftSpec, description="peft method. Default LoRA r=8.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="training settings.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="evaluation metrics and gates."
    )
    output: OutputSpec = Field(
        default_factory=OutputSpec, description="output: where the result and checkpoints go."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="resources: nodes x processes and hardware."
    )
    template: TemplateSpec = Field(
        default_factory=TemplateSpec, description="template holds pod-level overrides."
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="runPolicy: suspension, restarts and deadlines."
    )
    serve: ServeSpec | None = Field(
        None,
        description="serve deploys the pushed revision (output.hub) as a Deployment and a "
        "Service with an OpenAI-compatible API once the job has Succeeded; deleting the "
        "FineTuneJob deletes them. Mutable: a change rolls out, and a rollout that fails keeps "
        "the pods already serving. Unset: nothing is served.",
    )

    __rules__ = (
        Rule(
            cel="self.peft.method != 'qlora'"
            " || self.resources.accelerator.type == 'nvidia.com/gpu'",
            message="peft.method qlora needs resources.accelerator.type nvidia.com/gpu",
            check=lambda s: (
                s.peft.method != "qlora" or s.resources.accelerator.type == "nvidia.com/gpu"
            ),
            field="peft.method",
        ),
        Rule(
            cel="self.training.strategy != 'fsdp' || self.peft.method != 'qlora'",
            message="training.strategy fsdp does not support peft.method qlora (sharding a 4-bit "
            "base needs a bitsandbytes quant storage dtype this trainer does not set): use ddp, "
            "or lora with fsdp",
            check=lambda s: s.training.strategy != "fsdp" or s.peft.method != "qlora",
            field="training.strategy",
        ),
        Rule(
            cel="self.training.strategy != 'fsdp' || "
            f"self.model.task in ['{CAUSAL_LM}', '{SEQUENCE_CLASSIFICATION}']",
            message="training.strategy fsdp shards transformers models by their layer classes: "
            f"it is for model.task {CAUSAL_LM} and {SEQUENCE_CLASSIFICATION}; use ddp",
            check=lambda s: (
                s.training.strategy != "fsdp"
                or s.model.task in (CAUSAL_LM, SEQUENCE_CLASSIFICATION)
            ),
            field="training.strategy",
        ),
        Rule(
            cel="!self.peft.useDora || !has(self.serve) || self.serve.engine == 'transformers'"
            " || (has(self.output.hub) && self.output.hub.merge)",
            message="vLLM and TGI cannot load a DoRA adapter: with peft.useDora and serve.engine "
            "vllm or tgi, set output.hub.merge true (the merged model is served)",
            check=lambda s: (
                not s.peft.use_dora
                or s.serve is None
                or s.serve.engine == "transformers"
                or (s.output.hub is not None and s.output.hub.merge)
            ),
            field="serve.engine",
        ),
        Rule(
            cel="self.training.strategy != 'fsdp' || self.training.precision != 'fp16'",
            message="training.strategy fsdp computes in bf16 or fp32: fp16's loss scaling of "
            "sharded gradients is not supported; use precision bf16, auto or fp32",
            check=lambda s: s.training.strategy != "fsdp" or s.training.precision != "fp16",
            field="training.precision",
        ),
        Rule(
            cel="!has(self.output.hub) || (has(self.output.hub.endpoint)"
            f" && !self.output.hub.endpoint.matches('{_HUGGINGFACE_CO}'))"
            " || has(self.output.hub.tokenSecretRef)"
            f" || self.template.env.exists(e, e.name == '{HF_TOKEN_ENV}')",
            message="a push to huggingface.co needs a token: set output.hub.tokenSecretRef (or "
            f"{HF_TOKEN_ENV} in template.env), or output.hub.endpoint for another Hub",
            check=lambda s: (
                s.output.hub is None
                or (
                    s.output.hub.endpoint is not None
                    and re.match(_HUGGINGFACE_CO, s.output.hub.endpoint) is None
                )
                or s.output.hub.token_secret_ref is not None
                or any(e.name == HF_TOKEN_ENV for e in s.template.env)
            ),
            field="output.hub.tokenSecretRef",
        ),
        Rule(
            cel=f"self.evaluation.gates.all(k, {_COMPUTED_CEL})",
            message="every evaluation.gates key must be a computed metric (see evaluation.metrics)",
            check=lambda s: all(k in s.computed_metrics() for k in s.evaluation.gates),
            field="evaluation.gates",
        ),
        Rule(
            cel=f"self.model.task in {_cel_list(_LIBRARY_SCORED)} || "
            f"self.evaluation.metrics.all(m, !(m in {_FOREIGN_METRICS_CEL}))",
            message=_FOREIGN_METRICS_MESSAGE,
            check=lambda s: (
                s.model.task in _LIBRARY_SCORED
                or not set(s.evaluation.metrics) & set(foreign_metrics(s.model.task))
            ),
            field="evaluation.metrics",
        ),
        Rule(
            cel=f"!(self.model.task in {_cel_list(_LIBRARY_SCORED)}) || "
            f"self.evaluation.metrics.all(m, m in {_LIBRARY_SCORES_CEL} || "
            f"{_truncated_cel('m', _LIBRARY_SCORES_CEL)})",
            message=f"{SENTENCE_EMBEDDING} computes only "
            f"{_spelled(metrics_of(SENTENCE_EMBEDDING))} (sentence-transformers' evaluator "
            f"keys; of scored pairs, dataset.scoreField, only {_spelled(SCORED_PAIR_METRICS)}), "
            "and with training.matryoshkaDims each of them at a size d as dim_<d>_<name>; "
            f"{TEXT_TO_IMAGE} computes only {_spelled(metrics_of(TEXT_TO_IMAGE))}",
            check=lambda s: (
                s.model.task not in _LIBRARY_SCORED
                or set(s.evaluation.metrics) <= set(_library_scores(s))
            ),
            field="evaluation.metrics",
        ),
        _only_for_task(SENTENCE_EMBEDDING, "training.matryoshkaDims", "matryoshka_dims"),
        _only_for_task(SENTENCE_EMBEDDING, "dataset.scoreField", "score_field"),
        _only_for_task(
            SENTENCE_EMBEDDING, "training.cachedMiniBatchSize", "cached_mini_batch_size"
        ),
        Rule(
            cel="!has(self.training.cachedMiniBatchSize) || !has(self.dataset.scoreField)",
            message="training.cachedMiniBatchSize caches the gradients of "
            "MultipleNegativesRankingLoss; scored pairs (dataset.scoreField) train with "
            "CoSENTLoss, which sentence-transformers does not cache: drop one of them",
            check=lambda s: (
                s.training.cached_mini_batch_size is None or s.dataset.score_field is None
            ),
            field="training.cachedMiniBatchSize",
        ),
        Rule(
            cel="!has(self.serve) || has(self.output.hub)",
            message="serve deploys the revision the job pushes: it needs a push target, output.hub",
            check=lambda s: s.serve is None or s.output.hub is not None,
            field="serve",
        ),
        Rule(
            cel=f"!has(self.serve) || self.model.task == '{CAUSAL_LM}'",
            message="serve answers chat completions: it needs model.task causal-lm",
            check=lambda s: s.serve is None or s.model.task == CAUSAL_LM,
            field="serve",
        ),
        Rule(
            cel=f"!has(self.dataset.negativeField) || self.model.task == '{SENTENCE_EMBEDDING}'",
            message="dataset.negativeField is only for task sentence-embedding",
            check=lambda s: s.dataset.negative_field is None or s.model.task == SENTENCE_EMBEDDING,
            field="dataset.negativeField",
        ),
        *_TEXT_TO_IMAGE_RULES,
        Rule(
            cel=f"!self.evaluation.metrics.exists(m, m in {_cel_list(GENERATION_METRICS)})"
            " || has(self.dataset.promptField) || has(self.dataset.messagesField)",
            message=f"{_spelled(GENERATION_METRICS)} score answers generated for prompts: set "
            "dataset.promptField and responseField, or dataset.messagesField",
            check=lambda s: (
                not needs_generation(s.evaluation.metrics)
                or s.dataset.prompt_field is not None
                or s.dataset.messages_field is not None
            ),
            field="evaluation.metrics",
        ),
        TransitionRule(
            cel=" && ".join(f"self.{f} == oldSelf.{f}" for f in IMMUTABLE_SPEC_FIELDS),
            message=f"spec is immutable except {_listed(MUTABLE_SPEC_PATHS)}",
        ),
    )

    def computed_metrics(self) -> list[str]:
        """The scores the job computes before and after training (metrics.effective_metrics)."""
        return effective_metrics(
            self.model.task,
            self.evaluation.metrics,
            self.training.matryoshka_dims,
            scored=self.dataset.score_field is not None,
        )

    def token_secrets(self) -> list[TokenSecret]:
        """The Hub tokens the pods read from Secrets, push token first: what the operator
        renders into the pod's env and checks before it creates the Job."""
        refs = (
            ("output.hub.tokenSecretRef", HF_TOKEN_ENV, self.output.hub),
            ("model.tokenSecretRef", MODEL_TOKEN_ENV, self.model),
            ("dataset.tokenSecretRef", DATASET_TOKEN_ENV, self.dataset),
        )
        return [
            TokenSecret(field, env, owner.token_secret_ref)
            for field, env, owner in refs
            if owner is not None and owner.token_secret_ref is not None
        ]


# ---- status -------------------------------------------------------------------------------------
# An RFC 3339 timestamp, as metav1.Time is on the wire; the API server checks the format.
Timestamp = Annotated[
    str, StringConstraints(max_length=64), Field(json_schema_extra={"format": "date-time"})
]


class Condition(ApiModel):
    type: ShortStr = Field(
        description="type of the condition: Created, Running, Evaluated, Pushed, Succeeded, "
        "Failed or Suspended. Unique in the list."
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="status of the condition: True, False or Unknown."
    )
    reason: Annotated[str, StringConstraints(max_length=1024)] = Field(
        "", description="reason is a CamelCase word for the last transition."
    )
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        "", description="message is a human-readable explanation."
    )
    last_transition_time: Timestamp | None = Field(
        None, description="lastTransitionTime is when status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="observedGeneration is the spec generation this reflects."
    )


class Progress(ApiModel):
    step: int = Field(0, ge=0, description="step is the last optimizer step.")
    total_steps: int = Field(0, ge=0, description="totalSteps planned.")
    epoch: float = Field(0.0, ge=0, description="epoch, fractional.")
    loss: float | None = Field(None, description="loss of the last step.")
    percent: int = Field(0, ge=0, le=100, description="percent of totalSteps done.")
    eta_seconds: int | None = Field(None, ge=0, description="etaSeconds at the current speed.")
    tokens_per_second: float | None = Field(None, ge=0, description="tokensPerSecond, all ranks.")
    updated_at: Timestamp | None = Field(
        None, description="updatedAt is when progress was last read (RFC 3339)."
    )


class EvaluationScore(ApiModel):
    before: float | None = Field(None, description="before training.")
    after: float | None = Field(None, description="after training.")


class Result(ApiModel):
    repo: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="repo the result was pushed to."
    )
    revision: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="revision is the commit sha that the push made (on branch, or on the pull "
        "request's prRevision).",
    )
    url: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        None, description="url of that commit."
    )
    branch: Annotated[str, StringConstraints(max_length=MAX_BRANCH_LENGTH)] | None = Field(
        None,
        description="branch the commit was made on (output.hub.branch, or main). Unset for a "
        "pull request: its commit is on prRevision.",
    )
    pr_revision: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="prRevision is the git ref of the pull request the push opened "
        "(output.hub.createPr), such as refs/pr/3. Unset: no pull request was opened.",
    )
    pr_url: Annotated[str, StringConstraints(max_length=2048)] | None = Field(
        None, description="prUrl is the pull request's page on the Hub."
    )
    artifact: Literal["adapter", "merged", "full"] = Field(
        "adapter", description="artifact pushed: adapter, merged weights, or full (peft none)."
    )


class SourcesStatus(ApiModel):
    model_revision: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="modelRevision is the commit sha the hf:// model was loaded at: model."
        "revision (a branch, tag or commit; unset: main) as rank 0 resolved it once for the "
        "job. Unset: a file:// model, or no attempt has reported it yet.",
    )
    dataset_revision: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="datasetRevision is the commit sha the hf:// dataset was loaded at, "
        "resolved as modelRevision. Unset: a file:// dataset, or not reported yet.",
    )
    vae_revision: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="vaeRevision is the commit sha the hf:// model.vae was loaded at, resolved "
        "as modelRevision. Unset: no model.vae, a file:// one, or not reported yet.",
    )


class CheckpointStatus(ApiModel):
    store: Literal["Volume", "HubBranch", "Ephemeral"] | None = Field(
        None,
        description="store holding the checkpoints: Volume (a claim), HubBranch, or Ephemeral "
        "(lost with the pods; see the CheckpointsDurable condition).",
    )
    claim_name: ShortStr | None = Field(None, description="claimName when store is Volume.")
    claim_retained: bool | None = Field(
        None,
        description="claimRetained, once the FineTuneJob has ended, says whether the claim the "
        "operator made (claimName) outlives it: true once the operator released it from the "
        "FineTuneJob's ownership, as output.checkpoints.claimRetentionPolicy asks, so that "
        "deleting the FineTuneJob leaves it and one made again with the same name adopts it; "
        "false when it is deleted with the FineTuneJob (or was never made). Unset while the "
        "job runs, and with a store the operator did not make.",
    )
    hub_branch: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="hubBranch of output.hub.repo when store is HubBranch."
    )
    resumed_from_step: int | None = Field(
        None,
        ge=0,
        description="resumedFromStep is the step the attempt in `attempt` resumed from (0: a "
        "fresh start), as its rank 0 reported it: in its metrics, or in its result for an "
        "attempt that ended before the operator read them (one that only pushed a kept "
        "result reports that result's last step).",
    )
    attempt: int | None = Field(
        None, ge=1, description="attempt whose resume resumedFromStep describes."
    )
    last_restart_time: Timestamp | None = Field(
        None,
        description="lastRestartTime is when the last gang restart began (RFC 3339): the "
        "attempt's failure was seen, or a pod of the gang was stopped and is being replaced.",
    )
    last_resume_time: Timestamp | None = Field(
        None,
        description="lastResumeTime is when the gang last resumed from resumedFromStep (or "
        "started afresh), as its rank 0 reported it (RFC 3339). While lastRestartTime is "
        "later, a restart is under way.",
    )
    steps_lost: int = Field(
        0,
        ge=0,
        description="stepsLost over all restarts: steps trained past the last checkpoint before "
        "a gang stopped. At most checkpointEverySteps per restart (fewer where "
        "checkpointEverySeconds saves sooner).",
    )


def _seconds(what: str) -> Any:
    return Field(None, ge=0, description=what)


class StartupTimes(ApiModel):
    """Where the time to the first optimizer step went: each field is the seconds from the
    FineTuneJob's creation to the moment the attempt reached that phase (unset: not reached, or
    not reported). Pod times have the API server's one-second resolution."""

    attempt: int | None = Field(None, ge=1, description="attempt these times describe.")
    scheduled: float | None = _seconds(
        "scheduled: the last pod of the gang was bound to a node (its PodScheduled condition)."
    )
    container_started: float | None = _seconds(
        "containerStarted: the last pod's trainer container started; from scheduled to here is "
        "the image pull (none when the node has it) and the container's creation."
    )
    process_started: float | None = _seconds(
        "processStarted: rank 0's trainer imported its libraries and serves its metrics."
    )
    rendezvous: float | None = _seconds("rendezvous: every rank joined the process group.")
    downloaded: float | None = _seconds(
        "downloaded: the hf:// model and dataset are resolved to commits and in the cache. "
        "Unset when no source is on the Hub, or the Hub is offline."
    )
    data_loaded: float | None = _seconds("dataLoaded: the dataset is loaded and tokenized.")
    model_loaded: float | None = _seconds("modelLoaded: the model is loaded, with its adapter.")
    evaluated_before: float | None = _seconds(
        "evaluatedBefore: the before-training evaluation is done."
    )
    first_step: float | None = _seconds("firstStep: the first optimizer step is done.")


class FinishTimes(ApiModel):
    """Where the time after the last optimizer step went: each field is the seconds from the
    last step to the moment the attempt reached that phase (unset: not reached, or not
    reported). Pod times have the API server's one-second resolution."""

    attempt: int | None = Field(None, ge=1, description="attempt these times describe.")
    evaluated_after: float | None = _seconds(
        "evaluatedAfter: the after-training evaluation is done."
    )
    saved: float | None = _seconds("saved: the final artifact is saved.")
    pushed: float | None = _seconds(
        "pushed: the push to output.hub is done. Unset without output.hub, or when a gate failed."
    )
    result_written: float | None = _seconds(
        "resultWritten: rank 0 wrote its result; what follows is the ranks' exit (and "
        "FINETUNE_METRICS_LINGER_SECONDS, when the operator sets one)."
    )
    pods_exited: float | None = _seconds(
        "podsExited: the last pod's trainer container ended (its finishedAt)."
    )
    succeeded: float | None = _seconds(
        "succeeded: the operator saw the Job complete and set Succeeded (or Failed)."
    )


class Workload(ApiModel):
    job_name: ShortStr | None = Field(None, description="jobName of the current batch/v1 Job.")
    service_name: ShortStr | None = Field(None, description="serviceName of the headless Service.")


class ServeStatus(ApiModel):
    engine: ServeEngine | None = Field(None, description="engine of the serving Deployment.")
    url: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        None,
        description="url is the OpenAI-compatible base URL inside the cluster "
        "(http://<name>-serve.<namespace>.svc:8000/v1).",
    )
    revision: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None,
        description="revision is the pushed commit that is serving: recorded once its rollout "
        "completed and a smoke chat completion answered. Unset: none yet.",
    )
    model: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="model is the name to send in requests (the `model` field)."
    )
    ready: bool = Field(
        False, description="ready is true while revision is served and answered its smoke test."
    )
    replicas: int = Field(0, ge=0, description="replicas available.")
    reason: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        None,
        description="reason is a CamelCase word for the serving state: Waiting (the job has "
        "not Succeeded), RollingOut, Serving, SmokeFailed, RolloutFailed, NameConflict or "
        "QuotaExceeded.",
    )
    message: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        None, description="message explains reason."
    )
    last_transition_time: Timestamp | None = Field(
        None, description="lastTransitionTime is when reason last changed (RFC 3339)."
    )


class FineTuneJobStatus(ApiModel):
    phase: Phase = Field(Phase.PENDING, description="phase summarises the conditions, for display.")
    observed_generation: int = Field(
        0, ge=0, description="observedGeneration is the spec generation last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="conditions are the source of truth, one per type (Created, Running, "
        "Evaluated, Pushed, Succeeded, Failed, Suspended, CheckpointsDurable, SavesOnStop); phase "
        "summarises them.",
        # A map keyed by type, as metav1.Condition lists are: server-side apply and strategic
        # merges then treat each condition as its own entry.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    attempts: int = Field(0, ge=0, description="attempts is the number of Jobs created so far.")
    disruptions: int = Field(
        0,
        ge=0,
        description="disruptions is the number of gang restarts caused by disruptions (a pod "
        "evicted, preempted, drained or deleted: DisruptionTarget on a pod, or a trainer that "
        "stopped on SIGTERM with reason Interrupted; or a pod lost with its node, whose Ready "
        "condition is not True, or which was deleted), which do not count against "
        "runPolicy.backoffLimit. 0 until one happens.",
    )
    start_time: Timestamp | None = Field(
        None, description="startTime is when the first attempt started Running (RFC 3339)."
    )
    completion_time: Timestamp | None = Field(
        None, description="completionTime is when the job Succeeded or Failed (RFC 3339)."
    )
    progress: Progress = Field(default_factory=Progress, description="progress of training.")
    evaluation: dict[Annotated[str, StringConstraints(max_length=128)], EvaluationScore] = Field(
        default_factory=dict, max_length=32, description="evaluation by metric, before and after."
    )
    evaluation_summary: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None,
        description="evaluationSummary is the first gated metric (else the first of "
        "evaluation.metrics) before and after, for display.",
    )
    result: Result = Field(default_factory=Result, description="result of the push.")
    sources: SourcesStatus | None = Field(
        None,
        description="sources are the commits the model and dataset were loaded at. Unset "
        "until an attempt reports them.",
    )
    workload: Workload = Field(default_factory=Workload, description="workload children.")
    checkpoints: CheckpointStatus = Field(
        default_factory=CheckpointStatus, description="checkpoints: where, and what restarts cost."
    )
    serve: ServeStatus | None = Field(
        None, description="serve: what spec.serve serves, and whether it answers. Unset: no serve."
    )
    startup: StartupTimes = Field(
        default_factory=StartupTimes,
        description="startup: seconds from creation to each phase before the first step.",
    )
    finish: FinishTimes = Field(
        default_factory=FinishTimes,
        description="finish: seconds from the last step to each phase after it.",
    )


# ---- the whole object ---------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The part of metadata the trainer reads; the API server owns the rest."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH)]
    namespace: ShortStr = "default"
    uid: str | None = None
    generation: int | None = None
    # RFC 3339, set by the API server: status.startup counts from it.
    creation_timestamp: str | None = Field(None, alias="creationTimestamp")
    labels: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(ApiModel):
    api_version: Literal["finetune.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


# The root rule that keeps child names valid DNS labels. The API server checks the name itself.
NAME_RULE = Rule(
    cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && "
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    message=f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters: "
    "lower-case letters, digits and '-', starting with a letter",
    check=lambda j: (
        len(j.metadata.name) <= MAX_NAME_LENGTH
        and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", j.metadata.name) is not None
    ),
)
