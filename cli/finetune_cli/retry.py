"""`finetune retry`: make a Failed FineTuneJob again, with the same name and spec, so that it
resumes where it stopped (what `argo retry` is to a workflow).

The spec of a FineTuneJob is immutable, so a job that failed for a reason fixed since (a token,
a Hub repo, a quota, a spent backoffLimit or deadline) runs again as a new object. Its work
survives in its checkpoint store: the claim the operator made outlives the Failed job
(output.checkpoints.claimRetentionPolicy) and the new job adopts it; a Hub branch and your own
claim outlive it anyway. The job's folder there is keyed by its name and training spec, so the
new job resumes from the newest checkpoint, or pushes a kept result without training.
"""

from __future__ import annotations

import argparse
import time

from finetune_api.constants import GROUP, SINGULAR, Phase
from finetune_cli.exits import CommandError, Exit
from finetune_cli.kube import Cluster, Obj, Target
from finetune_cli.submit import print_hints

# How long the old object may take to go: kopf's finalizer needs the operator to let it go.
DELETE_WAIT_S = 120.0
# What the operator (kopf's bookkeeping, under the API group) and kubectl wrote about the old
# object: not the new one's. A FineTuneJob made with kopf's last-handled-configuration looks
# handled already to kopf, which then runs no create handler for it.
DROPPED_ANNOTATION_PREFIXES = (f"{GROUP}/", "kopf.zalando.org/", "kubectl.kubernetes.io/")


def again(obj: Obj) -> Obj:
    """The manifest that makes `obj` again: its name, namespace, labels, own annotations and
    spec; nothing the API server, the operator or kubectl wrote about the old object."""
    meta = obj["metadata"]
    annotations = {
        k: v
        for k, v in (meta.get("annotations") or {}).items()
        if not k.startswith(DROPPED_ANNOTATION_PREFIXES)
    }
    new_meta: Obj = {"name": meta["name"], "namespace": meta["namespace"]}
    if meta.get("labels"):
        new_meta["labels"] = dict(meta["labels"])
    if annotations:
        new_meta["annotations"] = annotations
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": new_meta,
        "spec": obj["spec"],
    }


def what_survives(obj: Obj) -> str:
    """Where the new job finds the old one's work, as the old one's status tells it."""
    ckpt = (obj.get("status") or {}).get("checkpoints") or {}
    store, claim = ckpt.get("store"), ckpt.get("claimName")
    if store == "Volume" and ckpt.get("claimRetained") is False:
        return f"its claim {claim} went with it: the new job starts from step 0"
    if store == "Volume":
        return f"it resumes from the checkpoints on claim {claim}"
    if store == "HubBranch":
        return f"it resumes from the checkpoint on branch {ckpt.get('hubBranch')} of its repo"
    return "its checkpoints were not durable: the new job starts from step 0"


def cmd_retry(args: argparse.Namespace) -> int:
    target = Target(args.kubeconfig, args.context, args.namespace)
    cluster = Cluster.connect(target)
    old = cluster.require(args.name)
    phase = (old.get("status") or {}).get("phase")
    if phase != Phase.FAILED:
        raise CommandError(
            f"{args.name} is {phase or 'Pending'}, not Failed: only a Failed FineTuneJob is "
            "made again (a running one restarts by itself within runPolicy.backoffLimit)",
            Exit.USAGE,
        )
    manifest, uid = again(old), old["metadata"]["uid"]
    cluster.delete(old)
    deadline = time.monotonic() + DELETE_WAIT_S
    while (now := cluster.get(args.name)) is not None and now["metadata"]["uid"] == uid:
        if time.monotonic() > deadline:
            raise CommandError(
                f"{args.name} was not gone {DELETE_WAIT_S:g}s after its deletion (is the "
                "operator running? it removes the finalizer)",
                Exit.CLUSTER,
            )
        time.sleep(1)
    if now is not None:
        raise CommandError(f"another {args.name} was made meanwhile: left as it is", Exit.CLUSTER)
    made = cluster.create(manifest)
    namespace = made["metadata"]["namespace"]
    print(
        f"{SINGULAR}.{GROUP}/{args.name} made again in namespace {namespace}: {what_survives(old)}"
    )
    print_hints([(args.name, namespace)], target)
    return Exit.OK
