"""Set-based apply (golconde.handlers.bulk) has exactly the effect of applying packets one by one.

Property-based: random sequences of packets over a small key space (so keys repeat, rows are
re-added, updated after delete, keys change, restrictions hit NULL and json columns) are applied
with ``AutoSQL.apply_batch`` in one database and with ``AutoSQL.apply`` one at a time, each in its
own savepoint, in another; both tables must end identical.
"""
from __future__ import annotations

from decimal import Decimal

import psycopg2
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golconde.errors import PacketError
from golconde.handlers.autosql import AutoSQL
from golconde.handlers import bulk
from golconde.packet import Action, Packet

TABLE = """
CREATE TABLE items (
    id     integer PRIMARY KEY,
    code   text UNIQUE,
    qty    integer,
    doc    jsonb,
    note   text
)
"""

keys = st.integers(min_value=1, max_value=6)
codes = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]))
qtys = st.one_of(st.none(), st.integers(min_value=-3, max_value=3))
docs = st.one_of(st.none(), st.sampled_from([{"k": 1}, {"k": 2}, [1, 2]]))
notes = st.one_of(st.none(), st.sampled_from(["x", "it's", "$$;"]))


@st.composite
def packets(draw):
    action = draw(st.sampled_from(["add", "set", "update", "delete", "update_key", "update_qty",
                                   "update_row", "update_code"]))
    if action == "add":
        return Packet(Action.ADD, {"id": draw(keys), "code": draw(codes), "qty": draw(qtys), "doc": draw(docs)})
    if action == "set":
        return Packet(Action.SET, {"id": draw(keys), "qty": draw(qtys), "note": draw(notes)})
    if action == "update":
        return Packet(Action.UPDATE, {"qty": draw(qtys), "note": draw(notes)}, {"id": draw(keys)})
    if action == "update_key":
        return Packet(Action.UPDATE, {"id": draw(keys)}, {"id": draw(keys)})
    if action == "update_row":   # the capture trigger's shape: the whole new row, old key
        old = draw(keys)
        new = draw(st.sampled_from([old, old, draw(keys)]))
        return Packet(Action.UPDATE, {"id": new, "qty": draw(qtys), "note": draw(notes)}, {"id": old})
    if action == "update_code":  # a UNIQUE column: one packet may take a code another frees
        return Packet(Action.UPDATE, {"code": draw(codes)}, {"id": draw(keys)})
    if action == "update_qty":   # restriction on a nullable, non-key column
        return Packet(Action.UPDATE, {"note": draw(notes)}, {"qty": draw(qtys)})
    column = draw(st.sampled_from(["id", "code", "doc"]))
    value = draw({"id": keys, "code": codes, "doc": docs}[column])
    return Packet(Action.DELETE, restriction={column: value})


@pytest.fixture(scope="module")
def two_databases():
    from ..conftest import create_database, drop_database
    dsns = [create_database(), create_database()]
    conns = [psycopg2.connect(dsn) for dsn in dsns]
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute(TABLE)
        conn.commit()
    yield conns
    for conn in conns:
        conn.close()
    for dsn in dsns:
        drop_database(dsn)


def one_by_one(conn, handler, sequence) -> int:
    """Reference: each packet alone in a savepoint; a failing packet is skipped. Returns how
    many failed."""
    failed = 0
    with conn.cursor() as cur:
        for packet in sequence:
            cur.execute("SAVEPOINT p")
            try:
                handler.apply(cur, packet)
                cur.execute("RELEASE SAVEPOINT p")
            except (psycopg2.Error, PacketError):
                cur.execute("ROLLBACK TO SAVEPOINT p")
                failed += 1
    return failed


def rows(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT id, code, qty, doc, note FROM items ORDER BY id")
        return cur.fetchall()


#: role -> the handler that applies batches in test_batch_equals_one_by_one
BATCHED = {role: AutoSQL("items", role=role) for role in ("target", "destination")}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(sequence=st.lists(packets(), min_size=1, max_size=40))
def test_batch_equals_one_by_one(two_databases, sequence):
    batched, reference = two_databases
    for conn in two_databases:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE items")
        conn.commit()
    failed = one_by_one(reference, AutoSQL("items", role="target"), sequence)
    reference.commit()
    expected = rows(reference)
    # the batch fails as a whole when any packet fails (the applier then replays packet by packet).
    # The batched handlers live across examples, so their plans (cached per packet shape) meet new
    # values; a destination returns and back-fills keys, a target does not.
    role = "destination" if len(sequence) % 2 else "target"
    handler = BATCHED[role]
    try:
        with batched.cursor() as cur:
            handler.apply_batch(cur, sequence)
        batched.commit()
    except (psycopg2.Error, PacketError):
        batched.rollback()
        one_by_one(batched, handler, sequence)
        batched.commit()
    else:
        # a target only gets what passed one by one at its destination: where a packet fails
        # alone, a target's run (a unique column taken and freed within it) may still pass
        if failed and role == "target" and any(packet.action is Action.UPDATE and "code" in packet.data
                                               for packet in sequence):
            return
    assert rows(batched) == expected


def test_runs_close_on_repeated_keys_and_keep_order():
    handler_rows = [
        bulk.Prepared(Action.DELETE, None, [], [(_col("id"), 1)]),
        bulk.Prepared(Action.DELETE, None, [], [(_col("id"), 2)]),
        bulk.Prepared(Action.DELETE, None, [], [(_col("id"), 1)]),   # repeats: new run
        bulk.Prepared(Action.DELETE, None, [], [(_col("id"), None)]),  # NULL: alone
        bulk.Prepared(Action.DELETE, None, [], [(_col("id"), 3)]),
    ]
    assert bulk.runs(handler_rows) == [[0, 1], [2], [3], [4]]


def test_whole_row_updates_that_keep_their_key_share_a_run():
    """The capture trigger's UPDATE packets repeat the key in their data: unchanged, it does not
    make the packet run alone; a changed key (or the same number as text) does."""
    def update(new_key, old_key):
        return bulk.Prepared(Action.UPDATE, None, [(_col("id"), new_key), (_col("qty"), 5)],
                             [(_col("id"), old_key)])
    items = [update(1, 1), update(2, 2), update(7, 3), update(4, 4), update("5", 5), update(6, 6)]
    assert [item.alone for item in items] == [False, False, True, False, True, False]
    assert bulk.runs(items) == [[0, 1], [2], [3], [4], [5]]


def test_keys_written_differently_close_a_run():
    """Two updates of one row must not share a statement (PostgreSQL would apply only one of
    them), also when their keys are written differently: "1" and 1 for an integer, a uuid in
    upper and lower case, a bpchar with trailing spaces, digits and the number for text. A key of
    another type written as text (a timestamp, whose offset may differ) makes its packet run alone."""
    from golconde.schema import Column

    def update(column, key):
        return bulk.Prepared(Action.UPDATE, None, [(Column("v", "text"), "x")], [(column, key)])
    integer, uid = Column("id", "integer"), Column("u", "uuid")
    text, padded = Column("t", "text"), Column("c", "bpchar")
    stamp = Column("ts", "timestamp with time zone")
    assert bulk.runs([update(integer, 1), update(integer, "1")]) == [[0], [1]]
    assert bulk.runs([update(integer, Decimal("2.0")), update(integer, " 2 ")]) == [[0], [1]]
    assert bulk.runs([update(integer, 1), update(integer, 2), update(integer, "3")]) == [[0, 1, 2]]
    assert bulk.runs([update(integer, "NaN"), update(integer, "NaN")]) == [[0], [1]]
    assert bulk.runs([update(integer, Decimal("1.5")), update(integer, 2)]) == [[0], [1]]  # rounded
    assert bulk.runs([update(integer, 1.5), update(integer, 2)]) == [[0], [1]]
    name, ci = Column("n", "name"), Column("t", "text", deterministic=False)
    assert bulk.runs([update(name, "x" * 63 + "1"), update(name, "x" * 63 + "2")]) == [[0], [1]]
    assert bulk.runs([update(name, "a"), update(name, True)]) == [[0], [1]]     # name says t, not true
    assert bulk.runs([update(ci, "ABC"), update(ci, "abc")]) == [[0], [1]]
    a = "0e6a5b2c-3d4e-4f50-8a6b-7c8d9e0f1a2b"
    assert bulk.runs([update(uid, a), update(uid, "{%s}" % a.upper().replace("-", ""))]) == [[0], [1]]
    assert bulk.runs([update(text, 5), update(text, "5"), update(text, True), update(text, "true")]) \
        == [[0], [1, 2], [3]]
    assert bulk.runs([update(padded, "ab"), update(padded, "ab  ")]) == [[0], [1]]
    assert bulk.runs([update(stamp, "2026-01-01 00:00+00"), update(stamp, "2026-01-01 01:00+01"),
                      update(stamp, "2026-01-02 00:00+00")]) == [[0], [1], [2]]


def test_a_case_insensitive_collation_closes_a_run(two_databases):
    """Under a nondeterministic collation "ABC" and "abc" are one key: the second update wins,
    as one by one."""
    conn = two_databases[0]
    with conn.cursor() as cur:
        cur.execute("CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
        cur.execute("CREATE TABLE coll (k text COLLATE ci PRIMARY KEY, v text)")
        cur.execute("INSERT INTO coll VALUES ('abc', 'old')")
        handler = AutoSQL("coll", role="target")
        assert handler.cache.get(cur, handler.table).columns["k"].deterministic is False
        handler.apply_batch(cur, [Packet(Action.UPDATE, {"v": "first"}, {"k": "ABC"}),
                                  Packet(Action.UPDATE, {"v": "second"}, {"k": "abc"})])
        cur.execute("SELECT k, v FROM coll")
        assert cur.fetchall() == [("abc", "second")]
    conn.rollback()


def test_an_update_run_applies_keys_written_differently_in_order(two_databases):
    """The packets in order, as one by one: the second update of row 1 wins."""
    conn = two_databases[0]
    with conn.cursor() as cur:
        cur.execute("TRUNCATE items")
        cur.execute("INSERT INTO items (id, note) VALUES (1, 'a'), (2, 'b')")
        AutoSQL("items", role="target").apply_batch(cur, [
            Packet(Action.UPDATE, {"note": "first"}, {"id": 1}),
            Packet(Action.UPDATE, {"note": "second"}, {"id": "1"}),
            Packet(Action.UPDATE, {"note": "third"}, {"id": 2})])
        cur.execute("SELECT id, note FROM items ORDER BY id")
        assert cur.fetchall() == [(1, "second"), (2, "third")]
    conn.rollback()


def _col(name):
    from golconde.schema import Column
    return Column(name, "integer")


def test_a_destination_applies_alone_an_update_writing_a_unique_column(two_databases):
    """PostgreSQL checks a unique column row by row, in the order an UPDATE visits the rows: a
    run of updates could pass where the packets in order do not (the first takes the code the
    second frees), and the targets, whose rows lie in another order, then dead-lettered it.
    A destination applies such an update alone (its run fails, and it is dead-lettered); a
    restriction's own value repeated in data, and a target, still share a run."""
    from golconde.schema import read_schema, Relation
    conn = two_databases[0]
    with conn.cursor() as cur:
        cur.execute("TRUNCATE items")
        cur.execute("INSERT INTO items (id, code) VALUES (31, 'e'), (32, 'f')")
        table = read_schema(cur, Relation("public", "items"))
    conn.commit()
    assert table.checked_columns == {"id", "code"}
    code = table.columns["code"]
    ident, qty = table.columns["id"], table.columns["qty"]

    def update(data, key):
        return bulk.Prepared(Action.UPDATE, None, data, [(ident, key)], table=table)
    items = [update([(code, "e")], 32), update([(code, "w")], 31)]
    assert bulk.runs(items, checked_alone=True) == [[0], [1]]
    assert bulk.runs(items) == [[0, 1]]
    same = [update([(ident, 1), (qty, 1)], 1), update([(ident, 2), (qty, 1)], 2)]
    assert bulk.runs(same, checked_alone=True) == [[0, 1]]
    sequence = [Packet(Action.UPDATE, {"code": "e"}, {"id": 32}),
                Packet(Action.UPDATE, {"code": "w"}, {"id": 31})]
    with pytest.raises(psycopg2.IntegrityError):
        with conn.cursor() as cur:
            AutoSQL("items", role="destination").apply_batch(cur, sequence)
    conn.rollback()


def test_large_batch_uses_few_statements(two_databases):
    conn = two_databases[0]
    with conn.cursor() as cur:
        cur.execute("TRUNCATE items")
    conn.commit()
    handler = AutoSQL("items", role="destination")
    sequence = [Packet(Action.ADD, {"id": i, "qty": i}) for i in range(100, 2100)]
    sequence += [Packet(Action.UPDATE, {"qty": 0}, {"id": i}) for i in range(100, 2100)]
    sequence += [Packet(Action.DELETE, restriction={"id": i}) for i in range(100, 1100)]
    sequence += [Packet(Action.UPDATE, {"id": i, "qty": 1}, {"id": i}) for i in range(1100, 2100)]

    class Counting(psycopg2.extensions.cursor):
        executed = 0

        def execute(self, query, vars=None):
            Counting.executed += 1
            return super().execute(query, vars)

    with conn.cursor(cursor_factory=Counting) as cur:
        results = handler.apply_batch(cur, sequence)
    conn.commit()
    counting = Counting
    assert len(results) == len(sequence)
    assert counting.executed <= 11      # 2 + 2 + 1 + 1 pages of 1000 rows, plus catalog reads
    assert rows(conn)[0][:3] == (1100, None, 1)
    assert len(rows(conn)) == 1000


def test_plans_follow_the_schema(two_databases):
    """A plan (how packets of one shape resolve) is dropped with the schema it was made from: after
    a column is renamed and the handler told of a schema error, the old shape no longer applies."""
    conn = two_databases[0]
    handler = AutoSQL("planned", role="destination")
    with conn.cursor() as cur:      # one transaction, rolled back: the table goes with it
        cur.execute("CREATE TABLE planned (id integer PRIMARY KEY, qty integer)")
        handler.apply_batch(cur, [Packet(Action.SET, {"id": i, "qty": i}) for i in range(3)])
        table = handler.cache.get(cur, handler.table)
        assert len(table.plans) == 1
        handler.apply_batch(cur, [Packet(Action.SET, {"id": i, "qty": 10 * i}) for i in range(5)])
        assert len(table.plans) == 1        # the same shape: the same plan, new values
        cur.execute("SELECT id, qty FROM planned ORDER BY id")
        assert cur.fetchall() == [(i, 10 * i) for i in range(5)]
        cur.execute("ALTER TABLE planned RENAME qty TO amount")
        handler.on_schema_error()
        with pytest.raises(PacketError, match="'qty'"):
            handler.apply_batch(cur, [Packet(Action.SET, {"id": 1, "qty": 2})])
    conn.rollback()


def test_only_a_destination_back_fills_generated_keys(two_databases):
    """A destination returns the keys PostgreSQL generated (its targets need them); a target fans
    nothing out, so its statements return nothing and its packets come back as given."""
    conn = two_databases[0]
    sequence = [Packet(Action.ADD, {"note": "n%d" % i}) for i in range(4)]
    with conn.cursor() as cur:      # one transaction, rolled back: the table goes with it
        cur.execute("CREATE TABLE serials (id serial PRIMARY KEY, note text)")
        for role, alone in (("destination", False), ("target", False), ("destination", True),
                            ("target", True)):
            handler = AutoSQL("serials", role=role)
            if alone:
                results = [handler.apply(cur, packet) for packet in sequence]
            else:
                results = handler.apply_batch(cur, sequence)
            cur.execute("SELECT id FROM serials ORDER BY id DESC LIMIT 4")
            ids = sorted(row[0] for row in cur.fetchall())
            if role == "destination":
                assert [r.data for r in results] == [{"note": "n%d" % i, "id": ids[i]} for i in range(4)]
            else:
                assert results == sequence
        cur.execute("SELECT count(*) FROM serials")
        assert cur.fetchone()[0] == 16
    conn.rollback()


def test_a_subclass_that_prepares_its_own_way_gets_every_packet(two_databases):
    """Plans skip prepare() for the later packets of a shape; a subclass overriding prepare() is
    called for every packet instead."""
    conn = two_databases[0]

    class Doubling(AutoSQL):
        def prepare(self, cursor, packet):
            data = dict(packet.data, qty=2 * packet.data["qty"])
            return super().prepare(cursor, Packet(packet.action, data))

    with conn.cursor() as cur:
        cur.execute("TRUNCATE items")
        Doubling("items", role="target").apply_batch(
            cur, [Packet(Action.SET, {"id": i, "qty": i}) for i in range(1, 4)])
        cur.execute("SELECT id, qty FROM items ORDER BY id")
        assert cur.fetchall() == [(1, 2), (2, 4), (3, 6)]
    conn.rollback()


def test_a_bad_packet_for_a_missing_relation_is_a_packet_error(two_databases):
    """The packet's own checks come before the catalog's: a packet that can never apply is a dead
    letter, not a reason to pause the listener until the relation exists."""
    with two_databases[0].cursor() as cur, pytest.raises(PacketError, match="empty restriction"):
        AutoSQL("no_such_table", role="target").apply_batch(cur, [Packet(Action.DELETE, restriction={})])
    two_databases[0].rollback()


def test_a_set_of_only_a_unique_key_does_nothing_at_a_target(two_databases):
    """At a target, a set whose data holds only a unique key's columns is DO NOTHING (nothing to
    return); a destination updates the key to itself to return the generated primary key."""
    conn = two_databases[0]
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE coded (id serial PRIMARY KEY, code text UNIQUE)")
        cur.execute("INSERT INTO coded (code) VALUES ('a'), ('b')")
        sequence = [Packet(Action.SET, {"code": code}) for code in ("a", "b", "c")]
        target = AutoSQL("coded", role="target").apply_batch(cur, sequence)
        assert target == sequence
        cur.execute("SELECT id, code FROM coded ORDER BY id")
        rows = cur.fetchall()
        assert [code for _, code in rows] == ["a", "b", "c"] and rows[:2] == [(1, "a"), (2, "b")]
        destination = AutoSQL("coded", role="destination").apply_batch(cur, sequence)
        assert [p.data for p in destination] == [{"code": code, "id": i} for i, code in rows]
        cur.execute("SELECT id, code FROM coded ORDER BY id")
        assert cur.fetchall() == rows
    conn.rollback()


# -- values passed as one JSON parameter (bulk.json_kinds) ------------------------------------------

TYPED = """
CREATE TABLE "1259" ();
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN short AS varchar(4);
CREATE TABLE typed (
    id    integer PRIMARY KEY,
    i2    smallint, i8 bigint, num numeric, num2 numeric(6, 2), r real, d double precision,
    t     text, vc varchar(5), c bpchar(3), n name, b boolean, ts timestamptz, day date,
    u     uuid, raw bytea, m mood, p posint, s short, js jsonb, arr integer[], rc regclass
)
"""
TYPED_COLUMNS = ["i2", "i8", "num", "num2", "r", "d", "t", "vc", "c", "n", "b", "ts", "day", "u",
                 "raw", "m", "p", "s", "js", "arr", "rc"]
#: JSON values of every kind, many of them refused by some column types, some read differently
#: as text than as a bound literal (1.5 for an integer, 1E+2 for text, -0.0 for a float, true for
#: name, a number for regclass where a table has that name)
VALUES = ([
    None, 0, 1, -5, 7, 2 ** 31, 2 ** 40, 2 ** 70, Decimal("1.5"), Decimal("-0.25"), Decimal("1E+2"),
    Decimal("2.50"), Decimal("-0.0"), True, False, "1259", "pg_class", "5", "-3", " 7", "1.5", "1e3", "abc", "it's", "back\\slash",
    "ünï ✓", "t", "false", "2026-01-02", "2026-01-02 03:04:05+00", "\\x4142", "happy",
    "00000000-0000-0000-0000-000000000001", "{1,2}", "", "  ", "toolong", {"k": 1}, [1, 2]])
ANY_VALUE = st.sampled_from(VALUES)


@pytest.fixture(scope="module")
def typed_databases(two_databases):
    for conn in two_databases:
        with conn.cursor() as cur:
            cur.execute(TYPED)
        conn.commit()
    return two_databases


@st.composite
def typed_sequences(draw):
    """Runs of packets over one or two columns, each run a list of packets of one shape: sets of
    new ids, updates by id, updates and deletes restricted on the first column. The values come
    from a few drawn per example, so that most runs hold values every packet's column takes."""
    columns = draw(st.lists(st.sampled_from(TYPED_COLUMNS), min_size=1, max_size=2, unique=True))
    values = st.sampled_from(draw(st.lists(ANY_VALUE, min_size=1, max_size=3)))
    size = draw(st.integers(min_value=2, max_value=4))
    ids = range(1, size + 1)

    def data():
        return {column: draw(values) for column in columns}
    runs = [[Packet(Action.SET, dict(data(), id=i)) for i in ids],
            [Packet(Action.UPDATE, data(), {"id": i}) for i in ids],
            [Packet(Action.UPDATE, {"id": 10 + i}, {columns[0]: draw(values)}) for i in ids],
            [Packet(Action.DELETE, restriction={columns[0]: draw(values)}) for _ in ids]]
    return draw(st.permutations(runs))


def typed_rows(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT id, typed::text FROM typed ORDER BY id")
        return cur.fetchall()


#: role -> the handler that applies batches in test_typed_runs_equal_one_by_one
TYPED_BATCHED = {role: AutoSQL("typed", role=role) for role in ("target", "destination")}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(runs=typed_sequences())
def test_typed_runs_equal_one_by_one(typed_databases, runs):
    """Whichever way a run's values travel (one JSON parameter, or bound literals), a run applied
    as one batch leaves exactly what its packets applied one by one with bound literals leave; a
    batch that fails is replayed packet by packet (as the applier does), with the same result."""
    batched, reference = typed_databases
    for conn in typed_databases:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE typed")
        conn.commit()
    apply_runs(batched, reference, TYPED_BATCHED["destination" if len(runs[0]) % 2 else "target"], runs)
    assert typed_rows(batched) == typed_rows(reference)


def apply_runs(batched, reference, handler, runs):
    """``runs`` one by one in ``reference``; in ``batched``, each run as one batch in a savepoint,
    replayed one by one when it fails (as the applier does)."""
    for run in runs:
        one_by_one(reference, AutoSQL("typed", role="target"), run)
    reference.commit()
    for run in runs:
        with batched.cursor() as cur:
            cur.execute("SAVEPOINT b")
            try:
                handler.apply_batch(cur, run)
                cur.execute("RELEASE SAVEPOINT b")
            except (psycopg2.Error, PacketError):
                cur.execute("ROLLBACK TO SAVEPOINT b")
                one_by_one(batched, handler, run)
    batched.commit()


@pytest.mark.parametrize("column", TYPED_COLUMNS)
def test_every_value_in_every_column_type_as_one_by_one(typed_databases, column):
    """Every value of VALUES in a run of two sets, of two updates by id, of two updates and two
    deletes restricted on the column (with the next value): batched as the packets one by one."""
    batched, reference = typed_databases
    for conn in typed_databases:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE typed")
        conn.commit()
    other = "t" if column != "t" else "i8"
    runs = []
    for j, value in enumerate(VALUES):
        a, b = 2 * j + 1, 2 * j + 2
        runs.append([Packet(Action.SET, {"id": a, column: value}), Packet(Action.SET, {"id": b, column: value})])
        runs.append([Packet(Action.UPDATE, {column: value}, {"id": a}),
                     Packet(Action.UPDATE, {column: value}, {"id": b})])
    apply_runs(batched, reference, TYPED_BATCHED["destination"], runs)
    assert typed_rows(batched) == typed_rows(reference)
    runs = []
    for j, (first, second) in enumerate(zip(VALUES, VALUES[1:])):
        runs.append([Packet(Action.UPDATE, {other: str(j) if other == "t" else j}, {column: first}),
                     Packet(Action.UPDATE, {other: str(-j) if other == "t" else -j}, {column: second})])
    for first, second in zip(VALUES[::2], VALUES[1::2]):
        runs.append([Packet(Action.DELETE, restriction={column: first}),
                     Packet(Action.DELETE, restriction={column: second})])
    apply_runs(batched, reference, TYPED_BATCHED["target"], runs)
    assert typed_rows(batched) == typed_rows(reference)


FLOATS = """
CREATE TABLE floats (id integer PRIMARY KEY, r real, d double precision, ra real[],
                     da double precision[])
"""


@pytest.mark.parametrize("role", ["destination", "target"])
def test_float_columns_read_numbers_as_their_text(two_databases, role):
    """A decimal number for a real or double precision column (or an element of their arrays) is
    read as its text, one packet alone and in runs alike: -0.0 stays -0 (a numeric literal has no
    negative zero), an array may mix numbers with "NaN", and an out-of-range number is named as
    the packet wrote it."""
    conn = two_databases[0]
    zero = Decimal("-0.0")
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS floats; " + FLOATS)
        handler = AutoSQL("floats", role=role)
        handler.apply_batch(cur, [Packet(Action.SET, {"id": 1, "r": zero, "d": zero, "ra": [zero, 1],
                                                      "da": [[zero, "NaN"], [2, None]]})])
        handler.apply_batch(cur, [Packet(Action.ADD, {"id": i, "r": zero, "d": zero, "ra": [zero],
                                                      "da": [zero, "Infinity", Decimal("1.5")]})
                                  for i in (2, 3)])
        handler.apply_batch(cur, [Packet(Action.UPDATE, {"r": zero, "d": Decimal("-1E-3")}, {"id": i})
                                  for i in (2, 3)])
        cur.execute("SELECT id, r::text, d::text, ra::text, da::text FROM floats ORDER BY id")
        assert cur.fetchall() == [(1, "-0", "-0", "{-0,1}", "{{-0,NaN},{2,NULL}}"),
                                  (2, "-0", "-0.001", "{-0}", "{-0,Infinity,1.5}"),
                                  (3, "-0", "-0.001", "{-0}", "{-0,Infinity,1.5}")]
        # a zero without a fraction (JSON -0e0: Decimal("-0")) travels on as the JSON integer -0,
        # read as 0 at the targets: it is 0 here too, alone and in a run
        for ids in ((5,), (6, 7)):
            handler.apply_batch(cur, [Packet(Action.SET, {"id": i, "d": Decimal("-0E0"), "da": [Decimal("-0")]})
                                      for i in ids])
        cur.execute("SELECT id, d::text, da::text FROM floats WHERE id >= 5 ORDER BY id")
        assert cur.fetchall() == [(i, "0", "{0}") for i in (5, 6, 7)]
        cur.execute("SAVEPOINT s")
        with pytest.raises(psycopg2.Error, match=r'"1E\+39" is out of range for type real'):
            handler.apply_batch(cur, [Packet(Action.SET, {"id": 4, "r": Decimal("1E+39")})])
        cur.execute("ROLLBACK TO SAVEPOINT s")
        cur.execute("DROP TABLE floats")
    conn.commit()


class Recording(psycopg2.extensions.cursor):
    """A cursor that keeps the text of every statement it executes."""

    statements: list = []

    def execute(self, query, vars=None):
        result = super().execute(query, vars)
        Recording.statements.append(self.query.decode())
        return result


def _recorded(conn, handler, sequence):
    Recording.statements = []
    with conn.cursor(cursor_factory=Recording) as cur:
        handler.apply_batch(cur, sequence)
    return [s for s in Recording.statements if s.startswith(("INSERT", "UPDATE", "DELETE"))]


def test_runs_pass_their_values_as_one_json_parameter_when_the_types_read_them_alike(typed_databases):
    """Integers, decimal numbers, booleans, strings and NULLs for columns whose types read them
    alike go as one JSON array per statement (domains by their base type); a json or array column,
    or a value read differently as text (a decimal number for text), keeps bound literals."""
    conn = typed_databases[0]
    handler = AutoSQL("typed", role="target")
    try:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE typed")
        adds = [Packet(Action.ADD, {"id": i, "num": Decimal("1E+2"), "t": i, "b": i % 2 == 0,
                                    "p": i, "m": "ok", "ts": None}) for i in range(1, 4)]
        statements = _recorded(conn, handler, adds)
        assert len(statements) == 1 and "json_array_elements" in statements[0]
        updates = [Packet(Action.UPDATE, {"t": "x%d" % i, "s": "ab"}, {"id": i}) for i in range(1, 4)]
        deletes = [Packet(Action.DELETE, restriction={"t": "x%d" % i}) for i in range(1, 3)]
        statements = _recorded(conn, handler, updates + deletes)
        assert len(statements) == 2 and all("json_array_elements" in s for s in statements)
        with conn.cursor() as cur:
            cur.execute("SELECT id, num, t, b, p, m, s FROM typed ORDER BY id")
            assert cur.fetchall() == [(3, Decimal("100"), "x3", False, 3, "ok", "ab")]
        for k, data in enumerate(({"js": {"k": 1}}, {"arr": [1, 2]}, {"t": Decimal("1E+2")}, {"num": 1.5})):
            sequence = [Packet(Action.ADD, dict(data, id=i)) for i in (10 + 2 * k, 11 + 2 * k)]
            statements = _recorded(conn, handler, sequence)
            assert len(statements) == 1 and "json_array_elements" not in statements[0], data
    finally:
        conn.rollback()


def test_a_fraction_for_an_integer_column_in_a_run_is_dead_lettered_packet_by_packet(typed_databases):
    """1.5 for an integer column: as text the integer type refuses it, as a bound literal it would
    be rounded, so it is refused (AutoSQL's bind): the run fails, the applier replays the batch
    packet by packet, and only the packets carrying a fraction are dead-lettered."""
    from golconde import ledger
    from golconde.apply import Applier
    conn = typed_databases[0]
    ledger.ensure(conn)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE typed")
    conn.commit()
    applier = Applier(AutoSQL("typed", role="target"), "typed-json-refused")
    items = [("typed-json-%d" % i, b'{"action": "add", "data": {"id": %d, "i8": %s, "t": 7}}'
              % (i, b"1.5" if i == 2 else b"2.0")) for i in range(1, 4)]
    outcomes = applier.apply_batch(conn, items)
    assert [o.status for o in outcomes] == ["applied", "dead", "applied"]
    assert "expected an integer, not 1.5" in outcomes[1].reason
    with conn.cursor() as cur:
        cur.execute("SELECT id, i8, t FROM typed ORDER BY id")
        assert cur.fetchall() == [(1, 2, "7"), (3, 2, "7")]
    conn.commit()


def test_json_kinds_follow_the_base_type():
    from golconde.schema import Column
    assert bulk.json_kinds(Column("p", "posint", base_type="integer")) >= {int, str}
    assert Decimal not in bulk.json_kinds(Column("p", "posint", base_type="integer"))
    assert Decimal in bulk.json_kinds(Column("n", "numeric"))
    assert bool not in bulk.json_kinds(Column("i", "integer"))
    assert bulk.json_kinds(Column("t", "text")) >= {int, bool, str, type(None)}
    assert Decimal not in bulk.json_kinds(Column("t", "character varying"))
    assert bulk.json_kinds(Column("ts", "timestamp with time zone")) == {str, type(None)}
    assert bulk.json_kinds(Column("js", "jsonb", is_json=True)) == frozenset()
    assert bulk.json_kinds(Column("a", "integer[]", is_array=True)) == frozenset()
