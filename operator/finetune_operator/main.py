"""`python -m finetune_operator`: run the operator with a liveness endpoint.

`python -m finetune_operator render JOB.yaml` prints the children of a manifest instead.
"""

from __future__ import annotations

import logging
import sys

import yaml


def render_command(path: str) -> int:
    from finetune_api.validation import ManifestError, load_manifest
    from finetune_operator.render import render_manifests
    from finetune_operator.settings import Settings

    try:
        job = load_manifest(path)
    except ManifestError as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        return 3
    # This process's environment is the operator's: render what it would create.
    yaml.safe_dump_all(render_manifests(job, Settings.from_env()), sys.stdout, sort_keys=False)
    return 0


def run_operator() -> int:
    import kopf

    from finetune_operator import (
        discovery,
        handlers,  # noqa: F401 - registers the handlers
        kueue,
        leader,
    )
    from finetune_operator.settings import Settings

    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # The kubernetes client's HTTP stack logs every request and connection at DEBUG, which at
    # scale drowns the operator's own DEBUG lines; its warnings (retries, a full pool) still show.
    for noisy in ("urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Kueue may be installed after the operator: watch its Workloads as soon as it is served.
    discovery.install({(kueue.GROUP, kueue.PLURAL)})
    # kopf runs standalone (no peering): where two operator processes may overlap, the Lease
    # decides which one acts (leader.py), and this one starts kopf only once it holds it.
    lease = leader.from_env()
    if lease is not None:
        lease.acquire()
    try:
        kopf.run(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=settings.liveness_endpoint,
        )
    finally:
        if lease is not None:
            lease.release()
    # A lost lease stopped kopf as SIGTERM does; exit non-zero, so the container is restarted
    # and waits for the lease again.
    return 1 if lease is not None and lease.lost.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["render"] and len(args) == 2:
        return render_command(args[1])
    if args:
        print("usage: python -m finetune_operator [render JOB.yaml]", file=sys.stderr)
        return 2
    return run_operator()
