"""pg_catalog reader and cache: the columns, types and keys of the relations Golconde writes to.

:func:`read_schema` reads one relation from the catalog (after Skytools' ``dbstruct.TColumn`` and
``sqltools.get_table_pkeys()``: ``attnum > 0 AND NOT attisdropped``, ``indisprimary``);
:class:`SchemaCache` keeps what was read, keyed by relation, until it is invalidated (after a DDL
error) or refreshed (when a packet names a column the cache does not know, at most once a second).

Relation names follow PostgreSQL's rules: ``table`` means ``public.table``, unquoted parts are folded
to lower case, double-quoted parts are taken verbatim (``"My Schema"."T.1"``, ``""`` for a quote).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError, GolcondeError

LOGGER = logging.getLogger(__name__)

#: Relation kinds that can be written to: table, partitioned table, foreign table, view.
WRITABLE_RELKINDS = ("r", "p", "f", "v")

_UNQUOTED = re.compile(r"[^\W\d][\w$]*")
_PLAIN = re.compile(r"[a-z_][a-z0-9_$]*")


class SchemaError(GolcondeError):
    """The relation cannot be read from the catalog (it does not exist, or is not a table).

    Not the packet's fault: AutoSQL turns it into :class:`~golconde.errors.StopListener`."""


def quote_name(name: str) -> str:
    """``name`` as written in SQL, double-quoted only when needed (for messages and ``str()``)."""
    if _PLAIN.fullmatch(name):
        return name
    return '"%s"' % name.replace('"', '""')


@dataclass(frozen=True)
class Relation:
    """A schema-qualified relation name (both parts as stored in the catalog, case preserved)."""

    schema: str
    name: str

    def __str__(self) -> str:
        return "%s.%s" % (quote_name(self.schema), quote_name(self.name))


#: ASCII upper-case letters to lower case, the only ones PostgreSQL folds in an unquoted identifier
#: of a multi-byte (UTF-8) database (``downcase_identifier``, src/backend/parser/scansup.c)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_identifier(name: str) -> str:
    """An unquoted identifier as PostgreSQL stores it: ``A``-``Z`` folded to lower case, any
    other letter kept (``Ärger`` stays ``Ärger``; Python's ``str.lower`` would make it
    ``ärger``, a relation that does not exist)."""
    return name.translate(_ASCII_LOWER)


def parse_relation(text: str) -> Relation:
    """Parse ``[schema.]table`` (the configuration's ``target``) into a :class:`Relation`.

    ``table`` means ``public.table``; unquoted parts are folded to lower case as PostgreSQL does
    (:func:`fold_identifier`: ASCII letters only);
    double-quoted parts are verbatim, ``""`` standing for one quote: ``"My Schema"."T.1"``.

    :raises ConfigError: empty text, an empty part, an unterminated quote, more than two parts or
        characters an unquoted identifier cannot hold.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("relation name is empty (expected [schema.]table)")
    source = text.strip()
    parts: List[str] = []
    pos = 0
    while True:
        if pos < len(source) and source[pos] == '"':
            end = pos + 1
            chars: List[str] = []
            while True:
                quote = source.find('"', end)
                if quote < 0:
                    raise ConfigError("relation %r: unterminated double quote" % text)
                chars.append(source[end:quote])
                if source.startswith('"', quote + 1):
                    chars.append('"')
                    end = quote + 2
                    continue
                pos = quote + 1
                break
            part = "".join(chars)
            if not part:
                raise ConfigError("relation %r: empty quoted identifier" % text)
        else:
            match = _UNQUOTED.match(source, pos)
            if not match:
                raise ConfigError("relation %r: invalid identifier at position %d (expected [schema.]table;"
                                  " double-quote names with other characters)" % (text, pos + 1))
            part = fold_identifier(match.group(0))
            pos = match.end()
        parts.append(part)
        if pos == len(source):
            break
        if source[pos] != ".":
            raise ConfigError("relation %r: unexpected %r at position %d" % (text, source[pos], pos + 1))
        pos += 1
    if len(parts) > 2:
        raise ConfigError("relation %r has %d parts; expected [schema.]table" % (text, len(parts)))
    if len(parts) == 1:
        return Relation("public", parts[0])
    return Relation(parts[0], parts[1])


@dataclass(frozen=True)
class Column:
    """One column of a relation.

    :ivar name: the column name, as stored.
    :ivar type_name: ``format_type(atttypid, -1)``: the type without its modifier as quoted,
        qualified SQL, usable in a cast (``bpchar``, not ``character``, which means ``character(1)``).
    :ivar not_null: ``attnotnull``.
    :ivar has_default: ``atthasdef`` (a default or an identity/generated expression).
    :ivar is_array: the type is an array (``typcategory = 'A'``).
    :ivar is_json: the type (or the base of its domain) is ``json`` or ``jsonb``; for an array
        column, whether its elements are (an array of a domain over jsonb: yes).
    :ivar identity: ``attidentity``: ``""``, ``"a"`` (GENERATED ALWAYS) or ``"d"`` (BY DEFAULT).
    :ivar generated: ``attgenerated == "s"``: a stored generated column, never written.
    :ivar base_type: ``format_type(typid, -1)`` of the base type of a domain (recursively), of the
        column's own type otherwise; ``""`` when unknown (a :class:`Column` built by hand), read
        as :attr:`type_name`.
    :ivar text_input: an explicit cast of ``text`` to the base type is the type's input function
        (``pg_cast`` has no cast function from text to it, as it has for ``regclass``, ``name``,
        ``"char"`` and ``xml``).
    :ivar deterministic: the column's collation (if any) is deterministic: equal strings are
        equal texts (``pg_collation.collisdeterministic``).
    :ivar structure: what a JSON object means for the base type (for an array column, its element
        type): ``"composite"`` (``typtype = 'c'``: fields by name), ``"hstore"`` (the extension's
        type: keys to text values), ``""`` for any other type.
    :ivar element_type: for an array column, ``format_type`` of its element type, domains resolved
        (``integer`` for an array of a domain over integer); ``""`` otherwise.
    """

    name: str
    type_name: str
    not_null: bool = False
    has_default: bool = False
    is_array: bool = False
    is_json: bool = False
    identity: str = ""
    generated: bool = False
    base_type: str = ""
    text_input: bool = True
    deterministic: bool = True
    structure: str = ""
    element_type: str = ""

    @property
    def base(self) -> str:
        """:attr:`base_type`, or :attr:`type_name` when it is unknown."""
        return self.base_type or self.type_name

    @property
    def element(self) -> str:
        """An array column's element type: :attr:`element_type`, else :attr:`base` without the
        ``[]`` that ``format_type`` writes after it."""
        return self.element_type or self.base[:-2]

    @property
    def identity_always(self) -> bool:
        """GENERATED ALWAYS AS IDENTITY: writing it needs ``OVERRIDING SYSTEM VALUE``."""
        return self.identity == "a"

    @property
    def writable(self) -> bool:
        """False for stored generated columns, which INSERT and UPDATE must leave out."""
        return not self.generated


@dataclass(frozen=True)
class TableSchema:
    """What AutoSQL needs to know of a relation.

    :ivar relation: the :class:`Relation`.
    :ivar columns: column name -> :class:`Column`, in ``attnum`` order.
    :ivar primary_key: the primary key's column names (empty without a primary key).
    :ivar unique_keys: every key usable as an ``ON CONFLICT`` arbiter: the primary key first (unless
        it is DEFERRABLE), then unique constraints and non-partial, non-expression, immediate,
        valid unique indexes.
    :ivar kind: ``relkind`` (``r`` table, ``p`` partitioned, ``f`` foreign, ``v`` view).
    """

    relation: Relation
    columns: Mapping[str, Column]
    primary_key: Tuple[str, ...] = ()
    unique_keys: Tuple[Tuple[str, ...], ...] = ()
    kind: str = "r"
    #: the unique keys declared ``NULLS NOT DISTINCT`` (PostgreSQL 15): a NULL in them conflicts
    nulls_not_distinct: Tuple[Tuple[str, ...], ...] = ()
    #: columns an immediate unique index or exclusion constraint reads (key, expression or
    #: predicate, the primary key's too), the relation's or a partition's or inheritance child's
    #: (every column of a view or foreign table): PostgreSQL checks those as each row is written,
    #: so whether a statement changing several rows passes may depend on the order it visits them
    checked_columns: FrozenSet[str] = frozenset()
    #: the events (``"update"``, ``"delete"``) the relation has a ``DO INSTEAD`` rule for: its
    #: statements' row counts do not say which rows matched, and PostgreSQL refuses ``RETURNING``
    #: on them unless an unconditional such rule returns rows (a rule-based view, a ``DO INSTEAD
    #: NOTHING`` archive table)
    instead_rules: FrozenSet[str] = frozenset()
    _folded: Dict[str, Tuple[Column, ...]] = field(default_factory=dict, init=False, repr=False,
                                                    compare=False)
    #: packet key tuple -> AutoSQL's resolution of it (``golconde.handlers.autosql.resolve``)
    resolved: Dict[Tuple[str, ...], Any] = field(default_factory=dict, init=False, repr=False,
                                                 compare=False)
    #: (action, data keys, restriction keys) -> AutoSQL's cached plan for packets of that shape
    plans: Dict[Tuple[Any, ...], Any] = field(default_factory=dict, init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        folded: Dict[str, List[Column]] = {}
        for column in self.columns.values():
            folded.setdefault(column.name.lower(), []).append(column)
        self._folded.update({key: tuple(value) for key, value in folded.items()})

    def find(self, key: str) -> Tuple[Column, ...]:
        """Columns a packet key names: the exact match, else every case-insensitive match
        (none: unknown; more than one: ambiguous)."""
        column = self.columns.get(key)
        if column is not None:
            return (column,)
        return self._folded.get(key.lower(), ())


#: The relation, and the events of its ``DO INSTEAD`` rules that AutoSQL writes through
#: (pg_rewrite's ev_type: 2 update, 4 delete; a view's own 1, its SELECT, aside).
_RELATION_SQL = """
SELECT c.oid, c.relkind,
       ARRAY(SELECT CASE r.ev_type WHEN '2' THEN 'update' ELSE 'delete' END
               FROM pg_catalog.pg_rewrite r
              WHERE r.ev_class = c.oid AND r.is_instead AND r.ev_type IN ('2', '4'))
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %s AND c.relname = %s
"""

# The base type of a domain (recursively), then its element type if it is an array.
# format_type(..., -1), not NULL: without a typmod "character" and "bit" mean character(1) and
# bit(1), so a cast to them would truncate; -1 gives the unbounded "bpchar" and "bit".
_COLUMNS_SQL = """
WITH RECURSIVE chain (attnum, typid, depth) AS (
    SELECT a.attnum, a.atttypid, 0
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT chain.attnum, t.typbasetype, chain.depth + 1
      FROM chain JOIN pg_catalog.pg_type t ON t.oid = chain.typid
     WHERE t.typtype = 'd' AND chain.depth < 32
), base AS (
    SELECT DISTINCT ON (attnum) attnum, typid FROM chain ORDER BY attnum, depth DESC
), element (attnum, typid, depth) AS (     -- the base's element type if an array, through domains
    SELECT base.attnum, CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE t.oid END, 0
      FROM base JOIN pg_catalog.pg_type t ON t.oid = base.typid
    UNION ALL
    SELECT element.attnum, t.typbasetype, element.depth + 1
      FROM element JOIN pg_catalog.pg_type t ON t.oid = element.typid
     WHERE t.typtype = 'd' AND element.depth < 32
), structure AS (
    SELECT DISTINCT ON (attnum) attnum, typid FROM element ORDER BY attnum, depth DESC
)
SELECT a.attname,
       pg_catalog.format_type(a.atttypid, -1),
       a.attnotnull,
       a.atthasdef,
       bt.typcategory = 'A',
       st.oid IN ('pg_catalog.json'::pg_catalog.regtype, 'pg_catalog.jsonb'::pg_catalog.regtype),
       a.attidentity::text,
       a.attgenerated::text,
       pg_catalog.format_type(base.typid, -1),
       NOT EXISTS (SELECT 1 FROM pg_catalog.pg_cast pc
                    WHERE pc.castsource = 'pg_catalog.text'::pg_catalog.regtype
                      AND pc.casttarget = base.typid AND pc.castmethod = 'f'),
       COALESCE((SELECT co.collisdeterministic FROM pg_catalog.pg_collation co
                  WHERE co.oid = a.attcollation), true),
       CASE WHEN st.typtype = 'c' THEN 'composite'
            WHEN st.typtype = 'b' AND st.typname = 'hstore' THEN 'hstore' ELSE '' END,
       CASE WHEN bt.typcategory = 'A' THEN pg_catalog.format_type(st.oid, -1) ELSE '' END
  FROM pg_catalog.pg_attribute a
  JOIN base ON base.attnum = a.attnum
  JOIN pg_catalog.pg_type bt ON bt.oid = base.typid
  JOIN structure ON structure.attnum = a.attnum
  JOIN pg_catalog.pg_type st ON st.oid = structure.typid
 WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""

# Key columns only (not INCLUDE columns); partial and expression indexes can be no arbiter of
# ON CONFLICT, nor can deferrable constraints (not indimmediate) or invalid indexes. A deferrable
# primary key is still the primary key (its values are back-filled and fanned out), and so is one
# whose index is not valid yet (a partitioned table's key added with ALTER TABLE ONLY, as pg_dump
# does, until every partition's index is attached).
_KEYS_SQL = """
SELECT i.indisprimary, i.indimmediate AND i.indisvalid,
       -- PostgreSQL 15's NULLS NOT DISTINCT (read through jsonb: no such column before 15)
       COALESCE((pg_catalog.to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false),
       ARRAY(SELECT a.attname
               FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k (attnum, ord)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE k.ord <= i.indnkeyatts
              ORDER BY k.ord)
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
 WHERE i.indrelid = %(oid)s AND i.indisunique
   AND i.indpred IS NULL AND i.indexprs IS NULL
 ORDER BY i.indisprimary DESC,
          EXISTS (SELECT 1 FROM pg_catalog.pg_constraint con WHERE con.conindid = i.indexrelid
                     AND con.conrelid = i.indrelid) DESC,
          ic.relname
"""


# The columns of the immediate (not DEFERRABLE) unique indexes and exclusion constraints of the
# relation and of its partitions and inheritance children (an UPDATE of the parent writes them),
# by name: their key columns, and those their expressions and predicates read (pg_depend). An
# index on a whole-row expression is not seen.
#: ``tree (oid)``: the relation ``{root}`` and its partitions and inheritance children, at any
#: depth, each step by its index (OFFSET 0 keeps the planner from scanning the catalogs whole).
_TREE_SQL = ("WITH RECURSIVE tree (oid) AS (SELECT {root} UNION SELECT h.inhrelid"
             " FROM tree CROSS JOIN LATERAL (SELECT h.inhrelid FROM pg_catalog.pg_inherits h"
             " WHERE h.inhparent = tree.oid OFFSET 0) h)")

_CHECKED_SQL = _TREE_SQL.format(root="%(oid)s::pg_catalog.oid") + """
SELECT a.attname
  FROM tree
 CROSS JOIN LATERAL (SELECT i.* FROM pg_catalog.pg_index i WHERE i.indrelid = tree.oid OFFSET 0) i
  JOIN pg_catalog.pg_attribute a ON a.attrelid = tree.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE (i.indisunique OR i.indisexclusion) AND i.indimmediate
   AND (a.attnum = ANY (i.indkey::int2[])
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                      AND d.objid = i.indexrelid
                      AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                      AND d.refobjid = tree.oid AND d.refobjsubid = a.attnum))
UNION
-- a foreign partition: what its server checks is not known (NULL: every column)
SELECT NULL FROM tree JOIN pg_catalog.pg_class r ON r.oid = tree.oid WHERE r.relkind = 'f'
"""


#: The privileges a statement of each action needs (on some column, for INSERT, UPDATE and
#: SELECT: column grants count; DELETE is granted on the table only). ``set`` is INSERT ... ON
#: CONFLICT DO UPDATE; ``update`` and ``delete`` read their WHERE columns; RETURNING reads too.
ACTION_PRIVILEGES = {"add": ("INSERT",), "set": ("INSERT", "UPDATE"), "update": ("UPDATE", "SELECT"),
                     "delete": ("DELETE", "SELECT")}


def missing_privileges(cursor: Any, relation: Relation, privileges: Sequence[str]) -> List[str]:
    """What the current role lacks to use ``relation`` at all: ``USAGE on schema s``, and each of
    ``privileges`` (``INSERT``, ``UPDATE``, ``SELECT``, ``DELETE``...) held on no column of it,
    e.g. ``["INSERT on public.items"]``; ``[]`` when it has them all, or when the relation does
    not exist (another error says so). One catalog query; for telling a role's missing grant,
    which fails every packet, from a packet refused by a row-level security policy (SQLSTATE
    42501 both).
    """
    cursor.execute(
        "SELECT has_schema_privilege(n.oid, 'USAGE'), ARRAY(SELECT p FROM unnest(%s::text[]) p"
        "  WHERE NOT CASE WHEN p IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')"
        "   THEN has_any_column_privilege(c.oid, p) ELSE has_table_privilege(c.oid, p) END)"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s", (list(privileges), relation.schema, relation.name))
    row = cursor.fetchone()
    if row is None:
        return []
    usage, lacking = row
    return ((["USAGE on schema %s" % quote_name(relation.schema)] if not usage else [])
            + ["%s on %s" % (privilege, relation) for privilege in lacking])


def read_schema(cursor: Any, relation: Relation) -> TableSchema:
    """Read ``relation``'s columns and keys from pg_catalog with ``cursor``.

    :raises SchemaError: the relation does not exist, or is not a table, view or foreign table.
    """
    cursor.execute(_RELATION_SQL, (relation.schema, relation.name))
    row = cursor.fetchone()
    if row is None:
        raise SchemaError("relation %s does not exist" % relation)
    oid, kind, instead = row
    if kind not in WRITABLE_RELKINDS:
        raise SchemaError("relation %s is not a table, view or foreign table (relkind %s)" % (relation, kind))
    cursor.execute(_COLUMNS_SQL, {"oid": oid})
    columns: Dict[str, Column] = {}
    for (name, type_name, not_null, has_default, is_array, is_json, identity, generated,
         base_type, text_input, deterministic, structure, element_type) in cursor.fetchall():
        columns[name] = Column(name=name, type_name=type_name, not_null=bool(not_null),
                               has_default=bool(has_default), is_array=bool(is_array),
                               is_json=bool(is_json), identity=identity or "",
                               generated=(generated == "s"), base_type=base_type,
                               text_input=bool(text_input), deterministic=bool(deterministic),
                               structure=structure or "", element_type=element_type or "")
    if kind in ("v", "f"):
        # what a view or a foreign table writes checks is not known here: every column
        checked_columns = frozenset(columns)
    else:
        cursor.execute(_CHECKED_SQL, {"oid": oid})
        names = [name for name, in cursor.fetchall()]
        checked_columns = frozenset(columns) if None in names else frozenset(names)
    cursor.execute(_KEYS_SQL, {"oid": oid})
    primary_key: Tuple[str, ...] = ()
    unique_keys: List[Tuple[str, ...]] = []
    nulls_not_distinct: List[Tuple[str, ...]] = []
    for is_primary, arbiter, not_distinct, names in cursor.fetchall():
        key = tuple(names)
        if is_primary:
            primary_key = key
        if not key or key in unique_keys or not arbiter:
            continue
        unique_keys.append(key)
        if not_distinct:
            nulls_not_distinct.append(key)
    LOGGER.debug("read schema of %s: %d columns, primary key %s, %d unique keys",
                 relation, len(columns), primary_key or "none", len(unique_keys))
    return TableSchema(relation=relation, columns=columns, primary_key=primary_key,
                       unique_keys=tuple(unique_keys), kind=kind,
                       nulls_not_distinct=tuple(nulls_not_distinct), checked_columns=checked_columns,
                       instead_rules=frozenset(instead))


@dataclass
class _Entry:
    schema: TableSchema
    read_at: float                  # clock time of the read
    signature: Optional[str]        # _SIGNATURE_SQL then
    checked_at: float               # clock time the signature was last compared


#: What a cached schema depends on, as one md5: each column's name, type, typmod, identity,
#: generation, NOT NULL and dropped flag, each index's columns and kind, and its update and
#: delete rules. Any ALTER TABLE that
#: changes what AutoSQL builds changes it (a type changed without an error, as integer to numeric,
#: would otherwise have its values cast to the old type: 1.5 stored as 2).
_SIGNATURE_SQL = (
    "SELECT md5(coalesce((SELECT string_agg(a.attname || ' ' || a.atttypid || ' ' || a.atttypmod"
    "  || ' ' || a.attidentity::text || a.attgenerated::text || a.attnotnull::text"
    "  || a.attisdropped::text, ','"
    "  ORDER BY a.attnum) FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0), '')"
    # the indexes of its partitions and inheritance children too (TableSchema.checked_columns),
    # and their kinds (a foreign partition attached: every column checked)
    " || '|' || coalesce((" + _TREE_SQL.format(root="c.oid") +
    "  SELECT string_agg(p.x, ',' ORDER BY p.x) FROM ("
    "   SELECT r.oid::text || r.relkind::text FROM tree JOIN pg_catalog.pg_class r ON r.oid = tree.oid"
    "   UNION ALL SELECT i.indexrelid::text || ' ' || i.indkey::text || ' '"
    "  || i.indisunique::text || i.indisprimary::text || i.indisvalid::text || i.indimmediate::text"
    "   FROM tree CROSS JOIN LATERAL (SELECT i.* FROM pg_catalog.pg_index i"
    "   WHERE i.indrelid = tree.oid OFFSET 0) i) AS p (x)), '')"
    " || '|' || c.relkind::text"
    # its update and delete rules (TableSchema.instead_rules: a rule made or dropped since)
    " || '|' || coalesce((SELECT string_agg(r.oid::text || r.ev_type::text || r.is_instead::text, ','"
    "  ORDER BY r.oid) FROM pg_catalog.pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type IN ('2', '4')), ''))"
    " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %s AND c.relname = %s")


class SchemaCache:
    """:class:`TableSchema` per :class:`Relation`, shared safely between listener threads.

    :param clock: a monotonic clock in seconds (for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: Dict[Relation, _Entry] = {}

    def get(self, cursor: Any, relation: Relation) -> TableSchema:
        """The cached schema of ``relation``, read with ``cursor`` if not cached.

        :raises SchemaError: as :func:`read_schema`.
        """
        with self._lock:
            entry = self._entries.get(relation)
        if entry is not None:
            return entry.schema
        return self._read(cursor, relation)

    def revalidate(self, cursor: Any, relation: Relation, interval: float = 1.0) -> bool:
        """At most every ``interval`` seconds per relation, compare the catalog's signature of
        ``relation`` (:data:`_SIGNATURE_SQL`, one small query) with the cached schema's, and
        forget the schema when they differ (the next :meth:`get` reads it again). So an ALTER
        TABLE that makes no statement fail (a column's type widened) is seen within
        ``interval`` seconds (``interval=0``: now). Nothing is done for a relation not cached.

        :returns: whether the cached schema was forgotten (it differed from the catalog).
        :raises psycopg2.Error: the query failed (the caller's transaction is then aborted).
        """
        with self._lock:
            entry = self._entries.get(relation)
            if entry is None or self._clock() - entry.checked_at < interval:
                return False
            entry.checked_at = self._clock()
        if _signature(cursor, relation) != entry.signature:
            LOGGER.info("the schema of %s changed since it was read: reading it again", relation)
            with self._lock:
                if self._entries.get(relation) is entry:
                    del self._entries[relation]
            return True
        return False

    def refresh_if_stale(self, cursor: Any, relation: Relation, min_age_seconds: float = 1.0,
                         check_catalog: bool = False) -> TableSchema:
        """Re-read ``relation`` if its cached schema is at least ``min_age_seconds`` old (or absent),
        or, with ``check_catalog``, if the catalog's signature of it changed since it was read
        (:data:`_SIGNATURE_SQL`, one small query: catches a column added less than
        ``min_age_seconds`` ago); otherwise return the cached one. Used when a packet names a
        column the cache does not know.

        :raises SchemaError: as :func:`read_schema`.
        """
        with self._lock:
            entry = self._entries.get(relation)
        if entry is not None and self._clock() - entry.read_at < min_age_seconds:
            if not check_catalog or _signature(cursor, relation) == entry.signature:
                return entry.schema
        LOGGER.debug("re-reading the schema of %s (a packet names a column it does not know)", relation)
        return self._read(cursor, relation)

    def invalidate(self, relation: Optional[Relation] = None) -> None:
        """Forget ``relation`` (every relation when ``None``); the next :meth:`get` reads the catalog."""
        with self._lock:
            if relation is None:
                self._entries.clear()
            else:
                self._entries.pop(relation, None)
        LOGGER.debug("schema cache invalidated for %s", relation if relation is not None else "all relations")

    def _read(self, cursor: Any, relation: Relation) -> TableSchema:
        signature = _signature(cursor, relation)   # first: a change meanwhile shows later
        schema = read_schema(cursor, relation)
        now = self._clock()
        with self._lock:
            self._entries[relation] = _Entry(schema, now, signature, now)
        return schema


def _signature(cursor: Any, relation: Relation) -> Optional[str]:
    """:data:`_SIGNATURE_SQL` of ``relation`` (``None`` when it does not exist)."""
    cursor.execute(_SIGNATURE_SQL, (relation.schema, relation.name))
    row = cursor.fetchone()
    return row[0] if row else None
