"""Apply a batch of packets to one relation, exactly once, in one database transaction.

This module knows nothing of STOMP: it takes ``(packet id, body)`` pairs and returns one
:class:`Outcome` per pair; the listener then fans out, dead-letters and acks.

Algorithm:

1. Each body is parsed (:func:`golconde.packet.parse_message`): a packet or a group of packets;
   a body that does not parse is dead. A group is one item throughout: one ledger id, applied
   whole or not at all (one savepoint on the careful path), one outcome, one fan-out message.
2. *Fast path*: one transaction claims every id in the ledger (:mod:`golconde.ledger`), skips the
   ids already applied (duplicates: redeliveries after a crash), applies the rest through the
   handler (:meth:`~golconde.handlers.base.Handler.apply_batch` with every new packet, group
   members included, in order) and commits. A destination reads the ledger first instead and
   records the new ids after applying, each with its fanned-out packet, in one INSERT (a
   concurrent transaction recording one of them meanwhile makes the batch retry).
3. On any error the transaction is rolled back and the error classified
   (:func:`golconde.errors.classify`): a lost connection raises :class:`ConnectionLost` (the caller
   reconnects and calls again: the ledger makes that safe, even when the COMMIT's fate is unknown);
   a transient error is retried with exponential backoff up to ``max_retries`` times; anything else
   (or retries exhausted) switches to the *careful path*.
4. *Careful path*: the same transaction shape, but each packet inside its own SAVEPOINT, so that a
   packet that fails permanently is rolled back alone and dead-lettered while the others commit.
   A schema error, or a data error (which a column type changed since the schema was cached
   causes too; at most once a second), refreshes the handler's schema cache and retries that
   packet once; a transient error retries it (bounded) with backoff. A group's members are applied
   one by one with :meth:`~golconde.handlers.base.Handler.apply` in the group's savepoint; a
   failing member rolls back the whole group, dead-lettered with a reason naming the member's
   index. If the COMMIT fails on a deferred constraint, the careful path runs again with the
   deferrable constraints checked at the end of each packet, so that the packet breaking one is
   dead-lettered alone.
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import psycopg2
import psycopg2.extensions

from . import ledger
from . import schema as schema_module
from .errors import (DEAD, RECONNECT, RETRY, SCHEMA, SESSION_SQLSTATES, GolcondeError, PacketError,
                     StopListener, ValueTypeError, classify, describe, lone_surrogate)
from .handlers.base import Handler
from .packet import (MAX_PACKET_BYTES, Action, dumps, fanout_text, Group, Packet, parse_message,
                     utf8_size_over)

LOGGER = logging.getLogger(__name__)

APPLIED = "applied"
DUPLICATE = "duplicate"
DEAD_LETTER = "dead"


#: Seconds a listener pauses when its role lacks a privilege every packet needs (see
#: :meth:`Applier._pause_without_privileges`).
PRIVILEGE_RETRY = 30.0
#: The ledger's table (golconde.ledger).
LEDGER_RELATION = schema_module.Relation("golconde", "applied")


class ConnectionLost(GolcondeError):
    """The database connection broke during a batch: reconnect, then apply the batch again."""


class Blocked(ConnectionLost):
    """A packet still waits for another session's lock after its retries (:data:`WAIT_SQLSTATES`):
    nothing of the batch is committed; wait (with backoff, the session kept) and apply the batch
    again, without limit, rather than dead-letter a change that later changes of its rows would
    then be applied over."""


#: SQLSTATEs of waits another session causes, retried without limit once a packet alone has
#: used its retries: 55P03 (lock_not_available: ``lock_timeout``) and 57014 (query_canceled:
#: ``statement_timeout``, mostly a lock wait too, or an administrator's cancel).
WAIT_SQLSTATES = frozenset({"55P03", "57014"})
#: PostgreSQL's "permission denied for table x" (aclchk.c: kind, then the object's name)
_DENIED = re.compile(r"permission denied for (table|sequence|function|procedure|schema|type|view"
                     r"|materialized view|foreign table|large object|database|language) (.+)\Z")


#: How the reason of a packet dead-lettered because the ledger records it so starts: it was not
#: tried again (its cause may be gone since), the reason is the first time's.
DEAD_BEFORE = ("dead-lettered before, as golconde.applied records its id (not tried again:"
               " 'golconde dlq replay' applies it, a new id sends it anew): ")


@dataclass
class Outcome:
    """What became of one packet.

    :ivar status: ``"applied"``, ``"duplicate"`` (applied before; not applied again) or ``"dead"``.
    :ivar packet: the parsed packet or group (``None`` when the body did not parse).
    :ivar fanout: for destinations, the JSON text to send to the targets (with generated keys;
        a group's members each with theirs).
    :ivar reason: why a dead packet could not be applied.
    :ivar unmatched: of an applied packet or group, how many packets changed no row (the
        handler returned them marked :meth:`~golconde.packet.Packet.unmatched`: an ``update`` or
        ``delete`` whose restriction matched no row, an ``add`` or ``set`` a trigger refused).
    """

    status: str
    packet: Optional[Union[Packet, Group]] = None
    fanout: Optional[str] = None
    reason: Optional[str] = None
    unmatched: int = 0


def _unmatched(results: Sequence[Any]) -> int:
    """How many of a handler's ``results`` are packets marked as having changed no row."""
    return sum(1 for result in results if Packet.changed_no_row(result))


def members(item: Union[Packet, Group]) -> Tuple[Packet, ...]:
    """The packets of a message: a group's members, or the packet alone."""
    return item.packets if isinstance(item, Group) else (item,)


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): exponential with full jitter
    ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015), capped at ``cap`` (any
    ``attempt``: the exponent stops growing at 60, where ``2 ** 1024`` would overflow a float)."""
    return random.uniform(0, min(cap, base * (2.0 ** min(max(attempt, 0), 60))))


@contextlib.contextmanager
def explicit_transaction(connection: Any) -> Iterator[None]:
    """Run the block on ``connection`` in autocommit mode, where it sends ``BEGIN`` and ``COMMIT``
    itself, each in the same round trip as a statement of its own (libpq's simple query protocol
    runs a ``;``-separated string in one exchange; psycopg2 outside autocommit sends its ``BEGIN``
    alone). The fast path so takes 3 round trips instead of 5 at a destination and 3 instead of 4
    at a target, which is most of a small batch's cost.

    If the block raises, ``ROLLBACK`` is sent (its own failure is left to the block's error,
    which then names a lost connection) and the error re-raised. The connection is back out of
    autocommit mode afterwards. A transaction psycopg2 had left open on it (none should be) is
    committed first, with a warning, as the fast path would have committed it with the batch.
    """
    if connection.status != psycopg2.extensions.STATUS_READY:
        LOGGER.warning("a transaction was left open on the connection; committing it before the batch")
        connection.commit()
    connection.autocommit = True
    try:
        yield
    except BaseException:
        try:
            with connection.cursor() as cur:
                cur.execute("ROLLBACK")
        except Exception as exc:  # the block's own error is the one to classify
            LOGGER.debug("ROLLBACK failed: %s", describe(exc))
        raise
    finally:
        if not connection.closed:
            connection.autocommit = False


class Applier:
    """Applies batches for one consumer (listener).

    :param handler: the relation's :class:`~golconde.handlers.base.Handler`.
    :param consumer: the listener name recorded in the ledger.
    :param store_fanout: True for a destination: keep the fanned-out packet in the ledger.
    :param max_retries: attempts for transient errors before a packet is dead-lettered.
    :param sleep: ``time.sleep``-like (tests pass a fake).
    """

    def __init__(self, handler: Handler, consumer: str, store_fanout: bool = False,
                 max_retries: int = 5, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Optional[Callable[[], None]] = None) -> None:
        self.handler = handler
        self.consumer = consumer
        self.store_fanout = store_fanout
        self.max_retries = max_retries
        self.sleep = sleep
        #: transient-error retries made so far (read by the listener for its stats)
        self.retries = 0
        self.on_retry = on_retry
        self._member: Optional[int] = None   # index of the group member being applied
        self._data_refreshed = float("-inf")    # when a data error last re-read the schema
        #: retries of the batch after a transient error, before it was applied packet by packet
        #: (named in the reasons of :meth:`_one`)
        self._batch_retries = 0

    def apply_batch(self, connection: Any, items: Sequence[Tuple[str, Any]],
                    redelivered: bool = False, replayed: Sequence[str] = ()) -> List[Outcome]:
        """Apply ``items`` = ``[(packet_id, body), ...]`` in order; commits.

        :param redelivered: some of the items were delivered before (the broker's ``redelivered``
            header): a target then claims their ids with ``ON CONFLICT`` at once, instead of first
            trying a plain ``INSERT`` that would fail (:func:`golconde.ledger.claim`).

        :param replayed: ids of items sent back from a dead-letter queue (``golconde dlq
            replay``): their dead-letter records (:func:`golconde.ledger.record_dead`) are
            dropped first, so that they are applied. Any other item whose id the ledger records as
            dead-lettered (its batch came back unacknowledged) is dead-lettered again, with its
            reason, and not applied.
        :returns: one :class:`Outcome` per item, in order.
        :raises ConnectionLost: the connection broke; nothing is known to be committed.
        :raises StopListener: the handler asked the listener to stop.
        """
        if replayed:
            try:
                ledger.forget_dead(connection, self.consumer, replayed)
            except psycopg2.Error as exc:
                self._rollback(connection, exc)
                if classify(exc) == RECONNECT:
                    raise ConnectionLost(describe(exc)) from exc
                raise
        outcomes: List[Optional[Outcome]] = [None] * len(items)
        packets: List[Optional[Union[Packet, Group]]] = [None] * len(items)
        for index, (_, body) in enumerate(items):
            malformed = getattr(body, "reason", None)     # golconde.envelope.Malformed
            if malformed:
                outcomes[index] = Outcome(DEAD_LETTER, reason=malformed)
                continue
            try:
                packets[index] = parse_message(body)
            except PacketError as exc:
                outcomes[index] = Outcome(DEAD_LETTER, reason=str(exc))
        todo = [i for i in range(len(items)) if outcomes[i] is None]
        if not todo:
            return self._logged(items, [o for o in outcomes if o is not None])
        attempt = 0
        while True:
            try:
                done = self._fast(connection, items, packets, todo, redelivered)
                break
            except StopListener:
                self._rollback(connection)
                raise
            except Exception as exc:  # classified below; nothing escapes unclassified
                self._rollback(connection, exc)
                fate = self._classify(connection, exc)
                if fate == RECONNECT:
                    raise ConnectionLost(describe(exc)) from exc
                if fate == RETRY and attempt < self.max_retries:
                    attempt += 1
                    self._count_retry()
                    LOGGER.info("[%s] transient error, retry %d of the batch: %s",
                                self.consumer, attempt, describe(exc))
                    self.sleep(backoff(attempt))
                    continue
                if fate == SCHEMA:
                    with connection.cursor() as cur:
                        self._schema_error(cur)
                    self._rollback(connection)
                LOGGER.debug("[%s] batch failed (%s), applying packet by packet", self.consumer,
                             describe(exc))
                # after a transient error its batch outlasted: each packet then has its own
                # retries, alone (which packet held the batch back is not known: giving one of
                # them the batch's retries dead-lettered another too soon); said in the reasons
                self._batch_retries = attempt if fate == RETRY else 0
                done = self._careful(connection, items, packets, todo)
                break
        for index, outcome in done.items():
            outcomes[index] = outcome
        return self._logged(items, [o if o is not None else Outcome(DEAD_LETTER, reason="not processed")
                                    for o in outcomes])

    def _logged(self, items: Sequence[Tuple[str, Any]], outcomes: List[Outcome]) -> List[Outcome]:
        """``outcomes``, each dead letter among them logged (a WARNING with its id and reason),
        whatever refused it: the packet's form, the database, or the ledger (dead-lettered
        before)."""
        for (pid, _), outcome in zip(items, outcomes):
            if outcome.status == DEAD_LETTER:
                LOGGER.warning("[%s] packet %s dead-lettered: %s", self.consumer, pid, outcome.reason)
        return outcomes

    # ----------------------------------------------------------------------------------------------
    def _classify(self, connection: Any, exc: BaseException) -> str:
        """:func:`golconde.errors.classify`, but an error that says a connection was lost while
        this one is not (psycopg2 marks a lost one closed) is the handler's own: a side
        connection of its. That is retried (bounded) and then dead-lettered,
        not taken for this connection's loss: the batch was replayed on a new session without
        end, and nothing after it applied."""
        fate = classify(exc)
        if (fate == RECONNECT and getattr(exc, "pgcode", None) not in SESSION_SQLSTATES
                and not connection.closed
                and connection.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN):
            return RETRY
        return fate

    @contextlib.contextmanager
    def _transaction_kept(self, cur: Any) -> Iterator[None]:
        """Run the handler's block; when it ended the listener's transaction (a ``COMMIT`` or
        ``ROLLBACK`` of its own, a ``connection.commit()``...), which a handler never does
        (:mod:`golconde.handlers.base`), raise :class:`StopListener`: what it committed may
        include ledger records of packets it did not apply, and what followed ran outside any
        transaction, so the listener stops (until a reload), its packets left unacknowledged,
        rather than go on as if the batch were whole. A ``SystemExit`` the handler raised (which
        ended the listener's thread without a word) becomes a RuntimeError: a bug, dead-lettered."""
        try:
            yield
        except SystemExit as exc:   # sys.exit() in a handler: its bug, the packet's dead letter
            self._check_transaction(cur)
            raise RuntimeError("the handler raised SystemExit(%r)" % (exc.code,)) from exc
        except BaseException:       # StopListener too: a pause would lose what it committed
            self._check_transaction(cur)
            raise
        self._check_transaction(cur)

    def _check_transaction(self, cur: Any) -> None:
        if cur.connection.closed:
            return          # a lost connection: the next statement says so
        if cur.closed:
            raise StopListener("handler %s closed the listener's cursor (a handler uses the cursor"
                               " it is given and never closes it): the listener stops, its packets"
                               " left queued; fix the handler, then reload (SIGHUP)"
                               % type(self.handler).__name__)
        if cur.connection.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            raise self._transaction_ended()

    def _transaction_ended(self) -> StopListener:
        return StopListener("handler %s ended the listener's transaction (a COMMIT or ROLLBACK of its"
                           " own; a handler never commits or rolls back): the listener stops, its"
                           " packets left queued; part of the batch may have been committed, and"
                           " recorded in the ledger as applied without being applied: fix the"
                           " handler, compare the tables (golconde compare), then reload (SIGHUP)"
                           % type(self.handler).__name__)

    def _count_retry(self) -> None:
        self.retries += 1
        if self.on_retry is not None:
            self.on_retry()      # visible in /stats while a long retry loop runs

    def _schema_error(self, cur: Any) -> None:
        """The relation may have changed under the cached schema: the handler forgets it, and
        the session its cached plans (``DISCARD PLANS``): a PL/pgSQL trigger's plans, fixed at
        first use, fail after an ``ALTER COLUMN ... TYPE`` with ``type of parameter N ... does
        not match that when preparing the plan`` (42804) in this session only, which dead-lettered
        every packet until a restart (``cur``: a cursor of the listener's connection)."""
        try:
            self.handler.on_schema_error()
        except (Exception, SystemExit):  # a handler bug must not escape: the retry reads the catalog or fails
            LOGGER.exception("[%s] handler on_schema_error() failed", self.consumer)
        try:
            cur.execute("SAVEPOINT golconde_discard")   # its failure must not abort the transaction
            try:
                cur.execute("DISCARD PLANS")
                cur.execute("RELEASE SAVEPOINT golconde_discard")
            except psycopg2.Error as exc:
                cur.execute("ROLLBACK TO SAVEPOINT golconde_discard")
                LOGGER.debug("[%s] DISCARD PLANS failed: %s", self.consumer, describe(exc))
        except psycopg2.Error as exc:   # a lost session: the retry fails, and is judged, as before
            LOGGER.debug("[%s] DISCARD PLANS failed: %s", self.consumer, describe(exc))

    def _apply_item(self, cur: Any, item: Union[Packet, Group]) -> Tuple[Union[Packet, Group], int]:
        """Apply one packet, or a group member by member (recording which one is being applied).

        :returns: what to fan out (:meth:`_result`), and how many packets changed no row."""
        if not isinstance(item, Group):
            result = self.handler.apply(cur, item)
            return self._result(item, result), _unmatched([result])
        results, raw = [], []
        for index, member in enumerate(item.packets):
            self._member = index
            raw.append(self.handler.apply(cur, member))
            results.append(self._result(member, raw[-1]))
        self._member = None
        return Group(tuple(results)), _unmatched(raw)

    def _result(self, given: Packet, result: Any) -> Packet:
        """What a handler's ``apply`` returned for ``given``, to fan out: ``None`` means the
        packet unchanged. At a target, which fans nothing out, the result is not used: ``given``.

        :raises GolcondeError: at a destination, anything else that is no
            :class:`~golconde.packet.Packet` (dead-lettered with that reason)."""
        if result is None or not self.store_fanout:
            return given
        if not isinstance(result, Packet):
            raise GolcondeError("handler %s returned %s, not a Packet: return the packet it was given"
                                " (or None when unchanged)" % (type(self.handler).__name__,
                                                               type(result).__name__))
        return result

    def _pause_without_privileges(self, cur: Any, item: Union[Packet, Group],
                                  exc: BaseException) -> None:
        """After ``item`` failed with SQLSTATE 42501: when the role lacks, on nothing at all, a
        privilege every such packet needs (on the ledger, or on the handler's relation,
        :meth:`~golconde.handlers.base.Handler.missing_privileges`), raise :class:`StopListener`
        so that the listener pauses :data:`PRIVILEGE_RETRY` s with the packets left queued, rather
        than dead-letter each one; otherwise return (the refusal is this packet's: a row-level
        security policy, a column not granted), and it is dead-lettered."""
        try:
            lacking = schema_module.missing_privileges(cur, LEDGER_RELATION, ("SELECT", "INSERT"))
            for packet in members(item):
                lacking += [p for p in self.handler.missing_privileges(cur, packet) if p not in lacking]
        except psycopg2.Error as check:
            LOGGER.warning("[%s] could not check this role's privileges: %s", self.consumer,
                           describe(check))
            return
        except (Exception, SystemExit):   # a handler bug must not escape: the packet is dead-lettered
            LOGGER.exception("[%s] handler missing_privileges() failed", self.consumer)
            return
        if not lacking:
            # refused on another object than the relation (a table its trigger writes, a
            # sequence, a function, a schema): no packet firing it goes through (review DD: each
            # was dead-lettered); on the relation itself, the refusal is this packet's
            diag = getattr(exc, "diag", None)
            denied = _DENIED.match(getattr(diag, "message_primary", None) or "")
            table = getattr(self.handler, "table", None)
            if denied and not (denied.group(1) == "table"
                               and denied.group(2) in (getattr(table, "name", None), str(table))):
                lacking = ["a privilege on %s %s" % denied.groups()]
        if lacking:
            raise StopListener("this role lacks %s (%s): every packet would be refused; the packets"
                               " stay queued until it is granted (tried again every %.0f s)"
                               % (", ".join(lacking), describe(exc), PRIVILEGE_RETRY),
                               retry_after=PRIVILEGE_RETRY)

    def _stale_types(self, cur: Any, exc: BaseException) -> bool:
        """A data error (SQLSTATE class 22: out of range, too long...), or a value the cached
        column type refuses (:class:`~golconde.errors.ValueTypeError`: 1.5 for an integer), may
        come of a column type changed since the schema was cached (``ALTER COLUMN id TYPE
        bigint``, ``TYPE numeric``: seen within a second otherwise): worth a re-read of the schema
        and one more try, once every :data:`DATA_ERROR_REFRESH` seconds at most; in between, when
        the handler says the schema changed (:meth:`~golconde.handlers.base.Handler.schema_changed`:
        a second ALTER within that second, whose packets would otherwise be dead-lettered
        against the type before it)."""
        if not (_data_error(exc) or isinstance(exc, ValueTypeError)):
            return False
        now = time.monotonic()
        if now - self._data_refreshed < DATA_ERROR_REFRESH:
            try:
                return bool(self.handler.schema_changed(cur))
            except (Exception, SystemExit):     # dead-letter as without the check
                LOGGER.exception("[%s] handler schema_changed() failed", self.consumer)
                try:    # a failed query aborted the transaction: back to the packet's savepoint
                    cur.execute("ROLLBACK TO SAVEPOINT golconde_packet")
                except Exception as exc2:
                    raise ConnectionLost(describe(exc2)) from exc2
                return False
        self._data_refreshed = now
        return True

    def _rollback(self, connection: Any, cause: Optional[BaseException] = None) -> None:
        """Roll back after ``cause`` (the error that ended the transaction, if any).

        :raises ConnectionLost: the rollback failed too (the session is gone): its message
            names ``cause`` first, which says why (``terminating connection due to
            administrator command``), where the rollback's own error only says the connection
            is closed."""
        try:
            connection.rollback()
        except Exception as exc:
            raise ConnectionLost("%srollback failed: %s" % (
                "%s; then " % describe(cause) if cause is not None else "", describe(exc))) from exc

    def _fast(self, connection: Any, items: Sequence[Tuple[str, bytes]],
              packets: Sequence[Optional[Union[Packet, Group]]], todo: Sequence[int],
              redelivered: bool = False) -> dict:
        with explicit_transaction(connection), connection.cursor() as cur:
            return self._fast_in(cur, items, packets, todo, redelivered)

    def _fast_in(self, cur: Any, items: Sequence[Tuple[str, bytes]],
                 packets: Sequence[Optional[Union[Packet, Group]]], todo: Sequence[int],
                 redelivered: bool = False) -> dict:
        """The fast path's transaction: ``BEGIN`` goes with the ledger's first statement and, at a
        destination, ``COMMIT`` with its last (see :func:`explicit_transaction`)."""
        done = {}
        fanouts = {}
        seen = set()
        ids = [items[i][0] for i in todo]
        if self.store_fanout:     # read now, record with the fanned-out text after applying
            new = set(ids) - ledger.applied_ids(cur, self.consumer, ids, begin=True)
        else:
            new = ledger.claim(cur, self.consumer, ids, begin=True, optimistic=not redelivered)
        fresh = []
        for index in todo:
            pid, packet = items[index][0], packets[index]
            assert packet is not None
            if pid not in new or pid in seen:
                done[index] = Outcome(DUPLICATE, packet)
                continue
            seen.add(pid)
            fresh.append(index)
        flat = [member for index in fresh for member in members(packets[index])]
        with self._transaction_kept(cur):
            results = list(self.handler.apply_batch(cur, flat)) if flat else []
        if len(results) != len(flat):
            raise GolcondeError("handler apply_batch() returned %d packets for %d"
                                % (len(results), len(flat)))
        # positions of the results that changed no row (one pass: most batches have none)
        unmatched = {i for i, result in enumerate(results) if Packet.changed_no_row(result)}
        position = 0
        for index in fresh:
            packet = packets[index]
            assert packet is not None
            count = len(members(packet))
            outcome = Outcome(APPLIED, packet)
            if unmatched:
                outcome.unmatched = sum(1 for i in range(position, position + count) if i in unmatched)
            if self.store_fanout:
                part = [self._result(given, result) for given, result in
                        zip(flat[position:position + count], results[position:position + count])]
                result = Group(tuple(part)) if isinstance(packet, Group) else part[0]
                outcome.fanout = _fanout(result)
                fanouts[items[index][0]] = outcome.fanout
            position += count
            done[index] = outcome
        self._fill_duplicates(cur, items, done, fanouts)
        if self.store_fanout:
            ledger.record(cur, self.consumer, fanouts, commit=True)
        else:
            cur.execute("COMMIT")
        return done

    def _fill_duplicates(self, cur: Any, items: Sequence[Tuple[str, bytes]], done: dict,
                         fanouts: dict) -> None:
        """Duplicates: one the ledger records as dead-lettered (:func:`ledger.record_dead`: its
        batch came back unacknowledged) is dead-lettered again with its reason, not applied; at a
        destination, the others are fanned out again, exactly as first sent (targets
        de-duplicate). One ledger read, only when there are duplicates."""
        duplicates = [index for index, outcome in done.items() if outcome.status == DUPLICATE]
        if not duplicates:
            return
        stored = ledger.stored_packets(cur, self.consumer, [
            items[index][0] for index in duplicates if items[index][0] not in fanouts])
        for index in duplicates:
            outcome, pid = done[index], items[index][0]
            text = fanouts[pid] if pid in fanouts else stored.get(pid)
            if text is not None and text.startswith(ledger.DEAD_MARK):
                done[index] = Outcome(DEAD_LETTER, outcome.packet,
                                      reason=DEAD_BEFORE + text[len(ledger.DEAD_MARK):])
            elif self.store_fanout:
                # "": applied without changing a row, not fanned out (Packet.matched)
                outcome.fanout = text if text is not None else _text(items[index][1])

    def _careful(self, connection: Any, items: Sequence[Tuple[str, bytes]],
                 packets: Sequence[Optional[Union[Packet, Group]]], todo: Sequence[int]) -> dict:
        """Each packet in its savepoint, then COMMIT. When the COMMIT fails on a deferred
        constraint (``DEFERRABLE INITIALLY DEFERRED``, as Django declares foreign keys; checked
        only there), the batch goes through again with the deferrable constraints checked at the
        end of each packet (of each group), in its savepoint (``SET CONSTRAINTS ALL DEFERRED``
        before it, ``SET CONSTRAINTS ALL IMMEDIATE`` after it): the packet that breaks one is then
        dead-lettered alone. Only then, since a packet that relied on a later one to satisfy a
        check (a child sent before its parent) fails too. Any error at that COMMIT that is
        neither a lost connection nor transient goes the same way (a deferred constraint
        trigger raises what it likes, ``P0001`` say); should the checked COMMIT fail too, no
        packet alone is to blame and every packet of the batch is dead-lettered with the reason,
        recorded so in the ledger (:meth:`_dead_batch`), rather than the batch coming back for
        ever."""
        for checked in (False, True):
            try:
                return self._careful_once(connection, items, packets, todo, checked)
            except _CommitFailed as failed:
                error = failed.error
                fate = classify(error)
                if fate == RECONNECT:
                    raise ConnectionLost(describe(error)) from error
                if fate == RETRY:
                    raise error     # transient: the batch is delivered again
                if checked:
                    reason = "COMMIT failed: %s" % describe(error)
                    LOGGER.error("[%s] %s; dead-lettering the %d packet(s) of the batch",
                                 self.consumer, reason, len(todo))
                    return self._dead_batch(connection, items, packets, todo, reason, failed.done)
                LOGGER.info("[%s] COMMIT failed on a deferred check (%s); applying the batch"
                            " again with constraints checked per packet", self.consumer, describe(error))
        raise AssertionError("unreachable")

    def _dead_batch(self, connection: Any, items: Sequence[Tuple[str, bytes]],
                    packets: Sequence[Optional[Union[Packet, Group]]], todo: Sequence[int],
                    reason: str, tried: Mapping[int, Outcome]) -> dict:
        """Dead-letter the packets of ``todo``, recorded so in the ledger (committed,
        :func:`ledger.record_dead_batch`): should the batch come back unacknowledged, they are
        dead-lettered again, not applied after the packets that followed them. The reason is
        ``reason`` (the failed COMMIT), or a packet's own when the rolled-back pass ``tried``
        dead-lettered it for its own fault. A packet the ledger already holds (applied, or
        dead-lettered, before) is a duplicate as on the other paths.

        :raises ConnectionLost: the connection broke before the records were committed (the batch
            is then delivered again); any other failure to record them is logged, and the packets
            are dead-lettered unrecorded, as a COMMIT that always fails would otherwise bring the
            batch back for ever."""
        reasons: Dict[str, str] = {}
        for index in todo:
            own = tried.get(index)
            reasons.setdefault(items[index][0], own.reason if own is not None and own.status == DEAD_LETTER
                               and own.reason else reason)
        dead = {index: Outcome(DEAD_LETTER, packets[index], reason=reasons[items[index][0]])
                for index in todo}
        done = dict(dead)
        try:
            with connection.cursor() as cur:
                recorded = ledger.record_dead_batch(cur, self.consumer, reasons)
                for index in todo:
                    pid = items[index][0]
                    if pid in recorded:
                        recorded.discard(pid)     # the same id again later in the batch: a duplicate
                    else:
                        done[index] = Outcome(DUPLICATE, packets[index])
                self._fill_duplicates(cur, items, done, {})
            connection.commit()
        except psycopg2.Error as exc:
            self._rollback(connection, exc)
            if classify(exc) == RECONNECT:
                raise ConnectionLost("recording the dead-lettered batch: %s" % describe(exc)) from exc
            LOGGER.error("[%s] could not record the dead-lettered batch in the ledger (%s): its"
                         " packets are dead-lettered unrecorded", self.consumer, describe(exc))
            return dead
        return done

    def _careful_once(self, connection: Any, items: Sequence[Tuple[str, bytes]],
                      packets: Sequence[Optional[Union[Packet, Group]]], todo: Sequence[int],
                      checked: bool) -> dict:
        done = {}
        fanouts = {}
        with connection.cursor() as cur:
            for index in todo:
                done[index] = self._one(connection, cur, items[index][0], packets[index], fanouts,
                                        checked)
            self._fill_duplicates(cur, items, done, fanouts)
        try:
            connection.commit()
        except Exception as exc:
            self._rollback(connection, exc)
            raise _CommitFailed(exc, done) from exc
        return done

    def _one(self, connection: Any, cur: Any, pid: str, packet: Optional[Union[Packet, Group]],
             fanouts: dict, checked: bool = False) -> Outcome:
        """Apply one packet (or group) in its savepoint; with ``checked``, its deferrable
        constraints are checked before the savepoint is released (see :meth:`_careful`)."""
        begin = "SAVEPOINT golconde_packet; SET CONSTRAINTS ALL DEFERRED" if checked else "SAVEPOINT golconde_packet"
        release = ("SET CONSTRAINTS ALL IMMEDIATE; RELEASE SAVEPOINT golconde_packet" if checked
                   else "RELEASE SAVEPOINT golconde_packet")
        assert packet is not None
        attempts = 0
        schema_refreshed = False
        while True:
            try:
                cur.execute(begin)
            except Exception as exc:
                raise ConnectionLost(describe(exc)) from exc
            try:
                if not ledger.claim(cur, self.consumer, [pid]):
                    cur.execute("RELEASE SAVEPOINT golconde_packet")
                    return Outcome(DUPLICATE, packet)
                self._member = None
                with self._transaction_kept(cur):
                    result, unmatched = self._apply_item(cur, packet)
                outcome = Outcome(APPLIED, packet, unmatched=unmatched)
                if self.store_fanout:
                    outcome.fanout = _fanout(result)
                    ledger.store_packets(cur, self.consumer, {pid: outcome.fanout})
                    fanouts[pid] = outcome.fanout
                cur.execute(release)
                return outcome
            except StopListener:
                raise
            except Exception as exc:
                fate = self._classify(connection, exc)
                if fate == RECONNECT:
                    raise ConnectionLost(describe(exc)) from exc
                try:
                    cur.execute("ROLLBACK TO SAVEPOINT golconde_packet")
                except Exception as exc2:
                    if getattr(exc2, "pgcode", None) == "3B001":
                        # the packet's savepoint is gone: the handler ended the transaction (and
                        # after connection.commit(), psycopg2 began another for its next statement)
                        raise self._transaction_ended() from exc
                    raise ConnectionLost(describe(exc2)) from exc2
                if getattr(exc, "pgcode", None) == "42501":
                    self._pause_without_privileges(cur, packet, exc)
                if not schema_refreshed and (fate == SCHEMA or (fate == DEAD and self._stale_types(cur, exc))):
                    schema_refreshed = True
                    self._schema_error(cur)
                    continue
                if fate == RETRY and attempts < self.max_retries:
                    attempts += 1
                    self._count_retry()
                    self.sleep(backoff(attempts))
                    continue
                if fate == RETRY and getattr(exc, "pgcode", None) in WAIT_SQLSTATES:
                    self._rollback(connection, exc)
                    raise Blocked("still waiting after %d attempts%s: %s" % (
                        attempts + 1, " alone, after %d of its whole batch" % (self._batch_retries + 1)
                        if self._batch_retries else "", describe(exc))) from exc
                # a key's DETAIL is the packet's own values only when it inserted its own row
                reason = describe(exc, own_row=all(
                    getattr(member, "action", None) is Action.ADD
                    for member in (packet.packets if isinstance(packet, Group) else (packet,))))
                where = self._explain(cur, packet, exc) if fate == DEAD else None
                if where:
                    reason = "%s: %s" % (where, reason)
                if isinstance(packet, Group) and self._member is not None:
                    reason = "group member %d (0-based, of %d): %s" % (self._member, len(packet.packets),
                                                                       reason)
                if fate == RETRY:
                    reason = "gave up after %d attempts%s: %s" % (
                        attempts + 1, " alone, after %d of its whole batch" % (self._batch_retries + 1)
                        if self._batch_retries else "", reason)
                if not isinstance(exc, (GolcondeError, psycopg2.Error)) and not lone_surrogate(exc):
                    LOGGER.error("[%s] handler error (a bug?) on packet %s: %s", self.consumer, pid,
                                 reason, exc_info=exc)
                try:   # with the batch: should it come back unacked, dead-lettered again
                    ledger.record_dead(cur, self.consumer, pid, reason)
                except Exception as exc2:
                    raise ConnectionLost(describe(exc2)) from exc2
                return Outcome(DEAD_LETTER, packet, reason=reason)


    def _explain(self, cur: Any, packet: Union[Packet, Group], exc: BaseException) -> Optional[str]:
        """The handler's :meth:`~golconde.handlers.base.Handler.explain_error` for the packet (the
        group member) that failed, or None. It runs in a savepoint rolled back after it: its own
        failure is only logged, unless it broke the connection (the next statement then says
        so)."""
        if not isinstance(exc, psycopg2.Error):
            return None
        if isinstance(packet, Group):
            if self._member is None:
                return None
            packet = packet.packets[self._member]
        # in a savepoint of its own, rolled back: a statement of the explanation that fails (a
        # custom handler's, or a bug) must not abort the transaction the dead letter is recorded
        # in (it did, and the batch came back for ever)
        try:
            cur.execute("SAVEPOINT golconde_explain_error")
        except psycopg2.Error:
            return None         # the connection is gone: the next statement says so
        try:
            with self._transaction_kept(cur):
                reason = self.handler.explain_error(cur, packet, exc)
        except StopListener:
            raise               # it ended the transaction or closed the cursor
        except Exception as error:  # an explanation is never worth more than the dead letter
            LOGGER.debug("[%s] could not tell which value failed: %s", self.consumer, describe(error))
            reason = None
        try:
            cur.execute("ROLLBACK TO SAVEPOINT golconde_explain_error")
            cur.execute("RELEASE SAVEPOINT golconde_explain_error")
        except psycopg2.Error as error:
            if error.pgcode == "3B001":
                raise self._transaction_ended() from error
            LOGGER.debug("[%s] after the explanation: %s", self.consumer, describe(error))
        return reason


class _CommitFailed(Exception):
    """The careful path's COMMIT failed (rolled back): ``error`` says why; ``done`` holds the
    outcomes the pass had reached (``{index: Outcome}``), none of them committed."""

    def __init__(self, error: BaseException, done: Mapping[int, Outcome]) -> None:
        super().__init__(describe(error))
        self.error = error
        self.done = done


#: Least seconds between two schema re-reads caused by data errors (a stream of bad values would
#: otherwise re-read the catalog and apply each of them twice).
DATA_ERROR_REFRESH = 1.0


def _fanout(result: Union[Packet, Group]) -> str:
    """:func:`golconde.packet.fanout_text`, refused when over :data:`MAX_PACKET_BYTES` of UTF-8:
    the keys a destination fills in make a packet longer than it was sent (a group of thousands of
    adds with uuid keys: 44 bytes each), and no target takes a packet over that size; the
    packet is then dead-lettered at the destination, its changes rolled back, rather than
    applied there and dead-lettered at every target.

    :raises PacketError: over the size."""
    text = fanout_text(result)
    size = utf8_size_over(text, MAX_PACKET_BYTES)
    if size is not None:
        raise PacketError("the packet with its generated keys filled in is %d bytes of UTF-8, more"
                          " than the %d a target takes: send it in smaller parts"
                          % (size, MAX_PACKET_BYTES))
    return text


def _data_error(exc: BaseException) -> bool:
    """A database error of SQLSTATE class 22 (data exception)."""
    return isinstance(exc, psycopg2.Error) and (exc.pgcode or "").startswith("22")


def _text(body: Any) -> str:
    """A message body (bytes, text, or a decoded JSON object from a batch message) as JSON text."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body).decode("utf-8")
    return body if isinstance(body, str) else dumps(body)
