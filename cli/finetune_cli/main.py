"""The `finetune` command line: the parser, and a lazy hand-off to each command's module.

    finetune validate job.yaml [more.yaml | -] [--local] [-o json]
    finetune run job.yaml [--workdir DIR]       # local mode: the whole gang on this machine
    finetune train job.yaml                     # one pod of the gang: what the operator's pods run
    finetune serve job.yaml --workdir DIR       # local mode: serve the run's result (OpenAI API)
    finetune serve-prepare --repo R --revision SHA --out DIR   # the serving pod's init container
    finetune render job.yaml [--values FILE]    # the objects the installed chart's operator makes
    finetune example minilm-sentiment > job.yaml
    finetune demo
    finetune submit job.yaml                    # the cluster side: kubeconfig as kubectl reads it
    finetune status NAME [-o json|yaml]
    finetune logs NAME [-f] [--attempt N]
    finetune wait NAME [--timeout S]

Commands are named here as "module:function" and imported only when chosen, so `validate` loads
no torch and no Kubernetes client, and `train` runs where only the trainer is installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune_cli.exits import EXIT_CODES_HELP, CommandError


class VersionAction(argparse.Action):
    """--version: the project's one version (finetune_api.version), read only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        from finetune_api.version import version

        print(f"finetune {version()}")
        parser.exit()


def _cluster_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("cluster (as kubectl reads them)")
    group.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)"
    )
    group.add_argument("--context", help="kubeconfig context (default: the current one)")
    group.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    return flags


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, help="port to listen on (default: a free one)")
    p.add_argument(
        "--request",
        metavar="TEXT",
        help="send this one chat message, print the answer and stop (default: serve until ^C)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Validate, run and render FineTuneJobs (finetune.dev/v1alpha1) locally, "
        "and submit and follow them on a cluster.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, target: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=text,
            description=kwargs.pop("description", text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        p.set_defaults(target=target)
        return p

    # ---- local ----------------------------------------------------------------------------------
    p = command(
        "validate",
        "finetune_cli.local:cmd_validate",
        "check FineTuneJob manifests against the schema; exit 3 naming every bad field",
        description="Check FineTuneJob manifests against the schema (the CRD's own rules). "
        "Every FineTuneJob document of every file is checked; each error is printed as "
        "FILE[#DOCUMENT]: FIELD.PATH: message. Exit 3 if any is invalid.",
    )
    p.add_argument("manifests", nargs="+", metavar="FILE", help="manifest files; - reads stdin")
    p.add_argument(
        "--local",
        action="store_true",
        help="also check that this machine can run them: local files exist, a CUDA GPU for "
        "qlora or fp16 (imports torch for those)",
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")

    p = command(
        "run",
        "finetune_cli.local:cmd_run",
        "local mode: run the whole gang on this machine",
    )
    p.add_argument("manifest", type=Path, metavar="FILE")
    p.add_argument(
        "--workdir", type=Path, help="checkpoints, outputs and results; reuse it to resume"
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="after a successful run, serve its result as `finetune serve` does",
    )
    _serve_flags(p)

    p = command(
        "serve",
        "finetune_cli.serve:cmd_serve",
        "local mode: serve a local run's result with `transformers serve` (OpenAI-compatible)",
        description="Serve the result of `finetune run JOB --workdir DIR` (DIR/output) on this "
        "machine with `transformers serve`, an adapter merged onto its base first, and print a "
        "request to paste. Clients name the model by output.hub.repo (else the job's name).",
    )
    p.add_argument("manifest", type=Path, metavar="FILE")
    p.add_argument("--workdir", type=Path, help="the workdir of `finetune run`")
    p.add_argument("--model-dir", type=Path, help="serve this model folder instead")
    _serve_flags(p)

    p = command(
        "serve-prepare",
        "finetune_cli.serve:cmd_serve_prepare",
        "download a pushed revision and make it servable (the serving pod's init container)",
        description="Download exactly REVISION of REPO (HF_ENDPOINT, token from HF_TOKEN) into "
        "OUT; an adapter is merged onto --base unless --no-merge.",
    )
    p.add_argument("--repo", required=True)
    p.add_argument("--revision", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", help="the base model source (hf://<id> or file:///<path>)")
    p.add_argument("--base-revision")
    p.add_argument("--no-merge", action="store_true", help="keep an adapter as it is (vLLM, TGI)")

    p = command(
        "train",
        "finetune_cli.local:cmd_train",
        "run this pod's ranks of the gang (the command of the operator's pods)",
        description="One pod of the gang: check the manifest, then start this pod's ranks "
        "from the rendezvous env (NODE_RANK, NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT).",
    )
    p.add_argument("manifest", type=Path, metavar="FILE")

    p = command(
        "render",
        "finetune_cli.render:cmd_render",
        "print the objects the installed chart's operator would create for a FineTuneJob",
        description="Print the Service, ConfigMap and Job the operator would create, with the "
        "operator settings the chart gives it: the chart's values.yaml with each --values file "
        "merged over it, as helm merges them.",
    )
    p.add_argument("manifest", type=Path, metavar="FILE")
    p.add_argument(
        "-f",
        "--values",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a helm values file, as given to helm install (repeatable; later files win)",
    )
    p.add_argument(
        "--chart", type=Path, help="the chart directory (default: this checkout's chart)"
    )

    p = command(
        "example",
        "finetune_cli.local:cmd_example",
        "print an example manifest with local paths filled in",
    )
    p.add_argument("name", help="minilm-sentiment, minilm-code-search or shapes-text-to-image")
    p.add_argument(
        "--data-dir", type=Path, help="where to write the example's data (default: a cache folder)"
    )

    p = command(
        "demo",
        "finetune_cli.local:cmd_demo",
        "train the MiniLM example on 2 local ranks and push it to a local Hub double",
    )
    p.add_argument("--workdir", type=Path)

    # ---- cluster --------------------------------------------------------------------------------
    cluster = [_cluster_flags()]
    p = command(
        "submit",
        "finetune_cli.submit:cmd_submit",
        "validate, then apply FineTuneJobs to the cluster (server-side apply)",
        parents=cluster,
    )
    p.add_argument("manifest", metavar="FILE", help="manifest file; - reads stdin")
    p.add_argument(
        "--force-conflicts",
        action="store_true",
        help="take over fields another field manager owns",
    )

    p = command(
        "retry",
        "finetune_cli.retry:cmd_retry",
        "make a Failed FineTuneJob again (same name and spec): it resumes where it stopped",
        description="Delete a Failed FineTuneJob and make it again with the same name, labels "
        "and spec, once what failed it is fixed (a token, a repo, a quota, a spent "
        "backoffLimit or deadline). The new job adopts the checkpoint claim the old one kept "
        "(output.checkpoints.claimRetentionPolicy) and resumes from its newest checkpoint, or "
        "pushes a result kept there without training. To change the spec, delete the job and "
        "submit the new manifest under the same name instead.",
        parents=cluster,
    )
    p.add_argument("name", metavar="NAME")

    p = command(
        "status",
        "finetune_cli.status:cmd_status",
        "phase and why, progress, evaluation before and after, attempts, the pushed revision",
        parents=cluster,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")

    p = command(
        "logs",
        "finetune_cli.logs:cmd_logs",
        "every rank's pod log, each line prefixed with [pod N] (its completion index)",
        parents=cluster,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "-f", "--follow", action="store_true", help="stream until every pod's trainer ends"
    )
    p.add_argument(
        "--attempt", type=int, help="the attempt whose pods to read (default: the current one)"
    )

    p = command(
        "wait",
        "finetune_cli.wait:cmd_wait",
        "wait until a FineTuneJob finishes; exit 0 Succeeded, 1 Failed, 124 timed out",
        description="Watch a FineTuneJob until it finishes and print its final phase and "
        "reason.\n\nexit codes: 0 Succeeded, 1 Failed, 124 --timeout passed first, "
        "5 not found or the cluster could not answer",
        parents=cluster,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--timeout", type=float, metavar="S", help="give up after S seconds (default: never)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, function = args.target.partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(args))
    except CommandError as exc:
        print(f"finetune {args.command}: {exc}", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        return 130
