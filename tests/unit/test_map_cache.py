"""The datasets cache of the trainer's maps: an edit of the trainer's code tokenizes again.

Each run is a real process over a real datasets cache, as local mode's runs are: a copy of the
trainer package is imported, tokenizes a jsonl dataset twice, and prints each time its first row
and the cache file the rows came from. Between runs the copy's `_tokenize_text` (a module-level
helper that the map's function calls, which datasets' own hash of the function names but does not
read) is edited.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import finetune_trainer
from finetune_trainer.map_cache import code_digest, map_fingerprint
from finetune_trainer.testing.tiny import sentences, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
TOKENIZE = r"""
import json, sys
from datasets import load_dataset
from transformers import AutoTokenizer
from finetune_api import parse_manifest
from finetune_trainer.tasks.causal_lm import tokenize

data, tokenizer_dir = sys.argv[1:]
job = {"metadata": {"name": "cache"}, "spec": {"model": {"source": "file:///m"},
       "dataset": {"source": "file://" + data}, "training": {"maxSeqLength": 64}}}
spec = parse_manifest(job).spec
ds = load_dataset("json", data_files={"train": data})["train"]
# Twice, with a tokenizer loaded afresh each time: the second map of the same input, code and
# spec reads the file the first one wrote.
runs = [
    tokenize(ds, spec, AutoTokenizer.from_pretrained(tokenizer_dir), pack=False) for _ in range(2)
]
print(json.dumps([{"ids": r[0]["input_ids"], "files": [f["filename"] for f in r.cache_files]}
                  for r in runs]))
"""
# The edit: every text becomes its first token (and the eos the helper appends).
HELPER_LINE = '    ids = tokenizer(text, add_special_tokens=True)["input_ids"]\n'
EDITED_LINE = HELPER_LINE + "    ids = ids[:1]\n"


def _run(code: Path, cache: Path, data: Path, tokenizer: Path) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(code), str(REPO / "api")]),
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", TOKENIZE, str(data), str(tokenizer)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_edit_of_the_trainer_tokenizes_again_and_an_unchanged_rerun_reuses_the_cache(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    shutil.copytree(
        Path(finetune_trainer.__file__).parent,
        code / "finetune_trainer",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(40, 3)))
    tokenizer = tmp_path / "tokenizer"
    train_tokenizer(sentences(200, 0), vocab_size=300).save_pretrained(tokenizer)
    cache = tmp_path / "cache"

    first, again = _run(code, cache, data, tokenizer)
    assert len(first["ids"]) > 2 and first["files"], first
    assert again == first, "an unchanged rerun must read the cache the first run wrote"

    helper = code / "finetune_trainer" / "tasks" / "causal_lm.py"
    source = helper.read_text()
    assert source.count(HELPER_LINE) == 1, "the test's edit no longer applies: update HELPER_LINE"
    helper.write_text(source.replace(HELPER_LINE, EDITED_LINE))
    edited = _run(code, cache, data, tokenizer)[0]
    assert edited["ids"] == [*first["ids"][:1], first["ids"][-1]], (first, edited)
    assert edited["files"] != first["files"]


@pytest.mark.parametrize("step", ["tokenize", "pack"])
def test_map_fingerprints_differ_by_step_and_shape_and_are_valid_cache_names(step: str) -> None:
    from datasets import Dataset

    ds = Dataset.from_dict({"text": ["a b", "c d"]})
    one = map_fingerprint(ds, step, {"textField": "text"}, 64)
    assert one == map_fingerprint(ds, step, {"textField": "text"}, 64)
    assert one != map_fingerprint(ds, step, {"textField": "body"}, 64)
    assert one != map_fingerprint(ds, step, {"textField": "text"}, 128)
    assert one != map_fingerprint(ds, "other", {"textField": "text"}, 64)
    assert one.isalnum() and len(one) <= 64
    assert len(code_digest()) == 64
