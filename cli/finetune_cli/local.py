"""The commands that need no cluster: validate, train (the pod's entry), run, example, demo.

Each imports the trainer only inside the command, so `validate` never loads torch, and `train`
hands over to finetune_trainer.launch as soon as the manifest has been checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from finetune_api import ManifestError, load_manifest
from finetune_api.constants import Reason
from finetune_api.result import TrainerResult
from finetune_cli import manifests
from finetune_cli.exits import CommandError, Exit


def cmd_validate(args: argparse.Namespace) -> int:
    docs = manifests.check(args.manifests, local=args.local)
    if args.output == "json":
        print(json.dumps(manifests.report(docs), indent=2))
    else:
        manifests.print_report(docs, sys.stdout, sys.stderr)
    return Exit.OK if all(d.valid for d in docs) else Exit.INVALID


def cmd_train(args: argparse.Namespace) -> int:
    """One pod of the gang: check the manifest here, then start this pod's ranks.

    The operator reads a bad spec's reason from rank 0's result (its termination message), so
    the check's verdict is written there before any rank starts.
    """
    from finetune_api import FieldError
    from finetune_trainer.accelerators import AcceleratorUnavailable, check_accelerator
    from finetune_trainer.env import runtime_errors
    from finetune_trainer.launch import train_pod
    from finetune_trainer.result import write_result
    from finetune_trainer.sources import missing_local

    reason = Reason.INVALID_SPEC
    try:
        try:
            job = load_manifest(args.manifest)
        except OSError as exc:
            message = f"cannot read {args.manifest}: {exc.strerror}"
            raise ManifestError([FieldError("", message)]) from None
        # A source path that is not there has its own reason (ModelNotFound, DatasetNotFound).
        missing = missing_local(job)
        if missing is not None:
            reason = missing.reason
            raise ManifestError([FieldError(missing.field, str(missing))])
        # Accelerators the pod reserved and cannot use: a reason of their own, before any rank.
        try:
            check_accelerator(job.spec.resources)
        except AcceleratorUnavailable as exc:
            reason = Reason.ACCELERATOR_UNAVAILABLE
            raise ManifestError([FieldError("spec.resources.accelerator", str(exc))]) from None
        errors = runtime_errors(job)
        if errors:
            raise ManifestError(errors)
    except ManifestError as exc:
        if os.environ.get("NODE_RANK", "0") == "0":
            write_result(TrainerResult(status="Failed", reason=reason, message=str(exc)))
        for error in exc.errors:
            print(error, file=sys.stderr)
        return Exit.INVALID
    code = train_pod(for_ranks(args.manifest), job)
    # This process imported torch, transformers and peft only to fork its ranks
    # (launch.preload_trainer), and the ranks are done. Tearing that interpreter down took 5-7 s
    # on a busy 2-core node, all of it between rank 0's result and the pod's exit (so
    # Succeeded); nothing is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def for_ranks(manifest: Path) -> Path:
    """The manifest's path for the ranks to read: absolute (they may start in another folder),
    but not resolved. In a pod it is a ConfigMap volume's job.yaml, a symlink through `..data` to
    a timestamped folder that the kubelet replaces, and deletes, whenever the ConfigMap changes
    (an edit of runPolicy, such as a suspend and resume): a resolved path names a folder that
    may be gone by the time a rank starts or rejoins, and the rank failed as if the spec were
    invalid (exit 3, which fails the job)."""
    return manifest.absolute()


def cmd_run(args: argparse.Namespace) -> int:
    import tempfile

    from finetune_trainer.launch import run_local

    job, _ = manifests.load_one(args.manifest, local=True)
    if not args.serve:
        return run_local(for_ranks(args.manifest), job, args.workdir)
    from finetune_cli.serve import serve_local

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"finetune-{job.metadata.name}-"))
    code = run_local(for_ranks(args.manifest), job, workdir)
    if code != Exit.OK:
        return code
    workdir = workdir.resolve()
    return serve_local(
        job,
        workdir / "output",
        workdir / "serve",
        host=args.host,
        port=args.port,
        request=args.request,
    )


def cmd_example(args: argparse.Namespace) -> int:
    from finetune_trainer.example_data import EXAMPLES, example_manifest

    if args.name not in EXAMPLES:
        raise CommandError(
            f"unknown example {args.name!r}; choose from {', '.join(EXAMPLES)}", Exit.USAGE
        )
    try:
        sys.stdout.write(example_manifest(args.name, args.data_dir))
    except ManifestError as exc:  # a package the example's data comes from is missing
        raise CommandError("; ".join(str(e) for e in exc.errors), Exit.FAILED) from None
    return Exit.OK


HUB_DOUBLE_MISSING = (
    "finetune demo pushes to a local Hub-API test double, the finetune-hub-double distribution, "
    "which is not installed. From a checkout of this repository: pip install -e hub-double"
)


def cmd_demo(args: argparse.Namespace) -> int:
    """The README demo: the example job as a 2-node local gang, pushing to a local Hub double."""
    try:
        from finetune_hub_double import HubDouble
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "finetune_hub_double":
            raise CommandError(HUB_DOUBLE_MISSING, Exit.FAILED) from None
        raise
    import secrets
    import tempfile

    import yaml

    from finetune_trainer.example_data import example_manifest
    from finetune_trainer.launch import run_local

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="finetune-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    doc = yaml.safe_load(example_manifest("minilm-sentiment", workdir / "data"))
    token = f"hf_demo{secrets.token_hex(16)}"  # only this process and its children see it
    with HubDouble(workdir / "hub", tokens=[token]) as hub:
        doc["spec"]["output"] = {
            "hub": {"repo": "demo/minilm-sentiment-lora", "endpoint": hub.endpoint}
        }
        manifest = workdir / "job.yaml"
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        # The Hub here is the local double, so online mode reaches nothing else.
        os.environ.update(HF_TOKEN=token, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0")
        print(f"demo job: {manifest}\nlocal Hub double: {hub.endpoint}", file=sys.stderr)
        job, _ = manifests.load_one(manifest, local=True)
        return run_local(manifest, job, workdir / "run")
