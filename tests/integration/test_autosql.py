"""AutoSQL and the schema cache against a real PostgreSQL (one new database per test)."""
from __future__ import annotations

import datetime
import json
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


def test_updates_and_deletes_of_a_parent_reach_the_rows_its_trigger_routes_to_children(db):
    """Partitioning by inheritance and a routing trigger (before PostgreSQL 10, pg_partman's
    trigger mode): the parent holds no row, its children do; AutoSQL's UPDATEs and DELETEs of
    the parent reach them as PostgreSQL's own do, one at a time and in runs (bulk). (UPDATE
    ONLY, tried for parents whose children are distributed apart, changed nothing here.)"""
    ddl(db, "CREATE TABLE m (id int PRIMARY KEY, v text)")
    ddl(db, "CREATE TABLE m_1 (PRIMARY KEY (id), CHECK (id < 100)) INHERITS (m)")
    ddl(db, "CREATE FUNCTION m_route() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN INSERT INTO m_1 VALUES (NEW.*); RETURN NULL; END $$")
    ddl(db, "CREATE TRIGGER m_route BEFORE INSERT ON m FOR EACH ROW EXECUTE FUNCTION m_route()")
    h = AutoSQL("m")
    for n in range(1, 6):
        run(db, h, {"action": "add", "data": {"id": n, "v": "a"}})
    run(db, h, {"action": "update", "data": {"v": "b"}, "restriction": {"id": 1}})
    run(db, h, {"action": "delete", "restriction": {"id": 2}})
    with db.cursor() as cur:
        h.apply_batch(cur, [Packet(Action.UPDATE, {"v": "c"}, {"id": 3}),
                            Packet(Action.UPDATE, {"v": "c"}, {"id": 4}),
                            Packet(Action.DELETE, {}, {"id": 5}),
                            Packet(Action.DELETE, {}, {"id": 4})])
    assert rows(db, "SELECT count(*) FROM ONLY m") == [(0,)]
    assert rows(db, "SELECT id, v FROM m_1 ORDER BY id") == [(1, "b"), (3, "c")]


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


def test_a_generated_always_identity_column_outside_the_key_keeps_its_value(db):
    """The capture trigger's whole-row packets name a GENERATED ALWAYS identity column that is not
    the key: ADD writes it (OVERRIDING SYSTEM VALUE); UPDATE and SET's DO UPDATE leave it out, alone
    and in runs, where PostgreSQL refused it ("can only be updated to DEFAULT") and every update of
    such a table was dead-lettered; an update of that column alone is still refused."""
    ddl(db, "CREATE TABLE tid (code text PRIMARY KEY, seq int GENERATED ALWAYS AS IDENTITY, v text)")
    h = AutoSQL("tid", role="target")
    with db.cursor() as cur:
        h.apply_batch(cur, [parse(dumps({"action": "add", "data": {"code": c, "seq": n, "v": "x"}}))
                            for c, n in (("a", 11), ("b", 12), ("c", 13))])
    run(db, h, {"action": "update", "data": {"code": "a", "seq": 11, "v": "y"}, "restriction": {"code": "a"}})
    run(db, h, {"action": "set", "data": {"code": "b", "seq": 12, "v": "y"}})
    with db.cursor() as cur:
        h.apply_batch(cur, [parse(dumps({"action": "update", "data": {"code": c, "seq": n, "v": "z"},
                                         "restriction": {"code": c}})) for c, n in (("b", 12), ("c", 13))])
        h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"code": c, "seq": n, "v": "w"}}))
                            for c, n in (("c", 13), ("d", 14))])
    assert rows(db, "SELECT code, seq, v FROM tid ORDER BY code") == [
        ("a", 11, "y"), ("b", 12, "z"), ("c", 13, "w"), ("d", 14, "w")]
    with pytest.raises(psycopg2.Error, match="DEFAULT"):
        run(db, h, {"action": "update", "data": {"seq": 5}, "restriction": {"code": "a"}})


def test_set_passes_over_a_unique_key_whose_value_is_null(db):
    """NULL never conflicts: a SET whose data has NULL in one unique key upserts on another that
    has no NULL (it inserted a row, and failed on the other key); the plan of a shape is not
    reused for a packet with such a NULL, and a key with a NULL is taken when no other fits."""
    ddl(db, "CREATE TABLE t2k (a int UNIQUE, b int UNIQUE, name text); INSERT INTO t2k VALUES (NULL, 1, 'old')")
    for role in ("destination", "target"):
        h = AutoSQL("t2k", role=role)
        run(db, h, {"action": "set", "data": {"a": 5, "b": 2, "name": "first"}})        # plans the shape
        run(db, h, {"action": "set", "data": {"a": None, "b": 1, "name": "new-" + role}})
        with db.cursor() as cur:
            h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"a": a, "b": b, "name": n}}))
                                for a, b, n in ((None, 2, "x"), (5, 3, "y"), (None, 9, "z"))])
        assert rows(db, "SELECT a, b, name FROM t2k ORDER BY b") == [
            (None, 1, "new-" + role), (None, 2, "x"), (5, 3, "y"), (None, 9, "z")]
        run(db, h, {"action": "set", "data": {"a": None, "name": "only-a"}})           # no other key
        assert rows(db, "SELECT count(*) FROM t2k WHERE name = 'only-a'") == [(1,)]
        ddl(db, "DELETE FROM t2k; INSERT INTO t2k VALUES (NULL, 1, 'old')")


def test_set_on_a_nulls_not_distinct_key_and_plans_of_keys_with_nulls(db):
    with db.cursor() as cur:
        cur.execute("SHOW server_version_num")
        if int(cur.fetchone()[0]) < 150000:
            pytest.skip("NULLS NOT DISTINCT needs PostgreSQL 15")
    ddl(db, "CREATE TABLE t1 (a int UNIQUE NULLS NOT DISTINCT, b int UNIQUE, v text);"
            " INSERT INTO t1 VALUES (NULL, 2, 'old')")
    h = AutoSQL("t1", role="target")
    run(db, h, {"action": "set", "data": {"a": None, "b": 1, "v": "new"}})   # a NULL that conflicts
    assert rows(db, "SELECT a, b, v FROM t1") == [(None, 1, "new")]
    # a NULL outside the chosen key leaves the shape's plan in use
    ddl(db, "CREATE TABLE t2 (id int PRIMARY KEY, email text UNIQUE, v text)")
    h = AutoSQL("t2", role="target")
    with db.cursor() as cur:
        h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"id": i, "email": None, "v": "x"}}))
                            for i in range(5)])
        assert len(h._schema(cur).plans) == 1
    assert rows(db, "SELECT count(*) FROM t2 WHERE email IS NULL") == [(5,)]


def test_restrictions_on_a_json_domain_and_null_on_a_composite(db):
    ddl(db, "CREATE DOMAIN jd AS json; CREATE TYPE pr AS (a int, b text)")
    ddl(db, "CREATE TABLE tj (id int PRIMARY KEY, doc jd, p pr)")
    ddl(db, """INSERT INTO tj VALUES (1, '{"x": 1}', '(,)'), (2, '[1]', NULL), (3, '{"x": 2}', '(1,a)')""")
    h = AutoSQL("tj", role="destination")
    run(db, h, {"action": "update", "data": {"doc": {"x": 9}}, "restriction": {"doc": {"x": 1}}})
    assert rows(db, "SELECT id FROM tj WHERE doc::jsonb = '{\"x\": 9}'") == [(1,)]
    # NULL matches the NULL composite only, not one whose fields are all NULL
    run(db, h, {"action": "delete", "restriction": {"p": None}})
    assert rows(db, "SELECT id FROM tj ORDER BY id") == [(1,), (3,)]
    run(db, h, {"action": "delete", "restriction": {"doc": [1]}})    # nothing: row 2 is gone
    run(db, h, {"action": "delete", "restriction": {"doc": {"x": 2}}})
    assert rows(db, "SELECT id FROM tj") == [(1,)]


def test_an_array_of_a_domain_over_a_composite_takes_objects(db):
    ddl(db, "CREATE TYPE pr AS (a int, b text); CREATE DOMAIN prd AS pr CHECK ((VALUE).a > 0)")
    ddl(db, "CREATE TABLE tc (id int PRIMARY KEY, pds prd[])")
    h = AutoSQL("tc", role="target")
    run(db, h, {"action": "add", "data": {"id": 1, "pds": [{"a": 1, "b": "x"}, None]}})
    assert rows(db, "SELECT pds::text FROM tc") == [('{"(1,x)",NULL}',)]
    with pytest.raises(psycopg2.IntegrityError, match="prd_check"):
        run(db, h, {"action": "add", "data": {"id": 2, "pds": [{"a": -1}]}})


def test_booleans_and_numbers_are_not_taken_for_each_other_in_arrays(db):
    ddl(db, "CREATE DOMAIN dint AS int; CREATE DOMAIN dbool AS boolean")
    ddl(db, "CREATE TABLE ta (id int PRIMARY KEY, nums int[], flags boolean[], dn dint[], db dbool[])")
    h = AutoSQL("ta", role="destination")
    with pytest.raises(PacketError, match=r"column dn of public\.ta is dint\[\]: expected a number, not false"):
        run(db, h, {"action": "add", "data": {"id": 1, "dn": [False]}})
    with pytest.raises(PacketError, match=r"column db of public\.ta is dbool\[\]: expected true or false"):
        run(db, h, {"action": "add", "data": {"id": 1, "db": [[0]]}})
    with pytest.raises(PacketError, match=r"column nums of public\.ta is integer\[\]: expected a number, not true"):
        run(db, h, {"action": "add", "data": {"id": 1, "nums": [1, [True]]}})
    with pytest.raises(PacketError, match=r"column flags of public\.ta is boolean\[\]: expected true or false, not the number 5"):
        run(db, h, {"action": "add", "data": {"id": 1, "flags": [True, 5]}})
    run(db, h, {"action": "add", "data": {"id": 1, "nums": [1, "2", None], "flags": [True, "f", None]}})
    assert rows(db, "SELECT nums, flags FROM ta") == [([1, 2, None], [True, False, None])]


def test_back_filled_keys_keep_infinite_and_nan_values(db):
    """A destination writes the stored key back into the packet: an infinite timestamp or date
    stays infinite (psycopg2 reads it as the largest value), a NaN numeric stays NaN (it made the
    packet unencodable)."""
    ddl(db, "CREATE TABLE tk (ts timestamp, d date, n numeric, v text, PRIMARY KEY (ts, d, n))")
    h = AutoSQL("tk", role="destination")
    for ts, d, n in (("infinity", "-infinity", "NaN"), ("-infinity", "infinity", "Infinity")):
        packet = run(db, h, {"action": "add", "data": {"ts": ts, "d": d, "n": n, "v": "x"}})
        assert (packet.data["ts"], packet.data["d"], packet.data["n"]) == (ts, d, n)
        loads(dumps(dict(packet.data)))
    # the largest and smallest real values stay themselves (psycopg2 reads infinity as them)
    ddl(db, "CREATE TABLE tr (d date, tz timestamptz, v text, PRIMARY KEY (d, tz))")
    h = AutoSQL("tr", role="destination")
    with db.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        packets = h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"d": d, "tz": tz, "v": "x"}}))
                                      for d, tz in (("9999-12-31", "9999-12-31 23:59:59.999999+00"),
                                                    ("0001-01-01", "infinity"))])
    assert [(p.data["d"], p.data["tz"]) for p in packets] == [
        ("9999-12-31", "9999-12-31T23:59:59.999999+00:00"), ("0001-01-01", "infinity")]


def test_back_filled_keys_are_the_stored_values_as_the_server_prints_them(db):
    """The keys written back into packets are read as JSON text of the stored values, not through
    psycopg2's conversions: an interval keeps its months (not 30 days), 24:00 stays 24:00 (not
    00:00), BC dates and years after 9999 come back (they raised in Python), one packet at a
    time and in a run; applied at a target from the written-back packets, the rows are equal."""
    ddl(db, "CREATE TABLE keys (i interval, t time, d date, tz timestamptz, v text,"
            " PRIMARY KEY (i, t, d, tz))")
    ddl(db, "CREATE TABLE copy (LIKE keys INCLUDING ALL)")
    ddl(db, "SET TimeZone = 'UTC'")
    h, target = AutoSQL("keys", role="destination"), AutoSQL("copy", role="target")
    values = [("1 mon", "24:00:00", "0044-03-15 BC", "0001-01-01 00:00:00+00 BC"),
              ("1 year 2 mons 3 days", "23:59:59.999999", "12000-01-01", "infinity"),
              ("-1 days +02:00:00", "00:00:00", "2024-02-29", "2024-02-29 12:00:00+00")]
    i, t, d, tz = values[0]
    one = run(db, h, {"action": "add", "data": dict(i=i, t=t, d=d, tz=tz, v="one")})
    with db.cursor() as cur:
        batch = h.apply_batch(cur, [parse(dumps({"action": "set", "data": dict(
            i=i, t=t, d=d, tz=tz, v="run")})) for i, t, d, tz in values[1:]])
    packets = [one] + list(batch)
    for packet in packets:
        loads(dumps(dict(packet.data)))
    assert [(p.data["i"], p.data["t"], p.data["d"]) for p in packets] == [
        ("1 mon", "24:00:00", "0044-03-15 BC"), ("1 year 2 mons 3 days", "23:59:59.999999", "12000-01-01"),
        ("-1 days +02:00:00", "00:00:00", "2024-02-29")]
    assert packets[0].data["tz"] == "0001-01-01T00:00:00+00:00 BC"
    with db.cursor() as cur:
        target.apply_batch(cur, [parse(dumps({"action": "set", "data": dict(p.data)})) for p in packets])
    assert rows(db, "SELECT * FROM keys EXCEPT SELECT * FROM copy") == []
    assert rows(db, "SELECT count(*) FROM copy") == [(3,)]


def test_numbers_of_any_length_numeric_takes(db):
    """Integers past Python's 4300 digits (numeric takes 131,072 before the point) are read, kept
    exact and applied, in data and restrictions."""
    ddl(db, "CREATE TABLE big (id int PRIMARY KEY, n numeric)")
    h = AutoSQL("big", role="destination")
    digits = "9" * 5000
    text = '{"action": "add", "data": {"id": 1, "n": %s}}' % digits
    packet = parse(text)
    assert packet.data["n"] == Decimal(digits) and dumps(dict(packet.data)).count("9") == 5000
    h.apply_batch(db.cursor(), [packet])
    h.apply_batch(db.cursor(), [parse('{"action": "update", "data": {"n": -%s}, "restriction":'
                                      ' {"id": 1, "n": %s}}' % (digits, digits))])
    assert rows(db, "SELECT n = -(%s)::numeric FROM big" % digits) == [(True,)]


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
    ddl(db, "CREATE DOMAIN jd AS jsonb")
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, v jsonb[], d jd[])")
    h = AutoSQL("t", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "v": [{"a": 1}, [1, 2], None, "s"], "d": [{"a": 1}]}})
    assert rows(db, "SELECT v::text, d::text FROM t") == [
        ('{"{\\"a\\": 1}","[1, 2]",NULL,"\\"s\\""}', '{"{\\"a\\": 1}"}')]


def structured_table(db):
    ddl(db, "CREATE EXTENSION IF NOT EXISTS hstore")
    ddl(db, "CREATE TYPE inner_t AS (x int, tags text[])")
    ddl(db, 'CREATE TYPE "Pair" AS (a int, b text, inn inner_t, j jsonb)')
    ddl(db, 'CREATE DOMAIN pair_d AS "Pair"')
    ddl(db, 'CREATE TABLE t (id int PRIMARY KEY, p "Pair", pd pair_d, ps "Pair"[], h hstore, hs hstore[])')


def test_composite_and_hstore_values_as_to_jsonb_writes_them(db):
    """A JSON object for a composite column fills its fields by name (nested composites, arrays,
    jsonb, a domain over the type), for an hstore column its keys; an array column takes an array
    of them; the text forms still work; the values work in restrictions and in runs of packets."""
    structured_table(db)
    h = AutoSQL("t", role="destination")
    pair = {"a": 1, "b": 'q"\\', "inn": {"x": 2, "tags": ["a", None]}, "j": {"z": [1]}}
    store = {"a": "1", "b c": None, 'q"\\=>': 'v"\\', "": ""}
    run(db, h, {"action": "add", "data": {"id": 1, "p": pair, "pd": {"a": 7}, "ps": [pair, None, {"b": "x"}],
                                          "h": store, "hs": [store, None, {}]}})
    run(db, h, {"action": "add", "data": {"id": 2, "p": "(5,y,,)", "pd": None, "ps": '{"(1,x,,)"}',
                                          "h": "a=>b", "hs": None}})
    [(row,)] = rows(db, "SELECT to_jsonb(t) FROM t WHERE id = 1")
    assert row["p"] == pair and row["pd"] == {"a": 7, "b": None, "inn": None, "j": None}
    assert row["ps"] == [pair, None, {"a": None, "b": "x", "inn": None, "j": None}]
    assert row["h"] == store and row["hs"] == [store, None, {}]
    [(row,)] = rows(db, "SELECT to_jsonb(t) FROM t WHERE id = 2")
    assert row["p"] == {"a": 5, "b": "y", "inn": None, "j": None} and row["h"] == {"a": "b"}
    # the packets to_jsonb() writes apply back: the capture trigger's packets reach targets
    ddl(db, "CREATE TABLE copy (LIKE t)")
    copy = AutoSQL("copy", role="target")
    for id_ in (1, 2):
        [(row,)] = rows(db, "SELECT to_jsonb(t) FROM t WHERE id = %s", (id_,))
        run(db, copy, {"action": "add", "data": row})
    assert rows(db, "SELECT count(*) FROM t JOIN copy USING (id) WHERE t::text = copy::text") == [(2,)]
    # restrictions, and a run of several packets (one statement)
    run(db, h, {"action": "update", "data": {"h": {"k": "v"}}, "restriction": {"p": {"a": 5, "b": "y"}}})
    assert rows(db, "SELECT h::text FROM t WHERE id = 2") == [('"k"=>"v"',)]
    with db.cursor() as cur:
        h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"id": i, "p": {"a": i}, "h": {"n": str(i)},
                                                                    "ps": [{"a": i}]}}))
                            for i in (2, 3, 4)])
    assert rows(db, "SELECT id, (p).a, h -> 'n', (ps[1]).a FROM t WHERE id > 1 ORDER BY id") == [
        (2, 2, "2", 2), (3, 3, "3", 3), (4, 4, "4", 4)]
    run(db, h, {"action": "delete", "restriction": {"p": {"a": 3}}})
    assert rows(db, "SELECT id FROM t ORDER BY id") == [(1,), (2,), (4,)]


@pytest.mark.parametrize("column,value,message", [
    ("h", {"a": 1}, r"column h of public\.t is hstore: the value of key 'a' must be a string or null, not 1"),
    ("h", ["a=>b"], r"column h of public\.t is hstore: expected a JSON object or hstore's text form, not an array"),
    ("hs", [{"a": True}], r"the value of key 'a' must be a string or null, not true"),
])
def test_hstore_values_that_are_not_text_are_refused(db, column, value, message):
    structured_table(db)
    with pytest.raises(PacketError, match=message):
        run(db, AutoSQL("t", role="destination"), {"action": "add", "data": {"id": 1, column: value}})


def test_a_composite_value_of_the_wrong_shape_is_a_database_error(db):
    structured_table(db)
    h = AutoSQL("t", role="destination")
    for value in (5, [{"a": 1}], {"a": "not a number"}):
        with pytest.raises(psycopg2.DataError):
            run(db, h, {"action": "add", "data": {"id": 1, "p": value}})
        db.rollback()


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


def test_a_fraction_for_an_integer_column_is_refused_not_rounded(db):
    """PostgreSQL rounds a numeric literal into an integer column (7.6 to 8), so a restriction
    naming order 7.6 would change order 8: a number with a fraction is refused for the integer
    types, in data, restrictions and arrays, alone or in a run, as the string "7.6" is. Whole
    numbers written with a fraction (8.0) and numeric columns take them."""
    ddl(db, "CREATE TABLE o (id int PRIMARY KEY, s smallint, b bigint, ns int[], x numeric, note text)")
    h = AutoSQL("o", role="target")
    run(db, h, {"action": "add", "data": {"id": 8, "note": "eight"}})
    for packet in ({"action": "add", "data": {"id": Decimal("9.5")}},
                   {"action": "add", "data": {"id": 1, "s": Decimal("1.25")}},
                   {"action": "add", "data": {"id": 1, "b": 2.5}},
                   {"action": "add", "data": {"id": 1, "ns": [1, [Decimal("2.5")]]}},
                   {"action": "update", "data": {"note": "hit"}, "restriction": {"id": Decimal("7.6")}},
                   {"action": "delete", "restriction": {"id": Decimal("-7.6")}}):
        with pytest.raises(PacketError, match=r"expected an integer, not -?[0-9.]+ \(PostgreSQL would round it\)"):
            run(db, h, packet)
        with db.cursor() as cur, pytest.raises(PacketError, match="expected an integer"):
            h.apply_batch(cur, [parse(dumps(packet)), parse(dumps(packet))])
    run(db, h, {"action": "add", "data": {"id": Decimal("9.0"), "ns": [Decimal("1.0")], "x": Decimal("1.5")}})
    assert rows(db, "SELECT id, ns, x, note FROM o ORDER BY id") == [(8, None, None, "eight"),
                                                                    (9, [1], Decimal("1.5"), None)]


def test_a_number_of_a_million_digits_for_an_integer_column_is_refused_at_once(db):
    """1e999999 is a few bytes of JSON: telling whether it has a fraction with int() took 43 s
    holding the interpreter lock (every listener and heart-beat of the daemon stalled, and the
    packet came back after each lost connection). It is refused by the database as out of range,
    as any too large value."""
    ddl(db, "CREATE TABLE big (id int PRIMARY KEY, n integer, x numeric)")
    h = AutoSQL("big", role="destination")
    started = time.process_time()
    for value in ("1e999999", "-1e999999999", "1" + "0" * 200000):
        packet = parse('{"action": "add", "data": {"id": 1, "n": %s}}' % value)
        with pytest.raises(psycopg2.Error):
            h.apply_one(db.cursor(), packet)
        db.rollback()
    assert time.process_time() - started < 10      # CPU seconds; 43 for the first alone before
    run(db, h, {"action": "add", "data": {"id": 2, "n": Decimal("1e3")}})
    assert rows(db, "SELECT id, n FROM big") == [(2, 1000)]


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


def test_an_index_row_too_large_is_a_permanent_error_described_without_its_severity(db):
    """54000 comes as an OperationalError; it is no transient failure to retry (the packet is
    dead-lettered at once), and its reason reads 'SQLSTATE 54000: index row requires...'."""
    import random
    import string
    ddl(db, "CREATE TABLE big (id int PRIMARY KEY, k text UNIQUE)")
    h = AutoSQL("big", role="target")
    key = "".join(random.choice(string.ascii_letters) for _ in range(9000))  # not compressible
    with pytest.raises(psycopg2.OperationalError) as info:
        run(db, h, {"action": "add", "data": {"id": 1, "k": key}})
    assert info.value.pgcode == "54000" and errors.classify(info.value) == errors.DEAD
    assert errors.describe(info.value).startswith("SQLSTATE 54000: index row requires ")


def test_a_key_column_made_generated_always_since_it_was_cached_is_read_again(db):
    """After ALTER ... ADD GENERATED ALWAYS AS IDENTITY, the cached plan's INSERT of the key
    fails with 428C9: a schema error (re-read, then OVERRIDING SYSTEM VALUE), not a dead letter."""
    from golconde.apply import Applier
    from golconde import ledger
    ddl(db, "CREATE TABLE ident (id int PRIMARY KEY, v text)")
    ledger.ensure(db)
    applier = Applier(AutoSQL("ident", role="target"), "ident-target")
    first = applier.apply_batch(db, [("i1", dumps({"action": "add", "data": {"id": 1, "v": "a"}}).encode())])
    assert [o.status for o in first] == ["applied"]
    ddl(db, "ALTER TABLE ident ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY")
    second = applier.apply_batch(db, [("i2", dumps({"action": "add", "data": {"id": 2, "v": "b"}}).encode())])
    assert [o.status for o in second] == ["applied"], second
    assert rows(db, "SELECT id, v FROM ident ORDER BY id") == [(1, "a"), (2, "b")]


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


def test_a_column_added_at_a_target_right_after_it_was_seen_absent_takes_the_next_batch(db):
    """A target ignores data keys it lacks, and re-checked names it had seen absent only once a
    second: the first batch after the column was added there lost its values (review EE: an
    UPDATE of a new column committed after both sides had it, lost at both targets). Each batch
    now checks the catalog once for them."""
    ddl(db, "CREATE TABLE t (id int PRIMARY KEY, a text)")
    target = AutoSQL("t", role="target")

    def batch(*documents):
        with db.cursor() as cur:
            return target.apply_batch(cur, [parse(dumps(d)) for d in documents])

    batch({"action": "add", "data": {"id": 1, "a": "x", "extra": 1}},
          {"action": "add", "data": {"id": 2, "a": "y", "extra": 2}})
    batch({"action": "update", "data": {"extra": 3}, "restriction": {"id": 1}})   # ignored
    ddl(db, "ALTER TABLE t ADD COLUMN extra int")
    batch({"action": "update", "data": {"extra": 4}, "restriction": {"id": 1}},
          {"action": "update", "data": {"a": "z", "extra": 5}, "restriction": {"id": 2}})
    assert rows(db, "SELECT id, a, extra FROM t ORDER BY id") == [(1, "x", 4), (2, "z", 5)]


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
    clock.now += 0.5  # younger than the 1 s re-read period, but the catalog's signature changed
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


@pytest.mark.parametrize("note", ["text", {"a": 1}])    # a run's values as JSON, or bound (jsonb)
def test_a_destination_marks_the_updates_that_changed_no_row(db, note):
    """An update that changed no row is marked, one at a time and inside a run of updates: at a
    destination (not fanned out) and at a target (counted ``unmatched``)."""
    from golconde.packet import fanout_text

    ddl(db, "CREATE TABLE tu (id int PRIMARY KEY, note jsonb, n int)")
    ddl(db, "INSERT INTO tu VALUES (1, NULL, 0), (3, NULL, 0)")
    h = AutoSQL("tu", role="destination")
    packets = [parse(dumps({"action": "update", "data": {"note": note, "n": i},
                            "restriction": {"id": i}})) for i in range(1, 5)]
    with db.cursor() as cur:
        results = h.apply_batch(cur, packets)
        alone = h.apply(cur, packets[1])
    assert [p.matched for p in results] == [True, False, True, False] and not alone.matched
    assert [bool(fanout_text(p)) for p in results] == [True, False, True, False]
    assert rows(db, "SELECT id, n FROM tu ORDER BY id") == [(1, 1), (3, 3)]
    with db.cursor() as cur:
        target = AutoSQL("tu", role="target")
        assert [p.matched for p in target.apply_batch(cur, packets)] == [True, False, True, False]
        assert not target.apply(cur, packets[3]).matched


@pytest.mark.parametrize("rule", ["DO INSTEAD NOTHING", "WHERE old.id > 100 DO INSTEAD NOTHING"])
def test_a_target_with_instead_rules_applies_runs_without_asking_which_matched(db, rule):
    """PostgreSQL refuses RETURNING on a relation with a DO INSTEAD rule for the event (unless
    an unconditional one returns rows): a target's update and delete runs, which ask which packets
    changed a row (the unmatched counter), leave it out there and mark none (the rule's row count
    does not tell), instead of failing every batch into packet by packet."""
    ddl(db, "CREATE TABLE ru (id int PRIMARY KEY, n int)")
    ddl(db, "INSERT INTO ru VALUES (1, 0), (2, 0), (3, 0)")
    ddl(db, "CREATE RULE keep AS ON DELETE TO ru %s" % rule)
    ddl(db, "CREATE RULE keep_n AS ON UPDATE TO ru %s" % rule)
    packets = [parse(dumps({"action": action, "restriction": {"id": i}, **extra}))
               for action, extra in (("update", {"data": {"n": 5}}), ("delete", {}))
               for i in (1, 2, 7)]
    target = AutoSQL("ru", role="target")
    with db.cursor() as cur:
        results = target.apply_batch(cur, packets)
        assert all(p.matched for p in results)
        assert target.apply(cur, packets[2]).matched and target.apply(cur, packets[5]).matched
    # a conditional rule lets the statement itself run where its condition does not hold
    assert rows(db, "SELECT id, n FROM ru ORDER BY id") == ([(3, 0)] if "WHERE" in rule
                                                             else [(1, 0), (2, 0), (3, 0)])


def test_a_destination_with_instead_rules_applies_their_runs_one_by_one(db):
    """At a destination, which must know which updates and deletes changed a row (the others are
    not fanned out), a relation with a DO INSTEAD rule for them (a soft delete) has them applied
    one by one, each telling by its row count, instead of a run asking RETURNING, which
    PostgreSQL refuses there (every such batch failed into packet by packet)."""
    ddl(db, "CREATE TABLE rd (id int PRIMARY KEY, n int, gone boolean NOT NULL DEFAULT false)")
    ddl(db, "INSERT INTO rd (id, n) VALUES (1, 0), (2, 0), (3, 0)")
    ddl(db, "CREATE RULE soft AS ON DELETE TO rd DO INSTEAD UPDATE rd SET gone = true WHERE id = old.id")
    packets = [parse(dumps({"action": action, "restriction": {"id": i}, **extra}))
               for action, extra in (("update", {"data": {"n": 5}}), ("delete", {}))
               for i in (1, 2, 7)]
    with db.cursor() as cur:
        cur.execute("BEGIN")
        results = AutoSQL("rd", role="destination").apply_batch(cur, packets)    # raised 0A000
        cur.execute("ROLLBACK")
        alone = [AutoSQL("rd", role="destination").apply(cur, packet) for packet in packets]
    assert [p.matched for p in results] == [p.matched for p in alone]
    assert [p.matched for p in results][:3] == [True, True, False]
    assert rows(db, "SELECT id, n, gone FROM rd ORDER BY id") == [(1, 5, True), (2, 5, True), (3, 0, False)]


def test_a_rule_made_or_dropped_changes_the_schema_signature(db):
    """TableSchema.instead_rules is read again when a rule is made or dropped (the schema's
    signature covers a relation's update and delete rules)."""
    from golconde.schema import Relation, _signature, read_schema
    ddl(db, "CREATE TABLE rs (id int PRIMARY KEY, n int)")
    relation = Relation("public", "rs")
    with db.cursor() as cur:
        before = _signature(cur, relation)
        assert read_schema(cur, relation).instead_rules == frozenset()
        cur.execute("CREATE RULE keep AS ON UPDATE TO rs DO INSTEAD NOTHING")
        made = _signature(cur, relation)
        assert made != before and read_schema(cur, relation).instead_rules == {"update"}
        cur.execute("DROP RULE keep ON rs; CREATE RULE also AS ON UPDATE TO rs DO ALSO NOTHING")
        assert _signature(cur, relation) not in (before, made)
        assert read_schema(cur, relation).instead_rules == frozenset()


# --- a mapped target's constants scope its sets ------------------------------------------------------

def _mapped(relation, **raw):
    from golconde.mapping import parse_mapping
    mapping, problems = parse_mapping(raw, "Destinations.D.Targets.t")
    assert problems == []
    return AutoSQL(relation, role="target", mapping=mapping)


def test_a_scoped_set_skipped_by_a_before_trigger_is_applied_as_without_constants(db):
    """A BEFORE trigger returning NULL (an inheritance child taking the row, a "skip" rule)
    writes no row: that is not another source's row, and the set is not dead-lettered."""
    ddl(db, "CREATE TABLE ih (id int PRIMARY KEY, v text, src text);"
            " CREATE TABLE ih_child () INHERITS (ih);"
            " CREATE FUNCTION ih_route() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN INSERT INTO ih_child SELECT NEW.*; RETURN NULL; END$$;"
            " CREATE TRIGGER ih_route BEFORE INSERT ON ih FOR EACH ROW EXECUTE FUNCTION ih_route()")
    h = _mapped("ih", constants={"src": "mine"})
    run(db, h, {"action": "set", "data": {"id": 1, "v": "a"}})
    assert rows(db, "SELECT id, v, src FROM ih") == [(1, "a", "mine")]
    # another source's row of a key is still refused (found in the child)
    ddl(db, "INSERT INTO ih_child VALUES (2, 'theirs', 'other')")
    with pytest.raises(PacketError, match="another source's row"):
        run(db, h, {"action": "set", "data": {"id": 2, "v": "b"}})
    # a BEFORE UPDATE trigger skipping another source's row does not hide it either
    ddl(db, "CREATE TABLE eu (id int PRIMARY KEY, v text, src text, locked bool DEFAULT false);"
            " CREATE FUNCTION eu_skip() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN IF OLD.locked THEN RETURN NULL; END IF; RETURN NEW; END$$;"
            " CREATE TRIGGER eu_skip BEFORE UPDATE ON eu FOR EACH ROW EXECUTE FUNCTION eu_skip();"
            " INSERT INTO eu VALUES (2, 'theirs', 'other', true)")
    with pytest.raises(PacketError, match="another source's row"):
        run(db, _mapped("eu", constants={"src": "mine"}), {"action": "set", "data": {"id": 2, "v": "b"}})
    # a constant on a generated column scopes nothing: refused, not written over another's row
    ddl(db, "CREATE TABLE cg (id int PRIMARY KEY, v text, kind text,"
            " src text GENERATED ALWAYS AS (coalesce(kind, 'x')) STORED);"
            " INSERT INTO cg (id, v, kind) VALUES (2, 'theirs', 'other')")
    with pytest.raises(PacketError, match="constants name column 'src', which public.cg never takes a value for"):
        run(db, _mapped("cg", constants={"src": "mine"}), {"action": "set", "data": {"id": 2, "v": "b"}})
    assert rows(db, "SELECT v FROM cg") == [("theirs",)]


def test_a_scoped_set_with_a_constant_of_a_type_without_equality(db):
    """A point (or xml) constant: the type has no = operator; the scope compares text."""
    ddl(db, "CREATE TABLE pt (id int PRIMARY KEY, v text, src point)")
    h = _mapped("pt", constants={"src": "(1,2)"})
    run(db, h, {"action": "set", "data": {"id": 1, "v": "a"}})
    run(db, h, {"action": "set", "data": {"id": 1, "v": "b"}})
    assert rows(db, "SELECT id, v, src::text FROM pt") == [(1, "b", "(1,2)")]
    ddl(db, "INSERT INTO pt VALUES (2, 'theirs', '(3,4)')")
    with pytest.raises(PacketError, match="another source's row"):
        run(db, h, {"action": "set", "data": {"id": 2, "v": "c"}})
    assert rows(db, "SELECT v FROM pt WHERE id = 2") == [("theirs",)]


def test_a_scoped_set_on_a_type_whose_name_holds_a_percent_sign(db):
    """The scope's cast names the column's type in a query with parameters: a '%' in the type's
    name (a domain "src%tag") failed with IndexError, dead-lettered under that reason."""
    ddl(db, 'CREATE DOMAIN "src%tag" AS text;'
            ' CREATE TABLE ptag (id int PRIMARY KEY, v text, src "src%tag");'
            " INSERT INTO ptag VALUES (2, 'theirs', 'other')")
    h = _mapped("ptag", constants={"src": "mine"})
    run(db, h, {"action": "set", "data": {"id": 1, "v": "a"}})
    with pytest.raises(PacketError, match="another source's row"):
        run(db, h, {"action": "set", "data": {"id": 2, "v": "b"}})
    assert rows(db, "SELECT id, v, src FROM ptag ORDER BY id") == [(1, "a", "mine"), (2, "theirs", "other")]


def test_a_scoped_set_with_a_constant_the_column_stores_at_its_own_scale(db):
    """numeric(10,2) stores the constant 1.5 as 1.50: the scope compares the row with the row
    proposed (EXCLUDED), as the column stores both; every set after the first was dead-lettered."""
    ddl(db, "CREATE TABLE sn (id int PRIMARY KEY, v text, src numeric(10,2), at timestamp(0))")
    h = _mapped("sn", constants={"src": 1.5, "at": "2026-01-01 10:00:00.6"})
    run(db, h, {"action": "set", "data": {"id": 1, "v": "a"}})
    run(db, h, {"action": "set", "data": {"id": 1, "v": "b"}})
    assert rows(db, "SELECT v, src::text, at::text FROM sn") == [("b", "1.50", "2026-01-01 10:00:01")]
    ddl(db, "INSERT INTO sn VALUES (2, 'theirs', 2.5, NULL)")
    with pytest.raises(PacketError, match="another source's row"):
        run(db, h, {"action": "set", "data": {"id": 2, "v": "c"}})
    assert rows(db, "SELECT v FROM sn WHERE id = 2") == [("theirs",)]


def test_a_column_the_mapping_writes_dropped_at_the_target_while_running_pauses_it(db):
    """setup() checks the mapping's target columns at connect; one dropped (or renamed) after
    that was taken for a narrower target's column and its values ignored for good (review BB):
    the first packet that names it now pauses the target, its packets waiting."""
    ddl(db, "CREATE TABLE dc (id int PRIMARY KEY, vv text, n int)")
    h = _mapped("dc", columns={"v": "vv"})
    run(db, h, {"action": "add", "data": {"id": 1, "v": "a", "n": 1}})
    assert rows(db, "SELECT id, vv, n FROM dc") == [(1, "a", 1)]
    ddl(db, "ALTER TABLE dc DROP COLUMN vv")
    h.on_schema_error()     # as the Applier does on the statement's "column does not exist"
    for document in ({"action": "update", "data": {"v": "b"}, "restriction": {"id": 1}},
                     {"action": "add", "data": {"id": 2, "v": "c", "n": 2}}):
        with pytest.raises(StopListener, match=r"columns\.v: 'vv' is no column of public\.dc"):
            run(db, h, document)
    # a canonical column the target never had is still a narrower target's, not a problem
    ddl(db, "ALTER TABLE dc ADD COLUMN vv text")
    run(db, h, {"action": "add", "data": {"id": 3, "v": "d", "n": 3, "extra": 1}})
    assert rows(db, "SELECT id, vv FROM dc WHERE id = 3") == [(3, "d")]


def test_float_keys_are_back_filled_exactly_whatever_extra_float_digits(database):
    """A destination back-fills keys as the server prints them (to_jsonb): a database or role
    with extra_float_digits 0 or less printed 0.30000000000000004 as 0.3, and the targets stored
    another key (review SS). golconded's sessions set it to 1. A -0 key, which to_jsonb prints
    as 0, keeps its sign in the packet."""
    from golconde.listener import connect
    conn = connect(database + " options='-c extra_float_digits=-15'", "golconde test")
    conn.autocommit = True
    try:
        ddl(conn, "CREATE TABLE fk (k float8 PRIMARY KEY, v text)")
        h = AutoSQL("fk", role="destination")
        for text in ("0.30000000000000004", "3.141592653589793", "-0.0"):
            packet = run(conn, h, json.loads('{"action": "add", "data": {"k": %s, "v": "x"}}' % text,
                                             parse_float=Decimal))
            assert str(packet.data["k"]) == text
        assert rows(conn, "SELECT k::text FROM fk ORDER BY k, k::text") == [
            ("-0",), ("0.30000000000000004",), ("3.141592653589793",)]
        ddl(conn, "DELETE FROM fk")
        packet = run(conn, h, {"action": "add", "data": {"k": "-0", "v": "x"}})      # as text
        assert packet.data["k"] == "-0"
        packet = run(conn, h, {"action": "add", "data": {"k": "1e-1", "v": "x"}})
        assert packet.data["k"] == "1e-1"   # the same double as the server's 0.1
    finally:
        conn.close()


def test_the_words_for_the_current_time_are_refused_in_date_and_time_columns(db):
    """'now', 'today', 'tomorrow', 'yesterday' are read by each database at its own moment: the
    canonical relation and each target stored another value (a key too). Refused, naming the
    column, in data and restriction, in arrays, and for packets of a cached plan too."""
    ddl(db, "CREATE TABLE tm (id int PRIMARY KEY, at timestamptz, d date, ts timestamp[],"
            " r tstzrange, note text, g date GENERATED ALWAYS AS (d) STORED)")
    h = AutoSQL("tm", role="destination")
    run(db, h, {"action": "add", "data": {"id": 1, "at": "2026-01-01 10:00+00", "d": "epoch",
                                          "ts": ["infinity"], "note": "now"}})
    for data in ({"at": "now"}, {"d": "Today"}, {"ts": ["2026-01-01", "yesterday"]},
                 {"r": "[now,)"}, {"at": "tomorrow 10:00"}, {"at": "today10:00"}, {"at": "now_"},
                 {"d": "_today"}):
        with pytest.raises(PacketError, match="names the current time"):
            run(db, h, {"action": "update", "data": data, "restriction": {"id": 1}})
    with pytest.raises(PacketError, match="column at of public.tm is timestamp with time zone: 'now'"):
        run(db, h, {"action": "delete", "restriction": {"at": "now"}})
    with pytest.raises(PacketError, match="names the current time"):
        run(db, h, {"action": "add", "data": {"id": 2, "at": "NOW"}})
    # a batch through the plans: the second packet of a shape is checked too
    with pytest.raises(PacketError, match="names the current time"):
        with db.cursor() as cur:
            h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"id": 3, "at": "2026-01-02"}})),
                                parse(dumps({"action": "set", "data": {"id": 4, "at": "now"}}))])
    # a generated column's value is left out, but checked as a lone packet is (a target whose
    # column is a plain one would store it)
    with pytest.raises(PacketError, match="names the current time"):
        with db.cursor() as cur:
            h.apply_batch(cur, [parse(dumps({"action": "set", "data": {"id": 5, "g": "2026-01-02"}})),
                                parse(dumps({"action": "set", "data": {"id": 6, "g": "now"}}))])
    assert rows(db, "SELECT id, note FROM tm") == [(1, "now")]


def test_checked_columns_span_partitions_children_and_views(db):
    """A destination applies alone an update writing a column a unique index checks, also one a
    partition or an inheritance child holds (an UPDATE of the parent writes them); a view's
    every column counts. Such an index added later changes the schema's signature."""
    from golconde.schema import Relation, _signature, read_schema

    ddl(db, "CREATE TABLE pt (id int PRIMARY KEY, code text, n int) PARTITION BY RANGE (id);"
            " CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (0) TO (100);"
            " CREATE UNIQUE INDEX ON pt1 (code);"
            " CREATE TABLE ih (id int PRIMARY KEY, code text, n int, m int);"
            " CREATE TABLE ih1 (PRIMARY KEY (id), UNIQUE (code)) INHERITS (ih);"
            " CREATE UNIQUE INDEX ON ih1 (lower(m::text)) WHERE n > 0;"
            " CREATE TABLE vb (id int PRIMARY KEY, code text UNIQUE, n int);"
            " CREATE VIEW vv AS SELECT * FROM vb;"
            " CREATE TABLE plain (id int PRIMARY KEY, code text, n int, d int,"
            "  UNIQUE (code) DEFERRABLE, EXCLUDE (n WITH =));"
            " ALTER TABLE plain DROP COLUMN d")
    with db.cursor() as cur:
        assert read_schema(cur, Relation("public", "pt")).checked_columns == {"id", "code"}
        assert read_schema(cur, Relation("public", "ih")).checked_columns == {"id", "code", "m", "n"}
        assert read_schema(cur, Relation("public", "vv")).checked_columns == {"id", "code", "n"}
        assert read_schema(cur, Relation("public", "plain")).checked_columns == {"id", "n"}
        before = _signature(cur, Relation("public", "pt"))
        cur.execute("CREATE UNIQUE INDEX ON pt1 (n)")
        assert _signature(cur, Relation("public", "pt")) != before
        # a foreign partition: what its server checks is not known (every column); attaching
        # one changes the signature
        cur.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw;"
                    " CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw;"
                    " CREATE TABLE fp (id int, code text, n int) PARTITION BY RANGE (id);"
                    " CREATE TABLE fp1 PARTITION OF fp FOR VALUES FROM (0) TO (100);"
                    " CREATE UNIQUE INDEX ON fp1 (code)")
        assert read_schema(cur, Relation("public", "fp")).checked_columns == {"code"}
        before = _signature(cur, Relation("public", "fp"))
        cur.execute("CREATE FOREIGN TABLE fp2 PARTITION OF fp FOR VALUES FROM (100) TO (200)"
                    " SERVER elsewhere")
        assert _signature(cur, Relation("public", "fp")) != before
        assert read_schema(cur, Relation("public", "fp")).checked_columns == {"id", "code", "n"}
    ddl(db, "INSERT INTO pt VALUES (31, 'e'), (32, 'f')")
    sequence = [parse(dumps({"action": "update", "data": {"code": "e"}, "restriction": {"id": 32}})),
                parse(dumps({"action": "update", "data": {"code": "w"}, "restriction": {"id": 31}}))]
    with pytest.raises(psycopg2.IntegrityError):
        with db.cursor() as cur:
            AutoSQL("pt", role="destination").apply_batch(cur, sequence)
    assert rows(db, "SELECT id, code FROM pt ORDER BY id") == [(31, "e"), (32, "f")]
