"""benchmarks/gpu_throughput.py, CPU-sized: the GPU benchmark's whole code path (the model built
from a shape, the three contenders, the MFU count, the JSON) runs here, so that the script still
works on the day a GPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_trainer.testing.gang import offline_env

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import contenders  # noqa: E402  (benchmarks/ is not a package)
import gpu_throughput  # noqa: E402


def lora_parameters(shape: contenders.Shape, r: int) -> int:
    """LoRA's A (in x r) and B (r x out) on every linear layer of every decoder block."""
    d, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    # q, k, v, o, then the MLP's gate, up and down.
    linears = [(d, d), (d, kv), (d, kv), (d, d)]
    linears += [(d, shape.intermediate), (d, shape.intermediate), (shape.intermediate, d)]
    return shape.layers * sum(r * (i + o) for i, o in linears)


def test_shapes_have_the_published_sizes() -> None:
    small = contenders.parameter_counts(contenders.SHAPES["smollm2-135m"], 16)
    assert small["total"] - small["trainable"] == 134_515_008  # SmolLM2-135M, tied head
    assert small["matmul"] == small["total"]  # the tied head multiplies the embedding again
    assert small["trainable"] == lora_parameters(contenders.SHAPES["smollm2-135m"], 16)
    big = contenders.parameter_counts(contenders.SHAPES["llama-3.1-8b"], 16)
    assert big["total"] - big["trainable"] == 8_030_261_248  # Llama-3.1-8B, untied head
    assert big["matmul"] == big["total"] - big["embedding"]
    assert big["trainable"] == lora_parameters(contenders.SHAPES["llama-3.1-8b"], 16)


def test_a_summary_written_mid_run_has_the_contenders_that_ran() -> None:
    # The JSON is written after every run, so a machine lent for minutes leaves what it measured.
    ran = [contenders.Sample(300.0, 2**30, 0.0), contenders.Sample(100.0, 2**31, 0.0)]
    samples = {"finetune": ran, "trainer": [contenders.Sample(100.0, 2**30, 0.0)], "trl": []}
    got = gpu_throughput.summarise(samples, per_token=1e9, peak=1.0)
    assert set(got["results"]) == {"finetune", "trainer"}
    assert got["results"]["finetune"]["tokens_per_second"] == 200.0  # the median
    assert got["results"]["finetune"]["peak_memory_gib"] == 2.0  # the highest
    assert got["results"]["finetune"]["mfu"] == pytest.approx(200 * 1e9 / 1e12)
    assert got["ratios"] == {"finetune_vs_trainer": 2.0}


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_throughput.json"
    seq, peak_tflops = 64, 0.001
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_throughput.py"),
            *("--shape", "test", "--device", "cpu", "--precision", "bf16"),
            *("--seq-len", str(seq), "--global-batch", "2", "--steps", "2"),
            *("--peak-tflops", str(peak_tflops), "--out", str(out)),
        ],
        env=offline_env(tmp_path / "hf-home"),
        check=True,
        timeout=1200,
    )
    report = json.loads(out.read_text())
    shape = contenders.SHAPES["test"]
    counts = report["parameters"]
    assert counts["trainable"] == lora_parameters(shape, 16)
    # 2P forward, 2P activation gradients, 2P_lora weight gradients, 12·L·s·d attention.
    per_token = 4 * counts["matmul"] + 2 * counts["trainable"] + 12 * shape.layers * seq * 32
    assert report["model_flops_per_token"] == per_token
    assert "12*L*s*d" in report["mfu_formula"]
    assert report["errors"] == {}
    assert set(report["results"]) == {"finetune", "trainer", "trl"}
    for name, figure in report["results"].items():
        assert figure["tokens_per_second"] > 0, name
        assert figure["peak_memory_gib"] > 0, name
        expected = per_token * figure["tokens_per_second"] / (peak_tflops * 1e12)
        assert figure["mfu"] == pytest.approx(expected, rel=2e-3), name
    ours = report["results"]["finetune"]["tokens_per_second"]
    for other in ("trainer", "trl"):
        # Both from the figures as reported, the ratio to 3 decimals: the same float operations,
        # so equal (a relative tolerance failed once a ratio of 0.13 lost 0.35% to the rounding).
        ratio = round(ours / report["results"][other]["tokens_per_second"], 3)
        assert report["ratios"][f"finetune_vs_{other}"] == ratio
