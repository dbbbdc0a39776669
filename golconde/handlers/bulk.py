"""Set-based apply of runs of consecutive packets: one statement for many rows.

The idea is Londiste's bulk handler (Skytools 3, ``londiste/handlers/bulk.py``): per-row round trips
are what cost, so consecutive packets of the same shape go to PostgreSQL as one statement:

    add     INSERT INTO rel (c1, c2) VALUES (...), (...), ... RETURNING <primary key>
    set     INSERT INTO rel (k, c2) VALUES (...), ... ON CONFLICT (k) DO UPDATE SET c2 = EXCLUDED.c2
            RETURNING <primary key>
            (at a destination: a target, which fans nothing out, returns nothing)
    update  UPDATE rel AS t SET c1 = v.d0 FROM (VALUES (...), ...) AS v (r0, d0) WHERE t.k = v.r0
    delete  DELETE FROM rel AS t USING (VALUES (...), ...) AS v (r0) WHERE t.k = v.r0

Values are bound through :func:`psycopg2.extras.execute_values` with a template of casts to the
column types (``%s::<type>``), exactly as AutoSQL binds single packets.

A *run* is a maximal sequence of packets with the same action and the same data and restriction
columns that keeps the result identical to applying the packets one by one:

* a key (``set``: the conflict key; ``update``/``delete``: the restriction) seen twice closes the
  run, so one statement never touches a row twice and per-key order is kept;
* an ``update`` or ``delete`` restricted on a NULL value, or an ``update`` that changes one of its
  own restriction columns, is applied alone (it may affect rows another packet of the run selects);
  an ``update`` whose data repeats a restriction column's value (the capture trigger sends the
  whole new row) does not change it, and joins a run that leaves that column out of its SET list;
* a run of one packet is applied with AutoSQL's single-row statement.

Runs are applied in order, so the net effect per key is that of the packets in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from psycopg2 import sql
from psycopg2.extras import execute_values

from ..packet import Action, Packet, dumps
from ..schema import Column, TableSchema

#: Rows per statement (execute_values page size).
PAGE_SIZE = 1000


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

    def identity(self) -> Optional[Any]:
        """The row key this packet touches (to close a run when it repeats): a tuple of the values
        (equal numbers compare equal, so ``1.0`` repeats ``1``: closing a run early is always safe),
        or their JSON text when one is not hashable (a json column's object or array)."""
        if self.action is Action.SET:
            values = {c.name: v for c, v in self.data}
            key = tuple(values.get(name) for name in self.conflict)
        elif self.action in (Action.UPDATE, Action.DELETE):
            key = tuple(v for _, v in self.restriction)
        else:
            return None
        try:
            hash(key)
        except TypeError:
            return dumps(key)
        return key


def same_value(a: Any, b: Any) -> bool:
    """True when two decoded JSON values are the same value of the same JSON type (``1`` is not
    ``true``, ``1`` is not ``"1"``): an UPDATE whose data repeats its restriction's value for a key
    column (as the capture trigger's packets do, carrying the whole new row) leaves that key as is."""
    return type(a) is type(b) and a == b


def runs(prepared: Sequence[Prepared]) -> List[List[int]]:
    """Split ``prepared`` (in order) into runs of indexes, as described in the module docstring."""
    result: List[List[int]] = []
    current: List[int] = []
    seen: set = set()
    run_shape: Any = None        # the run's shape; None while it cannot take another packet
    for index, item in enumerate(prepared):
        identity = item.identity()
        shape = None if item.alone else item.shape
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
    """``ON CONFLICT (key) DO UPDATE SET c = EXCLUDED.c, ...`` for the non-key ``columns``;
    ``DO NOTHING`` when there are none, unless ``returning`` names a column absent from
    ``columns`` (a generated primary key to back-fill while the conflict is on another unique key):
    then a no-op ``DO UPDATE SET k = EXCLUDED.k`` so that the existing row is returned too."""
    others = [c for c in columns if c.name not in key]
    present = {c.name for c in columns}
    if not others and any(name not in present for name in returning):
        others = [c for c in columns if c.name == key[0]]
    if others:
        action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(ident(c.name), ident(c.name)) for c in others))
    else:
        action = sql.SQL("DO NOTHING")
    return sql.SQL("ON CONFLICT ({}) {}").format(sql.SQL(", ").join(ident(name) for name in key), action)


def _template(casts: Sequence[sql.Composable]) -> sql.Composed:
    return sql.SQL("({})").format(sql.SQL(", ").join(casts))


def execute_run(cursor: Any, table: TableSchema, items: Sequence[Prepared], ident: Any, cast: Any,
                bind: Any, relation: sql.Composable, returning: Sequence[str]) -> List[Optional[tuple]]:
    """Apply a run of two or more packets of the same shape with one statement per page.

    :param ident, cast, bind, relation: AutoSQL's identifier, ``%s::type``, value binding and
        relation helpers (so both paths quote and bind the same way).
    :param returning: for add/set, the columns to return (a destination's primary key, to
        back-fill generated keys; ``()`` at a target, which fans nothing out).
    :returns: for add/set with columns to return, the returned row of each packet in order
        (``None`` where the row was not returned); otherwise ``[]``.
    """
    first = items[0]
    action = first.action
    if action in (Action.ADD, Action.SET):
        columns = [c for c, _ in first.data]
        query = sql.SQL("INSERT INTO {} ({}) {}VALUES %s").format(
            relation, sql.SQL(", ").join(ident(c.name) for c in columns),
            sql.SQL("OVERRIDING SYSTEM VALUE ") if any(c.identity_always for c in columns) else sql.SQL(""))
        if action is Action.SET:
            query = sql.SQL("{} {}").format(query, on_conflict(first.conflict, columns, returning, ident))
        if returning:
            query = sql.SQL("{} RETURNING {}").format(
                query, sql.SQL(", ").join(ident(name) for name in returning))
        rows = [[bind(table, c, v) for c, v in item.data] for item in items]
        template = _template([cast(c) for c in columns])
        result = execute_values(cursor, query, rows, template=template.as_string(cursor),
                                page_size=PAGE_SIZE, fetch=bool(returning))
        if not returning:
            return []
        if len(result) != len(items):   # DO NOTHING skipped rows: cannot pair them by position
            return [None] * len(items)
        return list(result)
    restriction = [c for c, _ in first.restriction]
    data = [c for c, _ in first.data]
    # a run's updates never change a restriction column (see Prepared.alone): SET only the others
    restricted = {c.name for c in restriction}
    kept = [i for i, c in enumerate(data) if c.name not in restricted]
    if data and not kept:   # the data only repeats the key: SET one key column to itself
        kept = [0]
    data = [data[i] for i in kept]
    names = [sql.Identifier("r%d" % i) for i in range(len(restriction))] + \
            [sql.Identifier("d%d" % i) for i in range(len(data))]
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{} = v.{}").format(ident(c.name), sql.Identifier("r%d" % i))
        for i, c in enumerate(restriction))
    if action is Action.UPDATE:
        query = sql.SQL("UPDATE {} AS t SET {} FROM (VALUES %s) AS v ({}) WHERE {}").format(
            relation,
            sql.SQL(", ").join(sql.SQL("{} = v.{}").format(ident(c.name), sql.Identifier("d%d" % i))
                               for i, c in enumerate(data)),
            sql.SQL(", ").join(names), match)
    else:
        query = sql.SQL("DELETE FROM {} AS t USING (VALUES %s) AS v ({}) WHERE {}").format(
            relation, sql.SQL(", ").join(names), match)
    rows = [[bind(table, c, v) for c, v in item.restriction]
            + [bind(table, c, v) for c, v in (item.data[i] for i in kept)] for item in items]
    template = _template([cast(c) for c in restriction] + [cast(c) for c in data])
    execute_values(cursor, query, rows, template=template.as_string(cursor), page_size=PAGE_SIZE)
    return []
