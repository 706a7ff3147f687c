"""Chat data and evaluation by generation, without a gang: the schema's fields and rules, the
row checks, the assistant-only loss mask, the generation prompts, left padding, greedy answers
and their scores in one process, the text scorers, and the samples' bounds in the result and the
model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from finetune_api import ManifestError, parse_manifest
from finetune_api.metrics import GENERATION_METRICS, lower_is_better
from finetune_api.result import MAX_MESSAGE_BYTES, MESSAGE_SAMPLE_CHARS, Sample, TrainerResult
from finetune_trainer import chat
from finetune_trainer.generation import left_pad
from finetune_trainer.model_card import render_model_card
from finetune_trainer.scoring import ScorerUnavailable, load_scorer
from finetune_trainer.tasks.causal_lm import (
    IGNORE_INDEX,
    CausalLM,
    chat_prompt,
    generation_rows,
    tokenize,
    tokenize_chat,
)
from finetune_trainer.testing.tiny import save_tiny_model, sentences, train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "answer in colours"},
    {"role": "user", "content": "red cat"},
    {"role": "assistant", "content": "blue dog"},
    {"role": "user", "content": "sun"},
    {"role": "assistant", "content": "moon"},
]
# ChatML without {% generation %} blocks: the shape of most published templates.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": "file:///m"},
        "dataset": {"source": "file:///d.jsonl"},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value}
    return {"metadata": {"name": "chat"}, "spec": base}


# ---- schema ------------------------------------------------------------------------------------


def test_chat_and_generation_fields_default_and_parse() -> None:
    spec = parse_manifest(
        _job(dataset={"messagesField": "messages"}, evaluation={"metrics": ["chrf", "rouge"]})
    ).spec
    assert spec.dataset.messages_field == "messages"
    assert (spec.evaluation.max_new_tokens, spec.evaluation.samples) == (64, 3)
    assert set(GENERATION_METRICS) == {"exact_match", "rouge", "bleu", "chrf"}
    assert not any(lower_is_better(m) for m in GENERATION_METRICS)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"dataset": {"messagesField": "m", "promptField": "q", "responseField": "a"}},
            "spec.dataset.messagesField",
        ),
        ({"evaluation": {"metrics": ["exact_match"]}}, "spec.evaluation.metrics"),
        (
            {
                "model": {"task": "sequence-classification", "numLabels": 2},
                "dataset": {"messagesField": "m"},
                "evaluation": {"metrics": ["chrf"]},
            },
            "spec.evaluation.metrics",
        ),
        ({"evaluation": {"maxNewTokens": 0}}, "spec.evaluation.maxNewTokens"),
        ({"evaluation": {"maxNewTokens": 2049}}, "spec.evaluation.maxNewTokens"),
        ({"evaluation": {"samples": 17}}, "spec.evaluation.samples"),
    ],
)
def test_bad_chat_and_generation_specs_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_job(**changes))
    assert field in {e.path for e in err.value.errors}, err.value


def test_the_prompt_rule_message_names_every_generation_metric_from_the_vocabulary() -> None:
    """The rule's message (what `kubectl apply` prints; the CRD is generated from the rule) is
    spelled from GENERATION_METRICS, so a metric added there is named in it."""
    from finetune_api.v1alpha1 import FineTuneJobSpec

    with pytest.raises(ManifestError) as err:
        parse_manifest(_job(evaluation={"metrics": ["bleu"]}))
    message = next(e.message for e in err.value.errors if e.path == "spec.evaluation.metrics")
    named = message.split(" score answers generated for prompts")[0]
    assert named == ", ".join(GENERATION_METRICS[:-1]) + " and " + GENERATION_METRICS[-1]
    rules = [r for r in FineTuneJobSpec.__rules__ if "score answers generated" in r.message]
    assert [r.message for r in rules] == [message]


def test_generation_metrics_with_prompt_response_data_are_valid() -> None:
    spec = _job(
        dataset={"promptField": "q", "responseField": "a"},
        evaluation={"metrics": ["exact_match", "perplexity"], "gates": {"exact_match": 0.5}},
    )
    assert parse_manifest(spec).spec.evaluation.gates == {"exact_match": 0.5}


# ---- rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ("hello", "expected a non-empty list"),
        ([], "expected a non-empty list"),
        (["hi"], "message 0 is str"),
        ([{"role": "bot", "content": "x"}], "role 'bot'; roles are system, user, assistant"),
        ([{"role": "user", "content": 3}], "content int"),
        ([{"role": "user"}], "content NoneType"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "only the first message",
        ),
        ([{"role": "user", "content": "a"}], "must end with an assistant turn"),
        (
            [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}],
            "no user message",
        ),
    ],
)
def test_message_errors_say_what_is_wrong(row: Any, fragment: str) -> None:
    error = chat.message_error(row)
    assert error is not None and fragment in error


def test_check_rows_names_the_rows_and_counts_the_rest() -> None:
    bad = [{"role": "user", "content": "x"}]
    rows = [CONVERSATION, bad, CONVERSATION, *[bad] * 4]
    assert chat.message_error(CONVERSATION) is None
    with pytest.raises(chat.InvalidMessages) as err:
        chat.check_rows(rows, "messages", "train")
    text = str(err.value)
    assert "messagesField 'messages' of split 'train'" in text
    assert "row 1:" in text and "row 3:" in text and "row 4:" in text and "row 5:" not in text
    assert "(and 2 more rows)" in text


# ---- tokenizers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [*sentences(200, 0), "answer in colours", "red cat blue dog sun moon"]
    return save_tiny_model(
        tmp_path_factory.mktemp("chat") / "llama",
        texts,
        vocab_size=300,
        hidden_size=16,
        intermediate_size=32,
        layers=1,
        heads=2,
        max_positions=128,
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_test_tokenizer_has_a_chat_template_that_survives_a_save(tokenizer: Any) -> None:
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert (
        text == "<|system|>\nanswer in colours</s><|user|>\nred cat</s><|assistant|>\nblue dog</s>"
    )


def _scored_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100])


def test_loss_counts_assistant_turns_only(tokenizer: Any) -> None:
    ids, labels = tokenize_chat(tokenizer, CONVERSATION)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    # Both assistant turns with their end-of-turn token, nothing of the system or user turns.
    assert _scored_text(tokenizer, ids, labels) == "blue dog</s>moon</s>"


def test_mask_agrees_with_transformers_generation_blocks(tokenizer: Any) -> None:
    ids, labels = tokenize_chat(tokenizer, CONVERSATION)
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == [int(label != IGNORE_INDEX) for label in labels]


def test_a_template_without_generation_blocks_masks_the_same_turns(tokenizer: Any) -> None:
    chatml = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chatml.chat_template = CHATML
    ids, labels = tokenize_chat(chatml, CONVERSATION)
    assert _scored_text(chatml, ids, labels) == "blue dog<|im_end|>\nmoon<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer: Any) -> None:
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Renders only the last message: a conversation's start is not the start of the whole.
    rewriting.chat_template = "{{ messages[-1]['content'] }}"
    with pytest.raises(chat.ChatTemplateError, match="cannot be told apart"):
        tokenize_chat(rewriting, CONVERSATION)
    rewriting.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match="has none"):
        tokenize_chat(rewriting, CONVERSATION)


def test_a_token_across_the_turn_start_is_the_answers_and_generation_starts_before_it() -> None:
    # Code answers start with an indent, and byte-level BPE merges the generation prompt's
    # newline with it ("\n   " is one token): training must score that token, and the prompt to
    # generate from must stop before it, or the model is asked to continue a sequence it never
    # saw (and ends the answer at once).
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 50 + sentences(50, 0), 300)
    conv = [
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "    return x"},
    ]
    ids, labels = tokenize_chat(tok, conv)
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(ids[first]).startswith("Ċ")
    assert tok.decode(ids[first:]) == "\n    return x</s>"
    prompt, prefix = chat_prompt(tok, conv)
    assert prompt == ids[:first] and prefix == "\n"


def _spec(model_dir: Path, data: dict[str, Any], **evaluation: Any) -> Any:
    return parse_manifest(
        _job(
            model={"source": f"file://{model_dir}"},
            dataset=data,
            training={"maxSeqLength": 96, "batchSizePerDevice": 2},
            evaluation=evaluation,
        )
    ).spec


def test_chat_rows_tokenize_and_the_prompt_is_the_conversation_before_the_answer(
    model_dir: Path, tokenizer: Any
) -> None:
    spec = _spec(model_dir, {"messagesField": "messages"}, metrics=["exact_match"])
    ds = Dataset.from_dict({"messages": [CONVERSATION]})
    rows = tokenize(ds, spec, tokenizer, pack=False)
    assert _scored_text(tokenizer, rows[0]["input_ids"], rows[0]["labels"]) == (
        "blue dog</s>moon</s>"
    )
    prompts = generation_rows(ds, spec, tokenizer)
    assert prompts[0]["reference"] == "moon" and prompts[0]["prompt"] == "sun"
    assert tokenizer.decode(prompts[0]["prompt_ids"]).endswith("<|user|>\nsun</s><|assistant|>\n")


def test_prompt_response_rows_give_generation_prompts_through_the_template(
    model_dir: Path, tokenizer: Any
) -> None:
    spec = _spec(model_dir, {"promptField": "q", "responseField": "a"}, metrics=["chrf"])
    prompts = generation_rows(Dataset.from_dict({"q": ["red"], "a": ["blue"]}), spec, tokenizer)
    assert tokenizer.decode(prompts[0]["prompt_ids"]) == "<|user|>\nred</s><|assistant|>\n"
    assert (prompts[0]["prompt"], prompts[0]["reference"]) == ("red", "blue")


def test_a_bad_row_is_a_dataset_error_naming_it(model_dir: Path) -> None:
    from finetune_trainer.data import DatasetError

    spec = _spec(model_dir, {"messagesField": "messages", "evalFraction": 0.5})
    bad = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]
    train = Dataset.from_dict({"messages": [CONVERSATION, bad]})
    with pytest.raises(DatasetError, match=r"row 1: message 1 has role 'bot'"):
        CausalLM(spec).build_data(train, Dataset.from_dict({"messages": [CONVERSATION]}))


def test_local_data_is_checked_before_anything_runs(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CONVERSATION, bad)))
    job = parse_manifest(_job(dataset={"source": f"file://{data}", "messagesField": "messages"}))
    errors = chat.local_data_errors(job)
    assert [e.path for e in errors] == ["spec.dataset.messagesField"]
    assert "row 1: the last message is 'user'" in errors[0].message
    missing = parse_manifest(_job(dataset={"source": f"file://{data}", "messagesField": "chat"}))
    assert "column 'chat' not in split 'train'" in chat.local_data_errors(missing)[0].message


# ---- generation ----------------------------------------------------------------------------------


def test_left_padding_keeps_every_prompt_flush_right() -> None:
    batch = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_answers_match_one_prompt_at_a_time_and_feed_the_scores(
    model_dir: Path, tokenizer: Any
) -> None:
    from accelerate import Accelerator

    spec = _spec(
        model_dir,
        {"messagesField": "messages"},
        metrics=["exact_match", "chrf", "perplexity"],
        maxNewTokens=5,
        samples=2,
    )
    task = CausalLM(spec)
    convs = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in (("red", "blue"), ("sun moon tree", "cat"), ("apple", "bread milk"))
    ]
    data = task.build_data(
        Dataset.from_dict({"messages": convs * 4}), Dataset.from_dict({"messages": convs})
    )
    assert data.prompts is not None and len(data.prompts) == 3
    accelerator = Accelerator(cpu=True)
    model = task.load_model(data, accelerator.device)
    loader = torch.utils.data.DataLoader(data.evaluation, batch_size=2, collate_fn=data.collate)
    scores = task.evaluate(accelerator, model, loader)
    assert set(scores) == {"exact_match", "chrf", "perplexity"}
    assert 0 <= scores["exact_match"] <= 1 and 0 <= scores["chrf"] <= 100
    # Two samples, as evaluation.samples says, each with the prompt, reference and answer.
    assert [(s.prompt, s.reference) for s in task.generated] == [
        ("red", "blue"),
        ("sun moon tree", "cat"),
    ]
    # Left padding changes nothing: each answer equals the prompt generated alone.
    model.eval()
    for sample, prompt_ids in zip(task.generated, data.prompts["prompt_ids"], strict=False):
        alone = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        expected = tokenizer.decode(alone[0, len(prompt_ids) :], skip_special_tokens=True)
        assert sample.after == expected


def test_generation_is_skipped_for_perplexity_only_jobs(model_dir: Path) -> None:
    spec = _spec(model_dir, {"messagesField": "messages"}, metrics=["perplexity"])
    task = CausalLM(spec)
    data = task.build_data(
        Dataset.from_dict({"messages": [CONVERSATION] * 4}),
        Dataset.from_dict({"messages": [CONVERSATION]}),
    )
    assert not task.generates and data.prompts is None


def test_a_hub_metric_without_prompts_is_unavailable_not_transient(model_dir: Path) -> None:
    spec = _spec(model_dir, {}, metrics=["sacrebleu"])
    task = CausalLM(spec)
    with pytest.raises(ScorerUnavailable, match=r"need prompts: set dataset\.promptField"):
        task.build_data(
            Dataset.from_dict({"text": sentences(8, 0)}),
            Dataset.from_dict({"text": sentences(2, 1)}),
        )


# ---- scorers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "perfect", "none"),
    [("exact_match", 1.0, 0.0), ("rouge", 1.0, 0.0), ("chrf", 100.0, 0.0), ("bleu", 100.0, 0.0)],
)
def test_text_scorers_load_offline_and_order_answers(
    name: str, perfect: float, none: float
) -> None:
    scorer = load_scorer(name)
    refs = ["return sorted(set(l))", "return len(string)"]
    assert scorer.compute(predictions=refs, references=refs)[name] == pytest.approx(perfect)
    partial = scorer.compute(predictions=["return sorted(l)", "x"], references=refs)[name]
    zero = scorer.compute(predictions=["qqq", "zzz"], references=refs)[name]
    assert zero == pytest.approx(none) and partial <= perfect
    if name != "exact_match":
        assert zero < partial < perfect


def test_exact_match_ignores_surrounding_whitespace() -> None:
    scorer = load_scorer("exact_match")
    assert scorer.compute(predictions=[" a\n", "b"], references=["a", "c"]) == {"exact_match": 0.5}


# ---- samples -----------------------------------------------------------------------------------


def _result(samples: list[Sample], message: str = "") -> TrainerResult:
    return TrainerResult(
        status="Succeeded",
        reason="Pushed",
        message=message,
        evaluation={"chrf": {"before": 1.0, "after": 30.0}},
        samples=samples,
    )


def test_samples_are_shortened_in_the_message_and_kept_whole_in_the_result() -> None:
    long = Sample(prompt="p" * 1500, reference="r" * 50, before="b" * 300, after="a" * 10)
    result = _result([long] * 5)
    doc = json.loads(result.to_message())
    assert len(doc["samples"]) == 3
    first = doc["samples"][0]
    assert len(first["prompt"]) == MESSAGE_SAMPLE_CHARS and first["prompt"].endswith("…")
    assert first["reference"] == "r" * 50 and first["after"] == "a" * 10
    assert result.samples[0].prompt == "p" * 1500
    parsed = TrainerResult.parse(result.to_message())
    assert parsed is not None and parsed.samples[0].after == "a" * 10


def test_samples_give_way_to_the_verdict_and_scores_in_4_kib() -> None:
    wide = Sample(prompt="é" * 500, reference="é" * 500, before="é" * 500, after="é" * 500)
    result = _result([wide] * 3, message="m" * 2500)
    text = result.to_message()
    assert len(text.encode()) <= MAX_MESSAGE_BYTES
    doc = json.loads(text)
    assert doc["message"] == "m" * 2500 and doc["evaluation"]["chrf"]["after"] == 30.0
    assert len(doc.get("samples", [])) < 3


def test_samples_scrub_tokens() -> None:
    token = "hf_" + "a" * 30
    text = _result([Sample(prompt=f"use {token}", after="ok")]).to_message()
    assert token not in text and "***" in text


def test_model_card_shows_before_and_after_answers(model_dir: Path) -> None:
    job = parse_manifest(
        _job(
            model={"source": f"file://{model_dir}"},
            dataset={"messagesField": "messages"},
            evaluation={"metrics": ["chrf"]},
            output={"hub": {"repo": "org/chat", "endpoint": "http://hub"}},
        )
    )
    samples = [
        Sample(prompt="def f():\n    ```", reference="return 1", before="zz", after="return 1")
    ]
    card = render_model_card(
        job, {"chrf": {"before": 1.0, "after": 90.0}}, "adapter", None, samples=samples
    )
    section = card[card.index("## Samples") : card.index("## Usage")]
    assert "### Sample 1" in section
    for title, text in (("Before training", "zz"), ("After training", "return 1")):
        assert f"{title}:\n\n```text\n{text}\n```" in section
    # A fence longer than the backticks inside the prompt keeps the markdown intact.
    assert "````text\ndef f():\n    ```\n````" in section
    no_samples = render_model_card(job, {"chrf": {"before": 1.0, "after": 2.0}}, "adapter")
    assert "## Samples" not in no_samples
