"""Trigger-based capture: install the capture trigger, and read and drain the capture queue.

The flow (see ``sql/triggers/``, which is ``golconde/triggers_sql/``)::

    canonical table --AFTER ROW trigger golconde.capture()--> golconde.queue  (same transaction)
    drain daemon: acquire_drain_lock -> fetch_batch -> confirmed persistent sends -> delete_batch

Only committed changes reach the queue, and a rolled-back change is never distributed. The daemon
deletes exactly the ids it sent (:func:`delete_batch`), never ``id <= max``: ids are taken when a
row is captured, so a transaction holding a smaller id can commit after a larger one has been
drained; the next :func:`fetch_batch` returns it. A crash between a send and the delete re-sends
the packet (at-least-once); ``packet_id`` lets a consumer recognise the duplicate.

Tables without a primary key only have INSERTs captured. TRUNCATE is not captured: delete the rows
instead (or remove the trigger first). This module knows nothing of STOMP.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import psycopg2.extensions
from psycopg2 import sql

from . import packet as packet_module
from . import schema as schema_module
from .errors import ConfigError, GolcondeError, PacketError

LOGGER = logging.getLogger(__name__)

#: Package directory holding the SQL files, and the file that lists their install order.
SQL_PACKAGE = "golconde"
SQL_DIRECTORY = "triggers_sql"
SQL_INSTALL_FILE = "install.sql"
#: What ``golconde.schema_version()`` returns once this version's SQL files are installed
#: (``schema.sql``; bump both together).
SCHEMA_VERSION = 2
#: What ``golconde.capture_version()`` of the C library must return (``CAPTURE_VERSION`` in
#: ``golconde_capture.c``, ``c_expected`` in ``capture_c.sql``; bump all three together).
CAPTURE_VERSION = 2
#: Channel notified (payload: destination name) when packets are captured.
NOTIFY_CHANNEL = "golconde"
#: Trigger name prefix; the destination name follows.
TRIGGER_PREFIX = "golconde_capture_"
#: Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes).
MAX_IDENTIFIER_BYTES = 63

_EVENTS = {"insert": "INSERT", "add": "INSERT", "update": "UPDATE", "delete": "DELETE"}
_EVENT_ORDER = ("INSERT", "UPDATE", "DELETE")


class TriggerError(GolcondeError):
    """The capture trigger cannot be installed or removed as asked (unknown table, not a table,
    no primary key for UPDATE/DELETE capture, unknown action...)."""


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did.

    :ivar relation: the table, quoted and qualified (``public.orders``).
    :ivar destination: the destination name passed to the trigger.
    :ivar trigger: the trigger's name (unquoted).
    :ivar events: captured events, among ``("INSERT", "UPDATE", "DELETE")``.
    :ivar key_columns: the primary-key columns passed to the trigger (empty without a key).
    :ivar warning: text to show the operator (e.g. no primary key: insert-only), or ``None``.
    :ivar capture: the language of ``golconde.capture()`` after the install: ``"c"`` (the library
        ``golconde_capture`` is installed in the server) or ``"plpgsql"`` (the fallback).
    """

    relation: str
    destination: str
    trigger: str
    events: Tuple[str, ...]
    key_columns: Tuple[str, ...]
    warning: Optional[str] = None
    capture: str = "plpgsql"


@dataclass(frozen=True)
class RemoveResult:
    """What :func:`remove` did: ``removed`` is False when there was nothing to remove;
    ``message`` says what happened, for the operator."""

    removed: bool
    message: str


@dataclass(frozen=True)
class QueuedPacket:
    """One captured packet read from ``golconde.queue``.

    :ivar id: queue row id (capture order); give it back to :func:`delete_batch` once sent.
    :ivar packet_id: UUID text, unique per packet (use it as the STOMP message id).
    :ivar packet: the decoded packet, a dict (fractional numbers as ``Decimal``), accepted by
        :func:`golconde.packet.parse`; ``{}`` when it could not be decoded (see ``error``).
    :ivar created_at: when the row change happened (timezone-aware).
    :ivar relation: the captured table, quoted and qualified (for a partitioned table, the partition).
    :ivar error: why the packet could not be decoded (e.g. over the size limit), else ``None``;
        such a packet can never be sent: dead-letter or log it, then delete it.
    :ivar text: the packet's JSON text as read from the queue (``None`` if it could not be decoded).
    """

    id: int
    packet_id: str
    packet: Dict[str, Any]
    created_at: datetime
    relation: str = ""
    error: Optional[str] = None
    text: Optional[str] = None

    @property
    def body(self) -> str:
        """The packet as JSON text, numbers exact (the message body to send): the text read from
        the queue when there is one (it is valid JSON: the column is json or jsonb), else
        :attr:`packet` encoded."""
        return self.text if self.text is not None else packet_module.dumps(self.packet)


# -- relations ------------------------------------------------------------------------------------

def parse_relation(relation: str) -> Tuple[str, str]:
    """``(schema, table)`` of ``"table"``, ``"schema.table"`` or quoted forms such as
    ``'"My Schema"."T.1"'``, by :func:`golconde.schema.parse_relation`'s rules (PostgreSQL's:
    unquoted parts folded to lower case, a missing schema means ``public``).

    :raises TriggerError: not of that form.
    """
    try:
        parsed = schema_module.parse_relation(relation)
    except ConfigError as exc:
        raise TriggerError(str(exc)) from None
    return parsed.schema, parsed.name


def quote_relation(schema: str, table: str) -> str:
    """``schema.table`` with each part double-quoted only where PostgreSQL needs it."""
    return str(schema_module.Relation(schema, table))


def trigger_name(destination: str) -> str:
    """The capture trigger's name for ``destination``: ``golconde_capture_<destination>``, with
    characters other than ASCII letters, digits and ``_`` replaced by ``_``; when that changed the
    name or it is longer than 63 bytes, a short hash of the destination is appended so that two
    destinations never share a trigger name."""
    if not destination:
        raise TriggerError("destination name is empty")
    clean = re.sub(r"[^A-Za-z0-9_]", "_", destination)
    name = TRIGGER_PREFIX + clean
    if clean != destination or len(name) > MAX_IDENTIFIER_BYTES:
        digest = hashlib.md5(destination.encode("utf-8")).hexdigest()[:8]
        name = "%s_%s" % (name[:MAX_IDENTIFIER_BYTES - 9], digest)
    return name


# -- schema ---------------------------------------------------------------------------------------

def sql_files() -> List[Tuple[str, str]]:
    """The SQL files of the capture schema in install order, as ``(file name, text)``, read as
    package data (``golconde/triggers_sql``, also reachable as ``sql/triggers`` in a checkout).

    :raises TriggerError: the install file or a file it names is missing.
    """
    directory = resources.files(SQL_PACKAGE).joinpath(SQL_DIRECTORY)
    try:
        order = directory.joinpath(SQL_INSTALL_FILE).read_text(encoding="utf-8")
        names = re.findall(r"^\\i[r]?\s+(\S+)\s*$", order, flags=re.MULTILINE)
        return [(name, directory.joinpath(name).read_text(encoding="utf-8")) for name in names]
    except OSError as exc:
        raise TriggerError("cannot read the capture SQL files in %s/%s: %s"
                           % (SQL_PACKAGE, SQL_DIRECTORY, exc)) from None


def install_schema(conn: psycopg2.extensions.connection) -> None:
    """Create (or upgrade in place) schema ``golconde``, table ``golconde.queue`` and functions
    ``golconde.capture_plpgsql()`` and ``golconde.capture()``, in one transaction that is
    committed. Idempotent; concurrent callers are serialized by a transaction-level advisory lock;
    waits at most 10 s for a lock on ``golconde.queue``. ``golconde.capture()`` is the C function
    of the library ``golconde_capture`` when the server has it at the expected version
    (``scripts/build-capture.sh``), else the PL/pgSQL one (``capture_c.sql`` says why, logged here;
    :func:`capture_language` tells which).

    :raises TriggerError: ``conn`` is inside a transaction, or the SQL files are missing.
    :raises psycopg2.Error: from the server (e.g. PostgreSQL older than 13, missing privileges,
        ``lock_timeout`` while upgrading the queue of an earlier version).
    """
    saved = conn.notices
    conn.notices = notices = []   # this install's notices only (psycopg2 keeps the last 50)
    try:
        with _transaction(conn) as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("install"),))
            for _, text in sql_files():
                cur.execute(text)
    finally:
        conn.notices = saved
        for notice in notices:
            saved.append(notice)
    for notice in notices:   # why golconde.capture() is not the C function
        if "golconde.capture()" in notice:
            (LOGGER.warning if notice.startswith("WARNING") else LOGGER.info)("%s", notice.strip())
    LOGGER.info("capture schema golconde installed")


def capture_language(cursor: Any) -> Optional[str]:
    """The language of ``golconde.capture()`` in the cursor's database: ``"c"``, ``"plpgsql"``,
    or ``None`` when the capture schema is not installed."""
    cursor.execute("SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
                   " WHERE p.oid = to_regprocedure('golconde.capture()')")
    row = cursor.fetchone()
    return row[0] if row else None


def schema_state(conn: psycopg2.extensions.connection) -> str:
    """How the capture schema of ``conn``'s database compares with this version's, in a
    transaction of its own: ``"missing"`` (no ``golconde.capture()`` or no ``golconde.queue``),
    ``"old"`` (a ``golconde.schema_version()`` older than :data:`SCHEMA_VERSION`, or none; a queue
    whose primary key is not ``(destination, id)``; or a C ``golconde.capture()`` whose library
    cannot be loaded or is not at :data:`CAPTURE_VERSION`, as on a standby or a restored copy
    without it), ``"plpgsql"`` (current, but the capture is in PL/pgSQL: installing again
    switches it to C if the server now has the library) or ``"current"``.

    :raises TriggerError: ``conn`` is inside a transaction.
    """
    with _transaction(conn) as cur:
        cur.execute("SELECT to_regclass('golconde.queue') IS NOT NULL,"
                    " to_regprocedure('golconde.schema_version()') IS NOT NULL")
        queue, versioned = cur.fetchone()
        language = capture_language(cur)
        if not queue or language is None:
            return "missing"
        version = 0
        if versioned:
            cur.execute("SELECT golconde.schema_version()")
            version = cur.fetchone()[0]
        if version < SCHEMA_VERSION or _primary_key(cur, "golconde", "queue") != ("destination", "id"):
            return "old"
        if language != "c":
            return "plpgsql"
        cur.execute("SAVEPOINT library")
        try:   # loads the library in this server process, if it can
            cur.execute("SELECT golconde.capture_version()")
            loaded = cur.fetchone()[0]
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT library")
            if exc.pgcode == "42501":   # this role may not look: assume it is fine
                return "current"
            LOGGER.warning("golconde.capture() is in C, but its library cannot be used here: %s",
                           first_line(exc))
            return "old"
        if loaded != CAPTURE_VERSION:
            LOGGER.warning("golconde.capture() is in C, but its library is version %s, not %d",
                           loaded, CAPTURE_VERSION)
            return "old"
        return "current"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (psycopg2 adds LINE, DETAIL and HINT lines), or
    its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- triggers -------------------------------------------------------------------------------------

def install(conn: psycopg2.extensions.connection, relation: str, destination: str,
            actions: Optional[Iterable[str]] = None) -> InstallResult:
    """Install (or replace) the capture trigger ``golconde_capture_<destination>`` on ``relation``,
    AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW, with the primary-key columns as arguments.
    First checks the table (nothing is changed when it is refused); then, in a transaction of its
    own, installs the capture schema if it is missing, or upgrades it if it is not current
    (:func:`schema_state`; the PL/pgSQL capture then switches to C if the server has the
    library, and a C one whose library cannot be used here switches back to PL/pgSQL); a failed
    upgrade (e.g. a role that does not own the schema) is logged as a warning and the trigger is
    installed on the schema as it is. Then the trigger, in a transaction of its own. Committed.

    :param relation: ``[schema.]table`` (see :func:`parse_relation`); a plain or partitioned table.
    :param actions: what to capture, among ``insert`` (or ``add``), ``update``, ``delete``;
        ``None`` means all three, or INSERT only (with a warning in the result) for a table
        without a primary key.
    :returns: an :class:`InstallResult`.
    :raises TriggerError: unknown table, not a table, unknown or no actions, UPDATE or DELETE
        asked explicitly of a table without a primary key, ``conn`` inside a transaction.
    :raises psycopg2.Error: the capture schema is missing and cannot be installed.
    """
    schema, table = parse_relation(relation)
    qualified = quote_relation(schema, table)
    events = _events(actions)
    name = trigger_name(destination)
    with _transaction(conn) as cur:   # refuse before changing anything
        keys = _table_key(cur, schema, table, qualified)
    warning = None
    if not keys and events != ("INSERT",):
        message = ("%s has no primary key: UPDATE and DELETE cannot be captured; only INSERTs"
                   " are distributed" % qualified)
        if actions is not None:
            raise TriggerError(message)
        warning, events = message, ("INSERT",)
    state = schema_state(conn)
    if state != "current":
        try:
            install_schema(conn)
        except psycopg2.Error as exc:
            if state == "missing":
                raise
            LOGGER.warning("capture schema golconde (%s) not upgraded: %s", state, first_line(exc))
    with _transaction(conn) as cur:
        keys = _table_key(cur, schema, table, qualified)
        if not keys and events != ("INSERT",):   # the key was dropped meanwhile
            raise TriggerError("%s has no primary key any more" % qualified)
        ident = sql.Identifier(schema, table)
        cur.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), ident))
        arguments = [destination] + (list(keys) if events != ("INSERT",) else [])
        cur.execute(sql.SQL("CREATE TRIGGER {} AFTER {} ON {} FOR EACH ROW"
                            " EXECUTE FUNCTION golconde.capture({})").format(
            sql.Identifier(name), sql.SQL(" OR ").join(sql.SQL(event) for event in events), ident,
            sql.SQL(", ").join(sql.Literal(argument) for argument in arguments)))
        language = capture_language(cur) or "plpgsql"
    if warning:
        LOGGER.warning("destination %s: %s", destination, warning)
    LOGGER.info("destination %s: trigger %s installed on %s (%s; key %s; capture in %s)", destination,
                name, qualified, " OR ".join(events), ", ".join(keys) or "none", language)
    return InstallResult(qualified, destination, name, events, keys if events != ("INSERT",) else (),
                         warning, language)


def remove(conn: psycopg2.extensions.connection, relation: str, destination: str) -> RemoveResult:
    """Drop the capture trigger of ``destination`` from ``relation``. Idempotent: an absent trigger
    or table is reported in the result, not raised. Committed. Packets already queued stay queued.

    :raises TriggerError: ``relation`` cannot be parsed, ``conn`` inside a transaction.
    """
    schema, table = parse_relation(relation)
    qualified = quote_relation(schema, table)
    name = trigger_name(destination)
    with _transaction(conn) as cur:
        row = _lookup(cur, schema, table)
        cur.execute("SELECT 1 FROM pg_trigger WHERE tgrelid = %s AND tgname = %s AND NOT tgisinternal",
                    (row[0] if row else 0, name))
        if cur.fetchone() is None:
            result = RemoveResult(False, "%s has no trigger %s (destination %s): nothing to remove%s"
                                  % (qualified, schema_module.quote_name(name), destination,
                                     "" if row else " (the table does not exist)"))
        else:
            cur.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name),
                                                                sql.Identifier(schema, table)))
            result = RemoveResult(True, "trigger %s removed from %s (destination %s)"
                                  % (schema_module.quote_name(name), qualified, destination))
    LOGGER.info("destination %s: %s", destination, result.message)
    return result


def _events(actions: Optional[Iterable[str]]) -> Tuple[str, ...]:
    if actions is None:
        return _EVENT_ORDER
    chosen = set()
    for action in [actions] if isinstance(actions, str) else actions:
        event = _EVENTS.get(str(action).strip().lower())
        if event is None:
            raise TriggerError("unknown action %r to capture (expected insert, update, delete)"
                               % (action,))
        chosen.add(event)
    if not chosen:
        raise TriggerError("no action to capture (expected insert, update, delete)")
    return tuple(event for event in _EVENT_ORDER if event in chosen)


def _lookup(cur: Any, schema: str, table: str) -> Optional[Tuple[int, str]]:
    cur.execute("SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s", (schema, table))
    return cur.fetchone()


def _table_key(cur: Any, schema: str, table: str, qualified: str) -> Tuple[str, ...]:
    """The primary key of the table to capture (:func:`_primary_key`).
    :raises TriggerError: it does not exist, or is not a table."""
    row = _lookup(cur, schema, table)
    if row is None:
        raise TriggerError("table %s does not exist" % qualified)
    if row[1] not in ("r", "p"):
        raise TriggerError("%s is not a table (relkind %r): only tables can be captured"
                           % (qualified, row[1]))
    return _primary_key(cur, schema, table)


def _primary_key(cur: Any, schema: str, table: str) -> Tuple[str, ...]:
    """The key columns of the table's primary key (not its ``INCLUDE`` columns), as AutoSQL reads
    them (:func:`golconde.schema.read_schema`); empty without one."""
    return schema_module.read_schema(cur, schema_module.Relation(schema, table)).primary_key


# -- the queue ------------------------------------------------------------------------------------

#: Run before the drain's SELECT, in its transaction: read the queue in index order only.
_INDEX_ORDER = ("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;"
                " SET LOCAL enable_sort = off; ")


class FetchedBatch(List[QueuedPacket]):
    """The packets :func:`fetch_batch` returns, in order (a list).

    :ivar cut_by_bytes: True when the byte bound left out packets that were waiting within the
        count bound (so the queue holds more right now, however short the list).
    """

    cut_by_bytes = False


def fetch_batch(cursor: Any, destination: str, limit: int, max_bytes: Optional[int] = None,
                exclude: Iterable[int] = ()) -> FetchedBatch:
    """The oldest packets of ``destination`` visible to the cursor's snapshot (committed ones),
    ordered by id, at most ``limit`` of them and, when ``max_bytes`` is given, at most that many
    bytes of JSON text (but always at least one packet); the server computes the bound, so
    larger packets never leave it. Does not commit or lock anything; sets
    ``enable_seqscan``, ``enable_bitmapscan`` and ``enable_sort`` off for the rest of the
    current transaction (``SET LOCAL``), so that the queue is read in index order. Rows whose id
    is in ``exclude`` (sent, awaiting the broker's confirmation before their delete) are skipped.

    :returns: a :class:`FetchedBatch` of :class:`QueuedPacket` (empty when the queue is drained).
    :raises ValueError: ``limit`` or ``max_bytes`` below 1.
    :raises psycopg2.Error: e.g. ``golconde.queue`` does not exist (no :func:`install_schema`).
    """
    if limit < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError("limit and max_bytes must be at least 1")
    exclude = sorted({int(value) for value in exclude})
    query = ("SELECT id, packet_id::text, created_at, relation, packet::text AS body"
             " FROM golconde.queue WHERE destination = %(destination)s"
             + (" AND id <> ALL(%(exclude)s::bigint[])" if exclude else "")
             + " ORDER BY id LIMIT %(limit)s")
    if max_bytes is not None:
        # one WindowAgg over at most ``limit`` rows (about 0.5 us per row measured); ``more``:
        # another row follows within the count bound (on the last row kept: the bytes cut it)
        query = ("SELECT id, packet_id, created_at, relation, body, more FROM ("
                 " SELECT *, row_number() OVER w AS n, sum(octet_length(body)) OVER w AS running,"
                 " lead(true, 1, false) OVER w AS more FROM (" + query + ") q"
                 " WINDOW w AS (ORDER BY id)) s"
                 " WHERE n = 1 OR running <= %(max_bytes)s ORDER BY id")
    # The queue's statistics are always stale (it fills and drains faster than autovacuum
    # analyzes it); planning on them, PostgreSQL may read every queued row and sort them to return
    # the first ``limit`` (measured: 80 ms per batch with 80,000 rows queued, the drain's
    # backend then costing 100 us of CPU per row against 5 us in index order). Forbid those plans.
    cursor.execute(_INDEX_ORDER + query, {"destination": destination, "limit": limit,
                                          "max_bytes": max_bytes, "exclude": exclude})
    batch = FetchedBatch()
    rows = cursor.fetchall()
    if max_bytes is not None:
        batch.cut_by_bytes = bool(rows) and rows[-1][5]
        rows = [row[:5] for row in rows]
    for row_id, packet_id, created_at, relation, body in rows:
        error = None
        try:
            decoded = packet_module.loads(body)
        except PacketError as exc:
            decoded, error = {}, str(exc)
            LOGGER.error("destination %s: queued packet %s (id %d) cannot be decoded: %s",
                         destination, packet_id, row_id, error)
        batch.append(QueuedPacket(row_id, packet_id, decoded, created_at, relation, error,
                                  None if error else body))
    return batch


def delete_batch(cursor: Any, destination: str, ids: Iterable[int]) -> int:
    """Delete exactly the queue rows ``ids`` of ``destination`` (those sent), through the primary
    key ``(destination, id)``. Does not commit.

    :returns: the number of rows deleted.
    """
    id_list = sorted({int(value) for value in ids})
    if not id_list:
        return 0
    cursor.execute("DELETE FROM golconde.queue WHERE destination = %s AND id = ANY(%s::bigint[])",
                   (destination, id_list))
    return cursor.rowcount


def backlog(cursor: Any, destination: str) -> Tuple[int, Optional[datetime]]:
    """``(packets waiting, created_at of the oldest or None)`` for ``destination``."""
    cursor.execute("SELECT count(*), min(created_at) FROM golconde.queue WHERE destination = %s",
                   (destination,))
    count, oldest = cursor.fetchone()
    return int(count), oldest


# -- the drain lock -------------------------------------------------------------------------------

def acquire_drain_lock(conn: psycopg2.extensions.connection, destination: str) -> bool:
    """Try to take the session-level advisory lock that lets one daemon drain ``destination``.

    The lock key is the first 64 bits of ``md5("golconde:drain:<destination>")``. It is held by the
    connection until :func:`release_drain_lock` or until the connection closes (a crashed daemon
    frees it). Session locks stack: each successful call on a connection needs one release. When
    ``conn`` was idle outside autocommit, the transaction this opens is committed (the lock stays).

    :returns: True when this connection holds the lock, False when another session does.
    """
    return _advisory(conn, "SELECT pg_try_advisory_lock(%s)", destination)


def release_drain_lock(conn: psycopg2.extensions.connection, destination: str) -> bool:
    """Release the lock taken by :func:`acquire_drain_lock`.

    :returns: False (and a PostgreSQL warning) when this connection did not hold it.
    """
    return _advisory(conn, "SELECT pg_advisory_unlock(%s)", destination)


def _advisory(conn: psycopg2.extensions.connection, query: str, destination: str) -> bool:
    idle = conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    with conn.cursor() as cur:
        cur.execute(query, (_lock_key("drain:" + destination),))
        held = bool(cur.fetchone()[0])
    if idle and not conn.autocommit:
        conn.commit()
    return held


def _lock_key(name: str) -> int:
    digest = hashlib.md5(("golconde:" + name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _transaction(conn: psycopg2.extensions.connection) -> Iterator[Any]:
    """A cursor inside a new transaction on ``conn``: committed on success, rolled back on error;
    ``conn.autocommit`` is restored afterwards."""
    if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        raise TriggerError("the connection is inside a transaction; commit or roll it back first")
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn:
            with conn.cursor() as cur:
                yield cur
    finally:
        conn.autocommit = autocommit
