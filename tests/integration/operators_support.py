"""Helpers for the operators' tests (HTTP monitoring, Nagios, status, browser): a real in-process
daemon with its HTTP server on a free port, and a background packet pump."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional, Tuple

from golconde.client import Client

from ..conftest import STOMP_LOGIN, STOMP_PASSCODE, stomp_address

ITEMS = "CREATE TABLE public.items (id integer PRIMARY KEY, value text, n integer)"

#: A DSN password that must never be shown (trust authentication ignores it).
SECRET = "NeverShowMe-7f3a"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5.0,
             headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of ``GET http://127.0.0.1:<port><path>``;
    error statuses are returned, not raised."""
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def get_json(port: int, path: str) -> Tuple[int, Any]:
    status, _, body = http_get(port, path)
    return status, json.loads(body)


def health_code(port: int) -> Optional[int]:
    """HTTP status of GET /health, or None while nothing answers."""
    try:
        return http_get(port, "/health")[0]
    except (urllib.error.URLError, OSError):
        return None


def thread_stats(port: int, name: str) -> Dict[str, Any]:
    """The /stats entry of listener thread ``name``."""
    for entry in get_json(port, "/stats")[1]["threads"]:
        if name in entry:
            return entry[name]
    raise KeyError(name)


class Pump(threading.Thread):
    """Sends a mix of add/set/update/delete packets to a destination queue, about ``rate`` packets
    per second in batches of 10, until :meth:`stop` or ``limit`` seconds (bounded by design)."""

    def __init__(self, queue: str, rate: float = 60.0, limit: float = 90.0) -> None:
        super().__init__(name="test-pump", daemon=True)
        self.queue, self.rate, self.limit = queue, rate, limit
        self.sent = 0
        self.error: Optional[BaseException] = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)

    def run(self) -> None:
        host, port = stomp_address()
        deadline = time.monotonic() + self.limit
        try:
            with Client(self.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE) as client:
                key = 0
                while not self._stop_event.is_set() and time.monotonic() < deadline:
                    with client.batch():
                        for _ in range(10):
                            key += 1
                            step = key % 10
                            if step in (3, 6, 7):
                                client.set({"id": key - 1, "value": "set %d" % key, "n": key})
                            elif step in (5, 8):
                                client.update({"n": -key}, restriction={"id": key - 2})
                            elif step == 9:
                                client.delete({"id": key - 8})
                            else:
                                client.add({"id": key, "value": "row %d" % key, "n": key})
                    self.sent += 10
                    self._stop_event.wait(10.0 / self.rate)
        except BaseException as exc:  # reported by the test
            self.error = exc
