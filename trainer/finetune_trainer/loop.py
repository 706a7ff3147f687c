"""The training loop of one rank: optimizer steps from the sharded batches, with telemetry,
periodic checkpoints, and a gang-wide stop on SIGTERM that checkpoints first.

`finetune_trainer.train` builds a `Prepared` run and calls `train_steps` between the evaluations;
an `Interrupted` from it means the gang saved a checkpoint and should exit retryable.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from finetune_api import FineTuneJob
from finetune_api.pod import PEAK_FLOPS_ENV
from finetune_api.v1alpha1 import TrainingSpec
from finetune_trainer import checkpoint, data, modeling, sharding
from finetune_trainer.job_folder import free_bytes
from finetune_trainer.tasks import Batch, Task, TaskData
from finetune_trainer.telemetry import TrainerMetrics, flops_per_token
from finetune_trainer.watchdog import HangWatchdog

log = get_logger(__name__)


class Interrupted(Exception):
    """The gang stopped on SIGTERM, after saving a checkpoint at `step`. `here`: this rank got
    the SIGTERM (its pod is going); otherwise a peer did, and this rank's pod rejoins the gang
    once the peer's pod is replaced."""

    def __init__(self, step: int, here: bool) -> None:
        what = "stopped by SIGTERM" if here else "a peer got SIGTERM: the gang stopped"
        super().__init__(f"{what} at step {step}; the gang resumes there")
        self.step, self.here = step, here


class StopRequest:
    """SIGTERM (a pod deleted, evicted or preempted) while the loop runs: finish the step, then
    the whole gang checkpoints and leaves. Outside the loop SIGTERM keeps its default action."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


@dataclass
class Prepared:
    """Everything a training run needs, after the one `accelerator.prepare`."""

    accelerator: Accelerator
    task: Task
    data: TaskData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    eval_dl: DataLoader
    batches: data.ShardedBatches
    total_steps: int
    # Whether training.compile compiled the layers: the first step then compiles them too.
    compiled: bool = False

    def micro_batch(self, index: list[int]) -> Batch:
        """The training rows at `index`, collated and on this rank's device."""
        rows = self.data.train[index]
        batch = self.data.collate(
            [dict(zip(rows, v, strict=True)) for v in zip(*rows.values(), strict=True)]
        )
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}


def train_steps(
    job: FineTuneJob,
    run: Prepared,
    state: checkpoint.TrainerState,
    ckpt_root: Path,
    telemetry: TrainerMetrics,
    after_save: Callable[[Path], object] | None = None,
) -> float | None:
    """Train to the last step; returns the gang's real (non-pad) tokens per second. A gang that
    stops making progress ends this process from the watchdog (reason CollectiveTimeout).

    `after_save(folder)` runs on rank 0 after each complete checkpoint, before training goes on
    (train.py mirrors the checkpoint to the Hub there)."""
    acc, t = run.accelerator, job.spec.training
    hang_floor = job.spec.run_policy.hang_timeout_seconds
    params = [p for p in run.model.parameters() if p.requires_grad]
    report = _StepReport(run, telemetry, params)
    stop_budget = StopBudget(job, telemetry)
    run.model.train()
    step_loss, tokens, samples, started = 0.0, 0, 0, time.perf_counter()
    # The throughput returned is timed from the end of this run's first optimizer step (see
    # below), or over the whole run when it has only one step.
    loop_started, loop_tokens, warmed_up = started, 0, False
    grace = modeling.FIRST_STEP_COMPILE_S if run.compiled else 0.0
    watch = HangWatchdog(
        hang_floor, acc.process_index, first_step_grace=grace, phases=lambda: telemetry.phases
    )
    last_save = time.monotonic()
    with StopRequest() as stop, watch as watchdog:
        while state.step < run.total_steps:
            for index in run.batches.epoch(state.epoch, state.batches_in_epoch):
                batch = run.micro_batch(index)
                loss, grad_norm = _micro_step(run, batch, params, t.max_grad_norm)
                state.batches_in_epoch += 1
                step_loss += float(loss.detach()) / t.gradient_accumulation_steps
                real_tokens = int(batch["attention_mask"].sum())
                tokens, loop_tokens = tokens + real_tokens, loop_tokens + real_tokens
                samples += len(index)
                if not acc.sync_gradients:
                    continue
                run.scheduler.step()
                state.step += 1
                mean_loss, stopping, interval_up = _agree(
                    acc, step_loss, stop.requested, _interval_up(t, last_save)
                )
                # Bounded: the history travels in every checkpoint's JSON.
                state.loss_history = [*state.loss_history[-99:], mean_loss]
                epoch = state.epoch + state.batches_in_epoch / run.batches.batches_per_epoch
                step_seconds = time.perf_counter() - started
                report(state.step, epoch, mean_loss, grad_norm, tokens, samples, step_seconds)
                # Not this run's first step, whose warm-up no later step repeats.
                stop_budget.step(step_seconds, warm=warmed_up)
                watchdog.step_done(state.step)
                # An epoch always ends on an optimizer step (ShardedBatches drops partial steps).
                if state.batches_in_epoch == run.batches.batches_per_epoch:
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                due = state.step % t.checkpoint_every_steps == 0 or state.step == run.total_steps
                if due or stopping or interval_up:
                    save_seconds = _save_checkpoint(
                        run,
                        state,
                        ckpt_root,
                        t.checkpoints_to_keep,
                        telemetry,
                        watchdog,
                        after_save,
                    )
                    last_save = time.monotonic()
                    stop_budget.saved(save_seconds)
                if stopping:
                    raise Interrupted(state.step, here=stop.requested)
                step_loss, tokens, samples, started = 0.0, 0, 0, time.perf_counter()
                if state.step >= run.total_steps:
                    break
                if not warmed_up:
                    # The first step's warm-up (CUDA context, allocator growth, compiling the
                    # layers: tens of seconds for an 8B model) is not the loop's speed.
                    loop_started, loop_tokens, warmed_up = started, 0, True
    seconds = time.perf_counter() - loop_started
    total = int(acc.reduce(torch.tensor(loop_tokens, device=acc.device), "sum"))
    return total / seconds if total and seconds > 0 else None


def _micro_step(
    run: Prepared, batch: Batch, params: list[torch.nn.Parameter], max_grad_norm: float
) -> tuple[torch.Tensor, float | None]:
    """Forward and backward on one micro-batch; once the accumulation is complete (accelerate
    skips the optimizer until then), the clip and the update. The loss, and the gradient norm
    when this micro-batch clipped it."""
    acc, grad_norm = run.accelerator, None
    with acc.accumulate(run.model):
        loss = run.task.loss(run.model, batch)
        acc.backward(loss)
        if acc.sync_gradients and max_grad_norm > 0:
            # Sharded (fsdp) gradients give a DTensor norm, the same on every rank.
            grad_norm = float(sharding.full_tensor(acc.clip_grad_norm_(params, max_grad_norm)))
        run.optimizer.step()
        run.optimizer.zero_grad()
    return loss, grad_norm


def _agree(
    acc: Accelerator, step_loss: float, stop_requested: bool, interval_up: bool
) -> tuple[float, bool, bool]:
    """The gang's mean loss of the step, whether any rank got SIGTERM and whether any rank's
    checkpointEverySeconds is up, in one collective: every rank stops, and saves, after the
    same step (each judges time on its own clock)."""
    flags = [float(stop_requested), float(interval_up)]
    totals = acc.reduce(torch.tensor([step_loss, *flags], device=acc.device), "sum")
    return float(totals[0]) / acc.num_processes, bool(totals[1] > 0), bool(totals[2] > 0)


def _interval_up(training: TrainingSpec, last_save: float) -> bool:
    """Whether training.checkpointEverySeconds has passed on this rank since `last_save`."""
    every = training.checkpoint_every_seconds
    return every is not None and time.monotonic() - last_save >= every


class _StepReport:
    """After each optimizer step: the telemetry, and every so often the progress log line."""

    def __init__(
        self, run: Prepared, telemetry: TrainerMetrics, params: list[torch.nn.Parameter]
    ) -> None:
        self.run, self.telemetry = run, telemetry
        self.model_flops = flops_per_token(
            sum(p.numel() for p in run.model.parameters()), sum(p.numel() for p in params)
        )
        self.peak_flops = float(os.environ.get(PEAK_FLOPS_ENV) or 0) or None
        self.log_every = max(1, run.total_steps // 50)

    def __call__(
        self,
        step: int,
        epoch: float,
        loss: float,
        grad_norm: float | None,
        tokens: int,
        samples: int,
        duration: float,
    ) -> None:
        """`tokens` and `samples` are this rank's for the step, which took `duration` seconds."""
        run, telemetry = self.run, self.telemetry
        lr = run.scheduler.get_last_lr()[0]
        telemetry.record_step(
            step, epoch, loss, lr, grad_norm, tokens, samples, duration, run.total_steps
        )
        telemetry.record_flops(self.model_flops * tokens / max(duration, 1e-9), self.peak_flops)
        telemetry.record_peak_memory(_peak_memory(run.accelerator))
        if step % self.log_every == 0 or step == run.total_steps:
            # launch.py's progress bar parses this line; keep the `step=i/n` shape.
            log.info(
                "step=%d/%d loss=%.4f lr=%.3g epoch=%.2f tokens/s=%.0f",
                step,
                run.total_steps,
                loss,
                lr,
                epoch,
                tokens / max(duration, 1e-9),
            )


class StopBudget:
    """What a stop (SIGTERM) would take now, which is ending the step the gang is on and saving
    one more checkpoint, against the pods' termination grace period, past which the kubelet
    kills the save: the longest of the recent steps (a SIGTERM may land at the start of one)
    plus the last save. Exported after each save (the operator's SavesOnStop condition, an
    alert), and logged once when it does not fit."""

    # Recent steps, of which the longest counts: steps differ with their batches' lengths.
    STEPS = 20

    def __init__(self, job: FineTuneJob, telemetry: TrainerMetrics) -> None:
        self.grace = job.spec.template.grace_period_seconds()
        self.telemetry, self.warned = telemetry, False
        self.steps: deque[float] = deque(maxlen=self.STEPS)

    def step(self, seconds: float, warm: bool) -> None:
        """A step done; `warm=False` for a run's first, whose warm-up (compiling the layers,
        growing the allocator) no later step repeats."""
        if warm:
            self.steps.append(seconds)

    def saved(self, save_seconds: float) -> None:
        """A checkpoint saved in `save_seconds` (its upload included); nothing is said until a
        step after the first is known."""
        if not self.steps:
            return
        step = max(self.steps)
        need = step + save_seconds
        self.telemetry.record_stop(need, self.grace)
        if need > self.grace and not self.warned:
            self.warned = True
            log.warning(
                "a stop would not fit in the pods' termination grace period: ending a step "
                "(%.1f s) and saving a checkpoint (%.1f s) take %.1f s of its %d s, so a SIGTERM "
                "loses the steps since the last periodic checkpoint; raise "
                "spec.template.terminationGracePeriodSeconds",
                step,
                save_seconds,
                need,
                self.grace,
            )


def _save_checkpoint(
    run: Prepared,
    state: checkpoint.TrainerState,
    root: Path,
    keep: int,
    telemetry: TrainerMetrics,
    watchdog: HangWatchdog,
    after_save: Callable[[Path], object] | None,
) -> float:
    """Every rank gathers what rank 0 saves; rank 0 writes it (and `after_save` uploads it).
    Returns the seconds the whole save took, upload included (every rank waits for it).

    The gathers are collectives, timed as a step's are: a peer stopped after the step would
    otherwise hold rank 0 in them with the watchdog paused, until torch's own timeout (the fault
    test_failure_classes stops a rank at). Rank 0's write and upload may take long while the
    others wait, so they are untimed until every rank is past the save; rank 0 times again once
    its own write is done, so a peer that stops meanwhile (or in the step after) is still caught."""
    acc = run.accelerator
    started = time.perf_counter()
    rng = gather_object([checkpoint.capture_rng()])  # every rank's, saved by rank 0
    folder: Path | None = None
    if sharding.is_sharded(run.model):
        # Every rank gives its shards; rank 0 gets the whole, in a DDP checkpoint's layout.
        trainable, optimizer = sharding.gather_state(run.model, run.optimizer)
    watchdog.pause()
    if acc.is_main_process:
        if not sharding.is_sharded(run.model):
            trainable = modeling.trainable_state(acc.unwrap_model(run.model))
            optimizer = run.optimizer.state_dict()
        folder = checkpoint.save(
            root,
            checkpoint.Checkpoint(
                state=checkpoint.TrainerState(**asdict(state)),
                trainable=trainable,
                optimizer=optimizer,
                scheduler=run.scheduler.state_dict(),
                rng=rng,
            ),
            keep,
        )
        log.info("checkpoint at step %d: %s", state.step, folder)
        telemetry.record_store(checkpoint.disk_bytes(folder), free_bytes(root))
    telemetry.record_checkpoint(time.perf_counter() - started)
    if folder is not None and after_save is not None:
        after_save(folder)
    if acc.is_main_process:
        watchdog.resume()
    acc.wait_for_everyone()
    watchdog.resume()
    return time.perf_counter() - started


def _peak_memory(acc: Accelerator) -> int:
    if acc.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(acc.device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
