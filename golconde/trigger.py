"""Trigger-based capture: install the capture trigger, and read and drain the capture queue.

The flow (see ``sql/triggers/``, which is ``golconde/triggers_sql/``)::

    canonical table --AFTER ROW trigger golconde.capture()--> golconde.queue  (same transaction)
    drain daemon: acquire_drain_lock -> load_position -> fetch_window -> confirmed persistent
                  sends -> save_position; now and then rotate_queue (TRUNCATE of a sent partition)

Only committed changes reach the queue, and a rolled-back change is never distributed. The daemon
deletes nothing row by row: it reads the queue in windows between transaction snapshots, as PgQ
does (:class:`DrainPosition`), because ids are taken when a row is captured, so a transaction
holding a smaller id can commit after a larger one has been drained. A crash between a send and
the saved position re-sends the packet (at-least-once); ``packet_id`` lets a consumer recognise
the duplicate.

Tables without a primary key only have INSERTs captured. TRUNCATE is not captured: delete the rows
instead (or remove the trigger first). This module knows nothing of STOMP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from . import ledger
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
SCHEMA_VERSION = 5
#: What ``golconde.capture_version()`` of the C library must return (``CAPTURE_VERSION`` in
#: ``golconde_capture.c``, ``c_expected`` in ``capture_c.sql``; bump all three together).
CAPTURE_VERSION = 4
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

    def __str__(self) -> str:
        """For the operator: ``trigger <name> on <table> captures INSERT, UPDATE, DELETE for
        destination <d> (key: id; capture in c)``, then the warning, if any."""
        text = "trigger %s on %s captures %s for destination %s (key: %s; capture in %s)" % (
            self.trigger, self.relation, ", ".join(self.events), self.destination,
            ", ".join(self.key_columns) or "none", self.capture)
        return text + ("; warning: %s" % self.warning if self.warning else "")


@dataclass(frozen=True)
class RemoveResult:
    """What :func:`remove` did: ``removed`` is False when there was nothing to remove;
    ``message`` says what happened, for the operator (also its ``str()``)."""

    removed: bool
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class QueuedPacket:
    """One captured packet read from ``golconde.queue``.

    :ivar id: queue row id (capture order); give it back to :func:`delete_batch` once sent.
    :ivar packet_id: UUID text, unique per packet (use it as the STOMP message id).
    :ivar packet: the decoded packet, a dict (fractional numbers as ``Decimal``), accepted by
        :func:`golconde.packet.parse`; ``{}`` when it could not be decoded (see ``error``).
    :ivar created_at: when the row change happened (timezone-aware).
    :ivar relation: the captured table, quoted and qualified (for a partitioned table, the partition).
    :ivar error: why the packet could not be decoded (e.g. over the size limit, or JSON that is
        not an object), else ``None``; such a packet can never be sent: dead-letter or log it,
        then delete it.
    :ivar text: the packet's JSON text as read from the queue (``None`` if it is not JSON or
        could not be read).
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
    name or it is longer than 63 bytes, ``_`` and the first 8 hex digits of the MD5 of the
    destination's UTF-8 name are appended (the name cut to fit 63 bytes) so that two
    destinations never share a trigger name.

    :raises TriggerError: ``destination`` is empty."""
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
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (ledger.advisory_key("install"),))
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
    that is not partitioned or no ``golconde.drain_position``; or a C ``golconde.capture()`` whose library
    cannot be loaded or is not at :data:`CAPTURE_VERSION`, as on a standby or a restored copy
    without it), ``"plpgsql"`` (current, but the capture is in PL/pgSQL: installing again
    switches it to C if the server now has the library) or ``"current"``.

    :raises TriggerError: ``conn`` is inside a transaction.
    """
    with _transaction(conn) as cur:
        cur.execute("SELECT to_regclass('golconde.queue') IS NOT NULL,"
                    " to_regprocedure('golconde.schema_version()') IS NOT NULL,"
                    " coalesce((SELECT relkind = 'p' FROM pg_class"
                    "           WHERE oid = to_regclass('golconde.queue')), false)"
                    " AND to_regclass('golconde.drain_position') IS NOT NULL")
        queue, versioned, partitioned = cur.fetchone()
        language = capture_language(cur)
        if not queue or language is None:
            return "missing"
        version = 0
        if versioned:
            cur.execute("SELECT golconde.schema_version()")
            version = cur.fetchone()[0]
        if version < SCHEMA_VERSION or not partitioned:
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
        asked explicitly of a table without a primary key, ``conn`` inside a transaction, the
        table's lock not granted within :data:`LOCK_TIMEOUT` (an open transaction uses it).
    :raises psycopg2.Error: the capture schema is missing and cannot be installed.
    """
    schema, table = parse_relation(relation)
    qualified = quote_relation(schema, table)
    events = _events(actions)
    name = trigger_name(destination)
    with _transaction(conn) as cur:   # refuse before changing anything
        keys = _table_key(cur, schema, table, qualified)
        unlogged = (_lookup(cur, schema, table) or (0, "", ""))[2] == "u"
    warning = None
    if unlogged:
        warning = ("%s is UNLOGGED: a crash of its server empties it, which is not captured (the"
                   " targets keep its rows, and adds of the same keys are then refused there)"
                   % qualified)
    if not keys and events != ("INSERT",):
        message = ("%s has no primary key: UPDATE and DELETE cannot be captured; only INSERTs"
                   " are distributed" % qualified)
        if actions is not None:
            raise TriggerError(message)
        warning, events = message if warning is None else "%s; %s" % (message, warning), ("INSERT",)
    state = schema_state(conn)
    if state != "current":
        try:
            install_schema(conn)
        except psycopg2.Error as exc:
            if state == "missing":
                raise
            LOGGER.warning("capture schema golconde (%s) not upgraded: %s", state, first_line(exc))
    with _transaction(conn) as cur, _lock_wait(cur, qualified):
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
        children = _inheritance_children(cur, ident)
    if children:
        message = ("%s has %d inheritance child table(s) (%s): a row trigger is not inherited, so"
                   " their rows are not captured with it, and the targets' UPDATEs and DELETEs of"
                   " %s reach their children's rows too (as PostgreSQL's do): install a capture"
                   " trigger on each child that holds rows of its own"
                   % (qualified, len(children), ", ".join(children[:3])
                      + (", ..." if len(children) > 3 else ""), qualified))
        warning = message if warning is None else "%s; %s" % (warning, message)
    if warning:
        LOGGER.warning("destination %s: %s", destination, warning)
    LOGGER.info("destination %s: trigger %s installed on %s (%s; key %s; capture in %s)", destination,
                name, qualified, " OR ".join(events), ", ".join(keys) or "none", language)
    return InstallResult(qualified, destination, name, events, keys if events != ("INSERT",) else (),
                         warning, language)


@dataclass(frozen=True)
class KeyMismatch:
    """A capture trigger whose key columns are not the table's primary key any more.

    The trigger restricts its UPDATE and DELETE packets by the key columns it was given at its
    install (its arguments after the destination); a primary key changed since then (columns
    added, dropped or replaced) makes those restrictions name the wrong columns, and the targets
    then update or delete other rows than the canonical table did.

    :ivar relation: the table, quoted and qualified.
    :ivar trigger: the trigger's name.
    :ivar captured: the key columns in the trigger's arguments.
    :ivar primary_key: the table's primary-key columns now (empty: it has none).
    """

    relation: str
    trigger: str
    captured: Tuple[str, ...]
    primary_key: Tuple[str, ...]

    def __str__(self) -> str:
        now = ("(%s)" % ", ".join(self.primary_key)) if self.primary_key else "none"
        return ("capture trigger %s on %s restricts its UPDATE and DELETE packets by (%s), but the"
                " table's primary key is now %s: run 'golconde trigger install' for this table"
                " again" % (self.trigger, self.relation, ", ".join(self.captured), now))


def key_mismatches(cursor: Any, destination: str) -> List[KeyMismatch]:
    """The capture triggers of ``destination`` (on any table of ``cursor``'s database) whose key
    columns differ from their table's primary key (as sets: the restriction is a JSON object).
    A trigger installed for INSERTs only (no key columns) is not checked; a trigger a partition
    inherited from its partitioned table is checked once, on that table. One catalog query, and
    one schema read per trigger found.

    :returns: one :class:`KeyMismatch` per such trigger, by table name.
    """
    found = []
    for schema, table, name, _, arguments in _capture_triggers(cursor, destination,
                                                                trigger_name(destination)):
        captured = tuple(arguments[1:])
        if not captured:
            continue
        key = _primary_key(cursor, schema, table)
        if set(key) != set(captured):
            found.append(KeyMismatch(quote_relation(schema, table), name, captured, key))
    return found


def _trigger_arguments(nargs: int, raw: Any) -> List[str]:
    """A trigger's arguments from ``pg_trigger.tgnargs`` and ``tgargs`` (NUL-terminated)."""
    return [bytes(item).decode("utf-8", "replace") for item in bytes(raw).split(b"\0")[:nargs]]


def _capture_triggers(cursor: Any, destination: str, name: Optional[str] = None
                      ) -> List[Tuple[str, str, str, str, List[str]]]:
    """``(schema, table, trigger name, tgenabled, arguments)`` of each trigger executing
    ``golconde.capture()`` for ``destination`` (its first argument), named ``name`` if given,
    in ``cursor``'s database, by table and name; not the copies a partition inherits from its
    partitioned table (``tgparentid``). One catalog query."""
    cursor.execute(
        "SELECT n.nspname, c.relname, t.tgname, t.tgenabled, t.tgnargs, t.tgargs"
        "  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        "  JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE (t.tgname = %(name)s OR %(name)s IS NULL) AND NOT t.tgisinternal"
        "   AND t.tgparentid = 0 AND t.tgfoid = to_regprocedure('golconde.capture()')"
        " ORDER BY 1, 2, 3", {"name": name})
    rows = [(schema, table, trigger, str(enabled), _trigger_arguments(nargs, raw))
            for schema, table, trigger, enabled, nargs, raw in cursor.fetchall()]
    return [row for row in rows if row[4][:1] == [destination]]


def capture_problem(cursor: Any, destination: str) -> Optional[str]:
    """What keeps changes from being captured for ``destination`` in ``cursor``'s database, or
    None: no capture trigger of its on any table (never installed, removed, or the destination
    renamed in the configuration: the drain then has nothing to send, whatever is written), or
    capture triggers of its that are disabled (``ALTER TABLE ... DISABLE TRIGGER``: their
    tables' changes are not captured). A trigger that fires only for replicated changes
    (``ENABLE REPLICA TRIGGER``, a canonical database fed by logical replication) fires. Any
    trigger calling ``golconde.capture()`` for the destination counts, whatever its name. One
    catalog query."""
    found = [(quote_relation(schema, table), name, enabled)
             for schema, table, name, enabled, _ in _capture_triggers(cursor, destination)]
    if not found:
        return ("no capture trigger of destination %s in its canonical database: nothing written"
                " there is captured for it (run 'golconde trigger install --destination %s')"
                % (destination, destination))
    disabled = [(relation, name) for relation, name, enabled in found if enabled == "D"]
    return "; ".join(
        "capture trigger %s on %s is disabled: its changes are not captured (ALTER TABLE %s"
        " ENABLE TRIGGER %s)" % (name, relation, relation, schema_module.quote_name(name))
        for relation, name in disabled) or None


def capturing_destinations(cursor: Any, relation: str) -> List[str]:
    """The destinations whose capture trigger fires when ``cursor``'s session writes
    ``relation`` (a quoted, qualified name): its triggers and those of its partitions, that fire
    under the session's ``session_replication_role``; by name, ``[]`` where the relation or the
    capture schema does not exist. Not seen: triggers on the tables behind a view, on
    inheritance children, or on other tables a custom handler writes."""
    cursor.execute(
        "SELECT DISTINCT t.tgnargs, t.tgargs FROM pg_trigger t"
        " WHERE (t.tgrelid = to_regclass(%(relation)s)"
        "        OR t.tgrelid IN (SELECT relid FROM pg_partition_tree(to_regclass(%(relation)s))))"
        "   AND NOT t.tgisinternal"
        "   AND t.tgfoid = to_regprocedure('golconde.capture()')"
        "   AND t.tgenabled = ANY (CASE current_setting('session_replication_role')"
        "                          WHEN 'replica' THEN ARRAY['R', 'A']::\"char\"[]"
        "                          ELSE ARRAY['O', 'A']::\"char\"[] END)", {"relation": relation})
    names = {arguments[0] for arguments in (_trigger_arguments(nargs, raw)
                                            for nargs, raw in cursor.fetchall()) if arguments}
    return sorted(names)


def draining_here(cursor: Any, drains: Dict[str, str]) -> List[str]:
    """The names of ``drains`` (``{destination: application_name of its drain's session}``)
    whose session is connected to ``cursor``'s database: the destinations that drain this very
    database (``pg_stat_activity``, whose ``application_name`` any role may read)."""
    if not drains:
        return []
    cursor.execute("SELECT DISTINCT application_name FROM pg_stat_activity"
                   " WHERE datname = current_database() AND application_name = ANY(%s)",
                   (sorted(set(drains.values())),))
    here = {row[0] for row in cursor.fetchall()}
    return sorted(name for name, application in drains.items() if application in here)


def sequence_problem(cursor: Any) -> Optional[str]:
    """What is wrong with ``golconde.queue_id_seq`` for the drain's order, or None: it must hand
    out ids one at a time (``CACHE 1``, as ``queue.sql`` creates it). With a cache, each session
    takes ids in blocks, ids no longer follow the order in which writers took a row's lock, and
    a key's changes committed close together may be sent out of order."""
    cursor.execute("SELECT seqcache FROM pg_catalog.pg_sequence"
                   " WHERE seqrelid = to_regclass('golconde.queue_id_seq')")
    row = cursor.fetchone()
    if row is None or row[0] == 1:
        return None
    return ("golconde.queue_id_seq has CACHE %d: ids no longer follow the order of the writers'"
            " row locks, so a key's changes may be sent out of order; run ALTER SEQUENCE"
            " golconde.queue_id_seq CACHE 1" % row[0])


def remove(conn: psycopg2.extensions.connection, relation: str, destination: str) -> RemoveResult:
    """Drop the capture trigger of ``destination`` from ``relation``. Idempotent: an absent trigger
    or table is reported in the result, not raised. Committed. Packets already queued stay queued.

    :raises TriggerError: ``relation`` cannot be parsed, ``conn`` inside a transaction.
    """
    schema, table = parse_relation(relation)
    qualified = quote_relation(schema, table)
    name = trigger_name(destination)
    with _transaction(conn) as cur, _lock_wait(cur, qualified):
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


#: How long a trigger install or removal waits for its lock on the table: the application's
#: writers of the table queue behind it while it waits (as for the queue's upgrade, queue.sql).
LOCK_TIMEOUT = "10s"


def _set_lock_timeout(cur: Any, timeout: str) -> None:
    """``lock_timeout`` for the rest of ``cur``'s transaction (``SET LOCAL``)."""
    cur.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))


@contextlib.contextmanager
def _lock_wait(cur: Any, qualified: str) -> Iterator[None]:
    """Wait at most :data:`LOCK_TIMEOUT` for locks in ``cur``'s transaction, and turn a lock
    timeout on ``qualified`` into a :class:`TriggerError` that says why."""
    _set_lock_timeout(cur, LOCK_TIMEOUT)
    try:
        yield
    except psycopg2.errors.LockNotAvailable:
        raise TriggerError("%s stayed locked for %s (a transaction using it is still open: a"
                           " session's, see pg_stat_activity, or one prepared for two-phase commit"
                           " and not committed yet, see pg_prepared_xacts; the table's writers"
                           " waited behind this request meanwhile): try again"
                           % (qualified, LOCK_TIMEOUT)) from None


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


def _lookup(cur: Any, schema: str, table: str) -> Optional[Tuple[int, str, str]]:
    """``(oid, relkind, relpersistence)`` of the relation, or ``None``."""
    cur.execute("SELECT c.oid, c.relkind, c.relpersistence FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
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
    if row[2] == "t":
        raise TriggerError("%s is a temporary table: its rows end with the session that made it,"
                           " which no capture tells the targets" % qualified)
    return _primary_key(cur, schema, table)


def _inheritance_children(cur: Any, ident: sql.Identifier) -> List[str]:
    """The tables inheriting from the plain table ``ident`` (``pg_inherits``), qualified, by
    name; none for a partitioned table, whose row triggers its partitions get too."""
    cur.execute(sql.SQL("SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_inherits i"
                        " JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid"
                        " JOIN pg_catalog.pg_class p ON p.oid = i.inhparent"
                        " WHERE i.inhparent = %s::pg_catalog.regclass AND p.relkind = 'r'"
                        " ORDER BY 1"), (ident.as_string(cur),))
    return [row[0] for row in cur.fetchall()]


def _primary_key(cur: Any, schema: str, table: str) -> Tuple[str, ...]:
    """The key columns of the table's primary key (not its ``INCLUDE`` columns), as AutoSQL reads
    them (:func:`golconde.schema.read_schema`); empty without one."""
    return schema_module.read_schema(cur, schema_module.Relation(schema, table)).primary_key


# -- the queue ------------------------------------------------------------------------------------

#: Run before the drain's SELECT, in its transaction: read the queue in index order only (and
#: no JIT compilation, which the cost of a disabled plan node would otherwise start: 190 ms).
_INDEX_ORDER = ("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;"
                " SET LOCAL enable_sort = off; SET LOCAL jit = off;"
                " SET LOCAL plan_cache_mode = force_generic_plan; ")
#: The queue's partitions (``queue.sql``): a row with id ``i`` is in partition
#: ``golconde.queue_<(i // QUEUE_PARTITION_IDS) % QUEUE_PARTITIONS>``.
QUEUE_PARTITION_IDS = 500000
QUEUE_PARTITIONS = 3
#: The columns a fetch returns, as :func:`_decode_rows` reads them.
_ROW_COLUMNS = "id, packet_id::text, created_at, relation, packet::text AS body"
#: The sequence's last id handed out (``last_value`` is the next one until ``is_called``).
_LAST_ID = "CASE WHEN s.is_called THEN s.last_value ELSE s.last_value - 1 END"


class FetchedBatch(List[QueuedPacket]):
    """The packets :func:`fetch_batch` or :func:`fetch_window` returns, in order (a list).

    :ivar cut_by_bytes: True when the byte bound left out packets that were waiting within the
        count bound (so the queue holds more right now, however short the list).
    """

    cut_by_bytes = False


def _by_bytes(query: str) -> str:
    """``query`` (rows of :data:`_ROW_COLUMNS` ordered by id) cut at ``%(max_bytes)s`` bytes of
    JSON text, always keeping its first row, with a column ``more``: another row followed within
    the count bound (on the last row kept: the bytes cut it). One WindowAgg over at most
    ``limit`` rows (about 0.5 us per row measured)."""
    return ("SELECT id, packet_id, created_at, relation, body, more FROM ("
            " SELECT *, row_number() OVER w AS n, sum(octet_length(body)) OVER w AS running,"
            " lead(true, 1, false) OVER w AS more FROM (" + query + ") q"
            " WINDOW w AS (ORDER BY id)) s"
            " WHERE n = 1 OR running <= %(max_bytes)s ORDER BY id")


@contextlib.contextmanager
def _bytes_cursor(cursor: Any) -> Iterator[Any]:
    """A cursor of ``cursor``'s connection that returns text columns as bytes: they are decoded
    row by row (:func:`_decode_rows`), so that one value that is not UTF-8 (a database in
    ``SQL_ASCII`` takes any byte) fails its row, not the whole fetch."""
    with cursor.connection.cursor() as cur:
        psycopg2.extensions.register_type(psycopg2.extensions.BYTES, cur)
        yield cur


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _decode_rows(destination: str, rows: List[Tuple[Any, ...]], bounded: bool) -> FetchedBatch:
    """The fetched rows ``(id, packet_id, created_at, relation, body[, more])`` as a batch (text
    columns as bytes or str); a body that is not UTF-8 JSON makes its row's ``error``."""
    batch = FetchedBatch()
    if bounded:
        batch.cut_by_bytes = bool(rows) and bool(rows[-1][5])
        rows = [row[:5] for row in rows]
    for row_id, packet_id, created_at, relation, body in rows:
        packet_id, relation = _text(packet_id), _text(relation)
        error = None
        text: Optional[str] = None
        try:
            decoded = packet_module.loads(body)
            text = _text(body)
            if not isinstance(decoded, dict):    # a row written into the queue by hand
                error = "packet must be a JSON object, not %s" % packet_module.json_type(decoded)
                decoded = {}
        except PacketError as exc:
            decoded, error = {}, str(exc)
        if error is not None:
            LOGGER.error("destination %s: queued packet %s (id %d) cannot be decoded: %s",
                         destination, packet_id, row_id, error)
        batch.append(QueuedPacket(row_id, packet_id, decoded, created_at, relation, error, text))
    return batch


def _check_bounds(limit: int, max_bytes: Optional[int]) -> None:
    if limit < 1 or (max_bytes is not None and max_bytes < 1):
        raise ValueError("limit and max_bytes must be at least 1")


def fetch_batch(cursor: Any, destination: str, limit: int, max_bytes: Optional[int] = None,
                exclude: Iterable[int] = ()) -> FetchedBatch:
    """The oldest packets of ``destination`` visible to the cursor's snapshot (committed ones),
    ordered by id, at most ``limit`` of them and, when ``max_bytes`` is given, at most that many
    bytes of JSON text (but always at least one packet); the server computes the bound, so
    larger packets never leave it. Does not commit or lock anything; sets
    ``enable_seqscan``, ``enable_bitmapscan`` and ``enable_sort`` off for the rest of the
    current transaction (``SET LOCAL``), so that the queue is read in index order. Rows whose id
    is in ``exclude`` are skipped.

    This reads every row still queued, sent or not: golconded drains with :func:`fetch_window`,
    which knows what it sent; this is for tools and tests that delete what they read
    (:func:`delete_batch`).

    :returns: a :class:`FetchedBatch` of :class:`QueuedPacket` (empty when the queue is drained).
    :raises ValueError: ``limit`` or ``max_bytes`` below 1.
    :raises psycopg2.Error: e.g. ``golconde.queue`` does not exist (no :func:`install_schema`).
    """
    _check_bounds(limit, max_bytes)
    exclude = sorted({int(value) for value in exclude})
    query = ("SELECT " + _ROW_COLUMNS + " FROM golconde.queue WHERE destination = %(destination)s"
             + (" AND id <> ALL(%(exclude)s::bigint[])" if exclude else "")
             + " ORDER BY id LIMIT %(limit)s")
    if max_bytes is not None:
        query = _by_bytes(query)
    # The queue's statistics are always stale (it fills and drains faster than autovacuum
    # analyzes it); planning on them, PostgreSQL may read every queued row and sort them to return
    # the first ``limit`` (measured: 80 ms per batch with 80,000 rows queued, the drain's
    # backend then costing 100 us of CPU per row against 5 us in index order). Forbid those plans.
    with _bytes_cursor(cursor) as cur:
        cur.execute(_INDEX_ORDER + query, {"destination": destination, "limit": limit,
                                           "max_bytes": max_bytes, "exclude": exclude})
        return _decode_rows(destination, cur.fetchall(), max_bytes is not None)


def delete_batch(cursor: Any, destination: str, ids: Iterable[int]) -> int:
    """Delete exactly the queue rows ``ids`` of ``destination``, through the index
    ``(destination, id)``. Does not commit.

    :returns: the number of rows deleted.
    """
    id_list = sorted({int(value) for value in ids})
    if not id_list:
        return 0
    cursor.execute("DELETE FROM golconde.queue WHERE destination = %s AND id = ANY(%s::bigint[])",
                   (destination, id_list))
    return cursor.rowcount


# -- the drain's position: windows between transaction snapshots ----------------------------------

@dataclass(frozen=True)
class Snapshot:
    """A PostgreSQL ``pg_snapshot`` (text form ``xmin:xmax:xip1,xip2,...``; PostgreSQL manual,
    "Transaction ID and Snapshot Information Functions"): which transactions (64-bit ids) had
    ended when it was taken. Those below ``xmin`` had; those from ``xmax`` on had not (or had
    no id yet); between the two, all but those in ``xip`` had.

    :raises TriggerError: (from :meth:`parse`) not a snapshot's text.
    """

    xmin: int
    xmax: int
    xip: Tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Snapshot":
        """A snapshot from its ``pg_snapshot`` text, ``xmin:xmax:xip1,xip2,...`` (PostgreSQL
        documentation, "Snapshot Components").

        :raises TriggerError: ``text`` is not of that form."""
        match = re.fullmatch(r"(\d+):(\d+):([\d,]*)", text or "")
        if not match:
            raise TriggerError("not a pg_snapshot: %r" % (text,))
        xip = tuple(sorted(int(x) for x in match.group(3).split(",") if x))
        return cls(int(match.group(1)), int(match.group(2)), xip)

    def visible(self, xid: int) -> bool:
        """Whether a transaction ``xid`` had ended when the snapshot was taken (committed or
        not: the queue only holds committed rows), as ``pg_visible_in_snapshot``."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)

    def __str__(self) -> str:
        return "%d:%d:%s" % (self.xmin, self.xmax, ",".join(str(x) for x in self.xip))


@dataclass(frozen=True)
class DrainPosition:
    """How far a destination's drain has sent ``golconde.queue``, without deleting anything: the
    rows are read in windows between two transaction snapshots, as PgQ's batches between two
    ticks (Skytools 3, ``pgq.batch_event_sql``). A window holds the rows whose transaction
    ``window`` sees and ``sent`` does not: those of the transactions ``sent`` lists as running
    (``xip``) or that have an id from its ``xmax`` on, found through the index on ``(destination,
    txid)``. They are sent in id order, up to ``window_hi``: a later change of a row
    waited for the earlier one's lock, so took a larger id, and windows follow each other in
    commit order, so each key's changes stay in order.

    :ivar sent: every queued row whose transaction this snapshot sees has been sent (``None``:
        nothing was yet).
    :ivar window: the window being sent (``None`` between windows).
    :ivar window_hi: the largest id in the window.
    :ivar last_id: the window's rows up to this id have been sent.
    """

    sent: Optional[Snapshot] = None
    window: Optional[Snapshot] = None
    window_hi: int = 0
    last_id: int = 0

    def closed(self) -> "DrainPosition":
        """The position once every row of :attr:`window` has been sent."""
        assert self.window is not None
        return DrainPosition(self.window)

    def params(self) -> Dict[str, Any]:
        """Query parameters: ``sent``, ``window`` (snapshot texts or None), ``xip`` and
        ``running`` (``sent``'s running transactions, as text, and how many: the scan of them
        is skipped when there are none, as an empty ``= ANY`` array read the whole index in a
        generic plan), ``window_hi``, ``last_id``."""
        return {"sent": None if self.sent is None else str(self.sent),
                "xip": [str(xid) for xid in self.sent.xip] if self.sent else [],
                "running": len(self.sent.xip) if self.sent else 0,
                "window": None if self.window is None else str(self.window),
                "window_hi": self.window_hi, "last_id": self.last_id}


#: A window's rows after ``%(after)s`` (``id > after``, ``id <= hi``), at most ``%(limit)s``:
#: ``{hi}`` and ``{window}`` name the window's bound and snapshot (parameters, or columns of the
#: new window's row).
_WINDOW_ROWS = ("SELECT " + _ROW_COLUMNS + " FROM golconde.queue q"
                " WHERE q.destination = %(destination)s AND q.id > {after} AND q.id <= {hi}"
                " AND pg_visible_in_snapshot(q.txid, {window})"
                " AND (%(sent)s::pg_snapshot IS NULL"
                "      OR NOT pg_visible_in_snapshot(q.txid, %(sent)s::pg_snapshot))"
                " ORDER BY q.id LIMIT %(limit)s")
#: Ids of the rows of ``%(destination)s`` that ``%(sent)s`` does not see (all when it is NULL):
#: those of the transactions it lists as running (one probe of ``(destination, txid)`` each, by a
#: LATERAL join kept from being flattened by OFFSET 0), and those from its xmax on (a range of that
#: index). Each branch asks for txid order, which only that index gives without a sort (and sorts
#: are off, :data:`_INDEX_ORDER`): planned generically on the partitions' statistics (none, or an
#: ANALYZE of an empty queue), the ``(destination, id)`` index costs as much, and was chosen, with
#: every row of the destination read for each window (measured: 112 against 7 us of backend CPU
#: per row drained).
_NOT_SENT_IDS = (" SELECT q.id, q.txid, q.created_at FROM golconde.queue q"
                 " WHERE q.destination = %(destination)s AND %(sent)s::pg_snapshot IS NULL"
                 " UNION ALL SELECT q.id, q.txid, q.created_at"
                 " FROM unnest(%(xip)s::text[]::xid8[]) x(xid) CROSS JOIN LATERAL ("
                 "  SELECT q.id, q.txid, q.created_at FROM golconde.queue q"
                 "  WHERE q.destination = %(destination)s AND q.txid = x.xid"
                 "  ORDER BY q.txid OFFSET 0) q"
                 " WHERE %(running)s::int > 0 AND pg_visible_in_snapshot(x.xid, {now})"
                 " UNION ALL SELECT * FROM (SELECT q.id, q.txid, q.created_at FROM golconde.queue q"
                 "  WHERE q.destination = %(destination)s"
                 "  AND q.txid >= pg_snapshot_xmax(%(sent)s::pg_snapshot)"
                 "  AND q.txid < pg_snapshot_xmax({now})"
                 "  ORDER BY q.txid OFFSET 0) t")
#: ``{now}`` of :data:`_NOT_SENT_IDS` in a statement of its own: its snapshot. A transaction
#: still running then is not probed (its rows are invisible: one of a million rows open for
#: minutes had every window read all of them), nor are ids from its xmax on.
_NOW = "pg_current_snapshot()"
#: A new window: its snapshot (the statement's) and the first and last ids of its rows (those of
#: :data:`_NOT_SENT_IDS` the statement sees), then its first rows.
_NEW_WINDOW = ("WITH w AS MATERIALIZED (SELECT pg_current_snapshot() AS snap),"
               " b AS (SELECT min(n.id) AS lo, max(n.id) AS hi FROM ("
               + _NOT_SENT_IDS.replace("{now}", "(SELECT snap FROM w)") + ") n)"
               " SELECT w.snap::text, b.hi, r.* FROM w CROSS JOIN b LEFT JOIN LATERAL ({rows}) r"
               " ON true")


#: Statements prepared on each connection (:func:`_execute_prepared`): name -> parameter names.
_PREPARED: "weakref.WeakKeyDictionary[Any, Dict[str, List[str]]]" = weakref.WeakKeyDictionary()


def _execute_prepared(cursor: Any, name: str, query: str, params: Dict[str, Any],
                      settings: str = "") -> None:
    """Run ``query`` (with ``%(name)s`` placeholders) as the prepared statement ``name`` of the
    cursor's connection, preparing it there first (its ``$n`` parameters in order of first use),
    after ``settings`` (``SET LOCAL`` statements, in the same implicit transaction). The drain's
    statements take PostgreSQL 0.5-0.7 ms to plan, more than they take to run on a small window
    (measured: 29 against 12 us of backend CPU per row drained 70 rows at a time, before they
    were prepared).

    :raises psycopg2.Error: as the statement would.
    """
    prepared = _PREPARED.setdefault(cursor.connection, {})
    if name not in prepared:
        names: List[str] = []

        def number(match: "re.Match[str]") -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return "$%d" % (names.index(match.group(1)) + 1)

        text = re.sub(r"%\((\w+)\)s", number, query)
        cursor.execute(settings + "PREPARE " + name + " AS " + text.replace("%%", "%"))
        prepared[name] = names
    names = prepared[name]
    statement = settings + "EXECUTE " + name + (
        "(" + ", ".join(["%s"] * len(names)) + ")" if names else "")
    try:
        cursor.execute(statement, [params[key] for key in names])
    except psycopg2.errors.InvalidSqlStatementName:     # gone (DISCARD ALL, a pooler...)
        del prepared[name]
        _execute_prepared(cursor, name, query, params, settings)


def fetch_window(cursor: Any, destination: str, position: DrainPosition, limit: int,
                 max_bytes: Optional[int] = None) -> Tuple[FetchedBatch, DrainPosition]:
    """The next packets of ``destination`` after ``position``, in order: at most ``limit`` of
    them and, when ``max_bytes`` is given, at most that many bytes of JSON text (but at least
    one), from the window ``position`` is in, or from a new one (a snapshot taken now) between
    windows. Deletes nothing and locks nothing; one statement, which sets ``enable_seqscan``,
    ``enable_bitmapscan`` and ``enable_sort`` off for the rest of the current transaction
    (``SET LOCAL``), so that the queue is read in index order.

    :returns: ``(batch, after)``: the packets, and the position once they are sent; a batch
        under both bounds ends its window (``after`` is between windows). A window whose last
        rows were sent by the previous call (a batch full by count) ends with no rows: a new
        window is then read in the same call, so that no batch means nothing committed was
        waiting when it was read (a second statement).
    :raises ValueError: ``limit`` or ``max_bytes`` below 1.
    :raises psycopg2.Error: e.g. ``golconde.queue`` is missing or not readable by this role.
    """
    _check_bounds(limit, max_bytes)
    params = dict(position.params(), destination=destination, limit=limit, max_bytes=max_bytes)
    bounded = max_bytes is not None
    new = position.window is None
    if new:     # the new window's bounds and snapshot are columns of the statement
        rows_sql = _WINDOW_ROWS.format(after="b.lo - 1", hi="b.hi", window="w.snap")
    else:
        rows_sql = _WINDOW_ROWS.format(after="%(last_id)s", hi="%(window_hi)s",
                                       window="%(window)s::pg_snapshot")
    if bounded:
        rows_sql = _by_bytes(rows_sql)
    name = ("golconde_new_window" if new else "golconde_window") + ("_bytes" if bounded else "")
    with _bytes_cursor(cursor) as cur:
        _execute_prepared(cur, name, _NEW_WINDOW.format(rows=rows_sql) if new else rows_sql,
                          params, _INDEX_ORDER)
        result = cur.fetchall()
    if new:
        window = Snapshot.parse(_text(result[0][0]))
        rows = sorted((row[2:] for row in result if row[2] is not None), key=lambda row: row[0])
        current = DrainPosition(position.sent, window, result[0][1] or 0, 0)
    else:
        rows, current = result, position
    batch = _decode_rows(destination, rows, bounded)
    if not batch and not new:
        return fetch_window(cursor, destination, current.closed(), limit, max_bytes)
    if len(batch) < limit and not batch.cut_by_bytes:
        return batch, current.closed()
    return batch, dataclasses.replace(current, last_id=batch[-1].id)


def load_position(cursor: Any, destination: str) -> DrainPosition:
    """The position saved by :func:`save_position` (a new one when none was: the drain then
    sends every queued row, which the targets' ledgers recognise if they had it already).

    :raises psycopg2.Error: e.g. ``golconde.drain_position`` does not exist (a capture schema
        older than :data:`SCHEMA_VERSION`).
    """
    cursor.execute("SELECT sent_snapshot::text, window_snapshot::text, window_hi, last_id"
                   " FROM golconde.drain_position WHERE destination = %s", (destination,))
    row = cursor.fetchone()
    if row is None:
        return DrainPosition()
    sent, window, window_hi, last_id = row
    return DrainPosition(None if sent is None else Snapshot.parse(sent),
                         None if window is None else Snapshot.parse(window), window_hi, last_id)


def save_position(cursor: Any, destination: str, position: DrainPosition) -> None:
    """Record ``position`` (every row before it sent and confirmed) in
    ``golconde.drain_position``. Does not commit."""
    cursor.execute("INSERT INTO golconde.drain_position AS p (destination, sent_snapshot,"
                   " window_snapshot, window_hi, last_id) VALUES (%(destination)s,"
                   " %(sent)s::pg_snapshot, %(window)s::pg_snapshot, %(window_hi)s, %(last_id)s)"
                   " ON CONFLICT (destination) DO UPDATE SET sent_snapshot = EXCLUDED.sent_snapshot,"
                   " window_snapshot = EXCLUDED.window_snapshot, window_hi = EXCLUDED.window_hi,"
                   " last_id = EXCLUDED.last_id, updated_at = clock_timestamp()",
                   dict(position.params(), destination=destination))


#: The rows of :data:`_NOT_SENT_IDS` the window has not sent (``%(window)s``, ``%(last_id)s``).
_WAITING = (" FROM (" + _NOT_SENT_IDS.replace("{now}", _NOW) + ") n WHERE NOT (n.id <= %(last_id)s AND"
            " %(window)s::pg_snapshot IS NOT NULL AND pg_visible_in_snapshot(n.txid, %(window)s::pg_snapshot))")


def backlog(cursor: Any, destination: str,
            position: Optional[DrainPosition] = None) -> Tuple[int, Optional[datetime]]:
    """``(packets waiting, created_at of the oldest or None)`` for ``destination``: the committed
    queued rows not sent from ``position`` (by default the saved one, :func:`load_position`)."""
    if position is None:
        position = load_position(cursor, destination)
    cursor.execute(_INDEX_ORDER + "SELECT count(*), min(n.created_at)" + _WAITING,
                   dict(position.params(), destination=destination))
    count, oldest = cursor.fetchone()
    return int(count), oldest


# -- rotation -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rotation:
    """What :func:`rotate_queue` did.

    :ivar truncated: the partitions emptied (``golconde.queue_0``...).
    :ivar blocked: ``{partition: destination}`` for partitions left as they were because a
        destination (with no saved position, or behind) has not sent all of its rows in them.
    :ivar busy: partitions whose lock was not granted within the timeout (a writer that took
        one of their ids is still running); tried again at the next rotation.
    """

    truncated: Tuple[str, ...] = ()
    blocked: Tuple[Tuple[str, str], ...] = ()
    busy: Tuple[str, ...] = ()
    #: the partition new ids go to (never truncated; ``""`` when unknown)
    current: str = ""
    #: the first id of the current round in that partition (its rows below it: the round before)
    current_start: int = field(default=0, compare=False)


#: A row ``q`` the saved position ``p`` has sent within its window.
_IN_SENT_WINDOW = ("(p.window_snapshot IS NOT NULL AND q.id <= p.last_id"
                   " AND pg_visible_in_snapshot(q.txid, p.window_snapshot))")
#: The first destination of a partition with a row not sent: no saved position, or a row whose
#: transaction its ``sent_snapshot`` lists as running or has not seen (probes of the index on
#: ``(destination, txid)``: one per running transaction, one range), unless its window sent it.
#: Destinations by a loose index scan. A transaction still running now is not probed (nor ids
#: from the current snapshot's xmax on): its writer holds the partition's lock, so the partition
#: is not truncated anyway, and the check runs again once the lock is granted. ``{below}``: a
#: condition on the partition's rows ``q`` (``q.id < n``: the rows of a round before), or ``true``.
_UNSENT = ("WITH RECURSIVE d(destination) AS ("
           " (SELECT q.destination FROM {part} q WHERE {below} ORDER BY q.destination LIMIT 1)"
           " UNION ALL SELECT (SELECT q.destination FROM {part} q WHERE q.destination > d.destination"
           "  AND {below} ORDER BY q.destination LIMIT 1) FROM d WHERE d.destination IS NOT NULL)"
           " SELECT d.destination FROM d LEFT JOIN golconde.drain_position p USING (destination)"
           " WHERE d.destination IS NOT NULL AND (p.sent_snapshot IS NULL"
           "  OR EXISTS (SELECT 1 FROM {part} q WHERE q.destination = d.destination AND {below}"
           "   AND q.txid >= pg_snapshot_xmax(p.sent_snapshot)"
           "   AND q.txid < pg_snapshot_xmax(pg_current_snapshot()) AND NOT " + _IN_SENT_WINDOW +
           "   ORDER BY q.txid)"
           "  OR EXISTS (SELECT 1 FROM pg_snapshot_xip(p.sent_snapshot) x(xid)"
           "   CROSS JOIN LATERAL (SELECT 1 FROM {part} q WHERE q.destination = d.destination"
           "    AND {below} AND q.txid = x.xid AND NOT " + _IN_SENT_WINDOW +
           "    ORDER BY q.txid OFFSET 0) q"
           "   WHERE pg_visible_in_snapshot(x.xid, pg_current_snapshot())))"
           " LIMIT 1")


def rotate_queue(conn: psycopg2.extensions.connection, lock_timeout_ms: int = 50) -> Rotation:
    """Empty, with ``TRUNCATE``, each partition of ``golconde.queue`` that new ids no longer go
    to and whose rows every destination has sent (by ``golconde.drain_position``), as PgQ
    rotates its tables (``pgq.maint_rotate_tables_step1``). Each is checked, then locked (ACCESS
    EXCLUSIVE, waiting at most ``lock_timeout_ms``: only a writer still running with one of its
    ids holds it), checked again and truncated, in a transaction of its own. Writers of the
    partition new ids go to are never blocked.

    :returns: a :class:`Rotation`.
    :raises TriggerError: ``conn`` is inside a transaction.
    :raises psycopg2.Error: e.g. this role may not truncate the partitions (``42501``).
    """
    truncated, blocked, busy = [], [], []
    with _transaction(conn) as cur:
        cur.execute("SELECT " + _LAST_ID + " FROM golconde.queue_id_seq s")
        last = cur.fetchone()[0]
        current = (last // QUEUE_PARTITION_IDS) % QUEUE_PARTITIONS
        current_start = last // QUEUE_PARTITION_IDS * QUEUE_PARTITION_IDS
    for number in range(QUEUE_PARTITIONS):
        if number == current:
            continue
        name = "queue_%d" % number
        part = sql.Identifier("golconde", name)
        check = sql.SQL(_UNSENT).format(part=part, below=sql.SQL("true"))
        with _transaction(conn) as cur:
            cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(part))
            if not cur.fetchone()[0]:
                continue
            cur.execute(_INDEX_ORDER)
            cur.execute(check)
            row = cur.fetchone()
        if row is not None:
            blocked.append(("golconde." + name, row[0]))
            continue
        try:
            with _transaction(conn) as cur:
                _set_lock_timeout(cur, "%dms" % lock_timeout_ms)
                cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(part))
                cur.execute(_INDEX_ORDER)
                cur.execute(check)
                row = cur.fetchone()
                if row is None:
                    cur.execute(sql.SQL("TRUNCATE {}").format(part))
        except psycopg2.errors.LockNotAvailable:
            busy.append("golconde." + name)
            continue
        if row is None:
            truncated.append("golconde." + name)
        else:
            blocked.append(("golconde." + name, row[0]))
    return Rotation(tuple(truncated), tuple(blocked), tuple(busy), "golconde.queue_%d" % current,
                    current_start)


def unsent_below(conn: psycopg2.extensions.connection, partition: str, below: int) -> Optional[str]:
    """The first destination with a row not sent among the rows of ``partition``
    (``golconde.queue_N``) whose ids are below ``below``, or None: for the partition ids came
    back to, whether the rows of the round before are all sent (then it waits only for ids to
    move on to be truncated).

    :raises TriggerError: ``conn`` is inside a transaction.
    """
    schema, name = partition.split(".", 1)
    with _transaction(conn) as cur:
        cur.execute(_INDEX_ORDER)
        cur.execute(sql.SQL(_UNSENT).format(part=sql.Identifier(schema, name),
                                            below=sql.SQL("q.id < %(below)s")), {"below": below})
        row = cur.fetchone()
    return None if row is None else row[0]


def delete_sent(conn: psycopg2.extensions.connection, destination: str,
                position: DrainPosition, limit: int = 10000, budget: float = 0.0) -> int:
    """Delete the queued rows of ``destination`` that it has sent (those whose transaction
    ``position.sent`` sees), ``limit`` at a time, each batch in a transaction of its own, until
    one deletes fewer or ``budget`` seconds have passed (one batch at least): what a drain does
    instead of :func:`rotate_queue` when it may not truncate, or when another destination keeps
    a partition from being truncated. (The rows of transactions older than the snapshot's xmin
    only, before: a long transaction anywhere in the cluster held every delete back, and one
    batch of 50,000 every 10 s fell behind a faster capture.)

    :returns: the number of rows deleted.
    :raises TriggerError: ``conn`` is inside a transaction.
    """
    if position.sent is None:
        return 0
    total, started = 0, time.monotonic()
    while True:
        with _transaction(conn) as cur:
            cur.execute(_INDEX_ORDER)
            cur.execute("DELETE FROM golconde.queue WHERE destination = %(d)s AND id IN ("
                        " SELECT id FROM golconde.queue WHERE destination = %(d)s"
                        " AND txid < pg_snapshot_xmax(%(sent)s::pg_snapshot)"
                        " AND pg_visible_in_snapshot(txid, %(sent)s::pg_snapshot)"
                        " ORDER BY txid LIMIT %(limit)s)",
                        {"d": destination, "sent": str(position.sent), "limit": limit})
            count = cur.rowcount
        total += count
        if count < limit or time.monotonic() - started >= budget:
            return total


# -- the drain lock -------------------------------------------------------------------------------

def acquire_drain_lock(conn: psycopg2.extensions.connection, destination: str,
                       stale_holder: Optional[str] = None) -> bool:
    """Try to take the session-level advisory lock that lets one daemon drain ``destination``.

    The lock key is the first 64 bits of ``md5("golconde:drain:<destination>")``. It is held by the
    connection until :func:`release_drain_lock` or until the connection closes (a crashed daemon
    frees it). Session locks stack: each successful call on a connection needs one release. When
    ``conn`` was idle outside autocommit, the transaction this opens is committed (the lock stays).
    With ``stale_holder`` (the drain's own sessions' ``application_name``), an earlier session of
    this drain that still holds the lock (cut, not yet seen dead by the server) is terminated
    (:func:`golconde.ledger.acquire_session_lock`).

    :returns: True when this connection holds the lock, False when another session does.
    """
    return ledger.acquire_session_lock(conn, "drain:" + destination, stale_holder)


def release_drain_lock(conn: psycopg2.extensions.connection, destination: str) -> bool:
    """Release the lock taken by :func:`acquire_drain_lock`.

    :returns: False (and a PostgreSQL warning) when this connection did not hold it.
    """
    return ledger.release_session_lock(conn, "drain:" + destination)


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
