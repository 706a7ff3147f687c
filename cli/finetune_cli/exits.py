"""The exit codes of every `finetune` command, in one table (shown by `finetune --help`).

1, 3 and 4 are the pod contract's codes (finetune_api.pod.ExitCode, which a test holds these
to); they are spelled here so that `finetune --help` needs no import of the schema.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    # wait: the FineTuneJob ended Failed. run, train: training failed (retryable).
    FAILED = 1
    # Bad arguments (argparse's own code).
    USAGE = 2
    # A manifest is invalid: validate, submit, run, train, render (the pod's InvalidSpec code).
    INVALID = 3
    # run, train: an evaluation gate failed.
    GATE_FAILED = 4
    # The cluster could not answer: no kubeconfig, unreachable, forbidden, NAME not found.
    CLUSTER = 5
    # wait: --timeout passed before the FineTuneJob finished (as timeout(1) exits).
    TIMEOUT = 124


EXIT_CODES_HELP = """\
exit codes:
  0    success; wait: the FineTuneJob Succeeded
  1    wait: the FineTuneJob Failed; run, train, demo: training failed (retryable)
  2    bad arguments
  3    a manifest is invalid (validate, submit, run, train, render)
  4    run, train: an evaluation gate failed
  5    the cluster could not answer: no kubeconfig, unreachable, forbidden, NAME not found
  124  wait: --timeout passed before the FineTuneJob finished"""


class CommandError(Exception):
    """A failure that the command reports in one line, exiting with `code`."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code
