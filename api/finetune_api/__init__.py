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
