"""The local gangs' ports (testing.gang.free_ports) come from below the kernel's ephemeral range.

A local pod binds its rendezvous and metrics ports seconds after the harness picked them. A
port from the ephemeral range can meanwhile become the local end of any outgoing connection on
the machine, and a server cannot bind a port that a connection holds: the first test shows
that, the second that free_ports keeps out of the way."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from finetune_trainer.testing.gang import PORT_CEILING, PORT_FLOOR, ephemeral_floor, free_ports


def test_an_outgoing_connections_port_cannot_be_bound_by_a_server() -> None:
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())  # its local port: one from the ephemeral range
        with pytest.raises(OSError, match="in use"):
            start_http_server(client.getsockname()[1], registry=CollectorRegistry())


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = ephemeral_floor()
    top = min(PORT_CEILING, low)
    ports = free_ports(8)
    assert len(set(ports)) == 8
    if top > PORT_FLOOR:  # room below the range (32768 by default): every port from there
        assert all(PORT_FLOOR <= p < top for p in ports), (ports, low)
    held = []
    try:
        for port in ports:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()
