"""How long a restart takes on a warm kind cluster with nothing else training: a benchmark.

    make bench        # or: pytest -m bench tests/kind/test_restart_time.py -s

One 2-node job (examples/tiny-cpu.yaml, longer), alone in the cluster. Rank 0's pod, then rank
1's, then rank 0's again is deleted while the gang trains. The first stop of an attempt is
replaced in place (the Job controller replaces that pod and the gang rejoins it, finding rank 0
through the rendezvous Service); the second restarts the gang as attempt 2 (the Job controller
would wait 20 s to replace it); the third is attempt 2's first, in place again. Each restart
is timed from the delete to rank 0 of the re-formed gang resuming from the SIGTERM checkpoint
(`status.checkpoints.lastResumeTime`, which rank 0 reports), and split into: the stopped pod
gone (the gang saved), its replacement made, running, done importing (its first log line), and
the resume. The job's own first start, from apply to its first resume, is the baseline in the
same run. Results: benchmarks/results/restart_kind.json.

Deselected from `make test` (the `bench` mark, see conftest.py): it is a measurement, and the
fault suite (test_faults.py) proves what a restart must keep, under load.
"""

from __future__ import annotations

import functools
import json
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from kind_tools import epoch
from kind_tools import poll as poll_every
from test_e2e import example_job, setup_hub

pytestmark = [pytest.mark.kind, pytest.mark.bench]

Obj = dict[str, Any]
# Looked at every 0.25 s: fine enough to time each step of a restart.
poll = functools.partial(poll_every, every=0.25)
NAME = "restart-bench"
JOB_LABEL = "finetune.dev/job-name"
INDEX = "batch.kubernetes.io/job-completion-index"
RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "restart_kind.json"
FAULTS = (0, 1, 0)  # the completion index deleted, in turn
STEPS_BETWEEN = 3  # trained after each resume before the next fault


class Bench:
    """The benchmark's job, read with kubectl."""

    def __init__(self, kube: Any, ns: str) -> None:
        self.kube, self.ns = kube, ns

    def status(self) -> Obj:
        return self.kube.json("-n", self.ns, "get", "finetunejob", NAME).get("status") or {}

    def pods(self, index: int) -> list[Obj]:
        items = self.kube.json("-n", self.ns, "get", "pods", "-l", f"{JOB_LABEL}={NAME}")["items"]
        return [p for p in items if p["metadata"]["annotations"].get(INDEX) == str(index)]

    def last_resume(self) -> str | None:
        return (self.status().get("checkpoints") or {}).get("lastResumeTime")

    def trained_on(self) -> Obj | None:
        """The status once the gang trained STEPS_BETWEEN steps past where it resumed."""
        st = self.status()
        resumed = (st.get("checkpoints") or {}).get("resumedFromStep") or 0
        return st if (st.get("progress") or {}).get("step", 0) >= resumed + STEPS_BETWEEN else None

    def restart(self, index: int) -> Obj:
        """Delete the running pod of completion index `index`; time the restart."""
        before = self.last_resume()
        old = next(
            p["metadata"]["name"]
            for p in self.pods(index)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        )
        t0 = time.time()
        self.kube("-n", self.ns, "delete", "pod", old, "--wait=false")
        marks: dict[str, float] = {}

        def resumed() -> str | None:
            now, pods = time.time() - t0, self.pods(index)
            stopped = [p for p in pods if p["metadata"]["name"] == old]
            if not stopped or stopped[0]["status"].get("phase") == "Failed":
                marks.setdefault("stoppedPodGone", now)
            new = [p for p in pods if p["metadata"]["name"] != old]
            if new:
                made = epoch(new[0]["metadata"]["creationTimestamp"]) - t0
                marks.setdefault("replacementCreated", made)
                if new[0]["status"].get("phase") == "Running":
                    marks.setdefault("replacementRunning", now)
            at = self.last_resume()
            return at if at and at != before else None

        at = poll(f"the resume after deleting {old}", resumed)
        replacement = next(p for p in self.pods(index) if p["metadata"]["name"] != old)
        name = replacement["metadata"]["name"]
        log = self.kube("-n", self.ns, "logs", name, "-c", "trainer", "--timestamps")
        # Its first line comes once the rank has imported the trainer and serves its metrics.
        first = next((line.split()[0] for line in log.splitlines() if "metrics on" in line), None)
        if first:
            marks["replacementImported"] = epoch(first[:19] + "Z") - t0
        return {
            "deleted": f"rank {index}",
            "attempt": self.status().get("attempts"),
            "toTrainingSeconds": round(epoch(at) - t0, 1),
            **{k: round(v, 1) for k, v in marks.items()},
        }


def test_restart_in_place_seconds(
    kube: Any, images: dict[str, str], operator_release: Obj, timing: Any
) -> None:
    ns = kube.create_namespace("restart")
    try:
        hub = setup_hub(kube, ns, f"benchtok{secrets.token_hex(16)}", timing, images)
        job = example_job(ns, hub.endpoint, NAME)
        job["spec"]["training"].update(maxSteps=60, checkpointEverySteps=5)
        bench = Bench(kube, ns)
        applied = time.time()
        kube.apply(job, ns)
        baseline = epoch(poll("the first resume", bench.last_resume)) - applied
        samples = []
        for index in FAULTS:
            poll("training", bench.trained_on)
            samples.append(bench.restart(index))
            print(f"[restart] {samples[-1]}")
        final = poll(
            "the job to finish",
            lambda: s if (s := bench.status()).get("phase") in ("Succeeded", "Failed") else None,
        )
        # What a restart must keep (the fault suite checks it all, under load): one disruption
        # per fault, an attempt's second stop restarting the gang as the next attempt, and the
        # job succeeds.
        assert final["phase"] == "Succeeded", final
        assert (final["attempts"], final["disruptions"]) == (2, len(FAULTS)), final
        median = statistics.median(s["toTrainingSeconds"] for s in samples)
        out = {
            "what": "restarts on a warm 2-node kind cluster (2 cores), one job training: "
            "pod delete -> the re-formed gang's rank 0 resumed (its lastResumeTime, to the second)",
            "firstStartSeconds": round(baseline, 1),
            "restarts": samples,
            "medianRestartSeconds": median,
            "restartOverFirstStart": round(median / baseline, 2),
            "target": "<= 30 s (issue #13)",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULT.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
    finally:
        kube("delete", "namespace", ns, "--wait=false", check=False)
