"""golconde.capture() in C (sql/capture_c) against the PL/pgSQL reference (sql/triggers/capture.sql),
on a real PostgreSQL with the library installed by scripts/build-capture.sh (part of
scripts/setup.sh). Set GOLCONDE_TEST_CAPTURE=plpgsql to run the suite on a server where the library
cannot be installed: the C-only tests are then skipped and the rest run on the PL/pgSQL function."""
from __future__ import annotations

import os
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from golconde import trigger

from .test_trigger import TYPES, execute

PLPGSQL_ONLY = os.environ.get("GOLCONDE_TEST_CAPTURE") == "plpgsql"
needs_c = pytest.mark.skipif(PLPGSQL_ONLY, reason="GOLCONDE_TEST_CAPTURE=plpgsql")


def capture_sql(name: str) -> str:
    return dict(trigger.sql_files())[name]


def install_reference(conn) -> None:
    """The PL/pgSQL capture function as golconde.capture_reference(), from capture.sql's text."""
    execute(conn, capture_sql("capture.sql").replace("golconde.capture()", "golconde.capture_reference()"))


def attach(conn, table: str, function: str, destination: str, *keys: str, when: str = "AFTER",
           level: str = "ROW") -> None:
    execute(conn, sql.SQL("CREATE TRIGGER {} " + when + " INSERT OR UPDATE OR DELETE ON {} FOR EACH "
                          + level + " EXECUTE FUNCTION {}({})").format(
        sql.Identifier("t_" + destination), sql.Identifier(table), sql.SQL(function),
        sql.SQL(", ").join(sql.Literal(arg) for arg in (destination,) + keys)))


def queued(conn, destination: str):
    with conn.cursor() as cur:
        cur.execute("SELECT relation, packet, packet_id FROM golconde.queue WHERE destination = %s"
                    " ORDER BY id", (destination,))
        return cur.fetchall()


@needs_c
def test_capture_is_in_c_where_the_library_is_installed(db):
    trigger.install_schema(db)
    with db.cursor() as cur:
        assert trigger.capture_language(cur) == "c", (
            "golconde_capture.so is not installed in this server: run scripts/build-capture.sh")
    execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    assert trigger.install(db, "t", "D").capture == "c"


@needs_c
def test_c_and_plpgsql_write_the_same_packets(db):
    """Every type of the round-trip test, a composite key with odd names, INSERT, UPDATE, an
    UPDATE that changes nothing, DELETE: both functions queue equal packets (as jsonb) for the
    same relation, in the same order; the C function's packet ids are distinct random UUIDs."""
    trigger.install_schema(db)
    install_reference(db)
    columns = sql.SQL(", ").join(sql.SQL("{} " + kind).format(sql.Identifier(name))
                                 for name, kind, _ in TYPES)
    execute(db, sql.SQL("CREATE TABLE typed (id int PRIMARY KEY, {})").format(columns))
    execute(db, 'CREATE TABLE "Odd ""Table"" é" ("Key A" text, "k""b" date, v int, dropped int,'
                ' UNIQUE ("Key A", "k""b"))')  # nullable key columns: the trigger's key is its arguments
    execute(db, 'ALTER TABLE "Odd ""Table"" é" DROP COLUMN dropped')
    for function, destination in (("golconde.capture", "C"), ("golconde.capture_reference", "R")):
        attach(db, "typed", function, destination, "id")
        attach(db, 'Odd "Table" é', function, destination + "odd", "Key A", 'k"b')
    execute(db, "SET TimeZone = 'Asia/Kolkata'")
    execute(db, "INSERT INTO typed VALUES (1, %s), (2, %s)" % (
        ", ".join(value for _, _, value in TYPES), ", ".join("NULL" for _ in TYPES)))
    execute(db, "UPDATE typed SET pt = '(3,4)', t = 'changed' WHERE id = 1")
    execute(db, "UPDATE typed SET i = i WHERE id = 1")            # changes nothing: no packet
    execute(db, "UPDATE typed SET id = 3, i = 7 WHERE id = 2")    # the key itself changes
    execute(db, "DELETE FROM typed")
    execute(db, """INSERT INTO "Odd ""Table"" é" VALUES ('a"\\b ☃', '2024-02-29', 1), (NULL, '2020-01-01', 2)""")
    execute(db, """UPDATE "Odd ""Table"" é" SET v = v + 1""")
    execute(db, """DELETE FROM "Odd ""Table"" é" WHERE v = 2""")
    for c_dest, r_dest, count in (("C", "R", 6), ("Codd", "Rodd", 5)):
        c_rows, r_rows = queued(db, c_dest), queued(db, r_dest)
        assert len(c_rows) == count
        assert [row[:2] for row in c_rows] == [row[:2] for row in r_rows]
        ids = [uuid.UUID(row[2]) for row in c_rows]
        assert all(value.version == 4 and value.variant == uuid.RFC_4122 for value in ids)
    assert queued(db, "Codd")[0][0] == 'public."Odd ""Table"" é"' and queued(db, "C")[0][0] == "public.typed"
    everything = [row[2] for row in queued(db, "C") + queued(db, "Codd")]
    assert len(set(everything)) == len(everything)
    # the restriction of a NULL key column is JSON null in both
    assert queued(db, "Codd")[3][1]["restriction"] == {"Key A": None, "k\"b": "2020-01-01"}
    assert queued(db, "Codd")[4][1] == {"action": "delete", "restriction": {"Key A": 'a"\\b ☃', "k\"b": "2024-02-29"}}


@needs_c
@pytest.mark.parametrize("function", ["golconde.capture", "golconde.capture_reference"])
def test_misuse_is_refused_by_both(db, function):
    trigger.install_schema(db)
    install_reference(db)
    execute(db, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    execute(db, "INSERT INTO t VALUES (1, 1)")
    cases = [
        (dict(when="BEFORE"), "INSERT INTO t VALUES (2, 2)", r"must run AFTER \.\.\. FOR EACH ROW"),
        (dict(level="STATEMENT"), "INSERT INTO t VALUES (2, 2)", r"must run AFTER \.\.\. FOR EACH ROW"),
        (dict(keys=("nope",)), "UPDATE t SET v = 5", r"key column nope of trigger t_D is not a column of public\.t"),
        (dict(keys=()), "DELETE FROM t", r"names no key column: DELETE cannot be captured"),
        (dict(destination=""), "INSERT INTO t VALUES (2, 2)", r"needs the destination name"),
    ]
    for options, statement, message in cases:
        destination = options.pop("destination", "D")
        keys = options.pop("keys", ("id",))
        execute(db, "DROP TRIGGER IF EXISTS {0} ON t".format('"t_%s"' % destination))
        attach(db, "t", function, destination, *keys, **options)
        with pytest.raises(psycopg2.Error, match=message):
            execute(db, statement)
        execute(db, "DROP TRIGGER {0} ON t".format('"t_%s"' % destination))
    assert queued(db, "D") == []


def test_install_falls_back_to_plpgsql_without_the_library(db):
    """capture_c.sql with a library the server does not have: golconde.capture() stays PL/pgSQL,
    and the NOTICE says why."""
    trigger.install_schema(db)
    missing = capture_sql("capture_c.sql").replace("$libdir/golconde_capture", "$libdir/golconde_nope")
    assert missing != capture_sql("capture_c.sql")
    execute(db, capture_sql("capture.sql"))
    execute(db, missing)
    with db.cursor() as cur:
        assert trigger.capture_language(cur) == "plpgsql"
    assert any("stays in PL/pgSQL" in notice and "not installed" in notice for notice in db.notices)
    execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    execute(db, "CREATE TRIGGER c AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION golconde.capture('D', 'id')")
    execute(db, "INSERT INTO t VALUES (1)")
    assert [row[1] for row in queued(db, "D")] == [{"action": "add", "data": {"id": 1}}]


def test_old_queue_layout_is_upgraded_in_place(db):
    """A queue of the earlier layout (primary key id, index on (destination, id)) keeps its rows
    and gets the single primary key (destination, id)."""
    execute(db, "CREATE SCHEMA golconde")
    execute(db, "CREATE TABLE golconde.queue (id bigserial PRIMARY KEY, packet_id uuid NOT NULL DEFAULT"
                " gen_random_uuid(), destination text NOT NULL, relation text NOT NULL, txid xid8 NOT NULL"
                " DEFAULT pg_current_xact_id(), created_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                " packet jsonb NOT NULL)")
    execute(db, "CREATE INDEX queue_destination_id_idx ON golconde.queue (destination, id)")
    execute(db, "INSERT INTO golconde.queue (destination, relation, packet) VALUES"
                " ('D', 'public.t', '{\"action\": \"add\", \"data\": {\"id\": 1}}')")
    trigger.install_schema(db)
    trigger.install_schema(db)
    with db.cursor() as cur:
        cur.execute("SELECT indexrelid::regclass::text, indkey::text FROM pg_index"
                    " WHERE indrelid = 'golconde.queue'::regclass")
        assert cur.fetchall() == [("golconde.queue_pkey", "3 1")]
        batch = trigger.fetch_batch(cur, "D", 10)
        assert [queued.packet for queued in batch] == [{"action": "add", "data": {"id": 1}}]
        assert trigger.delete_batch(cur, "D", [batch[0].id]) == 1
