"""Fault injection against the real services: broker connections closed by the broker, target
database sessions terminated, golconded killed with SIGKILL or stopped with SIGTERM mid-stream, a
trigger-based flow across a crash, and a target table locked for a while.

Every scenario streams packets that would reveal a double apply (ADD into a keyless table, each
with a unique payload) and ends by checking that the canonical relation and every target hold each
sent payload exactly once, that the queues are drained and that nothing was dead-lettered.

Each test isolates itself: its own databases, destination and queues (deleted at teardown); the
broker-side fault uses a RabbitMQ user created for the test, so that only the daemon's connections
are closed, never those of other test runs sharing the broker.

Select them with ``-m faults``; deselect with ``-m "not faults"``.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import threading
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence

import psycopg2
import psycopg2.extensions
import pytest

from golconde import trigger
from golconde.client import Client
from golconde.compare import compare
from golconde.daemon import Daemon
from golconde.metrics import health

from ..conftest import STOMP_LOGIN, STOMP_PASSCODE, stomp_address
from .flow_support import (DaemonProcess, execute, make_config, parse_config, query, queue_backlog,
                           wait_for, write_config)

pytestmark = pytest.mark.faults

TABLE = "public.ev"
EVENTS = "CREATE TABLE public.ev (payload text NOT NULL, n integer NOT NULL)"  # keyless on purpose
HEARTBEAT_MS = 2000


# -- helpers -----------------------------------------------------------------------------------------

def rabbitmqctl_command() -> List[str]:
    """How to run RabbitMQ's ``rabbitmqctl`` here: found on ``PATH`` or in the standard sbin
    directories (a user's ``PATH`` often lacks them), through ``sudo -n`` unless root (its
    wrapper refuses other users), as ``scripts/setup.sh`` runs what needs root.

    :raises AssertionError: not found (the set-up installs it with the broker): the tests that
        need it fail, they are not skipped."""
    found = shutil.which("rabbitmqctl", path=os.pathsep.join(
        [os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"]))
    if found is None:
        raise AssertionError("rabbitmqctl not found (RabbitMQ's CLI, installed by scripts/setup.sh)")
    if os.geteuid() == 0:
        return [found]
    sudo = shutil.which("sudo")
    if sudo is None:
        raise AssertionError("rabbitmqctl needs root, and sudo is not installed")
    return [sudo, "-n", found]


def rabbitmqctl(*args: str, check: bool = True) -> str:
    result = subprocess.run(rabbitmqctl_command() + ["-q"] + list(args), capture_output=True,
                            text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError("rabbitmqctl %s failed (%d): %s %s" % (
            " ".join(args), result.returncode, result.stdout, result.stderr))
    return result.stdout


def amqp_name(stomp_queue: str) -> str:
    """``/queue/x`` -> ``x`` (RabbitMQ's name of the queue)."""
    assert stomp_queue.startswith("/queue/"), stomp_queue
    return stomp_queue[len("/queue/"):]


def queue_depths() -> Dict[str, int]:
    """``{queue name: messages (ready + unacknowledged)}`` for every queue of the default vhost."""
    depths = {}
    for line in rabbitmqctl("list_queues", "--no-table-headers", "name", "messages").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().isdigit():
            depths[parts[0]] = int(parts[1])
    return depths


def delete_queues(names: Iterable[str]) -> None:
    """Delete the test's queues (missing ones are ignored), in one ``rabbitmqctl eval``."""
    names = [name for name in names if re.fullmatch(r"[A-Za-z0-9_.-]+", name)]
    if not names:
        return
    expression = ("lists:foreach(fun(N) -> case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>,"
                  " queue, N)) of {ok, Q} -> rabbit_amqqueue:delete(Q, false, false, <<\"test\">>);"
                  " _ -> ok end end, [%s]), ok." % ", ".join('<<"%s">>' % n for n in names))
    try:
        rabbitmqctl("eval", expression)
    except (AssertionError, subprocess.TimeoutExpired):
        for name in names:
            rabbitmqctl("delete_queue", name, check=False)


def count_rows(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM ev")[0][0]


def counts(dsn: str) -> tuple:
    """(rows, distinct payloads)."""
    return tuple(query(dsn, "SELECT count(*), count(DISTINCT payload) FROM ev")[0])


#: ``Stream.total`` of a stream that runs until :meth:`Stream.end`.
OPEN_ENDED = 1 << 62


class Stream(threading.Thread):
    """Streams ``total`` ADD packets with unique payloads into a destination queue, in confirmed
    batches of ``batch``, pausing ``pause`` seconds between batches (a paced stream, so that faults
    land while packets flow). Uses its own guest connection. With ``total=None`` it streams until
    :meth:`end`, so that faults whose injection takes long on a slow host still land mid-stream."""

    def __init__(self, queue: str, total: Optional[int], batch: int = 25, pause: float = 0.02,
                 prefix: Optional[str] = None) -> None:
        super().__init__(name="fault-stream", daemon=True)
        self.queue = queue
        self.total = total if total is not None else OPEN_ENDED
        self.batch_size = batch
        self.pause = pause
        self.prefix = prefix or uuid.uuid4().hex[:6]
        self.sent = 0
        self.error: Optional[BaseException] = None
        self._halt = threading.Event()

    def payload(self, index: int) -> str:
        return "%s-%06d" % (self.prefix, index)

    @property
    def payloads(self) -> List[str]:
        assert self.total != OPEN_ENDED, "an open-ended stream has no payload list before end()"
        return [self.payload(i) for i in range(self.total)]

    def run(self) -> None:
        host, port = stomp_address()
        client = Client(self.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE, timeout=20)
        try:
            while self.sent < self.total and not self._halt.is_set():
                upto = min(self.total, self.sent + self.batch_size)
                with client.batch():
                    for index in range(self.sent, upto):
                        client.add({"payload": self.payload(index), "n": index})
                self.sent = upto
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            client.close()

    def finish(self, timeout: float = 40.0) -> None:
        assert self.total != OPEN_ENDED, "an open-ended stream is ended by end(), not finish()"
        self.join(timeout)
        if self.is_alive():
            self._halt.set()
            self.join(5)
            raise AssertionError("stream did not finish within %.0fs (%d of %d sent)"
                                 % (timeout, self.sent, self.total))
        if self.error is not None:
            raise AssertionError("stream failed after %d packets: %r" % (self.sent, self.error))
        assert self.sent == self.total

    def end(self, timeout: float = 20.0) -> None:
        """Stop after the current batch; ``total`` becomes the count sent (all confirmed), then
        as :meth:`finish`."""
        self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        self.total = self.sent
        self.finish(0)

    def abort(self) -> None:
        self._halt.set()
        self.join(10)


class Flow:
    """Canonical + two targets, each with the keyless ``ev`` table, and a configuration mapping."""

    def __init__(self, make_database: Any, table_sql: str = EVENTS, table: str = TABLE,
                 mode: str = "client", **overrides: Any) -> None:
        self.canonical, self.t1, self.t2 = make_database(), make_database(), make_database()
        for dsn in (self.canonical, self.t1, self.t2):
            execute(dsn, table_sql)
        self.table = table
        self.mapping = make_config(self.canonical, {"target1": self.t1, "target2": self.t2},
                                   table, mode=mode, **overrides)
        self.mapping["Broker"]["heartbeat"] = HEARTBEAT_MS
        self.name = next(iter(self.mapping["Destinations"]))
        destination = self.mapping["Destinations"][self.name]
        self.queue = destination["queue"]
        self.target_queues = [t["queue"] for t in destination["Targets"].values()]

    @property
    def targets(self) -> List[str]:
        return [self.t1, self.t2]

    @property
    def all_dbs(self) -> List[str]:
        return [self.canonical, self.t1, self.t2]

    def amqp_queues(self) -> List[str]:
        """Every queue this flow may create, dead-letter queues included."""
        names = [amqp_name(q) for q in [self.queue] + self.target_queues]
        return names + [name + ".dlq" for name in names]

    def config(self) -> Any:
        return parse_config(self.mapping)

    def queues_drained(self) -> bool:
        depths = queue_depths()
        return all(depths.get(name, 0) == 0 for name in self.amqp_queues())

    def dead_letters(self) -> Dict[str, int]:
        depths = queue_depths()
        return {name: depths[name] for name in self.amqp_queues()
                if name.endswith(".dlq") and depths.get(name)}

    def wait_complete(self, stream: Stream, timeout: float = 45.0, dbs: Optional[Sequence[str]] = None,
                      describe: Any = None) -> None:
        """Wait until every database holds all ``stream.total`` distinct payloads and every queue
        of the flow is empty (nothing left to redeliver), then assert the exact end state."""
        dbs = list(dbs or self.all_dbs)
        try:
            wait_for(lambda: all(counts(dsn)[1] >= stream.total for dsn in dbs),
                     timeout=timeout, interval=0.3, message="all payloads everywhere")
            wait_for(self.queues_drained, timeout=15, interval=0.5, message="queues drained")
        except AssertionError as exc:
            state = {dsn.split("dbname=")[-1]: counts(dsn) for dsn in dbs}
            extra = describe() if describe else ""
            raise AssertionError("%s; (rows, distinct) per database: %s; queues: %s\n%s" % (
                exc, state, {n: d for n, d in queue_depths().items() if n in self.amqp_queues()},
                extra)) from None
        self.assert_exact(stream, dbs)

    def assert_exact(self, stream: Stream, dbs: Sequence[str]) -> None:
        expected = sorted(stream.payloads)
        for dsn in dbs:
            rows, distinct = counts(dsn)
            assert (rows, distinct) == (stream.total, stream.total), (
                "%s: %d rows, %d distinct payloads, %d sent (duplicates or losses)"
                % (dsn, rows, distinct, stream.total))
            assert [r[0] for r in query(dsn, "SELECT payload FROM ev ORDER BY payload")] == expected
        for target in self.targets:
            if target in dbs:
                result = compare(self.canonical, self.table, target, self.table)
                assert result.equal, result.summary()
        assert self.dead_letters() == {}, "packets were dead-lettered: %s" % self.dead_letters()


@pytest.fixture
def cleanup_queues():
    """Collects flows; deletes their queues at teardown."""
    flows: List[Flow] = []
    yield flows
    names = [name for flow in flows for name in flow.amqp_queues()]
    if names:
        delete_queues(names)


@pytest.fixture
def flow(make_database, cleanup_queues):
    created = Flow(make_database)
    cleanup_queues.append(created)
    return created


@pytest.fixture
def rabbit_user():
    """A RabbitMQ user of our own, so that closing its connections touches nobody else."""
    user = "golconde_fault_%s" % uuid.uuid4().hex[:10]
    password = uuid.uuid4().hex
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        rabbitmqctl("delete_user", user, check=False)


def thread_stats(daemon: Daemon) -> Dict[str, Dict[str, Any]]:
    stats: Dict[str, Dict[str, Any]] = {}
    for entry in daemon.registry.snapshot()["threads"]:
        stats.update(entry)
    return stats


def stomp_connections(user: str) -> List[str]:
    """Erlang pids (``<0.N.M>``, local to the broker node) of the STOMP connections of ``user``.

    ``rabbitmqctl list_connections`` does not list STOMP connections on RabbitMQ 3.10, hence
    ``list_stomp_connections``."""
    out = rabbitmqctl("list_stomp_connections", "--no-table-headers", "auth_login", "connection")
    pids = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] == user:
            match = re.search(r"\.(\d+)\.(\d+)>$", parts[1].strip())
            if match:
                pids.append("<0.%s.%s>" % match.groups())
    return pids


def close_user_connections(user: str) -> int:
    """Close, from the broker side, the connections of ``user`` only (other test runs may share
    the broker). Returns how many STOMP connections ``user`` had.

    ``rabbitmqctl close_all_user_connections`` is run first, but on RabbitMQ 3.10 it does not
    touch STOMP connections (checked: a STOMP consumer keeps receiving and acking after it). So each
    STOMP connection of ``user`` is then closed by its reader process, as
    ``rabbit_stomp:close_all_client_connections`` does for every connection of every user: the
    client gets an ERROR frame and the broker closes the socket.
    """
    pids = stomp_connections(user)
    rabbitmqctl("close_all_user_connections", user, "test")
    if pids:
        rabbitmqctl("eval", "[rabbit_stomp_reader:close_connection(list_to_pid(P), \"test\")"
                            " || P <- [%s]], ok." % ", ".join('"%s"' % pid for pid in pids))
    return len(pids)


class running:
    """Context manager: an in-process daemon, always stopped."""

    def __init__(self, config: Any) -> None:
        self.daemon = Daemon(config)

    def __enter__(self) -> Daemon:
        self.daemon.start()
        return self.daemon

    def __exit__(self, *exc: Any) -> None:
        assert self.daemon.stop(), "daemon did not stop in time"


class subprocess_daemon:
    """Context manager: golconded as a subprocess (killed at exit if still running)."""

    def __init__(self, flow: Flow, tmp_path: Any) -> None:
        self.config_path = write_config(str(tmp_path / "golconde.yaml"), flow.mapping)
        self.log_path = str(tmp_path / "golconded.log")
        self.process = DaemonProcess(self.config_path, self.log_path)

    def __enter__(self) -> "subprocess_daemon":
        self.process.start()
        return self

    def restart(self) -> None:
        self.process = DaemonProcess(self.config_path, self.log_path).start()

    def kill(self) -> None:
        self.process.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.process.log().splitlines()[-lines:])
        except OSError:
            return ""

    def __exit__(self, *exc: Any) -> None:
        proc = self.process.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# -- 1. the broker closes the daemon's connections mid-stream ----------------------------------------

def test_broker_closes_connections_mid_stream(flow, rabbit_user):
    user, password = rabbit_user
    flow.mapping["Broker"].update({"login": user, "passcode": password})
    stream = Stream(flow.queue, None, batch=20, pause=0.05)   # until both faults are over
    with running(flow.config()) as daemon:
        # 3 threads, each with an inbound and an outbound connection
        wait_for(lambda: len(stomp_connections(user)) >= 6, timeout=15, message="daemon connected")
        stream.start()
        try:
            for threshold in (300, 1000):
                wait_for(lambda: stream.sent >= threshold or not stream.is_alive(), timeout=15,
                         message="packets flowing")
                assert stream.is_alive(), "the stream failed before the fault: %r" % stream.error
                before = set(stomp_connections(user))
                assert close_user_connections(user) >= 6
                # the daemon reconnects and resubscribes by itself: 6 new connections
                wait_for(lambda: len(set(stomp_connections(user)) - before) >= 6, timeout=20,
                         message="daemon reconnected")
            time.sleep(0.5)                 # packets flow on the new connections too
            stream.end()
        finally:
            stream.abort()
        flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
        stats = thread_stats(daemon)
        assert sum(s["reconnects"] for s in stats.values()) > 0, stats
        assert all(s["broker"] == "connected" and s["database"] == "connected"
                   for s in stats.values()), stats
        # A batch committed whose fan-out or ack was cut by the drop is counted when its
        # redelivery comes back as duplicates: never more applies than packets.
        for name in [flow.name, flow.name + "_target1", flow.name + "_target2"]:
            thread = stats[name]
            assert thread["applied"] <= stream.total <= thread["applied"] + thread["duplicates"], thread
            assert thread["dead_lettered"] == 0, thread
        print("reconnects per thread:", {name: s["reconnects"] for name, s in stats.items()})


def test_every_listener_counts_its_broker_reconnects(flow, rabbit_user):
    user, password = rabbit_user
    flow.mapping["Broker"].update({"login": user, "passcode": password})
    with running(flow.config()) as daemon:
        wait_for(lambda: len(stomp_connections(user)) >= 6, timeout=15, message="daemon connected")
        before = set(stomp_connections(user))
        assert close_user_connections(user) >= 6
        wait_for(lambda: len(set(stomp_connections(user)) - before) >= 6, timeout=20,
                 message="daemon reconnected")
        wait_for(lambda: all(s["broker"] == "connected" for s in thread_stats(daemon).values()),
                 timeout=10, message="listeners report connected")
        stats = thread_stats(daemon)
        assert {name: s["reconnects"] >= 1 for name, s in stats.items()} == {
            name: True for name in stats}, {name: s["reconnects"] for name, s in stats.items()}
        # idle listeners saw the loss only through stomp.py's receiver thread: it is their last
        # error all the same, with the broker's reason, and no failed attempt
        lost = "lost STOMP connection to %s:%d (disconnected; broker ERROR: " % stomp_address()
        assert {name: (s["last_error"] or "")[:len(lost)] for name, s in stats.items()} == {
            name: lost for name in stats}, {name: s["last_error"] for name, s in stats.items()}
        assert all("\n" not in s["last_error"] for s in stats.values())
        assert all(s["problems"] == [] for s in stats.values()), stats


# -- 2. target database sessions terminated mid-stream -----------------------------------------------

def terminate_golconde_sessions(dsn: str) -> int:
    dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    rows = query(dsn.replace("dbname=" + dbname, "dbname=postgres"),
                 "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 " WHERE datname = %s AND application_name LIKE 'golconde%%'", (dbname,))
    return sum(1 for (ok,) in rows if ok)


def test_target_sessions_terminated_mid_stream(flow):
    stream = Stream(flow.queue, 2000, batch=25, pause=0.03)
    with running(flow.config()) as daemon:
        target = "%s_target1" % flow.name
        wait_for(lambda: thread_stats(daemon)[target]["database"] == "connected", timeout=15,
                 message="target1 connected")
        stream.start()
        terminated = 0
        try:
            for threshold in (300, 800, 1300):
                wait_for(lambda: count_rows(flow.t1) >= threshold or not stream.is_alive(),
                         timeout=20, message="target1 applying")
                terminated += terminate_golconde_sessions(flow.t1)
                time.sleep(0.2)
            stream.finish()
        finally:
            stream.abort()
        assert terminated >= 2, "no golconde session found to terminate"
        flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
        stats = thread_stats(daemon)
        assert stats[target]["applied"] == stream.total, stats[target]
        assert stats[target]["database"] == "connected"
        assert stats[target]["dead_lettered"] == 0


def test_an_idle_listener_notices_its_session_ended_and_reconnects(flow, monkeypatch):
    """Sessions ended by the server while no packet comes: each queue consumer finds out within
    DB_PROBE_INTERVAL, says so in last_error and reconnects (before, it showed "connected" until
    the next packet, and the next packet's batch paid for the reconnect)."""
    from golconde import listener as listener_module
    monkeypatch.setattr(listener_module, "DB_PROBE_INTERVAL", 1.0)
    with running(flow.config()) as daemon:
        target = "%s_target1" % flow.name
        wait_for(lambda: thread_stats(daemon)[target]["database"] == "connected", timeout=15,
                 message="target1 connected")
        time.sleep(0.5)
        assert terminate_golconde_sessions(flow.t1) >= 1
        # the reconnect is counted when the session is up, "connected" once its set-up is done
        wait_for(lambda: thread_stats(daemon)[target]["reconnects"] >= 1
                 and thread_stats(daemon)[target]["database"] == "connected", timeout=10,
                 message="target1 reconnected while idle")
        stats = thread_stats(daemon)[target]
        assert stats["last_error"].startswith("PostgreSQL session lost while idle: "), stats
        assert stats["database"] == "connected" and stats["problems"] == [], stats
        stream = Stream(flow.queue, 50, batch=25, pause=0.01)
        stream.start()
        stream.finish()
        flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
        assert thread_stats(daemon)[target]["applied"] == 50


def test_a_target_that_cannot_reconnect_mid_stream_lists_its_failures(flow):
    """A target whose database is lost in the middle of the stream and then refuses new sessions
    reconnects with backoff; its failed attempts count as the supervising loop's do (the problem
    'failing' from the third), which they did not on that path. It catches up once allowed."""
    stream = Stream(flow.queue, 600, batch=20, pause=0.02)
    dbname = re.search(r"dbname=(\S+)", flow.t1).group(1)
    admin = flow.t1.replace("dbname=" + dbname, "dbname=postgres")
    with running(flow.config()) as daemon:
        target = "%s_target1" % flow.name
        wait_for(lambda: thread_stats(daemon)[target]["database"] == "connected", timeout=15,
                 message="target1 connected")
        stream.start()
        try:
            wait_for(lambda: count_rows(flow.t1) >= 100 or not stream.is_alive(), timeout=20,
                     message="target1 applying")
            execute(admin, "ALTER DATABASE %s ALLOW_CONNECTIONS false" % dbname)
            try:
                assert terminate_golconde_sessions(flow.t1) >= 1
                wait_for(lambda: any("failed attempts in a row" in problem
                                     for problem in thread_stats(daemon)[target]["problems"]),
                         timeout=30, message="target1's standing problem")
            finally:
                execute(admin, "ALTER DATABASE %s ALLOW_CONNECTIONS true" % dbname)
            stream.finish()
        finally:
            stream.abort()
        flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
        wait_for(lambda: thread_stats(daemon)[target]["problems"] == [], timeout=20,
                 message="the problem cleared")
        assert thread_stats(daemon)[target]["dead_lettered"] == 0


# -- 3. kill -9 of golconded, three times ------------------------------------------------------------

def test_kill_9_three_times_mid_stream(flow, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stream = Stream(flow.queue, None, batch=20, pause=0.04)   # until the third kill is over
    with subprocess_daemon(flow, tmp_path) as golconded:
        wait_for(lambda: "listener starting" in golconded.process.log(),
                 timeout=15, message="golconded started")
        stream.start()
        try:
            killed_at = []
            for _ in range(3):
                time.sleep(rng.uniform(0.5, 1.5))
                assert stream.is_alive(), "the stream failed: %r" % stream.error
                killed_at.append(stream.sent)
                golconded.kill()
                time.sleep(rng.uniform(0.0, 0.3))
                golconded.restart()
            time.sleep(0.5)                 # packets flow into the restarted daemon too
            stream.end()
            flow.wait_complete(stream, describe=lambda: "seed %d\n%s" % (seed, golconded.log_tail()))
        finally:
            stream.abort()


# -- 4. SIGTERM during a stream: clean and quick exit, then a complete restart ------------------------

def test_sigterm_mid_stream_exits_cleanly(flow, tmp_path):
    stream = Stream(flow.queue, 2000, batch=25, pause=0.03)
    with subprocess_daemon(flow, tmp_path) as golconded:
        try:
            wait_for(lambda: "listener starting" in golconded.process.log(),
                     timeout=15, message="golconded started")
            stream.start()
            wait_for(lambda: count_rows(flow.t1) >= 300, timeout=20, message="packets flowing")
            started = time.monotonic()
            status = golconded.process.terminate(timeout=15)
            elapsed = time.monotonic() - started
            assert status == 0, "exit status %s\n%s" % (status, golconded.log_tail())
            assert elapsed < 5.0, "took %.1fs to stop\n%s" % (elapsed, golconded.log_tail())
            assert "did not stop" not in golconded.process.log()
            before = count_rows(flow.t1)
            golconded.restart()
            stream.finish()
            flow.wait_complete(stream, describe=golconded.log_tail)
            assert before < stream.total          # the fault did land mid-stream
        finally:
            stream.abort()


# -- 5. trigger-based flow across a kill -9 ------------------------------------------------------------

ITEMS = "CREATE TABLE public.items (id integer PRIMARY KEY, n integer NOT NULL, note text)"


def items_trigger_flow(make_database: Any, cleanup_queues: List[Any]) -> Flow:
    """A trigger-mode flow of ``public.items``, its capture trigger installed."""
    flow = Flow(make_database, table_sql=ITEMS, table="public.items", mode="trigger")
    cleanup_queues.append(flow)
    conn = psycopg2.connect(flow.canonical)
    try:
        trigger.install(conn, "public.items", flow.name)
    finally:
        conn.close()
    return flow


def test_trigger_flow_survives_kill_9(make_database, cleanup_queues, tmp_path):
    flow = items_trigger_flow(make_database, cleanup_queues)
    rng = random.Random()
    writes = {"transactions": 0}
    errors: List[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        db = psycopg2.connect(flow.canonical)
        try:
            next_id = 1
            for number in range(600):
                with db.cursor() as cur:
                    kind = number % 6
                    if kind in (0, 1, 2) or next_id < 10:
                        cur.execute("INSERT INTO items VALUES (%s, 0, %s), (%s, 0, %s)",
                                    (next_id, "row %d" % next_id, next_id + 1, None))
                        next_id += 2
                    elif kind in (3, 4):
                        ids = rng.sample(range(1, next_id), 3)
                        cur.execute("UPDATE items SET n = n + 1, note = note || '+'"
                                    " WHERE id = ANY(%s)", (ids,))
                    else:
                        cur.execute("DELETE FROM items WHERE id = %s", (rng.randrange(1, next_id),))
                db.commit()
                writes["transactions"] += 1
                time.sleep(0.008)
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()
            done.set()

    with subprocess_daemon(flow, tmp_path) as golconded:
        thread = threading.Thread(target=writer, name="fault-writer", daemon=True)
        thread.start()
        wait_for(lambda: writes["transactions"] >= 150, timeout=20, message="writes going on")
        time.sleep(rng.uniform(0.0, 1.0))
        killed_at = writes["transactions"]
        golconded.kill()
        assert killed_at < 600, "the writes were over before the kill"
        time.sleep(0.3)
        golconded.restart()
        assert done.wait(40), "writer did not finish"
        assert not errors, errors
        assert writes["transactions"] == 600

        def settled() -> bool:
            backlog = queue_backlog(flow.canonical, flow.name)    # by the saved position
            return (backlog == 0 and flow.queues_drained()
                    and all(compare(flow.canonical, "public.items", t, "public.items").equal
                            for t in flow.targets))

        try:
            wait_for(settled, timeout=45, interval=0.5, message="targets equal to canonical")
        except AssertionError as exc:
            raise AssertionError("%s\n%s" % (exc, golconded.log_tail())) from None
        rows = query(flow.canonical, "SELECT * FROM items ORDER BY id")
        assert len(rows) > 500 and any(r[1] > 0 for r in rows)
        for target in flow.targets:
            assert query(target, "SELECT * FROM items ORDER BY id") == rows
        assert flow.dead_letters() == {}


# -- 6. a locked target table does not hold back the other target -------------------------------------

def waiting_on_lock(dsn: str) -> bool:
    dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    return bool(query(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                           " AND application_name LIKE 'golconde%%' AND wait_event_type = 'Lock'",
                      (dbname,))[0][0])


def test_locked_target_does_not_block_the_other(flow):
    stream = Stream(flow.queue, 1500, batch=50, pause=0.01)
    warmup = Stream(flow.queue, 1, prefix="warmup")
    locker = None
    with running(flow.config()) as daemon:
        warmup.start()
        warmup.finish()
        wait_for(lambda: all(count_rows(dsn) == 1 for dsn in flow.all_dbs), timeout=20,
                 message="warm-up packet everywhere")
        locker = psycopg2.connect(flow.t1)
        try:
            with locker.cursor() as cur:
                cur.execute("LOCK TABLE public.ev IN ACCESS EXCLUSIVE MODE")
            locked_at = time.monotonic()
            stream.start()
            stream.finish()
            wait_for(lambda: count_rows(flow.t2) >= 1 + stream.total, timeout=9, interval=0.2,
                     message="target2 receiving while target1 is locked")
            assert time.monotonic() - locked_at < 10
            time.sleep(max(0.0, 10.0 - (time.monotonic() - locked_at)))
            # target1 waited on the lock the whole time (ev cannot even be read while it is held):
            # its session is blocked on the lock, nothing of the stream is applied there yet
            assert waiting_on_lock(flow.t1), "target1's session is not waiting on the lock"
            target1 = thread_stats(daemon)["%s_target1" % flow.name]
            assert target1["applied"] == 1 and target1["dead_lettered"] == 0, target1
            # its stats show it is stuck: what it holds as backlog, the stream's age as lag
            assert target1["backlog"] > 0 and target1["lag"] > 5.0, target1
        finally:
            locker.rollback()   # releases the lock
            locker.close()
            stream.abort()
        # after the release, target1 catches up
        expected = ["warmup-000000"] + stream.payloads
        wait_for(lambda: count_rows(flow.t1) >= len(expected), timeout=30,
                 message="target1 caught up")
        wait_for(flow.queues_drained, timeout=15, interval=0.5, message="queues drained")
        for dsn in flow.all_dbs:
            assert [r[0] for r in query(dsn, "SELECT payload FROM ev ORDER BY payload")] == sorted(expected)
        assert compare(flow.canonical, TABLE, flow.t1, TABLE).equal
        assert flow.dead_letters() == {}
        # caught up and idle: no lag left (it was the stream's age)
        wait_for(lambda: thread_stats(daemon)["%s_target1" % flow.name]["lag"] == 0.0, timeout=10,
                 message="target1's lag back to 0")


def test_a_full_inbox_during_a_long_apply_keeps_the_broker_connection(flow, caplog):
    """target1's table stays locked for longer than twice the heart-beat receive timeout (3 s here)
    while far more packets than its inbox holds are queued for it: its STOMP receiver stops
    reading the socket (backpressure), but that must not count as a dead broker. Otherwise the
    connection is dropped and everything prefetched is redelivered, after every long apply."""
    stream = Stream(flow.queue, 6000, batch=500, pause=0.0)
    locker = None
    with running(flow.config()) as daemon:
        locker = psycopg2.connect(flow.t1)
        try:
            with locker.cursor() as cur:
                cur.execute("LOCK TABLE public.ev IN ACCESS EXCLUSIVE MODE")
            stream.start()
            stream.finish()
            wait_for(lambda: count_rows(flow.t2) >= stream.total, timeout=30, interval=0.2,
                     message="target2 applied the stream while target1 is locked")
            time.sleep(8.0)    # > 2 x 1.5 x HEARTBEAT_MS with target1's inbox full
            assert waiting_on_lock(flow.t1), "target1's session is not waiting on the lock"
            inbox = daemon.listeners["%s_target1" % flow.name]._inbox
            # full: the next batch message (500 packets) does not fit, so the receiver is blocked
            assert inbox.packets + 500 > inbox.limit, (inbox.packets, inbox.limit)
        finally:
            locker.rollback()   # releases the lock
            locker.close()
            stream.abort()
        flow.wait_complete(stream)
        target1 = thread_stats(daemon)["%s_target1" % flow.name]
        assert target1["reconnects"] == 0, target1
    assert "heart-beat timeout" not in caplog.text and "lost STOMP connection" not in caplog.text


# -- 6. a database made read-only for a while (a standby during a failover) ---------------------------

def _read_only(dsn: str, on: bool) -> None:
    dbname = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    execute(dsn.replace("dbname=" + dbname, "dbname=postgres"), "ALTER DATABASE %s %s" % (dbname, "SET default_transaction_read_only = on" if on
                                            else "RESET default_transaction_read_only"))


def test_a_target_database_read_only_for_a_while_dead_letters_nothing(flow):
    """Its sessions, reopened read-only (25006 on every write), are replaced with backoff until the
    database is writable again: nothing is dead-lettered, everything arrives. Meanwhile the
    target reports the standing problem "failing" (it showed healthy, its batches refused
    without end), which clears once a batch gets through."""
    with running(flow.config()) as daemon:
        target = "%s_target1" % flow.name
        wait_for(lambda: thread_stats(daemon)[target]["database"] == "connected", timeout=15,
                 message="target1 connected")
        _read_only(flow.t1, True)
        try:
            assert terminate_golconde_sessions(flow.t1) >= 1
            stream = Stream(flow.queue, 200, batch=25, pause=0.02)
            stream.start()
            stream.finish()
            wait_for(lambda: count_rows(flow.t2) == 200, timeout=20, message="target2 applied")
            wait_for(lambda: "25006" in (thread_stats(daemon)[target]["last_error"] or ""),
                     timeout=20, message="target1 refused")
            wait_for(lambda: any("failed attempts in a row" in p
                                 for p in thread_stats(daemon)[target]["problems"]),
                     timeout=30, message="the failing problem")
            assert not health(daemon.registry.snapshot(), 10000, 300.0)[0]
            assert count_rows(flow.t1) == 0
            assert thread_stats(daemon)[target]["dead_lettered"] == 0
        finally:
            _read_only(flow.t1, False)
        flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
        stats = thread_stats(daemon)
        assert stats[target]["dead_lettered"] == 0 and stats[target]["reconnects"] >= 2, stats[target]
        wait_for(lambda: thread_stats(daemon)[target]["problems"] == [], timeout=10,
                 message="the problem cleared once a batch got through")


def test_a_canonical_database_read_only_for_a_while_holds_the_drain(make_database, cleanup_queues):
    """Trigger flow: the drain's session reopened read-only cannot save its position (25006): it
    is replaced until the database is writable again, and the drain goes on from there."""
    flow = items_trigger_flow(make_database, cleanup_queues)
    with running(flow.config()) as daemon:
        wait_for(lambda: thread_stats(daemon)[flow.name]["database"] == "connected", timeout=15,
                 message="the drain connected")
        _read_only(flow.canonical, True)
        try:
            assert terminate_golconde_sessions(flow.canonical) >= 1
            # the application's own session overrides the database's default
            writer = psycopg2.connect(flow.canonical, options="-c default_transaction_read_only=off")
            with writer, writer.cursor() as cur:
                cur.execute("INSERT INTO items SELECT g, g, 'x' FROM generate_series(1, 300) g")
            writer.close()
            wait_for(lambda: "25006" in (thread_stats(daemon)[flow.name]["last_error"] or ""),
                     timeout=20, message="the drain refused")
            # each try sends a window and fails to save the position: failures in a row (the
            # cycles that sent did not get through), a lag growing from the first, the backlog
            # unknown (it said 0 and lag 0 while the rows waited)
            wait_for(lambda: any("failed attempts in a row" in problem
                                 for problem in thread_stats(daemon)[flow.name]["problems"]),
                     timeout=30, message="the drain's standing problem")
            # (three failures may come within a second: full-jitter backoff) the lag grows; the
            # backlog is unknown between tries (during a try, the rows sent are held: 300)
            wait_for(lambda: (thread_stats(daemon)[flow.name]["lag"] or 0) > 1.0
                     and thread_stats(daemon)[flow.name]["backlog"] is None, timeout=10,
                     message="the lag growing, the backlog unknown: %s"
                     % thread_stats(daemon)[flow.name])
        finally:
            _read_only(flow.canonical, False)
        execute(flow.canonical, "UPDATE items SET note = 'y' WHERE id <= 100")
        wait_for(lambda: all(compare(flow.canonical, "public.items", t, "public.items").equal
                             for t in (flow.t1, flow.t2)), timeout=40, message="targets equal")
        wait_for(lambda: queue_backlog(flow.canonical, flow.name) == 0, timeout=20,
                 message="the position saved")
        wait_for(lambda: thread_stats(daemon)[flow.name]["lag"] == 0.0
                 and thread_stats(daemon)[flow.name]["problems"] == [], timeout=20,
                 message="lag and problems cleared")
        assert thread_stats(daemon)[flow.name]["dead_lettered"] == 0


def test_a_target_role_without_insert_pauses_until_granted(flow, monkeypatch):
    """Target1's role may not INSERT into its table: target1 pauses (its packets stay queued, its
    error says what to grant) instead of dead-lettering them; once granted, everything arrives."""
    from psycopg2 import sql

    from golconde import apply as apply_module
    from golconde import ledger

    monkeypatch.setattr(apply_module, "PRIVILEGE_RETRY", 3.0)
    role = "golconde_r_%s" % uuid.uuid4().hex[:8]
    admin = psycopg2.connect(flow.t1)
    admin.autocommit = True
    ledger.ensure(admin)
    with admin.cursor() as cur:
        for statement in ("CREATE ROLE {} LOGIN", "GRANT USAGE ON SCHEMA golconde TO {}",
                          "GRANT SELECT, INSERT, DELETE ON golconde.applied TO {}",
                          "GRANT SELECT ON ev TO {}"):
            cur.execute(sql.SQL(statement).format(sql.Identifier(role)))
    try:
        params = psycopg2.extensions.parse_dsn(flow.t1)
        params["user"] = role
        flow.mapping["Destinations"][flow.name]["Targets"]["target1"]["pgsql"] = \
            psycopg2.extensions.make_dsn(**params)
        with running(flow.config()) as daemon:
            target = "%s_target1" % flow.name
            stream = Stream(flow.queue, 300, batch=25, pause=0.01)
            stream.start()
            stream.finish()
            wait_for(lambda: count_rows(flow.t2) == 300, timeout=20, message="target2 applied")
            wait_for(lambda: "this role lacks INSERT on public.ev" in (
                thread_stats(daemon)[target]["last_error"] or ""), timeout=20,
                message="target1 paused for want of INSERT")
            # the pause closed its connections, and says so (its broker stayed "connected")
            wait_for(lambda: thread_stats(daemon)[target]["broker"] == "disconnected", timeout=2,
                     message="target1's broker reported closed during the pause")
            time.sleep(1.5)
            assert count_rows(flow.t1) == 0 and thread_stats(daemon)[target]["dead_lettered"] == 0
            with admin.cursor() as cur:
                cur.execute(sql.SQL("GRANT INSERT ON ev TO {}").format(sql.Identifier(role)))
            flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
            assert thread_stats(daemon)[target]["dead_lettered"] == 0
    finally:
        terminate_golconde_sessions(flow.t1)
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        admin.close()


# -- 7. the same configuration started twice -----------------------------------------------------------

def test_the_same_configuration_twice_applies_each_queue_once_in_order(make_database, cleanup_queues,
                                                                       monkeypatch):
    """A second daemon with the same configuration: its queue consumers wait for the lock the
    first holds on each queue in its database (its trigger drain, for the drain lock), instead of
    taking every other batch and applying them out of order; when the first stops, the second
    takes over, and every target equals the canonical table."""
    from golconde import listener as listener_module

    monkeypatch.setattr(listener_module, "CONSUMER_RETRY", 0.5)
    flow = items_trigger_flow(make_database, cleanup_queues)
    execute(flow.canonical, "INSERT INTO items SELECT g, 0, NULL FROM generate_series(1, 5) g")
    first, second = Daemon(flow.config()), Daemon(flow.config())
    first.start()
    try:
        # the first holds every lock (the drain's and each target's) before the second starts
        wait_for(lambda: all(query(t, "SELECT count(*) FROM items") == [(5,)] for t in flow.targets),
                 timeout=20, message="the first daemon applies the first rows")
        second.start()
        target = "%s_target1" % flow.name
        # the target and the drain are two threads: each names its wait in its own time
        wait_for(lambda: "another golconded consumes" in (
            thread_stats(second)[target]["last_error"] or "")
            and "another process drains" in (thread_stats(second)[flow.name]["last_error"] or ""),
            timeout=20, message="the second daemon's target and drain wait")
        # a designed wait (a standby), not a standing problem as a pause is
        assert thread_stats(second)[target]["problems"] == []
        # the holder is named, to be told from a killed daemon's session left behind (review KK)
        waiting = thread_stats(second)[target]["last_error"]
        assert re.search(r"\(held by session pid (\d+), application_name 'golconde \S+ %s', \w+;"
                         r" SELECT pg_terminate_backend\(\1\) ends it if its daemon is gone\)"
                         % re.escape(target), waiting), waiting
        drain = thread_stats(second)[flow.name]["last_error"] or ""
        assert drain.startswith("another process drains destination %s (held by session pid "
                                % flow.name), drain
        db = psycopg2.connect(flow.canonical)
        db.autocommit = True
        with db.cursor() as cur:
            for i in range(1500):
                cur.execute("UPDATE items SET n = n + 1 WHERE id = %s", (i % 5 + 1,))
        half = query(flow.canonical, "SELECT id, n FROM items ORDER BY id")
        wait_for(lambda: all(query(t, "SELECT id, n FROM items ORDER BY id") == half
                             for t in flow.targets), timeout=40, message="targets equal")
        applied = {name: s["applied"] for name, s in thread_stats(second).items() if s["applied"]}
        assert not applied, "the second daemon applied packets: %r" % applied
        assert first.stop()
        with db.cursor() as cur:
            for i in range(500):
                cur.execute("UPDATE items SET n = n + 1 WHERE id = %s", (i % 5 + 1,))
        db.close()
        final = query(flow.canonical, "SELECT id, n FROM items ORDER BY id")
        assert final == [(i, 400) for i in range(1, 6)]
        wait_for(lambda: all(query(t, "SELECT id, n FROM items ORDER BY id") == final
                             for t in flow.targets), timeout=40, message="the second took over")
        assert all(s["dead_lettered"] == 0 for s in thread_stats(second).values())
    finally:
        first.stop()
        assert second.stop()


def test_a_listener_ends_its_own_stale_session_that_still_holds_its_lock(flow, monkeypatch):
    """A session of this very listener that the server has not seen die (a network cut) still
    holds the queue's lock: it is terminated and the listener goes on, where another daemon's
    session is waited for."""
    from golconde import ledger
    from golconde import listener as listener_module

    monkeypatch.setattr(listener_module, "session_token", lambda: "stale123")
    target = "%s_target1" % flow.name
    queue = flow.mapping["Destinations"][flow.name]["Targets"]["target1"]["queue"]
    stale = psycopg2.connect(flow.t1, application_name=("golconde stale123 %s" % target)[:63])
    stale.autocommit = True
    assert ledger.acquire_consumer_lock(stale, queue)
    try:
        with running(flow.config()) as daemon:
            stream = Stream(flow.queue, 100, batch=25, pause=0.0)
            stream.start()
            stream.finish()
            flow.wait_complete(stream, describe=lambda: thread_stats(daemon))
            assert "another golconded" not in (thread_stats(daemon)[target]["last_error"] or "")
        with pytest.raises(psycopg2.Error):
            with stale.cursor() as cur:
                cur.execute("SELECT 1")
    finally:
        stale.close()


def test_a_listener_failing_again_and_again_fails_the_health_check_until_it_gets_through(
        make_database, monkeypatch):
    """A listener whose every attempt fails (here: its database does not exist yet) reports the
    standing problem "failing" after FAILING_AFTER attempts in a row, so /health fails on more
    than a connection state; the first cycle that gets through clears it."""
    from golconde import listener as listener_module

    from ..conftest import dsn_for, drop_database

    monkeypatch.setattr(listener_module.Listener, "backoff_cap", 0.5)
    canonical = make_database()
    late = dsn_for("golconde_test_late_" + uuid.uuid4().hex[:10])
    execute(canonical, "CREATE TABLE items (id integer PRIMARY KEY, n integer)")
    config = parse_config(make_config(canonical, {"t1": late}, "items"))
    name = config.destinations[0].targets[0].thread_name
    daemon = Daemon(config)
    daemon.start()
    try:
        wait_for(lambda: any("failed attempts in a row" in p for p in thread_stats(daemon)[name]["problems"]),
                 timeout=30, message="the failing problem")
        problem = thread_stats(daemon)[name]["problems"][0]
        assert "does not exist" in problem, problem
        healthy, document = health(daemon.registry.snapshot(), 10000, 300.0)
        assert not healthy and any("failed attempts in a row" in r for r in document["reasons"])
        conn = psycopg2.connect(canonical)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE %s" % psycopg2.extensions.parse_dsn(late)["dbname"])
        conn.close()
        try:
            execute(late, "CREATE TABLE items (id integer PRIMARY KEY, n integer)")
            wait_for(lambda: thread_stats(daemon)[name]["problems"] == []
                     and thread_stats(daemon)[name]["database"] == "connected",
                     timeout=30, message="the problem cleared once connected")
            assert health(daemon.registry.snapshot(), 10000, 300.0)[0]
        finally:
            assert daemon.stop()
            drop_database(late)
    finally:
        daemon.stop()


def test_daemon_sessions_notice_a_silent_network_within_a_minute(flow, database):
    """The daemon's database sessions carry TCP keepalives (30 s idle, 10 s apart, 3 probes) and
    a 60 s TCP user timeout unless their DSN sets them, so a network cut mid-batch ends the
    session within about a minute instead of the kernel's two hours; the DSN's own values win."""
    import os
    import socket

    from golconde import listener as listener_module

    def options(conn):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
        finally:
            sock.close()

    with running(flow.config()) as daemon:
        target = daemon.listeners["%s_target1" % flow.name]
        wait_for(lambda: target.db is not None and not target.db.closed, timeout=20,
                 message="the target's session")
        assert options(target.db) == (True, 30, 10, 3, 60000)
    own = listener_module.connect(database + " keepalives_idle=7 tcp_user_timeout=5000", "t")
    try:
        assert options(own) == (True, 7, 10, 3, 5000)
        with own.cursor() as cur:
            cur.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == ("t",)
    finally:
        own.close()


def test_a_drain_ends_its_own_stale_session_that_still_holds_the_drain_lock(make_database,
                                                                              cleanup_queues,
                                                                              monkeypatch):
    """The trigger drain's own earlier session, cut and not yet seen dead by the server, still
    holds the drain lock: it is terminated and the drain goes on, where it had waited (and
    warned at every poll) until TCP gave up, hours later."""
    from golconde import listener as listener_module

    monkeypatch.setattr(listener_module, "session_token", lambda: "stale456")
    flow = items_trigger_flow(make_database, cleanup_queues)
    stale = psycopg2.connect(flow.canonical, application_name=("golconde stale456 %s" % flow.name)[:63])
    stale.autocommit = True
    assert trigger.acquire_drain_lock(stale, flow.name)
    try:
        execute(flow.canonical, "INSERT INTO items SELECT g, g, NULL FROM generate_series(1, 50) g")
        with running(flow.config()) as daemon:
            rows = query(flow.canonical, "SELECT id, n FROM items ORDER BY id")
            wait_for(lambda: all(query(t, "SELECT id, n FROM items ORDER BY id") == rows
                                 for t in flow.targets), timeout=30, message="drained past the stale lock")
            assert "another process" not in (thread_stats(daemon)[flow.name]["last_error"] or "")
        with pytest.raises(psycopg2.Error):
            with stale.cursor() as cur:
                cur.execute("SELECT 1")
    finally:
        stale.close()


def test_an_idle_in_transaction_timeout_is_named(make_database, caplog):
    """A role or database with ``idle_in_transaction_session_timeout`` may end golconded's
    sessions while a batch waits between retries; PostgreSQL says so only in its own log, so
    golconded warned of nothing and reported "server closed the connection unexpectedly" (review
    KK). It now warns at each connection, and names the setting when a session is lost."""
    import logging
    from golconde import listener as listener_module
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE public.items (id integer PRIMARY KEY, name text)")
    dbname = re.search(r"dbname=(\S+)", t1).group(1)
    execute(t1, "ALTER DATABASE %s SET idle_in_transaction_session_timeout = '1500ms'" % dbname)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.items"))
    destination = config.destinations[0]
    caplog.set_level(logging.WARNING, logger="golconde.listener")
    daemon = Daemon(config)
    daemon.start()
    host, port = stomp_address()
    try:
        target = daemon.registry.get(destination.targets[0].thread_name)
        wait_for(lambda: target.snapshot()["database"] == "connected", message="t1 connected")
        warnings = [r.getMessage() for r in caplog.records if "idle_in_transaction_session_timeout" in r.getMessage()]
        assert any(m.startswith("[%s] the session's idle_in_transaction_session_timeout is 1500ms"
                                % destination.targets[0].thread_name) for m in warnings), warnings
        assert not any(m.startswith("[%s] " % destination.name) for m in warnings)
        # a session the timeout ended is named so: a transaction left open for 3 s
        listener = daemon.listeners[destination.targets[0].thread_name]
        with Client(destination.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE) as client:
            client.add({"id": 1, "name": "a"})
            wait_for(lambda: query(t1, "SELECT count(*) FROM items") == [(1,)], message="applied")
            original = listener_module.QueueConsumer.cycle

            def slow_cycle(self):
                if self is listener and not getattr(self, "_slowed", False):
                    self._slowed = True
                    with self.db.cursor() as cur:
                        cur.execute("SELECT 1")         # opens a transaction, left idle
                    time.sleep(3)
                return original(self)
            listener_module.QueueConsumer.cycle = slow_cycle
            try:
                client.add({"id": 2, "name": "b"})
                wait_for(lambda: "may have ended it" in (target.snapshot()["last_error"] or ""),
                         timeout=30, message="the lost session named")
            finally:
                listener_module.QueueConsumer.cycle = original
            assert "idle_in_transaction_session_timeout, 1500ms, may have ended it" in target.snapshot()["last_error"]
            wait_for(lambda: query(t1, "SELECT count(*) FROM items") == [(2,)], message="applied after")
    finally:
        assert daemon.stop()
