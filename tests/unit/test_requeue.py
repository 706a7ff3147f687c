"""The follow-up passes a plan asks for (`Plan.requeue_after`)."""

from __future__ import annotations

import asyncio

from finetune_operator.requeue import Requeue

KEY = ("ns", "demo")


def test_a_follow_up_runs_once_and_a_later_pass_replaces_or_cancels_it() -> None:
    async def scenario() -> list[str]:
        ran: list[str] = []
        requeue = Requeue()

        def run(label: str):
            async def follow_up() -> None:
                ran.append(label)

            return follow_up

        requeue.schedule(KEY, 0.05, run("first"))
        requeue.schedule(KEY, 0.01, run("second"))  # a later pass's answer replaces it
        requeue.schedule(("ns", "other"), 0.02, run("other"))
        requeue.schedule(("ns", "gone"), 0.01, run("gone"))
        requeue.cancel(("ns", "gone"))  # deleted
        await asyncio.sleep(0.1)
        requeue.schedule(KEY, 0.01, run("third"))
        requeue.schedule(KEY, None, run("never"))  # running now: nothing more to look at
        await asyncio.sleep(0.05)
        assert requeue.pending(KEY) is None
        requeue.close()
        return ran

    assert asyncio.run(scenario()) == ["second", "other"]


def test_a_failing_follow_up_is_logged_not_raised(caplog) -> None:
    async def scenario() -> None:
        requeue = Requeue()

        async def boom() -> None:
            raise RuntimeError("API server away")

        requeue.schedule(KEY, 0, boom)
        await asyncio.sleep(0.05)
        requeue.close()

    asyncio.run(scenario())
    assert "API server away" in caplog.text
