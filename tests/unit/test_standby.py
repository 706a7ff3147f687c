"""standby.py: the liveness endpoint an operator serves while it waits for the Lease, on a real
port. tests/controlplane/test_leader_election.py probes it in real operators."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest

from finetune_operator.standby import StandbyEndpoint
from finetune_trainer.testing.gang import free_ports


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_standby_answers_its_probe_then_frees_the_port_for_kopf() -> None:
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/healthz"
    with StandbyEndpoint(url) as standby:
        # Nothing before start: an operator that takes the Lease at once answers only once
        # kopf does.
        with pytest.raises(urllib.error.URLError):
            get(url)
        standby.start()
        standby.start()  # once is enough; a second start serves on
        assert get(url) == (200, b"standby\n")
        assert get(url + "?verbose")[0] == 200
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 404

    # Stopped: the port binds again, as kopf's liveness server binds it (asyncio's
    # create_server, under aiohttp's TCPSite), and the probe now reaches that server.
    async def serve_once() -> bytes:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n{}")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", port)
        async with server:
            return (await asyncio.to_thread(get, url))[1]

    assert asyncio.run(serve_once()) == b"{}"


def test_only_http_endpoints_are_served() -> None:
    with pytest.raises(ValueError, match="only http://"):
        StandbyEndpoint("https://0.0.0.0:8080/healthz")
    endpoint = StandbyEndpoint("http://0.0.0.0:8181/healthz")
    assert (endpoint.host, endpoint.port, endpoint.path) == ("0.0.0.0", 8181, "/healthz")
