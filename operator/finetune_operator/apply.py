"""The only module that talks to the API server (the official `kubernetes` client).

Children are written with server-side apply under the field manager `finetune-operator`, except
the Job: its pod template is immutable and Kueue owns its `suspend`, so it is created once (409
means it already exists, which is success) and later only merge-patched on mutable fields.
Everything returned to callers is a plain dict.

An object is only ever written or deleted when it is this operator's: `ensure` applies a child
only after it read it back controlled by its FineTuneJob (or created it), and deletes carry a uid
precondition. Whatever else holds a child's name is returned to the caller untouched.

The client is blocking. Every request runs in this module's own bounded thread pool, so kopf's
event loop never waits on the network, and at most `max_requests` requests are in flight: the
HTTP connection pool has exactly that many connections, so no thread waits for one and none is
opened only to be thrown away. Responses are read raw (`_preload_content=False`) and parsed
with `json.loads`: callers want dicts, and the client's models cost ~50x the parse (a 4.6 kB
Job: 3.9 ms into a V1Job, 0.08 ms with json.loads), as much CPU as the request itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_api.constants import GROUP, PLURAL, VERSION
from finetune_operator import kueue, naming

log = logging.getLogger(__name__)
Obj = dict[str, Any]

# Requests in flight at most (worker threads = pooled connections). In benchmarks/
# operator_scale.py the operator used a third of a core while requests queued: the API server
# is the bottleneck, and more threads would only deepen its queue and add malloc arenas (RSS).
MAX_REQUESTS = 16
# (connect, read) seconds: a stalled request must give its thread back, not hold it forever.
REQUEST_TIMEOUT = (10.0, 60.0)
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
# Where server-side apply writes each kind this operator applies.
_CHILD_PATHS = {
    "ConfigMap": "/api/v1/namespaces/{namespace}/configmaps/{name}",
    "PersistentVolumeClaim": "/api/v1/namespaces/{namespace}/persistentvolumeclaims/{name}",
    "Service": "/api/v1/namespaces/{namespace}/services/{name}",
    "Job": "/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
    "Deployment": "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
}
_JOB_PATH = _CHILD_PATHS["Job"]
# How a child that does not exist yet is created (a POST, which never takes over an object).
_CREATE_PATHS = {kind: path.rsplit("/", 1)[0] for kind, path in _CHILD_PATHS.items()}
# How a StorageClass is marked the default (the beta name is still set by some provisioners).
DEFAULT_CLASS_ANNOTATIONS = (
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
)
_FTJ_STATUS_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}/status"
_KUEUE_GROUP_PATH = f"/apis/{kueue.GROUP}"
_WORKLOADS_PATH = _KUEUE_GROUP_PATH + f"/{{version}}/namespaces/{{namespace}}/{kueue.PLURAL}"
_WORKLOAD_PATH = _WORKLOADS_PATH + "/{name}"
_LEASES_PATH = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
_LEASE_PATH = _LEASES_PATH + "/{name}"


class ApplyRejected(Exception):
    """The API server refused what we rendered (400/422), or an admission plugin what the spec
    asks for (403: a LimitRange, a policy webhook): not worth retrying."""


# How the API server's authorizer words a denial (`User "..." cannot create resource "jobs" in
# API group "batch" ...`), unlike an admission plugin's 403.
RBAC_DENIAL = re.compile(r'cannot \w+ resource "')


class QuotaExceeded(Exception):
    """The API server refused a create for a ResourceQuota of the namespace (403, its quota
    admission's `exceeded quota`): the same create passes once the quota has room again."""


class SecretCheck(StrEnum):
    """What the operator could learn about a referenced Secret key."""

    PRESENT = "Present"
    NO_SECRET = "NoSecret"
    NO_KEY = "NoKey"
    # 403: the operator may not read Secrets (the chart's rbac.getSecrets=false). The kubelet
    # still refuses to start a pod whose Secret is missing, so the pod reports it instead.
    UNKNOWN = "Unknown"


def covers(have: Any, want: Any) -> bool:
    """Whether `have` (an object read back) already holds every field of `want` (a render):
    the API server only adds defaults, so then an apply would change nothing."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(covers(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(covers(h, w) for h, w in zip(have, want, strict=True))
        )
    return have == want


def controlled_by(obj: Obj, owner_uid: str) -> bool:
    """Whether `obj` has a controller ownerReference to the object `owner_uid`."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(owner_uid) and any(r.get("controller") and r.get("uid") == owner_uid for r in refs)


def load_configuration() -> client.Configuration:
    """In-cluster credentials in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config).

    The same order as kopf's own login, so the watches and the writes reach one cluster.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    return configuration


def _message(exc: ApiException) -> str:
    """The Status message the API server sent, which names the field it refused."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def _request(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: tuple[float, float] = REQUEST_TIMEOUT,
) -> Obj:
    """One blocking call, its body read and parsed on the same worker thread.

    Reading the body here, not back on the event loop, matters: until it is read the response
    holds its connection, so the thread's next request would find the pool empty, open a new
    TLS connection and later discard one (measured: 52 connections for 800 requests).
    """
    response = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


class Kube:
    """A thin async facade over the `kubernetes` client; one instance per operator process."""

    def __init__(
        self,
        configuration: client.Configuration | None = None,
        max_requests: int = MAX_REQUESTS,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
        retries: int | None = None,
    ) -> None:
        """`request_timeout`: (connect, read) seconds of each request; `retries`: urllib3's
        retries of a failed connection or read (None: its default, 3)."""
        self._configuration = configuration
        self._max_requests = max_requests
        self._request_timeout = request_timeout
        self._retries = retries
        self._api: client.ApiClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        # The version of kueue.x-k8s.io the API server prefers, once asked (see kueue.py).
        self._kueue_version: str | None = None

    def _client(self) -> tuple[client.ApiClient, ThreadPoolExecutor]:
        if self._api is None or self._executor is None:
            # Lazily: the config is read when the first pass needs it, after kopf has started.
            configuration = self._configuration or load_configuration()
            configuration.connection_pool_maxsize = self._max_requests
            if self._retries is not None:
                configuration.retries = self._retries
            self._api = client.ApiClient(configuration)
            self._api.user_agent = naming.MANAGER
            self._executor = ThreadPoolExecutor(self._max_requests, thread_name_prefix="kube")
        return self._api, self._executor

    @property
    def api(self) -> client.ApiClient:
        return self._client()[0]

    async def _json(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """Run one blocking client call in the pool; its body comes back as a dict."""
        _, executor = self._client()
        call = functools.partial(_request, fn, args, kwargs, self._request_timeout)
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def _get(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj | None:
        try:
            return await self._json(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def _patch(
        self,
        path: str,
        namespace: str,
        name: str,
        body: Obj,
        content_type: str,
        query: list[tuple[str, Any]] | None = None,
    ) -> Obj:
        # The generated patch methods of client 34.1.0 always send a JSON patch (rewritten to a
        # strategic merge patch for a dict body) and take no content type, so patches go through
        # the same ApiClient with the Content-Type set here.
        return await self._json(
            self.api.call_api,
            path,
            "PATCH",
            path_params={"namespace": namespace, "name": name},
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )

    async def close(self) -> None:
        if self._api is not None:
            api, executor = self._api, self._executor
            self._api = self._executor = None
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
            api.rest_client.pool_manager.clear()
            api.close()

    # ---- reads ---------------------------------------------------------------------------------

    async def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        api = client.CustomObjectsApi(self.api)
        return await self._get(
            api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )

    async def get_job(self, namespace: str, name: str) -> Obj | None:
        return await self._read("Job", namespace, name)

    async def list_pods(self, namespace: str, job_name: str, attempt: int) -> list[Obj]:
        labels = {**naming.selector_labels(job_name), naming.LABEL_ATTEMPT: str(attempt)}
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = await self._json(
            client.CoreV1Api(self.api).list_namespaced_pod, namespace, label_selector=selector
        )
        return list(pods.get("items") or [])

    async def job_events(self, namespace: str, job_uid: str, reason: str) -> list[Obj]:
        """The Events with `reason` about the Job `job_uid`: the Job controller's FailedCreate
        (its pods cannot be created, which the Job's status never says) or SuccessfulCreate
        (when it made each pod). [] when the operator may not list Events: it then cannot tell
        why, and the pod-less Job only waits, or a failure it might explain is counted."""
        selector = f"involvedObject.uid={job_uid},reason={reason}"
        try:
            events = await self._json(
                client.CoreV1Api(self.api).list_namespaced_event,
                namespace,
                field_selector=selector,
            )
        except ApiException as exc:
            if exc.status == 403:
                return []
            raise
        return list(events.get("items") or [])

    async def read_nodes(self, names: Iterable[str]) -> dict[str, Obj | None]:
        """The Nodes by name, None for one that does not exist. One the operator may not read
        (RBAC) is left out: nothing is known of it, and a failure it might explain is counted."""
        found: dict[str, Obj | None] = {}
        for name in sorted(names):
            try:
                found[name] = await self._get(client.CoreV1Api(self.api).read_node, name)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                log.warning(
                    "may not read Node %s (RBAC: get nodes): a failed attempt whose pod on it "
                    "never reported its end is counted, even if the node was lost",
                    name,
                )
        return found

    async def secret_key_exists(self, namespace: str, name: str, key: str) -> SecretCheck:
        """Whether the Secret has the key; UNKNOWN when RBAC forbids reading it. Values never
        leave this method."""
        try:
            secret = await self._get(
                client.CoreV1Api(self.api).read_namespaced_secret, name, namespace
            )
        except ApiException as exc:
            if exc.status == 403:
                return SecretCheck.UNKNOWN
            raise
        if secret is None:
            return SecretCheck.NO_SECRET
        if key in (secret.get("data") or {}) or key in (secret.get("stringData") or {}):
            return SecretCheck.PRESENT
        return SecretCheck.NO_KEY

    async def _get_path(self, path: str, **path_params: str) -> Obj | None:
        """GET `path` (its placeholders filled from `path_params`) as JSON; None on 404."""
        return await self._get(
            self.api.call_api,
            path,
            "GET",
            path_params=path_params,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )

    async def _read(self, kind: str, namespace: str, name: str) -> Obj | None:
        return await self._get_path(_CHILD_PATHS[kind], namespace=namespace, name=name)

    async def _kueue_preferred_version(self) -> str | None:
        """The version of kueue.x-k8s.io that the API server prefers (as kubectl and kopf pick
        it), asked once and kept; None when the group is not served (no Kueue)."""
        if self._kueue_version is None:
            group = await self._get_path(_KUEUE_GROUP_PATH)
            if group is None:
                return None
            self._kueue_version = str((group.get("preferredVersion") or {}).get("version") or "")
        return self._kueue_version or None

    async def find_workload(self, namespace: str, job_uid: str) -> tuple[kueue.Lookup, Obj | None]:
        """The Kueue Workload of the Job `job_uid`, found as Kueue finds it: by its job-uid label,
        then by its controller ownerReference. A group or resource that is not served means
        Kueue is not installed, and 403 that RBAC withholds Workloads: answers, not errors."""
        for _ in range(2):  # a 404 with a remembered version: Kueue changed; ask again, once
            version = await self._kueue_preferred_version()
            if version is None:
                return kueue.Lookup.NO_KUEUE, None
            try:
                found = await self._json(
                    self.api.call_api,
                    _WORKLOADS_PATH,
                    "GET",
                    path_params={"version": version, "namespace": namespace},
                    query_params=[("labelSelector", f"{kueue.LABEL_JOB_UID}={job_uid}")],
                    header_params={"Accept": "application/json"},
                    auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                )
            except ApiException as exc:
                if exc.status == 403:
                    return kueue.Lookup.FORBIDDEN, None
                if exc.status != 404:
                    raise
                self._kueue_version = None
                continue
            workload = kueue.owned_by(list(found.get("items") or []), job_uid)
            return (kueue.Lookup.FOUND if workload else kueue.Lookup.NOT_YET), workload
        return kueue.Lookup.NO_KUEUE, None

    async def storage_classes(self) -> dict[str, bool] | None:
        """The cluster's StorageClasses by name, each with whether it is marked the default.
        None when the operator may not list them: it cannot tell, and a claim that stays
        Pending shows on the pod."""
        try:
            classes = await self._json(client.StorageV1Api(self.api).list_storage_class)
        except ApiException as exc:
            if exc.status == 403:
                return None
            raise
        return {
            c["metadata"]["name"]: any(
                (c["metadata"].get("annotations") or {}).get(a) == "true"
                for a in DEFAULT_CLASS_ANNOTATIONS
            )
            for c in classes.get("items") or []
        }

    # ---- writes --------------------------------------------------------------------------------

    async def ensure(self, manifest: Obj, owner_uid: str, create_first: bool = False) -> Obj | None:
        """Create or update a ConfigMap or Service that the FineTuneJob `owner_uid` controls.

        Returns None when the child is in place, or the object that holds its name without a
        controller reference to `owner_uid`, which is left untouched (not even read twice). A
        missing child is created with a POST, never applied: an apply would take over an object
        made in between. An existing one is applied with its resourceVersion as a
        precondition, so an object swapped in after the read is never overwritten.

        `create_first` (the caller expects no child, as on a FineTuneJob's first pass) tries the
        POST before the read: one request instead of two when the guess is right.
        """
        kind, meta = manifest["kind"], manifest["metadata"]
        if create_first and await self._create(manifest) is not None:
            return None
        for _ in range(3):
            existing = await self._read(kind, meta["namespace"], meta["name"])
            if existing is None:
                if await self._create(manifest) is not None:
                    return None
                continue  # made in between: read it to see whose it is
            if not controlled_by(existing, owner_uid):
                return existing
            if covers(existing, manifest):
                return None  # in place already: a read is all a resync pass costs
            version = existing["metadata"].get("resourceVersion")
            pinned = {**manifest, "metadata": {**meta, "resourceVersion": version}}
            try:
                await self.apply(pinned)
                return None
            except ApiException as exc:
                if exc.status != 409:  # 409: it changed since the read; look again
                    raise
        raise RuntimeError(f"{kind} {meta['namespace']}/{meta['name']} kept changing; retry")

    async def _write(self, method: str, path: str, body: Obj, **path_params: str) -> Obj | None:
        """POST (create) or PUT (replace) `body` at `path` and return what the API server stored;
        None on 409: the name is taken, or the object changed since the resourceVersion read."""
        try:
            return await self._json(
                self.api.call_api,
                path,
                method,
                path_params=path_params,
                query_params=[("fieldManager", naming.FIELD_MANAGER)],
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    async def _create(self, manifest: Obj) -> Obj | None:
        """POST a new child and return it; None when the name is already taken (409)."""
        kind, meta = manifest["kind"], manifest["metadata"]
        try:
            return await self._write(
                "POST", _CREATE_PATHS[kind], manifest, namespace=meta["namespace"]
            )
        except ApiException as exc:
            said = _message(exc)
            if exc.status == 403 and "exceeded quota" in said:
                raise QuotaExceeded(said) from exc
            # 403 from an admission plugin or webhook (a LimitRange's maximum, a policy) refuses
            # what the spec asks for, as 400 and 422 refuse what was rendered; a 403 of RBAC is
            # the operator's own permissions, which a retry after a fix of the chart cures.
            if exc.status in (400, 422) or (exc.status == 403 and not RBAC_DENIAL.search(said)):
                raise ApplyRejected(f"{kind} {meta['name']}: {said}") from exc
            raise

    async def apply(self, manifest: Obj) -> None:
        """Server-side apply; force, because this operator owns every field it renders. Only for
        an object already known to be this operator's (see `ensure`)."""
        meta = manifest["metadata"]
        query = [("fieldManager", naming.FIELD_MANAGER), ("force", "true")]
        try:
            await self._patch(
                _CHILD_PATHS[manifest["kind"]],
                meta["namespace"],
                meta["name"],
                manifest,
                APPLY_PATCH,
                query,
            )
        except ApiException as exc:
            if exc.status in (400, 422):
                raise ApplyRejected(f"{manifest['kind']} {meta['name']}: {_message(exc)}") from exc
            raise

    async def create_job(self, manifest: Obj) -> Obj | None:
        """Create the Job and return it; None when the name is taken (by an earlier pass, or by
        an object that the next read finds is not this FineTuneJob's)."""
        return await self._create(manifest)

    async def create_claim(self, manifest: Obj) -> Obj:
        """Create a PersistentVolumeClaim, or return the one that already holds the name (the
        caller checks whose it is). Never applied: a claim's spec is immutable once bound."""
        meta = manifest["metadata"]
        for _ in range(3):
            claim = await self._create(manifest)
            if claim is None:
                claim = await self._read(manifest["kind"], meta["namespace"], meta["name"])
            if claim is not None:
                return claim
        where = f"{meta['namespace']}/{meta['name']}"
        raise RuntimeError(f"PersistentVolumeClaim {where} kept changing; retry")

    async def set_claim_owner(self, claim: Obj, owners: list[Obj], marks: Obj) -> Obj | None:
        """Merge-patch a claim's ownerReferences (the whole list) and the labels and annotations
        that mark it retained (`marks`, checkpoints.retention_marks): how the operator releases
        the claim of an ended FineTuneJob and how a FineTuneJob of the same name adopts it.
        Pinned to the resourceVersion `claim` was read at, so a claim that changed since is left
        as it is: None then (or when it is gone), and the caller reads it again."""
        meta = claim["metadata"]
        body = {
            "metadata": {
                **marks,
                "resourceVersion": meta["resourceVersion"],
                "ownerReferences": owners,
            }
        }
        path = _CHILD_PATHS["PersistentVolumeClaim"]
        try:
            return await self._patch(path, meta["namespace"], meta["name"], body, MERGE_PATCH)
        except ApiException as exc:
            if exc.status in (404, 409):
                return None
            raise

    async def expand_claim(self, namespace: str, name: str, size: str) -> str | None:
        """Ask for `size` of storage on a claim (its expansion); the API server's refusal (a
        StorageClass without allowVolumeExpansion, an unbound claim) as its message, or None."""
        body = {"spec": {"resources": {"requests": {"storage": size}}}}
        path = _CHILD_PATHS["PersistentVolumeClaim"]
        try:
            await self._patch(path, namespace, name, body, MERGE_PATCH)
        except ApiException as exc:
            if exc.status in (403, 422):
                return _message(exc)[:512]
            raise
        return None

    async def get_child(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A child of `kind` (Deployment, Service, PersistentVolumeClaim, ...) by name; None
        when there is none."""
        return await self._read(kind, namespace, name)

    async def delete_owned(self, kind: str, namespace: str, name: str, owner_uid: str) -> None:
        """Delete the child `name` only if it carries the FineTuneJob `owner_uid`'s controller
        reference, and only that very object (uid precondition): what spec.serve served, once
        spec.serve is removed, and the children of a FineTuneJob that keeps its claim as it is
        deleted (claims.release_deleted). Gone already (404, 409) is fine."""
        existing = await self._read(kind, namespace, name)
        if existing is None or not controlled_by(existing, owner_uid):
            return
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
            "preconditions": {"uid": existing["metadata"]["uid"]},
        }
        try:
            await self._json(
                self.api.call_api,
                _CHILD_PATHS[kind],
                "DELETE",
                path_params={"namespace": namespace, "name": name},
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=options,
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    async def patch_job(self, namespace: str, name: str, patch: Obj) -> None:
        await self._patch(_JOB_PATH, namespace, name, {"spec": patch}, MERGE_PATCH)

    async def set_workload_active(
        self, namespace: str, name: str, uid: str, active: bool
    ) -> str | None:
        """Merge-patch a Kueue Workload's spec.active, the one field of it the operator writes.

        The uid in the patch guards it: a Workload that replaced this one under the same name
        keeps its own uid, and the API server refuses the change (422, uid is immutable). 404
        means it is gone; the next pass looks again. A refusal (400/422, e.g. a validation rule
        of Kueue's CRD) is returned as the API server's message, for the status to show:
        Kueue's objects are not the operator's, and their rules are not a reason to fail a pass.
        """
        body = {"metadata": {"uid": uid}, "spec": {"active": active}}
        version = await self._kueue_preferred_version()
        if version is None:
            return None  # Kueue went away since the Workload was read
        path = _WORKLOAD_PATH.replace("{version}", version)
        try:
            await self._patch(path, namespace, name, body, MERGE_PATCH)
        except ApiException as exc:
            if exc.status in (404, 409):
                log.debug("Workload %s/%s (uid %s) gone: %s", namespace, name, uid, exc.status)
                return None
            if exc.status in (400, 422):
                return _message(exc)[:512]
            raise
        return None

    async def delete_job(self, namespace: str, name: str, uid: str | None) -> None:
        """Delete exactly the Job `uid`, foreground: it stays until its pods are gone, so the
        next gang never overlaps.

        The uid precondition keeps a late pass from deleting a newer attempt that reuses the
        name. 404 (already gone) and 409 (a different Job holds the name now) mean there is
        nothing left to delete; any other error propagates so kopf retries.
        """
        if not uid:
            # Without a uid there is nothing to guard the delete with; never delete blindly.
            raise ValueError(f"refusing to delete Job {namespace}/{name} without its uid")
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Foreground",
            "preconditions": {"uid": uid},
        }
        try:
            await self._json(
                client.BatchV1Api(self.api).delete_namespaced_job, name, namespace, body=options
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                log.debug("Job %s/%s (uid %s) already gone: %s", namespace, name, uid, exc.status)
                return
            raise

    async def patch_status(self, namespace: str, name: str, status: Obj) -> None:
        await self._patch(_FTJ_STATUS_PATH, namespace, name, {"status": status}, MERGE_PATCH)

    async def post_event(
        self,
        owner: Obj,
        type_: str,
        reason: str,
        message: str,
        action: str = "Reconcile",
        once: str | None = None,
    ) -> None:
        """Best effort: a lost Event must never fail a reconcile. `once` names an Event that
        happens once in the owner's life (a lowercase key): it is named after the owner's uid
        and the key, so a pass repeated after a restart finds it posted (409) and adds none."""
        meta = owner["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # The API server names a plain Event; a `once` Event has its own name.
        identity = (
            {"generateName": f"{meta['name']}."}
            if once is None
            else {"name": f"{meta['name']}.{(meta.get('uid') or '')[:8]}.{once}"}
        )
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {**identity, "namespace": meta["namespace"]},
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
            await self._json(
                client.CoreV1Api(self.api).create_namespaced_event, meta["namespace"], event
            )
        except ApiException as exc:
            if once is None or exc.status != 409:  # 409: a `once` Event posted before
                log.debug("event not posted: %s", exc)
        except Exception as exc:  # events are advisory; never fail a pass on one
            log.debug("event not posted: %s", exc)

    # ---- the leader election's Lease (leader.py) -----------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> Obj | None:
        return await self._get_path(_LEASE_PATH, namespace=namespace, name=name)

    async def write_lease(self, lease: Obj) -> Obj | None:
        """Create `lease`, or replace it where it carries the resourceVersion it was read at; None
        when another writer got there first (409: it exists, or it changed since that read)."""
        namespace, name = lease["metadata"]["namespace"], lease["metadata"]["name"]
        if lease["metadata"].get("resourceVersion"):
            return await self._write("PUT", _LEASE_PATH, lease, namespace=namespace, name=name)
        return await self._write("POST", _LEASES_PATH, lease, namespace=namespace)
