"""AutoSQL: the default handler, which turns a packet into one SQL statement on its relation.

SQL produced (``rel`` the relation, ``cN`` columns, each value bound as ``%s::<column type>``)::

    add     INSERT INTO rel (c1, c2) [OVERRIDING SYSTEM VALUE] VALUES (%s::t1, %s::t2)
                RETURNING to_jsonb(<pk column>)::text, ...   -- none without a pk, none at a target
    set     INSERT INTO rel (k, c2) [OVERRIDING SYSTEM VALUE] VALUES (%s::tk, %s::t2)
                ON CONFLICT (k) DO UPDATE SET c2 = EXCLUDED.c2        -- DO NOTHING if only keys
    update  UPDATE rel SET c1 = %s::t1 WHERE k = %s::tk AND c3 IS NULL
    delete  DELETE FROM rel WHERE k = %s::tk

Every identifier goes through :class:`psycopg2.sql.Identifier` and every value is a bound parameter;
nothing from a packet is ever formatted into SQL text. The column types come from the catalog
(:mod:`golconde.schema`).

Values: ``null`` is NULL (``IS NULL`` in a restriction); json/jsonb columns take any JSON value
itself; array columns take a JSON array (nested for several dimensions) or PostgreSQL's array text;
composite columns a JSON object of their fields (as ``to_jsonb()`` writes it) or their text form;
hstore columns a JSON object of strings and nulls or hstore's text form; other columns take a
string, number or boolean in a form PostgreSQL accepts for the type (ISO 8601 timestamps,
``"\\x0102"`` for bytea...). Database errors on bad values propagate unchanged.
"""
from __future__ import annotations

import logging
import re
from decimal import Decimal
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import psycopg2
from psycopg2 import sql
from psycopg2.extras import Json

from ..errors import ConfigError, PacketError, StopListener, ValueTypeError, describe
from ..packet import Action, Packet, dumps, loads
from ..schema import (ACTION_PRIVILEGES, Column, Relation, SchemaCache, SchemaError, TableSchema,
                      missing_privileges, parse_relation)
from . import bulk
from .base import Handler

LOGGER = logging.getLogger(__name__)

#: Seconds a listener waits before retrying when its relation does not exist.
RELATION_RETRY = 30.0

#: Values of the ``unknown_columns`` setting.
UNKNOWN_COLUMNS = ("error", "ignore")

#: (packet key, column, value)
Item = Tuple[str, Column, Any]

#: A key absent from a packet's data (distinct from a JSON null).
_MISSING = object()


class _Plan(NamedTuple):
    """How packets of one shape resolve (see :meth:`AutoSQL._planned`): ``data`` and
    ``restriction`` are ``((packet key, column), ...)``, data's writable columns only."""

    action: Action
    data: Tuple[Tuple[str, Column], ...]
    restriction: Tuple[Tuple[str, Column], ...]
    keys: Dict[str, str]
    conflict: Tuple[str, ...]
    shape: Tuple[Any, ...]
    #: a SET's packet keys of its conflict key's columns: a packet with NULL in one resolves in
    #: full (:func:`conflict_key` passes over keys holding a NULL); NULL elsewhere changes nothing
    key_values: Tuple[str, ...] = ()
    #: ``(data or restriction, packet key, column)`` of date/time columns (:func:`check_moving_time`)
    times: Tuple[Tuple[str, str, Column], ...] = ()


class _Identifier(sql.Identifier):
    """An identifier whose text survives the ``%`` formatting psycopg2 applies to queries with
    parameters (a ``%`` in a name would otherwise be read as a placeholder)."""

    def as_string(self, context: Any) -> str:
        return super().as_string(context).replace("%", "%%")


def ident(*names: str) -> sql.Identifier:
    """A quoted (possibly qualified) identifier, safe in a query with parameters."""
    return _Identifier(*names)


def _type(column: Column) -> sql.SQL:
    # a domain's base type, unbounded: an explicit cast to a domain over varchar(4) would cut the
    # value to 4 characters; the assignment to the column then applies the domain's bound (an
    # error, as for a plain varchar(4) column) and its checks
    return sql.SQL(column.base.replace("%", "%%"))


def _relation(table: TableSchema) -> sql.Identifier:
    return ident(table.relation.schema, table.relation.name)


#: A composite column's value, bound as jsonb (:func:`bind`): a JSON object fills the type's
#: fields by name with ``jsonb_populate_record`` (nested objects and arrays too, as ``to_jsonb()``
#: writes them; keys that are no field are ignored, absent fields are NULL); any other JSON value
#: is read as the type's text form (``"(1,x)"``). An array column takes a JSON array of such
#: elements (one dimension), or its text form.
_COMPOSITE = (" CASE pg_catalog.jsonb_typeof(g.v) WHEN 'object'"
              " THEN pg_catalog.jsonb_populate_record(NULL::{type}, g.v)"
              " ELSE (g.v OPERATOR(pg_catalog.#>>) '{{}}')::{type} END")
_COMPOSITE_ARRAY = (" CASE pg_catalog.jsonb_typeof(g.v) WHEN 'array' THEN ARRAY("
                    "SELECT CASE pg_catalog.jsonb_typeof(e.x) WHEN 'null' THEN NULL"
                    " WHEN 'object' THEN pg_catalog.jsonb_populate_record(NULL::{element}, e.x)"
                    " ELSE (e.x OPERATOR(pg_catalog.#>>) '{{}}')::{element} END"
                    " FROM pg_catalog.jsonb_array_elements(g.v) WITH ORDINALITY AS e (x, n) ORDER BY e.n)"
                    " ELSE (g.v OPERATOR(pg_catalog.#>>) '{{}}')::{type} END")


def _cast(column: Column) -> sql.Composed:
    if column.structure == "composite":
        base = column.base
        body = sql.SQL(_COMPOSITE_ARRAY if column.is_array else _COMPOSITE).format(
            type=_type(column), element=sql.SQL(base[:-2].replace("%", "%%")))
        return sql.SQL("(SELECT{} FROM (SELECT ({})::pg_catalog.jsonb) AS g (v))").format(body, sql.Placeholder())
    # parenthesized: psycopg2 writes -5 as " -5", and "-5::text" would parse as -('5'::text)
    return sql.SQL("({})::{}").format(sql.Placeholder(), _type(column))


#: ``character varying(n)`` and ``character(n)`` as ``format_type`` writes them (n in group 1).
_LENGTH = re.compile(r"(?:character varying|character)\((\d+)\)")
#: A bit string type with its length, as ``format_type`` writes it: an explicit cast pads or cuts
#: a bit string to ``bit(n)`` and cuts it to ``bit varying(n)``, where storing it refuses it.
_BITS = re.compile(r"bit( varying)?\((\d+)\)")


def _under_instead_rule(item: bulk.Prepared) -> bool:
    """Whether ``item`` is an update or delete on a relation with a ``DO INSTEAD`` rule for it
    (:attr:`~golconde.schema.TableSchema.instead_rules`)."""
    return (item.action in (Action.UPDATE, Action.DELETE) and item.table is not None
            and item.action.value in item.table.instead_rules)


#: Most packet key tuples whose resolution :func:`resolve` remembers per table schema.
RESOLVE_MEMO = 256


def resolve(table: TableSchema, values: Mapping[str, Any], part: str) -> Tuple[List[Item], List[str]]:
    """Match the keys of ``values`` (a packet's ``data`` or ``restriction``) to ``table``'s columns:
    the exact name, else a case-insensitive match if there is only one. The match of a tuple of
    keys is remembered on ``table`` (up to :data:`RESOLVE_MEMO` of them; a schema refresh makes a
    new ``table``), since packets come in a few shapes.

    :returns: (matched ``(key, column, value)`` in packet order, unknown keys).
    :raises PacketError: a key matching several columns case-insensitively, or two keys naming the
        same column.
    """
    keys = tuple(values)
    found = table.resolved.get(keys)
    if found is None:
        found = _remember(table.resolved, keys, _resolve_keys(table, keys, part))
    pairs, unknown = found
    return [(key, column, values[key]) for key, column in pairs], list(unknown)


def _remember(memo: Dict[Any, Any], key: Any, value: Any) -> Any:
    """Store ``value`` under ``key`` in one of a table schema's memos, emptied first when it holds
    :data:`RESOLVE_MEMO` entries (packets come in a few shapes; a flood of others must not grow
    it without bound). :returns: ``value``."""
    if len(memo) >= RESOLVE_MEMO:
        memo.clear()
    memo[key] = value
    return value


def _resolve_keys(table: TableSchema, keys: Sequence[str],
                  part: str) -> Tuple[Tuple[Tuple[str, Column], ...], Tuple[str, ...]]:
    matched: List[Tuple[str, Column]] = []
    unknown: List[str] = []
    seen: Dict[str, str] = {}
    for key in keys:
        found = table.find(key)
        if not found:
            unknown.append(key)
            continue
        if len(found) > 1:
            raise PacketError("%s key %r is ambiguous in %s: it matches columns %s"
                              % (part, key, table.relation, ", ".join(c.name for c in found)))
        column = found[0]
        if column.name in seen:
            raise PacketError("%s keys %r and %r both name column %s of %s"
                              % (part, seen[column.name], key, column.name, table.relation))
        seen[column.name] = key
        matched.append((key, column))
    return tuple(matched), tuple(unknown)


def conflict_key(table: TableSchema, names: Collection[str],
                 nulls: Collection[str] = ()) -> Optional[Tuple[str, ...]]:
    """The ``ON CONFLICT`` arbiter for a SET whose data holds the columns ``names``: the primary key
    if all its columns are there, else the first unique key whose columns all are; ``None`` if none.
    A key with a column whose value is NULL (``nulls``) is taken only when no other key fits: a NULL
    never conflicts (but in a key declared ``NULLS NOT DISTINCT``), so on it the SET would insert a
    row even where another key's row exists."""
    present = set(names)
    fallback = None
    for key in table.unique_keys:
        if key and present.issuperset(key):
            if (not nulls or not any(name in nulls for name in key)
                    or key in table.nulls_not_distinct):
                return key
            if fallback is None:
                fallback = key
    return fallback


def _nulls(data: Sequence[Tuple[Column, Any]]) -> List[str]:
    return [column.name for column, value in data if value is None]


def _json_kind(value: Any) -> str:
    return "an object" if isinstance(value, dict) else "an array"


#: JSON numbers as decoded (floats only from Python callers)
_NUMBERS = (int, Decimal, float)

#: Types whose text input reads the words of :data:`_MOVING_TIME` as the current time, date or
#: transaction start (PostgreSQL documentation, "Special Date/Time Inputs"); ranges and arrays
#: of them too (their elements are read so).
_TIME_TYPES = frozenset(("date", "timestamp without time zone", "timestamp with time zone",
                         "time without time zone", "time with time zone", "daterange", "tsrange",
                         "tstzrange", "datemultirange", "tsmultirange", "tstzmultirange"))
#: between non-letters: PostgreSQL splits date/time input at digits and punctuation too
#: (``today10:00``, ``now_``)
_MOVING_TIME = re.compile(r"(?<![a-z])(now|today|tomorrow|yesterday)(?![a-z])", re.IGNORECASE)


def _time_column(column: Column) -> bool:
    """Whether ``column`` (or its arrays' element) is of a type of :data:`_TIME_TYPES`."""
    return (column.element if column.is_array else column.base) in _TIME_TYPES


def check_moving_time(table: TableSchema, column: Column, value: Any) -> None:
    """Refuse ``now``, ``today``, ``tomorrow`` or ``yesterday`` in a date/time ``column``'s text
    (or in an array's element): each database would read it at its own moment, so the canonical
    relation and each target would store a different value (a key too, where only add and set
    back-fill it).

    :raises PacketError: such a word."""
    texts = [value] if isinstance(value, str) else _strings(value) if isinstance(value, list) else ()
    for text in texts:
        # each word holds an o or a y, which ISO 8601 times do not: most values stop here
        if not ("o" in text or "y" in text or "O" in text or "Y" in text):
            continue
        match = _MOVING_TIME.search(text)
        if match:
            raise PacketError("column %s of %s is %s: %r names the current time (%s), which each"
                              " database reads at its own moment, so the canonical relation and"
                              " every target would store a different value; send the time itself"
                              % (column.name, table.relation, column.type_name,
                                 text if len(text) <= 60 else text[:60] + "...", match.group(1)))


def _same_float(old: Any, value: Any) -> bool:
    """Whether a float key as the packet wrote it (a number, or text such as ``"-0"``) and as
    the server printed it (:func:`bulk.returning_clause`) are the same double (``-0`` equals 0:
    the packet's keeps the sign the server stored)."""
    if type(old) is bool or type(value) is bool:
        return False
    try:
        return float(old) == float(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _strings(value: List[Any]) -> List[str]:
    """The strings of a (nested) JSON array."""
    found: List[str] = []
    for item in value:
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            found.extend(_strings(item))
    return found


def bind(table: TableSchema, column: Column, value: Any) -> Any:
    """The parameter to bind for ``value`` in ``column`` (cast by the SQL to the column's type).

    :raises PacketError: a JSON object or array for a column that takes none, a value that is no
        JSON array for an array column, a boolean for a numeric column or a number for a boolean
        one (PostgreSQL assigns neither to the other; a cast would turn ``true`` into 1 and 5
        into ``true``).
    """
    if value is None:
        return None
    kind = type(value)
    if kind is bool or kind in _NUMBERS:
        _check_kind(table, column, column.base, value)
    structure = column.structure
    if structure == "composite":
        return Json(value, dumps=dumps)   # the SQL reads it (see _cast)
    if structure == "hstore":
        return _hstore(table, column, value)
    if column.is_json and not column.is_array:
        return Json(value, dumps=dumps)
    if column.is_array:
        if isinstance(value, str):
            return value  # PostgreSQL's array text form, e.g. "{1,2}"
        if not isinstance(value, list):
            raise ValueTypeError("column %s of %s is %s: expected a JSON array, not %r"
                              % (column.name, table.relation, column.type_name, value))
        if column.is_json:
            return [None if item is None else Json(item, dumps=dumps) for item in value]
        _check_elements(table, column, value)
        if column.element in bulk.FLOAT_TYPES:
            return _float_text(value)
        return value
    if isinstance(value, (dict, list)):
        raise ValueTypeError("column %s of %s is %s: %s is accepted only for json, jsonb and array columns"
                          % (column.name, table.relation, column.type_name, _json_kind(value)))
    if kind is Decimal and column.base in bulk.FLOAT_TYPES:
        return bulk.float_text(value)
    return value


def _float_text(value: List[Any]) -> List[Any]:
    """A ``real`` or ``double precision`` array's numbers as their text (:func:`bulk.float_text`):
    the type's input function reads ``-0.0`` as -0, where a numeric literal (a bound ``Decimal``)
    has no negative zero; and an array of text only (``"NaN"`` beside ``1.5``) is one PostgreSQL
    can type."""
    return [_float_text(item) if isinstance(item, list)
            else bulk.float_text(item) if type(item) in (int, Decimal) else item for item in value]


def _hstore(table: TableSchema, column: Column, value: Any) -> Any:
    """An hstore (or hstore array) column's parameter: a JSON object becomes hstore's text form,
    ``"key"=>"value", "k2"=>NULL`` (keys and values double-quoted, ``"`` and ``\\`` escaped with a
    backslash: PostgreSQL's hstore documentation, "External Representation"); a string is taken as
    that text form already; a JSON array (for an array column) is converted element by element.

    :raises PacketError: a value in the object that is neither a string nor null, or an array for
        a column that is no array.
    """
    if isinstance(value, dict):
        parts = []
        for key, item in value.items():
            if item is not None and not isinstance(item, str):
                raise ValueTypeError("column %s of %s is %s: the value of key %r must be a string or null, not %s"
                                  % (column.name, table.relation, column.type_name, key, dumps(item)))
            parts.append('"%s"=>%s' % (_hstore_quote(key), "NULL" if item is None else '"%s"' % _hstore_quote(item)))
        return ", ".join(parts)
    if isinstance(value, list):
        if not column.is_array:
            raise ValueTypeError("column %s of %s is %s: expected a JSON object or hstore's text form, not an array"
                              % (column.name, table.relation, column.type_name))
        return [_hstore(table, column, item) for item in value]
    return value


def _hstore_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _check_kind(table: TableSchema, column: Column, base: str, value: Any) -> None:
    """Refuse a boolean for a numeric type and a number for boolean (``base``: the column's base
    type, or its element type for an array): PostgreSQL assigns neither to the other. Refuse a
    number with a fraction for an integer type, which PostgreSQL would round (``1.5`` to 2: a
    restriction would then name another row), as it refuses the string ``"1.5"``."""
    kind = type(value)
    if kind is bool and base in bulk.NUMERIC_TYPES:
        raise ValueTypeError("column %s of %s is %s: expected a number, not %s"
                          % (column.name, table.relation, column.type_name, dumps(value)))
    if (kind is Decimal or kind is float) and base in bulk.INTEGER_TYPES and _fraction(value):
        text = str(value)
        raise ValueTypeError("column %s of %s is %s: expected an integer, not %s (PostgreSQL would"
                          " round it)" % (column.name, table.relation, column.type_name,
                                          text if len(text) <= 40 else "%s...%s (%d characters)"
                                          % (text[:20], text[-10:], len(text))))
    if kind is not bool and kind in _NUMBERS and base == "boolean":
        raise ValueTypeError("column %s of %s is %s: expected true or false, not the number %s"
                          % (column.name, table.relation, column.type_name, dumps(value)))


def _fraction(value: Any) -> bool:
    """Whether the finite number ``value`` (Decimal or float) has a fractional part. Without
    ``int()``, whose cost grows with the square of the digits: ``1e999999`` took 43 s holding
    the interpreter lock (every listener and heart-beat stalled)."""
    try:
        if isinstance(value, Decimal):
            return value.is_finite() and value != value.to_integral_value()
        return value == value and abs(value) != float("inf") and value != int(value)
    except (ArithmeticError, ValueError, OverflowError):
        return False


def _check_elements(table: TableSchema, column: Column, value: List[Any]) -> None:
    element = column.element
    kinds = ((bool, Decimal, float) if element in bulk.INTEGER_TYPES else bool
             if element in bulk.NUMERIC_TYPES else _NUMBERS if element == "boolean" else None)
    _check_items(table, column, value, element, kinds)


def _check_items(table: TableSchema, column: Column, value: List[Any], element: str, kinds: Any) -> None:
    for item in value:
        if isinstance(item, dict):
            raise ValueTypeError("column %s of %s is %s: its array cannot hold a JSON object"
                              % (column.name, table.relation, column.type_name))
        if isinstance(item, list):
            _check_items(table, column, item, element, kinds)
        elif kinds is not None and isinstance(item, kinds):
            _check_kind(table, column, element, item)


def _values(table: TableSchema, items: Sequence[Tuple[Column, Any]]) -> Tuple[sql.Composed, List[Any]]:
    """``(c1, c2) [OVERRIDING SYSTEM VALUE] VALUES (%s::t1, %s::t2)`` and its parameters."""
    columns = sql.SQL(", ").join(ident(column.name) for column, _ in items)
    casts = sql.SQL(", ").join(_cast(column) for column, _ in items)
    overriding = sql.SQL(" OVERRIDING SYSTEM VALUE" if any(c.identity_always for c, _ in items) else "")
    query = sql.SQL("({}){} VALUES ({})").format(columns, overriding, casts)
    return query, [bind(table, column, value) for column, value in items]


def where_clause(table: TableSchema, restriction: Sequence[Tuple[Column, Any]]) -> Tuple[sql.Composed, List[Any]]:
    """``c1 = %s::t1 AND c2 IS NULL`` and its parameters (json is compared as jsonb; NULL for a
    composite column is ``IS NOT DISTINCT FROM NULL``, which a row of NULL fields is not).

    :raises PacketError: an empty restriction.
    """
    if not restriction:
        raise PacketError("empty restriction on %s (refusing to touch every row)" % table.relation)
    parts: List[sql.Composable] = []
    params: List[Any] = []
    for column, value in restriction:
        name = ident(column.name)
        if value is None:
            # a composite whose fields are all NULL "IS NULL" too; only NULL itself is not distinct
            test = "{} IS NOT DISTINCT FROM NULL" if column.structure == "composite" else "{} IS NULL"
            parts.append(sql.SQL(test).format(name))
            continue
        if column.is_json and column.base in ("json", "json[]"):
            # json (or a domain over it) has no equality operator: compare as jsonb
            kind = sql.SQL(column.base.replace("json", "jsonb"))
            parts.append(sql.SQL("{}::{} = ({})::{}").format(name, kind, sql.Placeholder(), kind))
        else:
            parts.append(sql.SQL("{} = {}").format(name, _cast(column)))
        params.append(bind(table, column, value))
    return sql.SQL(" AND ").join(parts), params


def insert_statement(table: TableSchema, data: Sequence[Tuple[Column, Any]],
                     returning: Sequence[str] = ()) -> Tuple[sql.Composed, List[Any]]:
    """``INSERT INTO rel (...) VALUES (...) [RETURNING returning]`` and its parameters."""
    values, params = _values(table, data)
    query = sql.SQL("INSERT INTO {} {}").format(_relation(table), values)
    if returning:
        query = sql.SQL("{}{}").format(query, bulk.returning_clause(returning, ident))
    return query, params


def _literal(value: Any) -> str:
    """A constant's text, to cast to its column's type: JSON text for an object or array."""
    if isinstance(value, (dict, list)):
        return dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def scope_clause(table: TableSchema, scope: Sequence[Column]) -> sql.Composed:
    """``rel.c1::text IS NOT DISTINCT FROM EXCLUDED.c1::text AND ...``, for an ``ON CONFLICT ...
    DO UPDATE ... WHERE``: whether the existing row holds, in the ``scope`` columns (a mapping's
    constants), what the row proposed holds. ``EXCLUDED`` holds the constants as the column
    stores them (``numeric(10,2)`` writes ``1.5`` as ``1.50``), and the texts are compared since
    some types (``point``, ``xml``) have no ``=``; the existing row is named
    ``schema.relation.column`` (a bare name is ambiguous with ``EXCLUDED``'s).
    """
    return sql.SQL(" AND ").join(
        sql.SQL("({})::pg_catalog.text IS NOT DISTINCT FROM (EXCLUDED.{})::pg_catalog.text").format(
            ident(table.relation.schema, table.relation.name, column.name), ident(column.name))
        for column in scope)


def upsert_statement(table: TableSchema, data: Sequence[Tuple[Column, Any]],
                     returning: Sequence[str] = (),
                     scope: Sequence[Column] = ()) -> Tuple[sql.Composed, List[Any]]:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET c = EXCLUDED.c, ... [WHERE scope]
    [RETURNING returning]``, the key chosen by :func:`conflict_key`. When data holds only the
    key's columns: ``DO NOTHING``, or, if ``returning`` names columns absent from data (a serial
    primary key to back-fill while the conflict is on another unique key), a no-op ``DO UPDATE
    SET k = EXCLUDED.k`` so that the existing row's key is returned too. ``scope`` (columns of
    ``data``: a mapping's constants) limits the update to an existing row holding the same
    values there (:func:`scope_clause`): another row of that key is left as it is, and the
    statement then changes no row.

    :raises PacketError: no primary or unique key has all its columns in data.
    """
    key = conflict_key(table, [column.name for column, _ in data], _nulls(data))
    if key is None:
        keys = "; ".join("(%s)" % ", ".join(k) for k in table.unique_keys) or "it has none"
        if table.primary_key and table.primary_key not in table.unique_keys:
            keys += " (its primary key (%s) is DEFERRABLE, which ON CONFLICT cannot use)" \
                % ", ".join(table.primary_key)
        raise PacketError("set on %s needs a primary key or unique key whose columns are all in data;"
                          " keys: %s; data has: %s"
                          % (table.relation, keys, ", ".join(column.name for column, _ in data)))
    values, params = _values(table, data)
    conflict = bulk.on_conflict(key, [column for column, _ in data], returning, ident)
    query = sql.SQL("INSERT INTO {} {} {}").format(_relation(table), values, conflict)
    if scope and any(column.name not in key for column in scope):
        # (a scope inside the key needs no test: a row of that key holds it)
        query = sql.SQL("{} WHERE {}").format(query, scope_clause(table, scope))
    if returning:
        query = sql.SQL("{}{}").format(query, bulk.returning_clause(returning, ident))
    return query, params


def update_statement(table: TableSchema, data: Sequence[Tuple[Column, Any]],
                     restriction: Sequence[Tuple[Column, Any]]) -> Tuple[sql.Composed, List[Any]]:
    """``UPDATE rel SET c = %s::t, ... WHERE ...`` and its parameters. A ``GENERATED ALWAYS``
    identity column takes no value but ``DEFAULT`` in an UPDATE, so it is left out of SET (it
    keeps its own) when it is not in the restriction, or when its data value repeats the
    restriction's (the capture trigger's packets carry the whole new row), as a run's statement
    leaves it out (:mod:`golconde.handlers.bulk`). One whose value would change stays (refused).

    :raises PacketError: empty data or restriction.
    """
    if not data:
        raise PacketError("update on %s has no column to set" % table.relation)
    restricted = {column.name: value for column, value in restriction}
    kept = [(column, value) for column, value in data
            if not (column.identity_always and (column.name not in restricted
                                                or bulk.same_value(value, restricted[column.name])))]
    data = kept or list(data[:1])    # only identity columns: SET one (refused), as a run does
    assignments = sql.SQL(", ").join(sql.SQL("{} = {}").format(ident(column.name), _cast(column))
                                      for column, _ in data)
    params = [bind(table, column, value) for column, value in data]
    where, where_params = where_clause(table, restriction)
    query = sql.SQL("UPDATE {} SET {} WHERE {}").format(_relation(table), assignments, where)
    return query, params + where_params


def delete_statement(table: TableSchema, restriction: Sequence[Tuple[Column, Any]]) -> Tuple[sql.Composed, List[Any]]:
    """``DELETE FROM rel WHERE ...`` and its parameters.

    :raises PacketError: an empty restriction.
    """
    where, params = where_clause(table, restriction)
    return sql.SQL("DELETE FROM {} WHERE {}").format(_relation(table), where), params


def _attempt(cursor: Any, query: sql.Composable, params: Any) -> Tuple[Optional[tuple], Optional[psycopg2.Error]]:
    """Run ``query`` in a savepoint, so that its failure leaves the caller's transaction usable
    (none on an autocommit connection, which has no transaction to keep).

    :returns: ``(its first row or None, None)``, or ``(None, the error)`` once rolled back to
        the savepoint."""
    kept = not getattr(getattr(cursor, "connection", None), "autocommit", False)
    if kept:
        cursor.execute(sql.SQL("SAVEPOINT golconde_attempt"))
    try:
        cursor.execute(query, params)
        row = cursor.fetchone()
    except psycopg2.Error as exc:
        if kept:
            cursor.execute(sql.SQL("ROLLBACK TO SAVEPOINT golconde_attempt"))
        return None, exc
    if kept:
        cursor.execute(sql.SQL("RELEASE SAVEPOINT golconde_attempt"))
    return row, None


class AutoSQL(Handler):
    """Applies packets to one relation with SQL built from its catalog entry.

    :param relation: ``[schema.]table`` (see :func:`golconde.schema.parse_relation`).
    :param settings: ``unknown_columns``: ``"error"`` (default for the destination role) or
        ``"ignore"`` (default for the target role): what to do with ``data`` keys that are not
        columns. Unknown ``restriction`` keys are always an error.
    :param role: ``"destination"`` or ``"target"``.
    :param name: the listener's name, for log lines.
    :param cache: a :class:`~golconde.schema.SchemaCache` to share; by default one of its own.
    :param mapping: a target's :class:`~golconde.mapping.TargetMapping`: each packet is first
        transformed by it (renamed, filtered...) into the packets actually applied.
    :raises ConfigError: an invalid relation name or setting.
    """

    supports_mapping = True

    def __init__(self, relation: str, settings: Optional[Mapping[str, Any]] = None,
                 role: str = "target", name: str = "", cache: Optional[SchemaCache] = None,
                 mapping: Any = None) -> None:
        super().__init__(relation, settings, role=role, name=name, mapping=mapping)
        self.table: Relation = parse_relation(relation)
        self.cache = cache if cache is not None else SchemaCache()
        unknown = self.settings.get("unknown_columns", "error" if role == "destination" else "ignore")
        if not isinstance(unknown, str) or unknown.lower() not in UNKNOWN_COLUMNS:
            raise ConfigError("settings.unknown_columns: expected one of %s, not %r"
                              % (", ".join(UNKNOWN_COLUMNS), unknown))
        self.unknown_columns = unknown.lower()
        self._absent: set = set()      # data keys seen not to be columns (target role)
        #: whether the catalog was checked for those keys in the batch being applied
        self._absent_checked = False
        #: the schema the mapping's target columns were last found in (checked once per read)
        self._mapping_checked: Optional[TableSchema] = None
        #: True when ADD and SET return the primary key, to back-fill generated keys into the packet
        #: (a destination); a target fans nothing out, so its statements return nothing
        self.back_fill = role == "destination"

    def apply(self, cursor: Any, packet: Packet) -> Packet:
        """Apply ``packet``: through the target's mapping when one is configured (each packet
        :meth:`golconde.mapping.TargetMapping.transform` gives, in order), else directly.

        :returns: ``packet`` when mapped (targets fan nothing out), marked
            :meth:`~golconde.packet.Packet.unmatched` when the mapping has no ``filter`` and the
            update or delete it made matched no row; else as :meth:`apply_one`.
        :raises: as :meth:`apply_one` and :meth:`~golconde.mapping.TargetMapping.transform`.
        """
        self.cache.revalidate(cursor, self.table)
        if not self.mapping:
            return self.apply_one(cursor, packet)
        table = self._schema(cursor)
        keys = ((table.primary_key,) if table.primary_key else ()) + tuple(
            key for key in table.unique_keys if key != table.primary_key)
        unmatched = False
        for mapped in self.mapping.transform(packet, key=keys):
            if mapped.action is Action.SET and self.mapping.constants:
                self._scoped_set(cursor, mapped, self.mapping.constant_values)
                continue
            result = self.apply_one(cursor, mapped)
            # without a filter the target holds every row: an update or delete matching none
            # tells it lacks one (with a filter, the rows it leaves out match nothing)
            unmatched = unmatched or (not self.mapping.conditions and mapped.action is packet.action
                                      and Packet.changed_no_row(result))
        return packet.unmatched() if unmatched else packet

    def _scoped_set(self, cursor: Any, packet: Packet, scope: Mapping[str, Any]) -> None:
        """A mapped target's ``set`` whose update touches only a row holding the mapping's
        constants (``scope``, target column -> value): a table several sources share keeps the
        others' rows, as updates and deletes do (their restriction holds the constants).

        :raises PacketError: a row of that key holds other values in those columns (another
            source's row): the packet is dead-lettered at this target, the row left as it is.
        :raises: as :meth:`apply_one`.
        """
        prepared = self.prepare(cursor, packet)
        if prepared is None:
            return
        table = prepared.table
        scoped, unknown = resolve(table, scope, "constants")
        if unknown:     # checked at connect (target_problems); the table changed since
            raise PacketError("constants name %s that %s does not have" % (_names(unknown), table.relation))
        present = {column.name for column, _ in prepared.data}
        unwritten = [column.name for _, column, _ in scoped if column.name not in present]
        if unwritten:       # a generated column: no constant is written there, none scopes
            raise PacketError("constants name %s, which %s never takes a value for (generated):"
                              " they cannot scope this target's rows" % (_names(unwritten), table.relation))
        scope_columns = [column for _, column, _ in scoped]
        query, params = upsert_statement(table, prepared.data, scope=scope_columns)
        cursor.execute(query, params)
        key = conflict_key(table, [column.name for column, _ in prepared.data], _nulls(prepared.data))
        if cursor.rowcount or key is None or all(column.name in key for column in scope_columns):
            return
        # no row written: a row of that key outside the scope, or a BEFORE trigger that skipped
        # the row (returned NULL: a "skip" rule, a redirect to an inheritance child). Told apart
        # by a look for such a row (inheritance children too), the constants cast to their
        # columns' full types (numeric(10,2) stores 1.5 as 1.50) and compared as text.
        keyed = [(column, value) for column, value in prepared.data if column.name in key]
        where, where_params = where_clause(table, keyed)
        cursor.execute("SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)"
                       " FROM pg_catalog.pg_attribute a WHERE a.attrelid = %s::regclass"
                       " AND a.attname = ANY(%s)",
                       (sql.Identifier(table.relation.schema, table.relation.name).as_string(cursor),
                        [column.name for column in scope_columns]))
        types = dict(cursor.fetchall())
        parts, part_params = [], []
        for _, column, value in scoped:
            name = ident(column.name)
            if value is None:
                parts.append(sql.SQL("{} IS NULL").format(name))
                continue
            parts.append(sql.SQL("({})::pg_catalog.text IS NOT DISTINCT FROM (%s::{})::pg_catalog.text")
                         .format(name, sql.SQL(types[column.name].replace("%", "%%"))))
            part_params.append(_literal(value))
        cursor.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} AND ({}) IS NOT TRUE)").format(
            _relation(table), where, sql.SQL(" AND ").join(parts)), where_params + part_params)
        if cursor.fetchone()[0]:
            raise PacketError("set on %s: the row of that key holds other values in the columns of"
                              " the mapping's constants (%s): another source's row, left as it is"
                              % (table.relation, ", ".join(column.name for _, column, _ in scoped)))

    def apply_one(self, cursor: Any, packet: Packet) -> Packet:
        """Apply ``packet`` with one statement (see the module docstring).

        :returns: ``packet``; at a destination, for ``add`` and ``set`` on a relation with a primary
            key, a copy whose data holds the key values the database stored (generated
            serial/identity values included), so that targets get the canonical keys; for an
            ``update`` or ``delete`` that changed no row, a copy marked so
            (:meth:`Packet.unmatched`): at a destination it is not fanned out, at a target it is
            counted (``unmatched`` in ``/stats``).
        :raises PacketError: unknown action; empty data or restriction; a restriction key that is not
            a column; a data key that is not a column when ``unknown_columns`` is ``"error"``; an
            ambiguous key; a value of the wrong JSON kind; ``set`` without a usable key.
        :raises StopListener: the relation does not exist (any more): the listener pauses for
            :data:`RELATION_RETRY` seconds, its packets staying in the queue, then tries again.
        """
        prepared = self.prepare(cursor, packet)
        return packet if prepared is None else self._execute(cursor, prepared)

    def apply_batch(self, cursor: Any, packets: Sequence[Packet]) -> List[Packet]:
        """Apply ``packets`` in order, runs of consecutive packets of the same shape with one
        statement each (:mod:`golconde.handlers.bulk`); same effect as :meth:`apply` in turn.
        With a mapping, or in a subclass that overrides :meth:`apply`, packets go through
        :meth:`apply` one by one.

        :returns: one packet per packet given (keys back-filled, and an update that changed no
            row marked, as by :meth:`apply_one`).
        :raises: as :meth:`apply_one`; the caller then replays the batch packet by packet.
        """
        # packets naming columns seen absent check the catalog again once in each batch: each
        # batch's packets came after what the target had when they were received
        self._absent_checked = False
        if self.mapping or type(self).apply is not AutoSQL.apply:
            return super().apply_batch(cursor, packets)
        self.cache.revalidate(cursor, self.table)   # an ALTER TABLE since (at most once a second)
        results = list(packets)
        # a subclass that resolves packets its own way gets every packet through its prepare()
        own = type(self).prepare is AutoSQL.prepare and type(self)._resolve is AutoSQL._resolve
        prepare = self._planned if own else self.prepare
        prepared = [(index, prepare(cursor, packet)) for index, packet in enumerate(packets)]
        todo = [(index, item) for index, item in prepared if item is not None]
        items = [item for _, item in todo]
        for run in bulk.runs(items, checked_alone=self.role == "destination"):
            if len(run) == 1 or self._one_by_one(items[run[0]]):
                for j in run:
                    index, item = todo[j]
                    results[index] = self._execute(cursor, item)
                continue
            members = [items[j] for j in run]
            table = members[0].table
            rows = bulk.execute_run(cursor, table, members, ident, _cast, bind, _relation(table),
                                    self._returning(table), _type, matches=self._matches(members[0]))
            for j, row in zip(run, rows):
                index, item = todo[j]
                if item.action in (Action.UPDATE, Action.DELETE):
                    if row is None:             # () when it changed a row
                        results[index] = item.packet.unmatched()
                elif row is not None:
                    results[index] = self._fill(item, row)
        return results

    def prepare(self, cursor: Any, packet: Packet) -> Optional[bulk.Prepared]:
        """Validate ``packet`` and resolve it against the relation's schema.

        :returns: a :class:`~golconde.handlers.bulk.Prepared`, or ``None`` when there is nothing to
            write (at a target, data naming only columns it lacks).
        :raises: as :meth:`apply_one`.
        """
        action = self._action(packet)
        if action in (Action.ADD, Action.SET, Action.UPDATE) and not packet.data:
            raise PacketError("%s packet for %s has empty data" % (action.value, self.table))
        if action in (Action.UPDATE, Action.DELETE) and not packet.restriction:
            raise PacketError("%s packet for %s has an empty restriction (refusing to touch every row)"
                              % (action.value, self.table))
        if action in (Action.ADD, Action.SET) and packet.restriction:
            raise PacketError("%s packet for %s takes data, not a restriction" % (action.value, self.table))
        table, data, restriction = self._resolve(cursor, packet, action)
        for _, column, value in data + restriction:
            if _time_column(column):
                check_moving_time(table, column, value)
        writable = [(column, value) for _, column, value in data if column.writable]
        skipped = [column.name for _, column, value in data if not column.writable]
        if skipped:
            LOGGER.debug("%s: leaving out generated columns %s of %s", self.name, ", ".join(skipped), self.table)
        if action is not Action.DELETE and not writable:
            # at a target, data naming only columns it lacks is normal; otherwise worth a warning
            log = LOGGER.warning if skipped else LOGGER.debug
            log("%s: %s packet has no column %s can write; nothing done", self.name, action.value, self.table)
            return None
        conflict: Tuple[str, ...] = ()
        if action is Action.SET:
            key = conflict_key(table, [column.name for column, _ in writable], _nulls(writable))
            if key is None:
                upsert_statement(table, writable)   # raises the PacketError naming the keys
            conflict = tuple(key or ())
        return bulk.Prepared(action, packet, [] if action is Action.DELETE else writable,
                             [(column, value) for _, column, value in restriction],
                             {column.name: key for key, column, _ in data}, conflict, table)

    def _planned(self, cursor: Any, packet: Packet) -> Optional[bulk.Prepared]:
        """:meth:`prepare`, through a plan cached per packet shape: packets with the same action,
        data keys and restriction keys (in order) resolve to the same columns, so only the first
        of a shape is resolved and checked in full; the others just take their values. Shapes with
        keys the relation lacks are not cached (:meth:`_resolve` re-reads the schema for them).
        The plans live on the :class:`~golconde.schema.TableSchema`, so a schema refresh drops them.
        """
        try:
            table = self._schema(cursor)
        except StopListener:     # no relation: prepare() checks the packet first, as without plans
            return self.prepare(cursor, packet)
        try:
            shape = (packet.action, tuple(packet.data), tuple(packet.restriction))
            plan = table.plans.get(shape)
        except TypeError:        # an unhashable action from a custom handler: no plan
            return self.prepare(cursor, packet)
        data = packet.data
        if plan is not None and not (plan.key_values and any(data[key] is None for key in plan.key_values)):
            restriction = packet.restriction
            for part, key, column in plan.times:
                check_moving_time(table, column, (data if part == "data" else restriction)[key])
            return bulk.Prepared(plan.action, packet, [(column, data[key]) for key, column in plan.data],
                                 [(column, restriction[key]) for key, column in plan.restriction],
                                 plan.keys, plan.conflict, table, known_shape=plan.shape)
        item = self.prepare(cursor, packet)
        if (plan is None and item is not None and item.table is table
                and (item.action is Action.DELETE or len(item.keys) == len(packet.data))):
            key_values: Tuple[str, ...] = ()
            if item.action is Action.SET:
                if item.conflict != conflict_key(table, [column.name for column, _ in item.data]):
                    return item     # resolved around a NULL in a key: no plan for the others
                key_values = tuple(item.keys[name] for name in item.conflict)
            data_keys = tuple((item.keys[column.name], column) for column, _ in item.data)
            restriction_keys = tuple(zip(packet.restriction, (c for c, _ in item.restriction)))
            # every data key, generated columns' too (prepare() checks them all)
            times = tuple([("data", key, table.columns[name]) for name, key in item.keys.items()
                           if _time_column(table.columns[name])]
                          + [("restriction", key, column) for key, column in restriction_keys
                             if _time_column(column)])
            _remember(table.plans, shape, _Plan(
                item.action, data_keys, restriction_keys, item.keys, item.conflict, item.shape,
                key_values, times))
        return item

    def _returning(self, table: TableSchema) -> Tuple[str, ...]:
        return table.primary_key if self.back_fill else ()

    def _execute(self, cursor: Any, item: bulk.Prepared) -> Packet:
        table, action = item.table, item.action
        returning = self._returning(table)
        if action is Action.DELETE:
            query, params = delete_statement(table, item.restriction)
        elif action is Action.ADD:
            query, params = insert_statement(table, item.data, returning=returning)
        elif action is Action.SET:
            query, params = upsert_statement(table, item.data, returning=returning)
        else:
            query, params = update_statement(table, item.data, item.restriction)
        cursor.execute(query, params)
        LOGGER.debug("%s: %s on %s: %d rows", self.name, action.value, self.table, cursor.rowcount)
        if action in (Action.ADD, Action.SET) and returning:
            row = cursor.fetchone()
            return self._skipped(cursor, item, returning) if row is None else self._fill(item, row)
        if action in (Action.ADD, Action.SET) and self.back_fill and cursor.rowcount == 0:
            return self._skipped(cursor, item, returning)     # no primary key to return
        if action in (Action.UPDATE, Action.DELETE) and cursor.rowcount == 0 and self._matches(item):
            # at a destination, the targets' copies hold no such row either (or a trigger of the
            # canonical relation kept it: a soft delete): nothing to fan out; at a target, counted
            return item.packet.unmatched()
        return item.packet

    def _one_by_one(self, item: bulk.Prepared) -> bool:
        """Whether the run ``item`` heads is applied packet by packet: at a destination, updates
        and deletes on a relation with a ``DO INSTEAD`` rule for them, which must tell which
        packets changed a row (not fanned out otherwise) but where PostgreSQL refuses
        ``RETURNING`` (each statement's row count tells instead)."""
        return self.back_fill and _under_instead_rule(item)

    def _matches(self, item: bulk.Prepared) -> bool:
        """Whether to tell if ``item`` (and the run it heads) changed a row: at a destination
        always (a packet that changed none is not fanned out); at a target for an update or
        delete (counted ``unmatched``: the target lacks a row the canonical relation holds),
        unless its relation has a ``DO INSTEAD`` rule for it (:attr:`TableSchema.instead_rules`:
        no ``RETURNING`` there, and its row count does not tell)."""
        if self.back_fill:
            return True
        return item.action in (Action.UPDATE, Action.DELETE) and not _under_instead_rule(item)

    def _skipped(self, cursor: Any, item: bulk.Prepared, returning: Sequence[str]) -> Packet:
        """An add or set that wrote no row the canonical relation returns. Fanned out when:

        * it is a key-only set (``ON CONFLICT ... DO NOTHING``) and a row of its key is there
          (the row it ensures exists: nothing to change);
        * a routing trigger put its row into an inheritance child of the (plain) table: a row of
          the packet's primary key is in a child.

        Otherwise (a ``BEFORE INSERT`` or ``BEFORE UPDATE`` trigger returned NULL: refused) the
        packet is marked :meth:`~golconde.packet.Packet.unmatched`, not fanned out: the targets
        must not get what the canonical relation refused, nor take their own key for it. A packet
        without the key values to look for is not fanned out either, with a warning (a routed
        row whose generated key cannot be read back)."""
        table = item.table
        assert table is not None
        given = {column.name: value for column, value in item.data}
        key = table.primary_key or item.conflict
        complete = bool(key) and all(given.get(name) is not None for name in key)
        if not key and item.action is Action.ADD:
            # no key at all: a routed row is one of the same values (NULLs too) in a child (a
            # log table split by date, say); a refused one is nowhere
            key, complete = tuple(given), bool(given)

        def found(in_child: bool) -> bool:
            where, params = where_clause(table, [(table.columns[name], given[name]) for name in key])
            child = sql.SQL("")
            if in_child:
                # ON CONFLICT and the statement's RETURNING see the table itself: a row of that key
                # in a child of a plain table (not a partitioned one) is one its trigger routed there
                child = sql.SQL(" AND t.tableoid <> (SELECT c.oid FROM pg_catalog.pg_class c"
                                " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                                " WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r')")
                params = params + [table.relation.schema, table.relation.name]
            # a value its column type cannot compare with = (point, xml: in a table without a
            # key) must not fail the packet the trigger skipped
            row, error = _attempt(cursor, sql.SQL("SELECT 1 FROM {} AS t WHERE {}{} LIMIT 1").format(
                _relation(table), where, child), params)
            if error is not None:
                LOGGER.debug("%s: cannot look the skipped row up: %s", self.name, describe(error))
            return row is not None

        if complete:
            if found(in_child=not (item.action is Action.SET and bulk.do_nothing(item, returning))):
                return item.packet
            LOGGER.info("%s: a trigger of %s refused the row of a %s packet: not fanned out",
                        self.name, self.table, item.action.value)
        else:
            LOGGER.warning("%s: a trigger of %s skipped the row of a %s packet without its key"
                           " (a row routed elsewhere, or refused): not fanned out, since the"
                           " targets cannot be given the key it took", self.name, self.table,
                           item.action.value)
        return item.packet.unmatched()

    def _fill(self, item: bulk.Prepared, row: Sequence[Any]) -> Packet:
        """Write the returned primary key values (JSON text, :func:`bulk.returning_clause`) into the
        packet's data (under its own keys); the packet itself when it already held every one of
        them (same value, same JSON type)."""
        data = item.packet.data
        changed: Dict[str, Any] = {}
        columns = item.table.columns
        for name, text in zip(item.table.primary_key, row):
            key = item.keys.get(name, name)
            old = data.get(key, _MISSING)
            # the integer or the string the packet holds (most keys: an int, a uuid as text):
            # nothing to decode (a string's JSON text without an escape is the string quoted)
            if type(old) is int and text == str(old):
                continue
            if (type(old) is str and text is not None and text[:1] == '"' and "\\" not in text
                    and text[1:-1] == old):
                continue
            value = None if text is None else loads(text)
            if type(old) is not type(value) or old != value:
                if columns[name].base in bulk.FLOAT_TYPES and _same_float(old, value):
                    continue    # the same number; to_jsonb has no -0, which the packet keeps
                changed[key] = value
        if not changed:
            return item.packet
        filled = dict(data)
        filled.update(changed)
        return item.packet.with_data(filled)

    def on_schema_error(self) -> None:
        """Forget the cached schema of this handler's relation."""
        self.cache.invalidate(self.table)

    def schema_changed(self, cursor: Any) -> bool:
        """Whether the catalog's signature of the relation differs from the cached schema's
        (:meth:`golconde.schema.SchemaCache.revalidate`, one small query; the cache is then
        forgotten)."""
        return self.cache.revalidate(cursor, self.table, interval=0)

    def _action(self, packet: Packet) -> Action:
        if type(packet.action) is Action:
            return packet.action
        raw = getattr(packet.action, "value", packet.action)
        try:
            return Action(str(raw).strip().lower())
        except ValueError:
            raise PacketError("unknown action %r for %s (expected one of add, set, update, delete)"
                              % (str(raw)[:100], self.table)) from None

    def setup(self, connection: Any) -> None:
        """With a mapping, check it against the target relation
        (:meth:`golconde.mapping.TargetMapping.target_problems`).

        :raises StopListener: the relation is missing, or the mapping names a column it does not
            have (the values would be dropped): the listener pauses :data:`RELATION_RETRY` s,
            its packets queued, and looks again.
        """
        super().setup(connection)
        if not self.mapping:
            return
        try:
            self.cache.invalidate(self.table)      # as it is now: a reconnect may follow an ALTER
            with connection.cursor() as cursor:
                table = self._schema(cursor)
        finally:
            connection.rollback()
        self._check_mapping(table)

    def _check_mapping(self, table: TableSchema) -> None:
        """:raises StopListener: the mapping names a column ``table`` does not have
        (:meth:`golconde.mapping.TargetMapping.target_problems`); once per schema read."""
        if table is self._mapping_checked:
            return
        problems = self.mapping.target_problems(list(table.columns), str(self.table))
        if problems:
            raise StopListener("%s: %s; the target's packets wait until the mapping or the table"
                               " is fixed" % (self.name, "; ".join(problems)),
                               retry_after=RELATION_RETRY)
        self._mapping_checked = table

    def explain_error(self, cursor: Any, packet: Packet, error: BaseException) -> Optional[str]:
        """For a data error (SQLSTATE class 22) or a value of a type the column's cannot be cast
        from (42846, 42804): the first value of ``packet`` (``data``, then ``restriction``; at a
        mapped target, of the packets its mapping makes, by target column) that its column's type
        refuses alone, as ``"data.<key>"`` or ``"restriction.<key>"``: each value is cast to its
        column's type in a savepoint (``SELECT ((%s)::base)::type``, as bound, then to the
        declared type with its modifier and domain checks); a string too long for a
        ``varchar(n)`` or ``char(n)``, or a bit string of the wrong length for a ``bit(n)`` or
        ``bit varying(n)``, which an explicit cast would cut or pad, by its length. ``None``
        when no single value is refused so."""
        code = getattr(error, "pgcode", None) or ""
        # 23514 too: a domain's CHECK (a table's CHECK refuses no single value: None)
        if not (code.startswith("22") or code in ("42846", "42804", "23514")):
            return None
        try:
            packets = self.mapping.transform(packet) if self.mapping else [packet]
            table = self._schema(cursor)
            # the declared types, with their modifiers (the cached schema has the base types),
            # and a domain's innermost base type with its modifier (a varchar(4) under it)
            cursor.execute("SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),"
                           " (WITH RECURSIVE d (base, mod, depth) AS ("
                           "    SELECT t.typbasetype, t.typtypmod, 1 FROM pg_catalog.pg_type t"
                           "     WHERE t.oid = a.atttypid AND t.typtype = 'd'"
                           "  UNION ALL"
                           "    SELECT t.typbasetype, t.typtypmod, d.depth + 1 FROM d"
                           "      JOIN pg_catalog.pg_type t ON t.oid = d.base AND t.typtype = 'd')"
                           "  SELECT pg_catalog.format_type(base, mod) FROM d ORDER BY depth DESC LIMIT 1)"
                           " FROM pg_catalog.pg_attribute a WHERE a.attrelid = %s::pg_catalog.regclass"
                           " AND a.attnum > 0 AND NOT a.attisdropped",
                           (sql.Identifier(table.relation.schema,
                                           table.relation.name).as_string(cursor),))
            declared = {name: (text, base or text) for name, text, base in cursor.fetchall()}
            for one in packets:
                action = self._action(one)
                for part, values in (("data", one.data if action is not Action.DELETE else {}),
                                     ("restriction", one.restriction)):
                    for key, column, value in resolve(table, values, part)[0]:
                        if self._refuses(cursor, table, column, value, code,
                                         *declared.get(column.name, (column.type_name,) * 2)):
                            return "%s.%s" % (part, key)
        except (PacketError, StopListener):
            return None
        return None

    def _refuses(self, cursor: Any, table: TableSchema, column: Column, value: Any, code: str,
                 declared: str, base: str) -> bool:
        """Whether ``column``'s type (``declared``, as ``format_type`` writes it; ``base``: a
        domain's innermost base type so, else ``declared``) refuses ``value`` alone with
        SQLSTATE ``code``."""
        if value is None:
            return False
        limit = _LENGTH.fullmatch(base)
        if code == "22001" and limit and isinstance(value, str):
            return len(value.rstrip(" ") if base.startswith("character(") else value) > int(limit.group(1))
        bits = _BITS.fullmatch(base)
        if bits and code in ("22001", "22026") and isinstance(value, str):
            # the length PostgreSQL reads (a hex digit is 4 bits); bit(n) takes exactly n,
            # bit varying(n) at most n
            row, error = _attempt(cursor, sql.SQL("SELECT pg_catalog.length(%s::pg_catalog.varbit)"), (value,))
            if error is not None or row is None:
                return False
            size, wanted = row[0], int(bits.group(2))
            return size > wanted if bits.group(1) else (size != wanted and code == "22026")
        cast = _cast(column)
        if column.structure != "composite":     # then to the declared type: typmod, domain checks
            cast = sql.SQL("({})::{}").format(cast, sql.SQL(declared.replace("%", "%%")))
        error = _attempt(cursor, sql.SQL("SELECT {}").format(cast), (bind(table, column, value),))[1]
        return error is not None and error.pgcode == code

    def missing_privileges(self, cursor: Any, packet: Packet) -> List[str]:
        """What the role lacks on the relation for ``packet``'s action, on no column at all
        (:func:`golconde.schema.missing_privileges`; at a destination, ``add`` and ``set`` read
        the key back, so SELECT too); ``[]`` for an unknown action."""
        try:
            action = self._action(packet)
        except PacketError:
            return []
        needed = ACTION_PRIVILEGES[action.value]
        if self.back_fill and action in (Action.ADD, Action.SET):
            needed += ("SELECT",)           # a destination's RETURNING of the key reads it
        return missing_privileges(cursor, self.table, needed)

    def _schema(self, cursor: Any, refresh: bool = False, check_catalog: bool = False) -> TableSchema:
        try:
            if refresh:
                return self.cache.refresh_if_stale(cursor, self.table, check_catalog=check_catalog)
            return self.cache.get(cursor, self.table)
        except SchemaError as exc:
            raise StopListener("%s: %s" % (self.name, exc), retry_after=RELATION_RETRY) from exc

    def _resolve(self, cursor: Any, packet: Packet, action: Action) -> Tuple[TableSchema, List[Item], List[Item]]:
        table = self._schema(cursor)
        data_values = packet.data if action is not Action.DELETE else {}
        data, data_unknown = resolve(table, data_values, "data")
        restriction, restriction_unknown = resolve(table, packet.restriction, "restriction")
        if data_unknown or restriction_unknown:
            # a dead letter or a never-seen name is worth one catalog query; names already known to
            # be absent (a narrower target) are checked once per batch (apply_batch): a column
            # added at the target just before the batch came is not ignored
            check = (restriction_unknown or self.unknown_columns == "error"
                     or not self._absent.issuperset(data_unknown) or not self._absent_checked)
            self._absent_checked = True
            table = self._schema(cursor, refresh=True, check_catalog=bool(check))
            data, data_unknown = resolve(table, data_values, "data")
            restriction, restriction_unknown = resolve(table, packet.restriction, "restriction")
        if restriction_unknown:
            raise PacketError("restriction names %s that %s does not have"
                              % (_names(restriction_unknown), table.relation))
        if data_unknown and self.mapping:
            # a column the mapping writes dropped or renamed since setup() checked: its values
            # would be ignored as those of a narrower target's, for good
            self._check_mapping(table)
        if data_unknown:
            if self.unknown_columns == "error":
                raise PacketError("data names %s that %s does not have" % (_names(data_unknown), table.relation))
            LOGGER.debug("%s: ignoring %s that %s does not have", self.name, _names(data_unknown), table.relation)
            self._absent.update(data_unknown)
        return table, data, restriction


def _names(keys: Sequence[str]) -> str:
    return "%s %s" % ("column" if len(keys) == 1 else "columns", ", ".join(repr(key) for key in keys))
