"""`finetune status` and what `finetune wait` reports: a FineTuneJob's status, read for people.

Pure functions of the object as the API server returns it. The conditions are the truth and
`phase` their summary, so the verdict is read from the conditions first.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from finetune_api.constants import ConditionType, Phase
from finetune_cli.exits import Exit

Obj = dict[str, Any]
CT = ConditionType
# The condition that explains each phase: why it failed, what it waits for, what runs.
EXPLAINS: dict[str, str] = {
    Phase.FAILED: CT.FAILED,
    Phase.SUCCEEDED: CT.SUCCEEDED,
    Phase.SUSPENDED: CT.SUSPENDED,
    Phase.RUNNING: CT.RUNNING,
    Phase.PENDING: CT.CREATED,
}


def _conditions(obj: Obj) -> dict[str, Obj]:
    status = obj.get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or [] if "type" in c}


def verdict(obj: Obj) -> Phase | None:
    """Succeeded or Failed once the FineTuneJob has finished, else None."""
    conditions = _conditions(obj)
    for type_, phase in ((CT.FAILED, Phase.FAILED), (CT.SUCCEEDED, Phase.SUCCEEDED)):
        if conditions.get(type_, {}).get("status") == "True":
            return phase
    phase = (obj.get("status") or {}).get("phase")
    return Phase(phase) if phase in (Phase.SUCCEEDED, Phase.FAILED) else None


def phase_of(obj: Obj) -> str:
    # A plain str, not the enum: the summary goes through yaml.safe_dump too.
    return str(verdict(obj) or (obj.get("status") or {}).get("phase") or Phase.PENDING)


def explaining_condition(obj: Obj) -> Obj | None:
    """The condition behind the phase: the terminal one, or what a pending job is blocked on."""
    conditions = _conditions(obj)
    wanted = EXPLAINS.get(phase_of(obj))
    if wanted is not None and wanted in conditions:
        return conditions[wanted]
    # A blocker (Created=False, say) explains more than nothing.
    return next((c for c in conditions.values() if c.get("status") == "False"), None)


def summary(obj: Obj) -> Obj:
    """What `finetune status -o json|yaml` prints: the status, with the verdict picked out."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    condition = explaining_condition(obj)
    result = {k: v for k, v in (status.get("result") or {}).items() if v is not None}
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "phase": phase_of(obj),
        "reported": bool(status),
        "condition": (
            {k: condition.get(k) for k in ("type", "status", "reason", "message")}
            if condition
            else None
        ),
        "progress": status.get("progress") or {},
        "evaluation": status.get("evaluation") or {},
        "attempts": int(status.get("attempts") or 0),
        "disruptions": int(status.get("disruptions") or 0),
        "result": result if result.get("revision") else None,
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "conditions": status.get("conditions") or [],
        "serve": status.get("serve"),
        "checkpoints": status.get("checkpoints") or {},
        "deleting": bool(meta.get("deletionTimestamp")),
    }


def duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def progress_text(progress: Obj) -> str:
    step, total = int(progress.get("step") or 0), int(progress.get("totalSteps") or 0)
    if not step and not total:
        return "not started"
    parts = [f"step {step}/{total or '?'} ({int(progress.get('percent') or 0)}%)"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{progress['tokensPerSecond']:,.0f} tokens/s")
    if progress.get("etaSeconds") is not None:
        parts.append(f"eta {duration(progress['etaSeconds'])}")
    return ", ".join(parts)


def checkpoints_text(name: str, ckpt: Obj) -> str | None:
    """Where the checkpoints are, where the gang last resumed from, and whether the claim
    outlives the FineTuneJob; None before the operator chose a store."""
    where = {
        "Volume": f"PersistentVolumeClaim {ckpt.get('claimName')}",
        "HubBranch": f"Hub branch {ckpt.get('hubBranch')}",
        "Ephemeral": "nowhere durable: a restart begins at step 0",
    }.get(ckpt.get("store") or "")
    if where is None:
        return None
    parts = [where]
    if ckpt.get("resumedFromStep") is not None:
        parts.append(f"resumed from step {ckpt['resumedFromStep']}")
    if ckpt.get("stepsLost"):
        parts.append(f"{ckpt['stepsLost']} step(s) lost to restarts")
    if ckpt.get("claimRetained"):
        parts.append(f"kept past this FineTuneJob: `finetune retry {name}` resumes from it")
    return ", ".join(parts)


def text(obj: Obj) -> str:
    """The human form: the phase and why, progress, scores before → after, attempts, push."""
    s = summary(obj)
    rows: list[tuple[str, str]] = [
        ("Name", f"{s['namespace']}/{s['name']}"),
        ("Phase", str(s["phase"])),
    ]
    condition = s["condition"]
    if condition:
        rows.append(
            ("Reason", f"{condition['reason'] or '-'} ({condition['type']}={condition['status']})")
        )
        if condition.get("message"):
            rows.append(("Message", str(condition["message"])))
    elif not s["reported"]:
        rows.append(("Reason", "no status yet: the operator has not seen this FineTuneJob"))
    if s["deleting"]:
        finalizers = (obj.get("metadata") or {}).get("finalizers") or []
        rows.append(
            (
                "Deleting",
                "the operator stops the gang, then keeps its checkpoint claim "
                "(claimRetentionPolicy.whenDeleted: Retain)"
                if finalizers
                else "its children go with it",
            )
        )
    rows.append(("Progress", progress_text(s["progress"])))
    if (where := checkpoints_text(str(s["name"]), s["checkpoints"])) is not None:
        rows.append(("Checkpoints", where))
    stop = _conditions(obj).get(CT.SAVES_ON_STOP) or {}
    if stop.get("status") == "False":
        # A SIGTERM would lose the steps since the last save: worth a line while it trains.
        rows.append(("Warning", f"{stop.get('reason')}: {stop.get('message')}"))
    for i, (metric, scores) in enumerate(sorted(s["evaluation"].items())):
        before, after = _score(scores.get("before")), _score(scores.get("after"))
        rows.append(("Evaluation" if i == 0 else "", f"{metric} {before} → {after}"))
    attempts = str(s["attempts"])
    if s["disruptions"]:
        attempts += f" ({s['disruptions']} restart(s) after a disruption, not counted as failures)"
    rows.append(("Attempts", attempts))
    result = s["result"]
    if result:
        pushed = f"{result.get('repo')}@{result['revision']} ({result.get('artifact', 'adapter')})"
        rows.append(("Pushed", pushed))
        if result.get("url"):
            rows.append(("", str(result["url"])))
    served = s["serve"]
    if served:
        # spec.serve: what answers, where, and the model name requests send.
        state = "ready" if served.get("ready") else "not ready"
        revision = served.get("revision") or "no revision yet"
        rows.append(("Serving", f"{served.get('reason')} ({state}), {revision}"))
        rows.append(("", f"{served.get('url')} model {served.get('model')}"))
    return "\n".join(f"{(k + ':') if k else '':<11} {v}" for k, v in rows)


def one_line(obj: Obj) -> str:
    """`NAME: PHASE (Reason: message)`, for wait's final word."""
    condition = explaining_condition(obj) or {}
    why = ": ".join(str(condition[k]) for k in ("reason", "message") if condition.get(k))
    name = (obj.get("metadata") or {}).get("name")
    return f"{name}: {phase_of(obj)}" + (f" ({why})" if why else "")


def cmd_status(args: argparse.Namespace) -> int:
    from finetune_cli.kube import Cluster, Target

    cluster = Cluster.connect(Target(args.kubeconfig, args.context, args.namespace))
    obj = cluster.require(args.name)
    if args.output == "json":
        print(json.dumps(summary(obj), indent=2, ensure_ascii=False))
    elif args.output == "yaml":
        import yaml

        yaml.safe_dump(summary(obj), sys.stdout, sort_keys=False, allow_unicode=True)
    else:
        print(text(obj))
    return Exit.OK
