"""No SQL is ever built from a packet value: AutoSQL's statements, for Hypothesis-generated tables
(column and table names full of quotes, semicolons, ``$$`` and ``%``) and packets (values full of
the same), carry every value as a bound parameter.

Every generated string value contains ``MARK`` (a character no generated identifier holds) and
every generated number has at least 13 digits, so that the check is exact: the SQL text
(``as_string`` of a real connection) must contain neither ``MARK`` nor any number's digits, and
``mogrify`` must show each value quoted as a literal. The first test needs no database (it walks the
``psycopg2.sql`` tree); the others use PostgreSQL (``GOLCONDE_TEST_DSN``) and are skipped without
it: they also run each statement on a table created for the example (in a transaction that is
rolled back) and read the values back.
"""
from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psycopg2
import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql
from psycopg2.extras import Json

from golconde.handlers.autosql import (AutoSQL, delete_statement, insert_statement, update_statement,
                                       upsert_statement)
from golconde.packet import Action, Packet
from golconde.schema import Column, Relation, TableSchema

from ..conftest import PG_DSN

#: In every generated string value, in no identifier or type name.
MARK = "\u00a7"
NASTY = ["'", '"', ";", "$$", "$q$", "--", "/*", "\\", "%", "%s", "%(x)s", "{", "}", ")", "E'",
         "\n", "'); DROP TABLE t; --", "\u2028", "\U0001f600", " "]
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00" + MARK)
nasty = st.lists(st.one_of(st.sampled_from(NASTY), st.text(CHARS, max_size=3)), max_size=5).map("".join)
identifier = nasty.filter(lambda name: name.strip() != "" and 0 < len(name.encode("utf-8")) <= 60)
#: A string value: hostile text around the mark.
text_value = st.tuples(nasty, nasty).map(lambda parts: parts[0] + MARK + parts[1])
#: Integers whose digits cannot occur in a statement by chance.
BIG = 10 ** 12
int4_value = st.one_of(st.integers(BIG, 2 ** 31 - 1), st.integers(-2 ** 31 + 1, -BIG)) \
    if BIG < 2 ** 31 else st.integers(BIG, 2 ** 62)
int8_value = st.one_of(st.integers(BIG, 2 ** 63 - 1), st.integers(-2 ** 63 + 1, -BIG))
json_value = st.recursive(st.one_of(st.none(), st.booleans(), text_value, int8_value),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(text_value, inner, max_size=3)),
                          max_leaves=6)

#: type name -> (Column flags, value strategy)
TYPES: Dict[str, Tuple[Dict[str, bool], Any]] = {
    "text": ({}, text_value),
    "character varying": ({}, text_value),
    "bigint": ({}, int8_value),
    "numeric": ({}, st.decimals(min_value=BIG, max_value=10 ** 20, places=3)),
    "boolean": ({}, st.booleans()),
    "jsonb": ({"is_json": True}, json_value),
    "json": ({"is_json": True}, json_value),
    "text[]": ({"is_array": True}, st.lists(st.one_of(st.none(), text_value), max_size=3)),
    "bigint[]": ({"is_array": True}, st.lists(int8_value, max_size=3)),
}
TYPE_NAMES = sorted(TYPES)


@st.composite
def tables(draw) -> TableSchema:
    """A relation with a bigint primary key and 1-5 more columns, every name hostile."""
    names = draw(st.lists(identifier, min_size=2, max_size=6, unique_by=str.lower))
    kinds = ["bigint"] + [draw(st.sampled_from(TYPE_NAMES)) for _ in names[1:]]
    columns = {name: Column(name, kind, **TYPES[kind][0]) for name, kind in zip(names, kinds)}
    relation = Relation("fuzz_%s" % uuid.UUID(int=draw(st.integers(0, 2 ** 64))).hex[:12],
                        draw(identifier))
    return TableSchema(relation, columns, (names[0],), ((names[0],),))


@st.composite
def rows(draw, table: TableSchema, key: Optional[int] = None) -> Dict[str, Any]:
    """A value for every column (the key: ``key`` or a fresh one)."""
    values = {}
    for name, column in table.columns.items():
        values[name] = draw(TYPES[column.type_name][1]) if name != table.primary_key[0] else (
            key if key is not None else draw(int8_value))
    return values


def leaves(node: Any) -> List[Any]:
    if isinstance(node, sql.Composed):
        return [leaf for part in node.seq for leaf in leaves(part)]
    return [node]


def strings(value: Any) -> List[str]:
    """Every string inside a value (JSON and arrays included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Json):
        return strings(value.adapted)
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in strings(key) + strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in strings(item)]
    return []


def statements(table: TableSchema, values: Dict[str, Any]) -> List[Tuple[Any, List[Any]]]:
    key = table.primary_key[0]
    data = [(table.columns[name], value) for name, value in values.items()]
    others = [(column, value) for column, value in data if column.name != key] or data
    restriction = [(table.columns[key], values[key])] + others[:1]
    return [insert_statement(table, data, returning=table.primary_key),
            upsert_statement(table, data, returning=table.primary_key),
            update_statement(table, others, restriction),
            delete_statement(table, restriction)]


# -- without a database -----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_statement_trees_hold_values_only_as_placeholders(data):
    table = data.draw(tables())
    values = data.draw(rows(table))
    identifiers = set(table.columns) | {table.relation.schema, table.relation.name}
    for query, params in statements(table, values):
        placeholders = 0
        for leaf in leaves(query):
            if isinstance(leaf, sql.Placeholder):
                assert leaf.name is None            # positional only
                placeholders += 1
            elif isinstance(leaf, sql.Identifier):
                assert set(leaf.strings) <= identifiers
            else:                                   # keywords, punctuation and type names only
                assert type(leaf) is sql.SQL, leaf
                assert MARK not in leaf.string
        assert placeholders == len(params)
        bound = [s for param in params for s in strings(param)]
        assert all(MARK in s for s in bound)


# -- with a real connection -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def connection():
    try:
        conn = psycopg2.connect(PG_DSN, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip("PostgreSQL not available (%s): run scripts/setup-services.sh" % str(exc).strip())
    yield conn
    conn.rollback()
    conn.close()


def text_of(query: Any, connection: Any) -> str:
    return query if isinstance(query, str) else query.as_string(connection)


def assert_no_value_in(text: str, values: Sequence[Any]) -> None:
    assert MARK not in text, text
    for value in values:
        if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            assert str(abs(value)) not in text, (value, text)


def flat_values(row: Dict[str, Any]) -> List[Any]:
    """Every scalar inside a row's values (JSON keys and array elements included)."""
    out: List[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            out.append(value)
    walk(list(row.values()))
    return out


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_statement_text_holds_no_value_and_mogrify_binds_them(connection, data):
    table = data.draw(tables())
    values = data.draw(rows(table))
    with connection.cursor() as cur:
        for query, params in statements(table, values):
            text = text_of(query, connection)
            assert_no_value_in(text, flat_values(values))
            # psycopg2's %-formatting succeeds ("%" in identifiers is escaped) and puts each
            # string value where its placeholder is, as a quoted literal
            rendered = cur.mogrify(text, params)
            for param in params:
                if isinstance(param, str):
                    literal = psycopg2.extensions.adapt(param)
                    literal.prepare(connection)
                    assert b"(" + literal.getquoted() + b")::" in rendered


class RecordingCursor:
    """A real cursor that remembers what was executed (no monkeypatching)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.executed: List[Tuple[Any, Any]] = []

    def execute(self, query: Any, params: Any = None) -> None:
        self.executed.append((query, params))
        self._cursor.execute(query, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def create_table(cur: Any, table: TableSchema) -> None:
    cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(table.relation.schema)))
    columns = [sql.SQL("{} {}{}").format(sql.Identifier(name), sql.SQL(column.type_name),
                                          sql.SQL(" PRIMARY KEY" if name == table.primary_key[0] else ""))
               for name, column in table.columns.items()]
    cur.execute(sql.SQL("CREATE TABLE {} ({})").format(
        sql.Identifier(table.relation.schema, table.relation.name), sql.SQL(", ").join(columns)))


def read_row(cur: Any, table: TableSchema, key: int) -> Optional[Dict[str, Any]]:
    names = list(table.columns)
    # no parameters: a "%" in a name would need escaping (test code may use a literal)
    cur.execute(sql.SQL("SELECT {} FROM {} WHERE {} = {}").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in names),
        sql.Identifier(table.relation.schema, table.relation.name),
        sql.Identifier(table.primary_key[0]), sql.Literal(key)))
    row = cur.fetchone()
    return dict(zip(names, row)) if row else None


def relation_text(table: TableSchema) -> str:
    return '"%s"."%s"' % (table.relation.schema, table.relation.name.replace('"', '""'))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_autosql_applies_hostile_packets_exactly_with_bound_values(connection, data):
    """add, update, set and delete through AutoSQL on a real table with hostile names; each value
    reads back unchanged and no executed statement's text holds a value."""
    table = data.draw(tables())
    first = data.draw(rows(table))
    key_name = table.primary_key[0]
    second = data.draw(rows(table, key=first[key_name]))
    second_keys = [name for name in second if name != key_name]
    changed = {name: second[name] for name in second_keys[:data.draw(st.integers(1, len(second_keys)))]} \
        if second_keys else {}
    try:
        with connection.cursor() as raw:
            create_table(raw, table)
            cur = RecordingCursor(raw)
            handler = AutoSQL(relation_text(table), role="destination")
            handler.setup(connection)
            result = handler.apply(cur, Packet(Action.ADD, first))
            assert result.data[key_name] == first[key_name]
            assert read_row(raw, table, first[key_name]) == first
            if changed:
                handler.apply(cur, Packet(Action.UPDATE, changed, {key_name: first[key_name]}))
                assert read_row(raw, table, first[key_name]) == dict(first, **changed)
            handler.apply(cur, Packet(Action.SET, second))
            assert read_row(raw, table, first[key_name]) == second
            handler.apply(cur, Packet(Action.DELETE, {}, {key_name: first[key_name]}))
            assert read_row(raw, table, first[key_name]) is None
            for query, params in cur.executed:
                assert_no_value_in(text_of(query, connection), flat_values(first) + flat_values(second))
    finally:
        connection.rollback()


def test_negative_number_into_text_column(connection):
    table = TableSchema(Relation("fuzz_%s" % uuid.uuid4().hex[:12], "t"),
                        {"id": Column("id", "bigint"), "note": Column("note", "text"),
                         "small": Column("small", "integer")}, ("id",), (("id",),))
    try:
        with connection.cursor() as cur:
            create_table(cur, table)
            handler = AutoSQL(relation_text(table), role="destination")
            handler.setup(connection)
            handler.apply(cur, Packet(Action.ADD, {"id": 1, "note": -5, "small": -2 ** 31}))
            assert read_row(cur, table, 1) == {"id": 1, "note": "-5", "small": -2 ** 31}
    finally:
        connection.rollback()
