"""ActiveMQ-specific behaviour, against real ActiveMQ brokers started by ``scripts/setup-activemq.sh``.

* Persistent sends survive a broker restart (SIGTERM, then the set-up script again), and so does a
  running daemon: every packet in flight when the broker stops is applied exactly once.
  These tests run a *private* broker (own directory under ``tmp_path``, own port), so that stopping
  it never disturbs other tests using the shared broker on 61623.
* The shared broker's page size does not cap a prefetch of 500 (ActiveMQ pages in only 200
  messages per queue by default), and 2,000 packets flow through a daemon with prefetch 500.
* A packet a target cannot apply lands in ``<target queue>.dlq`` with the reason header.
* Header values that would break a frame (CR, NUL) are cleaned before sending; that one runs on
  every broker of the ``broker`` fixture.

The ActiveMQ tests follow ``GOLCONDE_TEST_BROKERS``: they are skipped when ``activemq`` is left out.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from typing import Dict, List, Optional

import pytest
import stomp

from golconde.broker import ID_HEADER, BrokerConnection, Delivery, header_value
from golconde.client import Client
from golconde.daemon import Daemon

from ..conftest import ACTIVEMQ, Broker, require_broker, selected_brokers, unique_queue
from .flow_support import drain_queue, execute, make_config, parse_config, query, send_raw, wait_for

needs_activemq = pytest.mark.skipif("activemq" not in selected_brokers(),
                                    reason="GOLCONDE_TEST_BROKERS leaves out activemq")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "setup-activemq.sh")
EVENTS = "CREATE TABLE public.ev (payload text NOT NULL, n integer NOT NULL)"  # keyless on purpose


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateActiveMQ:
    """An ActiveMQ broker of this test only, started and restarted by the project's set-up script."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = free_port()
        self.broker = Broker("activemq", "127.0.0.1", self.port, None, None,
                             setup_hint="scripts/setup-activemq.sh")
        self.env = dict(os.environ, GOLCONDE_ACTIVEMQ_BASE=base,
                        GOLCONDE_ACTIVEMQ_PORT=str(self.port), GOLCONDE_ACTIVEMQ_HEAP="256m",
                        GOLCONDE_SETUP_WAIT="60")

    def start(self) -> None:
        """Run ``scripts/setup-activemq.sh``: returns once STOMP answers."""
        result = subprocess.run(["bash", SCRIPT], env=self.env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, "setup-activemq.sh failed:\n%s%s" % (result.stdout, result.stderr)
        assert "answering STOMP" in result.stdout, result.stdout

    def pid(self) -> Optional[int]:
        try:
            with open(os.path.join(self.base, "activemq.pid")) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists("/proc/%d" % pid) else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Send ``sig`` to the broker and wait until it exited; returns the seconds it took."""
        pid = self.pid()
        assert pid is not None, "private ActiveMQ is not running"
        started = time.monotonic()
        os.kill(pid, sig)
        wait_for(lambda: not os.path.exists("/proc/%d" % pid) or _zombie(pid), timeout=timeout,
                 interval=0.1, message="ActiveMQ pid %d to exit" % pid)
        return time.monotonic() - started


def _zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def private_activemq(tmp_path):
    if not os.path.exists("/usr/share/activemq/bin/activemq.jar"):
        pytest.fail("ActiveMQ is not installed: run bash scripts/setup-activemq.sh", pytrace=False)
    amq = PrivateActiveMQ(str(tmp_path / "activemq"))
    amq.start()
    yield amq
    if amq.pid() is not None:
        try:
            amq.stop(timeout=20)
        except AssertionError:
            amq.stop(signal.SIGKILL)


@pytest.fixture
def activemq() -> Broker:
    """The shared ActiveMQ broker (127.0.0.1:61623 unless GOLCONDE_TEST_ACTIVEMQ_STOMP says otherwise)."""
    return require_broker(ACTIVEMQ)


def collect(broker: Broker, queue: str, prefetch: int, until: int, timeout: float,
            ack: bool = True) -> List[Delivery]:
    """Subscribe to ``queue`` and gather deliveries until ``until`` arrived (then one more second,
    for any extra to show) or ``timeout`` passed; ack them all when ``ack``. Closes the connection
    (unacked deliveries go back to the queue)."""
    received: List[Delivery] = []
    conn = BrokerConnection(broker.host, broker.port, broker.login, broker.passcode, heartbeat_ms=0,
                            name="test-collect", on_message=received.append)
    conn.connect()
    try:
        conn.subscribe(queue, prefetch)
        deadline = time.monotonic() + timeout
        while len(received) < until and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(received) >= until:
            time.sleep(1.0)              # anything beyond `until` would show up now
        taken = list(received)           # acking makes room for more: those stay in the queue
        if ack:
            for delivery in taken:
                conn.ack(delivery)
            time.sleep(0.3)
    finally:
        conn.close()
    return taken


# -- a broker restart --------------------------------------------------------------------------------

@needs_activemq
def test_persistent_sends_survive_a_broker_restart(private_activemq):
    broker = private_activemq.broker
    queue = unique_queue("restart.")
    bodies: Dict[str, bytes] = {}
    for batch in range(3):
        ids = [str(uuid.uuid4()) for _ in range(100)]
        batch_bodies = [('{"action": "add", "data": {"n": %d}}' % (batch * 100 + i)).encode()
                        for i in range(100)]
        batch_bodies[7] = b"\xff\xfe not UTF-8 \x00 binary"
        send_raw(queue, batch_bodies, [{ID_HEADER: pid} for pid in ids], broker=broker)
        bodies.update(zip(ids, batch_bodies))

    # A control that proves the broker really restarts from its store: a non-persistent message
    # (sent around Golconde, which always sends persistent) must be gone afterwards.
    control_queue = queue + ".nonpersistent"
    plain = stomp.Connection11([(broker.host, broker.port)], auto_decode=False, timeout=10)
    plain.connect(wait=True)
    plain.send(control_queue, "gone after a restart", headers={"persistent": "false"})
    plain.disconnect()
    # it is there before the restart (taken without ack: it goes back to the queue)
    assert len(collect(broker, control_queue, prefetch=10, until=1, timeout=10, ack=False)) == 1

    # 20 deliveries taken but not acked when the broker stops: they must come back too.
    held: List[Delivery] = []
    consumer = BrokerConnection(broker.host, broker.port, heartbeat_ms=1000, name="test-held",
                                on_message=held.append)
    consumer.connect()
    consumer.subscribe(queue, 20)
    wait_for(lambda: len(held) == 20, timeout=10, message="20 unacked deliveries")

    seconds = private_activemq.stop(signal.SIGTERM)
    assert seconds < 15, "SIGTERM took %.1fs" % seconds
    wait_for(lambda: not consumer.connected, timeout=10, message="consumer to notice the broker stopped")
    consumer.close()
    private_activemq.start()

    received = collect(broker, queue, prefetch=500, until=len(bodies), timeout=30)
    got = {}
    for delivery in received:
        pid = delivery.headers[ID_HEADER]
        assert pid not in got, "delivered twice: %s" % pid
        got[pid] = delivery.body
    assert got == bodies
    assert collect(broker, control_queue, prefetch=10, until=1, timeout=2) == []


@needs_activemq
def test_daemon_delivers_everything_once_across_a_broker_restart(private_activemq, make_database):
    broker = private_activemq.broker
    canonical, target = make_database(), make_database()
    for dsn in (canonical, target):
        execute(dsn, EVENTS)
    config = parse_config(make_config(canonical, {"t1": target}, "public.ev", broker=broker))
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    try:
        total = 15000    # enough that some are still queued when the broker stops (~5,000/s here)
        with Client(destination.queue, broker.host, broker.port) as client:
            with client.batch():
                for n in range(total):
                    client.add({"payload": "p%05d" % n, "n": n})
        # stop the broker while packets are in flight: some applied, most still queued
        wait_for(lambda: query(target, "SELECT count(*) FROM ev")[0][0] > 0, timeout=30,
                 interval=0.05, message="first packets at the target")
        private_activemq.stop(signal.SIGTERM)
        in_flight = query(target, "SELECT count(*) FROM ev")[0][0]
        time.sleep(1.0)
        private_activemq.start()
        with Client(destination.queue, broker.host, broker.port) as client:
            client.add({"payload": "sentinel", "n": -1})
        wait_for(lambda: query(target, "SELECT count(*) FROM ev")[0][0] >= total + 1, timeout=120,
                 message="every packet at the target after the restart")
        time.sleep(1.0)                   # a duplicate applied late would show up now
        expected = sorted(["p%05d" % n for n in range(total)] + ["sentinel"])
        for dsn in (canonical, target):
            assert [row[0] for row in query(dsn, "SELECT payload FROM ev ORDER BY payload")] == expected
        assert in_flight < total, "all packets were through before the broker stopped: nothing was in flight"
        stats = daemon.registry.snapshot()
        reconnects = sum(thread[name]["reconnects"] for thread in stats["threads"] for name in thread)
        assert reconnects >= 1, stats          # the daemon did lose the broker and got it back
    finally:
        assert daemon.stop(), "daemon did not stop in time"


# -- prefetch and volume on the shared broker -------------------------------------------------------

@needs_activemq
def test_prefetch_500_is_not_capped_by_the_page_size(activemq):
    """ActiveMQ pages in 200 messages per queue by default: a consumer with prefetch 500 would get
    200 and stall until it acks. The project's activemq.xml raises maxPageSize."""
    queue = unique_queue("page.")
    for _ in range(2):
        send_raw(queue, ['{"action": "add", "data": {"n": %d}}' % i for i in range(500)], broker=activemq)
    held = collect(activemq, queue, prefetch=500, until=500, timeout=15, ack=False)
    assert len(held) == 500
    rest = collect(activemq, queue, prefetch=1000, until=1000, timeout=30)
    assert len(rest) == 1000               # the unacked 500 came back, and the other 500
    assert sum(d.redelivered for d in rest) == 500


@needs_activemq
def test_2000_packets_through_a_daemon_with_prefetch_500(activemq, make_database):
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, EVENTS)
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.ev", broker=activemq)
    mapping["Defaults"] = {"prefetch": 500, "batch_size": 500}
    config = parse_config(mapping)
    destination = config.destinations[0]
    assert destination.prefetch == 500
    daemon = Daemon(config)
    daemon.start()
    try:
        total = 2000
        with Client(destination.queue, activemq.host, activemq.port, activemq.login,
                    activemq.passcode) as client:
            for start in range(0, total, 500):
                with client.batch():
                    for n in range(start, start + 500):
                        client.add({"payload": "p%05d" % n, "n": n})
        wait_for(lambda: all(query(dsn, "SELECT count(*) FROM ev")[0][0] >= total for dsn in (t1, t2)),
                 timeout=120, message="2,000 packets at both targets")
        expected = ["p%05d" % n for n in range(total)]
        for dsn in (canonical, t1, t2):
            assert [row[0] for row in query(dsn, "SELECT payload FROM ev ORDER BY payload")] == expected
        # fan-out is counted once its batch is confirmed and acked: at the next cycle
        wait_for(lambda: daemon.registry.get(destination.name).snapshot()["fanned_out"] == 2 * total,
                 timeout=10, message="the fan-out counted")
        snapshot = {name: values for thread in daemon.registry.snapshot()["threads"]
                    for name, values in thread.items()}
        assert snapshot[destination.name]["applied"] == total
        for target in destination.targets:
            assert snapshot[target.thread_name]["applied"] == total
            assert snapshot[target.thread_name]["duplicates"] == 0
    finally:
        assert daemon.stop(), "daemon did not stop in time"


# -- dead letters ------------------------------------------------------------------------------------

@needs_activemq
def test_target_dead_letters_land_in_the_target_dlq_with_the_reason(activemq, make_database):
    """A packet the canonical relation accepts but a target refuses (its CHECK constraint) goes to
    ``<target queue>.dlq`` on ActiveMQ, body and id unchanged, with the reason headers; the others
    are applied."""
    canonical, t1 = make_database(), make_database()
    execute(canonical, EVENTS)
    execute(t1, "CREATE TABLE public.ev (payload text NOT NULL, n integer NOT NULL CHECK (n >= 0))")
    config = parse_config(make_config(canonical, {"t1": t1}, "public.ev", broker=activemq))
    destination = config.destinations[0]
    target = destination.targets[0]
    daemon = Daemon(config)
    daemon.start()
    try:
        with Client(destination.queue, activemq.host, activemq.port, activemq.login,
                    activemq.passcode) as client:
            with client.batch():
                ids = {n: client.add({"payload": "p%d" % n, "n": n}) for n in (1, -2, 3, -4, 5)}
        wait_for(lambda: query(t1, "SELECT count(*) FROM ev")[0][0] == 3, message="good packets at t1")
        dead: List[Delivery] = []
        wait_for(lambda: dead.extend(drain_queue(target.dead_letter_queue, wait=0.5, broker=activemq))
                 or len(dead) >= 2, timeout=30, message="dead letters in %s" % target.dead_letter_queue)
        assert target.dead_letter_queue == target.queue + ".dlq"
        assert sorted(d.headers[ID_HEADER] for d in dead) == sorted([ids[-2], ids[-4]])
        for delivery in dead:
            assert "23514" in delivery.headers["golconde-reason"]       # check_violation
            assert delivery.headers["golconde-original-queue"] == target.queue
            assert delivery.headers["golconde-consumer"] == target.thread_name
            assert json.loads(delivery.body)["data"]["n"] < 0
        assert sorted(r[0] for r in query(t1, "SELECT n FROM ev")) == [1, 3, 5]
        assert drain_queue(destination.dead_letter_queue, wait=0.5, broker=activemq) == []
    finally:
        assert daemon.stop(), "daemon did not stop in time"


# -- header values (every broker) --------------------------------------------------------------------

def test_header_values_that_would_break_a_frame_are_cleaned(broker):
    """A CR in a header value makes RabbitMQ drop the connection and a NUL ends the frame on both
    brokers: a dead-letter reason quoting such text must still be sent, and the connection stay up."""
    queue = unique_queue("headers.")
    reasons = ["line one\r\nline two\rthree", "nul \x00 inside", "colon: back\\slash\nnewline \u00e9\u00ab\u00bb"]
    conn = BrokerConnection(broker.host, broker.port, broker.login, broker.passcode, heartbeat_ms=0,
                            name="test-headers")
    conn.connect()
    try:
        conn.send_confirmed([(queue, "body %d" % i, {"golconde-reason": reason, ID_HEADER: str(i)})
                             for i, reason in enumerate(reasons)], timeout=10)
        assert conn.connected
    finally:
        conn.close()
    received = collect(broker, queue, prefetch=10, until=len(reasons), timeout=10)
    got = {d.headers[ID_HEADER]: d.headers["golconde-reason"] for d in received}
    assert got == {"0": "line one\nline two\nthree", "1": "nul \\x00 inside", "2": reasons[2]}
    assert [header_value(r) for r in reasons] == [got["0"], got["1"], got["2"]]


def test_overlong_sender_times_are_not_sent_on(broker, make_database):
    """A batch message's entries carry their "created" time, which the destination sends on in the
    ``golconde-created-at`` header of its fan-out and of a dead letter. A sender's 20,000-digit one
    made ActiveMQ refuse those sends (its header limit is about 10 KB) on every redelivery: the
    destination stalled, the targets never got the row. It is now dropped (no finite number) or
    shortened (a number in 32 characters or fewer is kept as written)."""
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE public.items (id integer PRIMARY KEY, name text)")
    config = parse_config(make_config(canonical, {"t1": t1}, "public.items", broker=broker))
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    try:
        long_number = "1" + "0" * 20000      # float(): inf
        long_decimal = "1700000000." + "5" * 20000
        entries = [{"id": "long-1", "created": long_number, "packet": {"action": "add", "data": {"id": 1}}},
                   {"id": "long-2", "created": long_decimal,
                    "packet": {"action": "add", "data": {"id": 2, "nope": 1}}},   # dead-lettered
                   {"id": "long-3", "created": long_decimal, "packet": {"action": "add", "data": {"id": 3}}}]
        send_raw(destination.queue, [json.dumps({"batch": entries}),
                                     json.dumps({"action": "add", "data": {"id": 4}})],
                 [{"golconde-batch": "3"}, {}], broker=broker)
        wait_for(lambda: query(t1, "SELECT array_agg(id ORDER BY id) FROM items")[0][0] == [1, 3, 4],
                 timeout=30, message="rows 1, 3 and 4 at the target")
        dead: List[Delivery] = []
        wait_for(lambda: dead.extend(drain_queue(destination.dead_letter_queue, wait=0.5, broker=broker))
                 or dead, timeout=30, message="the dead letter")
        assert [d.headers[ID_HEADER] for d in dead] == ["long-2"]
        assert dead[0].headers["golconde-created-at"] == "1700000000.5555556"
        assert "nope" in dead[0].headers["golconde-reason"]
    finally:
        assert daemon.stop(), "daemon did not stop in time"
