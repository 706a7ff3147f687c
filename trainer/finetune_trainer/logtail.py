"""The last lines of this rank's log, kept in memory for the message of a failed result.

`kubectl describe` then shows why an attempt failed without anyone reading pod logs: the
condition message carries the error and what the rank logged just before it. The tail is
bounded (lines and bytes, so it fits the 4 KiB termination message beside the rest of the
result), holds no tracebacks (they stay in the pod log), and passes through the token scrubber.
"""

from __future__ import annotations

import logging
from collections import deque

from finetune_api.result import scrub

MAX_LINES = 20
MAX_BYTES = 2048


class LogTail(logging.Handler):
    """Keeps the last `lines` lines that reach the root logger, one record's lines each."""

    def __init__(self, lines: int = MAX_LINES) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not cost the log line that follows
            text = str(record.msg)
        for line in text.splitlines() or [""]:
            self.lines.append(f"{record.levelname} {record.name}: {line}")

    def text(self, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> str:
        """The newest lines, scrubbed, at most `max_lines` and `max_bytes` (whole lines only,
        except a single line longer than the budget, which keeps its end)."""
        kept: list[str] = []
        size = 0
        for line in reversed([scrub(line) for line in list(self.lines)[-max_lines:]]):
            cost = len(line.encode()) + 1
            if size + cost > max_bytes:
                if not kept:
                    kept.append(line.encode()[-(max_bytes - 1) :].decode(errors="ignore"))
                break
            kept.append(line)
            size += cost
        return "\n".join(reversed(kept))


_TAIL = LogTail()


def install(logger: logging.Logger | None = None) -> None:
    """Record what `logger` (default: the root logger) handles from now on; idempotent."""
    target = logger or logging.getLogger()
    if _TAIL not in target.handlers:
        target.addHandler(_TAIL)


def recent(max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES) -> str:
    """This rank's last log lines (see LogTail.text)."""
    return _TAIL.text(max_lines, max_bytes)


def with_log_tail(message: str, rank: int) -> str:
    """`message`, then the rank's last log lines under a header saying whose they are."""
    tail = recent()
    return f"{message}\nlast lines of rank {rank}'s log:\n{tail}" if tail else message
