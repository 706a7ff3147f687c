"""Chat data (`dataset.messagesField`): checking the rows, and finding the assistant turns.

A row is an OpenAI-style list of messages, `[{"role": ..., "content": ...}, ...]`: an optional
system prompt first, then user and assistant turns, ending with an assistant turn (the answer that
training learns and evaluation generates). `message_error` says what is wrong with one row in
words a person can act on; `check_rows` applies it to a split and fails with the row number.

The loss counts assistant tokens only. They are found by rendering prefixes, not with
transformers' `return_assistant_tokens_mask`: that needs `{% generation %}` blocks in the
template, which most published templates lack. For each assistant turn the chat template renders
the conversation up to it with the generation prompt, and up to and including it; the characters
between the two are the turn (its content and end-of-turn marker). That needs a template that
renders a conversation's prefix as a prefix of the whole, which chat templates are built for (a
template that rewrites earlier turns, e.g. drops past reasoning, gets a clear error). The token
mask then comes from the fast tokenizer's character offsets. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from finetune_api import FieldError, FineTuneJob

__all__ = [
    "ROLES",
    "ChatTemplateError",
    "InvalidMessages",
    "assistant_spans",
    "check_rows",
    "local_data_errors",
    "message_error",
    "prompt_and_answer",
]

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# How many bad rows one error names; the rest are counted.
_MAX_REPORTED = 3


class InvalidMessages(ValueError):
    """Rows of messagesField that are not conversations: the data must change, so no attempt
    would do better (the trainer maps this to reason InvalidDataset)."""


class ChatTemplateError(ValueError):
    """The tokenizer cannot render chat data as this module needs."""


class _Renderer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def message_error(value: Any) -> str | None:
    """What is wrong with one row of messagesField, or None for a valid conversation."""
    if not isinstance(value, list | tuple) or not value:
        return f"expected a non-empty list of {{role, content}} messages, got {_shape(value)}"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} is {_shape(message)}, not a {{role, content}} mapping"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {i} has role {role!r}; roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {i} ({role}) has content {_shape(content)}, not a string"
        if role == "system" and i != 0:
            return f"message {i} is a system message; only the first message may be one"
    if value[-1]["role"] != "assistant":
        return f"the last message is {value[-1]['role']!r}; a row must end with an assistant turn"
    if not any(m["role"] == "user" for m in value):
        return "there is no user message"
    return None


def _shape(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def check_rows(rows: Iterable[Any], column: str, split: str) -> None:
    """Raise InvalidMessages naming the first bad rows of `column` in `split`."""
    bad: list[str] = []
    count = 0
    for index, value in enumerate(rows):
        error = message_error(value)
        if error is not None:
            count += 1
            if len(bad) < _MAX_REPORTED:
                bad.append(f"row {index}: {error}")
    if bad:
        more = f" (and {count - len(bad)} more rows)" if count > len(bad) else ""
        raise InvalidMessages(
            f"messagesField {column!r} of split {split!r} must hold OpenAI-style lists of "
            f"{{role, content}} messages; " + "; ".join(bad) + more
        )


def _render(tokenizer: _Renderer, messages: Sequence[Message], *, generation: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def assistant_spans(tokenizer: _Renderer, messages: Sequence[Message]) -> tuple[str, list[range]]:
    """The rendered conversation and the character ranges of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "messagesField needs a tokenizer with a chat template (tokenizer_config.json's "
            "chat_template or chat_template.jinja); this model's tokenizer has none"
        )
    full = _render(tokenizer, messages, generation=False)
    spans: list[range] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation=False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ChatTemplateError(
                "the chat template does not render a conversation's beginning as the beginning "
                "of the whole conversation, so the assistant turns cannot be told apart; "
                "use a model whose template does"
            )
        spans.append(range(len(head), len(upto)))
    return full, spans


def prompt_and_answer(tokenizer: _Renderer, messages: Sequence[Message]) -> tuple[str, str]:
    """The conversation before its last assistant turn, rendered with the generation prompt, and
    that turn's content: what evaluation generates from and compares against."""
    return _render(tokenizer, messages[:-1], generation=True), messages[-1]["content"]


def local_data_errors(job: FineTuneJob) -> list[FieldError]:
    """For `finetune validate --local` and `finetune run`: the rows of a local dataset's
    messagesField that are not conversations, as a field error, before any pod or rank starts.
    A dataset on the Hub is checked by the trainer, which fails with InvalidDataset."""
    from finetune_api import FieldError, ManifestError

    d = job.spec.dataset
    if d.messages_field is None or not d.source.startswith("file://"):
        return []
    from finetune_trainer.data import dataset_errors, load_raw  # torch and datasets: only here

    try:
        with dataset_errors():
            raw = load_raw(d)
    except ManifestError as exc:
        return list(exc.errors)
    except Exception as exc:
        return [FieldError("spec.dataset.source", str(exc))]
    for split, rows in raw.items():
        if d.messages_field not in rows.column_names:
            message = f"column {d.messages_field!r} not in split {split!r}: {rows.column_names}"
            return [FieldError("spec.dataset.messagesField", message)]
        try:
            check_rows(rows[d.messages_field], d.messages_field, split)
        except InvalidMessages as exc:
            return [FieldError("spec.dataset.messagesField", str(exc))]
    return []
