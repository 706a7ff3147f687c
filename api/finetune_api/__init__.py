"""The FineTuneJob API: one schema for the CRD, the operator and the trainer."""

from finetune_api.v1alpha1 import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from finetune_api.validation import (
    FieldError,
    ManifestError,
    load_manifest,
    parse_manifest,
)

__all__ = [
    "FieldError",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ManifestError",
    "load_manifest",
    "parse_manifest",
]


def __getattr__(name: str) -> str:
    # finetune_api.__version__, read when first asked for (it may scan sys.path).
    if name == "__version__":
        from finetune_api.version import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
