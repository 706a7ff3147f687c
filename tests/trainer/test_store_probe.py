"""finetune_trainer.store: a rank reaches rank 0's store with short connections of its own
before torch.distributed connects, so that one connection without an answer (a translation to
a replaced pod's address) costs seconds, not the kernel's two minutes of SYN retries; and it
passes over the store of the gang that stopped, which goes with its rank 0.

Real sockets on loopback. A listener whose accept queue is full is a local stand-in for an
address that does not answer: Linux drops the SYNs it gets, as it would those to a pod that is
gone, and the connection times out."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest

from finetune_trainer.store import formed, mark_formed, wait_for_store
from finetune_trainer.testing.gang import free_ports

HOST = "127.0.0.1"
# The upper bounds below only tell "reached it soon after it answered" from "waited out
# give_up_after (30 s)" or one blocking connect (the kernel's 127 s of SYN retries). Seconds of
# slack, not a speed target: on a loaded machine the first attempt also imports torch.
SOON_S = 20


@contextmanager
def unanswering_listener() -> Iterator[socket.socket]:
    """A listener on HOST that answers no new connection: its one-place accept queue is full."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind((HOST, 0))
        server.listen(0)
        filler.connect(server.getsockname())  # takes the one place; nobody accepts it
        yield server


def store(port: int) -> Any:
    """Rank 0's store (a torch TCPStore master) on HOST:port."""
    from torch.distributed import TCPStore

    return TCPStore(HOST, port, is_master=True, wait_for_workers=False)


class Later:
    """Runs `make` after `delay` seconds in a thread; `.value` is what it returned."""

    def __init__(self, delay: float, make: Callable[[], Any]) -> None:
        self.value: Any = None

        def run() -> None:
            time.sleep(delay)
            self.value = make()

        self.thread = threading.Thread(target=run)
        self.thread.start()


def test_a_refused_store_is_tried_again_until_it_listens() -> None:
    (port,) = free_ports(1)  # nothing listens yet: connections are refused
    later = Later(1.0, lambda: store(port))
    start = time.monotonic()
    attempts = wait_for_store(HOST, port, give_up_after=timedelta(seconds=30))
    later.thread.join()
    assert 1.0 <= time.monotonic() - start < SOON_S
    assert attempts >= 2  # refused at least once, then accepted


def test_an_attempt_without_an_answer_is_abandoned_and_made_again() -> None:
    with unanswering_listener() as server:
        host, port = server.getsockname()
        start = time.monotonic()
        attempts = wait_for_store(
            host, port, attempt_timeout=0.3, give_up_after=timedelta(seconds=2)
        )
        took = time.monotonic() - start
    # A blocking connect would have sat in the kernel's SYN retries for one attempt; the probe
    # gave each attempt 0.3 s and made new ones until it gave up, then let torch take over.
    assert attempts >= 5, attempts
    assert 2 <= took < SOON_S, took


def test_the_store_is_reached_once_it_answers_again() -> None:
    with unanswering_listener() as server:
        host, port = server.getsockname()

        def replace_with_a_store() -> Any:
            server.close()  # the address answers again, now with rank 0's store
            return store(port)

        later = Later(1.0, replace_with_a_store)
        start = time.monotonic()
        attempts = wait_for_store(
            host, port, attempt_timeout=0.3, give_up_after=timedelta(seconds=30)
        )
        took = time.monotonic() - start
        later.thread.join()
    assert attempts >= 2 and 1.0 <= took < SOON_S, (attempts, took)


def test_the_store_of_the_gang_that_stopped_is_passed_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rank that rejoins at once finds the old rank 0 still saving, its store still there."""
    (port,) = free_ports(1)
    old = store(port)
    mark_formed(HOST, port)  # the gang that stopped had formed

    def the_replacement() -> Any:
        nonlocal old
        old = None  # the old rank 0 exits, and its store with it
        return store(port)

    later = Later(1.0, the_replacement)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="finetune_trainer.store"):
        attempts = wait_for_store(HOST, port, give_up_after=timedelta(seconds=30))
    took = time.monotonic() - start
    later.thread.join()
    # Not accepted before the replacement's store was there, and accepted soon after.
    assert 1.0 <= took < SOON_S, took
    assert attempts >= 2
    assert "reached the store of the gang that stopped" in caplog.text
    assert later.value is not None and not formed(HOST, port)  # the replacement's, unmarked
