"""training.cachedMiniBatchSize (GradCache) on a real gang of `finetune train` ranks: one pod of 2
ranks (DDP over gloo) trains a tiny BERT sentence-transformers model with Matryoshka sizes, once
with each rank's batch of 8 in one pass and once in mini-batches of 2. Without dropout the two are
the same mathematics, so they must take the same steps and push the same adapter; each mini-batch
is embedded again in the backward pass, and the ranks' gradients must still be all-reduced once
per step (every rank ends with the same weights)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close
from trainer_helpers import Gang, deep_update

from finetune_trainer.example_data import write_code_search_splits
from finetune_trainer.testing.embedding import embedding_job, save_tiny_bert

pytestmark = pytest.mark.slow
STEP_LOSS = re.compile(r"step=(\d+)/\d+ loss=([\d.]+)")
STEPS = 6


def test_mini_batches_train_the_same_adapter_as_one_pass_on_two_ranks(
    tmp_path: Path, base_env: dict[str, str]
) -> None:
    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    write_code_search_splits(tmp_path / "pairs")
    gangs = {}
    for name, training in (("plain", {}), ("cached", {"cachedMiniBatchSize": 2})):
        workdir = tmp_path / name
        workdir.mkdir()
        manifest = workdir / "job.yaml"
        doc = embedding_job(model, tmp_path / "pairs", max_steps=STEPS)
        manifest.write_text(yaml.safe_dump(deep_update(doc, {"spec": {"training": training}})))
        gangs[name] = Gang(manifest, workdir, base_env, nodes=1, nproc_per_node=2).start()
    for name, gang in gangs.items():
        assert gang.wait(timeout=600) == [0], (name, gang.log_text()[-4000:])
    plain, cached = gangs["plain"], gangs["cached"]
    losses = {
        name: {int(s): float(v) for s, v in STEP_LOSS.findall(g.logs[0].read_text())}
        for name, g in gangs.items()
    }
    assert sorted(losses["cached"]) == list(range(1, STEPS + 1))
    assert losses["cached"] == pytest.approx(losses["plain"], rel=1e-3)
    assert losses["cached"][STEPS] < losses["cached"][1]
    # All-reduced once a step: both ranks hold the same weights.
    hashes = {(cached.workdir / f"params-{r}.sha256").read_text() for r in range(2)}
    assert len(hashes) == 1
    adapters = [
        load_file(g.workdir / "output" / "adapter_model.safetensors") for g in gangs.values()
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[0].items():
        assert_close(adapters[1][name], weight, rtol=1e-3, atol=1e-5, msg=name)
    # Each run's log names the loss that trained it: the mini-batches were GradCache's.
    assert (
        "loss: MatryoshkaLoss (32, 8 dimensions) over CachedMultipleNegativesRankingLoss ("
        "GradCache, mini-batches of 2;" in cached.log_text()
    )
    assert "loss: MatryoshkaLoss (32, 8 dimensions) over MultipleNegativesRankingLoss (" in (
        plain.log_text()
    )
    # No library's deprecation notice reaches the pod's log (env._LIBRARY_DEPRECATIONS: peft's,
    # and sentence-transformers' gather across ranks).
    assert "FutureWarning" not in cached.log_text() + plain.log_text()
