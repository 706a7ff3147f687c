"""apply.Kube against a scripted API server on loopback: the wire format of every call, how
each error status is translated, and that blocking calls stay off the event loop.

The control-plane tests prove the same calls against a real kube-apiserver; these pin the
details that a real server accepts either way (content types, query parameters, preconditions)
and the error paths that are hard to provoke there.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator.apply import (
    ApplyRejected,
    Kube,
    QuotaExceeded,
    SecretCheck,
    load_configuration,
)

# kubernetes 34.1.0 builds every ApiException with urllib3 2's deprecated getheaders().
pytestmark = pytest.mark.filterwarnings(
    "ignore:HTTPResponse.getheaders:DeprecationWarning:kubernetes"
)
Obj = dict[str, Any]
NS = "team-a"
JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs/demo"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any


@dataclass
class FakeApiServer:
    """Answers (method, path) from `routes` (default 200 {}), records every request."""

    routes: dict[tuple[str, str], tuple[int, Obj]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # Set to hold every request until the test releases it.
    gate: threading.Event | None = None
    arrived: threading.Event = field(default_factory=threading.Event)

    def answer(self, method: str, path: str, body: bytes, headers: Any) -> tuple[int, Obj]:
        url = urlsplit(path)
        parsed = json.loads(body) if body else None
        self.seen.append(
            Seen(method, url.path, parse_qs(url.query), headers.get("Content-Type", ""), parsed)
        )
        self.arrived.set()
        if self.gate is not None and not self.gate.wait(10):
            return 500, {"message": "the test never released the request"}
        return self.routes.get((method, url.path), (200, {}))


def status(code: int, message: str) -> tuple[int, Obj]:
    return code, {"kind": "Status", "apiVersion": "v1", "code": code, "message": message}


@pytest.fixture
def server() -> Iterator[tuple[FakeApiServer, str]]:
    fake = FakeApiServer()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            code, body = fake.answer(self.command, self.path, self.rfile.read(length), self.headers)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        if fake.gate is not None:
            fake.gate.set()
        httpd.shutdown()
        httpd.server_close()


def run(server: tuple[FakeApiServer, str], call: Callable[[Kube], Any]) -> Any:
    """One Kube against the fake, one call on a fresh event loop, the Kube closed after."""
    _, host = server

    async def go() -> Any:
        kube = Kube(client.Configuration(host=host), max_requests=4)
        try:
            return await call(kube)
        finally:
            await kube.close()

    return asyncio.run(go())


def manifest(kind: str) -> Obj:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "demo", "namespace": NS}}


# ---- writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("ConfigMap", f"/api/v1/namespaces/{NS}/configmaps/demo"),
        ("Service", f"/api/v1/namespaces/{NS}/services/demo"),
    ],
)
def test_apply_is_a_forced_server_side_apply(server, kind: str, path: str) -> None:
    fake, _ = server
    run(server, lambda kube: kube.apply(manifest(kind)))
    (req,) = fake.seen
    assert (req.method, req.path) == ("PATCH", path)
    assert req.content_type == "application/apply-patch+yaml"
    assert req.query == {"fieldManager": ["finetune-operator"], "force": ["true"]}
    assert req.body == manifest(kind)


@pytest.mark.parametrize("code", [400, 422])
def test_apply_refused_render_is_apply_rejected_with_the_servers_message(server, code) -> None:
    fake, _ = server
    path = f"/api/v1/namespaces/{NS}/services/demo"
    fake.routes[("PATCH", path)] = status(code, 'Service "demo" is invalid: spec.ports: Required')
    with pytest.raises(ApplyRejected, match=r"Service demo: .*spec\.ports: Required"):
        run(server, lambda kube: kube.apply(manifest("Service")))


@pytest.mark.parametrize("code", [403, 429, 500])
def test_apply_other_errors_propagate_for_kopf_to_retry(server, code: int) -> None:
    fake, _ = server
    fake.routes[("PATCH", f"/api/v1/namespaces/{NS}/configmaps/demo")] = status(code, "no")
    with pytest.raises(ApiException) as info:
        run(server, lambda kube: kube.apply(manifest("ConfigMap")))
    assert not isinstance(info.value, ApplyRejected)
    assert info.value.status == code


# ---- ensure: only ever write what this FineTuneJob controls ------------------------------------

CM_PATH = f"/api/v1/namespaces/{NS}/configmaps/demo"
OWNER = "ftj-uid"


def existing(*refs: Obj) -> tuple[int, Obj]:
    meta = {"name": "demo", "namespace": NS, "resourceVersion": "41", "ownerReferences": list(refs)}
    return 200, {"kind": "ConfigMap", "metadata": meta}


def ref(uid: str, controller: bool = True) -> Obj:
    return {"kind": "FineTuneJob", "name": "demo", "uid": uid, "controller": controller}


def test_ensure_creates_a_missing_child_with_a_post_never_an_apply(server) -> None:
    fake, _ = server
    fake.routes[("GET", CM_PATH)] = status(404, "not found")
    assert run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER)) is None
    assert [(r.method, r.path) for r in fake.seen] == [
        ("GET", CM_PATH),
        ("POST", f"/api/v1/namespaces/{NS}/configmaps"),
    ]
    assert fake.seen[1].query == {"fieldManager": ["finetune-operator"]}


def test_ensure_create_first_posts_before_reading(server) -> None:
    fake, _ = server
    run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER, create_first=True))
    assert [r.method for r in fake.seen] == ["POST"]
    # The name was taken: read it, and leave someone else's object alone.
    fake.seen.clear()
    fake.routes[("POST", f"/api/v1/namespaces/{NS}/configmaps")] = status(409, "exists")
    fake.routes[("GET", CM_PATH)] = existing()
    holder = run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER, create_first=True))
    assert holder is not None
    assert [r.method for r in fake.seen] == ["POST", "GET"]


def test_ensure_applies_its_own_child_pinned_to_the_version_it_read(server) -> None:
    fake, _ = server
    fake.routes[("GET", CM_PATH)] = existing(ref(OWNER))
    assert run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER)) is None
    read, apply = fake.seen
    assert read.method == "GET"
    assert (apply.method, apply.content_type) == ("PATCH", "application/apply-patch+yaml")
    assert apply.body["metadata"]["resourceVersion"] == "41"


def test_ensure_writes_nothing_when_its_child_has_every_rendered_field(server) -> None:
    fake, _ = server
    want = {**manifest("ConfigMap"), "data": {"job.yaml": "x"}}
    want["metadata"] = {**want["metadata"], "ownerReferences": [ref(OWNER)]}
    # As read back: the API server's own fields added, nothing of ours changed.
    have = {**want, "metadata": {**want["metadata"], "uid": "c-1", "resourceVersion": "41"}}
    fake.routes[("GET", CM_PATH)] = (200, have)
    assert run(server, lambda kube: kube.ensure(want, OWNER)) is None
    assert [r.method for r in fake.seen] == ["GET"]
    # A field that drifted is applied back.
    fake.seen.clear()
    fake.routes[("GET", CM_PATH)] = (200, {**have, "data": {"job.yaml": "edited"}})
    run(server, lambda kube: kube.ensure(want, OWNER))
    assert [r.method for r in fake.seen] == ["GET", "PATCH"]


@pytest.mark.parametrize(
    "refs",
    [(), (ref("someone-else"),), (ref(OWNER, controller=False),)],
    ids=["no-owner", "other-controller", "owner-but-not-controller"],
)
def test_ensure_leaves_anything_else_untouched(server, refs: tuple[Obj, ...]) -> None:
    fake, _ = server
    fake.routes[("GET", CM_PATH)] = existing(*refs)
    holder = run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER))
    assert holder["metadata"]["resourceVersion"] == "41"
    assert [r.method for r in fake.seen] == ["GET"]  # read, and nothing written


def test_ensure_create_race_reads_again_and_leaves_the_newcomer_alone(server) -> None:
    fake, _ = server
    answers = iter([status(404, "not found"), existing()])
    original = fake.answer

    def answer(method: str, path: str, body: bytes, headers: Any) -> tuple[int, Obj]:
        if method == "GET":
            original(method, path, body, headers)
            return next(answers)
        return original(method, path, body, headers)

    fake.answer = answer  # type: ignore[method-assign]
    fake.routes[("POST", f"/api/v1/namespaces/{NS}/configmaps")] = status(409, "exists")
    holder = run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER))
    assert holder is not None
    assert [r.method for r in fake.seen] == ["GET", "POST", "GET"]


def test_ensure_errors_propagate(server) -> None:
    fake, _ = server
    fake.routes[("GET", CM_PATH)] = status(403, "forbidden")
    with pytest.raises(ApiException) as info:
        run(server, lambda kube: kube.ensure(manifest("ConfigMap"), OWNER))
    assert info.value.status == 403


def test_create_job_returns_the_created_job_as_a_dict(server) -> None:
    fake, _ = server
    job = {**manifest("Job"), "apiVersion": "batch/v1", "spec": {"completions": 2}}
    created = {**job, "metadata": {**job["metadata"], "uid": "u-1"}}
    fake.routes[("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")] = (201, created)
    got = run(server, lambda kube: kube.create_job(job))
    assert got == created
    (req,) = fake.seen
    assert req.query == {"fieldManager": ["finetune-operator"]}
    assert req.body == job


@pytest.mark.parametrize(
    ("code", "expect"), [(409, None), (422, ApplyRejected), (500, ApiException)]
)
def test_create_job_errors(server, code: int, expect: Any) -> None:
    fake, _ = server
    fake.routes[("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")] = status(code, "x")
    job = {**manifest("Job"), "apiVersion": "batch/v1"}
    if expect is None:
        assert run(server, lambda kube: kube.create_job(job)) is None
    else:
        with pytest.raises(expect):
            run(server, lambda kube: kube.create_job(job))


QUOTA = (
    'jobs.batch "demo" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1, '
    "used: count/jobs.batch=2, limited: count/jobs.batch=2"
)


RBAC = (
    'jobs.batch is forbidden: User "system:serviceaccount:finetune-system:finetune-operator" '
    'cannot create resource "jobs" in API group "batch" in the namespace "team-a"'
)
WEBHOOK = 'admission webhook "policy.example.com" denied the request: jobs must name a team'


@pytest.mark.parametrize(
    ("message", "expect"),
    [(QUOTA, QuotaExceeded), (WEBHOOK, ApplyRejected), (RBAC, ApiException)],
    ids=["quota", "admission", "rbac"],
)
def test_a_403_on_create_is_a_quota_to_wait_out_a_refusal_or_the_operators_own_rbac(
    server, message: str, expect: type[Exception]
) -> None:
    fake, _ = server
    fake.routes[("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")] = status(403, message)
    job = {**manifest("Job"), "apiVersion": "batch/v1"}
    with pytest.raises(expect) as info:
        run(server, lambda kube: kube.create_job(job))
    if expect is QuotaExceeded:
        assert str(info.value) == QUOTA  # the API server's words: the quota, used and limited
    elif expect is ApplyRejected:
        assert str(info.value) == f"Job demo: {WEBHOOK}"
    else:  # kopf retries it: the chart's RBAC is fixed without touching the FineTuneJob
        assert info.value.status == 403 and not isinstance(info.value, ApplyRejected)


def test_patch_job_and_patch_status_are_merge_patches(server) -> None:
    fake, _ = server

    async def both(kube: Kube) -> None:
        await kube.patch_job(NS, "demo", {"suspend": False})
        await kube.patch_status(NS, "demo", {"phase": "Running"})

    run(server, both)
    job, status_ = fake.seen
    assert (job.method, job.path, job.body) == ("PATCH", JOB_PATH, {"spec": {"suspend": False}})
    assert job.content_type == "application/merge-patch+json"
    ftj = f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/demo/status"
    assert (status_.method, status_.path) == ("PATCH", ftj)
    assert status_.body == {"status": {"phase": "Running"}}
    assert status_.content_type == "application/merge-patch+json"


def test_delete_job_is_foreground_and_only_for_that_uid(server) -> None:
    fake, _ = server
    run(server, lambda kube: kube.delete_job(NS, "demo", "uid-7"))
    (req,) = fake.seen
    assert (req.method, req.path) == ("DELETE", JOB_PATH)
    assert req.body["propagationPolicy"] == "Foreground"
    assert req.body["preconditions"] == {"uid": "uid-7"}


@pytest.mark.parametrize("code", [404, 409])
def test_delete_job_already_gone_is_fine(server, code: int) -> None:
    fake, _ = server
    fake.routes[("DELETE", JOB_PATH)] = status(code, "Precondition failed: UID in precondition")
    assert run(server, lambda kube: kube.delete_job(NS, "demo", "uid-7")) is None


@pytest.mark.parametrize("code", [403, 500])
def test_delete_job_other_errors_propagate(server, code: int) -> None:
    fake, _ = server
    fake.routes[("DELETE", JOB_PATH)] = status(code, "no")
    with pytest.raises(ApiException) as info:
        run(server, lambda kube: kube.delete_job(NS, "demo", "uid-7"))
    assert info.value.status == code


def test_delete_job_without_a_uid_sends_nothing(server) -> None:
    fake, _ = server
    with pytest.raises(ValueError, match="without its uid"):
        run(server, lambda kube: kube.delete_job(NS, "demo", None))
    assert fake.seen == []


def test_post_event_is_best_effort(server) -> None:
    fake, _ = server
    fake.routes[("POST", f"/api/v1/namespaces/{NS}/events")] = status(500, "etcd is sad")
    owner = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": NS, "uid": "u-1"},
    }
    run(server, lambda kube: kube.post_event(owner, "Normal", "Created", "x" * 2000))
    (req,) = fake.seen
    assert req.body["involvedObject"]["uid"] == "u-1"
    assert req.body["metadata"]["generateName"] == "demo."
    assert len(req.body["message"]) == 1024


# ---- reads -------------------------------------------------------------------------------------


def test_reads_return_dicts_and_none_for_404(server) -> None:
    fake, _ = server
    ftj_path = f"/apis/finetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/demo"
    ftj = {"kind": "FineTuneJob", "metadata": {"name": "demo"}, "spec": {"x": 1}}
    fake.routes[("GET", ftj_path)] = (200, ftj)
    fake.routes[("GET", JOB_PATH)] = status(404, "not found")

    async def reads(kube: Kube) -> tuple[Any, Any]:
        return await kube.get_finetunejob(NS, "demo"), await kube.get_job(NS, "demo")

    assert run(server, reads) == (ftj, None)


def test_read_errors_other_than_404_propagate(server) -> None:
    fake, _ = server
    fake.routes[("GET", JOB_PATH)] = status(403, "forbidden")
    with pytest.raises(ApiException) as info:
        run(server, lambda kube: kube.get_job(NS, "demo"))
    assert info.value.status == 403


def test_list_pods_selects_one_attempt_of_one_job(server) -> None:
    fake, _ = server
    pods = [{"metadata": {"name": "demo-0"}}, {"metadata": {"name": "demo-1"}}]
    fake.routes[("GET", f"/api/v1/namespaces/{NS}/pods")] = (200, {"items": pods})
    assert run(server, lambda kube: kube.list_pods(NS, "demo", 3)) == pods
    (req,) = fake.seen
    (selector,) = req.query["labelSelector"]
    assert set(selector.split(",")) == {
        "app.kubernetes.io/managed-by=finetune-operator",
        "finetune.dev/job-name=demo",
        "finetune.dev/attempt=3",
    }


def test_job_events_select_one_reason_about_one_job(server) -> None:
    fake, _ = server
    events = [{"reason": "FailedCreate", "message": "Error creating: forbidden"}]
    fake.routes[("GET", f"/api/v1/namespaces/{NS}/events")] = (200, {"items": events})
    assert run(server, lambda kube: kube.job_events(NS, "u1", "FailedCreate")) == events
    (req,) = fake.seen
    (selector,) = req.query["fieldSelector"]
    assert set(selector.split(",")) == {"involvedObject.uid=u1", "reason=FailedCreate"}


def test_job_events_without_rbac_to_list_them_are_none(server) -> None:
    fake, _ = server
    fake.routes[("GET", f"/api/v1/namespaces/{NS}/events")] = status(403, "forbidden")
    assert run(server, lambda kube: kube.job_events(NS, "u1", "FailedCreate")) == []
    fake.routes[("GET", f"/api/v1/namespaces/{NS}/events")] = status(500, "etcd away")
    with pytest.raises(ApiException):
        run(server, lambda kube: kube.job_events(NS, "u1", "FailedCreate"))


@pytest.mark.parametrize(
    ("answer", "expect"),
    [
        ((200, {"data": {"token": "czNjcjN0"}}), SecretCheck.PRESENT),
        ((200, {"data": {"other": "eA=="}}), SecretCheck.NO_KEY),
        ((200, {}), SecretCheck.NO_KEY),
        (status(404, "not found"), SecretCheck.NO_SECRET),
        # rbac.getSecrets=false: the operator cannot check, and must not stop on it.
        (status(403, 'secrets "hf" is forbidden'), SecretCheck.UNKNOWN),
    ],
)
def test_secret_key_exists(server, answer: tuple[int, Obj], expect: SecretCheck) -> None:
    fake, _ = server
    fake.routes[("GET", f"/api/v1/namespaces/{NS}/secrets/hf")] = answer
    assert run(server, lambda kube: kube.secret_key_exists(NS, "hf", "token")) is expect


# ---- the event loop and the pool ---------------------------------------------------------------


def test_a_request_in_flight_does_not_block_the_event_loop(server) -> None:
    """The server holds the request until the event loop itself releases it: a call made on the
    loop's thread would never let the loop run, the server would give up, and get_job raise."""
    fake, _ = server
    fake.gate = threading.Event()
    fake.routes[("GET", JOB_PATH)] = (200, {"metadata": {"name": "demo"}})

    async def concurrently(kube: Kube) -> Any:
        pending = asyncio.ensure_future(kube.get_job(NS, "demo"))
        assert await asyncio.to_thread(fake.arrived.wait, 10)
        fake.gate.set()  # type: ignore[union-attr]
        return await pending

    assert run(server, concurrently) == {"metadata": {"name": "demo"}}


def test_the_connection_pool_matches_the_thread_pool(server) -> None:
    _, host = server
    kube = Kube(client.Configuration(host=host), max_requests=6)
    assert kube.api.configuration.connection_pool_maxsize == 6
    assert kube.api.rest_client.pool_manager.connection_pool_kw["maxsize"] == 6
    asyncio.run(kube.close())


# ---- configuration -----------------------------------------------------------------------------

KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://kubeconfig.example:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_outside_a_pod_the_kubeconfig_is_used(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "config").write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert load_configuration().host == "https://kubeconfig.example:6443"


def test_in_a_pod_the_service_account_wins(tmp_path: Path, monkeypatch) -> None:
    """The same order as kopf's login, so the watch and the writes reach the same cluster."""
    from kubernetes.config import incluster_config

    (tmp_path / "config").write_text(KUBECONFIG)
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_text("not-really-a-cert")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    configuration = load_configuration()
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.api_key["authorization"].lower() == "bearer sa-token"


KUEUE_GROUP = "/apis/kueue.x-k8s.io"
WORKLOADS = f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NS}/workloads"


def kueue_group(preferred: str = "v1beta2") -> tuple[int, Obj]:
    versions = [
        {"groupVersion": f"kueue.x-k8s.io/{v}", "version": v} for v in ("v1beta2", "v1beta1")
    ]
    return 200, {
        "kind": "APIGroup",
        "name": "kueue.x-k8s.io",
        "versions": versions,
        "preferredVersion": {"groupVersion": f"kueue.x-k8s.io/{preferred}", "version": preferred},
    }


def kueue_workload(name: str, job_uid: str, controller: bool = True) -> Obj:
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "demo", "uid": job_uid}
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {"kueue.x-k8s.io/job-uid": job_uid},
            "ownerReferences": [{**ref, "controller": controller}],
        },
        "spec": {"active": True},
    }


def test_find_workload_lists_by_job_uid_and_takes_the_one_the_job_controls(server) -> None:
    fake, _ = server
    fake.routes[("GET", KUEUE_GROUP)] = kueue_group()
    items = [kueue_workload("stray", "job-1", controller=False), kueue_workload("wl", "job-1")]
    fake.routes[("GET", WORKLOADS)] = (200, {"items": items})

    async def twice(kube: Kube) -> list[Any]:
        return [await kube.find_workload(NS, "job-1"), await kube.find_workload(NS, "job-1")]

    (lookup, found), again = run(server, twice)
    assert (lookup, found["metadata"]["name"]) == ("Found", "wl")
    assert again == (lookup, found)
    # The group's preferred version is asked once, then each lookup is one list by label.
    group, first, second = fake.seen
    assert group.path == KUEUE_GROUP
    assert (first.path, second.path) == (WORKLOADS, WORKLOADS)
    assert first.query == {"labelSelector": ["kueue.x-k8s.io/job-uid=job-1"]}
    fake.routes[("GET", WORKLOADS)] = (200, {"items": items[:1]})
    assert run(server, lambda kube: kube.find_workload(NS, "job-1")) == ("NotYet", None)


def test_find_workload_uses_the_version_the_api_server_prefers(server) -> None:
    fake, _ = server
    fake.routes[("GET", KUEUE_GROUP)] = kueue_group("v1beta1")
    old = WORKLOADS.replace("v1beta2", "v1beta1")
    fake.routes[("GET", old)] = (200, {"items": [kueue_workload("wl", "job-1")]})
    assert run(server, lambda kube: kube.find_workload(NS, "job-1"))[0] == "Found"
    assert fake.seen[-1].path == old


def test_find_workload_without_kueue_or_rbac_is_an_answer(server) -> None:
    fake, _ = server
    fake.routes[("GET", KUEUE_GROUP)] = status(404, "the server could not find the resource")
    assert run(server, lambda kube: kube.find_workload(NS, "job-1")) == ("NoKueue", None)
    fake.routes[("GET", KUEUE_GROUP)] = kueue_group()
    fake.routes[("GET", WORKLOADS)] = status(403, "forbidden")
    assert run(server, lambda kube: kube.find_workload(NS, "job-1")) == ("Forbidden", None)
    # The group is served but not Workloads at that version: asked again once, then no Kueue.
    fake.seen.clear()
    fake.routes[("GET", WORKLOADS)] = status(404, "x")
    assert run(server, lambda kube: kube.find_workload(NS, "job-1")) == ("NoKueue", None)
    assert [r.path for r in fake.seen] == [KUEUE_GROUP, WORKLOADS, KUEUE_GROUP, WORKLOADS]


def test_find_workload_propagates_server_errors(server) -> None:
    fake, _ = server
    fake.routes[("GET", KUEUE_GROUP)] = kueue_group()
    fake.routes[("GET", WORKLOADS)] = status(503, "x")
    with pytest.raises(ApiException):
        run(server, lambda kube: kube.find_workload(NS, "job-1"))


def test_set_workload_active_patches_only_spec_active_of_that_uid(server) -> None:
    fake, _ = server
    fake.routes[("GET", KUEUE_GROUP)] = kueue_group()
    run(server, lambda kube: kube.set_workload_active(NS, "wl", "uid-wl", False))
    _, req = fake.seen
    assert (req.method, req.path) == ("PATCH", f"{WORKLOADS}/wl")
    assert req.content_type == "application/merge-patch+json"
    assert req.body == {"metadata": {"uid": "uid-wl"}, "spec": {"active": False}}
    # Gone, or replaced under the same name: nothing to patch; the next pass looks again.
    for code in (404, 409):
        fake.routes[("PATCH", f"{WORKLOADS}/wl")] = status(code, "x")
        run(server, lambda kube: kube.set_workload_active(NS, "wl", "uid-wl", True))
