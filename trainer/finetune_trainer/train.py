"""Fine-tune the model of one FineTuneJob: the script every rank runs.

    finetune run job.yaml                    # local mode: every node and rank on this machine
    NODE_RANK=0 NNODES=1 finetune train job.yaml   # one pod of the gang

`finetune train` starts one process per local rank with RANK, WORLD_SIZE and MASTER_* set, and
each runs `main(job)`: seed, Accelerator, data (under main_process_first), model with a pure
`lora_config`, resume from the newest complete checkpoint, train (`loop.train_steps`: accumulated
steps, rotated checkpoints, a gang-wide stop on SIGTERM), wait for everyone, evaluate, and on
rank 0 save, judge the gates, keep the artifact in the checkpoint folder, push and write the
result. An attempt that finds that kept artifact (an earlier push failed) only pushes it.

What differs between task types (data, model, loss, scores, artifact, card) is the job's task
module's, from `finetune_trainer.tasks`; telemetry is recorded at the boundaries of these steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    GradientAccumulationPlugin,
    broadcast_object_list,
    set_seed,
)
from torch.utils.data import DataLoader
from transformers import get_scheduler

from finetune_api import FineTuneJob, FineTuneJobSpec, ManifestError, phases, pod
from finetune_api.constants import Reason
from finetune_api.pod import ExitCode
from finetune_api.result import Sample, TrainerResult, scrub
from finetune_api.v1alpha1 import TrainingSpec
from finetune_trainer import checkpoint, fetch, final, modeling, sharding, spread
from finetune_trainer.accelerators import AcceleratorUnavailable, check_accelerator
from finetune_trainer.checkpoint_mirror import CheckpointMirror
from finetune_trainer.data import DatasetError, ShardedBatches, load_splits
from finetune_trainer.device_memory import is_out_of_memory, out_of_memory_message, stage_of
from finetune_trainer.env import PARAM_HASH_ENV, allocator_in_use, runtime_errors, setup_logging
from finetune_trainer.job_folder import checkpoint_root
from finetune_trainer.logtail import with_log_tail
from finetune_trainer.loop import Interrupted, Prepared, train_steps
from finetune_trainer.result import write_failure, write_result
from finetune_trainer.scoring import ScorerUnavailable, gate_failures
from finetune_trainer.sources import SourceNotFound, missing_local
from finetune_trainer.store import mark_formed, wait_for_store
from finetune_trainer.tasks import Task, TaskData, task_for
from finetune_trainer.telemetry import TrainerMetrics
from finetune_trainer.watchdog import HangWatchdog

log = get_logger(__name__)
# Before the Accelerator exists (and when it failed to), accelerate's logger refuses to log.
plain_log = logging.getLogger(__name__)


def main(job: FineTuneJob) -> int:
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(f"rank {rank}")
    telemetry: TrainerMetrics | None = None

    def fail(reason: str, message: str) -> None:
        # Rank 0's phase stamps go with its verdict (result.write_failure says why).
        write_failure(rank, reason, message, telemetry.phases if telemetry else None)

    try:
        missing = missing_local(job)
        if missing is not None:
            raise missing
        check_accelerator(job.spec.resources)
        errors = runtime_errors(job)
        if errors:
            raise ManifestError(errors)
        telemetry = _start_telemetry(job)
        return _train(job, telemetry)
    except SourceNotFound as exc:
        plain_log.error("%s: %s", exc.field, exc)
        fail(exc.reason, str(exc))
        return TrainerResult(status="Failed", reason=exc.reason).exit_code
    except Interrupted as exc:
        plain_log.warning("%s", exc)
        fail(Reason.INTERRUPTED, str(exc))
        # The pod that got SIGTERM goes (the Job controller replaces it, see ExitCode); the
        # others stay, and `finetune train` starts their ranks again to rejoin.
        return ExitCode.INTERRUPTED if exc.here else ExitCode.REJOIN
    except AcceleratorUnavailable as exc:
        plain_log.error("accelerator unavailable: %s", exc)
        fail(Reason.ACCELERATOR_UNAVAILABLE, str(exc))
        return TrainerResult(status="Failed", reason=Reason.ACCELERATOR_UNAVAILABLE).exit_code
    except ScorerUnavailable as exc:
        # A metric that cannot be computed is the spec's to fix (another name, the Hub, the
        # fields generation needs); no other attempt would compute it.
        plain_log.error("%s", exc)
        fail(Reason.INVALID_SPEC, f"spec.evaluation.metrics: {exc}")
        return ExitCode.INVALID_SPEC
    except ManifestError as exc:
        for error in exc.errors:
            plain_log.error("invalid spec: %s", error)
        fail(Reason.INVALID_SPEC, str(exc))
        return ExitCode.INVALID_SPEC
    except DatasetError as exc:
        # The result carries the error and what the rank logged before it (the tail is taken
        # first, so the error is not in it twice); the traceback goes to the pod log only.
        message = with_log_tail(str(exc), rank)
        plain_log.error("invalid dataset: %s", scrub(str(exc)), exc_info=exc.__cause__ or exc)
        fail(Reason.INVALID_DATASET, message)
        return ExitCode.INVALID_SPEC
    except Exception as exc:
        if is_out_of_memory(exc):
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            stage = stage_of(telemetry.phases if telemetry else {})
            message = out_of_memory_message(job.spec, str(exc), world_size, stage)
            plain_log.error("%s", scrub(message), exc_info=exc)
            fail(Reason.DEVICE_OUT_OF_MEMORY, message)
            return TrainerResult(status="Failed", reason=Reason.DEVICE_OUT_OF_MEMORY).exit_code
        plain_log.error("training failed: %s", scrub(f"{type(exc).__name__}: {exc}"))
        fail(Reason.TRAINING_FAILED, f"{type(exc).__name__}: {exc}")
        return ExitCode.RETRYABLE


def _train(job: FineTuneJob, telemetry: TrainerMetrics) -> int:
    spec = job.spec
    task = task_for(spec)
    ckpt_root = checkpoint_root(job)
    # Checked on every rank before the rendezvous, so a bad setting fails the whole gang alike.
    mirror = CheckpointMirror.from_env(job, ckpt_root.name, telemetry)

    set_seed(spec.training.seed)
    accelerator = _accelerator(spec)
    telemetry.record_phase(phases.RENDEZVOUS)
    saved = _saved_final(job, accelerator)
    if saved is not None:  # trained and evaluated before; only the push is left
        verdict = _push_saved(job, saved, telemetry) if accelerator.is_main_process else None
        return _leave(accelerator, telemetry, verdict)

    telemetry.set_status("loading")
    # Rank 0 resolves each hf:// source to a commit and downloads it, and sends its copy to the
    # pods that share no volume with it: once per job; every rank loads it.
    with spread.peers(accelerator.is_local_main_process) as peers:
        commits = fetch.fetch_sources(spec, ckpt_root, peers)
    if commits != fetch.NO_COMMITS:  # file:// sources, or offline: nothing was downloaded
        telemetry.record_phase(phases.DOWNLOADED)
    with accelerator.main_process_first():
        data = task.build_data(*load_splits(spec))
    telemetry.record_phase(phases.DATA_LOADED)
    log.info("%d training and %d evaluation rows", len(data.train), len(data.evaluation))
    with accelerator.local_main_process_first():
        device = sharding.loading_device(spec, accelerator.process_index, accelerator.device)
        model = task.load_model(data, device)
    if device == sharding.META:
        log.info(
            "the base is built empty here: its shards come from rank 0 (fsdp)",
            main_process_only=False,
        )
    # Same seed everywhere made the initial weights equal; now let dropout differ per rank.
    set_seed(spec.training.seed + accelerator.process_index)
    telemetry.record_phase(phases.MODEL_LOADED)
    checkpoint_size = checkpoint.expected_size(model)  # whole: _prepare may shard the model
    run = _prepare(job, accelerator, task, data, model)
    state, resumed_from = _resume(run, ckpt_root, mirror)
    if accelerator.is_main_process:  # the one rank that writes checkpoints
        t = spec.training
        saves = checkpoint.saves_due(state.step, run.total_steps, t.checkpoint_every_steps)
        checkpoint.check_room(ckpt_root, checkpoint_size, saves, t.checkpoints_to_keep)
    telemetry.record_resume(resumed_from)
    # A resumed run keeps the before-training scores (and answers) of its first attempt.
    known = state.before_scores
    hang_floor = job.spec.run_policy.hang_timeout_seconds
    state.before_scores = _evaluate(run, telemetry, "before", hang_floor, known)
    if not known:  # evaluated just now
        state.before_answers = [s.after or "" for s in task.generated]
    telemetry.record_phase(phases.EVALUATED_BEFORE)

    telemetry.set_status("training")
    after_save = mirror.upload if mirror is not None else None
    tokens_per_second = train_steps(job, run, state, ckpt_root, telemetry, after_save)
    telemetry.record_last_step()
    accelerator.wait_for_everyone()

    after = _evaluate(run, telemetry, "after", hang_floor)
    telemetry.record_phase(phases.EVALUATED_AFTER)
    _write_param_hash(run)
    final_model = _final_model(run)
    result = TrainerResult(
        status="Succeeded",
        reason=Reason.TRAINING_COMPLETED,
        evaluation={
            name: {"before": state.before_scores.get(name), "after": after.get(name)}
            for name in task.metrics
        },
        artifact=modeling.artifact_kind(spec),
        model_revision=commits.model,
        dataset_revision=commits.dataset,
        vae_revision=commits.vae,
        steps=state.step,
        train_loss=_recent_loss(state.loss_history),
        resumed_from_step=resumed_from,
        tokens_per_second=tokens_per_second,
        samples=_paired_samples(state.before_answers, task.generated),
    )
    verdict = None
    if accelerator.is_main_process:
        assert final_model is not None
        verdict = _finish(job, run, final_model, result, after, telemetry)
    return _leave(accelerator, telemetry, verdict)


def _final_model(run: Prepared) -> torch.nn.Module | None:
    """The trained model as rank 0 saves it (None on the other ranks). A sharded one is
    gathered: every rank gives its shards of what trained (everything, for a full fine-tune) to
    rank 0's CPU, as accelerate's FULL_STATE_DICT with rank0_only and CPU offload would. A LoRA's
    go into a plain copy of the model built there from the base; a full fine-tune's are the
    whole model, so they fill one built empty, without reading the base again: rank 0 needs the
    host memory of the model once, and no device ever holds all of it."""
    acc = run.accelerator
    if not sharding.is_sharded(run.model):
        return acc.unwrap_model(run.model) if acc.is_main_process else None
    full = run.task.spec.peft.method == "none"
    weights = sharding.gather_weights(run.model, trainable_only=not full)
    if not acc.is_main_process:
        return None
    if full:
        plain = run.task.load_model(run.data, sharding.META)
        sharding.fill_plain(plain, weights, run.model)
        return plain
    plain = run.task.load_model(run.data, torch.device("cpu"))
    result = plain.load_state_dict(weights, strict=False)
    trained = {n for n, p in plain.named_parameters() if p.requires_grad}
    missing = trained & set(result.missing_keys)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"gathered weights do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    return plain


def _paired_samples(before: list[str], after: list[Sample]) -> list[Sample]:
    """The after-training samples with the same prompts' before-training answers."""
    return [
        s.model_copy(update={"before": before[i] if i < len(before) else None})
        for i, s in enumerate(after)
    ]


def _leave(
    accelerator: Accelerator,
    telemetry: TrainerMetrics,
    verdict: tuple[ExitCode, TrainerResult] | None,
) -> ExitCode:
    """Every rank leaves with rank 0's verdict (`verdict`, on rank 0), so a pod's exit code tells
    the whole story. Each other pod writes a small result of its own after a success, and rank
    0's whole account (the evaluation a gate missed, the push's error, the steps) after a
    failure: the Job fails the moment any pod fails, and the operator may read that pod's
    result, and judge the attempt by it, before rank 0's pod (still serving its last metrics)
    has ended."""
    code, result = verdict if verdict is not None else (None, None)
    said = None if code is None or result is None else (int(code), result.to_message())
    number, message = broadcast_object_list([said], from_process=0)[0]
    code = ExitCode(number)
    telemetry.set_status("succeeded" if code == ExitCode.OK else "failed")
    if not accelerator.is_main_process and accelerator.is_local_main_process:
        status = "Succeeded" if code == ExitCode.OK else "Failed"
        rank = accelerator.process_index
        theirs = TrainerResult.parse(message) if code != ExitCode.OK else None
        if theirs is not None:
            write_result(theirs.model_copy(update={"rank": rank}))
        else:
            write_result(TrainerResult(status=status, rank=rank))
    accelerator.end_training()
    # Prometheus scrapes on its own clock: without a pause the after-training scores and the
    # final step would vanish with the process before any scrape saw them. The operator reads
    # them from the result, so the pause is only for a PodMonitor (the operator sets the
    # variable then). A fixed pause, not "until the next scrape": the operator's own progress
    # read is a GET of /metrics too, and would end the wait before Prometheus came.
    linger = float(os.environ.get(pod.METRICS_LINGER_ENV) or 0)
    if linger > 0:
        time.sleep(linger)
    return code


def _start_telemetry(job: FineTuneJob) -> TrainerMetrics:
    """This rank's Prometheus metrics, served from the start so a scrape sees it load."""
    rank = int(os.environ.get("RANK", "0"))
    telemetry = TrainerMetrics(job.metadata.name, job.metadata.namespace, rank)
    base = int(os.environ.get(pod.METRICS_PORT_ENV, pod.METRICS_PORT))
    # Ranks of one pod share its network namespace, so each takes its own port.
    port = base + int(os.environ.get("LOCAL_RANK", "0")) if base else 0
    try:
        actual = telemetry.start_server(port)
        plain_log.info("metrics on :%d/metrics", actual)
    except OSError as exc:
        plain_log.warning("no metrics server on port %d: %s", port, exc)
    return telemetry


def _accelerator(spec: FineTuneJobSpec) -> Accelerator:
    """The Accelerator; creating it forms the process group (the gang's rendezvous)."""
    # The ranks of other pods first reach rank 0's store with short connections of their own
    # (node 0's ranks reach it on loopback, env.Rendezvous.rank_env).
    if int(os.environ.get(pod.NODE_RANK, "0")) > 0:
        wait_for_store(os.environ[pod.MASTER_ADDR], int(os.environ[pod.MASTER_PORT]))
    accelerator = Accelerator(
        # Never a silent fall back to the CPU: check_accelerator failed the pod before this.
        cpu=spec.resources.accelerator.type == "cpu",
        mixed_precision=modeling.mixed_precision(spec.training.precision),
        # Our train batches do not come from a prepared loader, so sync on the step count only.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=spec.training.gradient_accumulation_steps, sync_with_dataloader=False
        ),
    )
    log.info(
        "rank %d of %d on %s, mixed precision %s",
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        main_process_only=False,
    )
    if accelerator.is_main_process and accelerator.num_processes > 1:
        # So that a rank rejoining the next gang passes over this store once it goes. Without
        # the mark such a rank only waits as it did before the mark existed.
        try:
            mark_formed(os.environ[pod.MASTER_ADDR], int(os.environ[pod.MASTER_PORT]))
        except (RuntimeError, OSError) as exc:
            log.warning("could not mark the rendezvous store as formed: %s", exc)
    return accelerator


def lr_schedule(
    training: TrainingSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """training.lrSchedulerType after training.warmupSteps (or warmupRatio), over the run's
    `total_steps` optimizer steps: transformers' own schedulers, as its Trainer builds them."""
    return get_scheduler(
        training.lr_scheduler_type,
        optimizer,
        num_warmup_steps=training.warmup_for(total_steps),
        num_training_steps=total_steps,
    )


def _prepare(
    job: FineTuneJob,
    accelerator: Accelerator,
    task: Task,
    data: TaskData,
    model: torch.nn.Module,
) -> Prepared:
    """This rank's batches, the optimizer and schedule, and the one `accelerator.prepare`."""
    t = job.spec.training
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    log.info(
        "weights load in %s (frozen) and %s (trained); strategy %s, gradient checkpointing %s; "
        "threads per rank %d; memory from %s",
        sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}) or "-",
        sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        job.spec.training.strategy,
        modeling.gradient_checkpointing(job.spec),
        torch.get_num_threads(),
        allocator_in_use(),
    )
    batches = ShardedBatches(
        len(data.train),
        t.batch_size_per_device,
        accelerator.process_index,
        accelerator.num_processes,
        t.gradient_accumulation_steps,
        t.seed,
    )
    steps_per_epoch = batches.batches_per_epoch // t.gradient_accumulation_steps
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    eval_dl = DataLoader(
        data.evaluation, batch_size=t.batch_size_per_device, collate_fn=data.collate
    )
    # Before sharding and DDP, as torchtitan orders them: their hooks stay outside the compiled
    # layers (dynamo skips FSDP's), and the layers keep their names.
    compiled_layers = modeling.apply_compile(job.spec, model)
    fsdp = sharding.uses_fsdp(job.spec)
    if fsdp:
        # Before the optimizer, which then holds the shards; not through `prepare` (sharding.py).
        model = sharding.shard(model, accelerator.mixed_precision, accelerator.device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
    )
    # Not prepared: accelerate's scheduler wrapper steps once per process per optimizer step.
    scheduler = lr_schedule(t, optimizer, total_steps)
    if fsdp:
        optimizer, eval_dl = accelerator.prepare(optimizer, eval_dl)
    else:
        model, optimizer, eval_dl = accelerator.prepare(model, optimizer, eval_dl)
    return Prepared(
        accelerator,
        task,
        data,
        model,
        optimizer,
        scheduler,
        eval_dl,
        batches,
        total_steps,
        compiled=compiled_layers > 0,
    )


def _resume(
    run: Prepared, root: Path, mirror: CheckpointMirror | None
) -> tuple[checkpoint.TrainerState, int | None]:
    acc = run.accelerator
    payload: list[checkpoint.Checkpoint | None] = [None]
    if acc.is_main_process:
        found = checkpoint.load_newest(root)
        # New pods: the Hub branch may hold one.
        if found is None and mirror is not None and mirror.restore(root) is not None:
            found = checkpoint.load_newest(root)
        if found is not None:
            log.info("resuming from %s", found[0])
            payload[0] = found[1]
    # Only rank 0 reads the volume; the others get the state over the wire.
    ckpt = broadcast_object_list(payload, from_process=0)[0]
    if ckpt is None:
        fresh = checkpoint.TrainerState(
            step=0, epoch=0, batches_in_epoch=0, world_size=acc.num_processes
        )
        return fresh, None
    if sharding.is_sharded(run.model):
        # Every rank holds the whole state (the broadcast) and keeps its own shard of it.
        sharding.load_state(run.model, run.optimizer, ckpt.trainable, ckpt.optimizer)
    else:
        params = dict(acc.unwrap_model(run.model).named_parameters())
        with torch.no_grad():
            for name, value in ckpt.trainable.items():
                params[name].copy_(value.to(params[name].device))
        run.optimizer.load_state_dict(ckpt.optimizer)
    run.scheduler.load_state_dict(ckpt.scheduler)
    if len(ckpt.rng) == acc.num_processes:
        checkpoint.restore_rng(ckpt.rng[acc.process_index])
    log.info("resumed from step %d", ckpt.state.step)
    return ckpt.state, ckpt.state.step


def _evaluate(
    run: Prepared,
    telemetry: TrainerMetrics,
    stage: Literal["before", "after"],
    hang_floor: float,
    known: dict[str, float] | None = None,
) -> dict[str, float]:
    """The task's scores on the evaluation split (or the `known` ones), exported and logged.
    Its batches, and the forwards of generated tokens, are timed as training steps are
    (`HangWatchdog.timed`): a peer lost meanwhile ends the attempt with CollectiveTimeout, not
    after torch's 30-minute collective timeout."""
    telemetry.set_status("evaluating")
    log.info("evaluating %s training", stage)
    watch = HangWatchdog(
        hang_floor,
        run.accelerator.process_index,
        what="evaluation step",
        phases=lambda: telemetry.phases,
    )
    # Not timed until the task asks for the batches: the scores of a task that computes them
    # on rank 0 alone (sentence-embedding) may take long while the others wait.
    watch.pause()
    # Uncompiled: evaluation's shapes (generation's growing sequences above all) would each
    # compile the layers again, for a pass that runs twice per job.
    with torch.compiler.set_stance("force_eager"), watch as watchdog:
        batches = watchdog.timed(run.eval_dl)
        scores = known or run.task.evaluate(run.accelerator, run.model, batches, watchdog.timed)
    if sharding.is_sharded(run.model):
        sharding.reshard(run.model)
    telemetry.record_eval(stage, scores)
    log.info("%s training: %s", stage, scores)
    return scores


def _recent_loss(history: list[float], window: int = 10) -> float | None:
    recent = history[-window:]
    return sum(recent) / len(recent) if recent else None


def _write_param_hash(run: Prepared) -> None:
    """Test hook (FINETUNE_DEBUG_PARAM_HASH_FILE): a digest of this rank's trainable weights, so
    a test can check that every rank ended with the same ones. `{rank}` in the path is filled."""
    target = os.environ.get(PARAM_HASH_ENV)
    if not target:
        return
    digest = hashlib.sha256()
    state = modeling.trainable_state(run.accelerator.unwrap_model(run.model))
    # A sharded rank's own parameters are its shards: hash the whole values (a collective).
    state = {name: sharding.full_tensor(value) for name, value in state.items()}
    for name in sorted(state):
        digest.update(name.encode())
        # A copy: numpy's view would pin the storage, which a sharded model frees and regrows.
        digest.update(state[name].float().cpu().clone().numpy().tobytes())
    rank = run.accelerator.process_index
    path = target.format(rank=rank) if "{rank}" in target else f"{target}.{rank}"
    Path(path).write_text(digest.hexdigest())


def _saved_final(job: FineTuneJob, accelerator: Accelerator) -> final.SavedFinal | None:
    """The final artifact an earlier attempt kept for its push, as rank 0 found it."""
    found: list[final.SavedFinal | None] = [None]
    if accelerator.is_main_process and job.spec.output.hub is not None:
        found[0] = final.load(checkpoint_root(job), modeling.artifact_kind(job.spec))
    return broadcast_object_list(found, from_process=0)[0]


def _push_saved(
    job: FineTuneJob, saved: final.SavedFinal, telemetry: TrainerMetrics
) -> tuple[ExitCode, TrainerResult]:
    """Rank 0: push the kept artifact, reporting the evaluation of the attempt that trained it."""
    result = saved.result.model_copy(deep=True)
    log.info(
        "found the %s trained to step %s in %s: pushing it without training or evaluating again",
        result.artifact,
        result.steps,
        saved.folder,
    )
    # Nothing was trained in this attempt: it resumed at the last step.
    result.resumed_from_step, result.tokens_per_second = result.steps, None
    for stage in ("before", "after"):
        scores = {n: getattr(s, stage) for n, s in result.evaluation.items()}
        telemetry.record_eval(stage, {n: v for n, v in scores.items() if v is not None})
    after = {n: s.after for n, s in result.evaluation.items() if s.after is not None}
    missed = gate_failures(job.spec.evaluation.gates, after)
    return _publish(job, saved.artifact_dir, result, missed, telemetry)


def _finish(
    job: FineTuneJob,
    run: Prepared,
    model: torch.nn.Module,
    result: TrainerResult,
    after: dict[str, float],
    telemetry: TrainerMetrics,
) -> tuple[ExitCode, TrainerResult]:
    """Rank 0: save the artifact, judge the gates, keep the artifact, push, write the result."""
    out = Path(os.environ.get(pod.OUTPUT_DIR_ENV) or tempfile.mkdtemp(prefix="finetune-output-"))
    out.mkdir(parents=True, exist_ok=True)
    result.artifact = run.task.save(model, run.data, out)
    log.info("saved %s to %s", result.artifact, out)
    missed = gate_failures(job.spec.evaluation.gates, after)
    if not missed and job.spec.output.hub is not None:
        out = _keep(job, out, result)
    telemetry.record_phase(phases.SAVED)
    return _publish(job, out, result, missed, telemetry)


def _keep(job: FineTuneJob, out: Path, result: TrainerResult) -> Path:
    """Keep the artifact in the checkpoint folder before the push, so that an attempt after a
    failed push pushes it without training; the folder to push from."""
    try:
        kept = final.save(checkpoint_root(job), out, result)
    except OSError as exc:  # e.g. a full volume: the push can still succeed
        log.warning("could not keep the final artifact (a failed push retrains): %s", exc)
        return out
    log.info("kept the final %s in %s", result.artifact, kept.folder)
    return kept.artifact_dir


def _publish(
    job: FineTuneJob,
    artifact_dir: Path,
    result: TrainerResult,
    missed: list[str],
    telemetry: TrainerMetrics,
) -> tuple[ExitCode, TrainerResult]:
    """Rank 0: push unless a gate was `missed`, and write the result; the exit code and it."""
    code = ExitCode.OK
    if missed:
        result.status, result.reason = "Failed", Reason.EVALUATION_GATE_FAILED
        result.message = "; ".join(missed) + "; nothing was pushed"
        log.warning("evaluation gate missed: %s", result.message)
        code = ExitCode.GATE_FAILED
    elif job.spec.output.hub is not None:
        telemetry.set_status("pushing")
        code = _push(job, artifact_dir, result)
        telemetry.record_phase(phases.PUSHED)
    telemetry.record_phase(phases.RESULT_WRITTEN)
    # Where the attempt's time went, for status.startup and status.finish.
    result.phases = telemetry.phases
    write_result(result)
    log.info("result: %s", result.to_message())
    return code, result


def _push(job: FineTuneJob, out: Path, result: TrainerResult) -> ExitCode:
    from finetune_trainer.publish import PushError, push_to_hub

    try:
        scores = {name: score.model_dump() for name, score in result.evaluation.items()}
        commits = fetch.Commits(result.model_revision, result.dataset_revision, result.vae_revision)
        pushed = push_to_hub(
            job, out, scores, result.artifact, samples=result.samples, commits=commits
        )
    except PushError as exc:
        result.status, result.reason, result.message = "Failed", Reason.PUSH_FAILED, str(exc)
        result.retryable = not exc.permanent
        log.error("%s", exc)
        return result.exit_code
    result.repo, result.revision, result.url = pushed.repo, pushed.revision, pushed.url
    # Where it landed: a branch, or the pull request output.hub.createPr opened.
    result.branch = pushed.branch
    result.pr_revision, result.pr_url = pushed.pr_revision, pushed.pr_url
    result.reason = Reason.PUSHED
    if pushed.note:  # e.g. the repo was public and was made private
        result.message = pushed.note
    log.info("pushed %s to %s at revision %s", result.artifact, pushed.repo, pushed.revision)
    return ExitCode.OK
