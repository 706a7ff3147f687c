"""The conditions of a FineTuneJob's status, kept as Kubernetes API conventions ask. Pure.

Conditions are the truth; `phase` is a summary of them for the printer column (`phase_of`).
"""

from __future__ import annotations

from typing import Any

from finetune_api.constants import ConditionType, Phase

Obj = dict[str, Any]
CT = ConditionType


class Conditions:
    """A FineTuneJob's conditions as one pass sets them (metav1.Condition: a list map keyed by
    type). A condition keeps its lastTransitionTime while its status stays the same, so the same
    situation derived twice gives the same conditions, and the operator writes nothing."""

    def __init__(self, previous: list[Obj], now: str, generation: int) -> None:
        self.by_type = {c["type"]: dict(c) for c in previous if "type" in c}
        self.now, self.generation = now, generation

    def set(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        value = "True" if status else "False"
        old = self.by_type.get(type_)
        changed = old is None or old.get("status") != value
        self.by_type[type_] = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message[:32768],
            "lastTransitionTime": self.now if changed else old.get("lastTransitionTime", self.now),
            "observedGeneration": self.generation,
        }

    def is_true(self, type_: str) -> bool:
        return self.by_type.get(type_, {}).get("status") == "True"

    def reason(self, type_: str) -> str | None:
        return self.by_type.get(type_, {}).get("reason")

    def ordered(self) -> list[Obj]:
        order = [str(t) for t in CT]
        return sorted(
            self.by_type.values(),
            key=lambda c: order.index(c["type"]) if c["type"] in order else 99,
        )


def phase_of(conditions: Conditions) -> Phase:
    for type_, phase in (
        (CT.FAILED, Phase.FAILED),
        (CT.SUCCEEDED, Phase.SUCCEEDED),
        (CT.SUSPENDED, Phase.SUSPENDED),
        (CT.RUNNING, Phase.RUNNING),
    ):
        if conditions.is_true(type_):
            return phase
    return Phase.PENDING


def previous_condition(prev: Obj, type_: str) -> Obj:
    """The condition of `type_` in the status before this pass; {} when it had none."""
    return next((c for c in prev.get("conditions") or [] if c.get("type") == type_), {})


def transitions(prev: Obj, new: Obj) -> list[tuple[str, str, str]]:
    """(type, reason, message) of each condition whose status or reason changed from `prev` to
    `new`: one Event each, `Not<type>` for a condition that is now False; but one for a job
    held back, whose Created and Running say the same."""
    before = {c["type"]: (c.get("status"), c.get("reason")) for c in prev.get("conditions") or []}
    out = []
    held: tuple[str, str] | None = None
    for c in new["conditions"]:
        if before.get(c["type"]) != (c["status"], c["reason"]):
            if c["status"] == "False" and c["type"] == CT.CREATED:
                held = (c["reason"], c["message"])
            elif c["type"] == CT.RUNNING and held == (c["reason"], c["message"]):
                continue
            out.append(
                (
                    c["type"] if c["status"] == "True" else f"Not{c['type']}",
                    c["reason"],
                    c["message"],
                )
            )
    return out
