"""Serving a tuned model: the one model folder a server loads, and the server's command.

`transformers serve` loads one model by name, so an adapter is merged onto its base first
(peft's `merge_and_unload`, as `output.hub.merge` does at push time) and saved as a plain model.
vLLM and TGI load the base themselves and the adapter beside it, so for them the adapter is only
downloaded (`merge=False`). Either way the folder sits at `<root>/<served name>`, where the served
name is the output repo id: run from `<root>`, `transformers serve <repo id>` finds the local folder
(from_pretrained tries a path before the Hub), and clients send that id as `model`.

A tokenizer without a chat template (a base model trained on plain text) gets a plain one, the
messages' contents one per line, so that chat completions work at all; a model with its own
template keeps it.

Used by the serving pod's init container (`finetune serve-prepare`, exact revision from the Hub)
and by local mode (`finetune serve`, the local run's output folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from finetune_api import pod

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
# The messages' contents, one per line: what a model trained on plain text can continue.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}{% endif %}"
)


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def model_dir(root: Path, served_name: str) -> Path:
    """Where the served model lives under `root`: the served name as a relative path."""
    return root / served_name


def download(repo: str, revision: str, token: str | None) -> Path:
    """Exactly `revision` of `repo` (the commit the job pushed), from HF_ENDPOINT."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, token=token))


def _base_location(artifact: Path, base: str | None) -> tuple[str, str | None]:
    """The base an adapter was trained on: the job's model.source (hf:// or file://) and its
    revision, else what the adapter's own config names."""
    import json

    if base:
        location = base.removeprefix("hf://").removeprefix("file://")
        return location, None
    config = json.loads((artifact / ADAPTER_CONFIG).read_text())
    return str(config["base_model_name_or_path"]), config.get("revision")


def merge(artifact: Path, out: Path, base: str | None, base_revision: str | None) -> None:
    """The adapter in `artifact` merged onto its base, saved to `out` as a plain model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    location, adapter_revision = _base_location(artifact, base)
    revision = base_revision or adapter_revision
    # The model's own read token, else the push token (finetune_trainer.sources.read_token).
    token = os.environ.get(pod.MODEL_TOKEN_ENV) or os.environ.get(pod.HF_TOKEN_ENV) or None
    model = AutoModelForCausalLM.from_pretrained(
        location, revision=revision, token=token, dtype=torch.float32
    )
    merged = PeftModel.from_pretrained(model, str(artifact)).merge_and_unload()
    merged.save_pretrained(out)


def _copy(src: Path, out: Path) -> None:
    # Hub snapshots are symlinks into the blob cache: copy the files, not the links.
    shutil.copytree(
        src, out, symlinks=False, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*")
    )


def ensure_chat_template(src: Path, out: Path) -> bool:
    """Save `src`'s tokenizer to `out`, with PLAIN_CHAT_TEMPLATE when it has none; whether the
    plain template was added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    added = not tokenizer.chat_template
    if added:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return added


def prepare(
    artifact: Path,
    out: Path,
    *,
    merge_adapter: bool = True,
    base: str | None = None,
    base_revision: str | None = None,
) -> Path:
    """Make `out` the folder a server loads from the pushed (or local) `artifact` folder.

    An adapter is merged onto `base` (at `base_revision`) when `merge_adapter`, else kept as an
    adapter for a server that applies it itself. A merged or full model is copied as it is.
    """
    out.mkdir(parents=True, exist_ok=True)
    if is_adapter(artifact) and merge_adapter:
        log.info("merging the adapter in %s onto its base", artifact)
        merge(artifact, out, base, base_revision)
    else:
        _copy(artifact, out)
    tokenizer_files = ("tokenizer_config.json", "tokenizer.json")
    has_tokenizer = any((artifact / f).is_file() for f in tokenizer_files)
    if has_tokenizer and ensure_chat_template(artifact, out):
        log.info("the tokenizer has no chat template: serving with a plain one")
    return out


def transformers_serve_command(served_name: str, host: str, port: int) -> list[str]:
    """`transformers serve` pinned to the one prepared model (run from its root folder), on CPU
    unless a GPU is there ("auto")."""
    return [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
    ]
