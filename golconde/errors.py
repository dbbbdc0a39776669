"""Golconde's exceptions, and the classification of database errors.

Every exception Golconde raises derives from :class:`GolcondeError`. Three of them decide the fate
of a packet, after the model of gmr/rejected's consumer exceptions:

* :class:`PacketError`  - the packet can never be applied: it goes to the dead-letter queue at once.
* :class:`RetryPacket`  - a transient failure: the packet is retried with exponential backoff, and
  dead-lettered after the configured number of attempts.
* :class:`StopListener` - the listener cannot go on (e.g. its relation is gone): it stops, its
  unacknowledged packets go back to the broker, and the other listeners keep running.
"""
from __future__ import annotations

from typing import Optional

import psycopg2
import psycopg2.errors


class GolcondeError(Exception):
    """Base class of every error raised by Golconde."""


class ConfigError(GolcondeError):
    """The configuration is invalid. ``str()`` names the key path and what was expected,
    e.g. ``Destinations.Test1.Targets.t1.queue: missing``."""


class PacketError(GolcondeError):
    """A packet that can never be applied (malformed JSON, unknown action, unknown column, a value
    of the wrong type, a constraint violation...). The packet is dead-lettered with ``str(exc)`` as
    its reason."""


class ValueTypeError(PacketError):
    """A value the type of its column, as the cached schema has it, cannot take (a fraction for
    an integer column, an object for a text one...): the column's type may have changed since
    the schema was read, which is worth a re-read and one more try before the dead letter."""


class RetryPacket(GolcondeError):
    """A transient failure: retry the packet later (bounded, then dead-lettered)."""


class StopListener(GolcondeError):
    """The listener must stop; its unacknowledged packets are released to the broker.

    :param retry_after: ``None`` to stop for good (until a reload, SIGHUP, restarts it); a number of
        seconds to pause instead and then try again (e.g. the relation does not exist yet).
    :param problem: whether the pause is a standing problem (``paused: ...`` in the statistics,
        failing the health check) until a cycle gets through; False for a designed wait (a
        standby daemon waiting for another to release a queue).
    """

    def __init__(self, message: str, retry_after: Optional[float] = None, problem: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.problem = problem


#: SQLSTATE classes/codes after which retrying the same packet may succeed.
#: Source: PostgreSQL documentation, Appendix A "PostgreSQL Error Codes".
TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57014",  # query_canceled (statement_timeout)
    "53000", "53100", "53200", "53300",  # insufficient resources, disk full, out of memory, too many connections
})
#: SQLSTATEs after which the session itself must go: a new one may succeed. 25006
#: (read_only_sql_transaction): the database was made read-only (``default_transaction_read_only``,
#: which a session reads when it starts) or the server is a standby (a failover under way, or a
#: DSN listing several hosts that reaches the new primary on reconnecting).
SESSION_SQLSTATES = frozenset({"25006"})
#: SQLSTATEs meaning the cached schema of a relation may be stale (the table changed under us).
SCHEMA_SQLSTATES = frozenset({
    "42703",  # undefined_column
    "42P01",  # undefined_table
    "42804",  # datatype_mismatch
    "0A000",  # feature_not_supported ("cached plan must not change result type")
    "428C9",  # generated_always (a column made GENERATED ALWAYS since it was cached)
    "42P10",  # invalid_column_reference (ON CONFLICT: the key cached is no longer unique)
})
#: SQLSTATEs of ``OperationalError`` (besides :data:`TRANSIENT_SQLSTATES` and lost connections)
#: after which the same packet may succeed later: object in use, and class 58, system errors
#: (I/O). Other operational errors (54000 program limit exceeded, an index row too large...)
#: are permanent.
TRANSIENT_OPERATIONAL = ("55006", "58")

#: Fates returned by :func:`classify`.
RECONNECT = "reconnect"
RETRY = "retry"
SCHEMA = "schema"
DEAD = "dead"


def classify(exc: BaseException) -> str:
    """Decide what a database exception means for the packet being applied.

    Returns one of :data:`RECONNECT` (the connection is unusable, or its session cannot write
    (:data:`SESSION_SQLSTATES`): reconnect and retry the whole batch, without limit), :data:`RETRY` (transient: retry with backoff, bounded), :data:`SCHEMA` (the
    relation changed: refresh the schema cache and retry once) or :data:`DEAD` (permanent:
    dead-letter the packet).
    """
    if isinstance(exc, PacketError):
        return DEAD
    if isinstance(exc, RetryPacket):
        return RETRY
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        code: Optional[str] = getattr(exc, "pgcode", None)
        if code in TRANSIENT_SQLSTATES:
            return RETRY
        if code is None or code.startswith("08") or code.startswith("57P"):
            return RECONNECT
        if code.startswith(TRANSIENT_OPERATIONAL):
            return RETRY
        return DEAD
    if isinstance(exc, psycopg2.Error):
        code = exc.pgcode or ""
        if code in SESSION_SQLSTATES:
            return RECONNECT
        if code in TRANSIENT_SQLSTATES:
            return RETRY
        if code in SCHEMA_SQLSTATES:
            return SCHEMA
        if code.startswith("08") or code.startswith("57P"):
            return RECONNECT
        return DEAD
    return DEAD


def lone_surrogate(exc: BaseException) -> bool:
    """Whether ``exc`` is the UnicodeEncodeError of a string holding a lone UTF-16 surrogate (a
    JSON ``"\\ud800"`` escape decodes to one): bad input, not a bug of the handler."""
    return (isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str)
            and 0 <= exc.start < len(exc.object) and 0xD800 <= ord(exc.object[exc.start]) <= 0xDFFF)


def printable(text: str) -> str:
    """``text`` as a STOMP header or a PostgreSQL ``text`` can hold it: a NUL written ``\\x00``,
    a lone UTF-16 surrogate ``\\ud800`` (Python's ``backslashreplace``)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


#: SQLSTATEs whose DETAIL may show values of the database rather than of the packet: every
#: integrity constraint violation (class 23: a not-null or check violation's ``Failing row
#: contains (...)``, every column of the row; a unique or foreign key over several columns, of
#: which an update names one, shows the row's others; an exclusion violation, the existing row's
#: key), and a deadlock (the other sessions' statements).
ROW_DETAIL_STATES = frozenset({"23000", "23001", "23502", "23503", "23505", "23514", "23P01",
                               "40P01"})
#: Of those, the ones whose DETAIL shows only the written row's key, which is the packet's own
#: when the statement inserted a row made of the packet (:func:`describe`'s ``own_row``).
KEY_DETAIL_STATES = frozenset({"23503", "23505"})


def describe(exc: BaseException, own_row: bool = False) -> str:
    """One-line description of an exception for logs and dead-letter headers (at most 1000 chars).

    For psycopg2 errors it is ``SQLSTATE <code>: <message>`` (the primary message, without the
    ``ERROR:`` severity), with `` (<detail>)`` when the server gave one, except where the detail
    shows values the packet did not carry (:data:`ROW_DETAIL_STATES`: ``Failing row contains
    (...)``, every column of the row, or another row's key): these texts reach the sender (its
    outcome), the dead-letter queue, the logs and ``/stats``. With ``own_row`` (the statement
    inserted rows made of the packet's values: an add), a unique or foreign key's DETAIL
    (:data:`KEY_DETAIL_STATES`: ``Key (id)=(1) already exists``) is kept.
    """
    if isinstance(exc, psycopg2.Error) and getattr(exc, "pgcode", None):
        diag = getattr(exc, "diag", None)
        primary = getattr(diag, "message_primary", None) if diag is not None else None
        first = (exc.pgerror or str(exc)).strip().splitlines()
        text = "SQLSTATE %s: %s" % (exc.pgcode, primary or (first[0] if first else type(exc).__name__))
        detail = getattr(diag, "message_detail", None) if diag is not None else None
        if detail and (exc.pgcode not in ROW_DETAIL_STATES
                       or (own_row and exc.pgcode in KEY_DETAIL_STATES)):
            text += " (%s)" % detail
    elif lone_surrogate(exc):
        assert isinstance(exc, UnicodeEncodeError)
        text = ("a string holds a lone UTF-16 surrogate (U+%04X, from a JSON \\u escape not in a"
                " pair), which is not Unicode text: no database can store it"
                % ord(exc.object[exc.start]))
    else:
        text = "%s: %s" % (type(exc).__name__, exc) if not isinstance(exc, GolcondeError) else str(exc)
    text = " ".join(printable(text).split())
    return text[:1000]
