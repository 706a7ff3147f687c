"""The only module that talks to the API server (lightkube's async client).

Children are written with server-side apply under the field manager `finetune-operator`, except
the Job: its pod template is immutable and Kueue owns its `suspend`, so it is created once (409
means it already exists, which is success) and later only merge-patched on mutable fields.
Everything returned to callers is a plain dict.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from lightkube import AsyncClient, codecs
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service
from lightkube.types import CascadeType, PatchType

from finetune_api.constants import GROUP, KIND, PLURAL, VERSION
from finetune_operator import naming

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FineTuneJobResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
_KINDS: dict[str, Any] = {"ConfigMap": ConfigMap, "Service": Service, "Job": Job}


class ApplyRejected(Exception):
    """The API server refused what we rendered (422): a render bug, not worth retrying."""


def _code(exc: ApiError) -> int:
    return int(getattr(exc.status, "code", 0) or exc.response.status_code)


def _dict(obj: Any) -> Obj:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


class Kube:
    """A thin async facade over lightkube; one instance per operator process."""

    def __init__(self, client: AsyncClient | None = None) -> None:
        self._client = client

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            # Lazily, so that the client binds to kopf's event loop.
            self._client = AsyncClient(
                config=KubeConfig.from_env(), field_manager=naming.FIELD_MANAGER
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ---- reads ---------------------------------------------------------------------------------

    async def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        try:
            return _dict(await self.client.get(FineTuneJobResource, name, namespace=namespace))
        except ApiError as exc:
            if _code(exc) == 404:
                return None
            raise

    async def get_job(self, namespace: str, name: str) -> Obj | None:
        try:
            return _dict(await self.client.get(Job, name, namespace=namespace))
        except ApiError as exc:
            if _code(exc) == 404:
                return None
            raise

    async def list_pods(self, namespace: str, job_name: str, attempt: int) -> list[Obj]:
        labels = {**naming.selector_labels(job_name), naming.LABEL_ATTEMPT: str(attempt)}
        return [_dict(p) async for p in self.client.list(Pod, namespace=namespace, labels=labels)]

    async def secret_key_exists(self, namespace: str, name: str, key: str) -> bool | None:
        """True/False for the key; None when the Secret itself is missing. Values never leave."""
        try:
            secret = await self.client.get(Secret, name, namespace=namespace)
        except ApiError as exc:
            if _code(exc) == 404:
                return None
            raise
        return key in (secret.data or {}) or key in (secret.stringData or {})

    # ---- writes --------------------------------------------------------------------------------

    async def apply(self, manifest: Obj) -> None:
        """Server-side apply; force, because this operator owns every field it renders."""
        res = _KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        try:
            await self.client.patch(
                res,
                meta["name"],
                manifest,
                namespace=meta["namespace"],
                patch_type=PatchType.APPLY,
                field_manager=naming.FIELD_MANAGER,
                force=True,
            )
        except ApiError as exc:
            if _code(exc) in (400, 422):
                raise ApplyRejected(
                    f"{manifest['kind']} {meta['name']}: {exc.status.message}"
                ) from exc
            raise

    async def create_job(self, manifest: Obj) -> Obj | None:
        """Create the Job and return it; None when it already existed (an earlier pass)."""
        try:
            job = await self.client.create(
                codecs.from_dict(manifest), field_manager=naming.FIELD_MANAGER
            )
        except ApiError as exc:
            if _code(exc) == 409:
                return None
            if _code(exc) in (400, 422):
                raise ApplyRejected(
                    f"Job {manifest['metadata']['name']}: {exc.status.message}"
                ) from exc
            raise
        return _dict(job)

    async def patch_job(self, namespace: str, name: str, patch: Obj) -> None:
        await self.client.patch(
            Job, name, {"spec": patch}, namespace=namespace, patch_type=PatchType.MERGE
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        """Foreground: the Job stays until its pods are gone, so the next gang never overlaps."""
        with contextlib.suppress(ApiError):
            await self.client.delete(Job, name, namespace=namespace, cascade=CascadeType.FOREGROUND)

    async def patch_status(self, namespace: str, name: str, status: Obj) -> None:
        await self.client.patch(
            FineTuneJobResource.Status,
            name,
            {"status": status},
            namespace=namespace,
            patch_type=PatchType.MERGE,
        )

    async def post_event(
        self, owner: Obj, type_: str, reason: str, message: str, action: str = "Reconcile"
    ) -> None:
        """Best effort: a lost Event must never fail a reconcile."""
        meta = owner["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": owner.get("apiVersion"),
                "kind": owner.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason[:128],
            "message": message[:1024],
            "action": action,
            "source": {"component": naming.MANAGER},
            "reportingComponent": naming.MANAGER,
            "reportingInstance": naming.MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(codecs.from_dict(event))
        except Exception as exc:  # events are advisory; never fail a pass on one
            log.debug("event not posted: %s", exc)
