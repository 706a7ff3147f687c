"""Several ranks per pod, and training.strategy fsdp, on real gangs of `finetune train` processes
on CPU (gloo): 2 pods x 2 processes with DDP and with FSDP2, a sharded run resumed from its
checkpoint, a full fine-tune under FSDP, and compiled layers (training.compile). FSDP and
compiled layers are the same mathematics as plain DDP, so on the same gang and seed their losses
must match DDP's; a resumed run must end where the whole run ended."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_helpers import Gang, deep_update

pytestmark = pytest.mark.slow
STEP_LOSS = re.compile(r"step=(\d+)/\d+ loss=([\d.]+)")


@dataclass
class Done:
    gang: Gang
    codes: list[int]
    workdir: Path

    def losses(self) -> dict[int, float]:
        """Rank 0's loss per step; a later run's lines (a resume) win."""
        text = self.gang.logs[0].read_text(errors="replace")
        return {int(step): float(loss) for step, loss in STEP_LOSS.findall(text)}

    def hashes(self) -> list[str]:
        ranks = self.gang.nodes * self.gang.nproc_per_node
        return [(self.workdir / f"params-{r}.sha256").read_text() for r in range(ranks)]


def _run(workdir: Path, doc: dict[str, Any], env: dict[str, str], nodes: int, nproc: int) -> Done:
    manifest = workdir / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    gang = Gang(manifest, workdir, env, nodes, nproc).start()
    return Done(gang, gang.wait(timeout=600), workdir)


def _job(causal_manifest: dict[str, Any], **training: Any) -> dict[str, Any]:
    change = {"maxSteps": 20, "checkpointEverySteps": 10, **training}
    return deep_update(causal_manifest, {"spec": {"training": change}})


@pytest.fixture(scope="module")
def ddp_2x2(
    tmp_path_factory: pytest.TempPathFactory,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
) -> Done:
    doc = deep_update(_job(causal_manifest), {"spec": {"resources": {"processesPerNode": 2}}})
    return _run(tmp_path_factory.mktemp("ddp-2x2"), doc, base_env, nodes=2, nproc=2)


@pytest.fixture(scope="module")
def fsdp_2x2(
    tmp_path_factory: pytest.TempPathFactory,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
) -> Done:
    doc = deep_update(
        _job(causal_manifest, strategy="fsdp"), {"spec": {"resources": {"processesPerNode": 2}}}
    )
    return _run(tmp_path_factory.mktemp("fsdp-2x2"), doc, base_env, nodes=2, nproc=2)


def test_two_pods_of_two_ranks_train_as_one_gang(ddp_2x2: Done) -> None:
    assert ddp_2x2.codes == [0, 0], ddp_2x2.gang.log_text()[-4000:]
    log = ddp_2x2.gang.log_text()
    for rank in range(4):
        assert f"rank {rank} of 4 on cpu" in log
    assert len(set(ddp_2x2.hashes())) == 1, "every rank ends with the same LoRA weights"
    result = ddp_2x2.gang.result(0)
    assert (result["status"], result["steps"]) == ("Succeeded", 20)
    ppl = result["evaluation"]["perplexity"]
    assert ppl["before"] > ppl["after"], ppl
    # The second pod's first rank writes its pod's own small result.
    assert ddp_2x2.gang.result(1) == {"rank": 2, "status": "Succeeded"}


def test_fsdp_trains_as_ddp_does(fsdp_2x2: Done, ddp_2x2: Done) -> None:
    assert fsdp_2x2.codes == [0, 0], fsdp_2x2.gang.log_text()[-4000:]
    fsdp, ddp = fsdp_2x2.losses(), ddp_2x2.losses()
    assert sorted(fsdp) == list(range(1, 21))
    assert fsdp == pytest.approx(ddp, rel=1e-3)
    assert fsdp[20] < fsdp[1]
    scores = [d.gang.result(0)["evaluation"]["perplexity"]["after"] for d in (fsdp_2x2, ddp_2x2)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-3)
    # Each rank holds shards; the whole weights, gathered, are the same everywhere.
    assert len(set(fsdp_2x2.hashes())) == 1
    adapter = fsdp_2x2.workdir / "output" / "adapter_model.safetensors"
    assert adapter.is_file()


# Under FSDP the compiled layers are also sharded, so that case covers the compile path and
# more; the DDP case is the same capability on the plainer path (`make test-all`).
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.extended), "fsdp"])
def test_compiled_layers_train_as_the_eager_ones(
    tmp_path_factory: pytest.TempPathFactory,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
    request: pytest.FixtureRequest,
    strategy: str,
) -> None:
    # On CPU torch.compile generates C++ (a compiler on the PATH: this machine's, the image's).
    doc = deep_update(
        _job(causal_manifest, compile=True, strategy=strategy),
        {"spec": {"resources": {"processesPerNode": 2}}},
    )
    done = _run(tmp_path_factory.mktemp(f"compiled-{strategy}"), doc, base_env, nodes=2, nproc=2)
    assert done.codes == [0, 0], done.gang.log_text()[-4000:]
    assert "torch.compile: 2 transformer layers" in done.gang.log_text()
    eager: Done = request.getfixturevalue(f"{strategy}_2x2")
    assert sorted(done.losses()) == list(range(1, 21))
    assert done.losses() == pytest.approx(eager.losses(), rel=1e-3)
    # Evaluation runs the same layers uncompiled: the same scores.
    scores = [d.gang.result(0)["evaluation"]["perplexity"] for d in (done, eager)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-3)
    # The compiled layers keep their names: the adapter is the one an eager run saves.
    from safetensors.torch import load_file

    saved = [d.workdir / "output" / "adapter_model.safetensors" for d in (done, eager)]
    assert set(load_file(saved[0])) == set(load_file(saved[1]))


def test_fsdp_adapter_holds_the_trained_weights(fsdp_2x2: Done) -> None:
    from safetensors.torch import load_file

    adapter = load_file(fsdp_2x2.workdir / "output" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.dtype.is_floating_point for v in lora_b.values())
    # LoRA's B starts at zero: gathered shards that never trained would save zeros.
    assert sum(float(v.abs().sum()) for v in lora_b.values()) > 0


def test_a_sharded_checkpoint_resumes_where_the_run_was(fsdp_2x2: Done) -> None:
    first_hashes, first_losses = fsdp_2x2.hashes(), fsdp_2x2.losses()
    [root] = (fsdp_2x2.workdir / "checkpoints").iterdir()
    saved = sorted(root.glob("checkpoint-*"))
    assert [p.name[:19] for p in saved] == ["checkpoint-00000010", "checkpoint-00000020"]
    # As if the gang had been lost after step 10's checkpoint.
    fsdp_2x2.gang.lose_the_newest_checkpoint()
    gang = fsdp_2x2.gang.start()
    codes = gang.wait(timeout=600)
    assert codes == [0, 0], gang.log_text()[-4000:]
    result = gang.result(0)
    assert (result["resumedFromStep"], result["steps"]) == (10, 20)
    resumed = fsdp_2x2.losses()
    assert {s: resumed[s] for s in range(11, 21)} == pytest.approx(
        {s: first_losses[s] for s in range(11, 21)}, rel=1e-4
    )
    assert fsdp_2x2.hashes() == first_hashes


def test_fsdp_full_fine_tune_with_checkpointing_saves_the_whole_model(
    tmp_path_factory: pytest.TempPathFactory,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
    tiny_model_dir: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    # With the layers recomputed in the backward pass, as a model too large for its GPUs
    # trains (the DoRA test above shows that this changes nothing learnt).
    doc = deep_update(
        _job(causal_manifest, strategy="fsdp", learningRate=1e-3, gradientCheckpointing=True),
        {"spec": {"peft": {"method": "none"}}},
    )
    done = _run(tmp_path_factory.mktemp("fsdp-full"), doc, base_env, nodes=2, nproc=1)
    assert done.codes == [0, 0], done.gang.log_text()[-4000:]
    result = done.gang.result(0)
    assert (result["artifact"], result["steps"]) == ("full", 20)
    ppl = result["evaluation"]["perplexity"]
    assert ppl["before"] > ppl["after"], ppl
    tuned = AutoModelForCausalLM.from_pretrained(done.workdir / "output", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    changed = [
        name
        for (name, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    # Every layer trained, not only the shards rank 0 held.
    assert any(".layers.0." in n for n in changed) and any(".layers.1." in n for n in changed)


def test_dora_under_fsdp_with_checkpointing_trains_resumes_and_saves_as_under_ddp(
    tmp_path_factory: pytest.TempPathFactory,
    causal_manifest: dict[str, Any],
    base_env: dict[str, str],
) -> None:
    """DoRA's magnitude vectors are sharded, gathered into the checkpoint and the adapter, and
    restored on resume like the LoRA matrices beside them. The sharded run also recomputes its
    layers in the backward pass (gradientCheckpointing), which must change nothing learnt."""
    import json

    import torch
    from safetensors.torch import load_file

    done = {
        strategy: _run(
            tmp_path_factory.mktemp(f"dora-{strategy}"),
            deep_update(
                _job(causal_manifest, strategy=strategy, gradientCheckpointing=strategy == "fsdp"),
                {"spec": {"peft": {"useDora": True}}},
            ),
            base_env,
            nodes=2,
            nproc=1,
        )
        for strategy in ("ddp", "fsdp")
    }
    assert "strategy fsdp, gradient checkpointing True" in done["fsdp"].gang.log_text()
    for run in done.values():
        assert run.codes == [0, 0], run.gang.log_text()[-4000:]
    fsdp, ddp = done["fsdp"], done["ddp"]
    assert sorted(fsdp.losses()) == list(range(1, 21))
    assert fsdp.losses() == pytest.approx(ddp.losses(), rel=1e-3)
    scores = [d.gang.result(0)["evaluation"]["perplexity"] for d in (fsdp, ddp)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-3)
    assert scores[0]["after"] < scores[0]["before"]

    adapters = [load_file(d.workdir / "output" / "adapter_model.safetensors") for d in (fsdp, ddp)]
    magnitudes = {k for k in adapters[0] if "lora_magnitude_vector" in k}
    assert magnitudes and set(adapters[0]) == set(adapters[1])
    for key in magnitudes:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=1e-4, atol=1e-6)
    config = json.loads((fsdp.workdir / "output" / "adapter_config.json").read_text())
    assert config["use_dora"] is True

    # Resumed from step 10's gathered checkpoint, the sharded run ends where it ended.
    first_hashes, first_losses = fsdp.hashes(), fsdp.losses()
    fsdp.gang.lose_the_newest_checkpoint()
    assert fsdp.gang.start().wait(timeout=600) == [0, 0], fsdp.gang.log_text()[-4000:]
    assert fsdp.gang.result(0)["resumedFromStep"] == 10
    resumed = fsdp.losses()
    assert {s: resumed[s] for s in range(11, 21)} == pytest.approx(
        {s: first_losses[s] for s in range(11, 21)}, rel=1e-4
    )
    assert fsdp.hashes() == first_hashes


def test_only_rank_0_reads_the_base_and_every_rank_gets_the_whole_of_it(
    tmp_path: Path, causal_manifest: dict[str, Any], base_env: dict[str, str]
) -> None:
    """Under fsdp the other ranks build the base empty and get their shards, and the buffers no
    state dict holds (the rotary frequencies), from rank 0: every value as loaded, bit for bit."""
    import torch

    from finetune_api.validation import parse_manifest
    from finetune_trainer.testing import sharded_load

    doc = _job(causal_manifest, strategy="fsdp")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    reports = sharded_load.gang(manifest, tmp_path / "out", keep_state=True, env=base_env)
    assert [r["builtEmpty"] for r in reports] == [False, True]
    model = sharded_load.load(parse_manifest(doc).spec, sharded_load.CPU)
    loaded = dict(model.named_parameters()) | dict(model.named_buffers())
    assert any("rotary_emb" in name for name in loaded)
    for rank in (0, 1):
        state = torch.load(tmp_path / "out" / f"rank-{rank}.pt", weights_only=True)
        assert state.keys() == loaded.keys(), rank
        for name, value in loaded.items():
            assert torch.equal(state[name], value.detach()), (rank, name)


def test_a_module_the_checkpoint_keeps_in_fp32_is_fp32_on_every_rank(
    tmp_path: Path, causal_manifest: dict[str, Any], base_env: dict[str, str]
) -> None:
    """Under bf16 `from_pretrained` keeps some models' modules in fp32, and building a model
    from its config (the other ranks) does not: their shards take rank 0's dtypes."""
    import torch

    from finetune_trainer.testing import sharded_load

    doc = _job(causal_manifest, strategy="fsdp", precision="bf16")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    sharded_load.gang(manifest, out, keep_state=True, keep_fp32="lm_head", env=base_env)
    states = [torch.load(out / f"rank-{rank}.pt", weights_only=True) for rank in (0, 1)]
    head = "base_model.model.lm_head.weight"
    assert states[0][head].dtype == torch.float32
    assert states[0]["base_model.model.model.embed_tokens.weight"].dtype == torch.bfloat16
    for name, value in states[0].items():
        assert states[1][name].dtype == value.dtype and torch.equal(states[1][name], value), name


def test_a_sharded_model_generates_what_the_whole_one_does(
    tmp_path: Path, causal_manifest: dict[str, Any], base_env: dict[str, str]
) -> None:
    """Evaluation by generation under fsdp: a LoRA model sharded over 2 ranks answers exactly as
    the whole model, though one rank's only batch ends at its first token while the other's
    two go on, and a fresh model generates before any forward through the root. Before, the
    ranks' forwards did not pair up (a hang until the watchdog), generating before training
    failed on the root's weights, left as shards (`aten.embedding.default got mixed
    torch.Tensor and DTensor`), and a layer that ran forward before the root took itself for
    the root and failed training's first step."""
    from finetune_trainer.testing import sharded_load

    doc = _job(causal_manifest, strategy="fsdp")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    reports = sharded_load.gang(
        manifest, tmp_path / "out", generate=True, env=base_env, timeout=300
    )
    assert reports[0] == reports[1], "every rank returns every answer, in prompt order"
    whole, sharded = reports[0]["whole"], reports[0]["sharded"]
    assert len(whole) == 5 and whole[3] == whole[4] == reports[0]["eos"], whole
    assert all(len(answer) > len(whole[3]) for answer in whole[:3]), whole
    assert sharded == whole
    # And the next forward through the root (training's) still works, on the same weights.
    assert reports[0]["logitsDiff"] < 1e-5
