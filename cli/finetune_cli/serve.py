"""`finetune serve` (local mode) and `finetune serve-prepare` (the serving pod's init container).

Local mode serves the local run's result (`<workdir>/output`, what `finetune run --workdir` wrote)
with `transformers serve` on this machine, and prints a request to paste. An adapter is merged
onto its base first, as in the cluster (finetune_trainer.serving).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from finetune_api import FineTuneJob, pod
from finetune_cli import manifests
from finetune_cli.exits import CommandError, Exit

READY_TIMEOUT_SECONDS = 300.0


def cmd_serve_prepare(args: argparse.Namespace) -> int:
    """The init container: exactly `--revision` of `--repo`, ready for the server in `--out`."""
    from finetune_trainer.serving import download, prepare

    # The push token reads the (possibly private) output repo; never an argument.
    artifact = download(args.repo, args.revision, os.environ.get(pod.HF_TOKEN_ENV) or None)
    prepare(
        artifact,
        args.out,
        merge_adapter=not args.no_merge,
        base=args.base,
        base_revision=args.base_revision,
    )
    print(f"prepared {args.repo}@{args.revision} in {args.out}", file=sys.stderr)
    return Exit.OK


def served_name(job: FineTuneJob) -> str:
    """The `model` clients send: the output repo id, as in the cluster; else the job's name."""
    hub = job.spec.output.hub
    return hub.repo if hub is not None else job.metadata.name


def example_request(base_url: str, model: str) -> str:
    """What a user can paste: curl, and the same request through huggingface_hub."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
    )
    return (
        f"curl -s {base_url}/chat/completions -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}\n\n"
        "python - <<'EOF'\n"
        "from huggingface_hub import InferenceClient\n"
        f'client = InferenceClient(base_url="{base_url}")\n'
        'messages = [{"role": "user", "content": "Hello!"}]\n'
        f'answer = client.chat_completion(messages, model="{model}", max_tokens=32)\n'
        "print(answer.choices[0].message.content)\n"
        "EOF\n"
    )


def chat(base_url: str, model: str, text: str, timeout: float = 120.0) -> str:
    """One chat completion (the standard library, so the local Hub-offline setting cannot
    refuse a request to this machine); the answer's text."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 32,
    }
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.load(response)
    return str(answer["choices"][0]["message"]["content"])


def _wait_ready(server: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CommandError(f"the server exited with code {server.returncode}", Exit.FAILED)
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise CommandError(f"the server did not answer {url} within {timeout:.0f} s", Exit.FAILED)


def serve_local(
    job: FineTuneJob,
    artifact: Path,
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    request: str | None = None,
) -> int:
    """Prepare `artifact` under `root`, serve it, print a request; with `request`, send that one
    chat completion, print the answer and stop, else serve until interrupted."""
    from finetune_trainer.env import configure_hub_env, free_port
    from finetune_trainer.serving import (
        model_dir,
        prepare,
        transformers_serve_command,
    )

    if not artifact.is_dir():
        raise CommandError(
            f"no local result in {artifact}: run `finetune run JOB --workdir DIR` first, or "
            "pass --model-dir",
            Exit.USAGE,
        )
    model = served_name(job)
    configure_hub_env(job)  # a merge reads an hf:// base from the job's endpoint
    print(f"preparing {artifact} as {model!r} ...", file=sys.stderr)
    prepare(
        artifact,
        model_dir(root, model),
        base=job.spec.model.source,
        base_revision=job.spec.model.revision,
    )
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the model is local now
    # The server's log goes to stderr: stdout is the request to paste (and the answer).
    command = transformers_serve_command(model, host, port)
    server = subprocess.Popen(command, cwd=root, env=env, stdout=sys.stderr)
    base_url = f"http://{host}:{port}{pod.SERVE_API_PATH}"
    try:
        _wait_ready(server, f"http://{host}:{port}{pod.SERVE_HEALTH_PATH}", READY_TIMEOUT_SECONDS)
        print(f"\nserving {model} at {base_url} (OpenAI-compatible). Try:\n", file=sys.stderr)
        print(example_request(base_url, model))
        sys.stdout.flush()
        if request is not None:
            print(chat(base_url, model, request))
            return Exit.OK
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if server.poll() is None:
            # uvicorn shuts down gracefully on SIGTERM (SIGINT would print typer's "Aborted!").
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    job, _ = manifests.load_one(args.manifest, local=False)
    if args.model_dir is None and args.workdir is None:
        raise CommandError("pass --workdir (of `finetune run`) or --model-dir", Exit.USAGE)
    artifact = args.model_dir or args.workdir / "output"
    root = (args.workdir or args.model_dir.parent) / "serve"
    return serve_local(
        job,
        artifact.resolve(),
        root.resolve(),
        host=args.host,
        port=args.port,
        request=args.request,
    )
