"""AutoSQL and the schema cache against a real PostgreSQL (one new database per test)."""
from __future__ import annotations

import datetime
import time
import uuid
from decimal import Decimal

import psycopg2
import psycopg2.errors
import pytest

from golconde import errors
from golconde.errors import PacketError, StopListener
from golconde.handlers.autosql import AutoSQL, insert_statement
from golconde.packet import Action, Packet, dumps, loads, parse
from golconde.schema import Relation, SchemaCache, parse_relation, read_schema


def run(db, handler, document):
    """Apply a packet given as a dict (through JSON, as it comes off the wire)."""
    with db.cursor() as cur:
        return handler.apply(cur, parse(dumps(document)))


def rows(db, query, params=None):
    with db.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def ddl(db, statement):
    with db.cursor() as cur:
        cur.execute(statement)


class Clock:
    """A hand-driven monotonic clock for SchemaCache."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- the four actions, NULL ----------------------------------------------------------------------

def test_four_actions(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, name text, n int)")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "name": "one", "n": 1}})
    run(db, h, {"action": "add", "data": {"id": 2, "name": "two", "n": 2}})
    run(db, h, {"action": "set", "data": {"id": 3, "name": "three"}})
    run(db, h, {"action": "update", "data": {"n": 20}, "restriction": {"id": 2}})
    run(db, h, {"action": "delete", "restriction": {"id": 1}})
    assert rows(db, "SELECT id, name, n FROM t ORDER BY id") == [(2, "two", 20), (3, "three", None)]


def test_whole_row_update_leaves_an_unchanged_identity_key_alone(db):
    """The capture trigger's UPDATE packet repeats the key in its data. A GENERATED ALWAYS identity
    column takes no value but DEFAULT, so the single-row statement leaves the unchanged key out of
    SET (as a run's statement does) instead of failing; a changed key is still set, and refused."""
    ddl(db, "CREATE TABLE ident (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)")
    for role in ("destination", "target"):
        h = AutoSQL("ident", role=role)
        run(db, h, {"action": "add", "data": {"id": 7, "v": "a"}})
        run(db, h, {"action": "update", "data": {"id": 7, "v": "b-" + role}, "restriction": {"id": 7}})
        assert rows(db, "SELECT id, v FROM ident") == [(7, "b-" + role)]
        with pytest.raises(psycopg2.Error, match="DEFAULT"):
            run(db, h, {"action": "update", "data": {"id": 8, "v": "c"}, "restriction": {"id": 7}})
        run(db, h, {"action": "delete", "restriction": {"id": 7}})
    ddl(db, "CREATE TABLE plain (id integer PRIMARY KEY, v text)")
    h = AutoSQL("plain", role="target")
    run(db, h, {"action": "add", "data": {"id": 1, "v": "a"}})
    run(db, h, {"action": "update", "data": {"id": 2, "v": "b"}, "restriction": {"id": 1}})
    run(db, h, {"action": "update", "data": {"id": "2", "v": "c"}, "restriction": {"id": 2}})
    assert rows(db, "SELECT id, v FROM plain") == [(2, "c")]
    # any other key repeated in the data is set, alone and in a run: 1.0 replaces 1.00
    ddl(db, "CREATE TABLE amounts (amount numeric PRIMARY KEY, note text);"
            " INSERT INTO amounts VALUES (1.00, 'a'), (2.00, 'b'), (3.00, 'c')")
    h = AutoSQL("amounts", role="target")
    run(db, h, {"action": "update", "data": {"amount": Decimal("1.0"), "note": "x"}, "restriction": {"amount": Decimal("1.0")}})
    with db.cursor() as cur:
        h.apply_batch(cur, [parse(dumps({"action": "update", "data": {"amount": Decimal(n), "note": "y"},
                                         "restriction": {"amount": Decimal(n)}})) for n in ("2.0", "3.0")])
    assert [str(a) for a, in rows(db, "SELECT amount FROM amounts ORDER BY amount")] == ["1.0", "2.0", "3.0"]


def test_null_stays_null_and_restriction_null_is_is_null(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text, b int)")
    h = AutoSQL("public.t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "a": None, "b": 1}})
    run(db, h, {"action": "add", "data": {"id": 2, "a": "x", "b": 2}})
    assert rows(db, "SELECT a IS NULL FROM t WHERE id = 1") == [(True,)]
    run(db, h, {"action": "update", "data": {"b": 10}, "restriction": {"a": None}})
    assert rows(db, "SELECT id, b FROM t ORDER BY id") == [(1, 10), (2, 2)]
    run(db, h, {"action": "update", "data": {"a": None}, "restriction": {"id": 2}})
    run(db, h, {"action": "delete", "restriction": {"a": None, "b": 10}})
    assert rows(db, "SELECT id, a FROM t") == [(2, None)]


# --- values round-trip ---------------------------------------------------------------------------

ROUND_TRIP = [
    ("jsonb", {"a": 1, "b": [1, Decimal("2.50"), None], "c": "x'y\"z", "d": {"e": True}}),
    ("jsonb", [1, "two", None, {"three": 3}]),
    ("jsonb", "just a string"),
    ("jsonb", Decimal("12345678901234567890.123456789")),
    ("jsonb", True),
    ("json", {"b": 1, "a": [Decimal("1.10")]}),
    ("json", ["x", 1]),
    ("json", "s"),
]


@pytest.mark.parametrize("type_name,value", ROUND_TRIP)
def test_json_round_trip(db, type_name, value):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, v %s)" % type_name)
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "v": value}})
    [(text,)] = rows(db, "SELECT v::text FROM t")
    assert loads(text) == value
    # the same value as a restriction finds the row (json is compared as jsonb)
    run(db, h, {"action": "update", "data": {"id": 2}, "restriction": {"v": value}})
    assert rows(db, "SELECT id FROM t") == [(2,)]


@pytest.mark.parametrize("type_name,value,expected", [
    ("int[]", [1, None, 3], [1, None, 3]),
    ("int[]", [], []),
    ("int[]", [[1, 2], [3, None]], [[1, 2], [3, None]]),
    ("int[]", "{4,5}", [4, 5]),
    ("text[]", ["a", None, "b,c", 'q"uote', "", "NULL", "{}", "back\\slash"],
     ["a", None, "b,c", 'q"uote', "", "NULL", "{}", "back\\slash"]),
    ("text[]", [], []),
    ("text[]", [None], [None]),
])
def test_array_round_trip(db, type_name, value, expected):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, v %s)" % type_name)
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "v": value}})
    assert rows(db, "SELECT v FROM t") == [(expected,)]
    run(db, h, {"action": "delete", "restriction": {"v": value}})
    assert rows(db, "SELECT count(*) FROM t") == [(0,)]


def test_jsonb_array_column(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, v jsonb[])")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "v": [{"a": 1}, [1, 2], None, "s"]}})
    assert rows(db, "SELECT v::text FROM t") == [('{"{\\"a\\": 1}","[1, 2]",NULL,"\\"s\\""}',)]


def test_scalar_types_round_trip(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, n numeric, ts timestamptz, d date, b bytea,"
            " u uuid, flag boolean, iv interval, r real)")
    h = AutoSQL("t", role="destination")
    number = Decimal("123456789012345.678901234567890")  # 30 significant digits
    ident = str(uuid.uuid4())
    data = {"id": 1, "n": number, "ts": "2024-02-29T12:34:56.789012+02:00", "d": "2024-02-29",
            "b": "\\x00ff10275c", "u": ident, "flag": False, "iv": "P1DT2H", "r": Decimal("1.5")}
    run(db, h, {"action": "add", "data": data})
    [row] = rows(db, "SELECT n, ts, d, b, u::text, flag, iv, r, n::text FROM t")
    assert row[0] == number and row[8] == "123456789012345.678901234567890"
    assert row[1] == datetime.datetime.fromisoformat("2024-02-29T12:34:56.789012+02:00")
    assert row[2] == datetime.date(2024, 2, 29)
    assert bytes(row[3]) == b"\x00\xff\x10'\\"
    assert row[4] == ident and row[5] is False
    assert row[6] == datetime.timedelta(days=1, hours=2) and row[7] == 1.5
    # every value also works in a restriction
    restriction = dict(data)
    del restriction["id"]
    run(db, h, {"action": "update", "data": {"flag": True}, "restriction": restriction})
    assert rows(db, "SELECT flag FROM t") == [(True,)]


def test_typmod_types_are_not_truncated(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, c char(5), b bit(3), v varchar(4), cs char(3)[], n numeric(6,2))")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "c": "abc", "b": "101", "v": "abcd", "cs": ["ab", "xyz"],
                                          "n": Decimal("1234.5")}})
    assert rows(db, "SELECT c, b, v, cs, n FROM t") == [("abc  ", "101", "abcd", ["ab ", "xyz"], Decimal("1234.50"))]
    run(db, h, {"action": "delete", "restriction": {"c": "abc", "b": "101"}})
    assert rows(db, "SELECT count(*) FROM t") == [(0,)]
    with pytest.raises(psycopg2.errors.StringDataRightTruncation):
        run(db, h, {"action": "add", "data": {"id": 2, "v": "abcde"}})


def test_domains_with_a_bound_are_not_truncated(db):
    """A value cast to a domain over varchar(4) or bit(3) would be cut to fit; it is cast to the
    base type instead, and the column's domain refuses it (its checks still apply), alone or in a
    run. A restriction longer than the bound matches nothing (a cut one would match)."""
    ddl(db, "CREATE DOMAIN short AS varchar(4); CREATE DOMAIN bits AS bit(3);"
            " CREATE DOMAIN positive AS integer CHECK (VALUE > 0);"
            " CREATE TABLE d (id int PRIMARY KEY, s short, b bits, p positive)")
    h = AutoSQL("d", role="target")
    run(db, h, {"action": "add", "data": {"id": 1, "s": "abcd", "b": "101", "p": 1}})
    for data in ({"s": "abcde"}, {"b": "1010"}, {"p": 0}):
        with pytest.raises(psycopg2.Error):
            run(db, h, {"action": "add", "data": dict(data, id=2)})
        with db.cursor() as cur, pytest.raises(psycopg2.Error):
            h.apply_batch(cur, [parse(dumps({"action": "add", "data": dict(data, id=i)})) for i in (3, 4)])
    run(db, h, {"action": "delete", "restriction": {"s": "abcdX"}})
    assert rows(db, "SELECT id, s, b, p FROM d") == [(1, "abcd", "101", 1)]


def test_booleans_and_numbers_are_not_taken_for_each_other(db):
    """PostgreSQL assigns no boolean to a numeric column nor a number to a boolean one; a cast
    would (true -> 1, 5 -> true). Such a packet is refused, alone or in a run; the text forms
    ("1", "t") and a boolean for a text column are as PostgreSQL takes them."""
    ddl(db, "CREATE TABLE f (id int PRIMARY KEY, flag boolean, n integer, x numeric, t text)")
    h = AutoSQL("f", role="target")
    for data in ({"flag": 5}, {"flag": 1}, {"flag": Decimal("0.0")}, {"n": True}, {"x": False}):
        with pytest.raises(PacketError, match="expected"):
            run(db, h, {"action": "add", "data": dict(data, id=1)})
        with db.cursor() as cur, pytest.raises(PacketError, match="expected"):
            h.apply_batch(cur, [parse(dumps({"action": "add", "data": dict(data, id=i)})) for i in (2, 3)])
        with pytest.raises(PacketError, match="expected"):
            run(db, h, {"action": "delete", "restriction": data})
    run(db, h, {"action": "add", "data": {"id": 1, "flag": "1", "n": "2", "t": True}})
    run(db, h, {"action": "add", "data": {"id": 2, "flag": "f", "n": 3, "x": 1, "t": False}})
    assert rows(db, "SELECT id, flag, n, x, t FROM f ORDER BY id") == [(1, True, 2, None, "true"),
                                                                       (2, False, 3, 1, "false")]


def test_a_deferrable_primary_key_is_still_the_primary_key(db):
    """ON CONFLICT cannot use a DEFERRABLE key, but it is still the primary key: a destination
    back-fills its generated values (targets must get the canonical keys), and a set says why it
    has no key to use."""
    ddl(db, "CREATE TABLE dk (id serial PRIMARY KEY DEFERRABLE, v text)")
    h = AutoSQL("dk", role="destination")
    assert run(db, h, {"action": "add", "data": {"v": "a"}}).data == {"v": "a", "id": 1}
    with db.cursor() as cur:
        assert [p.data for p in h.apply_batch(cur, [parse(dumps({"action": "add", "data": {"v": v}}))
                                                    for v in "bc"])] == [{"v": "b", "id": 2}, {"v": "c", "id": 3}]
    with pytest.raises(PacketError, match=r"primary key \(id\) is DEFERRABLE"):
        run(db, h, {"action": "set", "data": {"id": 1, "v": "x"}})


def test_json_value_for_plain_column_is_packet_error(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, n integer, a int[])")
    h = AutoSQL("t", role="destination")
    with pytest.raises(PacketError, match=r"column n of public\.t is integer"):
        run(db, h, {"action": "add", "data": {"id": 1, "n": {"x": 1}}})
    with pytest.raises(PacketError, match=r"column a of public\.t is integer\[\]"):
        run(db, h, {"action": "add", "data": {"id": 1, "a": 5}})


def test_bad_values_raise_database_errors(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, n integer)")
    h = AutoSQL("t", role="destination")
    with pytest.raises(psycopg2.Error) as info:
        run(db, h, {"action": "add", "data": {"id": 1, "n": "abc"}})
    assert info.value.pgcode == "22P02" and errors.classify(info.value) == errors.DEAD
    run(db, h, {"action": "add", "data": {"id": 1}})
    with pytest.raises(psycopg2.errors.UniqueViolation):
        run(db, h, {"action": "add", "data": {"id": 1}})


# --- set --------------------------------------------------------------------------------------------

def test_set_upserts_on_primary_key(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text, b text)")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "set", "data": {"id": 1, "a": "x", "b": "keep"}})
    run(db, h, {"action": "set", "data": {"id": 1, "a": "y"}})
    assert rows(db, "SELECT id, a, b FROM t") == [(1, "y", "keep")]


def test_set_upserts_on_unique_constraint(db):
    ddl(db, "CREATE TABLE t (id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text)")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "set", "data": {"email": "a@b", "name": "first"}})
    run(db, h, {"action": "set", "data": {"email": "a@b", "name": "second"}})
    assert rows(db, "SELECT id, email, name FROM t") == [(1, "a@b", "second")]


def test_set_with_only_key_columns_does_nothing_on_conflict(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "set", "data": {"id": 1}})
    ddl(db, "UPDATE t SET a = 'x'")
    run(db, h, {"action": "set", "data": {"id": 1}})
    assert rows(db, "SELECT id, a FROM t") == [(1, "x")]


def test_set_without_key_is_packet_error(db):
    ddl(db, "CREATE TABLE t (a int, b text)")
    h = AutoSQL("t", role="destination")
    with pytest.raises(PacketError, match=r"set on public\.t needs a primary key or unique key"):
        run(db, h, {"action": "set", "data": {"a": 1, "b": "x"}})
    # add on a table without a primary key: a plain INSERT, packet unchanged
    packet = parse({"action": "add", "data": {"a": 1}})
    with db.cursor() as cur:
        assert h.apply(cur, packet) is packet
    assert rows(db, "SELECT a, b FROM t") == [(1, None)]


def test_partial_unique_index_is_not_a_conflict_key(db):
    ddl(db, "CREATE TABLE t (id serial PRIMARY KEY, email text, active boolean, code text, x int, y int)")
    ddl(db, "CREATE UNIQUE INDEX t_email_active ON t (email) WHERE active")
    ddl(db, "CREATE UNIQUE INDEX t_lower_code ON t (lower(code))")
    ddl(db, "CREATE UNIQUE INDEX t_x_incl ON t (x) INCLUDE (y)")
    ddl(db, "ALTER TABLE t ADD CONSTRAINT t_y_deferred UNIQUE (y) DEFERRABLE INITIALLY DEFERRED")
    with db.cursor() as cur:
        schema = read_schema(cur, Relation("public", "t"))
    assert schema.primary_key == ("id",)
    assert schema.unique_keys == (("id",), ("x",))
    h = AutoSQL("t", role="destination")
    with pytest.raises(PacketError, match="needs a primary key or unique key"):
        run(db, h, {"action": "set", "data": {"email": "a@b", "active": True}})


# --- add: keys back-filled --------------------------------------------------------------------------

def test_add_returns_generated_serial_key(db):
    ddl(db, "CREATE TABLE canon (id serial PRIMARY KEY, name text)")
    ddl(db, "CREATE TABLE copy (id int PRIMARY KEY, name text)")
    ddl(db, "SELECT setval('canon_id_seq', 41)")
    destination = AutoSQL("canon", role="destination")
    target = AutoSQL("copy", role="target")
    packet = run(db, destination, {"action": "add", "data": {"name": "x"}})
    assert packet.data == {"name": "x", "id": 42}
    with db.cursor() as cur:
        target.apply(cur, parse(packet.to_json()))
    assert rows(db, "SELECT id, name FROM copy") == [(42, "x")]


def test_add_returned_keys_are_json_encodable(db):
    ddl(db, "CREATE TABLE t (u uuid DEFAULT gen_random_uuid(), ts timestamptz DEFAULT now(),"
            " b bytea DEFAULT '\\x0102', n numeric DEFAULT 1.50, name text, PRIMARY KEY (u, ts, b, n))")
    h = AutoSQL("t", role="destination")
    packet = run(db, h, {"action": "add", "data": {"name": "x"}})
    [(u, ts)] = rows(db, "SELECT u::text, ts FROM t")
    assert packet.data["u"] == u and packet.data["b"] == "\\x0102" and packet.data["n"] == Decimal("1.50")
    assert datetime.datetime.fromisoformat(packet.data["ts"]) == ts
    again = parse(packet.to_json())
    run(db, h, {"action": "delete", "restriction": {k: v for k, v in again.data.items() if k != "name"}})
    assert rows(db, "SELECT count(*) FROM t") == [(0,)]


def test_identity_always_column(db):
    ddl(db, "CREATE TABLE canon (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text)")
    ddl(db, "CREATE TABLE copy (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text)")
    destination = AutoSQL("canon", role="destination")
    target = AutoSQL("copy", role="target")
    for name in ("a", "b"):
        packet = run(db, destination, {"action": "add", "data": {"name": name}})
    assert packet.data == {"name": "b", "id": 2}
    with db.cursor() as cur:
        target.apply(cur, packet)  # OVERRIDING SYSTEM VALUE: the canonical id is kept
        target.apply(cur, Packet(Action.SET, {"id": 2, "name": "b2"}))
        target.apply(cur, Packet(Action.SET, {"id": 7, "name": "c"}))
    assert rows(db, "SELECT id, name FROM copy ORDER BY id") == [(2, "b2"), (7, "c")]


def test_generated_column_is_left_out(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, n int, twice int GENERATED ALWAYS AS (n * 2) STORED)")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "n": 2, "twice": 99}})
    run(db, h, {"action": "set", "data": {"id": 1, "n": 3, "twice": 99}})
    assert rows(db, "SELECT n, twice FROM t") == [(3, 6)]
    run(db, h, {"action": "delete", "restriction": {"twice": 6}})
    assert rows(db, "SELECT count(*) FROM t") == [(0,)]


# --- column resolution -------------------------------------------------------------------------------

def test_case_insensitive_keys(db):
    ddl(db, "CREATE TABLE friends (user_id int, friend_id int, PRIMARY KEY (user_id, friend_id), note text)")
    h = AutoSQL("friends", role="destination")
    run(db, h, {"ACTION": "ADD", "DATA": {"USER_ID": 1, "FRIEND_ID": 2, "Note": "hi"}})
    run(db, h, {"action": "update", "data": {"NOTE": "ho"}, "restriction": {"User_Id": 1, "friend_ID": 2}})
    assert rows(db, "SELECT user_id, friend_id, note FROM friends") == [(1, 2, "ho")]


def test_exact_match_wins_and_ambiguous_key_is_packet_error(db):
    ddl(db, 'CREATE TABLE t (id int PRIMARY KEY, ab text, "AB" text)')
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "ab": "lower", "AB": "upper"}})
    assert rows(db, 'SELECT ab, "AB" FROM t') == [("lower", "upper")]
    with pytest.raises(PacketError, match=r"'Ab' is ambiguous in public\.t"):
        run(db, h, {"action": "update", "data": {"Ab": "x"}, "restriction": {"id": 1}})


def test_unknown_column_error_at_destination_ignored_at_target(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    destination = AutoSQL("t", role="destination")
    target = AutoSQL("t", role="target")
    with pytest.raises(PacketError, match=r"'extra' that public\.t does not have"):
        run(db, destination, {"action": "add", "data": {"id": 1, "a": "x", "extra": 1}})
    run(db, target, {"action": "add", "data": {"id": 1, "a": "x", "extra": 1}})
    run(db, target, {"action": "update", "data": {"extra": 2}, "restriction": {"id": 1}})  # no-op
    assert rows(db, "SELECT id, a FROM t") == [(1, "x")]
    # the setting overrides the role's default
    strict = AutoSQL("t", {"unknown_columns": "error"}, role="target")
    lenient = AutoSQL("t", {"unknown_columns": "ignore"}, role="destination")
    with pytest.raises(PacketError, match="extra"):
        run(db, strict, {"action": "set", "data": {"id": 1, "extra": 1}})
    run(db, lenient, {"action": "set", "data": {"id": 1, "a": "y", "extra": 1}})
    assert rows(db, "SELECT id, a FROM t") == [(1, "y")]


def test_unknown_restriction_column_is_always_packet_error(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    for role in ("destination", "target"):
        h = AutoSQL("t", role=role)
        with pytest.raises(PacketError, match=r"restriction names column 'nope' that public\.t"):
            run(db, h, {"action": "delete", "restriction": {"id": 1, "nope": 1}})
        with pytest.raises(PacketError, match="restriction names column 'nope'"):
            run(db, h, {"action": "update", "data": {"a": "x"}, "restriction": {"nope": 1}})


def test_malformed_packets_are_packet_errors(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    h = AutoSQL("t", role="destination")
    with db.cursor() as cur:
        with pytest.raises(PacketError, match="empty restriction"):
            h.apply(cur, Packet(Action.DELETE, {}, {}))
        with pytest.raises(PacketError, match="empty restriction"):
            h.apply(cur, Packet(Action.UPDATE, {"a": 1}, {}))
        with pytest.raises(PacketError, match="unknown action 'merge'"):
            h.apply(cur, Packet("merge", {"a": 1}, {}))  # type: ignore[arg-type]
        with pytest.raises(PacketError, match="empty data"):
            h.apply(cur, Packet(Action.ADD, {}, {}))
        with pytest.raises(PacketError, match="both name column id"):
            h.apply(cur, Packet(Action.ADD, {"id": 1, "ID": 2}, {}))


# --- hostile names and values -------------------------------------------------------------------------

HOSTILE = ["'; DROP TABLE x; --", "$$", "$tag$ $$ ' \" \\", "%s %(x)s %%", "line\nbreak", "\u00e9\u2603"]


def test_quotes_semicolons_and_dollars_in_identifiers_and_values(db):
    ddl(db, 'CREATE SCHEMA "My Schema"')
    ddl(db, 'CREATE TABLE "My Schema"."we""ird;$$" (id int PRIMARY KEY, "o\'k" text, "per%scent" text)')
    relation = '"My Schema"."we""ird;$$"'
    assert parse_relation(relation) == Relation("My Schema", 'we"ird;$$')
    h = AutoSQL(relation, role="destination")
    for number, value in enumerate(HOSTILE):
        run(db, h, {"action": "add", "data": {"id": number, "o'k": value, "per%scent": value}})
        run(db, h, {"action": "set", "data": {"id": number, "O'K": value + "!", "per%scent": value}})
        run(db, h, {"action": "update", "data": {"per%scent": value + "?"},
                    "restriction": {"o'k": value + "!", "per%scent": value}})
    got = rows(db, 'SELECT "o\'k", "per%scent" FROM "My Schema"."we""ird;$$" ORDER BY id')
    assert got == [(value + "!", value + "?") for value in HOSTILE]
    run(db, h, {"action": "delete", "restriction": {"o'k": HOSTILE[0] + "!"}})
    assert rows(db, 'SELECT count(*) FROM "My Schema"."we""ird;$$"') == [(len(HOSTILE) - 1,)]
    # an IS NULL-only restriction (no parameter at all) with a % in a name
    run(db, h, {"action": "delete", "restriction": {"per%scent": None}})


def test_statement_text_quotes_identifiers(db):
    ddl(db, 'CREATE TABLE "we""ird;$$" ("o\'k" text)')
    with db.cursor() as cur:
        schema = read_schema(cur, parse_relation('"we""ird;$$"'))
    query, params = insert_statement(schema, [(schema.columns["o'k"], "$$")])
    assert query.as_string(db) == 'INSERT INTO "public"."we""ird;$$" ("o\'k") VALUES ((%s)::text)'
    assert params == ["$$"]


# --- schema cache -------------------------------------------------------------------------------------

def test_added_column_is_picked_up(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY)")
    clock = Clock()
    h = AutoSQL("t", role="destination", cache=SchemaCache(clock=clock))
    run(db, h, {"action": "add", "data": {"id": 1}})
    ddl(db, "ALTER TABLE t ADD COLUMN fresh text")
    clock.now += 0.5  # younger than the 1 s re-read period, but pg_class.relnatts changed
    run(db, h, {"action": "add", "data": {"id": 2, "fresh": "x"}})
    clock.now += 0.1  # an unknown name within the period, nothing changed: dead-lettered
    with pytest.raises(PacketError, match="stale"):
        run(db, h, {"action": "add", "data": {"id": 3, "stale": "x"}})
    assert rows(db, "SELECT id, fresh FROM t ORDER BY id") == [(1, None), (2, "x")]


def test_added_column_is_picked_up_in_real_time(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY)")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1}})
    ddl(db, "ALTER TABLE t ADD COLUMN fresh text")
    time.sleep(1.1)
    run(db, h, {"action": "update", "data": {"fresh": "x"}, "restriction": {"id": 1}})
    assert rows(db, "SELECT fresh FROM t") == [("x",)]


def test_dropped_column_then_schema_error_and_retry(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, gone text, kept text)")
    h = AutoSQL("t", role="target")
    run(db, h, {"action": "add", "data": {"id": 1, "gone": "x", "kept": "y"}})
    ddl(db, "ALTER TABLE t DROP COLUMN gone")
    packet = {"action": "add", "data": {"id": 2, "gone": "x", "kept": "z"}}
    with pytest.raises(psycopg2.Error) as info:
        run(db, h, packet)
    assert errors.classify(info.value) == errors.SCHEMA
    h.on_schema_error()
    run(db, h, packet)
    assert rows(db, "SELECT id, kept FROM t ORDER BY id") == [(1, "y"), (2, "z")]


def test_missing_relation_stops_the_listener(db):
    h = AutoSQL("nowhere.t", role="target")
    with pytest.raises(StopListener, match=r"relation nowhere\.t does not exist"):
        run(db, h, {"action": "add", "data": {"id": 1}})


def test_read_schema_columns(db):
    ddl(db, "CREATE DOMAIN doc AS jsonb")
    ddl(db, "CREATE TABLE t (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, gone int,"
            " name varchar(20) NOT NULL DEFAULT '', price numeric(10,2), body doc, tags text[][],"
            " at timestamp with time zone)")
    ddl(db, "ALTER TABLE t DROP COLUMN gone")
    with db.cursor() as cur:
        schema = read_schema(cur, parse_relation("T"))
    assert list(schema.columns) == ["id", "name", "price", "body", "tags", "at"]
    types = {name: column.type_name for name, column in schema.columns.items()}
    assert types == {"id": "bigint", "name": "character varying", "price": "numeric", "body": "doc",
                     "tags": "text[]", "at": "timestamp with time zone"}
    assert schema.columns["id"].identity == "d" and not schema.columns["id"].identity_always
    assert schema.columns["name"].not_null and schema.columns["name"].has_default
    assert schema.columns["body"].is_json and not schema.columns["body"].is_array
    assert schema.columns["tags"].is_array and not schema.columns["tags"].is_json
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"name": "n", "body": {"k": [1]}, "tags": [["a", "b"]]}})
    assert rows(db, "SELECT body::text, tags FROM t") == [('{"k": [1]}', [["a", "b"]])]


def test_shared_cache_serves_two_handlers(db):
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY)")
    cache = SchemaCache()
    first, second = AutoSQL("t", cache=cache), AutoSQL("public.t", cache=cache)
    with db.cursor() as cur:
        schema = first.cache.get(cur, first.table)
        assert second.cache.get(cur, second.table) is schema
        first.on_schema_error()
        assert second.cache.get(cur, second.table) is not schema
