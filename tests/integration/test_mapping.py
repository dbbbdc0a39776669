"""A target with another schema described in YAML (columns, exclude, constants, defaults, filter,
another relation name), through a real daemon, real PostgreSQL databases and RabbitMQ."""
from __future__ import annotations

import time
import uuid

import psycopg2
from psycopg2 import sql
import pytest

from golconde import destination as destination_module
from golconde import trigger
from golconde.client import Client
from golconde.compare import compare_config
from golconde.daemon import Daemon

from ..conftest import STOMP_LOGIN, STOMP_PASSCODE, stomp_address
from .flow_support import (drain_queue, execute, make_config, parse_config, query, send_raw, trigger_settings,
                           wait_for)

USERS = """
CREATE TABLE public.users (
    id            integer PRIMARY KEY,
    name          text,
    email         text,
    password_hash text,
    status_id     integer,
    source        text,
    created       timestamptz DEFAULT now()
)
"""
# the target: another schema, table and column names, a column of its own, its own defaults
CUSTOMER = """
CREATE SCHEMA crm;
CREATE TABLE crm.customer (
    customer_id   integer PRIMARY KEY,
    full_name     text,
    email         text,
    password_hash text,
    status_id     integer,
    source        text NOT NULL,
    created       timestamptz NOT NULL DEFAULT '2000-01-01 00:00:00+00'
)
"""
MAPPING = {
    "target": "crm.customer",
    "columns": {"id": "customer_id", "name": "full_name"},
    "exclude": ["password_hash"],
    "constants": {"source": "canonical"},
    "defaults": ["created"],
    "filter": {"status_id": {"in": [1, 2]}},
}
#: what crm.customer must hold, computed from the canonical table
PROJECTION = ("SELECT id, name, email, status_id FROM users WHERE status_id IN (1, 2) ORDER BY id")
TARGET_ROWS = "SELECT customer_id, full_name, email, status_id FROM crm.customer ORDER BY customer_id"


def mapped_config(canonical: str, crm: str, copy: str, mode: str):
    mapping = make_config(canonical, {"crm": crm, "copy": copy}, "public.users", mode=mode,
                          **trigger_settings(mode, poll_interval=0.5))
    destination = next(iter(mapping["Destinations"].values()))
    destination["Targets"]["crm"].update(MAPPING)
    return parse_config(mapping)


@pytest.fixture
def databases(make_database):
    canonical, crm, copy = make_database(), make_database(), make_database()
    execute(canonical, USERS)
    execute(copy, USERS)
    execute(crm, CUSTOMER)
    return canonical, crm, copy


def start(config) -> Daemon:
    daemon = Daemon(config)
    daemon.start()
    return daemon


def test_client_flow_mapping(databases):
    canonical, crm, copy = databases
    config = mapped_config(canonical, crm, copy, "client")
    destination = config.destinations[0]
    daemon = start(config)
    host, port = stomp_address()
    client = Client(destination.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        client.add({"id": 1, "name": "Ann", "email": "a@x", "password_hash": "secret1", "status_id": 1,
                    "created": "2026-01-01T00:00:00+00:00"})
        client.add({"id": 2, "name": "Bob", "email": "b@x", "password_hash": "secret2", "status_id": 3})
        client.set({"id": 3, "name": "Cid", "email": "c@x", "status_id": 2, "source": "from the packet"})
        client.add({"id": 4, "name": "Dee", "status_id": 1})
        wait_for(lambda: query(crm, TARGET_ROWS) == [(1, "Ann", "a@x", 1), (3, "Cid", "c@x", 2), (4, "Dee", None, 1)],
                 message="adds and sets mapped at crm")
        rows = query(crm, "SELECT customer_id, password_hash, source, created = '2000-01-01 00:00:00+00'"
                          " FROM crm.customer ORDER BY 1")
        # excluded column not written, constant written (winning over the packet), target default kept
        assert rows == [(1, None, "canonical", True), (3, None, "canonical", True), (4, None, "canonical", True)]

        client.update({"name": "Ann B"}, restriction={"id": 1})             # no filter column: plain update
        client.update({"status_id": 3}, restriction={"id": 4})              # moves out: deleted
        client.set({"id": 3, "name": "Cid", "email": "c@x", "status_id": 5})  # a set moving out: deleted
        # moving in: a client update must carry the whole row (documented)
        client.update({"id": 2, "name": "Bob", "email": "b@x", "status_id": 2}, restriction={"id": 2})
        client.update({"id": 10, "status_id": 1}, restriction={"id": 1})     # key change inside the filter
        client.delete({"id": 99})
        expected = [(2, "Bob", "b@x", 2), (10, "Ann B", "a@x", 1)]
        wait_for(lambda: query(crm, TARGET_ROWS) == expected, message="updates mapped at crm")
        assert query(canonical, PROJECTION) == expected
        # the unmapped target is a plain copy of everything
        wait_for(lambda: query(copy, "SELECT id, status_id FROM users ORDER BY id") ==
                 query(canonical, "SELECT id, status_id FROM users ORDER BY id"), message="plain copy")
        assert query(copy, "SELECT password_hash FROM users WHERE id = 2") == [("secret2",)]
    finally:
        client.close()
        assert daemon.stop()


def test_constants_keep_another_sources_rows_of_a_shared_table(databases):
    """crm.customer is shared: rows of source 'other' live beside this target's ('canonical').
    Every statement the mapping writes is scoped by the constants: a set whose key is another
    source's row (plain, or the upsert of an update moving into the filter) changes nothing and
    is dead-lettered at crm with its reason; a set leaving the filter deletes only its own row."""
    canonical, crm, copy = databases
    execute(crm, "INSERT INTO crm.customer (customer_id, full_name, status_id, source) VALUES"
                 " (8, 'Other 8', 1, 'other'), (12, 'Other 12', 1, 'other'), (14, 'Other 14', 1, 'other')")
    others = query(crm, "SELECT * FROM crm.customer ORDER BY 1")
    config = mapped_config(canonical, crm, copy, "client")
    destination = config.destinations[0]
    crm_target = [t for t in destination.targets if t.name == "crm"][0]
    daemon = start(config)
    try:
        bodies = ['{"action": "set", "data": {"id": 8, "name": "Canon 8", "status_id": 1}}',
                  '{"action": "set", "data": {"id": 12, "name": "Canon 12", "status_id": 9}}',
                  '{"action": "add", "data": {"id": 14, "name": "Canon 14", "status_id": 9}}',
                  '{"action": "update", "data": {"id": 14, "name": "Canon 14", "status_id": 1},'
                  ' "restriction": {"id": 14}}',
                  '{"action": "set", "data": {"id": 20, "name": "Mine", "status_id": 1}}',
                  '{"action": "set", "data": {"id": 20, "name": "Mine again", "status_id": 2}}']
        ids = [str(uuid.uuid4()) for _ in bodies]
        send_raw(destination.queue, bodies, [{"golconde-id": pid} for pid in ids])
        wait_for(lambda: query(copy, "SELECT count(*) FROM users") == [(4,)], message="copy target")
        wait_for(lambda: query(crm, "SELECT customer_id, full_name, source FROM crm.customer"
                                    " WHERE source = 'canonical'") == [(20, "Mine again", "canonical")],
                 message="crm's own row")
        dead = []
        wait_for(lambda: dead.extend(drain_queue(crm_target.dead_letter_queue, wait=0.3)) or len(dead) >= 2,
                 timeout=20, message="the sets on other sources' keys dead-lettered at crm")
        time.sleep(0.5)
        dead.extend(drain_queue(crm_target.dead_letter_queue, wait=0.3))
        assert sorted(d.headers["golconde-id"] for d in dead) == sorted([ids[0], ids[3]])
        assert all(d.headers["golconde-reason"].startswith(
            "set on crm.customer: the row of that key holds other values in the columns of the"
            " mapping's constants (source)") for d in dead), [d.headers["golconde-reason"] for d in dead]
        # the other source's rows are as they were (12 not deleted by the set leaving the filter)
        assert query(crm, "SELECT * FROM crm.customer WHERE source = 'other' ORDER BY 1") == others
    finally:
        assert daemon.stop()


def test_restriction_on_an_excluded_column_is_dead_lettered_at_that_target_only(databases):
    canonical, crm, copy = databases
    config = mapped_config(canonical, crm, copy, "client")
    destination = config.destinations[0]
    daemon = start(config)
    try:
        bodies = ['{"action": "add", "data": {"id": 1, "name": "Ann", "password_hash": "s", "status_id": 1}}',
                  '{"action": "delete", "restriction": {"password_hash": "s"}}',
                  '{"action": "add", "data": {"id": 2, "name": "Sentinel", "status_id": 1}}']
        send_raw(destination.queue, bodies, [{"golconde-id": str(uuid.uuid4())} for _ in bodies])
        wait_for(lambda: query(copy, "SELECT id FROM users ORDER BY id") == [(2,)], message="copy target")
        wait_for(lambda: query(crm, "SELECT customer_id FROM crm.customer ORDER BY 1") == [(1,), (2,)],
                 message="crm target: the delete could not apply")
        crm_target = [t for t in destination.targets if t.name == "crm"][0]
        dead = []
        wait_for(lambda: dead.extend(drain_queue(crm_target.dead_letter_queue, wait=0.3)) or dead,
                 timeout=20, message="dead letter at crm")
        assert len(dead) == 1
        assert dead[0].headers["golconde-reason"].startswith(
            "Destinations.%s.Targets.crm.exclude: the restriction names 'password_hash'" % destination.name)
        copy_target = [t for t in destination.targets if t.name == "copy"][0]
        assert drain_queue(copy_target.dead_letter_queue, wait=0.3) == []
    finally:
        assert daemon.stop()


def test_trigger_flow_filter_moves_rows_in_and_out(databases):
    canonical, crm, copy = databases
    config = mapped_config(canonical, crm, copy, "trigger")
    conn = psycopg2.connect(canonical)
    trigger.install(conn, "public.users", config.destinations[0].name)
    conn.commit()
    conn.close()
    daemon = start(config)
    try:
        execute(canonical, "INSERT INTO users (id, name, email, password_hash, status_id)"
                           " SELECT g, 'user ' || g, 'u' || g || '@x', 'pw' || g, g % 4 FROM generate_series(1, 40) g")
        execute(canonical, "UPDATE users SET status_id = 3 WHERE id IN (1, 2, 5)")       # out of the filter
        execute(canonical, "UPDATE users SET status_id = 1 WHERE id IN (3, 4, 8)")       # into the filter
        execute(canonical, "UPDATE users SET status_id = NULL WHERE id = 6")              # out: null
        execute(canonical, "UPDATE users SET name = 'renamed' WHERE id IN (9, 11)")      # 9 in, 11 out
        execute(canonical, "UPDATE users SET id = 100 WHERE id = 13")                    # key change, in
        execute(canonical, "UPDATE users SET id = 101, status_id = 0 WHERE id = 14")     # key change, out
        execute(canonical, "DELETE FROM users WHERE id IN (10, 12)")
        execute(canonical, "INSERT INTO users (id, name, status_id) VALUES (1000, 'sentinel', 1)")
        wait_for(lambda: query(crm, TARGET_ROWS) == query(canonical, PROJECTION)
                 and (1000, "sentinel", None, 1) in query(crm, TARGET_ROWS), timeout=60,
                 message="crm holds exactly the filtered projection")
        rows = query(crm, TARGET_ROWS)
        assert (9, "renamed", "u9@x", 1) in rows and (100, "user 13", "u13@x", 1) in rows
        assert all(status in (1, 2) for _, _, _, status in rows)
        assert query(crm, "SELECT count(*) FROM crm.customer WHERE password_hash IS NOT NULL"
                          " OR source <> 'canonical' OR created <> '2000-01-01 00:00:00+00'") == [(0,)]
        wait_for(lambda: query(copy, "SELECT id, name, status_id FROM users ORDER BY id")
                 == query(canonical, "SELECT id, name, status_id FROM users ORDER BY id"), message="copy")
        # golconde compare goes through the mapping: renamed columns, the filter, and neither
        # the excluded column nor the constant's and the default's
        results = {target: result for _, target, result in compare_config(config)}
        assert results["crm"].equal and results["copy"].equal, results
        assert results["crm"].canonical_count == len(query(canonical, PROJECTION))
        assert set(results["crm"].ignored) == {"password_hash", "source", "created"}, results["crm"]
        execute(crm, "UPDATE crm.customer SET email = 'changed' WHERE customer_id = 1000")
        assert not compare_config(config)[0][2].equal
    finally:
        assert daemon.stop()


# a table two sources share, keyed by (source, customer_id), and one keyed by a serial with the
# customer id a unique key: the filter's moves in and out go by whichever key the row holds
SHARED = """
CREATE TABLE public.shared (source text NOT NULL, customer_id integer, full_name text,
                            status_id integer, PRIMARY KEY (source, customer_id));
CREATE TABLE public.serial (sid serial PRIMARY KEY, customer_id integer UNIQUE, full_name text,
                            status_id integer);
INSERT INTO public.shared VALUES ('erp', 1, 'ERP row', 1), ('erp', 2, 'ERP row', 1);
"""
OTHER_KEYS = {"columns": {"id": "customer_id", "name": "full_name"}, "exclude": ["email", "password_hash", "source"],
              "constants": {"source": "canonical"}, "filter": {"status_id": {"in": [1, 2]}}}


def other_keys_config(canonical: str, other: str, mode: str):
    mapping = make_config(canonical, {"shared": other, "serial": other}, "public.users", mode=mode,
                          **trigger_settings(mode, poll_interval=0.5))
    destination = next(iter(mapping["Destinations"].values()))
    destination["Targets"]["shared"].update(OTHER_KEYS, target="public.shared")
    destination["Targets"]["serial"].update(
        dict(OTHER_KEYS, target="public.serial", constants={}, exclude=["email", "password_hash",
                                                                        "source", "created"]))
    return parse_config(mapping)


OURS = "SELECT customer_id, full_name, status_id FROM public.shared WHERE source = 'canonical' ORDER BY 1"
SERIAL = "SELECT customer_id, full_name, status_id FROM public.serial ORDER BY 1"
FILTERED = "SELECT id, name, status_id FROM users WHERE status_id IN (1, 2) ORDER BY id"


@pytest.mark.parametrize("mode", ["client", "trigger"])
def test_filtered_targets_keyed_otherwise_and_updates_that_change_nothing(make_database, mode):
    """Rows move in and out of the filter at targets keyed by (constant, id) or by a serial with
    the id unique; a constant scopes updates and deletes to the rows of this source; an update
    that changed no canonical row is not fanned out (a filtered target made it an upsert: a
    phantom row, or a deleted row back)."""
    canonical, other = make_database(), make_database()
    execute(canonical, USERS)
    execute(other, SHARED)
    config = other_keys_config(canonical, other, mode)
    destination = config.destinations[0]
    if mode == "trigger":
        conn = psycopg2.connect(canonical)
        trigger.install(conn, "public.users", destination.name)
        conn.commit()
        conn.close()
    daemon = start(config)
    host, port = stomp_address()
    client = Client(destination.queue, host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        def write(*packets):
            if mode == "client":
                for packet in packets:
                    client.send(packet)
                return
            for packet in packets:      # the same changes, as SQL on the canonical table
                if packet["action"] in ("add", "set"):
                    data = packet["data"]
                    execute(canonical, "INSERT INTO users (id, name, status_id) VALUES (%s, %s, %s)"
                                       " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,"
                                       " status_id = EXCLUDED.status_id",
                            (data["id"], data.get("name"), data.get("status_id")))
                elif packet["action"] == "update":
                    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(column))
                                              for column in packet["data"])
                    wheres = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(column))
                                                   for column in packet["restriction"])
                    execute(canonical, sql.SQL("UPDATE users SET {} WHERE {}").format(sets, wheres),
                            list(packet["data"].values()) + list(packet["restriction"].values()))
                else:
                    execute(canonical, "DELETE FROM users WHERE id = %s", (packet["restriction"]["id"],))

        write({"action": "add", "data": {"id": 1, "name": "A", "status_id": 1}},
              {"action": "add", "data": {"id": 2, "name": "B", "status_id": 3}},
              {"action": "add", "data": {"id": 3, "name": "C", "status_id": 1}})
        # 1 moves out (set), 2 moves in (a whole-row update), 3 renamed (in place)
        write({"action": "set", "data": {"id": 1, "name": "A", "status_id": 5}},
              {"action": "update", "data": {"id": 2, "name": "B", "status_id": 2}, "restriction": {"id": 2}},
              {"action": "update", "data": {"name": "C2"}, "restriction": {"id": 3}})
        # updates that change no canonical row: a key nobody has, a row deleted before
        write({"action": "update", "data": {"status_id": 1}, "restriction": {"id": 99}},
              {"action": "delete", "restriction": {"id": 3}},
              {"action": "update", "data": {"id": 3, "name": "C3", "status_id": 1}, "restriction": {"id": 3}},
              {"action": "add", "data": {"id": 1000, "name": "sentinel", "status_id": 1}})
        expected = [(2, "B", 2), (1000, "sentinel", 1)]
        wait_for(lambda: query(canonical, FILTERED) == expected, message="the canonical table")
        wait_for(lambda: query(other, OURS) == expected and query(other, SERIAL) == expected,
                 timeout=30, message="both targets hold the filtered rows")
        # the other source's rows were not touched (no update or delete of theirs by id)
        assert query(other, "SELECT customer_id, full_name FROM public.shared WHERE source = 'erp'"
                            " ORDER BY 1") == [(1, "ERP row"), (2, "ERP row")]
    finally:
        client.close()
        assert daemon.stop()


def test_mapping_names_are_checked_against_both_tables(databases, monkeypatch):
    """A target-side name its table lacks pauses that target (its packets wait, its error names
    the key path) until the table has it; a canonical-side name the canonical table lacks is a
    standing problem of the destination (the health check fails), the flow going on."""
    from golconde.handlers import autosql
    from golconde.metrics import health

    monkeypatch.setattr(autosql, "RELATION_RETRY", 0.5)
    monkeypatch.setattr(destination_module, "MAPPING_CHECK_INTERVAL", 0.5)
    canonical, crm, copy = databases
    mapping = make_config(canonical, {"crm": crm, "copy": copy}, "public.users")
    destination = next(iter(mapping["Destinations"].values()))
    destination["Targets"]["crm"].update(MAPPING, columns={"id": "customer_id", "name": "fullname"},
                                         exclude=["password_hash", "pasword"])
    config = parse_config(mapping)
    name = config.destinations[0].name
    daemon = start(config)
    host, port = stomp_address()
    client = Client(config.destinations[0].queue, host, port, STOMP_LOGIN, STOMP_PASSCODE)
    try:
        crm_stats = daemon.registry.get(name + "_crm")
        # the target's check and the destination's are two threads
        wait_for(lambda: "columns.name: 'fullname' is no column of crm.customer" in (
            crm_stats.snapshot()["last_error"] or "")
            and daemon.registry.get(name).snapshot()["problems"], timeout=20,
            message="crm paused, the destination's problem named")
        problems = daemon.registry.get(name).snapshot()["problems"]
        assert problems == ["Destinations.%s.Targets.crm.exclude: 'pasword' is no column of the"
                            " canonical public.users" % name]
        ok, document = health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)
        assert not ok
        # the paused target's reasons name the cause, not only the connections the pause closed
        assert any(reason.startswith("%s_crm: paused: " % name) and "columns.name: 'fullname' is no"
                   " column of crm.customer" in reason for reason in document["reasons"]), document
        client.add({"id": 1, "name": "Ann", "status_id": 1})
        wait_for(lambda: query(copy, "SELECT count(*) FROM users") == [(1,)], message="copy applied")
        time.sleep(1.0)
        assert query(crm, TARGET_ROWS) == [] and crm_stats.snapshot()["dead_lettered"] == 0
        execute(crm, "ALTER TABLE crm.customer RENAME full_name TO fullname")
        wait_for(lambda: query(crm, "SELECT customer_id, fullname FROM crm.customer") == [(1, "Ann")],
                 timeout=20, message="crm applied once its table has the column")
        wait_for(lambda: crm_stats.snapshot()["problems"] == [], timeout=20, message="crm no longer paused")
        # the canonical side is checked again while connected: the problem clears
        reconnects = daemon.registry.get(name).snapshot()["reconnects"]
        execute(canonical, "ALTER TABLE users ADD COLUMN pasword text")
        wait_for(lambda: daemon.registry.get(name).snapshot()["problems"] == [], timeout=20,
                 message="the destination's problem cleared")
        assert daemon.registry.get(name).snapshot()["reconnects"] == reconnects
        assert health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)[0]
    finally:
        client.close()
        assert daemon.stop()
