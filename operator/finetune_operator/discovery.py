"""Make kopf watch a CRD that discovery serves only after the CRD's last event.

kopf finds what to watch in discovery (`/apis`), and looks at a group again only when a CRD of
that group changes (kopf 1.45.2, `_core/reactor/observation.py`,
`process_discovered_resource_event`). The API server publishes a new CRD in discovery a moment
*after* it marks the CRD Established (kube-rs#951 documents the same lag). When the Established
event wins that race, kopf's look finds nothing and no later event makes it look again. Kueue
installed after the operator then went unwatched: a Workload change reached a FineTuneJob only
with its resync, 30 to 60 s late (the control-plane suite's Kueue test took 143 s, not 4).

`look_again_until_served` wraps kopf's processor: after an event of one of the given CRDs, once
it is Established, if kopf did not find its resource, it looks again with back-off until it
does. kopf's own code does the looking; this only repeats it. It replaces a private function
of kopf, so kopf is pinned (pyproject.toml), and a kopf without it fails at start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

from kopf._cogs.structs import references
from kopf._core.reactor import observation

from finetune_operator import lifecycle

logger = logging.getLogger(__name__)

# Seconds between looks, 31.5 s in all: the lag is usually a moment, longer on a loaded server.
DELAYS: Final = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

Processor = Callable[..., Awaitable[None]]
# A CRD's resource as (API group, plural).
Resource = tuple[str, str]


def _served(insights: references.Insights, resource: Resource) -> bool:
    """Whether kopf watches it (it found it in discovery, and a handler selects it)."""
    return any((r.group, r.plural) == resource for r in insights.watched_resources)


def _resource(crd: dict[str, Any]) -> Resource:
    spec = crd.get("spec") or {}
    return spec.get("group", ""), (spec.get("names") or {}).get("plural", "")


def _waits_for_discovery(raw_event: dict[str, Any], resources: Collection[Resource]) -> bool:
    """A change (not the initial listing, not a deletion) of one of `resources`' CRDs, which
    the API server has Established."""
    crd = raw_event.get("object") or {}
    deleting = bool((crd.get("metadata") or {}).get("deletionTimestamp"))
    if raw_event.get("type") in (None, "DELETED") or deleting:
        return False
    return _resource(crd) in resources and "Established" in lifecycle.true_conditions(crd)


def look_again_until_served(processor: Processor, resources: Collection[Resource]) -> Processor:
    """kopf's CRD event processor, which for `resources` looks at discovery again until kopf
    serves them."""

    @functools.wraps(processor)
    async def process(*, raw_event: Any, insights: references.Insights, **kwargs: Any) -> None:
        await processor(raw_event=raw_event, insights=insights, **kwargs)
        if not _waits_for_discovery(raw_event, resources):
            return
        resource = _resource(raw_event["object"])
        name = ".".join(reversed(resource))
        for delay in DELAYS:
            if _served(insights, resource):
                return
            await asyncio.sleep(delay)
            logger.info("%s is Established but was not in discovery: looking again", name)
            await processor(raw_event=raw_event, insights=insights, **kwargs)
        if not _served(insights, resource):
            logger.warning("%s is Established, but discovery still does not serve it", name)

    return process


def install(resources: Collection[Resource]) -> None:
    """Wrap kopf's processor of CRD events for these (group, plural) resources. Call it before
    `kopf.run`, which looks the processor up when it starts watching CRDs."""
    original = observation.process_discovered_resource_event
    observation.process_discovered_resource_event = look_again_until_served(original, resources)
