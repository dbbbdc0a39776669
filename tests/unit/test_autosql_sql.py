"""AutoSQL without a database: relation names, column resolution, conflict keys, binding, and the
SQL text produced (rendered from the psycopg2.sql tree with a stand-in for identifier quoting)."""
from __future__ import annotations

from decimal import Decimal

import pytest
from psycopg2 import sql
from psycopg2.extras import Json

from golconde.errors import ConfigError, PacketError, StopListener
from golconde.handlers import load_handler
from golconde.handlers.base import Handler
from golconde.handlers.autosql import (AutoSQL, bind, conflict_key, delete_statement, ident, insert_statement,
                                       resolve, update_statement, upsert_statement)
from golconde.packet import Action, Packet, dumps, parse
from golconde.schema import Column, Relation, SchemaCache, SchemaError, TableSchema, parse_relation


def render(node) -> str:
    """SQL text of a psycopg2.sql tree; identifiers quoted as PostgreSQL does (no connection)."""
    if isinstance(node, sql.Composed):
        return "".join(render(part) for part in node.seq)
    if isinstance(node, sql.Identifier):
        text = ".".join('"%s"' % name.replace('"', '""') for name in node.strings)
        # autosql.ident() doubles "%" so that psycopg2's parameter formatting leaves it alone
        return text.replace("%", "%%") if isinstance(node, type(ident("x"))) else text
    if isinstance(node, sql.Placeholder):
        return "%s"
    if isinstance(node, sql.SQL):
        return node.string
    raise AssertionError("unexpected %r in a statement (values must be placeholders)" % (node,))


def table(columns, primary_key=(), unique_keys=None, name="t") -> TableSchema:
    cols = {}
    for spec in columns:
        column = spec if isinstance(spec, Column) else Column(spec[0], spec[1])
        cols[column.name] = column
    keys = unique_keys if unique_keys is not None else ((primary_key,) if primary_key else ())
    return TableSchema(Relation("public", name), cols, tuple(primary_key), tuple(keys))


USERS = table([("id", "integer"), ("email", "text"), ("name", "text"), ("tenant", "integer"),
               Column("doc", "jsonb", is_json=True), Column("raw", "json", is_json=True),
               Column("tags", "text[]", is_array=True), Column("docs", "jsonb[]", is_array=True, is_json=True),
               ("FRIEND_ID", "integer"), ("friend_id", "integer"), ("Mixed", "text")],
              primary_key=("id",), unique_keys=(("id",), ("tenant", "email")))


def col(name: str) -> Column:
    return USERS.columns[name]


# --- relation names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("users", Relation("public", "users")),
    ("Users", Relation("public", "users")),
    ("  app.users ", Relation("app", "users")),
    ('"My Schema"."T.1"', Relation("My Schema", "T.1")),
    ('"we""ird;$$"', Relation("public", 'we"ird;$$')),
    ('app."Users"', Relation("app", "Users")),
    ("s$1._x9", Relation("s$1", "_x9")),
    ("\u00e9t\u00e9.t", Relation("\u00e9t\u00e9", "t")),
    # PostgreSQL folds only A-Z in a UTF-8 database: CREATE TABLE \u00c4rger makes "\u00c4rger"
    ("\u00c4rger.\u00c9T\u00c9", Relation("\u00c4rger", "\u00c9t\u00c9")),
])
def test_parse_relation(text, expected):
    assert parse_relation(text) == expected
    assert parse_relation(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "   ", ".", "a.", ".a", "a.b.c", '"', '"a', '""', 'a b', "1abc",
                                  "a-b", '"a"b', "a..b", None])
def test_parse_relation_rejects(text):
    with pytest.raises(ConfigError):
        parse_relation(text)


def test_relation_str_quotes_only_when_needed():
    assert str(Relation("public", "t")) == "public.t"
    assert str(Relation("My Schema", 'a"b')) == '"My Schema"."a""b"'


# --- column resolution ---------------------------------------------------------------------------------

def test_resolve_exact_then_case_insensitive():
    matched, unknown = resolve(USERS, {"ID": 1, "Email": "e", "friend_id": 2, "FRIEND_ID": 3, "mixed": "m",
                                       "nope": 0}, "data")
    assert [(key, column.name, value) for key, column, value in matched] == [
        ("ID", "id", 1), ("Email", "email", "e"), ("friend_id", "friend_id", 2),
        ("FRIEND_ID", "FRIEND_ID", 3), ("mixed", "Mixed", "m")]
    assert unknown == ["nope"]


def test_resolve_ambiguous_key():
    with pytest.raises(PacketError, match=r"data key 'Friend_Id' is ambiguous in public\.t.*FRIEND_ID, friend_id"):
        resolve(USERS, {"Friend_Id": 1}, "data")


def test_resolve_two_keys_one_column():
    with pytest.raises(PacketError, match=r"restriction keys 'id' and 'Id' both name column id of public\.t"):
        resolve(USERS, {"id": 1, "Id": 2}, "restriction")


# --- conflict key --------------------------------------------------------------------------------------

def test_conflict_key_prefers_primary_key():
    assert conflict_key(USERS, ["id", "tenant", "email", "name"]) == ("id",)


def test_conflict_key_falls_back_to_unique_key():
    assert conflict_key(USERS, ["email", "tenant", "name"]) == ("tenant", "email")


def test_conflict_key_none():
    assert conflict_key(USERS, ["email", "name"]) is None
    assert conflict_key(table([("a", "int")]), ["a"]) is None


# --- binding -------------------------------------------------------------------------------------------

def test_bind_plain_values():
    assert bind(USERS, col("name"), None) is None
    assert bind(USERS, col("name"), "x") == "x"
    assert bind(USERS, col("id"), Decimal("2.0")) == Decimal("2.0")
    with pytest.raises(PacketError, match=r"expected an integer, not 1.5 \(PostgreSQL would round it\)"):
        bind(USERS, col("id"), Decimal("1.5"))
    assert bind(USERS, col("name"), True) is True
    with pytest.raises(PacketError, match="expected a number, not true"):
        bind(USERS, col("id"), True)


def test_bind_json_wraps_every_json_value():
    for value in ({"a": Decimal("1.10")}, [1, 2], "s", 3, False):
        bound = bind(USERS, col("doc"), value)
        assert isinstance(bound, Json) and bound.dumps(bound.adapted) == dumps(value)
    assert bind(USERS, col("doc"), None) is None  # SQL NULL, not JSON null


def test_bind_arrays():
    assert bind(USERS, col("tags"), ["a", None]) == ["a", None]
    assert bind(USERS, col("tags"), []) == []
    assert bind(USERS, col("tags"), "{a,b}") == "{a,b}"
    docs = bind(USERS, col("docs"), [{"a": 1}, None])
    assert isinstance(docs[0], Json) and docs[1] is None


def test_bind_hstore_and_composite():
    store = Column("h", "hstore", structure="hstore")
    assert bind(USERS, store, {"a": "1", 'q"\\': None, "": 'v\\"'}) == \
        r'"a"=>"1", "q\"\\"=>NULL, ""=>"v\\\""'
    assert bind(USERS, store, "a=>b") == "a=>b"
    stores = Column("hs", "hstore[]", is_array=True, structure="hstore")
    assert bind(USERS, stores, [{"k": "v"}, None, [{}]]) == ['"k"=>"v"', None, [""]]
    pair = Column("p", "pair", structure="composite")
    for value in ({"a": 1}, "(1,x)", [{"a": 1}]):
        bound = bind(USERS, pair, value)    # the statement reads the JSON (jsonb_populate_record)
        assert isinstance(bound, Json) and bound.adapted == value
    query, _ = insert_statement(USERS, [(pair, {"a": 1})])
    assert "jsonb_populate_record(NULL::pair, g.v)" in render(query)
    query, _ = insert_statement(USERS, [(Column("ps", "pair[]", is_array=True, structure="composite"), [])])
    assert "jsonb_populate_record(NULL::pair, e.x)" in render(query) and ")::pair[] END" in render(query)


@pytest.mark.parametrize("name,value,message", [
    ("name", {"a": 1}, r"column name of public\.t is text: an object is accepted only for json"),
    ("id", [1], r"column id of public\.t is integer: an array is accepted only for json"),
    ("tags", 5, r"column tags of public\.t is text\[\]: expected a JSON array"),
    ("tags", {"a": 1}, r"expected a JSON array"),
    ("tags", [["a"], [{"b": 1}]], r"its array cannot hold a JSON object"),
])
def test_bind_wrong_json_kind(name, value, message):
    with pytest.raises(PacketError, match=message):
        bind(USERS, col(name), value)


# --- statements ----------------------------------------------------------------------------------------

def test_insert_with_returning():
    query, params = insert_statement(USERS, [(col("name"), "n"), (col("doc"), {"a": 1})], returning=("id",))
    assert render(query) == ('INSERT INTO "public"."t" ("name", "doc") VALUES ((%s)::text, (%s)::jsonb)'
                             ' RETURNING pg_catalog.to_jsonb("id")::pg_catalog.text')
    assert params[0] == "n" and isinstance(params[1], Json)


def test_insert_identity_always_overrides():
    t = table([Column("id", "integer", identity="a"), ("n", "text")], primary_key=("id",))
    query, _ = insert_statement(t, [(t.columns["id"], 5), (t.columns["n"], "x")])
    assert render(query) == ('INSERT INTO "public"."t" ("id", "n") OVERRIDING SYSTEM VALUE'
                             ' VALUES ((%s)::integer, (%s)::text)')


def test_upsert_do_update():
    query, params = upsert_statement(USERS, [(col("tenant"), 1), (col("email"), "e"), (col("name"), "n")])
    assert render(query) == ('INSERT INTO "public"."t" ("tenant", "email", "name")'
                             ' VALUES ((%s)::integer, (%s)::text, (%s)::text)'
                             ' ON CONFLICT ("tenant", "email") DO UPDATE SET "name" = EXCLUDED."name"')
    assert params == [1, "e", "n"]


def test_upsert_only_key_columns_does_nothing():
    query, _ = upsert_statement(USERS, [(col("id"), 1)])
    assert render(query) == 'INSERT INTO "public"."t" ("id") VALUES ((%s)::integer) ON CONFLICT ("id") DO NOTHING'


def test_upsert_without_usable_key():
    with pytest.raises(PacketError, match=r"set on public\.t needs a primary key or unique key whose columns"
                                          r" are all in data; keys: \(id\); \(tenant, email\); data has: name"):
        upsert_statement(USERS, [(col("name"), "n")])


def test_update_with_null_and_json_restriction():
    query, params = update_statement(USERS, [(col("name"), None)],
                                     [(col("id"), 1), (col("email"), None), (col("raw"), {"a": 1}),
                                      (col("doc"), [1])])
    assert render(query) == ('UPDATE "public"."t" SET "name" = (%s)::text WHERE "id" = (%s)::integer'
                             ' AND "email" IS NULL AND "raw"::jsonb = (%s)::jsonb AND "doc" = (%s)::jsonb')
    assert params[:2] == [None, 1] and len(params) == 4


def test_update_and_delete_need_restriction():
    with pytest.raises(PacketError, match="empty restriction"):
        update_statement(USERS, [(col("name"), "n")], [])
    with pytest.raises(PacketError, match="empty restriction"):
        delete_statement(USERS, [])
    with pytest.raises(PacketError, match="no column to set"):
        update_statement(USERS, [], [(col("id"), 1)])


def test_delete():
    query, params = delete_statement(USERS, [(col("Mixed"), "x")])
    assert render(query) == 'DELETE FROM "public"."t" WHERE "Mixed" = (%s)::text'
    assert params == ["x"]


def test_percent_in_identifiers_is_escaped():
    t = table([("a%sb", "text")], name="p%t")
    query, _ = delete_statement(t, [(t.columns["a%sb"], "x")])
    assert render(query) == 'DELETE FROM "public"."p%%t" WHERE "a%%sb" = (%s)::text'


# --- the handler with a stand-in cursor and cache ------------------------------------------------------

class FakeCursor:
    def __init__(self, returned=None):
        self.executed = []
        self.returned = returned
        self.rowcount = 1

    def execute(self, query, params=None):
        self.executed.append((render(query), params))

    def fetchone(self):
        return self.returned


class FakeCache(SchemaCache):
    def __init__(self, *schemas):
        super().__init__()
        self.schemas = list(schemas)
        self.refreshes = 0

    def get(self, cursor, relation):
        if not self.schemas:
            raise SchemaError("relation %s does not exist" % relation)
        return self.schemas[0]

    def refresh_if_stale(self, cursor, relation, min_age_seconds=1.0, check_catalog=False):
        self.refreshes += 1
        if len(self.schemas) > 1:
            self.schemas.pop(0)
        return self.get(cursor, relation)


def test_unknown_columns_defaults_by_role():
    assert AutoSQL("t", role="destination").unknown_columns == "error"
    assert AutoSQL("t", role="target").unknown_columns == "ignore"
    assert AutoSQL("t", {"unknown_columns": "IGNORE"}, role="destination").unknown_columns == "ignore"
    with pytest.raises(ConfigError, match="settings.unknown_columns"):
        AutoSQL("t", {"unknown_columns": "drop"})
    with pytest.raises(ConfigError):
        AutoSQL("a.b.c")


def test_apply_refreshes_once_before_calling_a_key_unknown():
    cache = FakeCache(USERS)
    handler = AutoSQL("t", role="destination", cache=cache)
    with pytest.raises(PacketError, match=r"data names column 'nope' that public\.t does not have"):
        handler.apply(FakeCursor(), parse({"action": "add", "data": {"id": 1, "nope": 2}}))
    assert cache.refreshes == 1
    handler.apply(FakeCursor(), parse({"action": "add", "data": {"id": 1}}))
    assert cache.refreshes == 1


def test_apply_uses_refreshed_schema():
    newer = table(list(USERS.columns.values()) + [Column("fresh", "text")], primary_key=("id",))
    cursor = FakeCursor(returned=("7",))   # to_jsonb(id)::text
    handler = AutoSQL("t", role="destination", cache=FakeCache(USERS, newer))
    packet = handler.apply(cursor, parse({"action": "add", "data": {"fresh": "x", "Name": "n"}}))
    assert cursor.executed == [('INSERT INTO "public"."t" ("fresh", "name") VALUES ((%s)::text, (%s)::text)'
                                ' RETURNING pg_catalog.to_jsonb("id")::pg_catalog.text', ["x", "n"])]
    assert packet.data == {"fresh": "x", "Name": "n", "id": 7}


def test_apply_back_fills_under_the_packets_own_key():
    cursor = FakeCursor(returned=("3",))
    handler = AutoSQL("t", role="destination", cache=FakeCache(USERS))
    packet = handler.apply(cursor, parse({"action": "add", "data": {"ID": 3, "name": "n"}}))
    assert packet.data == {"ID": 3, "name": "n"}


def test_apply_target_ignores_unknown_and_update_of_only_unknown_is_noop():
    cursor = FakeCursor()
    handler = AutoSQL("t", role="target", cache=FakeCache(USERS))
    packet = parse({"action": "update", "data": {"nope": 1}, "restriction": {"id": 1}})
    assert handler.apply(cursor, packet) is packet
    assert cursor.executed == []
    with pytest.raises(PacketError, match="restriction names column 'nope'"):
        handler.apply(cursor, parse({"action": "delete", "restriction": {"nope": 1}}))


def test_apply_delete_and_set():
    cursor = FakeCursor()
    handler = AutoSQL("t", role="destination", cache=FakeCache(USERS))
    handler.apply(cursor, parse({"action": "delete", "restriction": {"ID": None}}))
    handler.apply(cursor, parse({"action": "set", "data": {"id": 1, "name": "n"}}))
    assert cursor.executed == [
        ('DELETE FROM "public"."t" WHERE "id" IS NULL', []),
        ('INSERT INTO "public"."t" ("id", "name") VALUES ((%s)::integer, (%s)::text)'
         ' ON CONFLICT ("id") DO UPDATE SET "name" = EXCLUDED."name" RETURNING pg_catalog.to_jsonb("id")::pg_catalog.text', [1, "n"]),
        # this fake returns no row, as when a trigger skips it: did a trigger route it into a child?
        ('SAVEPOINT golconde_attempt', None),
        ('SELECT 1 FROM "public"."t" AS t WHERE "id" = (%s)::integer AND t.tableoid <> (SELECT c.oid'
         ' FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace'
         ' WHERE n.nspname = %s AND c.relname = %s AND c.relkind = \'r\') LIMIT 1', [1, "public", "t"]),
        ('RELEASE SAVEPOINT golconde_attempt', None)]


def test_apply_rejects_restriction_on_add_and_unknown_action():
    handler = AutoSQL("t", role="destination", cache=FakeCache(USERS))
    with pytest.raises(PacketError, match="takes data, not a restriction"):
        handler.apply(FakeCursor(), Packet(Action.SET, {"id": 1}, {"id": 1}))
    with pytest.raises(PacketError, match="unknown action"):
        handler.apply(FakeCursor(), Packet("upsert", {"id": 1}, {}))  # type: ignore[arg-type]


def test_missing_relation_is_stop_listener():
    handler = AutoSQL("t", role="target", name="Test1_t1", cache=FakeCache())
    with pytest.raises(StopListener, match=r"Test1_t1: relation public\.t does not exist"):
        handler.apply(FakeCursor(), parse({"action": "add", "data": {"id": 1}}))


# --- load_handler --------------------------------------------------------------------------------------

def not_a_handler(cursor, packet):
    return packet


@pytest.mark.parametrize("path", ["AutoSQL", "autosql", " AUTOSQL ", "golconde.handlers.autosql.AutoSQL",
                                  "golconde.handlers.autosql:AutoSQL"])
def test_load_handler_autosql(path):
    assert load_handler(path) is AutoSQL


class NoApply(Handler):
    """A handler that could apply nothing (the base's apply raises NotImplementedError)."""


class OneArgumentApply(Handler):
    def apply(self, packet):
        return packet


class StaticApply(Handler):
    @staticmethod
    def apply(cursor, packet):
        return packet


class ClassApply(Handler):
    @classmethod
    def apply(cls, cursor, packet):
        return packet


class StarApply(Handler):
    def apply(self, *args):
        return args[-1]


@pytest.mark.parametrize("name", ["StaticApply", "ClassApply", "StarApply"])
def test_load_handler_takes_any_apply_callable_as_apply_cursor_packet(name):
    assert load_handler(__name__ + "." + name).__name__ == name


@pytest.mark.parametrize("path,message", [
    ("no_such_package.mod.Class", "module no_such_package.mod not found"),
    ("golconde.handlers.autosql.Missing", "module golconde.handlers.autosql has no attribute Missing"),
    (__name__ + ".not_a_handler", "not_a_handler is a function, not a class"),
    ("golconde.packet.Packet", "class Packet is not a subclass of golconde.handlers.base.Handler"),
    ("golconde.handlers.base.Handler", "abstract base class"),
    (__name__ + ".NoApply", r"NoApply defines no apply\(cursor, packet\) method"),
    (__name__ + ".OneArgumentApply", r"OneArgumentApply.apply cannot be called as apply\(self, cursor,"
                                     r" packet\): too many positional arguments"),
    ("Handler", "expected AutoSQL or a dotted path"),
    ("", "expected AutoSQL or a dotted path"),
])
def test_load_handler_refuses(path, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_handler(path)
    assert repr(path.strip()) in str(info.value) or not path.strip()
