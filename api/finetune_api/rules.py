"""Cross-field rules, declared once and enforced in two places.

Each rule carries a CEL expression, which the CRD generator writes into `x-kubernetes-validations`
so that the API server rejects a bad FineTuneJob, and a Python predicate over the same model,
which `finetune validate` and the trainer use where no API server is involved. The two live side
by side so a reviewer can compare them; the control-plane tests run the same bad manifests through
both and assert that both reject them.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    cel: str
    message: str
    check: Callable[[Any], bool]
    # Wire name of the field the message is about, relative to the object the rule sits on.
    field: str | None = None
    # A CEL string expression the API server answers with instead of `message`, so that it can
    # name the offending value; `message` stays the fallback and the Python side's message.
    message_expression: str | None = None

    def to_crd(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field:
            out["fieldPath"] = f".{self.field}"
        return out


@dataclass(frozen=True)
class TransitionRule:
    """A rule that compares `self` with `oldSelf`; it only has meaning on the API server."""

    cel: str
    message: str

    def to_crd(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}
