"""Fast, in-process tests of the trainer's pure parts: no training, no processes."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_api import ManifestError, parse_manifest
from finetune_api.v1alpha1 import PeftSpec
from finetune_trainer import env as trainer_env
from finetune_trainer.env import Rendezvous, allocator_env, omp_threads
from finetune_trainer.launch import worst_exit

MINIMAL = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "unit"},
    "spec": {
        "model": {"source": "hf://org/model"},
        "dataset": {"source": "hf://org/data"},
        "resources": {"nodes": 3, "processesPerNode": 2},
    },
}


def test_launcher_imports_no_torch() -> None:
    code = "import sys, finetune_trainer.launch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_only_qlora_imports_bitsandbytes(method: str) -> None:
    """The trainer as a pod imports it: bitsandbytes (seconds of a pod's start) only for qlora."""
    code = f"""
import sys
from finetune_api import parse_manifest
from finetune_trainer.env import hide_unused_packages
doc = {{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {{"name": "b"}},
       "spec": {{"model": {{"source": "hf://org/m"}}, "dataset": {{"source": "hf://org/d"}},
                "peft": {{"method": "{method}"}},
                "resources": {{"accelerator": {{"type": "nvidia.com/gpu", "count": 1}}}}}}}}
hide_unused_packages(parse_manifest(doc))
import finetune_trainer.train, peft
print(sys.modules.get("bitsandbytes") is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(method == "qlora")


def test_lora_config_is_a_pure_function_of_the_spec() -> None:
    from finetune_trainer.modeling import lora_config
    from finetune_trainer.tasks.causal_lm import CausalLM
    from finetune_trainer.tasks.sequence_classification import SequenceClassification

    cfg = lora_config(PeftSpec(r=4, alpha=8, dropout=0.1), CausalLM.peft_task_type)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.1)
    assert cfg.target_modules == "all-linear"
    assert cfg.task_type == "CAUSAL_LM"
    classification = SequenceClassification.peft_task_type
    named = lora_config(PeftSpec(target_modules=["q_proj", "v_proj"]), classification)
    assert set(named.target_modules) == {"q_proj", "v_proj"}
    assert named.task_type == "SEQ_CLS"


def test_rslora_scales_by_the_root_of_r_and_the_saved_adapter_loads_so(tmp_path: Path) -> None:
    """peft.useRslora: alpha/sqrt(r) rather than alpha/r in the model trained, and in the
    adapter_config.json that the push carries, which peft (the merge, the serving engines) reads
    back."""
    from peft import PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_trainer.modeling import lora_config
    from finetune_trainer.tasks.causal_lm import CausalLM

    def base() -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    def scaling(model: Any) -> set[float]:
        # The LoRA layers' (peft.tuners.lora.LoraLayer: a scale per adapter).
        return {
            m.scaling["default"]
            for m in model.modules()
            if isinstance(getattr(m, "scaling", None), dict)
        }

    plain = get_peft_model(base(), lora_config(PeftSpec(r=16, alpha=16), CausalLM.peft_task_type))
    assert scaling(plain) == {1.0}
    spec = PeftSpec(r=16, alpha=16, use_rslora=True)
    stable = get_peft_model(base(), lora_config(spec, CausalLM.peft_task_type))
    assert scaling(stable) == {4.0}
    stable.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    assert scaling(PeftModel.from_pretrained(base(), tmp_path)) == {4.0}


@pytest.mark.parametrize(
    ("model", "revision"),
    [
        ({"source": "hf://org/tiny", "revision": "v1.0"}, "v1.0"),
        ({"source": "hf://org/tiny"}, None),  # main: peft writes none
        ({"source": "file:///models/tiny", "revision": "v1.0"}, None),  # no Hub revision
    ],
)
def test_the_adapter_config_keeps_the_base_revision(
    model: dict[str, str], revision: str | None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.modeling import load_model, save_artifact
    from finetune_trainer.tasks.causal_lm import CausalLM

    doc = {**MINIMAL, "spec": {**MINIMAL["spec"], "model": model, "resources": {}}}
    spec = parse_manifest(doc).spec

    def load_base(**kwargs: object) -> object:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    wrapped = load_model(
        spec, load_base, tokenizer.pad_token_id, CausalLM.peft_task_type, torch.device("cpu")
    )
    assert save_artifact(wrapped, tokenizer, spec, tmp_path / "out", load_base) == "adapter"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["revision"] == revision


def test_precision_auto_is_fp32_on_cpu() -> None:
    from finetune_trainer.modeling import mixed_precision

    assert mixed_precision("auto", bf16_hardware=False) == "no"
    assert mixed_precision("fp32", bf16_hardware=False) == "no"
    assert mixed_precision("bf16", bf16_hardware=False) == "bf16"


def test_rendezvous_from_pod_env() -> None:
    job = parse_manifest(MINIMAL)
    env = {"NODE_RANK": "2", "NNODES": "3", "MASTER_ADDR": "unit-0.unit", "MASTER_PORT": "29500"}
    rdzv = Rendezvous.from_env(job, env)
    assert rdzv.nproc_per_node == 2  # from the spec
    assert rdzv.rank_env(1) == {
        "RANK": "5",
        "WORLD_SIZE": "6",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "NODE_RANK": "2",
        "MASTER_ADDR": "unit-0.unit",
        "MASTER_PORT": "29500",
    }
    with pytest.raises(ManifestError, match="NODE_RANK"):
        Rendezvous.from_env(job, {**env, "NODE_RANK": "3"})
    # Node 0's ranks reach the store in their own pod on loopback, not through the Service.
    node0 = Rendezvous.from_env(job, {**env, "NODE_RANK": "0"})
    assert [node0.rank_env(i)["MASTER_ADDR"] for i in (0, 1)] == ["127.0.0.1", "127.0.0.1"]


def test_omp_threads_split_cores_unless_set() -> None:
    assert omp_threads(1, {"OMP_NUM_THREADS": "7"}) == "7"
    assert int(omp_threads(64, {})) == 1


def test_cpu_jobs_preload_tcmalloc_where_it_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = parse_manifest(MINIMAL)
    gpu = parse_manifest(
        {
            **MINIMAL,
            "spec": {
                **MINIMAL["spec"],
                "resources": {"accelerator": {"type": "nvidia.com/gpu", "count": 1}},
            },
        }
    )
    lib = tmp_path / "x86_64-linux-gnu" / "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(trainer_env, "_LIBRARY_DIRS", (str(tmp_path / "*-linux-gnu"),))
    assert allocator_env(cpu, {}) == {}  # not installed: glibc's malloc, and no ld.so warning
    lib.parent.mkdir()
    lib.touch()
    assert allocator_env(cpu, {}) == {"LD_PRELOAD": str(lib)}
    # The user's own LD_PRELOAD (an empty one too) is their choice of allocator.
    assert allocator_env(cpu, {"LD_PRELOAD": ""}) == {}
    assert allocator_env(cpu, {"LD_PRELOAD": "/opt/jemalloc.so"}) == {}
    # Not measured on accelerators: their jobs keep the C library's malloc.
    assert allocator_env(gpu, {}) == {}


def test_worst_exit_prefers_permanent_verdicts() -> None:
    assert worst_exit([0, 0]) == 0
    assert worst_exit([0, 1]) == 1
    assert worst_exit([1, 4]) == 4
    assert worst_exit([4, 3, 1]) == 3
    # SIGTERM here: the pod goes (143), and is replaced; a peer's SIGTERM: the pod rejoins (5).
    assert worst_exit([143, 143]) == 143
    assert worst_exit([5, 5]) == 5
    assert worst_exit([5, 143]) == 143
    # A crash beside either is a crash: the attempt fails.
    assert worst_exit([5, 1]) == 1
    assert worst_exit([143, 1]) == 1
    assert worst_exit([143, 4]) == 4


def test_checkpoints_atomic_discovery_and_rotation(tmp_path: Path) -> None:
    import torch

    from finetune_trainer import checkpoint

    def ckpt(step: int) -> checkpoint.Checkpoint:
        return checkpoint.Checkpoint(
            state=checkpoint.TrainerState(step=step, epoch=0, batches_in_epoch=step, world_size=1),
            trainable={"w": torch.full((2,), float(step))},
            optimizer={"state": {}, "param_groups": []},
            scheduler={"last_epoch": step},
            rng=[checkpoint.capture_rng()],
        )

    for step in (10, 20, 30):
        checkpoint.save(tmp_path, ckpt(step), keep=2)
    # A half-written checkpoint (no marker) with a higher step must be ignored.
    half = tmp_path / "checkpoint-99999999"
    half.mkdir()
    (half / checkpoint.STATE_FILE).write_text(json.dumps({"step": 999}))
    assert [s for s, _ in checkpoint.list_complete(tmp_path)] == [20, 30]
    found = checkpoint.load_newest(tmp_path)
    assert found is not None
    loaded = found[1]
    assert loaded.state.step == 30
    assert torch.equal(loaded.trainable["w"], torch.full((2,), 30.0))
    checkpoint.restore_rng(loaded.rng[0])


def _checkpoint_of(step: int, trainable_bytes: int) -> Any:
    import torch

    from finetune_trainer import checkpoint

    return checkpoint.Checkpoint(
        state=checkpoint.TrainerState(step=step, epoch=0, batches_in_epoch=step, world_size=1),
        trainable={"w": torch.full((trainable_bytes // 4,), float(step))},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": step},
        rng=[checkpoint.capture_rng()],
    )


def _scratch_left(root: Path) -> list[str]:
    from finetune_trainer.job_folder import TMP_PREFIX

    return [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt", "rng.pt"])
def test_a_checkpoint_that_does_not_load_is_set_aside_for_the_one_before(
    tmp_path: Path, damaged: str, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_trainer import checkpoint

    for step in (1, 2, 3):
        checkpoint.save(tmp_path, _checkpoint_of(step, 4096), keep=3)
    newest = checkpoint.list_complete(tmp_path)[-1][1]
    path = newest / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short in the store
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.checkpoint"):
        found = checkpoint.load_newest(tmp_path)
    assert found is not None and found[1].state.step == 2
    assert "the checkpoint of step 3 does not load" in caplog.text
    assert [s for s, _ in checkpoint.list_complete(tmp_path)] == [1, 2]
    # Set aside as a scratch folder, which the next save sweeps.
    assert _scratch_left(tmp_path) == [f".tmp-unreadable-{newest.name}"]
    checkpoint.save(tmp_path, _checkpoint_of(3, 4096), keep=3)
    assert _scratch_left(tmp_path) == []


def test_a_full_store_deletes_older_checkpoints_and_saves(
    small_volume: Callable[[int], Path], caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_trainer import checkpoint

    root = small_volume(300 * 1024) / "job"  # room for two checkpoints of 100 KiB, not three
    for step in (1, 2):
        checkpoint.save(root, _checkpoint_of(step, 100 * 1024), keep=3)
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.checkpoint"):
        checkpoint.save(root, _checkpoint_of(3, 100 * 1024), keep=3)
    assert [s for s, _ in checkpoint.list_complete(root)] == [2, 3]
    assert "deleting 1 older checkpoint(s)" in caplog.text and "checkpointsToKeep=3" in caplog.text
    assert _scratch_left(root) == []
    found = checkpoint.load_newest(root)
    assert found is not None and found[1].trainable["w"][0] == 3.0


def test_a_store_too_small_for_the_next_checkpoint_fails_as_the_field_that_sizes_it(
    small_volume: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from finetune_api import pod
    from finetune_trainer import checkpoint

    volume = small_volume(200 * 1024)  # room for one checkpoint of 100 KiB, not two
    monkeypatch.setenv(pod.CHECKPOINT_DIR_ENV, str(volume))
    root = volume / "job"
    checkpoint.save(root, _checkpoint_of(1, 100 * 1024), keep=1)
    free = shutil.disk_usage(volume).free
    with pytest.raises(ManifestError) as caught:
        checkpoint.save(root, _checkpoint_of(2, 100 * 1024), keep=1)
    [error] = caught.value.errors
    assert error.path == "spec.output.checkpoints.size"
    # The size to make room for: the trainable 100Ki, and the RNG states beside it.
    assert re.search(r"checkpoint of step 2 \(about 10\d(\.\d)?Ki\)", error.message)
    assert "checkpointsToKeep + 1 = 2 checkpoints" in error.message
    assert error.message.endswith("the one of step 1 is kept")
    # Nothing is lost, and the partial write does not take the room of the next try.
    assert [s for s, _ in checkpoint.list_complete(root)] == [1]
    assert _scratch_left(root) == [] and shutil.disk_usage(volume).free == free
    assert isinstance(caught.value.__cause__, OSError)


def test_a_store_without_room_for_two_checkpoints_is_refused_before_training(
    small_volume: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_api import pod
    from finetune_trainer import checkpoint

    volume = small_volume(300 * 1024)
    monkeypatch.setenv(pod.CHECKPOINT_DIR_ENV, str(volume))
    root = volume / "job"
    # Two of 160Ki do not fit; one is all a run with a single save due ever holds.
    with pytest.raises(ManifestError) as caught:
        checkpoint.check_room(root, 160 * 1024, saves=2, keep=2)
    [error] = caught.value.errors
    assert error.path == "spec.output.checkpoints.size"
    assert "the newest checkpoint and the next, about 160Ki each" in error.message
    assert "with 300Ki free" in error.message and "checkpointsToKeep + 1 = 3" in error.message
    checkpoint.check_room(root, 160 * 1024, saves=1, keep=2)
    checkpoint.check_room(root, 140 * 1024, saves=2, keep=2)
    # What the job's own checkpoints take is room too: all but the newest may go.
    checkpoint.save(root, _checkpoint_of(1, 100 * 1024), keep=2)
    checkpoint.save(root, _checkpoint_of(2, 100 * 1024), keep=2)
    checkpoint.check_room(root, 140 * 1024, saves=1, keep=2)
    with pytest.raises(ManifestError):
        checkpoint.check_room(root, 160 * 1024, saves=1, keep=2)


def test_a_checkpoint_is_expected_to_hold_the_trained_weights_and_two_moments_of_each() -> None:
    import torch

    from finetune_trainer.checkpoint import expected_size

    model = torch.nn.Linear(100, 10)  # weight 1,000 floats, bias 10
    model.weight.requires_grad_(False)  # frozen, as a LoRA base is: never checkpointed
    assert expected_size(model) == 3 * 10 * 4
    model.half().bias.requires_grad_(True)
    assert expected_size(model) == 3 * 10 * 2


def test_saves_due_counts_every_multiple_and_the_last_step() -> None:
    from finetune_trainer.checkpoint import saves_due

    assert saves_due(0, 6, 2) == 3  # 2, 4, 6
    assert saves_due(0, 6, 4) == 2  # 4, 6
    assert saves_due(4, 6, 4) == 1  # 6
    assert saves_due(0, 3, 5) == 1  # 3
    assert saves_due(6, 6, 2) == 0


def test_quantity_rounds_up_to_what_a_spec_would_say() -> None:
    from finetune_trainer.job_folder import quantity

    assert quantity(512) == "512"
    assert quantity(100 * 1024) == "100Ki"
    assert quantity(100 * 1024 + 1) == "100.1Ki"
    assert quantity(30 * 2**30) == "30Gi"
    assert quantity(int(1.55 * 2**40)) == "1.6Ti"


def test_quantity_bytes_reads_what_a_spec_may_say() -> None:
    from finetune_trainer.job_folder import quantity_bytes

    assert quantity_bytes("20Gi") == 20 * 2**30
    assert quantity_bytes("1.5Gi") == 3 * 2**29
    assert quantity_bytes("500M") == 500 * 10**6
    assert quantity_bytes("1e9") == quantity_bytes("1E9") == 10**9
    assert quantity_bytes("2E") == 2 * 10**18  # exa, not an exponent
    assert quantity_bytes(".5Ki") == 512 and quantity_bytes(7) == 7


def test_sharded_batches_are_disjoint_equal_and_resumable() -> None:
    from finetune_trainer.data import ShardedBatches

    shards = [ShardedBatches(103, 4, rank, 2, 3, seed=1) for rank in range(2)]
    assert shards[0].batches_per_epoch == 12  # 103 // 8 = 12 per rank, a multiple of 3
    epochs = [list(s.epoch(0)) for s in shards]
    seen = [i for rank in epochs for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 96
    assert list(shards[0].epoch(0, start=5)) == epochs[0][5:]
    assert list(shards[0].epoch(1)) != epochs[0]


def test_split_rules(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    from finetune_api.v1alpha1 import DatasetSpec
    from finetune_trainer.data import split

    rows = Dataset.from_dict({"text": [str(i) for i in range(100)]})
    with_test = DatasetDict({"train": rows, "test": rows.select(range(7))})
    spec = DatasetSpec(source="file:///x")
    assert len(split(with_test, spec, 0)[1]) == 7
    train, evaluation = split(DatasetDict({"train": rows}), spec, 0)
    assert (len(train), len(evaluation)) == (90, 10)
    frac = DatasetSpec(source="file:///x", eval_fraction=0.2)
    assert len(split(with_test, frac, 0)[1]) == 20
    with pytest.raises(ManifestError, match=r"spec\.dataset\.evalSplit"):
        split(with_test, DatasetSpec(source="file:///x", eval_split="dev"), 0)


def test_compressed_file_formats() -> None:
    from finetune_trainer.data import file_builder

    assert file_builder(Path("a.jsonl.gz")) == "json"
    assert file_builder(Path("a.csv.bz2")) == "csv"
    assert file_builder(Path("a.parquet")) == "parquet"
    assert file_builder(Path("a.txt")) is None


def test_example_manifest_is_valid(tmp_path: Path) -> None:
    from finetune_api import load_manifest
    from finetune_trainer.example_data import example_manifest

    path = tmp_path / "job.yaml"
    path.write_text(example_manifest("minilm-sentiment", tmp_path / "data"))
    job = load_manifest(path)
    assert os.path.isdir(job.spec.model.source.removeprefix("file://"))
    assert (tmp_path / "data" / "train.jsonl").is_file()


def _spec(**dataset: object) -> object:
    doc = {**MINIMAL, "spec": {**MINIMAL["spec"], "dataset": {"source": "hf://o/d", **dataset}}}
    return parse_manifest(doc).spec


def test_prompt_response_trains_only_on_the_response(tiny_model_dir: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from finetune_trainer.tasks.causal_lm import IGNORE_INDEX, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = _spec(promptField="q", responseField="a")
    rows = Dataset.from_dict({"q": ["red green blue"], "a": ["cat dog"]})
    out = tokenize(rows, spec, tokenizer, pack=False)[0]
    masked = [i for i, y in enumerate(out["labels"]) if y == IGNORE_INDEX]
    assert masked == list(range(len(masked))) and 0 < len(masked) < len(out["labels"])
    answer = [t for t, y in zip(out["input_ids"], out["labels"], strict=True) if y != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "cat dog"


def test_packing_makes_full_blocks(tiny_model_dir: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from finetune_trainer.tasks.causal_lm import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = _spec()
    spec.training.max_seq_length = 16
    rows = Dataset.from_dict({"text": ["red green blue cat " * n for n in range(1, 12)]})
    packed = tokenize(rows, spec, tokenizer, pack=True)
    assert len(packed) > 1
    assert {len(ids) for ids in packed["input_ids"]} == {16}


def test_string_labels_map_to_ids_in_sorted_order() -> None:
    from datasets import Dataset

    from finetune_trainer.tasks.sequence_classification import label_names

    doc = {
        **MINIMAL,
        "spec": {
            **MINIMAL["spec"],
            "model": {"source": "hf://o/m", "task": "sequence-classification", "numLabels": 3},
        },
    }
    spec = parse_manifest(doc).spec
    train = Dataset.from_dict({"label": ["rotten", "fresh", "rotten"]})
    evaluation = Dataset.from_dict({"label": ["plot"]})
    assert label_names(train, evaluation, spec) == ["fresh", "plot", "rotten"]


def test_hang_timeout_is_three_p99_step_times_or_the_floor() -> None:
    from finetune_trainer.watchdog import hang_timeout, p99

    assert hang_timeout([], 60) == 60
    assert hang_timeout([0.2] * 50, 60) == 60  # fast steps: the floor rules
    assert hang_timeout([30.0] * 50, 60) == 90  # slow steps: 3 x p99
    # p99 by nearest rank: one outlier in 200 steps does not raise the limit, three do.
    assert p99([1.0] * 199 + [100.0]) == 1.0
    assert hang_timeout([1.0] * 197 + [40.0] * 3, 10) == 120


def test_watchdog_times_steps_but_not_saves() -> None:
    from finetune_trainer.watchdog import HangWatchdog

    now = [0.0]
    dog = HangWatchdog(floor=10, rank=0, clock=lambda: now[0])
    assert dog.check(9.0) is None
    message = dog.check(10.0)
    assert message is not None and "first step" in message
    for step in range(1, 6):  # 2 s steps: 3 x p99 = 6 s, below the floor
        now[0] = 2.0 * step
        dog.step_done(step)
    assert dog.check(now[0] + 9.9) is None
    message = dog.check(now[0] + 10.5)
    assert message is not None and "after step 5" in message and "hangTimeoutSeconds=10" in message
    dog.pause()  # a save: untimed however long it takes, and not a step duration
    assert dog.check(now[0] + 1000) is None
    now[0] += 1000
    dog.step_done(6)
    assert max(dog.durations) == 2.0
    assert dog.check(now[0] + 10.5) is not None


def test_watchdog_gives_a_compiling_first_step_its_grace_only() -> None:
    from finetune_trainer.watchdog import HangWatchdog

    now = [0.0]
    dog = HangWatchdog(floor=10, rank=0, clock=lambda: now[0], first_step_grace=600)
    assert dog.check(609.0) is None  # compiling the layers: slow once, not hung
    message = dog.check(610.5)
    assert message is not None and "first step" in message and "600s to compile" in message
    now[0] = 300.0
    dog.step_done(1)
    assert dog.check(now[0] + 9.9) is None
    message = dog.check(now[0] + 10.5)  # the second step has the floor alone
    assert message is not None and "after step 1" in message and "compile" not in message


def test_watchdog_times_again_once_the_save_is_over() -> None:
    """A rank stopped right after a checkpoint (in the step after it) is caught: the watchdog
    times again from the save's end, not only from the next completed step."""
    from finetune_trainer.watchdog import HangWatchdog

    now = [0.0]
    dog = HangWatchdog(floor=10, rank=0, clock=lambda: now[0])
    for step in range(1, 6):
        now[0] = 2.0 * step
        dog.step_done(step)
    dog.pause()
    now[0] += 500  # the save (and its upload) took long: not a hang, not a step
    assert dog.check(now[0]) is None
    dog.resume()
    assert dog.check(now[0] + 9.9) is None
    message = dog.check(now[0] + 10.5)  # no step completes after the save: a peer is stopped
    assert message is not None and "after step 5" in message
    now[0] += 2.0
    dog.step_done(6)
    assert max(dog.durations) == 2.0  # the step after the save, timed from its end


def test_watchdog_times_evaluation_batches_only_while_they_are_iterated() -> None:
    """Evaluation: each batch ends in a gather, so a lost peer stops the batches coming. What
    comes before (rank 0 alone computing a task's scores) and after them is not timed."""
    from finetune_trainer.watchdog import HangWatchdog

    now = [0.0]
    dog = HangWatchdog(floor=10, rank=0, clock=lambda: now[0], what="evaluation batch")
    dog.pause()
    batches = dog.timed(["b1", "b2", "b3"])
    assert dog.check(1000.0) is None  # not asked for yet
    now[0] = 1000.0
    assert next(batches) == "b1"
    message = dog.check(1010.5)  # the first batch's gather never returned
    assert message is not None and message.startswith("no evaluation batch completed in 10s")
    assert "for the first batch" in message
    now[0] = 1001.0
    assert next(batches) == "b2"
    message = dog.check(1011.5)
    assert message is not None and "after batch 1" in message and "p99 batch time" in message
    now[0] = 1002.0
    assert next(batches) == "b3"
    now[0] = 1003.5
    assert next(batches, None) is None  # run out: what follows is untimed
    assert dog.check(5000.0) is None
    assert list(dog.durations) == [1.0, 1.5]  # batch 2 and 3; batch 1 warmed up


def _wrapped_timeout() -> None:
    try:
        raise TimeoutError("read timed out")
    except TimeoutError as cause:
        raise RuntimeError("wrapped") from cause


def _missing_column() -> None:
    from finetune_api import FieldError

    raise ManifestError([FieldError("spec.dataset.textField", "column 'x' not in []")])


def _raise(exc: Exception) -> Callable[[], None]:
    def fail() -> None:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("fail", "raised", "match"),
    [
        (_missing_column, "DatasetError", r"spec\.dataset\.textField"),
        (_raise(ValueError("JSON parse error")), "DatasetError", "ValueError: JSON parse error"),
        (_raise(PermissionError(13, "Permission denied")), "DatasetError", "PermissionError"),
        # The network's: another attempt may succeed, even when the error wraps it.
        (_raise(ConnectionResetError("peer")), "ConnectionResetError", "peer"),
        (_wrapped_timeout, "RuntimeError", "wrapped"),
    ],
)
def test_dataset_errors_are_the_datas_unless_network_or_hub(
    fail: Callable[[], None], raised: str, match: str
) -> None:
    from finetune_trainer.data import dataset_errors

    with pytest.raises(Exception, match=match) as info, dataset_errors():
        fail()
    assert type(info.value).__name__ == raised


def test_log_tail_is_bounded_and_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from finetune_trainer.logtail import LogTail

    monkeypatch.setenv("HF_TOKEN", "s3cr3t-token-value")
    tail = LogTail(lines=5)
    logger = logging.getLogger("tail-test")
    logger.addHandler(tail)
    logger.propagate = False
    try:
        for i in range(10):
            logger.warning("line %d", i)
        logger.warning("auth with s3cr3t-token-value and hf_abcdefghijkl\nsecond line")
    finally:
        logger.removeHandler(tail)
    text = tail.text()
    assert text.splitlines()[0] == "WARNING tail-test: line 7"
    assert "s3cr3t" not in text and "hf_abcdefghijkl" not in text and "second line" in text
    assert len(tail.text(max_bytes=60).encode()) <= 60
    assert tail.text(max_lines=2).splitlines()[0].endswith("and ***")


def test_a_file_that_does_not_parse_is_a_dataset_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from finetune_trainer.data import DatasetError, load_splits

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    broken = tmp_path / "rows.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n')
    doc = json.loads(json.dumps(MINIMAL))
    doc["spec"]["dataset"]["source"] = f"file://{broken}"
    with pytest.raises(DatasetError, match=r"DatasetGenerationError.*caused by"):
        load_splits(parse_manifest(doc).spec)


def test_final_artifact_is_kept_whole_or_not_at_all(tmp_path: Path) -> None:
    """What a failed push leaves for the next attempt: found only when complete, of the kind the
    spec asks for, and never taken for a checkpoint."""
    from finetune_api.result import TrainerResult
    from finetune_trainer import checkpoint, final

    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    result = TrainerResult(
        status="Succeeded",
        reason="TrainingCompleted",
        evaluation={f"m{i}": {"before": 2.0, "after": 1.0} for i in range(40)},  # > the message cap
        steps=6,
    )
    assert final.load(root, "adapter") is None
    # A save cut short (no marker, still under its temporary name) does not count.
    (root / f"{checkpoint.TMP_PREFIX}final-cut").mkdir(parents=True)
    assert final.load(root, "adapter") is None
    kept = final.save(root, out, result)
    found = final.load(root, "adapter")
    assert found is not None and found.folder == kept.folder == root / final.FINAL_FOLDER
    assert found.result == result and len(found.result.evaluation) == 40
    assert (found.artifact_dir / "adapter_model.safetensors").read_bytes() == b"weights"
    assert final.load(root, "merged") is None  # the spec asks for another artifact
    # Checkpoints neither see it nor rotate it away; their rotation sweeps the cut save.
    assert checkpoint.list_complete(root) == []
    checkpoint.rotate(root, keep=1)
    assert final.load(root, "adapter") is not None
    assert not list(root.glob(f"{checkpoint.TMP_PREFIX}*"))
    (kept.folder / checkpoint.COMPLETE_MARKER).unlink()
    assert final.load(root, "adapter") is None


def test_checkpoint_folder_is_keyed_by_what_shapes_training_and_not_by_defaults() -> None:
    from finetune_trainer.job_folder import checkpoint_root

    def root(training: dict | None = None, dataset: dict | None = None) -> str:
        doc = json.loads(json.dumps(MINIMAL))
        doc["spec"]["training"] = training or {}
        doc["spec"]["dataset"] = {**doc["spec"]["dataset"], **(dataset or {})}
        return checkpoint_root(parse_manifest(doc)).name

    # Checkpointed layers train the same weights; a job keeps its folder across the setting.
    assert root() == root({"gradientCheckpointing": True})
    # So do compiled layers: compiling changes the kernels, not the weights or their names.
    assert root() == root({"compile": True}) == root({"compile": False})
    # And when saves happen by time: a job made again with checkpointEverySeconds (after a
    # failure that cost an hour of steps) resumes from what the one without it saved.
    assert root() == root({"checkpointEverySeconds": 600})
    # A field at its default is as if absent, so the fields a version adds with defaults
    # (training.strategy, dataset.anchorField...) keep older jobs' folders where they were.
    assert root() == root({"strategy": "ddp"}) == root(dataset={"anchorField": "anchor"})
    # An FSDP run's optimizer state is keyed by parameter name, a DDP run's by position.
    assert root({"strategy": "fsdp"}) != root()
    assert root({"learningRate": 0.5}) != root()


@pytest.mark.parametrize(("gpus", "bnb"), [(1, True), (2, True), (8, False)])
def test_gpu_smoke_variants_are_valid_specs(gpus: int, bnb: bool) -> None:
    """gpu_smoke.py runs only where a GPU is lent: its specs are checked here, so that the rare
    GPU run is not spent on a manifest the schema refuses."""
    import gpu_smoke
    from trainer_helpers import deep_update

    from finetune_trainer.testing.tiny import causal_job

    base = causal_job(Path("/m"), Path("/d.jsonl"))
    for name, change in gpu_smoke.variants(gpus, bnb).items():
        spec = parse_manifest(deep_update(base, {"spec": change})).spec
        assert spec.resources.processes_per_node <= gpus, name
    sdxl = parse_manifest(gpu_smoke.sdxl_job(Path("/p"), Path("/d"))).spec
    assert (sdxl.training.precision, sdxl.resources.accelerator.type) == ("fp16", "nvidia.com/gpu")
    own = parse_manifest(gpu_smoke.sdxl_job(Path("/p"), Path("/d"), Path("/p/vae"))).spec
    assert own.model.vae is not None and own.model.vae.source == "file:///p/vae"
    assert own.training.precision == "fp16"


def test_compile_without_a_compiler_is_said_at_once(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoModelForCausalLM

    from finetune_trainer import modeling

    def spec(compile: bool | None) -> Any:
        doc = json.loads(json.dumps(MINIMAL))
        doc["spec"]["training"] = {"compile": compile}
        doc["spec"]["resources"] = {"accelerator": {"type": "nvidia.com/gpu", "count": 1}}
        return parse_manifest(doc).spec

    def compiled(model: Any) -> list[bool]:
        return [
            layer._compiled_call_impl is not None for layer in modeling.transformer_layers(model)
        ]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert modeling.compiler_missing() is None  # this machine builds kernels (CI's does)
    monkeypatch.setattr(modeling.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    missing = modeling.compiler_missing()
    assert missing is not None and "no C compiler" in missing
    # Asked for: a spec error naming the field and the fix, before any step.
    with pytest.raises(ManifestError) as err:
        modeling.apply_compile(spec(True), model)
    assert [e.path for e in err.value.errors] == ["spec.training.compile"]
    assert "set training.compile false" in str(err.value)
    # The default (on for a causal LM on a GPU): the job trains uncompiled, and says why. No
    # layer compiled means no compile grace for the first step (loop.py's hang watchdog).
    with caplog.at_level(logging.INFO, logger=modeling.log.name):
        assert modeling.apply_compile(spec(None), model) == 0
    assert "torch.compile: off, no C compiler" in caplog.text
    assert compiled(model) == [False, False]
    # With a compiler: every decoder layer compiled in place (nothing runs until a forward).
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=modeling.log.name):
        assert modeling.apply_compile(spec(None), model) == 2
    assert "torch.compile: 2 transformer layers (dynamic shapes False)" in caplog.text
    assert compiled(model) == [True, True]


def test_fsdp_shards_by_the_models_own_layer_classes(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.modeling import layer_class_names
    from finetune_trainer.sharding import shard

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert layer_class_names(model) == {"LlamaDecoderLayer"}
    # A model that names no layer class is refused as a spec error (permanent), before any
    # process group or shard is made.
    with pytest.raises(ManifestError) as err:
        shard(torch.nn.Sequential(torch.nn.Linear(2, 2)), "no", torch.device("cpu"))
    assert [e.path for e in err.value.errors] == ["spec.training.strategy"]
