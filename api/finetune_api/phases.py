"""The phases of one attempt, by name: where its time goes before the first optimizer step and
after the last one.

Rank 0 stamps each phase with the Unix time it reached it: live in its gauge
`finetune_startup_phase_timestamp_seconds{phase}`, and at the end in its result
(`TrainerResult.phases`). The operator adds what only the API server knows (the pods' scheduling
and container start, their exit) and writes the breakdown into `status.startup` and
`status.finish`. Names are the gauge's label values (snake_case); `STARTUP_FIELDS` and
`FINISH_FIELDS` give their status field (camelCase). Each name is spelled here once.
"""

from __future__ import annotations

from typing import Final

# ---- before the first step, in the order a fresh attempt reaches them --------------------------
# The rank's Python process has imported the trainer and serves its metrics.
PROCESS_STARTED: Final = "process_started"
# The gang formed: every rank joined the process group.
RENDEZVOUS: Final = "rendezvous"
# The hf:// model and dataset are resolved and in the hub cache (fetch.py); not stamped when no
# source is on the Hub or the Hub is offline.
DOWNLOADED: Final = "downloaded"
DATA_LOADED: Final = "data_loaded"
MODEL_LOADED: Final = "model_loaded"
# The before-training evaluation is done (or its scores were kept by an earlier attempt).
EVALUATED_BEFORE: Final = "evaluated_before"
FIRST_STEP: Final = "first_step"
STARTUP: Final = (
    PROCESS_STARTED,
    RENDEZVOUS,
    DOWNLOADED,
    DATA_LOADED,
    MODEL_LOADED,
    EVALUATED_BEFORE,
    FIRST_STEP,
)

# ---- after the last step -----------------------------------------------------------------------
LAST_STEP: Final = "last_step"
# The after-training evaluation is done.
EVALUATED_AFTER: Final = "evaluated_after"
# The final artifact (adapter, merged or full model) is saved, and kept for the push.
SAVED: Final = "saved"
# The push to output.hub is done (stamped only with output.hub and the gates passed).
PUSHED: Final = "pushed"
# Rank 0 wrote its result: from here on, only its exit (and a metrics linger) is left.
RESULT_WRITTEN: Final = "result_written"
FINISH: Final = (LAST_STEP, EVALUATED_AFTER, SAVED, PUSHED, RESULT_WRITTEN)

ALL: Final = (*STARTUP, *FINISH)

# Rank 0's gauge of these stamps. Its name predates the finish phases, which it carries too.
PHASE_GAUGE: Final = "finetune_startup_phase_timestamp_seconds"

# status.startup's fields: seconds from the FineTuneJob's creation. The first two come from the
# pods (the last pod of the gang, which the gang waits for), the rest from rank 0.
SCHEDULED: Final = "scheduled"
CONTAINER_STARTED: Final = "containerStarted"
STARTUP_FIELDS: Final = {
    PROCESS_STARTED: "processStarted",
    RENDEZVOUS: "rendezvous",
    DOWNLOADED: "downloaded",
    DATA_LOADED: "dataLoaded",
    MODEL_LOADED: "modelLoaded",
    EVALUATED_BEFORE: "evaluatedBefore",
    FIRST_STEP: "firstStep",
}
# status.finish's fields: seconds from the last step. The last two come from the pods and the
# operator.
PODS_EXITED: Final = "podsExited"
SUCCEEDED: Final = "succeeded"
FINISH_FIELDS: Final = {
    EVALUATED_AFTER: "evaluatedAfter",
    SAVED: "saved",
    PUSHED: "pushed",
    RESULT_WRITTEN: "resultWritten",
}
