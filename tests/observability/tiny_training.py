"""A real, tiny, data-parallel training run that reports through TrainerMetrics, for the live
dashboard test: a one-layer causal transformer learning a small word-pattern corpus, character
by character, with AdamW, warm-up and linear decay, gradient clipping and checkpoints.

Two ranks run in one thread, the way DDP combines them: each rank takes its own shard of the
batch, the gradients are averaged (the backward pass of the mean of the ranks' losses) and one
optimizer step applies them. Like train.py, every rank records the loss averaged over ranks,
its own tokens and samples, the step's wall time, and the same evaluation scores.
"""

from __future__ import annotations

import random
import resource
import threading
import time
from pathlib import Path

import torch
from torch import nn

from finetune_trainer.telemetry import TrainerMetrics, flops_per_token

WORDS = [
    *("red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "tree", "river", "stone"),
    *("cloud", "fire", "water", "north", "south", "east", "west", "apple", "bread", "milk"),
]


def corpus(n_rows: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        pattern = rng.sample(WORDS, 3)
        rows.append(" ".join(pattern * 3))
    return "\n".join(rows)


class TinyLM(nn.Module):
    def __init__(self, vocab: int, context: int, d_model: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.block = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(
            self.block(h, src_mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measured_peak_flops(n: int = 256, repeats: int = 10) -> float:
    """This CPU thread's matmul FLOP/s: the 'peak' that MFU is measured against here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


class TinyRun(threading.Thread):
    """Trains for `total_steps` optimizer steps (or until `deadline_s`) in a daemon thread."""

    def __init__(
        self,
        ranks: list[TrainerMetrics],
        checkpoint_dir: Path,
        total_steps: int = 150,
        step_pause_s: float = 0.08,
        deadline_s: float = 40.0,
        checkpoint_every: int = 30,
    ) -> None:
        super().__init__(daemon=True, name="tiny-training")
        self.ranks = ranks
        self.checkpoint_dir = checkpoint_dir
        self.total_steps = total_steps
        self.step_pause_s = step_pause_s
        self.deadline_s = deadline_s
        self.checkpoint_every = checkpoint_every
        self.stop_event = threading.Event()
        self.losses: list[float] = []
        self.scores: dict[str, dict[str, float]] = {}
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.training_started = self.training_ended = 0.0  # unix time

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            self.finished.set()

    def _each(self, method: str, *args: object) -> None:
        for metrics in self.ranks:
            getattr(metrics, method)(*args)

    def _run(self) -> None:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        started = time.monotonic()
        world = len(self.ranks)
        self._each("record_phase", "rendezvous")
        self._each("set_status", "loading")  # the statuses and their order are train.py's

        text = corpus(400, seed=0)
        vocab = sorted(set(text))
        ids = torch.tensor([vocab.index(c) for c in text])
        context, per_rank_batch = 32, 8
        split = int(len(ids) * 0.9)
        train_ids, eval_ids = ids[:split], ids[split:]
        self._each("record_phase", "data_loaded")

        model = TinyLM(len(vocab), context)
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        warmup, total = 10, self.total_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup))),
        )
        loss_fn = nn.CrossEntropyLoss()
        self._each("record_phase", "model_loaded")
        per_token = flops_per_token(n_params, n_params, n_layers=1, seq_length=context, d_model=32)
        peak = measured_peak_flops()
        generator = torch.Generator().manual_seed(1)

        def batch(source: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            starts = torch.randint(0, len(source) - context - 1, (size,), generator=generator)
            x = torch.stack([source[s : s + context] for s in starts])
            y = torch.stack([source[s + 1 : s + context + 1] for s in starts])
            return x, y

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            model.eval()
            x, y = batch(eval_ids, 64)
            logits = model(x)
            loss = loss_fn(logits.reshape(-1, len(vocab)), y.reshape(-1))
            accuracy = (logits.argmax(-1) == y).float().mean()
            model.train()
            return {"loss": float(loss), "accuracy": float(accuracy)}

        self._each("set_status", "evaluating")
        self.scores["before"] = evaluate()
        self._each("record_eval", "before", self.scores["before"])
        self._each("set_status", "training")
        self.training_started = time.time()

        step = 0
        step_started = time.perf_counter()
        while step < self.total_steps and not self.stop_event.is_set():
            if time.monotonic() - started > self.deadline_s:
                break
            shards = [batch(train_ids, per_rank_batch) for _ in range(world)]
            local = [loss_fn(model(x).reshape(-1, len(vocab)), y.reshape(-1)) for x, y in shards]
            mean = torch.stack(local).mean()
            optimizer.zero_grad()
            mean.backward()  # the gradient DDP's all-reduce would give every rank
            mean_loss = float(mean.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimizer.step()
            lr = schedule.get_last_lr()[0]
            schedule.step()
            step += 1
            # Like train.py: from the end of the previous step (data and pauses included).
            duration = time.perf_counter() - step_started
            tokens = per_rank_batch * context
            epoch = step * world * tokens / len(train_ids)
            self.losses.append(mean_loss)
            for metrics in self.ranks:
                metrics.record_step(
                    step,
                    epoch,
                    mean_loss,
                    lr,
                    grad_norm,
                    tokens,
                    per_rank_batch,
                    duration,
                    self.total_steps,
                )
                metrics.record_flops(per_token * metrics.tokens_per_second, peak)
                metrics.record_peak_memory(peak_rss_bytes())
            if step % self.checkpoint_every == 0 or step == self.total_steps:
                saved = time.perf_counter()
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                    },
                    self.checkpoint_dir / f"step-{step}.pt",
                )
                self._each("record_checkpoint", time.perf_counter() - saved)
            step_started = time.perf_counter()  # checkpoints are not step time, as in train.py
            self.stop_event.wait(self.step_pause_s)  # a slower step: keep the busy CPU light

        self.training_ended = time.time()
        self._each("set_status", "evaluating")
        self.scores["after"] = evaluate()
        self._each("record_eval", "after", self.scores["after"])
        self._each("set_status", "succeeded")
