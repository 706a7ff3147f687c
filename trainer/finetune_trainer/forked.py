"""A function run in a forked child of this process, behind subprocess.Popen's names.

`finetune train` forks its ranks once it has imported the trainer (launch.fork_ranks), and the
sources' prefetch before it imports torch (finetune_trainer.prefetch): each child starts with
what the launcher has imported, instead of starting an interpreter and importing it again.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable


class Forked:
    """`run()` in a forked child, which exits with what it returns (1 where it raised, with the
    traceback printed); `poll`, `send_signal`, `terminate` and `wait` as Popen has them."""

    def __init__(self, run: Callable[[], int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: it never returns from here
            code = 1
            try:
                code = run()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid: int = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)
