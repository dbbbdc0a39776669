"""Helpers for end-to-end tests: three databases, a configuration, a running daemon, waiting.

Functions that talk to a broker take an optional ``broker`` (a :class:`tests.conftest.Broker`,
as the ``broker`` fixture gives); without one they use RabbitMQ (``conftest.RABBITMQ``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import psycopg2
import yaml

from golconde import config as config_module
from golconde import trigger
from golconde.broker import BrokerConnection, Delivery

from ..conftest import (QUEUE_PREFIX, RABBITMQ, STOMP, STOMP_LOGIN, STOMP_PASSCODE, Broker,  # noqa: F401
                        stomp_address)


def execute(dsn: str, statement: str, params: Any = None) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(statement, params)
    conn.close()


def query(dsn: str, statement: str, params: Any = None) -> List[tuple]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


def queue_backlog(dsn: str, destination: str) -> int:
    """Rows of ``destination`` in ``golconde.queue`` not sent yet, from the position its drain
    saved (sent rows stay until their partition is truncated)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            return trigger.backlog(cur, destination)[0]
    finally:
        conn.close()


def make_config(canonical: str, targets: Dict[str, str], table: str, mode: str = "client",
                name: Optional[str] = None, http_port: int = 0, broker: Optional[Broker] = None,
                **overrides: Any) -> Dict[str, Any]:
    """A configuration mapping: one destination ``name`` on ``table`` with the given targets, on
    ``broker`` (default RabbitMQ); ``overrides`` are keys of the destination."""
    broker = broker or RABBITMQ
    name = name or "T%s" % uuid.uuid4().hex[:8]
    base = "/queue/%s%s" % (QUEUE_PREFIX, name.lower())
    destination: Dict[str, Any] = {
        "stomp": broker.address, "queue": base, "pgsql": canonical, "target": table,
        "function_name": "AutoSQL", "mode": mode,
        "Targets": {tname: {"stomp": broker.address, "queue": "%s.%s" % (base, tname), "pgsql": dsn,
                            "target": table} for tname, dsn in targets.items()},
    }
    destination.update(overrides)
    broker_section: Dict[str, Any] = {"heartbeat": 2000}
    if broker.login is not None or broker.passcode is not None:
        broker_section.update(login=broker.login, passcode=broker.passcode)
    return {
        "Logging": {"level": "info"},
        "HTTPServer": {"enabled": http_port != 0, "listen": "127.0.0.1", "port": http_port or 8080},
        "Broker": broker_section,
        "Destinations": {name: destination},
    }


def trigger_settings(mode: str, **settings: Any) -> Dict[str, Any]:
    """``settings`` (``poll_interval``, ``batch_linger``) in trigger mode; none in client mode,
    which refuses them."""
    return settings if mode == "trigger" else {}


def parse_config(mapping: Dict[str, Any]) -> Any:
    return config_module.parse(mapping)


def write_config(path: str, mapping: Dict[str, Any]) -> str:
    with open(path, "w") as handle:
        yaml.safe_dump(mapping, handle)
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.2,
             message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, message))


def wait_for_value(read: Callable[[], Any], expected: Any, timeout: float = 30.0,
                   message: str = "value", also: Callable[[], bool] = lambda: True) -> None:
    """Wait until ``also()`` holds and ``read()`` equals ``expected`` (a counter bumped just after
    the state the test can see); on a timeout, the equality asserted, for pytest's difference."""
    try:
        wait_for(lambda: also() and read() == expected, timeout=timeout, message=message)
    except AssertionError:
        assert read() == expected, message
        raise


def drain_queue(queue: str, wait: float = 1.0, login: Optional[str] = None,
                passcode: Optional[str] = None, broker: Optional[Broker] = None) -> List[Delivery]:
    """Consume and ack everything currently in ``queue`` (e.g. a dead-letter queue) on ``broker``
    (default RabbitMQ; ``login``/``passcode`` override its credentials)."""
    broker = broker or RABBITMQ
    received: List[Delivery] = []
    conn = BrokerConnection(broker.host, broker.port, login or broker.login, passcode or broker.passcode,
                            heartbeat_ms=0, name="test-drain", on_message=received.append)
    conn.connect()
    conn.subscribe(queue, 1000)
    last = -1
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline or len(received) != last:
        last = len(received)
        time.sleep(0.3)
    for delivery in received:
        conn.ack(delivery)
    conn.close()
    return received


def send_raw(queue: str, bodies: List[Any], headers: Optional[List[Dict[str, str]]] = None,
             broker: Optional[Broker] = None) -> None:
    """Send raw bodies (str or bytes) to ``queue`` on ``broker`` (default RabbitMQ) as a plain STOMP
    client would (persistent, one receipt for all)."""
    broker = broker or RABBITMQ
    conn = BrokerConnection(broker.host, broker.port, broker.login, broker.passcode, heartbeat_ms=0,
                            name="test-send")
    conn.connect()
    conn.send_confirmed([(queue, body, (headers[i] if headers else {})) for i, body in enumerate(bodies)])
    conn.close()


class DaemonProcess:
    """golconded run as a real subprocess (for kill -9 and signal tests)."""

    def __init__(self, config_path: str, log_path: str) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "DaemonProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "golconde.daemon_entry", "-f", "-c", self.config_path],
            stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(
                os.path.dirname(os.path.abspath(__file__)))))
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
