"""Reaching rank 0's rendezvous store before torch.distributed does.

The ranks of other pods reach the store through the rendezvous Service's virtual IP
(naming.master_addr), which the node's proxy translates to rank 0's pod, once per connection.
Where rank 0's pod is replaced while the others stay and rejoin, the old pod can still be an
endpoint for a moment after its address is gone. A connection translated to it is refused, fails
with "no route to host", or gets no answer at all; in the last case the kernel keeps sending
the same SYN to the same dead address for about two minutes (net.ipv4.tcp_syn_retries 6: 127 s)
before torch's TCPStore sees a timeout and tries again. A CI run's drain restart lost 120 s so.
So a rank first makes its own short connections, each a new translation, until the store
accepts one, and only then lets torch connect.

A rank that rejoins starts again within a second of the gang's stop, and can find the store of
the gang that stopped still listening: the old rank 0 is saving its checkpoint. Torch's connect
would then be reset as that store goes, and its retry could be the one sent to the gone pod's
address (a CI run's drain lost 127 s so). So rank 0 marks its store once the gang has formed
(`mark_formed`), and the probe passes over a store with that mark: it is the old gang's.
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

# An attempt that gets no answer in this long is abandoned: within a cluster an answer (an
# accept, or a refusal while rank 0 still starts) takes milliseconds, even on a busy node.
ATTEMPT_TIMEOUT_S = 2.0
# Between refusals: rank 0's pod is there but its store not yet listening (it imports torch).
# Short, since the rendezvous waits on it once the store listens; a refusal costs microseconds.
REFUSED_PAUSE_S = 0.1
# torch.distributed's own default for the store (default_pg_timeout): after this long the probe
# stops and torch's connect says what is wrong, as it would have without the probe.
GIVE_UP_AFTER = timedelta(minutes=30)
# Set in rank 0's store once its gang has formed: a store that holds it belongs to a gang that
# formed before this rank joined, and so is going.
FORMED_KEY = "finetune/gang-formed"


def _client(host: str, port: int, timeout: float) -> Any:
    """A torch store client on host:port that neither waits for nor counts as a worker."""
    from torch.distributed import TCPStore

    return TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout), wait_for_workers=False
    )


def mark_formed(host: str, port: int) -> None:
    """On rank 0, once the gang has formed: mark its store as that of a formed gang."""
    _client(host, port, ATTEMPT_TIMEOUT_S).set(FORMED_KEY, "1")


def formed(host: str, port: int, timeout: float = ATTEMPT_TIMEOUT_S) -> bool:
    """Whether the store on host:port is a formed gang's (`mark_formed`)."""
    return bool(_client(host, port, timeout).check([FORMED_KEY]))


def wait_for_store(
    host: str,
    port: int,
    *,
    attempt_timeout: float = ATTEMPT_TIMEOUT_S,
    give_up_after: timedelta = GIVE_UP_AFTER,
) -> int:
    """Connect to host:port until a connection is accepted by a store whose gang has not formed
    yet, making a new one after each refusal, attempt without an answer, or store of the gang
    that stopped; the number of attempts it took."""
    start = time.monotonic()
    deadline = start + give_up_after.total_seconds()
    attempts = 0
    unanswered = 0
    old = 0
    while True:
        attempts += 1
        pause = REFUSED_PAUSE_S
        try:
            # A plain connection first: its timeout bounds an attempt without an answer for
            # certain. The store client's connect, only once this one was accepted, reads the
            # mark; its own handling of a silent address was not measured.
            with socket.create_connection((host, port), timeout=attempt_timeout):
                pass
            if not formed(host, port, attempt_timeout):
                break
            old += 1  # the stopped gang's rank 0 still saving: its store goes with it
        except TimeoutError:  # no answer: this attempt has waited already
            unanswered += 1
            pause = 0.0
        except ConnectionRefusedError:
            pass
        except (OSError, RuntimeError):  # no route, no name yet, or a store that went meanwhile
            unanswered += 1
        if time.monotonic() >= deadline:
            log.warning("rendezvous store %s:%d did not accept in %s", host, port, give_up_after)
            return attempts
        time.sleep(pause)
    if unanswered or old:
        log.info(
            "rendezvous store %s:%d accepted after %.1f s; of %d attempts, %d got no answer and "
            "%d reached the store of the gang that stopped",
            host,
            port,
            time.monotonic() - start,
            attempts,
            unanswered,
            old,
        )
    return attempts
