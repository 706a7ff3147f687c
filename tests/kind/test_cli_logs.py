"""`finetune logs` on kind: real kubelets, real trainer pods, every rank's lines prefixed.

    pytest -m kind tests/kind/test_cli_logs.py -s     # fixtures: tests/kind/conftest.py

In a fresh namespace: the Hub-API double (as in test_e2e.py), then a shortened
examples/tiny-cpu.yaml (2 pods x 1 rank) submitted with `finetune submit`. `finetune logs -f`
starts before any pod exists, so it also has to find the pods as the Job controller makes them;
`finetune wait` blocks until the end; then plain `finetune logs` reads them again. In both, the
lines of pod N carry `[pod N]`, and the trainer's own `[rank N]` inside them agrees.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_e2e import example_job, setup_hub

pytestmark = [pytest.mark.kind]

NAME = "cli-logs"
WAIT_TIMEOUT_S = 1500
POD_LINE = re.compile(r"^\[pod (\d+)\] (.*)$")
RANK = re.compile(r"\[rank (\d+)\]")


def by_pod(output: str) -> dict[int, list[str]]:
    """{pod index: its lines}; every line of stdout must carry a pod prefix."""
    pods: dict[int, list[str]] = {}
    for line in output.splitlines():
        match = POD_LINE.match(line)
        assert match, f"line without a [pod N] prefix: {line!r}"
        pods.setdefault(int(match.group(1)), []).append(match.group(2))
    return pods


def assert_each_rank_prefixed(output: str) -> None:
    pods = by_pod(output)
    assert sorted(pods) == [0, 1], sorted(pods)
    for index, lines in pods.items():
        ranks = {int(m.group(1)) for line in lines for m in RANK.finditer(line)}
        # One rank per pod: pod N's trainer lines are rank N's, and only rank N's.
        assert ranks == {index}, (index, ranks, lines[:20])


def test_logs_prefix_every_ranks_lines(
    kube: Any,
    operator_release: dict[str, str],
    test_namespace: str,
    diagnostics: dict[str, str],
    timing: Any,
    tmp_path: Path,
) -> None:
    ns = test_namespace
    diagnostics["namespace"] = ns
    hub = setup_hub(kube, ns, f"e2etok{secrets.token_hex(20)}", timing)
    job = example_job(ns, hub.endpoint)
    job["metadata"]["name"] = NAME
    job["spec"]["output"]["hub"]["repo"] = f"org/{NAME}"
    job["spec"]["training"].update(maxSteps=6, checkpointEverySteps=3)
    job["spec"]["evaluation"]["maxSamples"] = 8
    affinity = job["spec"]["template"]["affinity"]["podAntiAffinity"]
    affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"] = {
        "matchLabels": {"finetune.dev/job-name": NAME}
    }
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job, sort_keys=False))

    context = os.environ.get("FINETUNE_KUBE_CONTEXT")
    flags = ["-n", ns, *(["--context", context] if context else [])]
    env = kube.env()

    def finetune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "finetune_cli", *args, *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    submitted = finetune("submit", str(manifest))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    follower = subprocess.Popen(
        [sys.executable, "-m", "finetune_cli", "logs", NAME, "-f", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with timing.stopwatch("cli_logs_job"):
            done = finetune(
                "wait", NAME, "--timeout", str(WAIT_TIMEOUT_S), timeout=WAIT_TIMEOUT_S + 60
            )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip().startswith(f"{NAME}: Succeeded")
        followed, follow_err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, follow_err
    assert_each_rank_prefixed(followed)

    plain = finetune("logs", NAME)
    assert plain.returncode == 0, plain.stderr
    assert_each_rank_prefixed(plain.stdout)
    # Without -f the pods come one after the other, in completion-index order.
    indices = [int(POD_LINE.match(line).group(1)) for line in plain.stdout.splitlines()]  # type: ignore[union-attr]
    assert indices == sorted(indices)
