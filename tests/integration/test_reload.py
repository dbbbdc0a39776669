"""SIGHUP against a real golconded subprocess while packets flow: a target added and then removed
without a restart and without loss, and broken configurations refused while the running one goes on.

(The full-size version, with 100,000-packet streams on both flows, is chaos/run.py's ``reload``
scenario.) Packets are ADDs into a keyless table, each with a unique payload, so that a double
apply shows as a duplicate row. Golconde has no initial copy: a target added by a reload receives
the packets its destination processes from then on, and nothing from before.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest
import yaml

from golconde.client import Client
from golconde.compare import compare
from golconde.handlers.autosql import AutoSQL

from ..conftest import STOMP_LOGIN, STOMP_PASSCODE, stomp_address
from .flow_support import DaemonProcess, drain_queue, execute, make_config, query, wait_for, write_config
from .test_faults import amqp_name, delete_queues, queue_depths

TABLE = "public.ev"
EVENTS = "CREATE TABLE public.ev (payload text NOT NULL, n integer NOT NULL)"  # keyless on purpose


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stream(threading.Thread):
    """Sends ADD packets ``payload = <prefix>-<index>`` for indexes [start, stop), ``batch`` per
    confirmation, ``pause`` seconds between batches. With ``stop=None`` it sends until :meth:`end`,
    so that a test whose steps take long on a slow host still has packets flowing through all of
    them; :attr:`sent` is then the end of the range."""

    def __init__(self, queue: str, prefix: str, start: int, stop: Optional[int], batch: int = 20,
                 pause: float = 0.03) -> None:
        super().__init__(name="reload-stream", daemon=True)
        self.queue, self.prefix, self.start_at, self.stop_at = queue, prefix, start, stop
        self.batch, self.pause = batch, pause
        self.sent = start
        self.error: Optional[BaseException] = None
        self._halt = threading.Event()

    def run(self) -> None:
        host, port = stomp_address()
        client = Client(self.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE, timeout=20)
        try:
            while not self._halt.is_set() and (self.stop_at is None or self.sent < self.stop_at):
                upto = self.sent + self.batch
                if self.stop_at is not None:
                    upto = min(self.stop_at, upto)
                with client.batch():
                    for index in range(self.sent, upto):
                        client.add({"payload": payload(self.prefix, index), "n": index})
                self.sent = upto
                self._halt.wait(self.pause)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            client.close()

    def halt(self, timeout: float = 60.0) -> None:
        """Stops the stream after its current batch and waits for it, asserting nothing."""
        self._halt.set()
        self.join(timeout)

    def end(self, timeout: float = 60.0) -> int:
        """Stops the stream after its current batch; returns the packets sent."""
        self.halt(timeout)
        self.finish(0)
        return self.sent

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "stream did not finish (%d sent)" % self.sent
        assert self.error is None, "stream failed after %d packets: %r" % (self.sent, self.error)


def payload(prefix: str, index: int) -> str:
    return "%s-%05d" % (prefix, index)


def payloads(dsn: str) -> List[str]:
    return [row[0] for row in query(dsn, "SELECT payload FROM ev ORDER BY payload")]


def counts(dsn: str) -> tuple:
    """(rows, distinct payloads)."""
    return tuple(query(dsn, "SELECT count(*), count(DISTINCT payload) FROM ev")[0])


class Golconded:
    """golconded as a subprocess on a YAML file we rewrite, with its HTTP server on a free port."""

    def __init__(self, mapping: Dict[str, Any], tmp_path: Any) -> None:
        self.mapping = mapping
        self.name = next(iter(mapping["Destinations"]))
        self.port = mapping["HTTPServer"]["port"]
        self.path = write_config(str(tmp_path / "golconde.yaml"), mapping)
        self.process = DaemonProcess(self.path, str(tmp_path / "golconded.log")).start()

    @property
    def destination(self) -> Dict[str, Any]:
        return self.mapping["Destinations"][self.name]

    def write(self, text: Optional[str] = None) -> None:
        """Replace the file atomically (the mapping's YAML, or ``text``)."""
        with open(self.path + ".tmp", "w") as handle:
            handle.write(yaml.safe_dump(self.mapping) if text is None else text)
        os.replace(self.path + ".tmp", self.path)

    def log(self) -> str:
        return self.process.log()

    def sighup(self, marker: str) -> str:
        """SIGHUP, then wait for one more log line containing ``marker``; returns that line."""
        seen = self.log().count(marker)
        self.process.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.log().count(marker) > seen, timeout=30, message=repr(marker))
        return [line for line in self.log().splitlines() if marker in line][-1]

    def stats(self) -> Dict[str, Dict[str, Any]]:
        with urllib.request.urlopen("http://127.0.0.1:%d/stats" % self.port, timeout=5) as reply:
            body = json.loads(reply.read().decode("utf-8"))
        threads: Dict[str, Dict[str, Any]] = {}
        for entry in body["threads"]:
            threads.update(entry)
        return threads

    def connected(self, names: List[str]) -> bool:
        try:
            stats = self.stats()
        except OSError:
            return False
        return all(name in stats and stats[name]["broker"] == "connected"
                   and stats[name]["database"] == "connected" for name in names)

    def stop(self) -> None:
        proc = self.process.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                proc.kill()
                proc.wait(10)


@pytest.fixture
def golconded(make_database, tmp_path):
    """A canonical database and target1 (table ``ev``), golconded running on them; yields the
    :class:`Golconded`. Its queues (and target2's, should a test add it) are deleted at the end."""
    canonical, target1 = make_database(), make_database()
    for dsn in (canonical, target1):
        execute(dsn, EVENTS)
    mapping = make_config(canonical, {"target1": target1}, TABLE, http_port=free_port())
    mapping["Logging"] = {"level": "info"}
    daemon = Golconded(mapping, tmp_path)
    base = amqp_name(daemon.destination["queue"])
    try:
        wait_for(lambda: daemon.connected([daemon.name, daemon.name + "_target1"]), timeout=30,
                 message="golconded connected")
        yield daemon
    finally:
        daemon.stop()
        names = [base, base + ".target1", base + ".target2"]
        delete_queues(names + [name + ".dlq" for name in names])


def test_sighup_adds_then_removes_a_target_without_restart_or_loss(golconded, make_database):
    daemon = golconded
    pid = daemon.process.proc.pid
    canonical = daemon.destination["pgsql"]
    target1 = daemon.destination["Targets"]["target1"]["pgsql"]
    queue = daemon.destination["queue"]
    prefix = uuid.uuid4().hex[:6]
    first = Stream(queue, prefix, 0, 300)
    first.start()
    first.finish()
    wait_for(lambda: counts(target1)[1] == 300, timeout=30, message="first packets at target1")

    # add target2 while packets flow
    target2 = make_database()
    execute(target2, EVENTS)
    daemon.destination["Targets"]["target2"] = {
        "stomp": daemon.destination["stomp"], "queue": queue + ".target2", "pgsql": target2,
        "target": TABLE}
    second = Stream(queue, prefix, 300, 700, pause=0.15)   # still flowing when the reload lands
    second.start()
    wait_for(lambda: second.sent >= 400, timeout=30, message="second stream flowing")
    daemon.write()
    line = daemon.sighup("configuration reloaded")
    reloaded_at = second.sent               # everything sent from here on must reach target2
    # the destination (its targets changed) restarted, target2 started, target1 kept running
    assert "1 listeners stopped, 2 started" in line, line
    assert daemon.log().count("[%s_target1] target listener starting" % daemon.name) == 1
    second.finish()
    assert reloaded_at < 700, "the reload came after the stream"
    wait_for(lambda: daemon.connected([daemon.name + "_target2"]), timeout=30, message="target2 up")
    wait_for(lambda: counts(target1)[1] == 700 and set(payload(prefix, i) for i in range(
        reloaded_at, 700)) <= set(payloads(target2)), timeout=40, message="packets at target2")
    at_target2 = payloads(target2)
    assert len(at_target2) == len(set(at_target2)), "a packet applied twice at target2"
    assert set(at_target2) <= {payload(prefix, i) for i in range(700)}
    assert payload(prefix, 0) not in at_target2     # no back-fill: Golconde has no initial copy

    # remove target2: the others go on, target2 gets nothing more
    wait_for(lambda: queue_depths().get(amqp_name(queue) + ".target2", 0) == 0, timeout=30,
             message="target2's queue drained")
    del daemon.destination["Targets"]["target2"]
    daemon.write()
    line = daemon.sighup("configuration reloaded")
    assert "2 listeners stopped, 1 started" in line, line    # target2 and the destination; the latter
    third = Stream(queue, prefix, 700, 1000)
    third.start()
    third.finish()
    wait_for(lambda: counts(target1)[1] == 1000, timeout=40, message="all packets at target1")
    assert sorted(payloads(target2)) == sorted(at_target2)
    assert queue_depths().get(amqp_name(queue) + ".target2", 0) == 0
    assert set(daemon.stats()) == {daemon.name, daemon.name + "_target1"}

    everything = [payload(prefix, i) for i in range(1000)]
    for dsn in (canonical, target1):
        assert payloads(dsn) == everything         # each packet exactly once
    assert compare(canonical, TABLE, target1, TABLE).equal
    assert daemon.process.proc.pid == pid and daemon.process.proc.poll() is None
    depths = queue_depths()
    assert not any(depths.get(amqp_name(q) + ".dlq") for q in (queue, queue + ".target1"))


def test_sighup_with_a_bad_configuration_keeps_the_running_one(golconded):
    daemon = golconded
    pid = daemon.process.proc.pid
    canonical = daemon.destination["pgsql"]
    target1 = daemon.destination["Targets"]["target1"]["pgsql"]
    queue = daemon.destination["queue"]
    good = yaml.safe_dump(daemon.mapping)
    threads = {daemon.name, daemon.name + "_target1"}
    prefix = uuid.uuid4().hex[:6]
    stream = Stream(queue, prefix, 0, None, pause=0.05)    # flows until every bad reload is done
    stream.start()
    wrong_key = yaml.safe_load(good)
    wrong_key["Destinations"][daemon.name]["stomp"] = "localhost"
    wrong_handler = yaml.safe_load(good)
    wrong_handler["Destinations"][daemon.name]["Targets"]["target1"]["function_name"] = \
        "golconde.no_such_module.Handler"
    broken = [
        ("YAML syntax error", good + "\n  : [unclosed\n"),
        ("stomp: expected host:port, got 'localhost'", yaml.safe_dump(wrong_key)),
        ("golconde.no_such_module", yaml.safe_dump(wrong_handler)),
        # a number no float holds, YAML nested deeper than the interpreter recurses: these ended
        # the daemon (OverflowError, RecursionError) before they were errors of the file
        ("ledger_retention: expected a number of seconds", good + "Defaults: {ledger_retention: %s}\n"
         % ("9" * 400)),
        ("nested too deeply", good + "Locations: %s%s\n" % ("[" * 5000, "]" * 5000)),
    ]
    try:
        for expected, text in broken:
            before = counts(target1)[0]
            daemon.write(text)
            line = daemon.sighup("reload refused")
            assert expected in line, line
            assert set(daemon.stats()) == threads            # /stats still answers, same threads
            assert daemon.connected(sorted(threads))
            # packets still flow with the old configuration
            wait_for(lambda: counts(target1)[0] > before + 20 or not stream.is_alive(), timeout=20,
                     message="packets flowing after a refused reload")
            assert stream.is_alive(), "the stream ended during a reload: %r" % stream.error
        total = stream.end()
    finally:
        stream.halt()
    wait_for(lambda: counts(target1)[0] >= total, timeout=40, message="all packets at target1")
    everything = [payload(prefix, i) for i in range(total)]
    for dsn in (canonical, target1):
        assert payloads(dsn) == everything
    # the good file again: nothing to restart
    daemon.write(good)
    line = daemon.sighup("configuration reloaded")
    assert "0 listeners stopped, 0 started" in line, line
    assert daemon.process.proc.pid == pid and daemon.process.proc.poll() is None
    assert "did not stop" not in daemon.log()


def test_a_reload_giving_a_thread_name_another_role_and_a_new_logging_section(make_database, tmp_path):
    """In process: target t1 of D goes and a client-mode destination named D_t1 (t1's thread
    name) comes: the reload stops the one and starts the other with its own counters, instead of
    failing half-way with both stopped. A changed Logging section is handed to the daemon's
    logging set-up."""
    from golconde.config import load
    from golconde.daemon import Daemon

    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, "CREATE TABLE items (id integer PRIMARY KEY, v text)")
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.items")
    name = next(iter(mapping["Destinations"]))
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path)
    logging_sections: List[Any] = []
    daemon.on_logging_change = logging_sections.append
    daemon.start()
    try:
        wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
                 message="listeners connected")
        assert daemon.registry.get(name + "_t1").role == "target"
        other = make_config(t1, {"u1": t2}, "public.items", name=name + "_t1")
        del mapping["Destinations"][name]["Targets"]["t1"]
        mapping["Destinations"].update(other["Destinations"])
        mapping["Logging"] = {"level": "debug"}
        write_config(path, mapping)
        assert daemon.reload()
        assert sorted(daemon.listeners) == sorted([name, name + "_t2", name + "_t1", name + "_t1_u1"])
        assert all(listener.is_alive() for listener in daemon.listeners.values())
        stats = daemon.registry.get(name + "_t1")
        assert (stats.role, stats.destination) == ("destination", name + "_t1")
        assert [str(section.get("level")).lower() for section in logging_sections] == ["debug"]
        wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
                 message="listeners connected after the reload")
    finally:
        assert daemon.stop()


def _stick(daemon: Any, locker: Any, queue: str, thread: str, count: int) -> None:
    """Once every listener is connected, lock table ``items`` through ``locker`` (a connection to
    the target of listener ``thread``), send ``count`` adds to ``queue`` and wait until that
    listener shows a backlog: stuck on the lock."""
    wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
             message="listeners connected")
    with locker.cursor() as cur:
        cur.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    host, port = stomp_address()
    with Client(queue, host, port, STOMP_LOGIN, STOMP_PASSCODE) as client:
        client.send_many([{"action": "add", "data": {"id": i, "v": "x"}} for i in range(count)])
    wait_for(lambda: (daemon.registry.get(thread).snapshot()["backlog"] or 0) > 0,
             message="%s stuck on the lock" % thread)


def test_a_reload_waits_for_a_stuck_listener_before_starting_its_replacement(make_database, tmp_path,
                                                                          caplog):
    """Target t1 is stuck on a locked table when a reload changes it: the reload does not start a
    second consumer of t1's queue beside it; once the lock goes and the old listener has stopped,
    its replacement starts, and the statistics show it connected (the old one's end no longer
    marks them stopped)."""
    import psycopg2

    from golconde.config import load
    from golconde.daemon import Daemon
    from golconde.metrics import health

    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, "CREATE TABLE items (id integer PRIMARY KEY, v text)")
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.items")
    name = next(iter(mapping["Destinations"]))
    thread = name + "_t1"
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path, stop_timeout=1.0)
    daemon.start()
    locker = psycopg2.connect(t1)
    try:
        _stick(daemon, locker, mapping["Destinations"][name]["queue"], thread, 200)
        wait_for(lambda: query(t2, "SELECT count(*) FROM items")[0][0] == 200, message="t2 applied")
        stuck = daemon.listeners[thread]
        mapping["Destinations"][name]["Targets"]["t1"]["batch_size"] = 100
        write_config(path, mapping)
        assert daemon.reload()
        assert daemon.listeners[thread] is stuck and stuck.is_alive()
        assert sum(1 for t in threading.enumerate() if t.name == thread) == 1
        time.sleep(1.0)
        assert daemon.listeners[thread] is stuck      # still waiting for it
        # back to the first configuration: the stuck one, told to stop, is not kept for it
        del mapping["Destinations"][name]["Targets"]["t1"]["batch_size"]
        write_config(path, mapping)
        assert daemon.reload()
        assert daemon.listeners[thread] is stuck and stuck.stopping
        mapping["Destinations"][name]["Targets"]["t1"]["batch_size"] = 100
        write_config(path, mapping)
        assert daemon.reload()
        # more reloads while it is stuck (logrotate's SIGHUPs): one thread waits for it, and a
        # reload does not wait stop_timeout for it again (review soak: a thread, a built listener
        # and a 5 s wait more each time)
        for _ in range(3):
            with caplog.at_level(logging.WARNING, logger="golconde.daemon"):
                caplog.clear()
                assert daemon.reload()
            assert "%s] still stopping" % thread in caplog.text, caplog.text
            assert "did not stop within" not in caplog.text, caplog.text
        assert [t.name for t in threading.enumerate() if t.name.startswith("golconde-replace-")] == [
            "golconde-replace-%s" % thread]
        locker.rollback()
        wait_for(lambda: daemon.listeners[thread] is not stuck, timeout=30,
                 message="the replacement started")
        assert not stuck.is_alive() and daemon.listeners[thread].config.batch_size == 100
        assert daemon.listeners[thread].is_alive()
        assert sum(1 for t in threading.enumerate() if t.name == thread) == 1
        wait_for(lambda: query(t1, "SELECT count(*) FROM items")[0][0] == 200, message="t1 applied")
        wait_for(lambda: daemon.registry.get(thread).snapshot()["database"] == "connected",
                 timeout=20, message="t1 reported connected")
        time.sleep(0.5)
        snapshot = daemon.registry.get(thread).snapshot()
        assert (snapshot["broker"], snapshot["database"]) == ("connected", "connected")
        assert health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)[0]
        assert compare(canonical, "public.items", t1, "public.items").equal
    finally:
        locker.close()
        assert daemon.stop()


class Counting(AutoSQL):
    """AutoSQL counting its instances and their shutdowns (a handler holding resources)."""

    made: List[Any] = []
    shut: List[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Counting.made.append(self)

    def shutdown(self) -> None:
        Counting.shut.append(self)
        super().shutdown()


def test_a_reload_keeps_a_stuck_listeners_live_figures_and_shuts_down_the_handlers_it_built(
        make_database, tmp_path):
    """A reload that keeps a listener stuck on a lock still shows its backlog and lag (the
    listener built to compare the configuration took over its live figures: backlog 0, and
    /health passed); the handlers a reload builds without starting them are shut down."""
    import psycopg2

    from golconde.config import load
    from golconde.daemon import Daemon

    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE items (id integer PRIMARY KEY, v text)")
    mapping = make_config(canonical, {"t1": t1}, "public.items")
    name = next(iter(mapping["Destinations"]))
    mapping["Destinations"][name]["Targets"]["t1"]["function_name"] = __name__ + ".Counting"
    thread = name + "_t1"
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    Counting.made.clear()
    Counting.shut.clear()
    daemon = Daemon(load(path), config_path=path, stop_timeout=1.0)
    daemon.start()
    locker = psycopg2.connect(t1)
    try:
        _stick(daemon, locker, mapping["Destinations"][name]["queue"], thread, 50)
        running = daemon.listeners[thread]
        assert len(Counting.made) == 1 and Counting.shut == []
        for level in ("DEBUG", "INFO", "DEBUG"):
            mapping["Logging"] = dict(mapping.get("Logging") or {}, level=level)
            write_config(path, mapping)
            assert daemon.reload()
        assert daemon.listeners[thread] is running
        time.sleep(0.5)
        snapshot = daemon.registry.get(thread).snapshot()
        assert snapshot["backlog"] >= 50 and snapshot["lag"] > 0, snapshot
        # one handler running, the three the reloads built to compare shut down
        assert len(Counting.made) == 4
        assert Counting.shut == Counting.made[1:]
        locker.rollback()
        wait_for(lambda: query(t1, "SELECT count(*) FROM items")[0][0] == 50, message="t1 applied")
    finally:
        locker.close()
        assert daemon.stop()
    assert Counting.shut[-1] is Counting.made[0]


def test_a_reload_to_a_taken_http_port_keeps_the_stats_server(tmp_path):
    """The reloaded HTTPServer.port is taken: the stats server stays where it was (monitoring
    keeps its answers) instead of none serving; a free port is taken up, the old one let go."""
    from golconde.config import load
    from golconde.daemon import Daemon

    first, taken, third = free_port(), socket.socket(), free_port()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    mapping = make_config("dbname=unused", {"t1": "dbname=unused_t1"}, "public.items")
    mapping["HTTPServer"].update(enabled=True, port=first)
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path)
    daemon._start_http()            # the stats server only: no listener is needed here

    def answers(port: int) -> bool:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        assert answers(first)
        mapping["HTTPServer"]["port"] = taken.getsockname()[1]
        mapping["HTTPServer"]["health"] = {"max_backlog": 77}
        write_config(path, mapping)
        assert daemon.reload()
        assert answers(first)
        # where it stays, it serves the reloaded configuration and thresholds
        with urllib.request.urlopen("http://127.0.0.1:%d/config" % first, timeout=2) as response:
            served = json.loads(response.read())["HTTPServer"]
        assert served["health"]["max_backlog"] == 77
        assert served["port"] == first        # where it listens, not the port it could not take
        assert daemon.http.thresholds[0] == 77
        mapping["HTTPServer"]["port"] = third
        write_config(path, mapping)
        assert daemon.reload()
        assert answers(third) and not answers(first)
        mapping["HTTPServer"]["listen"] = "0.0.0.0"      # the same port, an overlapping address
        write_config(path, mapping)
        assert daemon.reload()
        assert answers(third) and daemon.http.host == "0.0.0.0"
    finally:
        taken.close()
        daemon.stop()


def test_a_reload_keeping_the_http_address_keeps_its_socket(tmp_path):
    """A reload that leaves HTTPServer's address as it was serves the new /config and health
    thresholds from the same socket: the server is not stopped and started again, so a monitor
    polling /health meanwhile is never refused."""
    from golconde.config import load
    from golconde.daemon import Daemon

    port = free_port()
    mapping = make_config("dbname=unused", {"t1": "dbname=unused_t1"}, "public.items")
    mapping["HTTPServer"].update(enabled=True, port=port)
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path)
    daemon._start_http()
    refused = []
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2).close()
            except urllib.error.HTTPError:
                pass                 # 503: answered
            except OSError as exc:
                refused.append(exc)
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        server = daemon.http
        target = next(iter(mapping["Destinations"].values()))["Targets"]["t1"]
        for n in range(5):
            target["prefetch"] = 100 + n
            mapping["HTTPServer"]["health"] = {"max_backlog": 1000 + n}
            write_config(path, mapping)
            assert daemon.reload()
        assert daemon.http is server
        with urllib.request.urlopen("http://127.0.0.1:%d/config" % port, timeout=2) as response:
            shown = json.loads(response.read())
        assert next(iter(shown["Destinations"].values()))["Targets"]["t1"]["prefetch"] == 104
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2)
        except urllib.error.HTTPError as exc:
            document = json.loads(exc.read())
        else:
            raise AssertionError("no listener runs: /health fails")
        assert document["thresholds"]["max_backlog"] == 1004
    finally:
        polling.set()
        poller.join()
        daemon.stop()
    assert refused == []


ITEMS = "CREATE TABLE items (id integer PRIMARY KEY, n integer)"
#: items whose every insert sleeps 0.15 s: a batch of 10 takes 1.5 s, longer than the
#: PREVIOUS_QUEUE_IDLE the tests below set
SLOW_ITEMS = (ITEMS + "; CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS"
              " $$BEGIN PERFORM pg_sleep(0.15); RETURN NEW; END$$;"
              " CREATE TRIGGER slow BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow()")


def items_daemon(tmp_path: Any, canonical: str, t1: str, configure: Any = None) -> tuple:
    """A started in-process daemon of destination ``items`` (canonical -> t1) that reloads from
    its file, its destination's mapping first given to ``configure``: ``(daemon, mapping,
    destination's mapping, path)``; change the mapping and ``write_config(path, mapping)``
    before ``daemon.reload()``."""
    from golconde.daemon import Daemon

    from .flow_support import parse_config

    mapping = make_config(canonical, {"t1": t1}, "public.items")
    destination = next(iter(mapping["Destinations"].values()))
    if configure is not None:
        configure(destination)
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(parse_config(mapping), config_path=path)
    daemon.start()
    return daemon, mapping, destination, path


def quick_queue_changes(monkeypatch: Any) -> None:
    """A missing table pauses for 0.5 s; a reload's old queue is left after 1 s without packets."""
    from golconde import listener as listener_module
    from golconde.handlers import autosql

    monkeypatch.setattr(autosql, "RELATION_RETRY", 0.5)
    monkeypatch.setattr(listener_module, "PREVIOUS_QUEUE_IDLE", 1.0)


def test_a_reload_changing_a_targets_queue_consumes_the_old_queue_first(make_database, tmp_path,
                                                                        monkeypatch, caplog):
    """A reload that changes a target's queue: what waits on the old queue (here while the target
    is paused, its table missing) was left there for ever, /health ok (review CC). Its
    replacement now consumes the old queue until it stays empty, then the new one: the packets
    are applied, and in order (the updates sent after the reload find the rows added before)."""
    quick_queue_changes(monkeypatch)
    canonical, t1 = make_database(), make_database()
    execute(canonical, ITEMS)
    # batches of 10 taking 1.5 s each at t1 (SLOW_ITEMS): longer than PREVIOUS_QUEUE_IDLE, so
    # the old queue is not taken for empty while the broker waits for an ack (review FF)
    daemon, mapping, destination, path = items_daemon(
        tmp_path, canonical, t1, lambda d: d["Targets"]["t1"].update(batch_size=10, prefetch=10))
    old_queue = destination["Targets"]["t1"]["queue"]
    host, port = stomp_address()
    client = Client(destination["queue"], host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        client.send_many([{"action": "add", "data": {"id": i, "n": 0}} for i in range(50)])
        wait_for(lambda: query(canonical, "SELECT count(*) FROM items") == [(50,)],
                 message="canonical applied")
        destination["Targets"]["t1"]["queue"] = old_queue + ".v2"
        write_config(path, mapping)
        with caplog.at_level("WARNING"):
            assert daemon.reload()
        assert "its queue changed from %s to %s.v2" % (old_queue, old_queue) in caplog.text
        execute(t1, SLOW_ITEMS)
        client.send_many([{"action": "update", "data": {"n": 1}, "restriction": {"id": i}}
                          for i in range(10)])
        client.send_many([{"action": "add", "data": {"id": i, "n": 2}} for i in range(50, 60)])
        wait_for(lambda: compare(canonical, "items", t1, "items").equal, timeout=60,
                 message="t1 equal to the canonical table")
        assert query(t1, "SELECT count(*) FILTER (WHERE n = 1) FROM items") == [(10,)]
        wait_for(lambda: "is empty: going on to %s.v2" % old_queue in caplog.text, timeout=10,
                 message="t1 left the old queue")
        assert drain_queue(old_queue, wait=0.5) == []
    finally:
        client.close()
        assert daemon.stop()


def test_a_reload_changing_a_destinations_queue_waits_for_the_old_queue_across_slow_batches(
        make_database, tmp_path, monkeypatch, caplog):
    """The same for a client-mode destination, whose batches wait for their fan-out's receipts:
    with batches longer than PREVIOUS_QUEUE_IDLE, the time since the last delivery was already
    past it when the batch was acked (before the broker could send the next window), and the old
    queue was left with 30 packets on it, logged 'is empty' (review FF). The ack counts now."""
    quick_queue_changes(monkeypatch)
    canonical, t1 = make_database(), make_database()
    execute(t1, ITEMS)
    daemon, mapping, destination, path = items_daemon(
        tmp_path, canonical, t1, lambda d: d.update(batch_size=10, prefetch=10))
    old_queue = destination["queue"]
    host, port = stomp_address()
    old = Client(old_queue, host, port, STOMP_LOGIN, STOMP_PASSCODE, batch_messages=False)
    new = Client(old_queue + ".v2", host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        # the canonical table is missing: the destination pauses, the packets wait on its queue
        old.send_many([{"action": "add", "data": {"id": i, "n": 0}} for i in range(40)])
        destination["queue"] = old_queue + ".v2"
        write_config(path, mapping)
        assert daemon.reload()
        # 10 rows a batch, 1.5 s each at the canonical table (a trigger sleeps)
        execute(canonical, SLOW_ITEMS)
        new.send_many([{"action": "update", "data": {"n": 1}, "restriction": {"id": i}} for i in range(40)])
        wait_for(lambda: query(canonical, "SELECT count(*) FILTER (WHERE n = 1) FROM items") == [(40,)],
                 timeout=60, message="every packet of both queues applied, in order")
        wait_for(lambda: compare(canonical, "items", t1, "items").equal, timeout=30,
                 message="t1 equal to the canonical table")
        assert drain_queue(old_queue, wait=0.5) == []
    finally:
        old.close()
        new.close()
        assert daemon.stop()


def test_a_reload_away_from_a_queue_that_no_longer_exists_goes_on_to_the_new_one(
        make_database, tmp_path, monkeypatch, caplog):
    """The old queue an /amq/queue/ deleted since (RabbitMQ ends every subscription to it): the
    replacement resubscribed to it for ever, a few times a second, and never consumed its new
    queue (review FF). It gives the old queue up after PREVIOUS_QUEUE_TRIES subscriptions in a
    row without a packet."""
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ITEMS)
    queues = []

    def gone(destination):
        queues.append(destination["Targets"]["t1"]["queue"])
        destination["Targets"]["t1"]["queue"] = "/amq/queue/" + queues[0].split("/")[-1] + ".gone"

    daemon, mapping, destination, path = items_daemon(tmp_path, canonical, t1, gone)
    new_queue = queues[0]
    host, port = stomp_address()
    client = Client(destination["queue"], host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        destination["Targets"]["t1"]["queue"] = new_queue
        write_config(path, mapping)
        with caplog.at_level("WARNING"):
            assert daemon.reload()
            client.send_many([{"action": "add", "data": {"id": i, "n": 0}} for i in range(5)])
            wait_for(lambda: query(t1, "SELECT count(*) FROM items") == [(5,)], timeout=30,
                     message="t1 consumed its new queue")
        assert "cannot be consumed (3 subscriptions in a row ended without a packet" in caplog.text
    finally:
        client.close()
        assert daemon.stop()


def test_a_reload_renaming_a_target_and_its_queue_consumes_the_old_queue_first(
        make_database, tmp_path, monkeypatch, caplog):
    """A target renamed with its queue (t1 -> t1b, as the example names queues after targets) is
    the same target: the packets waiting on the old queue were left there, the renamed target
    never got them (review MM). Its replacement now consumes the old queue first."""
    quick_queue_changes(monkeypatch)
    canonical, t1 = make_database(), make_database()
    execute(canonical, ITEMS)
    daemon, mapping, destination, path = items_daemon(tmp_path, canonical, t1)
    old_queue = destination["Targets"]["t1"]["queue"]
    host, port = stomp_address()
    client = Client(destination["queue"], host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        # t1's table is missing: its packets wait on its queue
        client.send_many([{"action": "add", "data": {"id": i, "n": 0}} for i in range(20)])
        wait_for(lambda: query(canonical, "SELECT count(*) FROM items") == [(20,)],
                 message="canonical applied")
        renamed = dict(destination["Targets"].pop("t1"), queue=old_queue + "b")
        destination["Targets"]["t1b"] = renamed
        write_config(path, mapping)
        with caplog.at_level("WARNING"):
            assert daemon.reload()
        assert "takes the place of removed target" in caplog.text
        # its ledger rows stay under the old name, which no listener prunes any more: said
        assert ("the ledger rows of %s_t1 (golconde.applied) are no longer pruned"
                % next(iter(mapping["Destinations"]))) in caplog.text
        assert "its queue changed from %s to %sb" % (old_queue, old_queue) in caplog.text
        execute(t1, ITEMS)
        client.send_many([{"action": "update", "data": {"n": 1}, "restriction": {"id": i}}
                          for i in range(20)])
        # the updates applied to the canonical table first: before that, t1 holding the adds
        # alone is equal to it too
        wait_for(lambda: query(canonical, "SELECT count(*) FROM items WHERE n = 1") == [(20,)],
                 message="canonical updated")
        wait_for(lambda: compare(canonical, "items", t1, "items").equal, timeout=60,
                 message="t1 equal to the canonical table")
        assert query(t1, "SELECT count(*) FILTER (WHERE n = 1) FROM items") == [(20,)]
        wait_for(lambda: drain_queue(old_queue, wait=0.5) == [], timeout=20, message="old queue empty")
    finally:
        client.close()
        assert daemon.stop()


def test_a_consumer_holds_the_lock_of_the_queues_it_empties_after_a_reload(make_database):
    """A reload that changes a target's queue: its replacement emptied the old queue without
    holding that queue's consumer lock, so a standby daemon of the old configuration, waiting for
    it, took it and consumed the old queue side by side, out of order (review MM). A consumer now
    takes the lock of each queue of ``previous_queues`` with its own; one another session holds
    is left to that session; the lock of a queue it leaves is freed."""
    import psycopg2

    from golconde import ledger
    from golconde.daemon import build_listeners, discard_listeners
    from golconde.stats import Registry

    from .flow_support import parse_config

    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ITEMS)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.items"))
    target = config.destinations[0].targets[0]
    listeners = build_listeners(config, Registry(), [target.thread_name])
    listener = listeners[target.thread_name]
    old, taken = target.queue + ".old", target.queue + ".taken"
    listener.previous_queues = [old, taken]
    listener._subscribed = taken            # as if a database reconnect came while on it
    other = psycopg2.connect(t1)          # a standby's session, holding the second one's lock
    other.autocommit = True
    probe = psycopg2.connect(t1)
    try:
        assert ledger.acquire_consumer_lock(other, taken)
        listener.open_database()
        for queue in (target.queue, old):
            holder = ledger.lock_holder(probe, "consume:" + queue)
            assert "application_name %r" % listener.application_name in holder, (queue, holder)
        assert listener.previous_queues == [old]          # the taken one is left to its holder
        assert listener._subscribed is None                # and unsubscribed: open() goes on
        listener._leave_previous("is empty")
        assert ledger.lock_holder(probe, "consume:" + old) == ""
        assert listener.application_name in ledger.lock_holder(probe, "consume:" + target.queue)
    finally:
        listener.close()
        discard_listeners(listeners.values())
        other.close()
        probe.close()


def test_a_renamed_target_waits_for_its_stuck_predecessor(make_database, tmp_path, monkeypatch):
    """A target renamed with its queue while stuck on a lock: its replacement started beside it,
    found the old queue's lock held (by the stuck one) and left that queue for good: its packets
    stayed there (review NN). It now starts once its predecessor has stopped, and empties the
    old queue first."""
    import psycopg2

    from golconde.config import load
    from golconde.daemon import Daemon

    quick_queue_changes(monkeypatch)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE items (id integer PRIMARY KEY, v text)")
    mapping = make_config(canonical, {"t1": t1}, "public.items")
    name = next(iter(mapping["Destinations"]))
    destination = mapping["Destinations"][name]
    destination.update(batch_size=1, prefetch=1)      # one fan-out message per packet
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path, stop_timeout=1.0)
    daemon.start()
    locker = psycopg2.connect(t1)
    host, port = stomp_address()
    try:
        wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
                 message="listeners connected")
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        with Client(destination["queue"], host, port, STOMP_LOGIN, STOMP_PASSCODE,
                    batch_messages=False) as client:
            client.send_many([{"action": "add", "data": {"id": i, "v": "x"}} for i in range(60)])
        wait_for(lambda: query(canonical, "SELECT count(*) FROM items")[0][0] == 60,
                 message="canonical applied")
        old_queue = destination["Targets"]["t1"]["queue"]
        destination["Targets"]["t1b"] = dict(destination["Targets"].pop("t1"), queue=old_queue + "b")
        write_config(path, mapping)
        assert daemon.reload()
        time.sleep(2.0)
        # the predecessor's statistics went with its name: the replacement says why it waits
        problems = daemon.registry.get(name + "_t1b").snapshot()["problems"]
        assert problems == ["starts once %s_t1, the target it replaces, has stopped (stuck: its"
                            " packets wait)" % name], problems
        locker.rollback()
        wait_for(lambda: query(t1, "SELECT count(*) FROM items")[0][0] == 60, timeout=30,
                 message="every packet applied at t1")
        assert compare(canonical, "public.items", t1, "public.items").equal
        wait_for(lambda: drain_queue(old_queue, wait=0.5) == [], timeout=20, message="old queue empty")
        assert daemon.registry.get(name + "_t1b").snapshot()["problems"] == []
    finally:
        locker.close()
        assert daemon.stop()


def _one_target(make_database: Any) -> Tuple[Dict[str, Any], str, str]:
    """A configuration mapping of one destination on table items with one target t1, both
    databases new with the table: ``(mapping, destination name, target DSN)``."""
    canonical, target = make_database(), make_database()
    for dsn in (canonical, target):
        execute(dsn, "CREATE TABLE items (id integer PRIMARY KEY, v text)")
    mapping = make_config(canonical, {"t1": target}, "public.items")
    return mapping, next(iter(mapping["Destinations"])), target


def _flaky_handler(tmp_path: Any, monkeypatch: Any) -> str:
    """The name of a new module (on sys.path) whose handler ``Flaky``, an AutoSQL, fails to
    initialize from its ``FAIL_FROM[0]``-th build on (``BUILT[0]`` counts them)."""
    module = "golconde_flaky_%s" % uuid.uuid4().hex[:8]
    (tmp_path / (module + ".py")).write_text(
        "from golconde.handlers.autosql import AutoSQL\n"
        "BUILT = [0]\n"
        "FAIL_FROM = [None]\n"
        "class Flaky(AutoSQL):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        BUILT[0] += 1\n"
        "        if FAIL_FROM[0] is not None and BUILT[0] >= FAIL_FROM[0]:\n"
        "            raise RuntimeError('flaky handler, built %d times' % BUILT[0])\n"
        "        super().__init__(*args, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


def test_a_listener_that_cannot_be_built_again_in_a_reload_stays_listed_stopped(make_database, tmp_path,
                                                                                 monkeypatch, caplog):
    """A reload builds the new listeners twice: once to check the configuration, then those to
    start. A handler whose __init__ fails only the second time left the listeners it had stopped
    out of a half-done reload, the exception escaping reload(); now reload() returns False, names
    them, and they stay listed, stopped (/health fails), until a reload builds them. The change
    moved its queue too: what the destination fans out meanwhile goes to the new queue, which
    the next reload, moving it again, consumes first."""
    from golconde.config import load
    from golconde.daemon import Daemon
    from golconde.metrics import health

    module = _flaky_handler(tmp_path, monkeypatch)
    mapping, name, target = _one_target(make_database)
    thread = name + "_t1"
    first_queue = mapping["Destinations"][name]["Targets"]["t1"]["queue"]
    mapping["Destinations"][name]["Targets"]["t1"]["function_name"] = module + ".Flaky"
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path)
    daemon.start()
    try:
        wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
                 message="listeners connected")
        import sys
        flaky = sys.modules[module]
        flaky.FAIL_FROM[0] = flaky.BUILT[0] + 2     # the check's build passes, the start's fail
        mapping["Destinations"][name]["Targets"]["t1"].update(batch_size=100, queue=first_queue + "_b")
        write_config(path, mapping)
        assert daemon.reload() is False
        assert "[%s] could not be built again" % thread in caplog.text
        assert thread in daemon.listeners and not daemon.listeners[thread].is_alive()
        # the destination, restarted by the same change, is built and runs
        wait_for(lambda: daemon.listeners[name].ready(), timeout=30, message="destination connected")
        assert daemon.listeners[name].config.targets[0].batch_size == 100
        assert health(daemon.registry.snapshot(), 10**9, 10**9)[0] is False
        host, port = stomp_address()
        with Client(mapping["Destinations"][name]["queue"], host, port, STOMP_LOGIN, STOMP_PASSCODE) as client:
            client.send({"action": "add", "data": {"id": 1, "v": "fanned out to the new queue"}})
        wait_for(lambda: daemon.registry.get(name).snapshot()["fanned_out"] == 1, timeout=30,
                 message="fanned out")
        flaky.FAIL_FROM[0] = None
        mapping["Destinations"][name]["Targets"]["t1"]["queue"] = first_queue + "_c"
        write_config(path, mapping)
        assert daemon.reload()                      # builds fine now: started
        assert daemon.listeners[thread].is_alive() and daemon.listeners[thread].config.batch_size == 100
        wait_for(lambda: query(target, "SELECT v FROM items") == [("fanned out to the new queue",)],
                 timeout=30, message="the queue it was moved to first consumed")
        wait_for(lambda: health(daemon.registry.snapshot(), 10**9, 10**9)[0], timeout=30, message="healthy again")
    finally:
        assert daemon.stop()
        for queue in (first_queue, first_queue + "_b", first_queue + "_c"):
            drain_queue(queue, wait=0.2)


def test_a_renamed_target_that_cannot_be_built_keeps_its_queues_for_the_next_reload(
        make_database, tmp_path, monkeypatch):
    """A reload renames target t1 (and its queue) to t2, whose handler fails when built to start:
    t1's queue may still hold packets, and the destination now fans out to t2's queue. Both are
    kept in mind (t2's check build stands in, never started, /health failing), so the next reload,
    which renames it to t3, consumes both first; they were dropped, their packets left there."""
    import sys

    from golconde.config import load
    from golconde.daemon import Daemon
    from golconde.metrics import health

    module = _flaky_handler(tmp_path, monkeypatch)
    mapping, name, target = _one_target(make_database)
    destination = mapping["Destinations"][name]
    old_queue = destination["Targets"]["t1"]["queue"]
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    daemon = Daemon(load(path), config_path=path)
    daemon.start()
    host, port = stomp_address()
    try:
        wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
                 message="listeners connected")
        renamed = dict(destination["Targets"].pop("t1"))
        renamed.update(queue=old_queue + "_2", function_name=module + ".Flaky")
        destination["Targets"]["t2"] = renamed
        write_config(path, mapping)
        __import__(module)
        flaky = sys.modules[module]
        flaky.FAIL_FROM[0] = flaky.BUILT[0] + 2     # the check's build passes, the start's fail
        assert daemon.reload() is False
        assert name + "_t1" not in daemon.listeners
        assert not daemon.listeners[name + "_t2"].is_alive()
        assert any("the last reload could not build it" in problem for problem in
                   daemon.registry.get(name + "_t2").snapshot()["problems"])
        assert health(daemon.registry.snapshot(), 10**9, 10**9)[0] is False
        with Client(old_queue, host, port, STOMP_LOGIN, STOMP_PASSCODE) as client:
            client.send({"action": "add", "data": {"id": 1, "v": "left on t1's queue"}})
        wait_for(lambda: daemon.listeners[name].ready(), timeout=30, message="destination connected")
        with Client(destination["queue"], host, port, STOMP_LOGIN, STOMP_PASSCODE) as client:
            client.send({"action": "add", "data": {"id": 2, "v": "fanned out to t2's queue"}})
        flaky.FAIL_FROM[0] = None
        third = dict(destination["Targets"].pop("t2"))
        third.update(queue=old_queue + "_3")
        destination["Targets"]["t3"] = third
        write_config(path, mapping)
        assert daemon.reload()
        assert sorted(daemon.listeners) == sorted([name, name + "_t3"])
        wait_for(lambda: query(target, "SELECT id, v FROM items ORDER BY id") == [
            (1, "left on t1's queue"), (2, "fanned out to t2's queue")],
            timeout=30, message="t3 applied what waited on t1's and t2's queues")
        wait_for(lambda: health(daemon.registry.snapshot(), 10**9, 10**9)[0], timeout=30,
                 message="healthy again")
    finally:
        assert daemon.stop()
        for queue in (old_queue, old_queue + "_2", old_queue + "_3"):
            drain_queue(queue, wait=0.2)


def test_a_reload_removing_a_destination_names_its_ledger_rows(make_database, tmp_path, caplog):
    """A client-mode destination renamed (removed, another added) leaves its ledger rows in the
    canonical database under the old name, which no listener prunes any more: the reload names
    them and the command that deletes them, as for a removed target (review soak)."""
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ITEMS)
    daemon, mapping, destination, path = items_daemon(tmp_path, canonical, t1)
    old = next(iter(mapping["Destinations"]))
    try:
        mapping["Destinations"] = {old + "b": destination}
        write_config(path, mapping)
        with caplog.at_level("WARNING", logger="golconde.daemon"):
            assert daemon.reload()
        assert ("[%s] destination removed: its ledger rows in its canonical database are no longer"
                " pruned: golconde ledger prune --consumer %s" % (old, old)) in caplog.text
        assert sorted(daemon.listeners) == [old + "b", old + "b_t1"]
    finally:
        assert daemon.stop()
