"""Custom handlers through a real daemon, real PostgreSQL and RabbitMQ.

* The example legacy-schema handler (``golconde.handlers.examples.LegacyUsers``), client and
  trigger flows.
* Handlers with bugs or unusual fates: a Python error in ``apply`` (dead-lettered, the listener goes
  on), in ``setup`` (retried with backoff like a lost connection), in ``shutdown`` (logged), in
  ``__init__`` (a configuration error, also at reload), ``RetryPacket``, ``StopListener``, a
  missing relation found by ``setup`` (pause, then resume), and an ``apply_batch`` override.

The test handlers below are loaded by the daemon by their dotted path in this module.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any, Dict, List

import psycopg2
import pytest
import yaml

from golconde import trigger
from golconde.client import Client
from golconde.daemon import Daemon
from golconde.errors import ConfigError, RetryPacket, StopListener
from golconde.handlers import examples
from golconde.handlers.autosql import AutoSQL

from ..conftest import STOMP_LOGIN, STOMP_PASSCODE, stomp_address
from .flow_support import (drain_queue, execute, make_config, parse_config, query, send_raw, trigger_settings,
                           wait_for)

HERE = __name__

USERS = """
CREATE TABLE public.users (
    id        integer PRIMARY KEY,
    name      text,
    email     text,
    status_id integer,
    created   timestamptz DEFAULT now()
)
"""
LEGACY = """
CREATE TABLE public.legacy_user (user_id integer PRIMARY KEY, user_name text);
CREATE TABLE public.legacy_user_email (
    user_id integer PRIMARY KEY REFERENCES public.legacy_user ON DELETE RESTRICT,
    address text NOT NULL
);
"""
EVENTS = "CREATE TABLE public.events (id integer PRIMARY KEY, kind text)"


def client_for(destination, **options) -> Client:
    host, port = stomp_address()
    return Client(destination.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE, **options)


def thread_stats(daemon: Daemon, name: str) -> Dict[str, Any]:
    for entry in daemon.registry.snapshot()["threads"]:
        if name in entry:
            return entry[name]
    raise KeyError(name)


def legacy_rows(dsn: str):
    return (query(dsn, "SELECT user_id, user_name FROM legacy_user ORDER BY 1"),
            query(dsn, "SELECT user_id, address FROM legacy_user_email ORDER BY 1"))


# --- the example legacy handler ----------------------------------------------------------------------

def legacy_config(canonical: str, legacy: str, mode: str = "client") -> Any:
    mapping = make_config(canonical, {"legacy": legacy}, "public.users", mode=mode,
                          **trigger_settings(mode, poll_interval=0.5))
    destination = next(iter(mapping["Destinations"].values()))
    destination["Targets"]["legacy"].update(
        target="public.legacy_user", function_name="golconde.handlers.examples.LegacyUsers",
        settings={"email_table": "legacy_user_email"})
    return parse_config(mapping)


@pytest.fixture
def legacy_flow(make_database):
    canonical, legacy = make_database(), make_database()
    execute(canonical, USERS)
    execute(legacy, LEGACY)
    config = legacy_config(canonical, legacy)
    daemon = Daemon(config)
    daemon.start()
    destination = config.destinations[0]
    client = client_for(destination)
    yield {"canonical": canonical, "legacy": legacy, "daemon": daemon, "client": client,
           "destination": destination}
    client.close()
    assert daemon.stop(), "daemon did not stop in time"


def test_legacy_schema_client_flow(legacy_flow):
    client, legacy = legacy_flow["client"], legacy_flow["legacy"]
    client.add({"id": 1, "name": "Ann", "email": "ann@example.com", "status_id": 1})
    client.add({"id": 2, "name": "Bob", "email": None, "status_id": 2})
    client.set({"id": 3, "name": "Cid", "email": "cid@example.com", "status_id": 1})
    client.set({"id": 3, "name": "Cid 2", "email": "cid2@example.com"})            # upsert both
    expected = ([(1, "Ann"), (2, "Bob"), (3, "Cid 2")], [(1, "ann@example.com"), (3, "cid2@example.com")])
    wait_for(lambda: legacy_rows(legacy) == expected, message="adds and sets at the legacy target")

    # an update of the email only touches only the email table: legacy_user's row version is kept
    before = query(legacy, "SELECT xmin::text FROM legacy_user WHERE user_id = 1")[0][0]
    client.update({"email": "ann@new.example.com"}, restriction={"id": 1})
    client.update({"name": "Bobby", "email": "bob@example.com"}, restriction={"id": 2})
    client.update({"status_id": 7}, restriction={"id": 3})                       # nothing legacy
    client.update({"email": None}, restriction={"id": 3})                         # drops the email row
    wait_for(lambda: legacy_rows(legacy)[1] == [(1, "ann@new.example.com"), (2, "bob@example.com")],
             message="updates at the legacy target")
    assert query(legacy, "SELECT xmin::text FROM legacy_user WHERE user_id = 1")[0][0] == before
    assert legacy_rows(legacy)[0] == [(1, "Ann"), (2, "Bobby"), (3, "Cid 2")]

    # a changed key moves both rows; delete removes from both tables
    client.update({"id": 20}, restriction={"id": 2})
    client.delete({"id": 1})
    wait_for(lambda: legacy_rows(legacy) == ([(3, "Cid 2"), (20, "Bobby")], [(20, "bob@example.com")]),
             message="key change and delete at the legacy target")
    assert query(legacy_flow["canonical"], "SELECT id FROM users ORDER BY id") == [(3,), (20,)]


def test_legacy_handler_dead_letters_what_it_cannot_apply(legacy_flow):
    client, destination = legacy_flow["client"], legacy_flow["destination"]
    client.add({"id": 1, "name": "Ann", "email": "ann@example.com"})
    client.update({"status_id": 2}, restriction={"name": "Ann"})       # not by id: refused at the target
    client.add({"id": 2, "name": "Sentinel"})
    wait_for(lambda: len(legacy_rows(legacy_flow["legacy"])[0]) == 2, message="sentinel")
    target = destination.targets[0]
    dead = []
    wait_for(lambda: dead.extend(drain_queue(target.dead_letter_queue, wait=0.3)) or dead, timeout=20,
             message="dead letter at the legacy target")
    assert len(dead) == 1
    assert "update packets need the restriction {\"id\": <user id>}" in dead[0].headers["golconde-reason"]
    assert query(legacy_flow["canonical"], "SELECT status_id FROM users WHERE id = 1") == [(2,)]


def test_legacy_schema_trigger_flow(make_database):
    canonical, legacy = make_database(), make_database()
    execute(canonical, USERS)
    execute(legacy, LEGACY)
    config = legacy_config(canonical, legacy, mode="trigger")
    conn = psycopg2.connect(canonical)
    trigger.install(conn, "public.users", config.destinations[0].name)
    conn.commit()
    conn.close()
    daemon = Daemon(config)
    daemon.start()
    try:
        execute(canonical, "INSERT INTO users (id, name, email, status_id) VALUES"
                           " (1, 'Ann', 'ann@example.com', 1), (2, 'Bob', NULL, 1), (3, 'Cid', 'c@x', 2)")
        execute(canonical, "UPDATE users SET email = 'bob@example.com' WHERE id = 2")
        execute(canonical, "UPDATE users SET name = 'Ann B' WHERE id = 1")
        execute(canonical, "UPDATE users SET email = NULL WHERE id = 3")
        execute(canonical, "UPDATE users SET id = 30 WHERE id = 3")
        execute(canonical, "DELETE FROM users WHERE id = 1")
        expected = ([(2, "Bob"), (30, "Cid")], [(2, "bob@example.com")])
        wait_for(lambda: legacy_rows(legacy) == expected, message="legacy tables follow the triggers")
        assert query(canonical, "SELECT id, name, email FROM users ORDER BY id") == [
            (2, "Bob", "bob@example.com"), (30, "Cid", None)]
    finally:
        assert daemon.stop()


def test_missing_legacy_table_pauses_the_listener_until_it_exists(make_database, monkeypatch):
    monkeypatch.setattr(examples, "RELATION_RETRY", 1.0)
    canonical, legacy = make_database(), make_database()
    execute(canonical, USERS)
    execute(legacy, "CREATE TABLE public.legacy_user (user_id integer PRIMARY KEY, user_name text)")
    config = legacy_config(canonical, legacy)
    daemon = Daemon(config)
    daemon.start()
    try:
        client = client_for(config.destinations[0])
        client.add({"id": 1, "name": "Ann", "email": "ann@example.com"})
        name = config.destinations[0].targets[0].thread_name
        wait_for(lambda: "legacy_user_email does not exist" in (thread_stats(daemon, name).get("last_error") or ""),
                 timeout=20, message="the paused listener reports the missing table")
        assert legacy_rows_count(legacy) == 0
        execute(legacy, "CREATE TABLE public.legacy_user_email (user_id integer PRIMARY KEY, address text)")
        wait_for(lambda: query(legacy, "SELECT * FROM legacy_user_email") == [(1, "ann@example.com")],
                 timeout=30, message="the packet, kept in the queue, applied once the table exists")
        client.close()
    finally:
        assert daemon.stop()


def legacy_rows_count(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM legacy_user")[0][0]


# --- handlers with bugs and fates --------------------------------------------------------------------

class BuggyApply(AutoSQL):
    """A plain Python bug on some packets."""

    def apply(self, cursor, packet):
        if packet.data.get("kind") == "bug":
            return 1 / 0
        return super().apply(cursor, packet)


class FlakySetup(AutoSQL):
    """setup() fails with a Python error the first time, a SystemExit the second (per
    listener): the listener goes on (a SystemExit ended its thread)."""

    calls: Dict[str, int] = {}

    def setup(self, connection):
        FlakySetup.calls[self.name] = FlakySetup.calls.get(self.name, 0) + 1
        if FlakySetup.calls[self.name] == 1:
            raise RuntimeError("set-up attempt 1 failed")
        if FlakySetup.calls[self.name] == 2:
            raise SystemExit("set-up attempt 2 exits")
        super().setup(connection)


class RetryTwice(AutoSQL):
    """Asks for each packet of kind 'retry' to be retried twice before applying it."""

    attempts: Dict[Any, int] = {}

    def apply(self, cursor, packet):
        if packet.data.get("kind") == "retry":
            key = (self.name, packet.data.get("id"))
            RetryTwice.attempts[key] = RetryTwice.attempts.get(key, 0) + 1
            if RetryTwice.attempts[key] <= 2:
                raise RetryPacket("not yet (attempt %d)" % RetryTwice.attempts[key])
        return super().apply(cursor, packet)


class RecordingBatches(AutoSQL):
    """Overrides the batch hook: records the size of each call, then applies as AutoSQL."""

    sizes: Dict[str, List[int]] = {}

    def apply_batch(self, cursor, packets):
        RecordingBatches.sizes.setdefault(self.name, []).append(len(packets))
        return super().apply_batch(cursor, packets)


class FailingShutdown(AutoSQL):
    def shutdown(self):
        raise RuntimeError("shutdown bug")


class StopOnKind(AutoSQL):
    """Stops its listener for good on a packet of kind 'stop'."""

    def apply(self, cursor, packet):
        if packet.data.get("kind") == "stop":
            raise StopListener("%s: asked to stop" % self.name)
        return super().apply(cursor, packet)


class FailingInit(AutoSQL):
    def __init__(self, *args, **kwargs):
        raise KeyError("missing_setting")


class ExitingInit(AutoSQL):
    def __init__(self, *args, **kwargs):
        raise SystemExit(3)


def events_config(make_database, handlers: Dict[str, str]):
    canonical = make_database()
    execute(canonical, EVENTS)
    targets = {}
    for name in handlers:
        targets[name] = make_database()
        execute(targets[name], EVENTS)
    mapping = make_config(canonical, targets, "public.events")
    destination = next(iter(mapping["Destinations"].values()))
    for name, handler in handlers.items():
        destination["Targets"][name]["function_name"] = "%s.%s" % (HERE, handler)
    return mapping, canonical, targets


def test_handler_errors_never_stop_the_daemon(make_database):
    FlakySetup.calls.clear()
    RetryTwice.attempts.clear()
    RecordingBatches.sizes.clear()
    mapping, canonical, targets = events_config(make_database, {
        "bug": "BuggyApply", "flaky": "FlakySetup", "retry": "RetryTwice", "batch": "RecordingBatches",
        "shut": "FailingShutdown"})
    config = parse_config(mapping)
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    stopped = False
    try:
        kinds = ["ok", "bug", "retry", "ok", "bug", "ok"]
        bodies = ['{"action": "add", "data": {"id": %d, "kind": "%s"}}' % (i, kind)
                  for i, kind in enumerate(kinds, 1)]
        send_raw(destination.queue, bodies, [{"golconde-id": str(uuid.uuid4())} for _ in bodies])
        expected = [(i, kind) for i, kind in enumerate(kinds, 1)]
        wait_for(lambda: all(query(dsn, "SELECT count(*) FROM events")[0][0] == (4 if name == "bug" else 6)
                             for name, dsn in targets.items()), timeout=60,
                 message="every target applied what it could")
        for name, dsn in targets.items():
            rows = query(dsn, "SELECT id, kind FROM events ORDER BY id")
            assert rows == ([r for r in expected if r[1] != "bug"] if name == "bug" else expected), name
        by_name = {t.name: t for t in destination.targets}
        dead = []
        wait_for(lambda: dead.extend(drain_queue(by_name["bug"].dead_letter_queue, wait=0.3)) or len(dead) >= 2,
                 timeout=20, message="the bug's packets dead-lettered")
        assert len(dead) == 2
        assert all(d.headers["golconde-reason"] == "ZeroDivisionError: division by zero" for d in dead)
        # every listener is alive; set-up was retried; RetryPacket was retried; the hook was used
        assert all(listener.is_alive() for listener in daemon.listeners.values())
        assert FlakySetup.calls[by_name["flaky"].thread_name] >= 3
        assert thread_stats(daemon, by_name["flaky"].thread_name)["reconnects"] >= 2
        assert RetryTwice.attempts[(by_name["retry"].thread_name, 3)] == 3
        assert thread_stats(daemon, by_name["retry"].thread_name)["retried"] >= 2
        assert sum(RecordingBatches.sizes[by_name["batch"].thread_name]) >= 6
        # after all that, a new packet still flows everywhere
        client = client_for(destination)
        client.add({"id": 100, "kind": "after"})
        client.close()
        wait_for(lambda: all(query(dsn, "SELECT count(*) FROM events WHERE id = 100")[0][0] == 1
                             for dsn in targets.values()), message="a packet after the errors")
        assert daemon.stop(), "a failing shutdown() must not block the stop"
        stopped = True
    finally:
        if not stopped:
            daemon.stop()


def test_apply_batch_gets_the_whole_batch(make_database):
    RecordingBatches.sizes.clear()
    mapping, canonical, targets = events_config(make_database, {"batch": "RecordingBatches"})
    config = parse_config(mapping)
    destination = config.destinations[0]
    # queue the packets before the daemon starts, so that they arrive as one batch
    bodies = ['{"action": "add", "data": {"id": %d, "kind": "k"}}' % i for i in range(1, 51)]
    send_raw(destination.targets[0].queue, bodies, [{"golconde-id": str(uuid.uuid4())} for _ in bodies])
    daemon = Daemon(config)
    daemon.start()
    try:
        wait_for(lambda: query(targets["batch"], "SELECT count(*) FROM events")[0][0] == 50,
                 message="50 packets applied")
        sizes = RecordingBatches.sizes[destination.targets[0].thread_name]
        assert sum(sizes) == 50 and max(sizes) > 1, sizes
    finally:
        assert daemon.stop()


def test_stop_listener_stops_only_that_listener_and_keeps_the_packet(make_database):
    mapping, canonical, targets = events_config(make_database, {"stopper": "StopOnKind", "other": "RecordingBatches"})
    config = parse_config(mapping)
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    try:
        client = client_for(destination)
        client.add({"id": 1, "kind": "ok"})
        client.add({"id": 2, "kind": "stop"})
        client.add({"id": 3, "kind": "ok"})
        client.close()
        stopper = [t for t in destination.targets if t.name == "stopper"][0]
        wait_for(lambda: not daemon.listeners[stopper.thread_name].is_alive(), timeout=30,
                 message="the stopping listener ended")
        wait_for(lambda: query(targets["other"], "SELECT count(*) FROM events")[0][0] == 3,
                 message="the other target goes on")
        assert all(listener.is_alive() for name, listener in daemon.listeners.items()
                   if name != stopper.thread_name)
        stats = thread_stats(daemon, stopper.thread_name)
        assert "asked to stop" in stats["last_error"]
        # it holds nothing: no lag or backlog of the batch it applied before (review rv23)
        assert (stats["lag"], stats["backlog"]) == (0.0, 0), stats
        assert [p for p in stats["problems"] if p.startswith("stopped: ")], stats
        assert drain_queue(stopper.dead_letter_queue, wait=0.5) == []
        # the packet that stopped it (and the ones after) wait in the queue, not lost
        waiting = drain_queue(stopper.queue, wait=1.0)
        assert any(b'"stop"' in d.body for d in waiting), [d.body for d in waiting]
    finally:
        assert daemon.stop()


def test_handler_init_error_is_a_configuration_error_also_at_reload(make_database, tmp_path, monkeypatch):
    mapping, canonical, targets = events_config(make_database, {"t": "RecordingBatches"})
    bad = yaml.safe_load(yaml.safe_dump(mapping))
    next(iter(bad["Destinations"].values()))["Targets"]["t"]["function_name"] = HERE + ".FailingInit"
    with pytest.raises(ConfigError, match="handler %s.FailingInit failed to initialize: KeyError: 'missing_setting'"
                       % HERE.replace(".", r"\.")):
        Daemon(parse_config(bad))
    path = tmp_path / "golconde.yaml"
    path.write_text(yaml.safe_dump(mapping))
    daemon = Daemon(parse_config(mapping), config_path=str(path))
    daemon.start()
    try:
        path.write_text(yaml.safe_dump(bad))
        assert daemon.reload() is False               # refused; the running configuration is kept
        # a handler ending the process (sys.exit in its __init__, or when its module is
        # imported) is refused the same way: a reload runs on the main thread, where a
        # SystemExit ended the daemon without a word
        (tmp_path / "golconde_exiting_module.py").write_text(
            "import sys\nsys.exit('golconde_exiting_module: refusing to load')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        for handler, reason in ((HERE + ".ExitingInit", "failed to initialize: SystemExit: 3"),
                                ("golconde_exiting_module.H", "importing module golconde_exiting_module"
                                 " failed: SystemExit: golconde_exiting_module: refusing to load")):
            next(iter(bad["Destinations"].values()))["Targets"]["t"]["function_name"] = handler
            with pytest.raises(ConfigError, match=re.escape(reason)):
                Daemon(parse_config(bad))
            path.write_text(yaml.safe_dump(bad))
            assert daemon.reload() is False
        assert all(listener.is_alive() for listener in daemon.listeners.values())
        client = client_for(daemon.config.destinations[0])
        client.add({"id": 1, "kind": "after reload"})
        client.close()
        wait_for(lambda: query(targets["t"], "SELECT kind FROM events") == [("after reload",)],
                 message="still distributing")
    finally:
        assert daemon.stop()


class BrokenSetup(AutoSQL):
    def setup(self, connection):
        raise AttributeError("'NoneType' object has no attribute 'cursor'")


def test_a_setup_that_always_fails_is_retried_and_stops_in_time(make_database):
    mapping, canonical, targets = events_config(make_database, {"broken": "BrokenSetup", "fine": "RecordingBatches"})
    config = parse_config(mapping)
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    try:
        broken = [t for t in destination.targets if t.name == "broken"][0]
        client = client_for(destination)
        client.add({"id": 1, "kind": "k"})
        client.close()
        wait_for(lambda: query(targets["fine"], "SELECT count(*) FROM events")[0][0] == 1,
                 message="the other target applies")
        wait_for(lambda: thread_stats(daemon, broken.thread_name)["reconnects"] >= 2, timeout=20,
                 message="set-up retried")
        assert daemon.listeners[broken.thread_name].is_alive()
        assert "AttributeError" in thread_stats(daemon, broken.thread_name)["last_error"]
        assert query(targets["broken"], "SELECT count(*) FROM events")[0][0] == 0
    finally:
        assert daemon.stop(), "a listener retrying its set-up must stop in time"
    # the packet was never taken from the broken target's queue
    assert any(b'"id":1' in d.body.replace(b" ", b"") for d in drain_queue(broken.queue, wait=1.0))


def test_a_reload_runs_the_handler_code_changed_on_disk(make_database, tmp_path, monkeypatch):
    """SIGHUP re-imports a custom handler's module whose file changed, and restarts its
    listeners: the module stayed as first imported, so a class added to it was 'no attribute'
    at reload while --check found it, and edited code never ran (review CC)."""
    module = "golconde_reloaded_%s" % uuid.uuid4().hex[:8]
    source = tmp_path / ("%s.py" % module)
    version = ("from golconde.handlers.autosql import AutoSQL\n\n\n"
               "class A(AutoSQL):\n"
               "    def apply(self, cursor, packet):\n"
               "        return super().apply(cursor, packet.with_data(dict(packet.data, kind=%r)))\n")
    source.write_text(version % "v1")
    monkeypatch.syspath_prepend(str(tmp_path))
    mapping, canonical, targets = events_config(make_database, {"t": "RecordingBatches"})
    next(iter(mapping["Destinations"].values()))["Targets"]["t"]["function_name"] = module + ".A"
    path = tmp_path / "golconde.yaml"
    path.write_text(yaml.safe_dump(mapping))
    daemon = Daemon(parse_config(mapping), config_path=str(path))
    daemon.start()
    client = client_for(daemon.config.destinations[0])
    try:
        client.add({"id": 1, "kind": "sent"})
        wait_for(lambda: query(targets["t"], "SELECT kind FROM events WHERE id = 1") == [("v1",)],
                 message="applied by the first version")
        # the code edited, and a class added: both taken up by a reload
        source.write_text(version % "v2" + "\n\nclass B(A):\n    pass\n")
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 10 ** 9))   # whatever the clock
        assert daemon.reload()
        client.add({"id": 2, "kind": "sent"})
        wait_for(lambda: query(targets["t"], "SELECT kind FROM events WHERE id = 2") == [("v2",)],
                 message="applied by the edited code")
        next(iter(mapping["Destinations"].values()))["Targets"]["t"]["function_name"] = module + ".B"
        path.write_text(yaml.safe_dump(mapping))
        assert daemon.reload()
        # the code edited again, in a reload refused for another reason: the next accepted
        # reload still restarts its listeners (review FF: they kept the old code for good)
        source.write_text(version % "v3" + "\n\nclass B(A):\n    pass\n")
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 2 * 10 ** 9))
        target = next(iter(mapping["Destinations"].values()))["Targets"]["t"]
        target["settings"] = {"unknown_columns": "bogus"}
        path.write_text(yaml.safe_dump(mapping))
        assert daemon.reload() is False
        del target["settings"]
        path.write_text(yaml.safe_dump(mapping))
        assert daemon.reload()
        client.add({"id": 4, "kind": "sent"})
        wait_for(lambda: query(targets["t"], "SELECT kind FROM events WHERE id = 4") == [("v3",)],
                 message="applied by the code of the refused reload, once one is accepted")
        # a module that no longer imports: the reload is refused, the running code kept
        source.write_text("raise RuntimeError('broken on disk')\n")
        os.utime(source, ns=(time.time_ns(), time.time_ns() + 3 * 10 ** 9))
        assert daemon.reload() is False
        client.add({"id": 3, "kind": "sent"})
        wait_for(lambda: query(targets["t"], "SELECT kind FROM events WHERE id = 3") == [("v3",)],
                 message="still applied by the running code")
    finally:
        client.close()
        assert daemon.stop()
