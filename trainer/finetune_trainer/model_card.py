"""The Hub model card (README.md) of a fine-tuning result.

The YAML front matter is built with huggingface_hub's `ModelCardData`, so that `model-index` has
exactly the shape the Hub (and `metadata_load`/`ModelCard.load`) parses: one result per metric
with its `after` score. The body is plain Markdown. What differs per task (pipeline tag, library,
usage, task settings) comes from the task module's `card()`; score names, directions and
descriptions from the contract's vocabulary (`finetune_api.metrics`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import cast, get_args

from finetune_api.metrics import builtin_metric, display_name, lower_is_better
from finetune_api.result import Sample
from finetune_api.v1alpha1 import FineTuneJob, PeftSpec
from finetune_trainer.fetch import NO_COMMITS, Commits
from finetune_trainer.tasks import Artifact, CardInfo, task_for

__all__ = [
    "LICENSE_KEYS",
    "card_license",
    "card_metadata",
    "render_model_card",
    "source_id",
    "transformers_usage",
]

_ARTIFACTS: tuple[str, ...] = get_args(Artifact)
_METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "none": "full"}
# The card metadata that says the license: a Hub license id, and for `other` its name and link.
LICENSE_KEYS = ("license", "license_name", "license_link")


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


def transformers_usage(auto_class: str, base_id: str | None, repo: str, artifact: str) -> str:
    """Python that loads a pushed transformers artifact with `auto_class` (and peft for an
    adapter), for a task's `CardInfo.usage`."""
    if artifact == "adapter":
        lines = [
            "from peft import PeftModel",
            f"from transformers import {auto_class}",
            "",
            f'base = {auto_class}.from_pretrained("{base_id or "<base model>"}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
        ]
    else:
        lines = [
            f"from transformers import {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{repo}")',
        ]
    return "\n".join(lines)


def _repo(job: FineTuneJob) -> str:
    return job.spec.output.hub.repo if job.spec.output.hub else "<repo>"


def _card_info(job: FineTuneJob, artifact: str) -> CardInfo:
    if artifact not in _ARTIFACTS:
        raise ValueError(f"artifact must be one of {', '.join(_ARTIFACTS)}, not {artifact!r}")
    return task_for(job.spec).card(cast(Artifact, artifact), _repo(job))


def card_license(job: FineTuneJob, base_license: Mapping[str, str] | None = None) -> dict[str, str]:
    """The card's license metadata: output.hub.license when set, else the base model's
    (`license`, and `license_name`/`license_link` for `other`), else none."""
    hub = job.spec.output.hub
    if hub is not None and hub.license:
        return {"license": hub.license}
    chosen = {k: base_license[k] for k in LICENSE_KEYS if (base_license or {}).get(k)}
    return chosen if "license" in chosen else {}


def card_metadata(
    job: FineTuneJob,
    scores: Mapping[str, Mapping[str, float | None]],
    artifact: str,
    base_license: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The front matter as a dict (what `ModelCardData.to_dict()` gives). `base_license` is
    the base model's license metadata (see card_license)."""
    return _front_matter(job, scores, artifact, _card_info(job, artifact), base_license)


def _front_matter(
    job: FineTuneJob,
    scores: Mapping[str, Mapping[str, float | None]],
    artifact: str,
    info: CardInfo,
    base_license: Mapping[str, str] | None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    from huggingface_hub import EvalResult, ModelCardData

    spec = job.spec
    task_type = info.pipeline_tag
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
                task_name=info.task_name,
                # model-index wants a dataset type; for a file:// dataset there is no Hub id, and
                # the folder's name is the best reference the card can give.
                dataset_type=dataset or dataset_name,
                dataset_name=dataset_name,
                dataset_config=spec.dataset.config,
                dataset_split=spec.dataset.eval_split,
                metric_type=metric,
                metric_value=after,
                metric_name=display_name(metric),
            )
        )

    tags = ["finetune-operator", task_type]
    method = spec.peft.method
    if method != "none":
        tags += ["lora", method] if method != "lora" else ["lora"]
    if artifact == "merged":
        tags.append("merged")
    tags += info.tags
    data = ModelCardData(
        base_model=base,
        # The Hub infers the relation, but an explicit one keeps the model tree right for merges.
        base_model_relation=(
            None if base is None else "adapter" if artifact == "adapter" else "finetune"
        ),
        library_name=info.library_name,
        pipeline_tag=task_type,
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset] if dataset else None,
        metrics=list(scores) or None,
        model_name=model_name,
        eval_results=eval_results or None,
        **card_license(job, base_license),
        **(extra or {}),
    )
    return data.to_dict()


def render_model_card(
    job: FineTuneJob,
    scores: Mapping[str, Mapping[str, float | None]],
    artifact: str,
    base_license: Mapping[str, str] | None = None,
    artifact_dir: Path | None = None,
    samples: Sequence[Sample] = (),
    commits: Commits = NO_COMMITS,
) -> str:
    """README.md text: YAML front matter (base_model, license, library_name, tags, datasets,
    model-index) and a body with the base model, dataset, PEFT and training settings, and
    before/after scores.

    `scores` maps metric -> {"before": x, "after": y} (either may be None); `artifact` is
    adapter, merged or full; `base_license` is the base model's license metadata, used when
    output.hub.license is unset; `artifact_dir`, the folder being pushed, lets the task describe
    what else it saved there (`Task.card_extras`, e.g. sample images); `samples` are evaluation
    prompts with the answers generated before and after training (a Samples section when there
    are any); `commits` are the commits the hf:// model, dataset and VAE were loaded at (the
    Hub's card metadata has no place for them: `base_model` and `datasets` are repo ids, so the
    body says them).
    """
    import yaml

    info = _card_info(job, artifact)
    extra, sections = (
        task_for(job.spec).card_extras(artifact_dir) if artifact_dir is not None else ({}, [])
    )
    meta = _front_matter(job, scores, artifact, info, base_license, extra)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    spec = job.spec
    title = spec.output.hub.repo if spec.output.hub else job.metadata.name
    base_id = source_id(spec.model.source)
    base_ref = _source_ref(spec.model.source)
    base_ref += _at(spec.model.revision if base_id else None, commits.model)
    data_ref = f"`{_cell(spec.dataset.source)}`"
    data_id = source_id(spec.dataset.source)
    data_ref += _at(spec.dataset.revision if data_id else None, commits.dataset)
    if spec.model.vae is not None:  # text-to-image: a VAE of its own in place of the base's
        base_ref += f" with the VAE {_source_ref(spec.model.vae.source)}"
        base_ref += _at(
            spec.model.vae.revision if source_id(spec.model.vae.source) else None, commits.vae
        )
    kind = {
        "adapter": f"a {_METHOD_NAMES[spec.peft.method]} adapter for",
        "merged": f"{_METHOD_NAMES[spec.peft.method]}-fine-tuned and merged into",
        "full": "fully fine-tuned from",
    }[artifact]
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {_cell(title)}",
        "",
        f"This model is {kind} {base_ref}, trained on {data_ref} by "
        "finetune-operator (FineTuneJob "
        f"`{job.metadata.namespace}/{job.metadata.name}`).",
        "",
        *_data_section(job),
        "",
        *_training_section(job, artifact, info),
        "",
        *_evaluation_section(job, scores),
        "",
        *([*sections, ""] if sections else []),
        *_samples_section(samples),
        "## Usage",
        "",
        "```python",
        info.usage,
        "```",
        "",
    ]
    return "\n".join(lines)


def _source_ref(source: str) -> str:
    """A model source as the card names it: a link to its Hub page, or its path."""
    repo = source_id(source)
    return f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{source}`"


def _at(revision: str | None, commit: str | None) -> str:
    """' at revision `main` (commit `abc…`)', or the part of it that is known."""
    if revision and commit and revision != commit:
        return f" at revision `{_cell(revision)}` (commit `{commit}`)"
    if commit or revision:
        return f" at {'commit' if commit else 'revision'} `{_cell(commit or revision)}`"
    return ""


def _fenced(text: str) -> list[str]:
    """`text` in a code fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _samples_section(samples: Sequence[Sample]) -> list[str]:
    """Evaluation prompts with the reference and the greedy answers before and after training."""
    if not samples:
        return []
    lines = [
        "## Samples",
        "",
        "Greedy answers to the first evaluation prompts, before and after training.",
        "",
    ]
    for i, sample in enumerate(samples, 1):
        lines += [f"### Sample {i}", "", "Prompt:", "", *_fenced(sample.prompt), ""]
        for title, text in (
            ("Reference", sample.reference),
            ("Before training", sample.before),
            ("After training", sample.after),
        ):
            if text is not None:
                lines += [f"{title}:", "", *_fenced(text), ""]
    return lines


def _data_section(job: FineTuneJob) -> list[str]:
    d, seed = job.spec.dataset, job.spec.training.seed
    lines = ["## Data", "", "| | |", "|---|---|", f"| Dataset | `{_cell(d.source)}` |"]
    if d.config:
        lines.append(f"| Config | {_cell(d.config)} |")
    lines.append(f"| Train split | {_cell(d.train_split)} |")
    if d.eval_split:
        lines.append(f"| Evaluation split | {_cell(d.eval_split)} |")
    elif d.eval_fraction:
        lines.append(f"| Evaluation | {d.eval_fraction:g} of the train split, seed {seed} |")
    if d.max_samples:
        lines.append(f"| Training examples | at most {d.max_samples} |")
    return lines


def _peft_method(peft: PeftSpec) -> str:
    """The method, with the LoRA variants it trains: "lora (DoRA, rsLoRA)"."""
    variants = [name for name, on in (("DoRA", peft.use_dora), ("rsLoRA", peft.use_rslora)) if on]
    return f"{peft.method} ({', '.join(variants)})" if variants else peft.method


def _training_section(job: FineTuneJob, artifact: str, info: CardInfo) -> list[str]:
    spec = job.spec
    t, p = spec.training, spec.peft
    world = spec.resources.nodes * spec.resources.processes_per_node
    rows: list[tuple[str, object]] = [
        ("Task", f"{spec.model.task} ({info.pipeline_tag})"),
        ("Artifact", artifact),
        ("PEFT method", _peft_method(p)),
    ]
    if p.method != "none":
        rows += [
            ("LoRA r / alpha / dropout", f"{p.r} / {p.alpha} / {p.dropout}"),
            ("Target modules", ", ".join(p.target_modules) or "all linear layers"),
        ]
    rows += [
        ("Epochs", t.epochs if t.max_steps is None else f"max {t.max_steps} steps"),
        ("Learning rate", f"{t.learning_rate:g} ({t.lr_scheduler_type})"),
        (
            "Warm-up",
            f"{t.warmup_steps} steps" if t.warmup_ratio is None else f"{t.warmup_ratio:g} of steps",
        ),
        ("Weight decay", t.weight_decay),
        ("Batch size per device", t.batch_size_per_device),
        ("Gradient accumulation", t.gradient_accumulation_steps),
        ("Processes", world),
        ("Global batch size", t.batch_size_per_device * t.gradient_accumulation_steps * world),
        ("Max sequence length", t.max_seq_length),
        ("Precision", t.precision),
        ("Seed", t.seed),
        *info.settings,
    ]
    header = ["## Training", "", "| Setting | Value |", "|---|---|"]
    return header + [f"| {name} | {_cell(value)} |" for name, value in rows]


def _evaluation_section(
    job: FineTuneJob, scores: Mapping[str, Mapping[str, float | None]]
) -> list[str]:
    if not scores:
        return ["## Evaluation", "", "No evaluation was run."]
    lines = ["## Evaluation", "", "| Metric | Before | After | Change |", "|---|---|---|---|"]
    for metric, stages in scores.items():
        before, after = _score(stages.get("before")), _score(stages.get("after"))
        change = "-" if before is None or after is None else f"{after - before:+.4g}"
        arrow = " (lower is better)" if lower_is_better(metric) else ""
        lines.append(f"| {_cell(metric)}{arrow} | {_fmt(before)} | {_fmt(after)} | {change} |")
    gates = job.spec.evaluation.gates
    if gates:
        lines += ["", "Gates: " + ", ".join(
            f"{m} {'≤' if lower_is_better(m) else '≥'} {v:g}" for m, v in gates.items()
        ) + "."]  # fmt: skip
    # What each built-in score measures; a Hub metric's own card says what it does.
    defined = [found for m in scores if (found := builtin_metric(m)) is not None]
    if defined:
        lines += ["", *(f"- {m.name}: {m.description}." for m in defined)]
    return lines
