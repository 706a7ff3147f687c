"""`finetune wait`: block on a watch until the FineTuneJob finishes, and say how it ended.

Exit 0 when it Succeeded, 1 when it Failed, 124 when --timeout passed first (5 when it cannot be
found or the cluster cannot be asked). The verdict comes from the conditions, as status reads it.
"""

from __future__ import annotations

import argparse
import sys
import time

from finetune_api.constants import Phase
from finetune_cli.exits import Exit
from finetune_cli.kube import Cluster, Target
from finetune_cli.status import one_line, verdict


def cmd_wait(args: argparse.Namespace) -> int:
    cluster = Cluster.connect(Target(args.kubeconfig, args.context, args.namespace))
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    last = None
    for obj in cluster.watch(args.name, deadline):
        last = obj
        ended = verdict(obj)
        if ended is not None:
            print(one_line(obj))
            return Exit.OK if ended == Phase.SUCCEEDED else Exit.FAILED
    assert last is not None  # watch yields the object before it waits
    print(f"timed out after {args.timeout:g}s: {one_line(last)}", file=sys.stderr)
    return Exit.TIMEOUT
