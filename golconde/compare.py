"""Compare a canonical relation with a target relation: row count plus an order-independent hash.

Algorithm (after Skytools ``londiste compare``, which compares ``count(*)`` and a sum of row
hashes on both sides):

1. The compared columns are those present in both relations (matched by name, or through the
   target's mapping: see :func:`compare`), in the canonical relation's column order; columns only
   on one side are ignored (a target may hold a subset).
2. On each side, in one statement (one snapshot)::

       SELECT count(*),
              coalesce(sum(('x' || substr(md5(convert_to(ROW(c1, c2, ...)::text, 'UTF8')),
                                          1, 15))::bit(60)::bigint::numeric), 0)
       FROM relation

   i.e. each row's text form (columns in the canonical order), as UTF-8 whatever the database's
   encoding, is hashed with md5, its first
   60 bits are read as a non-negative integer, and these are summed as ``numeric`` (no overflow).
   A sum is independent of row order and of physical layout. The row text form quotes its fields,
   so NULL (``()``) differs from an empty string (``("")``).
3. The relations are equal when both counts and both sums are equal.
4. When they are not, and ``rows`` asks for it, the differing rows are found by key
   (:func:`_differing`): on each side the canonical primary key's values as text and each row's
   hash, ordered by those texts' UTF-8 bytes (``convert_to(text, 'UTF8')``: the same order on both
   sides whatever their collations and encodings, and Python's order of the strings), NULL last,
   merged: a key whose hashes differ, or that one side lacks, is listed.

Both sessions first set ``TimeZone = UTC``, ``DateStyle = ISO, YMD``, ``IntervalStyle = postgres``,
``extra_float_digits = 1`` and ``bytea_output = hex``, so that a row's text does not depend on
either server's defaults. Values are compared by their text form: the same value in columns of
different types (``numeric(10,2)`` 1.50 against ``numeric`` 1.5, ``timestamp`` against
``timestamptz``) counts as a difference. Rows changing while the comparison runs (packets in
flight) also show as differences: compare when the queues are drained, or compare again.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import psycopg2
from psycopg2 import sql

from .errors import ConfigError, GolcondeError, describe
from .mapping import Verdict
from .packet import loads
from .schema import Relation, parse_relation

LOGGER = logging.getLogger(__name__)

#: Session settings that make a row's text form independent of server defaults.
SESSION_SETTINGS = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
)


class CompareError(GolcondeError):
    """A comparison cannot be made (unknown relation, no column in common)."""


@dataclass(frozen=True)
class CompareResult:
    """Outcome of :func:`compare`.

    :ivar equal: counts and hashes both equal (False when ``error`` is set).
    :ivar canonical_count: rows in the canonical relation (``None`` after an error).
    :ivar target_count: rows in the target relation (``None`` after an error).
    :ivar canonical_hash: sum of the 60-bit row hashes, canonical side (``None`` after an error).
    :ivar target_hash: the same on the target side.
    :ivar columns: the compared columns, in canonical order.
    :ivar ignored: columns present in only one of the relations (not compared), a mapping's
        excluded, constants' and defaults' columns included.
    :ivar canonical_only: canonical columns not compared because the target lacks them (not
        those a mapping excludes).
    :ivar target_only: target columns no canonical column is written to (not a mapping's
        constants' and defaults' columns).
    :ivar error: why the comparison could not be made (only from :func:`compare_config`).
    :ivar skipped: why the pair was not compared (only from :func:`compare_config`: a target
        whose custom handler writes it its own way).
    :ivar rows: the differing rows found (at most the ``rows`` asked of :func:`compare`), each
        ``(what, {canonical key column: value as text})``, ``what`` being ``"differs"``,
        ``"missing at the target"`` or ``"only at the target"``.
    :ivar rows_note: why the differing rows were not listed (no primary key...), or that there
        are more than those listed.
    """

    equal: bool
    canonical_count: Optional[int]
    target_count: Optional[int]
    canonical_hash: Optional[int]
    target_hash: Optional[int]
    columns: Tuple[str, ...]
    ignored: Tuple[str, ...] = ()
    error: Optional[str] = None
    skipped: Optional[str] = None
    rows: Tuple[Tuple[str, Dict[str, str]], ...] = ()
    rows_note: Optional[str] = None
    canonical_only: Tuple[str, ...] = ()
    target_only: Tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for an operator, e.g. ``equal: 120 rows`` or ``DIFFERENT: 120 vs 119 rows``."""
        if self.skipped:
            return "not compared: %s" % self.skipped
        if self.error:
            return "ERROR: %s" % self.error
        if self.equal:
            return "equal: %d rows" % self.canonical_count
        if self.canonical_count != self.target_count:
            return "DIFFERENT: %d vs %d rows" % (self.canonical_count, self.target_count)
        return "DIFFERENT: %d rows each, hashes %d vs %d" % (
            self.canonical_count, self.canonical_hash, self.target_hash)


def compare(canonical_dsn: str, canonical_relation: str, target_dsn: str,
            target_relation: str, mapping: Any = None, rows: int = 0) -> CompareResult:
    """Compare ``canonical_relation`` in database ``canonical_dsn`` with ``target_relation`` in
    ``target_dsn`` (see the module documentation for the algorithm). Opens and closes its own
    read-only connections.

    :param canonical_relation: ``[schema.]table`` (a missing schema means ``public``).
    :param mapping: the target's :class:`~golconde.mapping.TargetMapping`, if any: each canonical
        column is compared with the target column it is renamed to; excluded columns, constants'
        and ``defaults`` columns are not compared; the canonical side counts only the rows its
        filter lets through, judged as the daemon judges packets (:func:`_digest_filtered`).
    :param rows: when the relations differ, list at most this many differing rows by the
        canonical relation's primary key (:attr:`CompareResult.rows`; 0: none).
    :returns: a :class:`CompareResult`.
    :raises CompareError: a relation does not exist or cannot be parsed, or no column in common.
    :raises psycopg2.Error: connection or query failure.
    :raises PacketError: the filter cannot order a row's value (as the daemon would dead-letter
        that row's packet).
    """
    canonical = _parse(canonical_relation)
    target = _parse(target_relation)
    with _connect(canonical_dsn) as canonical_conn, _connect(target_dsn) as target_conn:
        canonical_columns = _columns(canonical_conn, canonical)
        target_columns = _columns(target_conn, target)
        pairs = _pairs(canonical_columns, target_columns, mapping)
        common = tuple(name for name, _ in pairs)
        compared_targets = {name for _, name in pairs}
        # what a mapping leaves out on purpose (excluded, constants, defaults) is not listed,
        # its names matched as the daemon matches them
        canonical_only = tuple(name for name in canonical_columns if name not in common
                               and not (mapping is not None and (
                                   mapping.excluded(name)
                                   or mapping.written_by_mapping(mapping.rename(name)))))
        target_only = tuple(name for name in target_columns if name not in compared_targets
                            and not (mapping is not None and mapping.written_by_mapping(name)))
        ignored = tuple([name for name in canonical_columns if name not in common]
                        + [name for name in target_columns if name not in compared_targets])
        if not common:
            raise CompareError("%s and %s have no column in common" % (canonical, target))
        if mapping is not None and mapping.conditions:
            canonical_count, canonical_hash = _digest_filtered(canonical_conn, canonical, common,
                                                               canonical_columns, mapping)
        else:
            canonical_count, canonical_hash = _digest(canonical_conn, canonical, common)
        target_count, target_hash = _digest(target_conn, target, tuple(name for _, name in pairs))
        equal = canonical_count == target_count and canonical_hash == target_hash
        listed: Tuple[Tuple[str, Dict[str, str]], ...] = ()
        note = None
        if not equal and rows > 0:
            listed, note = _differing(canonical_conn, canonical, canonical_columns, target_conn,
                                      target, pairs, mapping, rows)
    result = CompareResult(equal, canonical_count, target_count, canonical_hash, target_hash,
                           common, ignored, rows=listed, rows_note=note,
                           canonical_only=canonical_only, target_only=target_only)
    LOGGER.info("compare %s with %s: %s", canonical, target, result.summary())
    return result


def compare_config(config: Any, destination_name: Optional[str] = None,
                   handlers: bool = False, rows: int = 0) -> List[Tuple[str, str, CompareResult]]:
    """Compare every destination's canonical relation (or only ``destination_name``'s) with each
    of its targets, through each target's mapping where it has one. A target with a custom
    handler (``function_name`` other than AutoSQL) writes its relation its own way (other
    columns, other tables): it is not compared (``skipped``) unless ``handlers`` is true, and
    then compared as an AutoSQL target would be (for a handler that writes the same rows).

    :param config: an object with ``.destinations`` (a sequence, or a mapping of name to
        destination); each destination has ``.name``, ``.pgsql`` (DSN), ``.target`` (relation) and
        ``.targets`` (sequence or mapping; may be empty), each target ``.name``, ``.pgsql``,
        ``.target``.
    :param rows: as for :func:`compare`.
    :returns: ``[(destination name, target name, CompareResult), ...]`` in configuration order.
        A pair that cannot be compared (database unreachable, relation missing...) is reported
        with ``equal=False`` and ``error`` set, and the other pairs are still compared.
    """
    results = []
    for destination in _values(config.destinations):
        if destination_name is not None and destination.name != destination_name:
            continue
        for target in _values(getattr(destination, "targets", None)):
            handler = getattr(target, "function_name", "AutoSQL")
            try:
                if _custom(handler) and not handlers:      # ConfigError: it cannot be loaded
                    result = CompareResult(False, None, None, None, None, (), skipped=(
                        "handler %s writes %s its own way (--handlers compares it column by"
                        " column all the same)" % (handler, target.target)))
                else:
                    result = compare(destination.pgsql, destination.target, target.pgsql,
                                     target.target, getattr(target, "mapping", None) or None,
                                     rows=rows)
            except (GolcondeError, psycopg2.Error) as exc:
                # the result carries it (the CLI prints it once, as the pair's line)
                LOGGER.info("destination %s, target %s: cannot compare: %s", destination.name,
                            target.name, describe(exc))
                result = CompareResult(False, None, None, None, None, (), (), describe(exc))
            except Exception as exc:    # a bug: this pair's error, the other pairs compared
                LOGGER.exception("destination %s, target %s: cannot compare", destination.name,
                                 target.name)
                result = CompareResult(False, None, None, None, None, (), (),
                                       "internal error: %s" % describe(exc))
            results.append((destination.name, target.name, result))
    return results


def _custom(function_name: str) -> bool:
    """True for a handler other than AutoSQL itself (a subclass too: it may write other
    columns or tables).

    :raises ConfigError: the handler cannot be loaded.
    """
    from .handlers import load_handler
    from .handlers.autosql import AutoSQL
    return load_handler(function_name) is not AutoSQL


def _values(items: Any) -> Iterable[Any]:
    if items is None:
        return ()
    return list(items.values()) if hasattr(items, "values") else list(items)


def _parse(relation: str) -> Relation:
    try:
        return parse_relation(relation)
    except ConfigError as exc:
        raise CompareError(str(exc)) from None


class _connect:
    """Context manager: a read-only autocommit connection with deterministic text output."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    def __enter__(self) -> Any:
        self.conn = psycopg2.connect(self.dsn)
        try:
            self.conn.set_session(readonly=True, autocommit=True)
            with self.conn.cursor() as cur:
                for name, value in SESSION_SETTINGS:
                    cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        except BaseException:
            self.conn.close()
            raise
        return self.conn

    def __exit__(self, *exc_info: Any) -> None:
        self.conn.close()


def _pairs(canonical: Sequence[str], target: Sequence[str],
           mapping: Any) -> List[Tuple[str, str]]:
    """``[(canonical column, target column), ...]`` to compare, in canonical order: the same
    name, or, with a mapping, the name it is renamed to (matched exactly, else
    case-insensitively), leaving out excluded columns and the target's constant and default
    columns."""
    exact = set(target)
    folded: Dict[str, str] = {}
    for name in target:
        folded.setdefault(name.lower(), name)
    pairs = []
    for name in canonical:
        if mapping is None:
            if name in exact:
                pairs.append((name, name))
            continue
        if mapping.excluded(name):
            continue
        wanted = mapping.rename(name)
        found = wanted if wanted in exact else folded.get(wanted.lower())
        if found is not None and not mapping.written_by_mapping(found):
            pairs.append((name, found))
    return pairs


def _columns(conn: Any, relation: Relation) -> Tuple[str, ...]:
    """Column names of ``relation`` in order (dropped and system columns excluded)."""
    with conn.cursor() as cur:
        cur.execute("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = %s AND c.relname = %s"
                    " AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                    (relation.schema, relation.name))
        row = cur.fetchone()
        if row is None:
            raise CompareError("relation %s does not exist (database %s)"
                               % (relation, conn.info.dbname))
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
                    " AND NOT attisdropped ORDER BY attnum", (row[0],))
        return tuple(name for (name,) in cur.fetchall())


def _bytes(conn: Any) -> sql.Literal:
    """The encoding a text is hashed and ordered in (``convert_to(text, this)``): UTF-8, the same
    bytes whatever each database's encoding; in a ``SQL_ASCII`` database, which holds bytes in no
    known encoding (not always valid UTF-8: converting them would fail), its bytes as they are."""
    encoding = conn.get_parameter_status("server_encoding")
    return sql.Literal("SQL_ASCII" if encoding == "SQL_ASCII" else "UTF8")


def _row_hash(conn: Any, columns: Sequence[str]) -> sql.Composed:
    """The 60-bit hash of a row's text over ``columns`` (see the module docstring)."""
    return sql.SQL("('x' || substr(md5(pg_catalog.convert_to(ROW({})::text, {})), 1, 15))"
                   "::bit(60)::bigint").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in columns), _bytes(conn))


#: Rows fetched per round trip by :func:`_digest_filtered`.
FETCH_ROWS = 5000


def _digest_filtered(conn: Any, relation: Relation, columns: Tuple[str, ...],
                     all_columns: Sequence[str], mapping: Any) -> Tuple[int, int]:
    """``(count, sum of 60-bit row hashes)`` of ``columns`` of the rows of ``relation`` that the
    target mapping's filter lets through, judged exactly as the daemon judges a packet
    (:meth:`golconde.mapping.TargetMapping.verdict` on the filter columns' values, as
    ``to_jsonb`` writes them, as the capture trigger does): each row's hash and those values are
    read (a server-side cursor, :data:`FETCH_ROWS` at a time) and summed here. ``all_columns``:
    every column of ``relation``, where the filter's columns are looked for."""
    query = sql.SQL("SELECT {}, {} FROM {}").format(
        _row_hash(conn, columns), _filter_values(relation, all_columns, mapping),
        sql.Identifier(relation.schema, relation.name))
    count = total = 0
    with _read_transaction(conn), conn.cursor(name="golconde_compare") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query)
        for row_hash, text in cur:
            if mapping.verdict(loads(text)) is Verdict.MATCH:
                count += 1
                total += int(row_hash)
    return count, total


def _filter_values(relation: Relation, all_columns: Sequence[str], mapping: Any) -> sql.Composed:
    """``jsonb_build_object('col', col, ...)::text`` of the columns of ``relation`` (among
    ``all_columns``, matched case-insensitively) that the mapping's filter names, for
    :meth:`golconde.mapping.TargetMapping.verdict`.

    :raises CompareError: the filter names a column ``relation`` does not have.
    """
    names = {name.lower(): name for name in all_columns}
    wanted = list(dict.fromkeys(condition.column for condition in mapping.conditions))
    found = [(name, names.get(name.lower())) for name in wanted]
    missing = [name for name, column in found if column is None]
    if missing:
        raise CompareError("the filter's column %s is no column of %s" % (", ".join(missing), relation))
    return sql.SQL("pg_catalog.jsonb_build_object({})::text").format(sql.SQL(", ").join(
        sql.SQL("{}, {}").format(sql.Literal(name), sql.Identifier(column)) for name, column in found))


@contextlib.contextmanager
def _read_transaction(*conns: Any) -> Iterator[None]:
    """A transaction on each of ``conns`` (autocommit ones: server-side cursors live in a
    transaction), rolled back at the end, autocommit restored."""
    for conn in conns:
        conn.autocommit = False
    try:
        yield
    finally:
        for conn in conns:
            conn.rollback()
            conn.autocommit = True


def _primary_key(conn: Any, relation: Relation) -> Tuple[str, ...]:
    """The primary key's column names of ``relation``, in key order (``()`` without one)."""
    with conn.cursor() as cur:
        cur.execute("SELECT a.attname FROM pg_catalog.pg_index i"
                    " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, n)"
                    " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
                    " WHERE i.indrelid = pg_catalog.to_regclass(%s) AND i.indisprimary ORDER BY k.n",
                    (sql.Identifier(relation.schema, relation.name).as_string(conn),))
        return tuple(name for (name,) in cur.fetchall())


def _keyed(conn: Any, relation: Relation, keys: Sequence[str], columns: Sequence[str],
           values: Optional[sql.Composable] = None) -> Iterator[Tuple[Any, ...]]:
    """``(key, row hash, ``values``: the filter's values as JSON text, or None)`` of each row of
    ``relation``, the
    key a tuple of ``(0, text)``, or ``(1, "")`` for NULL, ordered by the texts' UTF-8 bytes,
    NULL last, as Python orders those tuples (a server-side cursor, :data:`FETCH_ROWS` at a
    time; the caller's connection, in a transaction it rolls back)."""
    texts = sql.SQL(", ").join(sql.SQL("{}::pg_catalog.text").format(sql.Identifier(name))
                               for name in keys)
    order = sql.SQL(", ").join(
        sql.SQL("pg_catalog.convert_to({}::pg_catalog.text, {}) NULLS LAST").format(
            sql.Identifier(name), _bytes(conn)) for name in keys)
    query = sql.SQL("SELECT ARRAY[{}], {}, {} FROM {} ORDER BY {}").format(
        texts, _row_hash(conn, columns), values or sql.SQL("NULL"),
        sql.Identifier(relation.schema, relation.name), order)
    with conn.cursor(name="golconde_compare_rows") as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query)
        for key, row_hash, filtered in cur:
            yield tuple((1, "") if text is None else (0, text) for text in key), row_hash, filtered


def _differing(canonical_conn: Any, canonical: Relation, canonical_columns: Sequence[str],
               target_conn: Any, target: Relation, pairs: Sequence[Tuple[str, str]], mapping: Any,
               limit: int) -> Tuple[Tuple[Tuple[str, Dict[str, str]], ...], Optional[str]]:
    """At most ``limit`` differing rows, by the canonical primary key (see the module
    documentation, step 4), and a note: why none could be listed, or that there are more."""
    keys = _primary_key(canonical_conn, canonical)
    if not keys:
        return (), "rows not listed: %s has no primary key" % canonical
    renamed = dict(pairs)
    if mapping is not None and mapping.constants:
        return (), ("rows not listed: the target is shared through constants (%s), its other"
                    " sources' rows would be listed" % ", ".join(name for name, _ in mapping.constants))
    if any(key not in renamed for key in keys):
        return (), "rows not listed: the target does not hold the whole primary key (%s)" % ", ".join(keys)
    filtered = mapping is not None and bool(mapping.conditions)
    values = _filter_values(canonical, canonical_columns, mapping) if filtered else None
    common = tuple(name for name, _ in pairs)
    found: List[Tuple[str, Dict[str, str]]] = []
    more = False
    with _read_transaction(canonical_conn, target_conn), contextlib.ExitStack() as cursors:
        # the generators' named cursors are closed before the transaction ends (a generator left
        # suspended, when more rows differ than listed, closed its cursor after the rollback:
        # "named cursor isn't valid anymore" on stderr)
        canonical_rows = cursors.enter_context(contextlib.closing(
            _keyed(canonical_conn, canonical, keys, common, values)))
        right = cursors.enter_context(contextlib.closing(
            _keyed(target_conn, target, [renamed[key] for key in keys], [name for _, name in pairs])))
        left = (row for row in canonical_rows
                if not filtered or mapping.verdict(loads(row[2])) is Verdict.MATCH)
        a, b = next(left, None), next(right, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a[0] < b[0]):
                what, key, a = "missing at the target", a[0], next(left, None)
            elif a is None or b[0] < a[0]:
                what, key, b = "only at the target", b[0], next(right, None)
            else:
                what, key = "differs", a[0]
                same = a[1] == b[1]
                a, b = next(left, None), next(right, None)
                if same:
                    continue
            if len(found) == limit:
                more = True
                break
            found.append((what, {name: "NULL" if null else text
                                 for name, (null, text) in zip(keys, key)}))
    return tuple(found), ("more rows differ than the %d listed" % limit if more else None)


def _digest(conn: Any, relation: Relation, columns: Tuple[str, ...]) -> Tuple[int, int]:
    """``(count, sum of 60-bit row hashes)`` of ``columns`` of ``relation``."""
    query = sql.SQL("SELECT count(*), coalesce(sum({}::numeric), 0) FROM {}").format(
        _row_hash(conn, columns), sql.Identifier(relation.schema, relation.name))
    with conn.cursor() as cur:
        cur.execute(query)
        count, total = cur.fetchone()
    return int(count), int(total)
