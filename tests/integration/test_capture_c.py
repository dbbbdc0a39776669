"""golconde.capture() in C (sql/capture_c) against the PL/pgSQL reference
golconde.capture_plpgsql() (sql/triggers/capture.sql), on a real PostgreSQL with the library
installed by scripts/build-capture.sh (part of scripts/setup.sh). Set
GOLCONDE_TEST_CAPTURE=plpgsql to run the suite on a server where the library cannot be installed:
the C-only tests are then skipped and the rest run on the PL/pgSQL function."""
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

C, REFERENCE = "golconde.capture", "golconde.capture_plpgsql"


def capture_sql(name: str) -> str:
    return dict(trigger.sql_files())[name]


def language(conn) -> str:
    with conn.cursor() as cur:
        return trigger.capture_language(cur)


def attach(conn, table: str, function: str, destination: str, *keys: str, when: str = "AFTER",
           level: str = "ROW") -> None:
    execute(conn, sql.SQL("CREATE TRIGGER {} " + when + " INSERT OR UPDATE OR DELETE ON {} FOR EACH "
                          + level + " EXECUTE FUNCTION {}({})").format(
        sql.Identifier("t_" + destination), sql.Identifier(table), sql.SQL(function),
        sql.SQL(", ").join(sql.Literal(arg) for arg in (destination,) + keys)))


def attach_both(conn, table: str, destination: str, *keys: str) -> None:
    """The C function as destination ``C<destination>``, the reference as ``R<destination>``."""
    attach(conn, table, C, "C" + destination, *keys)
    attach(conn, table, REFERENCE, "R" + destination, *keys)


def queued(conn, destination: str):
    """``(relation, packet as jsonb text, packet_id)`` of ``destination``'s rows, in capture order.
    jsonb's text form is canonical, so equal texts are equal packets, numbers and types included."""
    with conn.cursor() as cur:
        cur.execute("SELECT relation, packet::text, packet_id FROM golconde.queue WHERE destination = %s"
                    " ORDER BY id", (destination,))
        return cur.fetchall()


def assert_same(conn, destination: str, count: int) -> None:
    c_rows, r_rows = queued(conn, "C" + destination), queued(conn, "R" + destination)
    assert len(c_rows) == count
    assert [row[:2] for row in c_rows] == [row[:2] for row in r_rows]
    ids = [uuid.UUID(row[2]) for row in c_rows]
    assert all(value.version == 4 and value.variant == uuid.RFC_4122 for value in ids)


@pytest.fixture
def both(db):
    """A database with the capture schema, where golconde.capture() must be the C function."""
    trigger.install_schema(db)
    assert language(db) == "c", "golconde_capture.so is not installed here: run scripts/build-capture.sh"
    return db


@needs_c
def test_capture_is_in_c_where_the_library_is_installed(both):
    execute(both, "CREATE TABLE t (id int PRIMARY KEY)")
    assert trigger.install(both, "t", "D").capture == "c"
    assert trigger.schema_state(both) == "current"


@needs_c
def test_c_and_plpgsql_write_the_same_packets(both):
    """Every type of the round-trip test, a composite key with odd names, INSERT, UPDATE, an
    UPDATE that changes nothing, an UPDATE of the key, DELETE: both functions queue the same
    packets (compared as jsonb text) for the same relation, in the same order."""
    db = both
    columns = sql.SQL(", ").join(sql.SQL("{} " + kind).format(sql.Identifier(name))
                                 for name, kind, _ in TYPES)
    execute(db, sql.SQL("CREATE TABLE typed (id int PRIMARY KEY, {})").format(columns))
    execute(db, 'CREATE TABLE "Odd ""Table"" é" ("Key A" text, "k""b" date, v int, dropped int,'
                ' UNIQUE ("Key A", "k""b"))')  # nullable key columns: the trigger's key is its arguments
    execute(db, 'ALTER TABLE "Odd ""Table"" é" DROP COLUMN dropped')
    attach_both(db, "typed", "", "id")
    attach_both(db, 'Odd "Table" é', "odd", "Key A", 'k"b')
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
    assert_same(db, "", 6)
    assert_same(db, "odd", 5)
    assert queued(db, "Codd")[0][0] == 'public."Odd ""Table"" é"' and queued(db, "C")[0][0] == "public.typed"
    # the restriction of a NULL key column is JSON null
    assert queued(db, "Codd")[3][1].endswith('"restriction": {"k\\"b": "2020-01-01", "Key A": null}}')


@needs_c
def test_same_packets_for_toast_domains_casts_composites_partitions_and_generated_columns(both):
    db = both
    execute(db, "CREATE EXTENSION IF NOT EXISTS hstore")
    execute(db, "CREATE DOMAIN positive AS numeric CHECK (VALUE > 0)")
    execute(db, "CREATE TYPE pair AS (a int, b text)")
    execute(db, "CREATE TYPE mood AS ENUM ('sad', 'happy')")
    execute(db, "CREATE TABLE wide (id int PRIMARY KEY, big text, h hstore, p positive, prs pair[],"
                " m mood, f float8, r real, g int GENERATED ALWAYS AS (id * 2) STORED)")
    execute(db, "INSERT INTO wide (id, big) VALUES (0, 'before the column with a default')")
    execute(db, "ALTER TABLE wide ADD COLUMN later text DEFAULT 'default value'")
    execute(db, "CREATE TABLE parts (id int, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    execute(db, "CREATE TABLE parts_2024 PARTITION OF parts FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    execute(db, "CREATE TABLE parts_2025 (v text, day date NOT NULL, id int NOT NULL)")  # other column order
    execute(db, "ALTER TABLE parts ATTACH PARTITION parts_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    attach_both(db, "wide", "w", "id")
    attach_both(db, "parts", "p", "id", "day")
    execute(db, "INSERT INTO wide (id, big, h, p, prs, m, f, r) VALUES (1, repeat('x', 100000) || 'é',"
                " 'a=>1, \"b c\"=>NULL', 3.10, ARRAY[ROW(1, 'q\"')::pair, NULL], 'happy', 'Infinity',"
                " '-Infinity'), (2, NULL, NULL, NULL, NULL, NULL, 'NaN', 1.5)")
    execute(db, "UPDATE wide SET big = big WHERE id = 1")        # TOASTed, unchanged: no packet
    execute(db, "UPDATE wide SET m = 'sad' WHERE id = 1")        # TOASTed value carried along
    execute(db, "UPDATE wide SET later = NULL WHERE id = 0")     # a row from before the new column
    execute(db, "DELETE FROM wide WHERE id = 2")
    execute(db, "INSERT INTO parts VALUES (1, '2024-05-01', 'a'), (2, '2025-05-01', 'b')")
    execute(db, "UPDATE parts SET v = v || '!'")
    execute(db, "UPDATE parts SET day = '2025-06-01' WHERE id = 1")   # moves across partitions
    assert_same(db, "w", 5)
    assert_same(db, "p", 6)
    rows = queued(db, "Cw")
    assert len(rows[0][1]) > 100000 and '"g": 2' in rows[0][1] and '"later": "default value"' in rows[0][1]
    assert [row[0] for row in queued(db, "Cp")][:2] == ["public.parts_2024", "public.parts_2025"]


@needs_c
def test_the_writers_output_settings_do_not_change_the_packets(both):
    """A writer whose session prints dates day first (a range's bounds, printed by its output
    function, read back month first), intervals the SQL-standard way (which reads back with
    another sign), doubles with 15 digits or bytea escaped: both captures write the values as
    the default settings print them, the same as for a writer with the defaults, and the
    writer's settings are as it set them afterwards."""
    db = both
    execute(db, "CREATE TABLE vals (id int PRIMARY KEY, iv interval, f float8, b bytea,"
                " dr daterange, tr tstzrange)")
    attach_both(db, "vals", "v", "id")
    row = ("'-1 day -2 hours', 0.1::float8 + 0.2::float8, '\\x00ff'::bytea,"
           " '[2020-02-01,2020-03-05)', '[2020-02-01 00:00+00,2020-03-05 00:00+00)'")
    execute(db, "SET TimeZone = 'UTC'")
    execute(db, "INSERT INTO vals VALUES (1, %s)" % row)
    execute(db, "SET DateStyle = 'SQL, DMY'; SET IntervalStyle = sql_standard;"
                " SET extra_float_digits = 0; SET bytea_output = escape")
    execute(db, "INSERT INTO vals VALUES (2, %s)" % row)
    with db.cursor() as cur:
        cur.execute("SHOW IntervalStyle")
        assert cur.fetchone() == ("sql_standard",)
        cur.execute("SHOW DateStyle")
        assert cur.fetchone() == ("SQL, DMY",)
    execute(db, "RESET ALL")
    assert_same(db, "v", 2)
    first, second = [packet for _, packet, _ in queued(db, "Cv")]
    assert second == first.replace('"id": 1', '"id": 2')
    assert '"iv": "-1 days -02:00:00"' in second and '"f": 0.30000000000000004' in second
    assert '"b": "\\\\x00ff"' in second
    assert '"dr": "[2020-02-01,2020-03-05)"' in second
    assert '"tr": "[\\"2020-02-01 00:00:00+00\\",\\"2020-03-05 00:00:00+00\\")"' in second


@needs_c
def test_packet_ids_differ_across_connections(both, database):
    execute(both, "CREATE TABLE t (id int PRIMARY KEY)")
    attach(both, "t", C, "D", "id")
    for start in (1, 100, 200):
        other = psycopg2.connect(database)
        other.autocommit = True
        try:
            execute(other, "INSERT INTO t SELECT g FROM generate_series(%s, %s) g", (start, start + 49))
        finally:
            other.close()
    ids = [row[2] for row in queued(both, "D")]
    assert len(ids) == 150 and len(set(ids)) == 150


@needs_c
def test_kept_plan_survives_the_queue_being_recreated(both):
    """The C function prepares its insert once per backend; after the capture schema is dropped
    and installed again, the same session captures into the new queue."""
    execute(both, "CREATE TABLE t (id int PRIMARY KEY)")
    attach(both, "t", C, "D", "id")
    execute(both, "INSERT INTO t VALUES (1)")
    execute(both, "DROP SCHEMA golconde CASCADE")   # drops the trigger with the function
    trigger.install_schema(both)
    attach(both, "t", C, "D", "id")
    execute(both, "INSERT INTO t VALUES (2)")
    assert [row[1] for row in queued(both, "D")] == ['{"data": {"id": 2}, "action": "add"}']


@needs_c
@pytest.mark.parametrize("function", [C, REFERENCE])
def test_misuse_is_refused_by_both(both, function):
    db = both
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
        attach(db, "t", function, destination, *keys, **options)
        with pytest.raises(psycopg2.Error, match=message):
            execute(db, statement)
        execute(db, sql.SQL("DROP TRIGGER {} ON t").format(sql.Identifier("t_" + destination)))
    assert queued(db, "D") == []


def test_install_falls_back_to_plpgsql_without_the_library(db):
    """capture_c.sql with a library the server does not have: golconde.capture() is the PL/pgSQL
    function (also when it was C before: its library is gone), and the NOTICE says why."""
    trigger.install_schema(db)
    missing = capture_sql("capture_c.sql").replace("$libdir/golconde_capture", "$libdir/golconde_nope")
    assert missing != capture_sql("capture_c.sql")
    del db.notices[:]
    execute(db, missing)
    assert language(db) == "plpgsql"
    assert any("NOTICE" in notice and "is in PL/pgSQL" in notice and "not installed" in notice
               for notice in db.notices)
    # SECURITY DEFINER: the install warns that a cast to json would run as its owner
    assert any("WARNING" in notice and "SECURITY DEFINER" in notice and "runs as its owner" in notice
               for notice in db.notices)
    execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    execute(db, "CREATE TRIGGER c AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION golconde.capture('D', 'id')")
    execute(db, "INSERT INTO t VALUES (1)")
    assert [row[1] for row in queued(db, "D")] == ['{"data": {"id": 1}, "action": "add"}']
    with db.cursor() as cur:
        cur.execute("SELECT proacl::text[] FROM pg_proc WHERE oid = 'golconde.capture()'::regprocedure")
        assert not any(grant.startswith("=") for grant in cur.fetchone()[0])  # not PUBLIC's
    assert trigger.schema_state(db) == "plpgsql"


@needs_c
def test_a_library_of_another_version_is_not_used(both):
    expecting_other = capture_sql("capture_c.sql").replace("c_expected CONSTANT integer := %d;"
                                                           % trigger.CAPTURE_VERSION,
                                                           "c_expected CONSTANT integer := 999;")
    assert expecting_other != capture_sql("capture_c.sql")
    del both.notices[:]
    execute(both, expecting_other)
    assert language(both) == "plpgsql"
    expected = "golconde_capture is version %d, this install expects 999" % trigger.CAPTURE_VERSION
    assert any("WARNING" in notice and expected in notice for notice in both.notices)
    trigger.install_schema(both)        # the real install switches back
    assert language(both) == "c"


def test_old_queue_layout_is_upgraded_in_place(db):
    """A queue of an earlier layout (a plain table: primary key id, index on (destination, id))
    is replaced by the partitioned one with its rows, their transaction ids and its sequence;
    install() upgrades it."""
    execute(db, "CREATE SCHEMA golconde")
    execute(db, "CREATE TABLE golconde.queue (id bigserial PRIMARY KEY, packet_id uuid NOT NULL DEFAULT"
                " gen_random_uuid(), destination text NOT NULL, relation text NOT NULL, txid xid8 NOT NULL"
                " DEFAULT pg_current_xact_id(), created_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                " packet jsonb NOT NULL)")
    execute(db, "CREATE INDEX queue_destination_id_idx ON golconde.queue (destination, id)")
    execute(db, "ALTER TABLE golconde.queue RENAME CONSTRAINT queue_pkey TO queue_id_key")  # any name
    execute(db, "CREATE FUNCTION golconde.capture() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
    execute(db, "INSERT INTO golconde.queue (destination, relation, packet) VALUES"
                " ('D', 'public.t', '{\"action\": \"add\", \"data\": {\"id\": 1}}')")
    assert trigger.schema_state(db) == "old"
    with db.cursor() as cur:
        cur.execute("SELECT id, txid::text FROM golconde.queue")
        [(old_id, old_txid)] = cur.fetchall()
    execute(db, "CREATE TABLE t (id int PRIMARY KEY)")
    trigger.install(db, "t", "D")
    assert trigger.schema_state(db) in ("current", "plpgsql")
    with db.cursor() as cur:
        cur.execute("SELECT indexrelid::regclass::text, indkey::text FROM pg_index"
                    " WHERE indrelid = 'golconde.queue'::regclass ORDER BY 1")
        assert cur.fetchall() == [("golconde.queue_drain_idx", "3 1"), ("golconde.queue_txid_idx", "3 5")]
        cur.execute("SELECT relkind FROM pg_class WHERE oid = 'golconde.queue'::regclass")
        assert cur.fetchone() == ("p",)
        cur.execute("SELECT txid = %s::xid8 FROM golconde.queue", (old_txid,))
        assert cur.fetchall() == [(True,)]
        batch = trigger.fetch_batch(cur, "D", 10)
        assert [queued.packet for queued in batch] == [{"action": "add", "data": {"id": 1}}]
        assert [queued.id for queued in batch] == [old_id]
    execute(db, "INSERT INTO t VALUES (1)")             # the sequence goes on
    with db.cursor() as cur:
        cur.execute("SELECT id FROM golconde.queue ORDER BY id")
        assert cur.fetchall() == [(old_id,), (old_id + 1,)]
        assert trigger.delete_batch(cur, "D", [old_id]) == 1


def test_install_by_a_role_that_does_not_own_the_schema(db, database, caplog):
    """Once an owner installed the schema, a role that may create triggers on its own table (and
    execute golconde.capture()) installs its trigger; the schema is left as it is."""
    trigger.install_schema(db)
    # a PL/pgSQL capture: install() tries the upgrade (to C), which this role may not do
    execute(db, capture_sql("capture_c.sql").replace("$libdir/golconde_capture", "$libdir/golconde_nope"))
    before = language(db)
    assert before == "plpgsql" and trigger.schema_state(db) == "plpgsql"
    role = "golconde_installer_%s" % uuid.uuid4().hex[:8]
    execute(db, sql.SQL("CREATE ROLE {0} LOGIN; GRANT USAGE ON SCHEMA golconde TO {0};"
                        " GRANT EXECUTE ON FUNCTION golconde.capture() TO {0};"
                        " GRANT CREATE ON SCHEMA public TO {0}").format(sql.Identifier(role)))
    try:
        other = psycopg2.connect(database, user=role)
        other.autocommit = True
        try:
            execute(other, "CREATE TABLE mine (id int PRIMARY KEY)")
            with caplog.at_level("WARNING", logger="golconde.trigger"):
                result = trigger.install(other, "mine", "D")
            assert result.capture == before and result.events == ("INSERT", "UPDATE", "DELETE")
            assert any("capture schema golconde (plpgsql) not upgraded" in record.getMessage()
                       for record in caplog.records)
            execute(other, "INSERT INTO mine VALUES (1)")
        finally:
            other.close()
        assert language(db) == before
        assert [row[1] for row in queued(db, "D")] == ['{"data": {"id": 1}, "action": "add"}']
    finally:
        execute(db, sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))


def test_versions_in_python_and_sql_agree(db):
    trigger.install_schema(db)
    with db.cursor() as cur:
        cur.execute("SELECT golconde.schema_version()")
        assert cur.fetchone()[0] == trigger.SCHEMA_VERSION
    assert "c_expected CONSTANT integer := %d;" % trigger.CAPTURE_VERSION in capture_sql("capture_c.sql")
    source = os.path.join(os.path.dirname(__file__), "..", "..", "sql", "capture_c", "golconde_capture.c")
    with open(source, encoding="utf-8") as handle:
        assert "#define CAPTURE_VERSION %d\n" % trigger.CAPTURE_VERSION in handle.read()


@needs_c
def test_a_library_not_at_the_expected_version_makes_the_schema_old(both, monkeypatch, caplog):
    """As on a standby with another build: schema_state() loads the library and compares its
    version, so that trigger install re-runs the install (which falls back to PL/pgSQL there)."""
    monkeypatch.setattr(trigger, "CAPTURE_VERSION", trigger.CAPTURE_VERSION + 1)
    with caplog.at_level("WARNING", logger="golconde.trigger"):
        assert trigger.schema_state(both) == "old"
    assert any("its library is version" in record.getMessage() for record in caplog.records)


def test_failed_install_changes_nothing(db):
    with pytest.raises(trigger.TriggerError):
        trigger.install(db, "nope", "D")
    execute(db, "CREATE TABLE keyless (v int)")
    with pytest.raises(trigger.TriggerError, match="no primary key"):
        trigger.install(db, "keyless", "D", actions=["update"])
    assert trigger.schema_state(db) == "missing"


@needs_c
def test_rights_of_the_writer_and_of_the_owner(both, database):
    """The C capture formats the row as the writer (a user cast to json sees current_user = the
    writer), inserts into the queue as the function's owner (the writer has no rights on it), is
    the writer again afterwards, also after a failed insert caught by the writer's own EXCEPTION
    block, and follows an owner change in the same session."""
    db = both
    writer = "golconde_writer_%s" % uuid.uuid4().hex[:8]
    owner = "golconde_owner_%s" % uuid.uuid4().hex[:8]
    execute(db, "CREATE TYPE mood AS ENUM ('a', 'b')")   # a user type: its cast to json is used
    execute(db, "CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql"
                " AS $$ SELECT json_build_object('v', $1::text, 'by', current_user::text) $$")
    execute(db, "CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)")
    execute(db, "CREATE TABLE t (id int PRIMARY KEY, m mood)")
    execute(db, sql.SQL("CREATE ROLE {0} LOGIN; GRANT INSERT ON t TO {0}; GRANT CREATE ON SCHEMA public TO {0};"
                        " CREATE ROLE {1}").format(sql.Identifier(writer), sql.Identifier(owner)))
    try:
        attach(db, "t", C, "D", "id")
        conn = psycopg2.connect(database, user=writer)
        conn.autocommit = True
        try:
            execute(conn, "INSERT INTO t VALUES (1, 'a')")
            with conn.cursor() as cur:
                cur.execute("SELECT current_user::text")
                assert cur.fetchone()[0] == writer
            assert [row[1] for row in queued(db, "D")] == [
                '{"data": {"m": {"v": "a", "by": "%s"}, "id": 1}, "action": "add"}' % writer]
            # a queue insert that fails, caught by the writer's EXCEPTION block: the writer again
            execute(conn, "CREATE FUNCTION try_insert() RETURNS text LANGUAGE plpgsql AS $$"
                          " BEGIN INSERT INTO t VALUES (3, 'b'); RETURN 'inserted';"
                          " EXCEPTION WHEN check_violation THEN RETURN current_user::text; END $$")
            execute(db, "ALTER TABLE golconde.queue ADD CONSTRAINT small"
                        " CHECK (octet_length(packet::text) < 40) NOT VALID")
            with conn.cursor() as cur:
                cur.execute("SELECT try_insert(), current_user::text")
                assert cur.fetchone() == (writer, writer)
            execute(db, "ALTER TABLE golconde.queue DROP CONSTRAINT small")
            # the owner changes: this same session now inserts as the new owner, who may not
            execute(db, sql.SQL("ALTER FUNCTION golconde.capture() OWNER TO {}").format(sql.Identifier(owner)))
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                execute(conn, "INSERT INTO t VALUES (4, 'a')")
        finally:
            conn.close()
        assert len(queued(db, "D")) == 1
    finally:
        execute(db, "ALTER FUNCTION golconde.capture() OWNER TO CURRENT_USER")
        execute(db, sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}; DROP OWNED BY {1}; DROP ROLE {1}").format(
            sql.Identifier(writer), sql.Identifier(owner)))
