"""The FineTuneJob trainer: `finetune train` in a pod, `finetune run` on a workstation.

Importing this package (or `finetune_trainer.launch`) imports no torch: the command line parses and
validates manifests without the ML stack, and the Hub environment is fixed before any Hugging Face
module reads it.
"""

import logging

# Where bitsandbytes is imported (qlora, or a process that did not hide it as
# env.hide_unused_packages does), on CPUs with AVX512-BF16 it warns that it could not fetch an
# optional 4-bit kernel from the Hub: nothing here uses that kernel, and in every rank's log the
# line reads like a failure.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)


def __getattr__(name: str) -> str:
    # The project's one version (finetune_api.version), read when first asked for.
    if name == "__version__":
        from finetune_api.version import version

        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
