"""The broker's raw speed with plain stomp.py, measured in the same run as the modes.

* publish: N persistent SENDs of a packet-sized body on one connection, a receipt requested on the
  last one only (so the time includes the broker's confirmation of all of them);
* consume, cumulative acks: subscribe with ``ack: client`` and no prefetch limit, ack every 500th
  message (on RabbitMQ a ``client`` ack covers every earlier message of the subscription) and the
  last one; the rate is counted from the first message received to the last;
* consume, acking each: the same with ``client-individual`` and one ACK per message.

Each measurement uses its own fresh queue (a unique name), deleted afterwards when the broker's
management API answers.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Dict, Optional

import stomp

LOGGER = logging.getLogger(__name__)

BODY = json.dumps({"action": "add", "data": {"friend_id": 123, "user_id": 45, "status_id": 1,
                                              "ts": "2024-01-01T00:00:00.000000+00:00"}})


class _Consumer(stomp.ConnectionListener):
    def __init__(self, conn: stomp.Connection11, total: int, every: int, individual: bool) -> None:
        self.conn, self.total, self.every, self.individual = conn, total, every, individual
        self.count = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.done = threading.Event()
        self.receipts: Dict[str, threading.Event] = {}

    def on_message(self, frame) -> None:
        if self.first is None:
            self.first = time.monotonic()
        self.count += 1
        if self.individual or self.count % self.every == 0 or self.count == self.total:
            self.conn.ack(frame.headers["message-id"], frame.headers.get("subscription"))
        if self.count >= self.total:
            self.last = time.monotonic()
            self.done.set()

    def on_receipt(self, frame) -> None:
        event = self.receipts.get(frame.headers.get("receipt-id"))
        if event:
            event.set()


def _connect(host: str, port: int, login: str, passcode: str) -> stomp.Connection11:
    conn = stomp.Connection11([(host, port)], heartbeats=(0, 0), auto_decode=False)
    conn.connect(login, passcode, wait=True)
    return conn


def publish(conn: stomp.Connection11, listener: _Consumer, queue: str, count: int) -> float:
    """Send ``count`` persistent messages, the last with a receipt; return messages/s."""
    receipt = "bench-%s" % uuid.uuid4().hex
    listener.receipts[receipt] = threading.Event()
    start = time.monotonic()
    for index in range(count):
        headers = {"persistent": "true", "content-type": "application/json"}
        if index == count - 1:
            headers["receipt"] = receipt
        conn.send(queue, BODY, headers=headers)
    if not listener.receipts[receipt].wait(120):
        raise RuntimeError("no receipt from the broker within 120 s")
    return count / (time.monotonic() - start)


def consume(conn: stomp.Connection11, listener: _Consumer, queue: str, timeout: float = 300) -> float:
    """Consume ``listener.total`` messages from ``queue``; return messages/s."""
    ack = "client-individual" if listener.individual else "client"
    conn.subscribe(queue, id="bench-raw", ack=ack)
    if not listener.done.wait(timeout):
        raise RuntimeError("consumed only %d of %d messages in %.0f s" % (listener.count, listener.total, timeout))
    conn.unsubscribe("bench-raw")
    elapsed = max((listener.last or 0) - (listener.first or 0), 1e-6)
    return (listener.total - 1) / elapsed


def measure(host: str, port: int, login: str, passcode: str, count: int,
            prefix: str) -> Dict[str, float]:
    """``{"publish_per_s", "consume_cumulative_per_s", "consume_each_per_s"}`` (messages/s).

    :raises RuntimeError, stomp.exception.StompException: the broker failed or did not answer.
    """
    figures: Dict[str, float] = {}
    queues = []
    for individual, key in ((False, "consume_cumulative_per_s"), (True, "consume_each_per_s")):
        queue = "/queue/%s.raw.%s" % (prefix, uuid.uuid4().hex[:8])
        queues.append(queue)
        conn = _connect(host, port, login, passcode)
        try:
            listener = _Consumer(conn, count, 500, individual)
            conn.set_listener("bench", listener)
            rate = publish(conn, listener, queue, count)
            if not individual:
                figures["publish_per_s"] = round(rate)
            figures[key] = round(consume(conn, listener, queue))
        finally:
            conn.disconnect()
    return figures


def delete_queues(prefix: str, login: str, passcode: str, api: str = "http://127.0.0.1:15672",
                  timeout: float = 10.0) -> int:
    """Delete the broker queues whose name starts with ``prefix`` (this run's, unique) through
    RabbitMQ's management API, each request waiting at most ``timeout`` seconds. Best effort:
    returns how many were deleted (0 when the API does not answer, e.g. on ActiveMQ)."""
    import base64
    import urllib.parse
    import urllib.request

    auth = "Basic " + base64.b64encode(("%s:%s" % (login, passcode)).encode()).decode()
    try:
        request = urllib.request.Request(api + "/api/queues?columns=name,vhost",
                                         headers={"Authorization": auth})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            queues = json.loads(response.read().decode())
        deleted = 0
        for queue in queues:
            if queue["name"].startswith(prefix):
                url = "%s/api/queues/%s/%s" % (api, urllib.parse.quote(queue["vhost"], safe=""),
                                               urllib.parse.quote(queue["name"], safe=""))
                urllib.request.urlopen(urllib.request.Request(url, method="DELETE",
                                                              headers={"Authorization": auth}),
                                       timeout=timeout).close()
                deleted += 1
        return deleted
    except (OSError, ValueError, KeyError) as exc:
        LOGGER.info("could not delete the benchmark's queues through %s: %s", api, exc)
        return 0
