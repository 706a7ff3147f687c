"""The CLI's only module that talks to the API server, through the `kubernetes` client.

Where it connects is resolved as kubectl resolves it: --kubeconfig, else $KUBECONFIG (a list of
files, merged), else ~/.kube/config, and inside a pod with none of them its service account.
--context picks a context (default: the current one); the namespace is -n, else the context's,
else "default". Everything returned is a plain dict, as the API server sent it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.constants import GROUP, KIND, LABEL_ATTEMPT, LABEL_JOB_NAME, PLURAL, VERSION
from finetune_api.pod import CONTAINER_NAME
from finetune_cli.exits import CommandError, Exit

Obj = dict[str, Any]
FIELD_MANAGER = "finetune-cli"
# The Job controller's annotation with a pod's completion index: the pod's NODE_RANK.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A watch the server holds open this long at most; the loops below then watch again.
WATCH_CHUNK_S = 300


@dataclass(frozen=True)
class Target:
    """Where a cluster command points: the kubectl flags of the same names."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def kubeconfig_path(explicit: str | None) -> str | None:
    """The kubeconfig file(s) kubectl would read, or None when there are none."""
    if explicit:
        return explicit
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() else None


def current_context(path: str) -> str | None:
    """kubectl's current context: the first file of the list that names one. (The client's
    own merge lets the last file win, so it is read here and passed on explicitly.)"""
    import yaml

    for part in path.split(os.pathsep):
        try:
            doc = yaml.safe_load(Path(part).expanduser().read_text())
        except (OSError, yaml.YAMLError):
            continue  # kubectl skips missing files of the list too
        if isinstance(doc, dict) and doc.get("current-context"):
            return str(doc["current-context"])
    return None


def context_namespace(path: str, context: str | None) -> str:
    """The namespace of the named context, or of the current one; "default" when it sets none."""
    from kubernetes import config

    name = context or current_context(path)
    contexts, _ = config.list_kube_config_contexts(config_file=path)
    chosen = next((c for c in contexts if c.get("name") == name), None)
    if chosen is None:
        raise CommandError(f"context {name!r} is not in the kubeconfig", Exit.CLUSTER)
    return str((chosen.get("context") or {}).get("namespace") or "default")


def pod_index(pod: Obj) -> int:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    raw = raw if raw is not None else (meta.get("labels") or {}).get(COMPLETION_INDEX, "0")
    try:
        return int(raw)
    except ValueError:
        return 0


def container_started(pod: Obj) -> bool:
    """Whether the trainer container has a log to read: it runs, or ran and ended."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    for container in status.get("containerStatuses") or []:
        if container.get("name") == CONTAINER_NAME:
            state = container.get("state") or {}
            return "running" in state or "terminated" in state
    return False


def _message(exc: Any) -> str:
    """The API server's own words from an ApiException, else the exception."""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        body = json.loads(exc.body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "reason", None) or exc)


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    """API and connection failures as one-line CommandErrors with a useful exit code."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        if exc.status == 422:  # the API server's validation (CEL rules, immutable fields)
            raise CommandError(f"{what}: rejected: {_message(exc)}", Exit.INVALID) from None
        if exc.status == 409:
            raise CommandError(
                f"{what}: conflict: {_message(exc)} (--force-conflicts takes the fields over)",
                Exit.CLUSTER,
            ) from None
        raise CommandError(f"{what}: {exc.status} {_message(exc)}", Exit.CLUSTER) from None
    except HTTPError as exc:
        raise CommandError(f"{what}: cannot reach the API server: {exc}", Exit.CLUSTER) from None


class Cluster:
    """FineTuneJobs, their pods and the pods' logs, in one namespace of one cluster."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client

        self.api, self.namespace = api, namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    @classmethod
    def connect(cls, target: Target) -> Cluster:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        path = kubeconfig_path(target.kubeconfig)
        configuration = client.Configuration()
        try:
            if path is None:
                if not os.environ.get("KUBERNETES_SERVICE_HOST"):
                    raise CommandError(
                        "no kubeconfig: pass --kubeconfig, set KUBECONFIG or write ~/.kube/config",
                        Exit.CLUSTER,
                    )
                config.load_incluster_config(client_configuration=configuration)
                namespace = target.namespace or SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            else:
                config.load_kube_config(
                    config_file=path,
                    context=target.context or current_context(path),
                    client_configuration=configuration,
                    persist_config=False,
                )
                namespace = target.namespace or context_namespace(path, target.context)
        except (ConfigException, OSError) as exc:
            raise CommandError(f"kubeconfig: {exc}", Exit.CLUSTER) from None
        return cls(client.ApiClient(configuration), namespace)

    # ---- FineTuneJobs ------------------------------------------------------------------------

    def _path(self, namespace: str, name: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"

    def get(self, name: str, namespace: str | None = None) -> Obj | None:
        from kubernetes.client.exceptions import ApiException

        namespace = namespace or self.namespace
        with _api_errors(f"get {KIND} {namespace}/{name}"):
            try:
                return dict(
                    self.custom.get_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, name
                    )
                )
            except ApiException as exc:
                if exc.status == 404 and "finetunejobs" in _message(exc):
                    return None
                if exc.status == 404:  # no such resource at all, not just no such object
                    raise CommandError(
                        f"the {KIND} CRD is not installed in this cluster (install the chart): "
                        f"{_message(exc)}",
                        Exit.CLUSTER,
                    ) from None
                raise

    def require(self, name: str) -> Obj:
        obj = self.get(name)
        if obj is None:
            raise CommandError(f"{KIND} {self.namespace}/{name} not found", Exit.CLUSTER)
        return obj

    def apply(self, manifest: Obj, *, force: bool = False) -> Obj:
        """Server-side apply under the field manager `finetune-cli`; returns the object."""
        meta = manifest["metadata"]
        query: list[tuple[str, Any]] = [("fieldManager", FIELD_MANAGER)]
        if force:
            query.append(("force", True))
        with _api_errors(f"apply {KIND} {meta['namespace']}/{meta['name']}"):
            # The generated client pins merge-patch for this call; apply needs its own type.
            return dict(
                self.api.call_api(
                    self._path(meta["namespace"], meta["name"]),
                    "PATCH",
                    query_params=query,
                    header_params={
                        "Content-Type": "application/apply-patch+yaml",
                        "Accept": "application/json",
                    },
                    body=manifest,
                    response_type="object",
                    auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                )
            )

    def delete(self, obj: Obj) -> None:
        """Delete exactly this FineTuneJob (uid precondition): one made since under its name is
        left alone. Gone already is fine."""
        from kubernetes.client.exceptions import ApiException

        meta = obj["metadata"]
        options = {"preconditions": {"uid": meta["uid"]}, "propagationPolicy": "Background"}
        with _api_errors(f"delete {KIND} {meta['namespace']}/{meta['name']}"):
            try:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body=options
                )
            except ApiException as exc:
                if exc.status not in (404, 409):  # gone, or another object holds the name
                    raise

    def create(self, manifest: Obj) -> Obj:
        """Create a FineTuneJob (a POST: never an update of one that exists)."""
        meta = manifest["metadata"]
        with _api_errors(f"create {KIND} {meta['namespace']}/{meta['name']}"):
            return dict(
                self.custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    meta["namespace"],
                    PLURAL,
                    manifest,
                    field_manager=FIELD_MANAGER,
                )
            )

    def watch(self, name: str, deadline: float | None) -> Iterator[Obj]:
        """The FineTuneJob now, then again at every change, until `deadline` (monotonic)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        obj = self.require(name)
        yield obj
        version = obj["metadata"]["resourceVersion"]
        while deadline is None or deadline - time.monotonic() > 0:
            left = WATCH_CHUNK_S if deadline is None else deadline - time.monotonic()
            seconds = max(1, min(WATCH_CHUNK_S, math.ceil(left)))
            expired = False
            with _api_errors(f"watch {KIND} {self.namespace}/{name}"):
                try:
                    for event in watch.Watch().stream(
                        self.custom.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        field_selector=f"metadata.name={name}",
                        resource_version=version,
                        timeout_seconds=seconds,
                        # A dead connection must not outlive the deadline by much.
                        _request_timeout=seconds + 15,
                    ):
                        if event["type"] == "DELETED":
                            raise CommandError(
                                f"{KIND} {self.namespace}/{name} was deleted", Exit.CLUSTER
                            )
                        if event["type"] in ("ADDED", "MODIFIED"):
                            obj = event["raw_object"]
                            version = obj["metadata"]["resourceVersion"]
                            yield obj
                except ApiException as exc:
                    # Watch raises 410 Gone itself when our version is too old to resume.
                    if exc.status != 410:
                        raise
                    expired = True
            if expired:  # list again, as the watch contract asks
                obj = self.require(name)
                version = obj["metadata"]["resourceVersion"]
                yield obj

    # ---- pods and logs -----------------------------------------------------------------------

    def _selector(self, name: str, attempt: int) -> str:
        return f"{LABEL_JOB_NAME}={name},{LABEL_ATTEMPT}={attempt}"

    def pods(self, name: str, attempt: int) -> list[Obj]:
        """The attempt's pods, by completion index (NODE_RANK)."""
        with _api_errors(f"list pods of {self.namespace}/{name}"):
            resp = self.core.list_namespaced_pod(
                self.namespace,
                label_selector=self._selector(name, attempt),
                _preload_content=False,
            )
            items = json.loads(resp.data)["items"]
        return sorted(items, key=pod_index)

    def watch_pods(self, name: str, attempt: int, seconds: int) -> Iterator[Obj]:
        """The attempt's pods as they are added or change, for up to `seconds`."""
        from kubernetes import watch

        with _api_errors(f"watch pods of {self.namespace}/{name}"):
            for event in watch.Watch().stream(
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=self._selector(name, attempt),
                timeout_seconds=seconds,
                _request_timeout=seconds + 15,
            ):
                if event["type"] in ("ADDED", "MODIFIED"):
                    yield event["raw_object"]

    def wait_started(self, pod: str) -> bool:
        """Block until the pod's trainer container has a log; False if the pod went away."""
        from kubernetes import watch

        with _api_errors(f"watch pod {self.namespace}/{pod}"):
            while True:
                for event in watch.Watch().stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    field_selector=f"metadata.name={pod}",
                    timeout_seconds=WATCH_CHUNK_S,
                    _request_timeout=WATCH_CHUNK_S + 15,
                ):
                    if event["type"] == "DELETED":
                        return False
                    if container_started(event["raw_object"]):
                        return True

    def log_lines(self, pod: str, *, follow: bool) -> Iterator[str]:
        """The trainer container's log, line by line; with `follow`, until the container ends."""
        from kubernetes import watch

        with _api_errors(f"logs of pod {self.namespace}/{pod}"):
            if follow:
                yield from watch.Watch().stream(
                    self.core.read_namespaced_pod_log,
                    pod,
                    self.namespace,
                    container=CONTAINER_NAME,
                    follow=True,
                )
            else:
                # Raw bytes: the client would parse a log that happens to be JSON into a dict.
                resp = self.core.read_namespaced_pod_log(
                    pod, self.namespace, container=CONTAINER_NAME, _preload_content=False
                )
                yield from resp.data.decode(errors="replace").splitlines()
