"""Set-based apply of runs of consecutive packets: one statement for many rows.

The idea is Londiste's bulk handler (Skytools 3, ``londiste/handlers/bulk.py``): per-row round trips
are what cost, so consecutive packets of the same shape go to PostgreSQL as one statement:

    add     INSERT INTO rel (c1, c2) VALUES (...), (...), ... RETURNING <primary key>
    set     INSERT INTO rel (k, c2) VALUES (...), ... ON CONFLICT (k) DO UPDATE SET c2 = EXCLUDED.c2
            RETURNING <primary key>
            (at a destination: a target, which fans nothing out, returns nothing)
    update  UPDATE rel AS t SET c1 = v.d0 FROM (VALUES (...), ...) AS v (r0, d0) WHERE t.k = v.r0
    delete  DELETE FROM rel AS t USING (VALUES (...), ...) AS v (r0) WHERE t.k = v.r0

A run's values travel in one of two ways:

* as one JSON parameter, an array with one array of values per packet, which PostgreSQL unpacks
  with ``json_array_elements`` and casts element by element to the column types::

    INSERT INTO rel (c1, c2) SELECT (v.e ->> 0)::t1, (v.e ->> 1)::t2
      FROM pg_catalog.json_array_elements(%s::pg_catalog.json) AS v (e)
    UPDATE rel AS t SET c1 = (v.e ->> 1)::t1 FROM pg_catalog.json_array_elements(...) AS v (e)
     WHERE t.k = (v.e ->> 0)::tk

  when every value is of a kind whose text the column's type reads to the value a bound literal
  would give (:func:`json_kinds`): a string for any column but json and arrays, an integer for
  numeric and string columns, a decimal number for ``numeric`` and float ones (not a negative
  zero), a boolean for boolean and
  string ones, NULL for any. Where such a value is still refused, the statement fails and the
  applier replays the batch packet by packet with AutoSQL's single-row statements, so the
  outcome is the same. One parameter instead of one bound
  literal per value costs about a third of the client's CPU per row and less of the server's
  (measured for workload W's packets, 500 per statement: 3-4 against 7-11 us of Python, 10-22
  against 11-35 us of backend CPU per row);
* otherwise through :func:`psycopg2.extras.execute_values` with a template of casts to the column
  types (``%s::<type>``), exactly as AutoSQL binds single packets (json values, arrays, floats).

A *run* is a maximal sequence of packets with the same action and the same data and restriction
columns that keeps the result identical to applying the packets one by one:

* a key (``set``: the conflict key; ``update``/``delete``: the restriction) seen twice closes the
  run, so one statement never touches a row twice and per-key order is kept;
* an ``update`` or ``delete`` restricted on a NULL value, or an ``update`` that changes one of its
  own restriction columns, is applied alone (it may affect rows another packet of the run selects);
  an ``update`` whose data repeats a restriction column's value (the capture trigger sends the
  whole new row) does not change it, and joins a run that leaves that column out of its SET list;
* at a destination, an ``update`` writing a column that an immediate unique index or exclusion
  constraint checks is applied alone: PostgreSQL checks such a column row by row in the order
  the statement visits the rows, so a run could pass where the packets in order would not (one
  packet taking a value that a later one frees);
* a run of one packet is applied with AutoSQL's single-row statement.

Runs are applied in order, so the net effect per key is that of the packets in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from psycopg2 import sql
from psycopg2.extras import execute_values

from ..errors import GolcondeError
from ..packet import Action, Packet, dumps
from ..schema import Column, TableSchema

#: Rows per statement (execute_values page size; packets per JSON parameter).
PAGE_SIZE = 1000

#: Numeric base types (``format_type``, domains resolved): they read an integer's text as the
#: bound numeric literal cast to them gives it.
NUMERIC_TYPES = frozenset(("smallint", "integer", "bigint", "numeric", "real", "double precision"))
#: ... and a decimal number's too (a float type reads "-0.0" as -0, where the literal gives 0).
_EXACT_NUMBERS = frozenset(("smallint", "integer", "bigint", "numeric"))
#: Float types: a decimal number is bound as its text (:func:`golconde.handlers.autosql.bind`),
#: which their input function reads as the JSON element's text is read ("-0.0" as -0).
FLOAT_TYPES = frozenset(("real", "double precision"))


def float_text(value: Any) -> str:
    """A number's text for a float column: ``str(value)``, but ``"0"`` for a negative zero
    written without a fraction (``-0``, ``-0e0``: ``Decimal("-0")``), which travels on to the
    targets as the JSON integer ``-0``, read there as 0: the canonical relation holds 0 too."""
    text = str(value)
    return "0" if text == "-0" else text
#: Integer types: a bound decimal literal is rounded to them.
_INTEGERS = frozenset(("smallint", "integer", "bigint"))
#: The integer types (a fraction given for one is refused: :func:`golconde.handlers.autosql.bind`).
INTEGER_TYPES = _INTEGERS
#: Base types whose value is the text itself: an integer cast to them gives its digits.
STRING_TYPES = frozenset(("text", "character varying", "bpchar", "name"))
#: ... and a boolean ``true`` / ``false`` (``name`` has no cast from boolean: ``t`` / ``f``).
_BOOLEAN_TEXT = frozenset(("text", "character varying", "bpchar"))


class RunNotPaired(GolcondeError):
    """A run's statement returned fewer rows than it had packets (a ``BEFORE`` trigger skipped
    some, or ``ON CONFLICT DO NOTHING``) while its packets lack a key column to back-fill: the
    returned keys cannot be matched to their packets. The caller rolls back and applies the
    packets one by one (each with its own ``RETURNING``)."""


@dataclass
class Prepared:
    """One packet resolved against its relation.

    :ivar data: ``[(column, value)]`` of writable columns (empty for delete).
    :ivar restriction: ``[(column, value)]``.
    :ivar keys: column name -> the packet's own key for it (for back-filling generated keys).
    :ivar conflict: for ``set``, the conflict key's column names.
    """

    action: Action
    packet: Packet
    data: List[Tuple[Column, Any]] = field(default_factory=list)
    restriction: List[Tuple[Column, Any]] = field(default_factory=list)
    keys: Dict[str, str] = field(default_factory=dict)
    conflict: Tuple[str, ...] = ()
    table: Optional[TableSchema] = None
    #: :attr:`shape`, when the caller knows it already (AutoSQL's cached plans)
    known_shape: Optional[Tuple[Any, ...]] = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> Tuple[Any, ...]:
        """``(action, data column names, restriction column names, conflict key)``: packets of one
        shape can share a statement."""
        if self.known_shape is None:
            self.known_shape = (self.action, tuple(c.name for c, _ in self.data),
                                tuple(c.name for c, _ in self.restriction), self.conflict)
        return self.known_shape

    @property
    def alone(self) -> bool:
        """True when this packet must not share a statement with others."""
        if self.action in (Action.UPDATE, Action.DELETE):
            # NULL needs IS NULL; json has no = operator (AutoSQL compares it as jsonb)
            if any(value is None or column.is_json for column, value in self.restriction):
                return True
        if self.action is Action.UPDATE:
            restricted = {c.name: v for c, v in self.restriction}
            return any(c.name in restricted and not same_value(v, restricted[c.name])
                       for c, v in self.data)
        return False

    @property
    def writes_checked_column(self) -> bool:
        """True for an ``update`` whose SET list holds a column an immediate unique index or
        exclusion constraint reads (:attr:`golconde.schema.TableSchema.checked_columns`; a value
        repeating the restriction's is left out of it): PostgreSQL checks it as each row is
        written, in the order the statement visits the rows, not the packets' order, so a run
        could pass where the packets one by one would not (one takes a value another frees)."""
        if self.action is not Action.UPDATE or self.table is None:
            return False
        checked = self.table.checked_columns
        if checked.isdisjoint(self.shape[1]):       # the data's column names (cached per plan)
            return False
        restricted = {c.name: v for c, v in self.restriction}
        return any(c.name in checked and not (c.name in restricted and same_value(v, restricted[c.name]))
                   for c, v in self.data)

    def identity(self) -> Optional[Any]:
        """The row key this packet touches, to close a run when it repeats: one part per key
        column (:func:`identity_part`, so that ``"1"`` repeats ``1`` for an integer key and
        ``"A0..."`` repeats ``"a0..."`` for a uuid; closing a run early is always safe), or
        :data:`ANY` when a part may equal values written differently (a timestamp with another
        offset): the packet then runs alone. Two packets of one run matching the same row would
        make PostgreSQL apply only one of them."""
        if self.action is Action.SET:
            values = {c.name: (c, v) for c, v in self.data}
            pairs = [values[name] for name in self.conflict if name in values]
        elif self.action in (Action.UPDATE, Action.DELETE):
            pairs = self.restriction
        else:
            return None
        key = tuple(identity_part(column, value) for column, value in pairs)
        if ANY in key:
            return ANY
        try:
            hash(key)
        except TypeError:
            return dumps(key)
        return key


#: An identity that may equal any other: its packet is applied alone.
ANY = object()


def identity_part(column: Column, value: Any) -> Any:
    """A value of a key column as a Python value that is equal for values PostgreSQL finds equal
    in that column (never less coarse): numbers for integer and numeric columns (``"1"``, ``1``
    and ``1.0`` alike; a fraction for an integer column, which PostgreSQL rounds, is :data:`ANY`),
    the text for text columns of a deterministic collation (an integer's digits, ``true`` /
    ``false``; ``bpchar`` without trailing spaces; ``name`` below its 63-byte cut), uuids in lower
    case without hyphens or braces; NULL as ``None``; :data:`ANY` for any other type or value kind."""
    kind = type(value)
    if value is None:
        return None
    base = column.base
    if base in _EXACT_NUMBERS:
        if kind is int:
            return value
        if kind is Decimal or kind is str or kind is float:
            try:
                number = value if kind is Decimal else Decimal(value.strip() if kind is str else repr(value))
            except ArithmeticError:
                return ANY
            if number.is_nan() or (base in _INTEGERS and number != number.to_integral_value()):
                return ANY      # NaN = NaN in PostgreSQL; 1.5 and 2 are one integer
            return number
        return ANY
    if base in STRING_TYPES:
        if not column.deterministic:
            return ANY          # "ABC" = "abc" under a case-insensitive collation
        if kind is int:
            return str(value)
        if kind is bool and base in _BOOLEAN_TEXT:
            return "true" if value else "false"
        if kind is not str or (base == "name" and len(value.encode("utf-8")) >= 63):
            return ANY
        return value.rstrip(" ") if base == "bpchar" else value
    if base == "uuid" and kind is str:
        return value.replace("-", "").strip().strip("{}").lower()
    return ANY


def same_value(a: Any, b: Any) -> bool:
    """True when two decoded JSON values are the same value of the same JSON type (``1`` is not
    ``true``, ``1`` is not ``"1"``): an UPDATE whose data repeats its restriction's value for a key
    column (as the capture trigger's packets do, carrying the whole new row) leaves that key as is."""
    return type(a) is type(b) and a == b


def runs(prepared: Sequence[Prepared], checked_alone: bool = False) -> List[List[int]]:
    """Split ``prepared`` (in order) into runs of indexes, as described in the module docstring.

    :param checked_alone: an ``update`` that writes a column a unique index or exclusion
        constraint checks (:attr:`Prepared.writes_checked_column`) is applied alone. A
        destination sets it: its result must be that of the packets one by one, which the
        targets then follow. A target need not: its packets passed one by one at the
        destination, in that order, so a run of them passes with the same result, or fails and
        is replayed one by one."""
    result: List[List[int]] = []
    current: List[int] = []
    seen: set = set()
    run_shape: Any = None        # the run's shape; None while it cannot take another packet
    for index, item in enumerate(prepared):
        identity = item.identity()
        alone = item.alone or identity is ANY or (checked_alone and item.writes_checked_column)
        shape = None if alone else item.shape
        fits = (current and shape is not None and run_shape == shape
                and (identity is None or identity not in seen))
        if not fits:
            if current:
                result.append(current)
            current, seen, run_shape = [], set(), shape
        current.append(index)
        if identity is not None:
            seen.add(identity)
    if current:
        result.append(current)
    return result


def on_conflict(key: Sequence[str], columns: Sequence[Column], returning: Sequence[str],
                ident: Any) -> sql.Composed:
    """``ON CONFLICT (key) DO UPDATE SET c = EXCLUDED.c, ...`` for the non-key ``columns`` (but
    ``GENERATED ALWAYS`` identity columns, which an existing row keeps);
    ``DO NOTHING`` when there are none, unless ``returning`` names a column absent from
    ``columns`` (a generated primary key to back-fill while the conflict is on another unique key):
    then a no-op ``DO UPDATE SET k = EXCLUDED.k`` so that the existing row is returned too."""
    # a GENERATED ALWAYS identity column takes no value but DEFAULT in an UPDATE: it keeps its own
    others = [c for c in columns if c.name not in key and not c.identity_always]
    present = {c.name for c in columns}
    if not others and any(name not in present for name in returning):
        others = [c for c in columns if c.name == key[0]]
    if others:
        action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(ident(c.name), ident(c.name)) for c in others))
    else:
        action = sql.SQL("DO NOTHING")
    return sql.SQL("ON CONFLICT ({}) {}").format(sql.SQL(", ").join(ident(name) for name in key), action)


def do_nothing(item: Prepared, returning: Sequence[str]) -> bool:
    """Whether a set's upsert is ``ON CONFLICT ... DO NOTHING`` (:func:`on_conflict`): its data
    holds only its conflict key's columns (and identity columns an existing row keeps), and
    every column to return."""
    present = {c.name for c, _ in item.data}
    others = [c for c, _ in item.data if c.name not in item.conflict and not c.identity_always]
    return not others and all(name in present for name in returning)


def _template(casts: Sequence[sql.Composable]) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(casts))


def json_kinds(column: Column) -> FrozenSet[type]:
    """The Python types of the values that may reach ``column`` inside a run's JSON parameter: for
    these, the type's input function reading the JSON element's text gives what the bound literal
    cast to the type gives, or fails. Empty for json and array columns (their values are bound).

    * ``None``: NULL either way;
    * ``str``: an explicit cast of a string literal and of text both call the type's input function
      (domains: the base type's, then the domain's checks), unless a cast function from text
      stands between (:attr:`~golconde.schema.Column.text_input`: ``regclass`` reads digits as a
      table name there, where its input function reads an OID);
    * ``int`` (not ``bool``): for numeric types, the same number; for string types, its digits;
    * ``Decimal``: for numeric and float types the same number (for a float type, bound as its
      text, so ``-0.0`` is -0 either way); not for integer types (bound, where
      :func:`golconde.handlers.autosql.bind` refuses a fraction that the cast would round);
    * ``bool``: for boolean, the same; for text, varchar and bpchar, ``true`` / ``false``.
    """
    if column.is_array or column.is_json:
        return frozenset()
    base = column.base
    kinds = {type(None), str} if column.text_input else {type(None)}
    if base in NUMERIC_TYPES:
        kinds.add(int)
        if base not in _INTEGERS:
            kinds.add(Decimal)      # for an integer, bound and checked (a fraction is refused)
    elif base in STRING_TYPES:
        kinds.add(int)
        if base in _BOOLEAN_TEXT:
            kinds.add(bool)
    elif base == "boolean":
        kinds.add(bool)
    return frozenset(kinds)


def _fits_json(columns: Sequence[Column], values: Sequence[Sequence[Any]]) -> bool:
    kinds = [json_kinds(column) for column in columns]
    if not all(kinds):
        return False
    for row in values:
        for value, allowed in zip(row, kinds):
            kind = type(value)
            if kind not in allowed or (kind is Decimal and not value and value.is_signed()):
                return False        # a negative zero: bound (float_text), as packet by packet
    return True


#: The run's values, one JSON array per packet, as the rows of ``v``.
_ELEMENTS = sql.SQL("pg_catalog.json_array_elements(%s::pg_catalog.json) AS v (e)")


#: The number a run's packet carries at the end of its JSON array (an update run at a
#: destination, :func:`execute_run`'s ``matches``).
_NUMBER = sql.SQL("(v.e ->> -1)::pg_catalog.int4")


def _element(index: int, column: Column, type_of: Any) -> sql.Composed:
    return sql.SQL("(v.e ->> {})::{}").format(sql.Literal(index), type_of(column))


def _execute_json(cursor: Any, query: sql.Composed, values: Sequence[Sequence[Any]],
                  fetch: bool) -> List[tuple]:
    """Run ``query`` once per :data:`PAGE_SIZE` rows of ``values``, passed as one JSON array."""
    text = query.as_string(cursor)
    result: List[tuple] = []
    for start in range(0, len(values), PAGE_SIZE):
        cursor.execute(text, (dumps(values[start:start + PAGE_SIZE]),))
        if fetch:
            result.extend(cursor.fetchall())
    return result


def returning_clause(names: Sequence[str], ident: Any) -> sql.Composed:
    """`` RETURNING pg_catalog.to_jsonb(c)::pg_catalog.text, ...`` for the columns ``names``: each
    value as JSON text in the server's own spelling (an interval's months, a BC or year-12000
    date, ``24:00``, ``infinity``), where psycopg2's conversions to Python change some (a month
    read as 30 days) or fail (years outside 1-9999). Intervals and ranges are printed in the
    session's ``IntervalStyle`` and ``DateStyle``: a database whose defaults are not
    PostgreSQL's (``postgres``, ``ISO``) may print a negative interval or a range of dates in a
    form targets with the defaults read otherwise. Decode each with
    :func:`golconde.packet.loads`; NULL stays NULL."""
    return sql.SQL(" RETURNING {}").format(sql.SQL(", ").join(
        sql.SQL("pg_catalog.to_jsonb({})::pg_catalog.text").format(ident(name)) for name in names))


def execute_run(cursor: Any, table: TableSchema, items: Sequence[Prepared], ident: Any, cast: Any,
                bind: Any, relation: sql.Composable, returning: Sequence[str],
                type_of: Any, matches: bool = False) -> List[Optional[tuple]]:
    """Apply a run of two or more packets of the same shape with one statement per page.

    :param ident, cast, bind, relation, type_of: AutoSQL's identifier, ``%s::type``, value
        binding, relation and column type helpers (so both paths quote and bind the same way).
    :param returning: for add/set, the columns to return (a destination's primary key, to
        back-fill generated keys; ``()`` at a target, which fans nothing out).
    :param matches: for update and delete, tell which packets changed a row (at a destination:
        one that changed none is not fanned out); for add and set without ``returning`` (no
        primary key), count the rows written: fewer than packets raises :class:`RunNotPaired`.
    :returns: for add/set with columns to return, the returned row of each packet in order, its
        values JSON text (:func:`returning_clause`);
        for update and delete with ``matches``, per packet ``()`` when it changed a row, else
        ``None``; otherwise ``[]``.
    :raises psycopg2.Error: the statement failed (the caller replays packet by packet).
    :raises PacketError: a value the column cannot take (from ``bind``).
    :raises RunNotPaired: rows were returned for fewer packets than given (a trigger skipped
        some): the caller applies the run packet by packet, telling each skipped one.
    """
    first = items[0]
    action = first.action
    if action in (Action.ADD, Action.SET):
        columns = [c for c, _ in first.data]
        values = [[v for _, v in item.data] for item in items]
        head = sql.SQL("INSERT INTO {} ({}) {}").format(
            relation, sql.SQL(", ").join(ident(c.name) for c in columns),
            sql.SQL("OVERRIDING SYSTEM VALUE ") if any(c.identity_always for c in columns) else sql.SQL(""))
        tail = sql.SQL("")
        if action is Action.SET:
            tail = sql.SQL(" {}").format(on_conflict(first.conflict, columns, returning, ident))
        if returning:
            tail = sql.SQL("{}{}").format(tail, returning_clause(returning, ident))
        elif matches:       # no key to return (a table without a primary key): count the rows
            tail = sql.SQL("{} RETURNING 1").format(tail)
        fetch = bool(returning) or matches
        if _fits_json(columns, values):
            query = sql.SQL("{}SELECT {} FROM {}{}").format(
                head, sql.SQL(", ").join(_element(i, c, type_of) for i, c in enumerate(columns)),
                _ELEMENTS, tail)
            result = _execute_json(cursor, query, values, fetch)
        else:
            rows = [[bind(table, c, v) for c, v in zip(columns, row)] for row in values]
            template = _template([cast(c) for c in columns])
            result = execute_values(cursor, sql.SQL("{}VALUES %s{}").format(head, tail), rows,
                                    template=template.as_string(cursor), page_size=PAGE_SIZE,
                                    fetch=fetch)
        if not fetch:
            return []
        if len(result) != len(items):
            # rows skipped (by a trigger), or existing rows a key-only set's DO NOTHING did not
            # return: which packets is not known; the caller applies them one by one (each then
            # looked up: a refused row is not fanned out, an existing one is)
            raise RunNotPaired("%d of %d rows returned by a run of %s packets on %s"
                               % (len(result), len(items), action.value, table.relation))
        return list(result) if returning else [None] * len(items)
    restriction = [c for c, _ in first.restriction]
    data = [c for c, _ in first.data]
    # a run's updates never change a restriction column's value (see Prepared.alone); they still
    # SET it (a numeric 1.0 replaces 1.00, as the packet says), but for a GENERATED ALWAYS identity
    # column, key or not, which takes no value but DEFAULT (AutoSQL's update_statement alike)
    kept = [i for i, c in enumerate(data) if not c.identity_always]
    if data and not kept:   # the data holds only identity columns: SET one (refused)
        kept = [0]
    data = [data[i] for i in kept]
    columns = restriction + data
    values = [[v for _, v in item.restriction] + [item.data[i][1] for i in kept] for item in items]
    if _fits_json(columns, values):
        refs = [_element(i, c, type_of) for i, c in enumerate(columns)]
        source = _ELEMENTS
    else:
        refs = [sql.SQL("v.{}").format(sql.Identifier("r%d" % i)) for i in range(len(restriction))] + \
               [sql.SQL("v.{}").format(sql.Identifier("d%d" % i)) for i in range(len(data))]
        names = [sql.Identifier("r%d" % i) for i in range(len(restriction))] + \
                [sql.Identifier("d%d" % i) for i in range(len(data))]
        source = sql.SQL("(VALUES %s) AS v ({})").format(sql.SQL(", ").join(names))
    match = sql.SQL(" AND ").join(sql.SQL("t.{} = {}").format(ident(c.name), ref)
                                  for c, ref in zip(restriction, refs))
    numbered = matches   # an update or delete: which packets changed a row
    if numbered:
        # each row of v carries its packet's number: RETURNING it tells which packets matched
        values = [row + [number] for number, row in enumerate(values)]
        if source is not _ELEMENTS:
            source = sql.SQL("(VALUES %s) AS v ({})").format(sql.SQL(", ").join(
                names + [sql.Identifier("n")]))
    if action is Action.UPDATE:
        query = sql.SQL("UPDATE {} AS t SET {} FROM {} WHERE {}").format(
            relation,
            sql.SQL(", ").join(sql.SQL("{} = {}").format(ident(c.name), ref)
                               for c, ref in zip(data, refs[len(restriction):])),
            source, match)
    else:
        query = sql.SQL("DELETE FROM {} AS t USING {} WHERE {}").format(relation, source, match)
    if numbered:
        query = sql.SQL("{} RETURNING {}").format(
            query, _NUMBER if source is _ELEMENTS else sql.SQL("v.{}").format(sql.Identifier("n")))
    if source is _ELEMENTS:
        result = _execute_json(cursor, query, values, numbered)
    else:
        rows = [[bind(table, c, v) for c, v in zip(columns, row)] + row[len(columns):]
                for row in values]
        template = _template([cast(c) for c in columns]
                             + ([sql.SQL("%s::pg_catalog.int4")] if numbered else []))
        result = execute_values(cursor, query, rows, template=template.as_string(cursor),
                                page_size=PAGE_SIZE, fetch=numbered)
    if not numbered:
        return []
    matched = {int(row[0]) for row in result}
    return [() if number in matched else None for number in range(len(items))]
