"""`finetune logs`: every rank's pod log of one attempt, each line prefixed with its pod.

The pods are those labelled with the FineTuneJob's name and the attempt (the current one unless
--attempt), ordered by completion index, which is the pod's NODE_RANK: `[pod N]` before a line
is that index (the trainer's own `[rank R]` follows inside the line). Without -f the logs are
printed pod after pod; with -f one thread follows each pod, lines interleaved as they come,
until every pod's trainer container has ended.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable
from typing import Any

from finetune_cli.exits import CommandError, Exit
from finetune_cli.kube import Cluster, Target, container_started, pod_index
from finetune_cli.status import verdict

Obj = dict[str, Any]
# How long one discovery watch lasts before it checks whether the FineTuneJob has finished.
DISCOVERY_CHUNK_S = 30


def prefix(pod: Obj) -> str:
    return f"[pod {pod_index(pod)}] "


def _attempt(obj: Obj, requested: int | None) -> int:
    if requested is not None:
        return requested
    return max(1, int((obj.get("status") or {}).get("attempts") or 0))


def print_logs(cluster: Cluster, pods: list[Obj], write: Callable[[str], None]) -> None:
    for pod in pods:
        name = pod["metadata"]["name"]
        if not container_started(pod):
            print(f"{prefix(pod)}(no log yet: the container has not started)", file=sys.stderr)
            continue
        for line in cluster.log_lines(name, follow=False):
            write(prefix(pod) + line)


class Followers:
    """One thread per pod, each streaming its pod's log; lines are written whole, under a lock."""

    def __init__(self, cluster: Cluster, write: Callable[[str], None]) -> None:
        self.cluster, self.write = cluster, write
        self.lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}
        self.errors: list[CommandError] = []

    def add(self, pod: Obj) -> None:
        name = pod["metadata"]["name"]
        if name not in self.threads:
            thread = threading.Thread(target=self._follow, args=(pod,), daemon=True, name=name)
            self.threads[name] = thread
            thread.start()

    def _follow(self, pod: Obj) -> None:
        name, tag = pod["metadata"]["name"], prefix(pod)
        try:
            if not container_started(pod) and not self.cluster.wait_started(name):
                return  # deleted before it ran: nothing to show
            for line in self.cluster.log_lines(name, follow=True):
                with self.lock:
                    self.write(tag + line)
        except CommandError as exc:
            self.errors.append(exc)

    def join(self) -> None:
        for thread in list(self.threads.values()):
            thread.join()


def follow(cluster: Cluster, name: str, attempt: int, write: Callable[[str], None]) -> None:
    """Follow every pod of the attempt, including those the Job controller has yet to create."""
    followers = Followers(cluster, write)
    while True:
        obj = cluster.require(name)
        nodes = int(((obj.get("spec") or {}).get("resources") or {}).get("nodes") or 1)
        for pod in cluster.pods(name, attempt):
            followers.add(pod)
        if len(followers.threads) >= nodes or verdict(obj) is not None:
            break
        for pod in cluster.watch_pods(name, attempt, DISCOVERY_CHUNK_S):
            followers.add(pod)
            if len(followers.threads) >= nodes:
                break
        if len(followers.threads) >= nodes:
            break
    followers.join()
    if followers.errors:
        raise followers.errors[0]


def cmd_logs(args: argparse.Namespace) -> int:
    cluster = Cluster.connect(Target(args.kubeconfig, args.context, args.namespace))
    obj = cluster.require(args.name)
    attempt = _attempt(obj, args.attempt)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if args.follow:
        follow(cluster, args.name, attempt, write)
        return Exit.OK
    pods = cluster.pods(args.name, attempt)
    if not pods:
        raise CommandError(
            f"no pods of attempt {attempt} of {cluster.namespace}/{args.name} (yet, or any more)",
            Exit.CLUSTER,
        )
    print_logs(cluster, pods, write)
    return Exit.OK
