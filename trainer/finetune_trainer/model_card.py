"""The Hub model card (README.md) of a fine-tuning result.

The YAML front matter is built with huggingface_hub's `ModelCardData`, so that `model-index` has
exactly the shape the Hub (and `metadata_load`/`ModelCard.load`) parses: one result per metric
with its `after` score. The body is plain Markdown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import PurePosixPath

from finetune_api.v1alpha1 import CAUSAL_LM, LOWER_IS_BETTER, FineTuneJob

__all__ = ["TASK_TYPES", "card_metadata", "render_model_card", "source_id"]

# FineTuneJob task -> Hub pipeline / model-index task type.
TASK_TYPES: dict[str, str] = {
    "causal-lm": "text-generation",
    "sequence-classification": "text-classification",
}
_TASK_NAMES = {"text-generation": "Text Generation", "text-classification": "Text Classification"}
_METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "precision": "Precision",
    "recall": "Recall",
    "perplexity": "Perplexity",
    "loss": "Loss",
}
_ARTIFACTS = ("adapter", "merged", "full")
_METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "none": "full"}


def source_id(source: str) -> str | None:
    """The Hub id of an hf:// source; None for file:// (a local path is no public reference)."""
    return source.removeprefix("hf://") if source.startswith("hf://") else None


def _source_name(source: str) -> str:
    hub_id = source_id(source)
    if hub_id is not None:
        return hub_id
    return PurePosixPath(source.removeprefix("file://")).name or "local"


def _score(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _cell(text: object) -> str:
    # User-supplied strings end up inside Markdown tables: keep them from breaking a row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def card_metadata(
    job: FineTuneJob, scores: Mapping[str, Mapping[str, float | None]], artifact: str
) -> dict[str, object]:
    """The front matter as a dict (what `ModelCardData.to_dict()` gives)."""
    from huggingface_hub import EvalResult, ModelCardData

    if artifact not in _ARTIFACTS:
        raise ValueError(f"artifact must be one of {', '.join(_ARTIFACTS)}, not {artifact!r}")
    spec = job.spec
    task_type = TASK_TYPES[spec.model.task]
    base = source_id(spec.model.source)
    dataset = source_id(spec.dataset.source)
    dataset_name = _source_name(spec.dataset.source)
    model_name = spec.output.hub.repo.split("/")[-1] if spec.output.hub else job.metadata.name

    eval_results = []
    for metric, stages in scores.items():
        after = _score(stages.get("after"))
        if after is None:
            continue
        eval_results.append(
            EvalResult(
                task_type=task_type,
                task_name=_TASK_NAMES.get(task_type),
                # model-index wants a dataset type; for a file:// dataset there is no Hub id, and
                # the folder's name is the best reference the card can give.
                dataset_type=dataset or dataset_name,
                dataset_name=dataset_name,
                dataset_config=spec.dataset.config,
                dataset_split=spec.dataset.eval_split,
                metric_type=metric,
                metric_value=after,
                metric_name=_METRIC_NAMES.get(metric, metric),
            )
        )

    tags = ["finetune-operator", task_type]
    method = spec.peft.method
    if method != "none":
        tags += ["lora", method] if method != "lora" else ["lora"]
    if artifact == "merged":
        tags.append("merged")
    data = ModelCardData(
        base_model=base,
        # The Hub infers the relation, but an explicit one keeps the model tree right for merges.
        base_model_relation=(
            None if base is None else "adapter" if artifact == "adapter" else "finetune"
        ),
        library_name="peft" if artifact == "adapter" else "transformers",
        pipeline_tag=task_type,
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset] if dataset else None,
        metrics=list(scores) or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    return data.to_dict()


def render_model_card(
    job: FineTuneJob, scores: Mapping[str, Mapping[str, float | None]], artifact: str
) -> str:
    """README.md text: YAML front matter (base_model, library_name, tags, datasets, model-index)
    and a body with the base model, dataset, PEFT and training settings, and before/after scores.

    `scores` maps metric -> {"before": x, "after": y} (either may be None); `artifact` is
    adapter, merged or full.
    """
    import yaml

    meta = card_metadata(job, scores, artifact)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    spec = job.spec
    title = spec.output.hub.repo if spec.output.hub else job.metadata.name
    base = spec.model.source
    base_id = source_id(base)
    base_ref = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}`"
    if spec.model.revision:
        base_ref += f" at revision `{spec.model.revision}`"
    data_ref = _cell(spec.dataset.source)
    kind = {
        "adapter": f"a {_METHOD_NAMES[spec.peft.method]} adapter for",
        "merged": f"{_METHOD_NAMES[spec.peft.method]}-fine-tuned and merged into",
        "full": "fully fine-tuned from",
    }[artifact]

    t, p, d = spec.training, spec.peft, spec.dataset
    world = spec.resources.nodes * spec.resources.processes_per_node
    rows: list[tuple[str, object]] = [
        ("Task", f"{spec.model.task} ({TASK_TYPES[spec.model.task]})"),
        ("Artifact", artifact),
        ("PEFT method", p.method),
    ]
    if p.method != "none":
        rows += [
            ("LoRA r / alpha / dropout", f"{p.r} / {p.alpha} / {p.dropout}"),
            ("Target modules", ", ".join(p.target_modules) or "all linear layers"),
        ]
    rows += [
        ("Epochs", t.epochs if t.max_steps is None else f"max {t.max_steps} steps"),
        ("Learning rate", f"{t.learning_rate:g}"),
        ("Warm-up steps", t.warmup_steps),
        ("Weight decay", t.weight_decay),
        ("Batch size per device", t.batch_size_per_device),
        ("Gradient accumulation", t.gradient_accumulation_steps),
        ("Processes", world),
        (
            "Global batch size",
            t.batch_size_per_device * t.gradient_accumulation_steps * world,
        ),
        ("Max sequence length", t.max_seq_length),
        ("Precision", t.precision),
        ("Seed", t.seed),
    ]
    if spec.model.task == CAUSAL_LM:
        rows.append(("Packing", t.packing))

    lines = [
        "---",
        front,
        "---",
        "",
        f"# {_cell(title)}",
        "",
        f"This model is {kind} {base_ref}, trained on `{data_ref}` by "
        "finetune-operator (FineTuneJob "
        f"`{job.metadata.namespace}/{job.metadata.name}`).",
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| Dataset | `{data_ref}` |",
    ]
    if d.config:
        lines.append(f"| Config | {_cell(d.config)} |")
    lines.append(f"| Train split | {_cell(d.train_split)} |")
    if d.eval_split:
        lines.append(f"| Evaluation split | {_cell(d.eval_split)} |")
    elif d.eval_fraction:
        lines.append(f"| Evaluation | {d.eval_fraction:g} of the train split, seed {t.seed} |")
    if d.max_samples:
        lines.append(f"| Training examples | at most {d.max_samples} |")
    lines += ["", "## Training", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    lines += ["", "## Evaluation", ""]
    if scores:
        lines += ["| Metric | Before | After | Change |", "|---|---|---|---|"]
        for metric, stages in scores.items():
            before, after = _score(stages.get("before")), _score(stages.get("after"))
            change = "-" if before is None or after is None else f"{after - before:+.4g}"
            arrow = " (lower is better)" if metric in LOWER_IS_BETTER else ""
            lines.append(f"| {_cell(metric)}{arrow} | {_fmt(before)} | {_fmt(after)} | {change} |")
        gates = spec.evaluation.gates
        if gates:
            lines += ["", "Gates: " + ", ".join(
                f"{m} {'≤' if m in LOWER_IS_BETTER else '≥'} {v:g}" for m, v in gates.items()
            ) + "."]  # fmt: skip
    else:
        lines.append("No evaluation was run.")
    lines += ["", "## Usage", "", "```python"]
    repo = spec.output.hub.repo if spec.output.hub else "<repo>"
    auto = "AutoModelForCausalLM" if spec.model.task == CAUSAL_LM else (
        "AutoModelForSequenceClassification"
    )  # fmt: skip
    if artifact == "adapter":
        lines += [
            "from peft import PeftModel",
            f"from transformers import {auto}",
            "",
            f'base = {auto}.from_pretrained("{base_id or "<base model>"}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
        ]
    else:
        lines += [
            f"from transformers import {auto}",
            "",
            f'model = {auto}.from_pretrained("{repo}")',
        ]
    lines += ["```", ""]
    return "\n".join(lines)
