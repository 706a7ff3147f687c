"""One rank of the gang: `python -m finetune_trainer.rank MANIFEST`.

`finetune train` (launch.train_pod) and local mode (launch.run_local) start one of these per
local rank, with RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* set. It reads the manifest against
the schema only: `train.main` makes the runtime checks itself and reports them as the rank's
result. The Hub environment is fixed here, before anything from Hugging Face is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from finetune_api import ManifestError, load_manifest
from finetune_api.pod import ExitCode
from finetune_trainer.env import configure_hub_env, ensure_writable_hf_home, hide_unused_packages

USAGE = "usage: python -m finetune_trainer.rank MANIFEST"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    manifest = Path(args[0])
    try:
        job = load_manifest(manifest)
    except OSError as exc:
        print(f"cannot read {manifest}: {exc.strerror}", file=sys.stderr)
        return ExitCode.INVALID_SPEC
    except ManifestError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return ExitCode.INVALID_SPEC
    configure_hub_env(job)
    ensure_writable_hf_home()
    hide_unused_packages(job)
    from finetune_trainer.train import main as train  # imports torch and huggingface_hub

    return int(train(job))


if __name__ == "__main__":
    sys.exit(main())
