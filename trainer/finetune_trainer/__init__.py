"""The FineTuneJob trainer: `finetune train` in a pod, `finetune run` on a workstation.

Importing this package (or `finetune_trainer.cli`) imports no torch: the command line parses and
validates manifests without the ML stack, and the Hub environment is fixed before any Hugging Face
module reads it.
"""

__version__ = "0.1.0"
