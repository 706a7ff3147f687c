"""The `finetune` command.

    finetune validate job.yaml      # schema and runtime checks; exit 3 naming each bad field
    finetune run job.yaml           # local mode: the whole gang on this machine
    finetune train job.yaml         # one pod of the gang (NODE_RANK, NNODES, MASTER_ADDR, ...)
    finetune render job.yaml        # the Kubernetes objects the operator would create
    finetune example minilm-sentiment > job.yaml   # a runnable example with local paths
    finetune demo                   # that example on 2 local ranks, pushed to a local Hub double

This module imports no torch, so `validate` and `render` stay fast; the rank processes set up
the Hub environment before anything from Hugging Face is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune_api import FieldError, FineTuneJob, ManifestError, load_manifest
from finetune_api.constants import Reason
from finetune_api.pod import ExitCode
from finetune_api.result import TrainerResult
from finetune_trainer.env import configure_hub_env, ensure_writable_hf_home, runtime_errors
from finetune_trainer.example_data import EXAMPLES, example_manifest
from finetune_trainer.result import write_result


def _load(path: Path, *, runtime: bool = True) -> FineTuneJob:
    try:
        job = load_manifest(path)
    except OSError as exc:
        raise ManifestError([FieldError("", f"cannot read {path}: {exc.strerror}")]) from None
    errors = runtime_errors(job) if runtime else []
    if errors:
        raise ManifestError(errors)
    return job


def _invalid(exc: ManifestError) -> int:
    for error in exc.errors:
        print(error, file=sys.stderr)
    return ExitCode.INVALID_SPEC


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        _load(args.manifest)
    except ManifestError as exc:
        return _invalid(exc)
    print("valid")
    return ExitCode.OK


def cmd_train(args: argparse.Namespace) -> int:
    from finetune_trainer.launch import train_pod

    try:
        job = _load(args.manifest)
        return train_pod(args.manifest.resolve(), job)
    except ManifestError as exc:
        if os.environ.get("NODE_RANK", "0") == "0":
            # The operator reads the reason from rank 0's termination message.
            write_result(
                TrainerResult(status="Failed", reason=Reason.INVALID_SPEC, message=str(exc))
            )
        return _invalid(exc)


def cmd_run(args: argparse.Namespace) -> int:
    from finetune_trainer.launch import run_local

    try:
        job = _load(args.manifest)
    except ManifestError as exc:
        return _invalid(exc)
    return run_local(args.manifest.resolve(), job, args.workdir)


def cmd_rank(args: argparse.Namespace) -> int:
    """One rank, started by `finetune train` with RANK, WORLD_SIZE and MASTER_* set."""
    try:
        job = _load(args.manifest, runtime=False)  # train.main checks and reports the rest
    except ManifestError as exc:
        return _invalid(exc)
    configure_hub_env(job)
    ensure_writable_hf_home()
    from finetune_trainer.train import main  # imports torch and huggingface_hub: env is set

    return main(job)


def cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from finetune_operator.render import render_manifests

    try:
        job = _load(args.manifest, runtime=False)  # rendering does not need the files here
    except ManifestError as exc:
        return _invalid(exc)
    yaml.safe_dump_all(render_manifests(job), sys.stdout, sort_keys=False, explicit_start=True)
    return ExitCode.OK


# ---- examples ------------------------------------------------------------------------------


def cmd_example(args: argparse.Namespace) -> int:
    if args.name not in EXAMPLES:
        print(f"unknown example {args.name!r}; choose from {', '.join(EXAMPLES)}", file=sys.stderr)
        return ExitCode.INVALID_SPEC
    try:
        sys.stdout.write(example_manifest(args.name, args.data_dir))
    except ManifestError as exc:
        return _invalid(exc)
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The README demo: the example job as a 2-node local gang, pushing to a local Hub double."""
    import secrets
    import tempfile

    import yaml

    from finetune_hub_double import HubDouble
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
        return run_local(manifest, _load(manifest), workdir / "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("validate", cmd_validate, "check a FineTuneJob manifest"),
        ("train", cmd_train, "run this pod's ranks of the gang (in-pod entry point)"),
        ("run", cmd_run, "run the whole gang on this machine"),
        ("render", cmd_render, "print the Kubernetes objects for a FineTuneJob"),
        ("rank", cmd_rank, argparse.SUPPRESS),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("manifest", type=Path)
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument(
                "--workdir",
                type=Path,
                default=None,
                help="checkpoints, outputs and results; reuse it to resume",
            )
    p = sub.add_parser("demo", help="train the MiniLM example locally and push to a local Hub")
    p.add_argument("--workdir", type=Path, default=None)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("example", help="print an example manifest with local paths filled in")
    p.add_argument("name")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where to write the example's data (default: a cache folder)",
    )
    p.set_defaults(func=cmd_example)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
