"""The trainer's status endpoint (GET /ready, /healthz on PHOENIX_STATUS_PORT): a slow or
idle client, or a flood of them, can neither hold a connection for ever nor make the pod's
readiness probe fail (issue 22, item 13). Real sockets on loopback."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from phoenix_trainer import control
from phoenix_trainer.control import StatusServer

pytestmark = pytest.mark.unit


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(control, "STATUS_CLIENT_TIMEOUT_SECONDS", 0.5)
    srv = StatusServer(0, host="127.0.0.1")
    srv.ready.set()
    yield srv
    srv.close()


def ready(srv, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/ready", timeout=timeout) as r:
        return r.status


def idle(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.sendall(b"GET /ready HTTP/1.1\r\n")  # ... and never the rest of the request
    return s


def test_an_idle_client_is_dropped_after_the_timeout(server):
    s = idle(server)
    t0 = time.monotonic()
    assert s.recv(100) == b""  # the server closed it
    assert time.monotonic() - t0 < 3.0
    assert ready(server) == 200


def test_a_flood_of_idle_clients_neither_blocks_the_probe_nor_grows_threads(server):
    before = threading.active_count()
    clients = [idle(server) for _ in range(3 * control.STATUS_MAX_CLIENTS)]
    time.sleep(0.2)
    assert threading.active_count() - before <= control.STATUS_MAX_CLIENTS
    # Within the probe's patience (failureThreshold 3, every second) /ready answers again.
    deadline = time.monotonic() + 3.0
    while True:
        try:
            assert ready(server, timeout=1.0) == 200
            break
        except OSError:
            assert time.monotonic() < deadline, "the probe never got through"
            time.sleep(0.1)
    for c in clients:
        c.close()
