"""The model card's front matter parses as the Hub parses it; the body has the tables."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from finetune_api.metrics import METRICS
from finetune_api.v1alpha1 import FineTuneJob
from finetune_trainer.model_card import render_model_card


def make_job(**spec: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
        "dataset": {"source": "hf://fancyzhx/ag_news", "evalSplit": "test"},
        "peft": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        "training": {"maxSteps": 50, "learningRate": 1e-4, "batchSizePerDevice": 2},
        "evaluation": {"metrics": ["perplexity"], "gates": {"perplexity": 30}},
        "output": {"hub": {"repo": "my-org/smollm2-news-lora"}},
        "resources": {"nodes": 2},
    }
    base.update(spec)
    return FineTuneJob.model_validate(
        {"metadata": {"name": "smollm2-news", "namespace": "ml"}, "spec": base}
    )


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_causal_lm_adapter_card_round_trips() -> None:
    job = make_job()
    card = render_model_card(job, {"perplexity": {"before": 40.0, "after": 21.5}}, "adapter")
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft"
    assert meta["datasets"] == ["fancyzhx/ag_news"]
    assert {"finetune-operator", "lora", "text-generation"} <= set(meta["tags"])

    model_name, results = model_index_to_eval_results(meta["model-index"])
    assert model_name == "smollm2-news-lora"
    assert len(results) == 1
    r = results[0]
    assert (r.task_type, r.dataset_type, r.dataset_name) == (
        "text-generation",
        "fancyzhx/ag_news",
        "fancyzhx/ag_news",
    )
    assert (r.metric_type, r.metric_value, r.metric_name) == ("perplexity", 21.5, "Perplexity")
    assert r.dataset_split == "test"

    parsed = ModelCard(card)
    assert parsed.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert parsed.data.eval_results[0].metric_value == 21.5
    # ModelCardData round trip: what the Hub library writes back is what we wrote.
    again = ModelCardData(**meta).to_dict()
    assert again["model-index"] == meta["model-index"]


def test_body_tables() -> None:
    card = render_model_card(make_job(), {"perplexity": {"before": 40.0, "after": 21.5}}, "adapter")
    body = card.split("---\n", 2)[2]
    assert "LoRA adapter" in body
    assert "| LoRA r / alpha / dropout | 4 / 8 / 0.05 |" in body
    assert "| Target modules | q_proj, v_proj |" in body
    assert "| PEFT method | lora |" in body
    assert "| Learning rate | 0.0001 (linear) |" in body
    assert "| Warm-up | 0 steps |" in body
    assert "| Global batch size | 4 |" in body  # 2 per device x 2 nodes
    assert "| perplexity (lower is better) | 40 | 21.5 | -18.5 |" in body
    assert "perplexity ≤ 30" in body
    assert "PeftModel.from_pretrained" in body
    # Each built-in score says what it measures, in the contract's words.
    assert f"- perplexity: {METRICS['perplexity'].description}." in body
    # The schedule and the LoRA variants (DoRA, the rank-stabilized scaling), where named.
    tuned = make_job(
        peft={"r": 4, "alpha": 8, "useRslora": True, "useDora": True},
        training={"lrSchedulerType": "cosine", "warmupRatio": 0.03, "learningRate": 1e-4},
    )
    tuned_body = render_model_card(tuned, {}, "adapter").split("---\n", 2)[2]
    assert "| PEFT method | lora (DoRA, rsLoRA) |" in tuned_body
    assert (
        "| Learning rate | 0.0001 (cosine) |" in tuned_body
        and "| Warm-up | 0.03 of steps |" in tuned_body
    )


def test_classification_merged_and_local_sources() -> None:
    job = make_job(
        model={
            "source": "file:///models/minilm",
            "task": "sequence-classification",
            "numLabels": 2,
        },
        dataset={"source": "file:///data/reviews.csv", "evalFraction": 0.1},
        evaluation={"metrics": ["accuracy", "f1"], "gates": {"accuracy": 0.7}},
    )
    card = render_model_card(
        job,
        {"accuracy": {"before": 0.48, "after": 0.79}, "f1": {"before": 0.3, "after": None}},
        "merged",
    )
    meta = front_matter(card)
    assert "base_model" not in meta
    assert "datasets" not in meta
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-classification"
    _, results = model_index_to_eval_results(meta["model-index"])
    # Only measured `after` scores become results.
    assert [(r.metric_type, r.metric_value) for r in results] == [("accuracy", 0.79)]
    assert results[0].task_type == "text-classification"
    assert results[0].dataset_name == "reviews.csv"
    body = card.split("---\n", 2)[2]
    assert "| f1 | 0.3 | - | - |" in body
    assert "0.1 of the train split" in body
    assert "AutoModelForSequenceClassification" in body


def test_no_scores_no_model_index() -> None:
    card = render_model_card(make_job(), {}, "adapter")
    assert "model-index" not in front_matter(card)
    assert "No evaluation was run." in card


def test_bad_artifact_rejected() -> None:
    with pytest.raises(ValueError):
        render_model_card(make_job(), {}, "weights")


def test_license_is_the_spec_s_else_the_base_model_s() -> None:
    scores = {"perplexity": {"before": 40.0, "after": 21.5}}
    other = {"license": "other", "license_name": "llama3", "license_link": "https://l.example"}
    # Unset, and the base has none: no license line at all (the Hub shows "unknown").
    assert "license" not in front_matter(render_model_card(make_job(), scores, "adapter"))
    meta = front_matter(render_model_card(make_job(), scores, "adapter", other))
    assert {k: meta[k] for k in other} == other
    assert (
        ModelCard(render_model_card(make_job(), scores, "adapter", other)).data.license == "other"
    )
    # A name without a license is no license.
    assert "license_name" not in front_matter(
        render_model_card(make_job(), scores, "adapter", {"license_name": "x"})
    )
    hub = {"repo": "my-org/smollm2-news-lora", "license": "apache-2.0"}
    meta = front_matter(render_model_card(make_job(output={"hub": hub}), scores, "merged", other))
    assert meta["license"] == "apache-2.0" and "license_name" not in meta


def test_card_names_the_commits_the_sources_were_loaded_at() -> None:
    from finetune_trainer.fetch import Commits

    job = make_job(
        model={"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
        dataset={"source": "hf://fancyzhx/ag_news", "evalSplit": "test", "revision": "v1.0"},
    )
    commits = Commits(model="a" * 40, dataset="b" * 40)
    card = render_model_card(job, {}, "adapter", commits=commits)
    meta = front_matter(card)
    # The Hub's card metadata has ids only: a revision there would break the model tree.
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["datasets"] == ["fancyzhx/ag_news"]
    body = card.split("---\n", 2)[2]
    assert f"at revision `main` (commit `{'a' * 40}`)" in body
    assert f"`hf://fancyzhx/ag_news` at revision `v1.0` (commit `{'b' * 40}`)" in body
    # No revision asked for: the commit alone; none resolved (before this, or offline): the
    # revision alone.
    unpinned = make_job()
    body = render_model_card(unpinned, {}, "adapter", commits=Commits(model="c" * 40))
    assert f"SmolLM2-135M-Instruct) at commit `{'c' * 40}`" in body
    assert "ag_news` by" in body
    assert "at revision `main`," in render_model_card(job, {}, "adapter").split("---\n", 2)[2]
