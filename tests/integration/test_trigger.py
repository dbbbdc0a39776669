"""golconde.trigger and sql/triggers against a real PostgreSQL (13+)."""
from __future__ import annotations

import datetime
import os
import select
import threading
import time
import uuid
from decimal import Decimal

import psycopg2
import pytest
from psycopg2 import sql

from golconde import trigger
from golconde.errors import GolcondeError
from golconde.handlers.autosql import AutoSQL
from golconde.packet import Action, dumps, parse
from golconde.trigger import TriggerError

DEST = "Test1"


def execute(conn, query, params=None):
    with conn.cursor() as cur:
        cur.execute(query, params)


def query_one(conn, statement):
    with conn.cursor() as cur:
        cur.execute(statement)
        return cur.fetchone()[0]


def drain(conn, destination=DEST, limit=100):
    """Fetch and delete every visible packet of ``destination``; return the parsed packets."""
    with conn.cursor() as cur:
        batch = trigger.fetch_batch(cur, destination, limit)
        trigger.delete_batch(cur, destination, [queued.id for queued in batch])
    if not conn.autocommit:
        conn.commit()
    return [parse(queued.packet) for queued in batch]


@pytest.fixture
def orders(db):
    execute(db, "CREATE TABLE orders (id serial PRIMARY KEY, name text, price numeric(10,2))")
    result = trigger.install(db, "orders", DEST)
    assert result.events == ("INSERT", "UPDATE", "DELETE")
    assert result.key_columns == ("id",) and result.warning is None
    return db


def test_sql_files_are_package_data_and_sql_triggers_points_at_them():
    names = [name for name, _ in trigger.sql_files()]
    assert names == ["schema.sql", "queue.sql", "capture.sql", "capture_c.sql"]
    root = os.path.join(os.path.dirname(__file__), "..", "..", "sql", "triggers")
    assert sorted(os.listdir(root)) == sorted(names + ["install.sql"])
    for name, text in trigger.sql_files():
        assert text.startswith("-- ---"), name  # header comment


def test_install_schema_is_idempotent(db):
    trigger.install_schema(db)
    trigger.install_schema(db)
    with db.cursor() as cur:
        cur.execute("SELECT to_regclass('golconde.queue') IS NOT NULL,"
                    " to_regprocedure('golconde.capture()') IS NOT NULL")
        assert cur.fetchone() == (True, True)
        for function in ("golconde.capture()", "golconde.capture_plpgsql()"):
            cur.execute("SELECT l.lanname, prosecdef, proconfig, proacl::text[] FROM pg_proc p"
                        " JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = %s::regprocedure",
                        (function,))
            language, secdef, config, acl = cur.fetchone()
            # not executable by PUBLIC (no "=X/" grant); the PL/pgSQL function is SECURITY
            # DEFINER with a pinned search_path, the C one switches to its owner for the insert
            assert not any(grant.startswith("=") for grant in acl), function
            if language == "c":
                assert not secdef and config is None
            else:
                assert secdef and config == ["search_path=pg_catalog, pg_temp",
                                             "DateStyle=ISO, MDY", "IntervalStyle=postgres", "extra_float_digits=1",
                                             "bytea_output=hex"]
        assert trigger.schema_state(db) in ("current", "plpgsql")
        cur.execute("SELECT indexrelid::regclass::text, indisprimary, indkey::text FROM pg_index"
                    " WHERE indrelid = 'golconde.queue'::regclass ORDER BY 1")
        assert cur.fetchall() == [("golconde.queue_drain_idx", False, "3 1"),    # (destination, id)
                                  ("golconde.queue_txid_idx", False, "3 5")]     # (destination, txid)
        cur.execute("SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reloptions"
                    " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'golconde.queue'::regclass ORDER BY 1")
        assert cur.fetchall() == [("queue_%d" % n, "FOR VALUES IN ('%d')" % n,
                                   ["autovacuum_enabled=true",
                                    "autovacuum_vacuum_insert_threshold=-1",
                                    "autovacuum_vacuum_threshold=100000",
                                    "autovacuum_vacuum_scale_factor=0",
                                    "autovacuum_analyze_threshold=2147483647"]) for n in range(3)]
        cur.execute("SELECT seqcache FROM pg_sequence WHERE seqrelid = 'golconde.queue_id_seq'::regclass")
        assert cur.fetchone() == (1,)
        cur.execute("SELECT to_regclass('golconde.drain_position') IS NOT NULL")
        assert cur.fetchone() == (True,)


def test_insert_update_delete_make_packets_in_order(orders):
    execute(orders, "INSERT INTO orders (name, price) VALUES ('a', 1.50), ('b', 2)")
    execute(orders, "UPDATE orders SET price = 3.25 WHERE name = 'a'")
    execute(orders, "UPDATE orders SET id = 10 WHERE name = 'b'")
    execute(orders, "UPDATE orders SET name = name")  # changes nothing: no packet
    execute(orders, "DELETE FROM orders WHERE id = 10")
    with orders.cursor() as cur:
        assert trigger.backlog(cur, DEST)[0] == 5
        batch = trigger.fetch_batch(cur, DEST, 100)
    assert [queued.id for queued in batch] == sorted(queued.id for queued in batch)
    assert all(queued.relation == "public.orders" for queued in batch)
    assert len({queued.packet_id for queued in batch}) == 5
    uuid.UUID(batch[0].packet_id)
    assert isinstance(batch[0].created_at, datetime.datetime) and batch[0].created_at.tzinfo
    packets = [parse(queued.packet) for queued in batch]
    assert [p.action for p in packets] == [Action.ADD, Action.ADD, Action.UPDATE, Action.UPDATE,
                                           Action.DELETE]
    assert packets[0].data == {"id": 1, "name": "a", "price": Decimal("1.50")}
    assert str(packets[0].data["price"]) == "1.50"
    assert packets[1].data == {"id": 2, "name": "b", "price": Decimal("2.00")}
    assert packets[2].data == {"id": 1, "name": "a", "price": Decimal("3.25")}
    assert packets[2].restriction == {"id": 1}
    assert packets[3].data == {"id": 10, "name": "b", "price": Decimal("2.00")}
    assert packets[3].restriction == {"id": 2}  # the OLD key
    assert packets[4].restriction == {"id": 10} and packets[4].data == {}
    assert parse(batch[0].body) == packets[0]


def test_rollback_makes_no_packet(orders, database):
    conn = psycopg2.connect(database)
    try:
        execute(conn, "INSERT INTO orders (name) VALUES ('gone')")
        conn.rollback()
    finally:
        conn.close()
    with orders.cursor() as cur:
        assert trigger.fetch_batch(cur, DEST, 10) == []
        assert trigger.backlog(cur, DEST) == (0, None)


def test_capture_does_not_notify(orders, database):
    """A NOTIFY in the writing transaction would serialize every capturing commit: the drain
    daemon polls instead."""
    listener = psycopg2.connect(database)
    listener.autocommit = True
    try:
        execute(listener, "LISTEN golconde")
        execute(orders, "INSERT INTO orders (name) VALUES ('x')")
        select.select([listener], [], [], 0.5)
        listener.poll()
        assert listener.notifies == []
        with orders.cursor() as cur:
            assert len(trigger.fetch_batch(cur, DEST, 10)) == 1
        orders.rollback()
    finally:
        listener.close()


def test_quoted_names(db):
    execute(db, 'CREATE SCHEMA "My Schema"')
    execute(db, 'CREATE TABLE "My Schema"."we""ird.Tab" ("Key Col" int, "select" text,'
                ' "a""b" text, PRIMARY KEY ("Key Col", "select"))')
    result = trigger.install(db, '"My Schema"."we""ird.Tab"', "my-dest.1")
    assert result.relation == '"My Schema"."we""ird.Tab"'
    assert result.key_columns == ("Key Col", "select")
    assert result.trigger == trigger.trigger_name("my-dest.1") != trigger.trigger_name("my_dest_1")
    execute(db, 'INSERT INTO "My Schema"."we""ird.Tab" VALUES (1, \'k\', \'v\')')
    execute(db, 'UPDATE "My Schema"."we""ird.Tab" SET "a""b" = \'w\'')
    execute(db, 'DELETE FROM "My Schema"."we""ird.Tab"')
    with db.cursor() as cur:
        batch = trigger.fetch_batch(cur, "my-dest.1", 10)
    assert batch[0].relation == '"My Schema"."we""ird.Tab"'
    packets = [parse(queued.packet) for queued in batch]
    assert packets[0].data == {"Key Col": 1, "select": "k", 'a"b': "v"}
    assert packets[1].restriction == {"Key Col": 1, "select": "k"}
    assert packets[1].data['a"b'] == "w"
    assert packets[2].restriction == {"Key Col": 1, "select": "k"}
    assert trigger.remove(db, '"My Schema"."we""ird.Tab"', "my-dest.1").removed


def test_a_parent_with_inheritance_children_is_installed_with_a_warning(db):
    """A row trigger is not inherited: the children's rows are not captured with the parent's,
    and the install says so (a partitioned table's partitions get its trigger: no warning)."""
    execute(db, "CREATE TABLE p (id int PRIMARY KEY, v text)")
    execute(db, "CREATE TABLE c1 (extra int) INHERITS (p)")
    execute(db, 'CREATE TABLE "C 2" () INHERITS (p)')
    result = trigger.install(db, "p", DEST)
    assert result.events == ("INSERT", "UPDATE", "DELETE")
    assert result.warning == ('public.p has 2 inheritance child table(s) ("C 2", c1): a row trigger'
                              " is not inherited, so their rows are not captured with it, and the"
                              " targets' UPDATEs and DELETEs of public.p reach their children's"
                              " rows too (as PostgreSQL's do): install a capture trigger on each"
                              " child that holds rows of its own")
    execute(db, "CREATE TABLE parts (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    execute(db, "CREATE TABLE parts_0 PARTITION OF parts FOR VALUES FROM (0) TO (10)")
    assert trigger.install(db, "parts", DEST).warning is None


def test_an_install_upgrades_a_version_4_queue_to_vacuum_deleted_rows(db):
    """Version 4 turned autovacuum off on the queue's partitions, so the rows a drain deleted
    (where it may not truncate) were never vacuumed; installing again upgrades the schema."""
    execute(db, "CREATE TABLE items (id int PRIMARY KEY)")
    trigger.install(db, "items", DEST)
    for n in range(3):
        execute(db, "ALTER TABLE golconde.queue_%d RESET (autovacuum_vacuum_insert_threshold,"
                    " autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor,"
                    " autovacuum_analyze_threshold)" % n)
        execute(db, "ALTER TABLE golconde.queue_%d SET (autovacuum_enabled = false)" % n)
    execute(db, "CREATE OR REPLACE FUNCTION golconde.schema_version() RETURNS integer"
                " LANGUAGE sql IMMUTABLE AS 'SELECT 4'")
    assert trigger.schema_state(db) == "old"
    trigger.install(db, "items", DEST)
    assert trigger.schema_state(db) in ("current", "plpgsql")
    assert query_one(db, "SELECT array_agg(DISTINCT array_to_string(reloptions, ' '))"
                         " FROM pg_class WHERE relname LIKE 'queue\\__' AND relnamespace ="
                         " 'golconde'::regnamespace") == [
        "autovacuum_enabled=true autovacuum_vacuum_insert_threshold=-1"
        " autovacuum_vacuum_threshold=100000 autovacuum_vacuum_scale_factor=0"
        " autovacuum_analyze_threshold=2147483647"]


def test_keyless_table_is_insert_only(db):
    execute(db, "CREATE TABLE log (msg text)")
    with pytest.raises(TriggerError, match=r"public.log has no primary key: UPDATE and DELETE"):
        trigger.install(db, "log", DEST, actions=["insert", "update"])
    result = trigger.install(db, "public.log", DEST)
    assert result.events == ("INSERT",) and result.key_columns == ()
    assert result.warning == ("public.log has no primary key: UPDATE and DELETE cannot be captured;"
                              " only INSERTs are distributed")
    assert trigger.install(db, "log", DEST, actions=["add"]).warning is None
    execute(db, "INSERT INTO log VALUES ('one')")
    execute(db, "UPDATE log SET msg = 'two'")
    execute(db, "DELETE FROM log")
    assert [(p.action, dict(p.data)) for p in drain(db)] == [(Action.ADD, {"msg": "one"})]


def test_the_key_is_the_primary_key_without_its_include_columns(db):
    execute(db, "CREATE TABLE covered (id int, region text, note text,"
                " PRIMARY KEY (id, region) INCLUDE (note))")
    result = trigger.install(db, "covered", DEST)
    assert result.key_columns == ("id", "region") and result.warning is None
    execute(db, "INSERT INTO covered VALUES (1, 'eu', 'a')")
    execute(db, "UPDATE covered SET note = 'b'")
    execute(db, "DELETE FROM covered")
    packets = drain(db)
    assert [p.action for p in packets] == [Action.ADD, Action.UPDATE, Action.DELETE]
    assert packets[1].restriction == {"id": 1, "region": "eu"} == packets[2].restriction


def test_a_primary_key_whose_index_is_not_valid_yet_is_the_key(db):
    """A partitioned table's key added with ALTER TABLE ONLY (as pg_dump does) has an index that
    is not valid until every partition's index is attached: it is still the key to capture."""
    execute(db, "CREATE TABLE parted (id int NOT NULL, note text) PARTITION BY RANGE (id)")
    execute(db, "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)")
    execute(db, "ALTER TABLE ONLY parted ADD PRIMARY KEY (id)")
    assert query_one(db, "SELECT i.indisvalid FROM pg_index i"
                         " WHERE i.indrelid = 'parted'::regclass AND i.indisprimary") is False
    result = trigger.install(db, "parted", DEST)
    assert result.key_columns == ("id",) and result.warning is None
    assert result.events == ("INSERT", "UPDATE", "DELETE")


def test_install_errors(db):
    with pytest.raises(TriggerError, match=r"table public.nope does not exist"):
        trigger.install(db, "nope", DEST)
    execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    execute(db, "CREATE VIEW v AS SELECT * FROM t")
    with pytest.raises(TriggerError, match=r"public.v is not a table"):
        trigger.install(db, "v", DEST)
    with pytest.raises(TriggerError, match=r"unknown action 'truncate'"):
        trigger.install(db, "t", DEST, actions=["truncate"])
    with pytest.raises(TriggerError):
        trigger.install(db, "a.b.c", DEST)
    assert issubclass(TriggerError, GolcondeError)
    # a temporary table's rows end with its session, which no capture tells the targets
    execute(db, "CREATE TEMP TABLE tmp (id int PRIMARY KEY)")
    temp_schema = query_one(db, "SELECT nspname FROM pg_namespace WHERE oid = pg_my_temp_schema()")
    with pytest.raises(TriggerError, match=r"is a temporary table"):
        trigger.install(db, "%s.tmp" % temp_schema, DEST)
    # an unlogged one is emptied by a crash, not captured either: installed, with a warning
    execute(db, "CREATE UNLOGGED TABLE ul (id int PRIMARY KEY)")
    assert "public.ul is UNLOGGED: a crash of its server empties it" in trigger.install(db, "ul", DEST).warning
    execute(db, "CREATE UNLOGGED TABLE ul_log (line text)")
    warning = trigger.install(db, "ul_log", DEST).warning
    assert "has no primary key" in warning and "is UNLOGGED" in warning, warning


def test_reinstall_and_remove_are_idempotent(orders):
    trigger.install(orders, "orders", DEST)
    with orders.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass"
                    " AND NOT tgisinternal")
        assert cur.fetchone()[0] == 1
    first = trigger.remove(orders, "orders", DEST)
    assert first.removed and "removed" in first.message
    second = trigger.remove(orders, "orders", DEST)
    assert not second.removed and "nothing to remove" in second.message
    assert not trigger.remove(orders, "missing_table", DEST).removed
    execute(orders, "INSERT INTO orders (name) VALUES ('not captured')")
    assert drain(orders) == []


def test_install_and_remove_give_up_on_a_table_an_open_transaction_holds(orders, database, monkeypatch):
    """An open writer transaction holds its lock on the table until it ends: the install waits at
    most LOCK_TIMEOUT (the table's other writers queue behind it meanwhile), then says why."""
    monkeypatch.setattr(trigger, "LOCK_TIMEOUT", "200ms")
    writer = psycopg2.connect(database)
    try:
        execute(writer, "INSERT INTO orders (name) VALUES ('open')")
        started = time.monotonic()
        with pytest.raises(TriggerError, match=r"public.orders stayed locked for 200ms"):
            trigger.install(orders, "orders", DEST)
        with pytest.raises(TriggerError, match=r"stayed locked"):
            trigger.remove(orders, "orders", DEST)
        assert time.monotonic() - started < 5
    finally:
        writer.rollback()
        writer.close()
    assert trigger.remove(orders, "orders", DEST).removed       # once it is free


def test_install_refuses_open_transaction(database):
    conn = psycopg2.connect(database)
    try:
        execute(conn, "CREATE TABLE t (id int PRIMARY KEY)")
        with pytest.raises(TriggerError, match="inside a transaction"):
            trigger.install(conn, "t", DEST)
        conn.commit()
        trigger.install(conn, "t", DEST)
        assert conn.autocommit is False
    finally:
        conn.close()


def test_out_of_commit_order_is_not_skipped(orders, database):
    txn_a = psycopg2.connect(database)
    txn_b = psycopg2.connect(database)
    drainer = psycopg2.connect(database)
    try:
        execute(txn_a, "INSERT INTO orders (name) VALUES ('A')")  # smaller queue id, open
        execute(txn_b, "INSERT INTO orders (name) VALUES ('B')")
        txn_b.commit()
        assert [p.data["name"] for p in drain(drainer)] == ["B"]
        txn_a.commit()
        assert [p.data["name"] for p in drain(drainer)] == ["A"]
        assert drain(drainer) == []
    finally:
        for conn in (txn_a, txn_b, drainer):
            conn.close()


def test_same_row_updated_by_two_transactions_keeps_commit_order(orders, database):
    execute(orders, "INSERT INTO orders (id, name) VALUES (1, 'v0')")
    drain(orders)
    first = psycopg2.connect(database)
    second = psycopg2.connect(database)
    try:
        execute(first, "UPDATE orders SET name = 'v1' WHERE id = 1")
        done = threading.Event()

        def update_second():
            execute(second, "UPDATE orders SET name = name || '+v2' WHERE id = 1")  # waits for first
            second.commit()
            done.set()

        thread = threading.Thread(target=update_second)
        thread.start()
        assert not done.wait(0.5)
        first.commit()
        thread.join(10)
        assert done.is_set()
    finally:
        first.close()
        second.close()
    assert [p.data["name"] for p in drain(orders)] == ["v1", "v1+v2"]


TYPES = [
    ("i", "integer", "-42"), ("b", "bigint", "9007199254740993"),
    ("n", "numeric(30,10)", "12345678901234567890.0123456789"), ("nn", "numeric", "'NaN'"),
    ("f", "double precision", "0.1"), ("bo", "boolean", "true"),
    ("t", "text", "E'quote\\' \"dq\" back\\\\slash \\n é ☃'"), ("vc", "varchar(5)", "'abc'"),
    ("d", "date", "'2024-02-29'"), ("ts", "timestamp", "'2024-01-02 03:04:05.123456'"),
    ("tz", "timestamptz", "'2024-01-02 03:04:05+02'"), ("tm", "time", "'23:59:59'"),
    ("iv", "interval", "'1 day 02:03:04'"), ("u", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ("by", "bytea", "'\\x00ff10'::bytea"), ("js", "json", "'{\"a\": [1, 2.50, null]}'"),
    ("jb", "jsonb", "'{\"k\": {\"x\": 1.0}}'"), ("ai", "integer[]", "'{1,2,NULL}'"),
    ("at", "text[]", "'{\"a b\",c}'"), ("ip", "inet", "'192.168.0.1/24'"),
    ("pt", "point", "'(1,2)'"), ("nul", "text", "NULL"),
]


def test_values_of_many_types_round_trip(db):
    columns = sql.SQL(", ").join(sql.SQL("{} " + kind).format(sql.Identifier(name))
                                 for name, kind, _ in TYPES)
    execute(db, sql.SQL("CREATE TABLE typed (id int PRIMARY KEY, {})").format(columns))
    execute(db, "CREATE TABLE copy (LIKE typed)")
    execute(db, "SET TimeZone = 'Europe/Paris'")
    trigger.install(db, "typed", DEST)
    execute(db, "INSERT INTO typed VALUES (1, %s)" % ", ".join(value for _, _, value in TYPES))
    execute(db, "UPDATE typed SET pt = '(3,4)'")  # point has no equality operator
    packets = drain(db)
    data = packets[0].data
    assert data["b"] == 9007199254740993 and data["i"] == -42
    assert data["n"] == Decimal("12345678901234567890.0123456789") and data["nn"] == "NaN"
    assert data["f"] == Decimal("0.1") and data["bo"] is True
    assert data["t"] == "quote' \"dq\" back\\slash \n é ☃"
    assert data["ts"] == "2024-01-02T03:04:05.123456"
    assert data["tz"] == "2024-01-02T02:04:05+01:00"
    assert data["by"] == "\\x00ff10"
    assert data["js"] == {"a": [1, Decimal("2.50"), None]} and data["jb"] == {"k": {"x": Decimal("1.0")}}
    assert data["ai"] == [1, 2, None] and data["at"] == ["a b", "c"] and data["nul"] is None
    assert packets[1].action is Action.UPDATE and packets[1].data["pt"] == "(3,4)"
    # the packet carries enough to rebuild the row exactly
    execute(db, "INSERT INTO copy SELECT * FROM jsonb_populate_record(NULL::copy, %s::jsonb)",
            (dumps(dict(data)),))
    with db.cursor() as cur:  # column by column, by text form (point changed since the insert)
        cur.execute(sql.SQL("SELECT ARRAY[{}] FROM typed t, copy c").format(sql.SQL(", ").join(
            sql.SQL("t.{0}::text IS NOT DISTINCT FROM c.{0}::text").format(sql.Identifier(name))
            for name, kind, _ in TYPES if kind != "point")))
        assert all(cur.fetchone()[0])


def test_composite_and_hstore_changes_apply_at_a_target(db):
    """The capture writes composite and hstore values as JSON objects (arrays of them as arrays);
    AutoSQL applies those packets, so a target of such a table ends equal to it."""
    execute(db, "CREATE EXTENSION IF NOT EXISTS hstore")
    execute(db, "CREATE TYPE inner_t AS (x int, tags text[])")
    execute(db, "CREATE TYPE pair AS (a int, b text, inn inner_t, j jsonb)")
    execute(db, "CREATE TABLE rich (id int PRIMARY KEY, p pair, ps pair[], h hstore, hs hstore[])")
    execute(db, "CREATE TABLE copy (LIKE rich INCLUDING ALL)")
    trigger.install(db, "rich", DEST)
    execute(db, r"""INSERT INTO rich VALUES
        (1, ROW(1, 'q"\', ROW(2, '{a,NULL}'), '{"z": [1]}'), ARRAY[ROW(3, 'x', NULL, NULL)::pair, NULL],
            'a=>1, "b c"=>NULL, "q\\\""=>"v,=>"', ARRAY['k=>v'::hstore, NULL]),
        (2, NULL, '{}', '', '{}'), (3, ROW(NULL, NULL, NULL, NULL), NULL, NULL, NULL)""")
    execute(db, "UPDATE rich SET p.b = 'changed', h = h || 'n=>new' WHERE id = 1")
    execute(db, "DELETE FROM rich WHERE id = 2")
    handler = AutoSQL("copy", role="target")
    with db.cursor() as cur:
        handler.apply_batch(cur, drain(db))
    with db.cursor() as cur:
        cur.execute("SELECT r.id, r::text, c::text FROM rich r FULL JOIN copy c USING (id) ORDER BY 1")
        found = cur.fetchall()
    assert [row[0] for row in found] == [1, 3] and all(row[1] == row[2] for row in found), found


def test_fetch_batch_limits(orders):
    execute(orders, "INSERT INTO orders (name) SELECT 'row' || g FROM generate_series(1, 5) g")
    with orders.cursor() as cur:
        assert len(trigger.fetch_batch(cur, DEST, 3)) == 3
        assert len(trigger.fetch_batch(cur, DEST, 5, max_bytes=1)) == 1
        cur.execute("SELECT octet_length(packet::text) FROM golconde.queue ORDER BY id LIMIT 3")
        sizes = [size for (size,) in cur.fetchall()]
        assert len(trigger.fetch_batch(cur, DEST, 5, max_bytes=sum(sizes[:2]))) == 2
        assert len(trigger.fetch_batch(cur, DEST, 5, max_bytes=sum(sizes) - 1)) == 2
        # cut_by_bytes: the byte bound left out rows that the count bound would have taken
        assert trigger.fetch_batch(cur, DEST, 5, max_bytes=1).cut_by_bytes is True
        assert trigger.fetch_batch(cur, DEST, 5, max_bytes=sum(sizes[:2])).cut_by_bytes is True
        assert trigger.fetch_batch(cur, DEST, 5, max_bytes=10 ** 9).cut_by_bytes is False
        assert trigger.fetch_batch(cur, DEST, 3, max_bytes=10 ** 9).cut_by_bytes is False  # the count cut
        assert trigger.fetch_batch(cur, DEST, 5).cut_by_bytes is False                      # no byte bound
        cur.execute("SELECT id FROM golconde.queue ORDER BY id")
        ids = [row_id for (row_id,) in cur.fetchall()]
        last = trigger.fetch_batch(cur, DEST, 5, max_bytes=1, exclude=ids[:-1])
        assert [row.id for row in last] == ids[-1:] and last.cut_by_bytes is False  # nothing after it
        assert trigger.fetch_batch(cur, "other", 5, max_bytes=1).cut_by_bytes is False
        assert trigger.fetch_batch(cur, "other", 5) == []
        count, oldest = trigger.backlog(cur, DEST)
        assert count == 5 and oldest is not None
        with pytest.raises(ValueError):
            trigger.fetch_batch(cur, DEST, 0)
        assert trigger.delete_batch(cur, DEST, []) == 0


def test_drain_lock_is_exclusive(database):
    one = psycopg2.connect(database)
    two = psycopg2.connect(database)
    try:
        assert trigger.acquire_drain_lock(one, DEST)
        assert one.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        assert not trigger.acquire_drain_lock(two, DEST)
        assert trigger.acquire_drain_lock(two, "Test2")
        assert trigger.release_drain_lock(one, DEST)
        assert trigger.acquire_drain_lock(two, DEST)
        assert not trigger.acquire_drain_lock(one, DEST)
    finally:
        one.close()
    two.close()
    three = psycopg2.connect(database)  # a closed session frees its locks
    try:
        assert trigger.acquire_drain_lock(three, DEST)
    finally:
        three.close()


def test_writers_need_no_rights_on_the_queue(orders, database):
    role = "golconde_writer_%s" % uuid.uuid4().hex[:8]
    execute(orders, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        execute(orders, sql.SQL("GRANT INSERT ON orders TO {0}; GRANT USAGE ON SEQUENCE orders_id_seq"
                                " TO {0}").format(sql.Identifier(role)))
        writer = psycopg2.connect(database, user=role)
        try:
            execute(writer, "INSERT INTO orders (name) VALUES ('w')")
            with writer.cursor() as cur:   # the capture switched back to the writer
                cur.execute("SELECT current_user, session_user")
                assert cur.fetchone() == (role, role)
            writer.commit()
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                execute(writer, "SELECT * FROM golconde.queue")
        finally:
            writer.close()
        assert [p.data["name"] for p in drain(orders)] == ["w"]
    finally:
        execute(orders, sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_partitioned_table_and_odd_destination(db):
    execute(db, "CREATE TABLE events (id int, day date, PRIMARY KEY (id, day))"
                " PARTITION BY RANGE (day)")
    execute(db, "CREATE TABLE events_2024 PARTITION OF events"
                " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    destination = "it's \"odd\""
    assert trigger.install(db, "events", destination).key_columns == ("id", "day")
    execute(db, "INSERT INTO events VALUES (1, '2024-05-01')")
    execute(db, "DELETE FROM events")
    with db.cursor() as cur:
        batch = trigger.fetch_batch(cur, destination, 10)
    assert [queued.relation for queued in batch] == ["public.events_2024"] * 2
    assert parse(batch[1].packet).restriction == {"id": 1, "day": "2024-05-01"}


def test_key_mismatches_report_a_primary_key_changed_after_the_install(db):
    """The trigger's key columns are its arguments: a primary key changed since the install is
    reported (columns added, replaced, or the key dropped), an insert-only trigger and a
    partition's inherited trigger are not checked, and a reinstall clears the report."""
    execute(db, "CREATE TABLE accounts (id int PRIMARY KEY, region text NOT NULL, code text)")
    execute(db, "CREATE TABLE log (id int, line text)")           # no key: insert-only
    execute(db, "CREATE TABLE events (id int, day date, PRIMARY KEY (id, day))"
                " PARTITION BY RANGE (day)")
    execute(db, "CREATE TABLE events_2024 PARTITION OF events"
                " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    for table in ("accounts", "log", "events"):
        trigger.install(db, table, DEST)
    trigger.install(db, "accounts", "Other")
    with db.cursor() as cur:
        assert trigger.key_mismatches(cur, DEST) == []
    execute(db, "ALTER TABLE accounts DROP CONSTRAINT accounts_pkey,"
                " ADD PRIMARY KEY (region, id)")
    execute(db, "ALTER TABLE log ADD PRIMARY KEY (id)")
    with db.cursor() as cur:
        found = trigger.key_mismatches(cur, DEST)
        assert [(m.relation, m.captured, m.primary_key) for m in found] == [
            ("public.accounts", ("id",), ("region", "id"))]
        assert "primary key is now (region, id)" in str(found[0])
        assert "golconde trigger install" in str(found[0])
        # each destination's own triggers only
        assert [m.trigger for m in trigger.key_mismatches(cur, "Other")] == ["golconde_capture_Other"]
    execute(db, "ALTER TABLE events DROP CONSTRAINT events_pkey")
    execute(db, "ALTER TABLE accounts DROP CONSTRAINT accounts_pkey, ADD PRIMARY KEY (id)")
    with db.cursor() as cur:
        found = trigger.key_mismatches(cur, DEST)
    assert [(m.relation, m.captured, m.primary_key) for m in found] == [
        ("public.events", ("id", "day"), ())]
    assert "primary key is now none" in str(found[0])
    execute(db, "ALTER TABLE events ADD PRIMARY KEY (day, id)")   # the same columns: no report
    with db.cursor() as cur:
        assert trigger.key_mismatches(cur, DEST) == []
    execute(db, "ALTER TABLE accounts ALTER code SET NOT NULL,"
                " DROP CONSTRAINT accounts_pkey, ADD PRIMARY KEY (code, id)")
    with db.cursor() as cur:
        assert [m.relation for m in trigger.key_mismatches(cur, DEST)] == ["public.accounts"]
    trigger.install(db, "accounts", DEST)
    with db.cursor() as cur:
        assert trigger.key_mismatches(cur, DEST) == []
