"""The ledger: which packets a consumer has applied, recorded in the same transaction as the change.

This is how a packet redelivered after a crash is not applied twice (PgQ stores the last applied
batch id in the target database in the data's transaction; Golconde records every packet id, since
brokers deliver single messages, not batches). Table, created on first use in each database
Golconde writes to::

    golconde.applied (consumer text, packet_id text, applied_at timestamptz, packet text,
                      PRIMARY KEY (consumer, packet_id))

``consumer`` is the listener's name (``Dest`` or ``Dest_target``); ``packet`` holds, for a
destination, the packet as fanned out (with generated keys), so that a redelivered packet is sent to
the targets again exactly as the first time; for a packet dead-lettered by the database (its
state), :data:`DEAD_MARK` and the reason, so that a redelivered batch dead-letters it again
instead of applying it out of order (``golconde dlq replay`` drops the record: :func:`forget_dead`). Rows older than the retention (``ledger_retention``,
default 7 days) are pruned: a redelivery later than that would be applied again, so the retention
must outlast any stop of a listener that leaves packets unacknowledged on the broker.

Packet ids come from the ``golconde-id`` header set by every Golconde publisher; a packet from a
plain STOMP client without one is identified by ``sha256:<hex digest of its body>`` (so the very same
body sent twice within the retention is applied once).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .errors import RetryPacket, printable

LOGGER = logging.getLogger(__name__)

#: How long applied packet ids are kept, in seconds (a redelivery later than this is applied again).
DEFAULT_RETENTION = 7 * 24 * 3600
#: Ledger rows deleted per transaction by :func:`prune`.
PRUNE_CHUNK = 10000

_DDL = """
SELECT pg_advisory_xact_lock(hashtext('golconde.ledger'));
CREATE SCHEMA IF NOT EXISTS golconde;
CREATE TABLE IF NOT EXISTS golconde.applied (
    consumer   text NOT NULL,
    packet_id  text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    packet     text,
    PRIMARY KEY (consumer, packet_id)
);
CREATE INDEX IF NOT EXISTS applied_applied_at ON golconde.applied (applied_at);
"""


def new_packet_id(created: Optional[float] = None, unique: Optional[str] = None) -> str:
    """A packet id that sorts by creation time: ``<milliseconds since the epoch, 12 hex
    digits>-<UUID>``, e.g. ``019a8f3c2b1e-6f1d...``. ``unique`` is the UUID to use (a queued
    packet's own), else a new random one.

    Time-ordered ids are appended at the right edge of the ledger's primary key; random UUIDs made
    every recorded packet touch a random leaf page of a large index (a cache miss, and a full-page
    image in the WAL after each checkpoint).
    """
    when = time.time() if created is None else created
    return "%012x-%s" % (int(when * 1000), unique or uuid.uuid4())


#: Longest packet id (characters) kept as sent; see :func:`normal_id`.
MAX_ID_CHARS = 200


def normal_id(value: str) -> str:
    """The packet id the ledger records for ``value`` (a ``golconde-id`` header or a batch
    entry's id): ``value`` itself, unless it is longer than :data:`MAX_ID_CHARS` or holds what a
    PostgreSQL ``text`` cannot (a NUL, a lone UTF-16 surrogate); then ``"id-sha256:"`` and the
    hex SHA-256 of its UTF-8 bytes (surrogates passed through), so that two such ids still differ
    and the same one is still recognized when it comes back. (Cutting long ids short made two
    ids sharing their first 200 characters one, and a NUL made the ledger's INSERT fail for
    ever.)"""
    if len(value) <= MAX_ID_CHARS and "\x00" not in value:
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            pass
    return "id-sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def packet_id(headers: Mapping[str, str], body: bytes) -> str:
    """The identity of a received packet: its ``golconde-id`` header (:func:`normal_id`), else the
    SHA-256 of its body (``"sha256:<hex>"``). A header holding U+FFFD, the character stomp.py
    puts for bytes that are no UTF-8 (STOMP headers are UTF-8; brokers pass others on), no
    longer tells two ids apart: such a packet is ``"id-sha256:"`` and the SHA-256 of the header
    and the body together (the same message sent again is still recognized)."""
    value = headers.get("golconde-id")
    if value:
        value = str(value)
        if "\ufffd" in value:
            return "id-sha256:" + hashlib.sha256(
                value.encode("utf-8", "surrogatepass") + b"\x00" + bytes(body)).hexdigest()
        return normal_id(value)
    return "sha256:" + hashlib.sha256(body).hexdigest()


def advisory_key(name: str) -> int:
    """The advisory lock key of ``name``: the first 64 bits of ``md5("golconde:<name>")``,
    signed (``pg_try_advisory_lock(bigint)``)."""
    digest = hashlib.md5(("golconde:" + name).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def acquire_consumer_lock(connection: Any, queue: str, stale_holder: Optional[str] = None,
                          wait: float = 2.0) -> bool:
    """Try to take the session-level advisory lock ``consume:<queue>`` in ``connection``'s
    database: one listener at a time applies a queue there, in order (a second golconded started
    with the same configuration waits instead of taking every other batch). See
    :func:`acquire_session_lock`."""
    return acquire_session_lock(connection, "consume:" + queue, stale_holder, wait)


def acquire_session_lock(connection: Any, name: str, stale_holder: Optional[str] = None,
                         wait: float = 2.0) -> bool:
    """Try to take the session-level advisory lock :func:`advisory_key` ``(name)`` in
    ``connection``'s database. Held until the connection closes (session locks stack: each
    success needs one ``pg_advisory_unlock``); commits the transaction it opens when the
    connection was idle.

    :param stale_holder: the ``application_name`` of this listener's own earlier sessions: one
        that still holds the lock is a session the server has not seen die (a network cut: its
        backend lives on until TCP gives up, hours later), so it is terminated
        (``pg_terminate_backend``, where this role may) and the lock tried again for up to
        ``wait`` seconds. A holder of another name (another daemon) is left alone.
    :returns: True when this connection holds the lock (again), False when another session does.
    """
    key = advisory_key(name)
    with _committed_if_idle(connection), connection.cursor() as cur:
        try:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
            held = bool(cur.fetchone()[0])
            if not held and stale_holder:
                held = _end_stale_holder(cur, key, name, stale_holder, wait)
        except psycopg2.errors.InsufficientPrivilege:
            connection.rollback()
            held = False
    return held


def lock_holder(connection: Any, name: str) -> str:
    """Who holds the session-level advisory lock :func:`advisory_key` ``(name)`` in
    ``connection``'s database, for a message: ``" (held by session pid 123, application_name
    'golconde 1a2b Items_t1', active; SELECT pg_terminate_backend(123) ends it if its daemon is
    gone)"``, or ``""`` when no holder can be read. A daemon killed while its session was busy (a
    statement waiting for a lock) leaves that session, and its lock, until the statement ends."""
    key = advisory_key(name)
    try:
        with _committed_if_idle(connection), connection.cursor() as cur:
            cur.execute("SELECT l.pid, a.application_name, a.state FROM pg_catalog.pg_locks l"
                        " LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid"
                        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                        "   AND l.classid = %s AND l.objid = %s"
                        "   AND l.database = (SELECT oid FROM pg_catalog.pg_database"
                        "                      WHERE datname = current_database())"
                        "   AND l.pid <> pg_backend_pid() LIMIT 1",
                        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF))
            row = cur.fetchone()
    except psycopg2.Error:
        try:
            connection.rollback()
        except psycopg2.Error:
            pass
        return ""
    if row is None:
        return ""
    pid, application, state = row
    parts = ["session pid %d" % pid]
    if application is not None:
        parts.append("application_name %r" % printable(application))
    if state:
        parts.append(state)
    return (" (held by %s; SELECT pg_terminate_backend(%d) ends it if its daemon is gone)"
            % (", ".join(parts), pid))


def _end_stale_holder(cur: Any, key: int, name: str, stale_holder: str, wait: float) -> bool:
    """Terminate the session named ``stale_holder`` that holds advisory lock ``key`` in this
    database, then try the lock again for up to ``wait`` seconds (:func:`acquire_session_lock`).
    :returns: whether the lock is now held."""
    # a bigint advisory lock is (classid, objid) = its high and low 32 bits, objsubid 1
    cur.execute("SELECT pg_terminate_backend(l.pid) FROM pg_catalog.pg_locks l"
                " JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                "   AND l.classid = %s AND l.objid = %s"
                "   AND l.database = (SELECT oid FROM pg_catalog.pg_database"
                "                      WHERE datname = current_database())"
                "   AND a.application_name = %s AND l.pid <> pg_backend_pid()",
                ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF, stale_holder))
    if not any(row[0] for row in cur.fetchall()):
        return False
    LOGGER.warning("terminated this listener's own earlier session, which still held"
                   " the lock %s (a connection the server had not seen die)", name)
    deadline = time.monotonic() + wait
    while True:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        if cur.fetchone()[0]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def release_session_lock(connection: Any, name: str) -> bool:
    """Release the session-level advisory lock :func:`acquire_session_lock` took (one of them:
    they stack); commits the transaction it opens when the connection was idle.

    :returns: False (and a PostgreSQL warning) when this connection did not hold it.
    """
    with _committed_if_idle(connection), connection.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(name),))
        return bool(cur.fetchone()[0])


@contextlib.contextmanager
def _committed_if_idle(connection: Any) -> Iterator[None]:
    """Commit, after the block, the transaction the block opened on ``connection`` when it was
    idle outside autocommit (a session lock outlives it; the caller's own transaction is left)."""
    idle = connection.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    yield
    if idle and not connection.autocommit:
        connection.commit()


def ensure(connection: Any) -> None:
    """Create the ``golconde.applied`` table if it is missing (commits). When it exists, no DDL is
    run: ``CREATE INDEX IF NOT EXISTS`` would still lock the table."""
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass('golconde.applied') IS NOT NULL")
        if not cur.fetchone()[0]:
            cur.execute(_DDL)
    connection.commit()


def claim(cursor: Any, consumer: str, ids: Sequence[str], begin: bool = False,
          optimistic: bool = True) -> Set[str]:
    """Record ``ids`` as applied by ``consumer`` in the current transaction; with ``begin``, the
    statement opens it (``BEGIN`` sent in the same round trip, on an autocommit connection).

    With ``begin``, ``optimistic`` and no id given twice, a plain ``INSERT`` is tried first: nearly
    every batch is new, and it costs PostgreSQL about 40% less than ``ON CONFLICT DO NOTHING``'s
    speculative insertion (8-11 us against 15-19 us of backend CPU per id, 150,000 ids in batches
    of 500, by hand). When an id was recorded before (a packet sent again), that ``INSERT`` fails
    (PostgreSQL logs the error, with the statement); claim then rolls the transaction back and
    opens it again with the ``ON CONFLICT`` statement, the only one used without ``begin`` (inside
    a caller's transaction or savepoint) or ``optimistic`` (pass False for a batch the broker
    marked redelivered).

    :returns: the ids that were NOT yet recorded (new work). An id that was recorded before, or that
        appears twice in ``ids``, is a duplicate: the caller must not apply it (again).
    :raises ValueError: ``begin`` with no ids (no statement would carry the ``BEGIN``).
    """
    opening = _opening(begin, ids)
    if not ids:
        return set()
    ids = list(ids)
    if begin and optimistic and len(set(ids)) == len(ids):
        try:
            cursor.execute(opening + "INSERT INTO golconde.applied (consumer, packet_id)"
                           " SELECT %s, unnest(%s::text[])", (consumer, ids))
            return set(ids)
        except psycopg2.errors.UniqueViolation as exc:
            if (exc.diag.schema_name, exc.diag.table_name) != ("golconde", "applied"):
                raise
            LOGGER.debug("%s: a packet of the batch was applied before (%s); claiming the new ones",
                         consumer, exc.diag.message_detail or exc.diag.message_primary)
            cursor.execute("ROLLBACK")
    cursor.execute(
        opening +
        "INSERT INTO golconde.applied (consumer, packet_id)"
        " SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING RETURNING packet_id",
        (consumer, ids))
    return {row[0] for row in cursor.fetchall()}


def applied_ids(cursor: Any, consumer: str, ids: Sequence[str], begin: bool = False) -> Set[str]:
    """The ids among ``ids`` already recorded as applied by ``consumer`` (reads only; a
    destination then records the new ones with their fanned-out text by :func:`record`); with
    ``begin``, the statement opens the transaction, as in :func:`claim` (:raises ValueError: ``begin``
    with no ids)."""
    opening = _opening(begin, ids)
    if not ids:
        return set()
    cursor.execute(opening + _LOOKUP.format(found="true"), (consumer, list(ids)))
    return {row[0] for row in cursor.fetchall()}


#: The ledger rows of some ids, one primary key lookup per id: a scalar subquery in the select
#: list is never turned into a join, so the plan cannot depend on the ledger's statistics
#: (``OFFSET 0`` keeps the outer filter from evaluating it a second time). With
#: ``packet_id = ANY(ids)`` and no statistics (a new ledger, or autovacuum off), PostgreSQL
#: assumes a consumer has 0.5% of the rows and reads all of them for every batch, filtering
#: (measured: 39 us of backend CPU per id with 75,000 ledger rows, growing with the ledger).
#: Parameters: consumer, ids. ``{found}``: the value to return for a recorded id (not NULL).
_LOOKUP = ("SELECT s.packet_id, s.found FROM (SELECT u.packet_id, (SELECT {found}"
           " FROM golconde.applied a WHERE a.consumer = %s AND a.packet_id = u.packet_id) AS found"
           " FROM unnest(%s::text[]) AS u (packet_id) OFFSET 0) s WHERE s.found IS NOT NULL")


def _opening(begin: bool, ids: Sequence[str]) -> str:
    """``"BEGIN; "`` to put before the statement when ``begin``, else ``""``.
    :raises ValueError: ``begin`` with no ids (no statement would carry the ``BEGIN``)."""
    if begin and not ids:
        raise ValueError("no packet ids: the BEGIN would not be sent, and every statement after it"
                         " would commit on its own")
    return "BEGIN; " if begin else ""


def record(cursor: Any, consumer: str, packets: Mapping[str, Optional[str]], commit: bool = False) -> None:
    """Record ``packets`` (packet id -> the fanned-out JSON text, or None) as applied by
    ``consumer`` in the current transaction: one INSERT, where :func:`claim` followed by
    :func:`store_packets` writes every row twice. With ``commit``, the same round trip then
    commits (a plain ``COMMIT`` when ``packets`` is empty; the connection is in autocommit mode
    inside an explicit ``BEGIN``).

    :raises RetryPacket: an id was recorded by another transaction since :func:`applied_ids`
        read (a redelivery applied concurrently); the transaction is then aborted (and nothing
        committed): roll back and apply the batch again, which then sees it as a duplicate.
    """
    if not packets:
        if commit:
            cursor.execute("COMMIT")
        return
    try:
        cursor.execute(
            "INSERT INTO golconde.applied (consumer, packet_id, packet)"
            " SELECT %s, u.packet_id, u.packet FROM unnest(%s::text[], %s::text[]) AS u (packet_id, packet)"
            + ("; COMMIT" if commit else ""),
            (consumer, list(packets.keys()), list(packets.values())))
    except psycopg2.errors.UniqueViolation as exc:
        if (exc.diag.schema_name, exc.diag.table_name) != ("golconde", "applied"):
            raise                      # a deferred unique constraint of the data, at COMMIT
        raise RetryPacket("a packet id was recorded as applied by another transaction meanwhile: %s"
                          % (exc.diag.message_detail or exc.diag.message_primary)) from exc


#: How a ledger row's ``packet`` starts when its packet was dead-lettered, the reason following
#: (no fanned-out JSON text starts so): its batch may come back unacknowledged (a fan-out or
#: dead-letter send not confirmed, a crash), and the packet must then be dead-lettered again, not
#: applied after the packets that followed it. ``golconde dlq replay`` clears it (:func:`forget_dead`).
DEAD_MARK = "!dead "


def record_dead(cursor: Any, consumer: str, packet_id: str, reason: str) -> None:
    """Record, in the current transaction, that ``consumer`` dead-lettered ``packet_id`` with
    ``reason`` (:data:`DEAD_MARK`); a row already there is left as it is."""
    cursor.execute("INSERT INTO golconde.applied (consumer, packet_id, packet) VALUES (%s, %s, %s)"
                   " ON CONFLICT DO NOTHING", (consumer, packet_id, DEAD_MARK + printable(reason)))


def record_dead_batch(cursor: Any, consumer: str, reasons: Mapping[str, str]) -> Set[str]:
    """Record, in the current transaction and in one statement, that ``consumer`` dead-lettered
    each packet id of ``reasons`` (``{packet_id: reason}``, :data:`DEAD_MARK`); rows already there
    (packets applied or dead-lettered before) are left as they are.

    :returns: the ids recorded now; the others were in the ledger already.
    """
    if not reasons:
        return set()
    cursor.execute("INSERT INTO golconde.applied (consumer, packet_id, packet)"
                   " SELECT %s, v.packet_id, v.packet FROM unnest(%s::text[], %s::text[])"
                   "   AS v (packet_id, packet) ON CONFLICT DO NOTHING RETURNING packet_id",
                   (consumer, list(reasons.keys()), [DEAD_MARK + printable(r) for r in reasons.values()]))
    return {row[0] for row in cursor.fetchall()}


def forget_dead(connection: Any, consumer: str, ids: Sequence[str]) -> int:
    """Delete, committed, the dead-letter records (:func:`record_dead`) of ``ids``: these packets
    come back from the dead-letter queue (``golconde dlq replay``) to be applied.

    :returns: how many records were deleted.
    """
    if not ids:
        return 0
    with connection.cursor() as cur:
        cur.execute("DELETE FROM golconde.applied WHERE consumer = %s AND packet_id = ANY(%s)"
                    " AND packet LIKE %s", (consumer, list(ids), DEAD_MARK + "%"))
        deleted = cur.rowcount
    if not connection.autocommit:
        connection.commit()
    return deleted


def store_packets(cursor: Any, consumer: str, packets: Mapping[str, str]) -> None:
    """Store the fanned-out JSON text of each claimed packet id (destinations only)."""
    if not packets:
        return
    cursor.execute(
        "UPDATE golconde.applied AS a SET packet = v.packet"
        " FROM unnest(%s::text[], %s::text[]) AS v (packet_id, packet)"
        " WHERE a.consumer = %s AND a.packet_id = v.packet_id",
        (list(packets.keys()), list(packets.values()), consumer))


def stored_packets(cursor: Any, consumer: str, ids: Sequence[str]) -> Dict[str, Optional[str]]:
    """The fanned-out JSON text recorded for already-applied ``ids`` (``None`` if not stored)."""
    if not ids:
        return {}
    cursor.execute(_LOOKUP.format(found="ARRAY[a.packet]"), (consumer, list(ids)))
    return {row[0]: row[1][0] for row in cursor.fetchall()}


def consumers(connection: Any) -> List[Tuple[str, int, Any, Any]]:
    """The consumers the ledger of ``connection``'s database holds rows of: ``(consumer, rows,
    oldest applied_at, newest applied_at)`` (timestamps with time zone), by name; ``[]`` when
    the database has no ledger. Reads the whole table (an administration command's query).

    :raises psycopg2.Error: the read failed (the caller rolls back)."""
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass('golconde.applied') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT consumer, count(*), min(applied_at), max(applied_at)"
                    " FROM golconde.applied GROUP BY consumer ORDER BY consumer")
        return [(row[0], int(row[1]), row[2], row[3]) for row in cur.fetchall()]


#: The ledger rows of consumer %(consumer)s older than %(retention)s seconds, which prune deletes.
_PRUNABLE = "consumer = %(consumer)s AND applied_at < now() - make_interval(secs => %(retention)s)"


def prunable(connection: Any, consumer: str, retention_seconds: float) -> int:
    """How many rows :func:`prune` would delete (0 when the database has no ledger); a read
    over ``consumer``'s rows (the primary key's first column).

    :raises psycopg2.Error: the read failed (the caller rolls back)."""
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass('golconde.applied') IS NOT NULL")
        if not cur.fetchone()[0]:
            return 0
        cur.execute("SELECT count(*) FROM golconde.applied WHERE " + _PRUNABLE,
                    {"consumer": consumer, "retention": float(retention_seconds)})
        return int(cur.fetchone()[0])


def prune(connection: Any, consumer: str, retention_seconds: float = DEFAULT_RETENTION,
          time_budget: Optional[float] = None) -> Tuple[int, bool]:
    """Delete ledger rows of ``consumer`` applied more than ``retention_seconds`` ago, at most
    :data:`PRUNE_CHUNK` rows per transaction (each committed, so that no long transaction holds
    the ledger), until none is left or ``time_budget`` seconds have passed.

    :returns: ``(rows deleted, True when none older than the retention is left)``.
    :raises psycopg2.Error: the caller rolls back; chunks already committed stay deleted.
    """
    deadline = None if time_budget is None else time.monotonic() + time_budget
    total = 0
    while True:
        with connection.cursor() as cur:
            cur.execute(
                "DELETE FROM golconde.applied WHERE consumer = %(consumer)s AND packet_id IN ("
                " SELECT packet_id FROM golconde.applied WHERE " + _PRUNABLE + " LIMIT %(chunk)s)",
                {"consumer": consumer, "retention": float(retention_seconds), "chunk": PRUNE_CHUNK})
            deleted = cur.rowcount
        connection.commit()
        total += deleted
        if deleted < PRUNE_CHUNK:
            return total, True
        if deadline is not None and time.monotonic() >= deadline:
            return total, False
