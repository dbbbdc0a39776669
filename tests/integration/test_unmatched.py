"""The ``unmatched`` counter: packets applied without changing a row, per listener, in ``/stats``
and ``/metrics`` (``golconde_unmatched_total``), through a real daemon, real PostgreSQL databases
and a real broker (each of ``GOLCONDE_TEST_BROKERS``).

At a target, an update or delete that matches no row means the target lacks a row the canonical
relation holds: it diverged (a row deleted by hand, a dead-lettered add). Before the counter, such
packets were counted ``applied`` like any other, and the later changes of that key vanished without
a trace.
"""
from __future__ import annotations

import pytest

from golconde.client import Client
from golconde.daemon import Daemon
from golconde.metrics import prometheus_registry, render

from .flow_support import execute, make_config, parse_config, query, wait_for, wait_for_value

TABLE = "CREATE TABLE public.items (id int PRIMARY KEY, v text)"
#: t1 refuses one value, so that a batch holding it is applied there packet by packet
T1_CHECK = "ALTER TABLE items ADD CONSTRAINT t1_v CHECK (v IS DISTINCT FROM 'refused at t1')"
ROWS = "SELECT id, v FROM items ORDER BY id"


#: t3, a mapped target (another column name), counts as an unmapped one
T3_TABLE = "CREATE TABLE public.items (id int PRIMARY KEY, val text)"
T3_ROWS = "SELECT id, val FROM items ORDER BY id"


@pytest.fixture
def flow(make_database, broker):
    canonical, t1, t2, t3 = make_database(), make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, TABLE)
    execute(t1, T1_CHECK)
    execute(t3, T3_TABLE)
    mapping = make_config(canonical, {"t1": t1, "t2": t2, "t3": t3}, "public.items", broker=broker)
    next(iter(mapping["Destinations"].values()))["Targets"]["t3"]["columns"] = {"v": "val"}
    config = parse_config(mapping)
    daemon = Daemon(config)
    daemon.start()
    dest = config.destinations[0]
    client = Client(dest.queue, broker.host, broker.port, broker.login, broker.passcode)
    state = {"canonical": canonical, "t1": t1, "t2": t2, "t3": t3, "daemon": daemon, "client": client,
             "names": {"destination": dest.name}}
    assert [t.name for t in dest.targets] == ["t1", "t2", "t3"]
    yield state
    client.close()
    assert daemon.stop(), "daemon did not stop in time"


def counters(state):
    """{role: (applied, unmatched)} of the destination and the targets."""
    threads = {}
    for entry in state["daemon"].registry.snapshot()["threads"]:
        threads.update(entry)
    out = {}
    for role, suffix in (("destination", ""), ("t1", "_t1"), ("t2", "_t2"), ("t3", "_t3")):
        stats = threads[state["names"]["destination"] + suffix]
        out[role] = (stats["applied"], stats["unmatched"])
    return out


def settled(state, expected, rows, message):
    """Wait until ``rows()`` holds and the counters are ``expected`` (a listener counts just after
    its commit: rows may be seen first); on a timeout, the counters' difference."""
    wait_for_value(lambda: counters(state), expected, message=message, also=rows)


def test_changes_of_a_row_a_target_lacks_are_counted_unmatched_there(flow):
    client = flow["client"]
    client.send_many([{"action": "add", "data": {"id": i, "v": "a"}} for i in (1, 2, 3)])
    settled(flow, {"destination": (3, 0), "t1": (3, 0), "t2": (3, 0), "t3": (3, 0)},
            lambda: all(query(flow[db], ROWS) == [(1, "a"), (2, "a"), (3, "a")] for db in ("t1", "t2"))
            and query(flow["t3"], T3_ROWS) == [(1, "a"), (2, "a"), (3, "a")], "rows distributed")

    for target in ("t1", "t3"):      # t1 and t3 diverge
        execute(flow[target], "DELETE FROM items WHERE id = 2")
    client.send_many([{"action": "update", "data": {"v": "b"}, "restriction": {"id": 2}},
                      {"action": "update", "data": {"v": "b"}, "restriction": {"id": 3}},
                      {"action": "delete", "restriction": {"id": 2}}])
    # the canonical relation and t2 had the row: matched; t1 and t3 lacked it: 2 packets unmatched
    settled(flow, {"destination": (6, 0), "t1": (6, 2), "t2": (6, 0), "t3": (6, 2)},
            lambda: all(query(flow[db], ROWS) == [(1, "a"), (3, "b")] for db in ("t1", "t2"))
            and query(flow["t3"], T3_ROWS) == [(1, "a"), (3, "b")], "changes distributed")

    # a batch t1 applies packet by packet (one of its packets fails there): still counted
    execute(flow["t1"], "DELETE FROM items WHERE id = 3")
    client.send_many([{"action": "update", "data": {"v": "c"}, "restriction": {"id": 3}},
                      {"action": "set", "data": {"id": 1, "v": "refused at t1"}}])
    settled(flow, {"destination": (8, 0), "t1": (7, 3), "t2": (8, 0), "t3": (8, 2)},
            lambda: query(flow["t2"], ROWS) == [(1, "refused at t1"), (3, "c")]
            and query(flow["t3"], T3_ROWS) == [(1, "refused at t1"), (3, "c")], "mixed batch distributed")
    assert query(flow["t1"], ROWS) == [(1, "a")]     # the refused set was dead-lettered at t1


def test_a_change_the_canonical_relation_does_not_match_is_counted_at_the_destination(flow):
    client = flow["client"]
    client.send_many([{"action": "add", "data": {"id": 1, "v": "a"}}])
    wait_for(lambda: counters(flow)["t2"][0] == 1, message="add distributed")
    with client.group() as group:         # one member matches, the other does not
        group.update({"v": "g"}, restriction={"id": 1})
        group.delete({"id": 99})
    client.send({"action": "delete", "restriction": {"id": 98}})
    client.send({"action": "update", "data": {"v": "x"}, "restriction": {"id": 1}})
    # the destination fans out only what changed a row: the targets match everything they get
    settled(flow, {"destination": (4, 2), "t1": (3, 0), "t2": (3, 0), "t3": (3, 0)},
            lambda: query(flow["t1"], ROWS) == [(1, "x")] and query(flow["t2"], ROWS) == [(1, "x")],
            "changes distributed")
    text = render(prometheus_registry(flow["daemon"].registry))[0].decode()
    line = [row for row in text.splitlines()
            if row.startswith("golconde_unmatched_total{") and 'role="destination"' in row]
    assert len(line) == 1 and line[0].endswith(" 2.0"), line
