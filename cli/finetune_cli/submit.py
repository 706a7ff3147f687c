"""`finetune submit`: validate, then server-side apply each FineTuneJob of a file.

Apply (field manager `finetune-cli`) makes a second submit of the same file a no-op rather than
a conflict, and a changed file an update that the CRD's immutability rules judge.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from finetune_api.constants import GROUP, SINGULAR
from finetune_cli import manifests
from finetune_cli.exits import CommandError, Exit
from finetune_cli.kube import Cluster, Target


def watch_hints(name: str, namespace: str, target: Target) -> list[str]:
    """The commands that follow the job, with the flags that reach the same cluster."""
    flags = ["-n", namespace]
    if target.context:
        flags += ["--context", target.context]
    if target.kubeconfig:
        flags += ["--kubeconfig", target.kubeconfig]
    opts = " ".join(shlex.quote(f) for f in flags)
    return [
        f"kubectl get ftj {name} -w {opts}",
        f"finetune status {name} {opts}",
        f"finetune logs {name} -f {opts}",
        f"finetune wait {name} {opts}",
    ]


def cmd_submit(args: argparse.Namespace) -> int:
    docs = manifests.check([args.manifest], local=False)
    if not all(d.valid for d in docs):
        manifests.print_report(docs, sys.stdout, sys.stderr)
        return Exit.INVALID
    target = Target(args.kubeconfig, args.context, args.namespace)
    cluster = Cluster.connect(target)
    applied = []
    for doc in docs:
        assert doc.raw is not None and doc.name is not None
        body = {k: v for k, v in doc.raw.items() if k != "status"}  # status is the operator's
        meta = dict(body.get("metadata") or {})
        given = meta.get("namespace")
        if args.namespace and given and given != args.namespace:
            raise CommandError(
                f"{doc.label}: metadata.namespace is {given}, but -n says {args.namespace}",
                Exit.USAGE,
            )
        namespace = given or cluster.namespace
        body["metadata"] = {**meta, "namespace": namespace}
        before = cluster.get(doc.name, namespace)
        after = cluster.apply(body, force=args.force_conflicts)
        if before is None:
            verb = "created"
        elif before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]:
            verb = "unchanged"
        else:
            verb = "configured"
        print(f"{SINGULAR}.{GROUP}/{doc.name} {verb} in namespace {namespace}")
        applied.append((doc.name, namespace))
    print_hints(applied, target)
    return Exit.OK


def print_hints(jobs: list[tuple[str, str]], target: Target) -> None:
    """How to follow each (name, namespace) FineTuneJob."""
    print("\nFollow it with:")
    for name, namespace in jobs:
        for hint in watch_hints(name, namespace, target):
            print(f"  {hint}")
