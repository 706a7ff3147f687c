"""`python -m finetune_operator`: run the operator with a liveness endpoint and its metrics.

`python -m finetune_operator render JOB.yaml` prints the children of a manifest instead.
"""

from __future__ import annotations

import logging
import signal
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
        handlers,  # registers the handlers on import; its reconciler serves the metrics
        kueue,
        leader,
    )
    from finetune_operator.settings import Settings
    from finetune_operator.standby import StandbyEndpoint

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
    # Served from the start: a standby is scraped too, its finetune_operator_leader at 0.
    operator_metrics = handlers.reconciler().metrics
    operator_metrics.serve(settings.metrics_port)
    # kopf runs standalone (no peering): where several operator processes run, the Lease decides
    # which one acts (leader.py). The others stand by, healthy, and start kopf once they hold it.
    lease = leader.from_env()
    signal.signal(signal.SIGTERM, _stop_before_kopf)
    try:
        if lease is not None:
            with StandbyEndpoint(settings.liveness_endpoint) as standby:
                lease.acquire(standing_by=standby.start)
        operator_metrics.leader.set(1)
        kopf.run(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=settings.liveness_endpoint,
        )
    except Stopped:
        logging.getLogger(__name__).info("stopped (SIGTERM) before kopf ran")
    finally:
        operator_metrics.leader.set(0)
        if lease is not None:
            lease.release()
    # A lost lease stopped kopf as SIGTERM does; exit non-zero, so the container is restarted
    # and waits for the lease again.
    return 1 if lease is not None and lease.lost.is_set() else 0


class Stopped(BaseException):
    """SIGTERM before kopf took it over. A BaseException, so that no `except Exception` on the
    way (a lease request's) swallows it."""


def _stop_before_kopf(signum: int, frame: object) -> None:
    # As PID 1 of its container the operator would ignore SIGTERM until kopf.run handles it
    # (the kernel drops a signal that PID 1 has no handler for), and a standby, which may wait
    # for the Lease for the pod's whole life, would take its full grace period to be deleted.
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["render"] and len(args) == 2:
        return render_command(args[1])
    if args:
        print("usage: python -m finetune_operator [render JOB.yaml]", file=sys.stderr)
        return 2
    return run_operator()
