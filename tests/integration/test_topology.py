"""Configurations beyond one destination and its targets, on RabbitMQ: a trigger-mode destination
that nothing captures for, chains (a target writing a table another destination captures) and
cycles (a change that would come back to the destination that sent it)."""
from __future__ import annotations

import time

import psycopg2
import pytest

from golconde import destination as destination_module
from golconde import target as target_module
from golconde import trigger
from golconde.daemon import Daemon
from golconde.metrics import health

from .flow_support import execute, make_config, parse_config, query, send_raw, wait_for

TABLE = "CREATE TABLE public.u (id integer PRIMARY KEY, v text)"


def _install(dsn: str, destination: str, table: str = "public.u") -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        trigger.install(conn, table, destination)
    finally:
        conn.close()


def _merge(*mappings):
    merged = mappings[0]
    for mapping in mappings[1:]:
        merged["Destinations"].update(mapping["Destinations"])
    return parse_config(merged)


def test_a_trigger_destination_without_a_capture_trigger_that_fires_is_a_standing_problem(
        make_database, monkeypatch):
    """Renamed in the configuration, never installed, or its trigger disabled: nothing is
    captured for the destination. Reported (in /stats, failing /health) until a trigger fires."""
    monkeypatch.setattr(destination_module, "KEY_CHECK_INTERVAL", 0.2)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, TABLE)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.u", mode="trigger",
                                      poll_interval=0.2))
    name = config.destinations[0].name
    _install(canonical, "Other" + name)         # the capture schema, a trigger of another name
    daemon = Daemon(config)
    daemon.start()
    stats = daemon.registry.get(config.destinations[0].thread_name)
    try:
        wait_for(lambda: stats.snapshot()["problems"], timeout=20, message="the problem")
        assert stats.snapshot()["problems"] == [
            "no capture trigger of destination %s in its canonical database: nothing written"
            " there is captured for it (run 'golconde trigger install --destination %s')"
            % (name, name)]
        ok, document = health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)
        assert not ok and any("no capture trigger of destination" in r for r in document["reasons"])
        _install(canonical, name)
        wait_for(lambda: not stats.snapshot()["problems"], timeout=20, message="cleared")
        quoted = '"%s"' % trigger.trigger_name(name)

        def disable(table):
            """Disable the destination's trigger on ``table``: that table is reported."""
            execute(canonical, "ALTER TABLE %s DISABLE TRIGGER %s" % (table, quoted))
            wait_for(lambda: stats.snapshot()["problems"], timeout=20,
                     message="%s's trigger reported" % table)
            assert stats.snapshot()["problems"] == [
                "capture trigger %s on %s is disabled: its changes are not captured (ALTER TABLE"
                " %s ENABLE TRIGGER %s)" % (trigger.trigger_name(name), table, table, quoted)]

        disable("public.u")
        # fires for replicated changes only: a canonical database fed by logical replication
        execute(canonical, "ALTER TABLE public.u ENABLE REPLICA TRIGGER %s" % quoted)
        wait_for(lambda: not stats.snapshot()["problems"], timeout=20, message="cleared again")
        execute(canonical, "ALTER TABLE public.u ENABLE TRIGGER %s" % quoted)
        # one table's trigger disabled while another table's fires: that table is reported
        execute(canonical, "CREATE TABLE public.w (id integer PRIMARY KEY)")
        _install(canonical, name, "public.w")
        disable("public.w")
        execute(canonical, "DROP TRIGGER %s ON public.w" % quoted)
        wait_for(lambda: not stats.snapshot()["problems"], timeout=20, message="cleared")
        # a trigger of another name calling golconde.capture() for the destination counts
        execute(canonical, "ALTER TABLE public.u DISABLE TRIGGER %s" % quoted)
        execute(canonical, "CREATE TRIGGER by_hand AFTER INSERT ON public.w FOR EACH ROW"
                           " EXECUTE FUNCTION golconde.capture('%s')" % name)
        wait_for(lambda: len(stats.snapshot()["problems"]) == 1
                 and "on public.u is disabled" in stats.snapshot()["problems"][0], timeout=20,
                 message="u's reported, w's by_hand counted")
        execute(canonical, "DROP TRIGGER by_hand ON public.w")
        execute(canonical, "ALTER TABLE public.u ENABLE TRIGGER %s" % quoted)
        wait_for(lambda: not stats.snapshot()["problems"], timeout=20, message="cleared at last")
        execute(canonical, "INSERT INTO public.u VALUES (1, 'a')")
        wait_for(lambda: query(t1, "SELECT v FROM public.u") == [("a",)], message="distributed")
    finally:
        assert daemon.stop()


def test_a_target_writing_its_own_destinations_captured_table_waits(make_database, monkeypatch):
    """A trigger-mode destination whose target is its canonical table under another spelling
    of the DSN (which the configuration check cannot tell): every change it applied would be
    captured again. The target pauses, naming the cycle, and nothing goes round."""
    monkeypatch.setattr(target_module, "FEED_CHECK_INTERVAL", 0.5)
    canonical = make_database()
    execute(canonical, TABLE)
    config = parse_config(make_config(canonical, {"self": canonical + " application_name=other"},
                                      "public.u", mode="trigger", poll_interval=0.2))
    destination = config.destinations[0]
    _install(canonical, destination.name)
    daemon = Daemon(config)
    daemon.start()
    target = daemon.registry.get(destination.targets[0].thread_name)
    drain = daemon.registry.get(destination.thread_name)
    try:
        wait_for(lambda: "a cycle" in (target.snapshot()["last_error"] or ""), timeout=20,
                 message="the target paused")
        assert ("writes public.u, whose capture trigger of destination %s sends what it applies"
                " on again: a cycle (%s -> %s)" % (destination.name, destination.name,
                                                   destination.name)
                in target.snapshot()["last_error"])
        execute(canonical, "INSERT INTO public.u VALUES (1, 'a')")
        execute(canonical, "BEGIN; UPDATE public.u SET v = 'b'; UPDATE public.u SET v = 'c'; COMMIT")
        wait_for(lambda: drain.snapshot()["received"] == 3, message="the changes drained")
        time.sleep(2)                   # several checks of the target: still waiting
        assert drain.snapshot()["received"] == 3 and target.snapshot()["applied"] == 0
        assert not health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)[0]
    finally:
        assert daemon.stop()


@pytest.fixture
def two_ways(make_database):
    """Destination E1 captures a.u and writes b.u; destination E2 captures b.u: ``(a, b, c,
    mappings)``, E2's target to be chosen by the test."""
    a, b, c = make_database(), make_database(), make_database()
    for dsn in (a, b, c):
        execute(dsn, TABLE)
    return a, b, c


def test_a_chain_of_destinations_distributes_and_a_cycle_pauses_until_broken(two_ways,
                                                                             monkeypatch):
    """E1 (a.u -> b.u) and E2 (b.u -> c.u): a chain, a change goes a -> b -> c. E2's target moved
    to a.u closes a cycle: the targets wait, naming it, and nothing goes round; once E2's
    trigger is dropped, E1's target goes on."""
    monkeypatch.setattr(target_module, "FEED_CHECK_INTERVAL", 0.5)
    a, b, c = two_ways
    first = make_config(a, {"x": b}, "public.u", mode="trigger", poll_interval=0.2)
    e1 = next(iter(first["Destinations"]))
    second = make_config(b, {"x": c}, "public.u", mode="trigger", poll_interval=0.2)
    e2 = next(iter(second["Destinations"]))
    _install(a, e1)
    _install(b, e2)
    daemon = Daemon(_merge(first, second))
    daemon.start()
    try:
        execute(a, "INSERT INTO public.u VALUES (1, 'a')")
        wait_for(lambda: query(c, "SELECT v FROM public.u") == [("a",)], message="a -> b -> c")
        for name in ("%s_x" % e1, "%s_x" % e2):
            assert daemon.registry.get(name).snapshot()["last_error"] is None
    finally:
        assert daemon.stop()

    second["Destinations"][e2]["Targets"]["x"]["pgsql"] = a
    daemon = Daemon(_merge(first, second))
    daemon.start()
    targets = [daemon.registry.get("%s_x" % e1), daemon.registry.get("%s_x" % e2)]
    try:
        wait_for(lambda: all("a cycle" in (t.snapshot()["last_error"] or "") for t in targets),
                 timeout=20, message="both targets waiting")
        errors = " ".join(t.snapshot()["last_error"] for t in targets)
        assert "(%s -> %s -> %s)" % (e1, e2, e1) in errors or "(%s -> %s -> %s)" % (e2, e1, e2) in errors
        execute(a, "UPDATE public.u SET v = 'b'")
        execute(b, "UPDATE public.u SET v = 'z'")
        time.sleep(2)
        assert all(t.snapshot()["applied"] == 0 for t in targets)
        assert query(a, "SELECT v FROM public.u") == [("b",)]
        execute(b, 'DROP TRIGGER "%s" ON public.u' % trigger.trigger_name(e2))
        # (counted just after its commit)
        wait_for(lambda: query(b, "SELECT v FROM public.u") == [("b",)]
                 and targets[0].snapshot()["applied"] == 1, timeout=20,
                 message="E1's target going on")
    finally:
        assert daemon.stop()


def test_the_same_destination_name_in_two_configurations_is_a_chain(two_ways, monkeypatch):
    """Two tiers, each its own configuration (here two daemons of one process), both naming
    their destination Users: tier 1 captures a.u and writes b.u, tier 2 captures b.u and writes
    c.u. The capture trigger on b.u is tier 2's Users, not tier 1's (it drains another
    database): a chain, not a cycle."""
    monkeypatch.setattr(target_module, "FEED_CHECK_INTERVAL", 0.5)
    a, b, c = two_ways
    tiers = [make_config(source, {"x": sink}, "public.u", mode="trigger", poll_interval=0.2,
                         name="Users") for source, sink in ((a, b), (b, c))]
    for label, mapping in zip(("one", "two"), tiers):    # queues of their own
        destination = mapping["Destinations"]["Users"]
        destination["queue"] += "." + label
        destination["Targets"]["x"]["queue"] += "." + label
    _install(a, "Users")
    _install(b, "Users")
    daemons = [Daemon(parse_config(mapping)) for mapping in tiers]
    for daemon in daemons:
        daemon.start()
    try:
        execute(a, "INSERT INTO public.u VALUES (1, 'a')")
        wait_for(lambda: query(c, "SELECT v FROM public.u") == [("a",)], message="a -> b -> c")
        time.sleep(1.5)                 # checks of the targets after both drains connected
        execute(a, "UPDATE public.u SET v = 'b'")
        wait_for(lambda: query(c, "SELECT v FROM public.u") == [("b",)], message="again")
        for daemon in daemons:
            assert daemon.registry.get("Users_x").snapshot()["last_error"] is None
    finally:
        for daemon in daemons:
            assert daemon.stop()


def test_a_capture_trigger_on_a_partition_of_the_target_table_is_seen(make_database):
    """A target writing a partitioned table whose partition carries a capture trigger feeds
    that trigger's destination (rows routed there are captured)."""
    dsn = make_database()
    execute(dsn, "CREATE TABLE public.p (id integer PRIMARY KEY, v text) PARTITION BY RANGE (id);"
                 " CREATE TABLE public.p_1 PARTITION OF public.p FOR VALUES FROM (0) TO (100);"
                 " CREATE TABLE public.p_2 PARTITION OF public.p FOR VALUES FROM (100) TO (200)")
    _install(dsn, "E2", "public.p_1")
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            assert trigger.capturing_destinations(cur, "public.p") == ["E2"]
            assert trigger.capturing_destinations(cur, "public.p_2") == []
            assert trigger.capturing_destinations(cur, "public.missing") == []
    finally:
        conn.close()


def test_a_paused_target_shows_no_lag(make_database, monkeypatch):
    """A target paused (its table dropped) holds nothing: its lag is 0, not that of the last
    batch it applied, which stayed for the whole pause (review KK: a flat, non-zero lag while
    the packets waited on the broker); its problem names the pause."""
    from golconde.handlers import autosql
    monkeypatch.setattr(autosql, "RELATION_RETRY", 60.0)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, TABLE)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.u"))
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    target = daemon.registry.get(destination.targets[0].thread_name)
    try:
        old = "%.3f" % (time.time() - 100)          # made 100 s ago: a lag of 100 s at the target
        send_raw(destination.queue, ['{"action": "add", "data": {"id": 1, "v": "a"}}'],
                 [{"golconde-created-at": old}])
        wait_for(lambda: query(t1, "SELECT v FROM public.u") == [("a",)], message="applied at t1")
        assert target.snapshot()["lag"] >= 100
        # what a reader of /stats sees the moment the problem appears (CI once read the lag of
        # the last batch there: the problem was set before the pause's lag)
        at_problem = []
        set_problem = target.set_problem

        def watched(kind, text):
            if kind == "paused" and text:
                at_problem.append((target.snapshot()["lag"], target.snapshot()["backlog"]))
            set_problem(kind, text)
        monkeypatch.setattr(target, "set_problem", watched)
        execute(t1, "DROP TABLE public.u")
        send_raw(destination.queue, ['{"action": "add", "data": {"id": 2, "v": "b"}}'],
                 [{"golconde-created-at": old}])
        wait_for(lambda: any(p.startswith("paused: ") for p in target.snapshot()["problems"]),
                 timeout=20, message="the target paused")
        snapshot = target.snapshot()
        assert (snapshot["lag"], snapshot["backlog"]) == (0.0, 0), snapshot
        assert at_problem == [(0.0, 0)]
    finally:
        assert daemon.stop()
