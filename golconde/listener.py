"""Listener threads: one per destination and per target, each with its own connections.

:class:`Listener` is the supervising loop shared by every role (after stomp.py's receiver loop and
gmr/helper's controller): it opens the database connection and the outbound broker connections
*before* subscribing, runs cycles of work, and when anything breaks (broker, database, a bug) it
logs, records the error in the stats, closes what broke and reconnects with exponential backoff.
Nothing but :class:`~golconde.errors.StopListener` or :meth:`Listener.stop` ends it, and it always
reports its end (try/finally).

:class:`QueueConsumer` consumes a STOMP queue: deliveries are only queued by stomp.py's receiver
thread; this thread takes batches, applies them (:mod:`golconde.apply`), then hands the outcomes to
:meth:`QueueConsumer.after_commit` (fan-out, dead letters) and only then acks.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Sequence, Tuple, TypeVar

import psycopg2

from . import envelope, ledger
from .apply import (APPLIED, DEAD_LETTER, DUPLICATE, Applier, Blocked, ConnectionLost, Outcome, backoff,
                    members)
from .broker import (CREATED_HEADER, ID_HEADER, REPLAYED_HEADER, BrokerConnection, BrokerError, Delivery,
                     Outgoing, Receipt, copied_header, created_text)
from .errors import (RECONNECT, ConfigError, GolcondeError, PacketError, StopListener, classify,
                     describe, printable)
from .handlers import load_handler
from .packet import dumps_bytes
from .feeds import FeedGraph
from .stats import ThreadStats, action_counts

T = TypeVar("T")

LOGGER = logging.getLogger(__name__)

#: Most seconds between ledger prunes (a tenth of ``ledger_retention`` when that is shorter,
#: at least PRUNE_RETRY).
PRUNE_INTERVAL = 3600.0
#: Seconds one prune may take (in chunks) before the listener goes back to its packets.
PRUNE_BUDGET = 1.0
#: Seconds a queue consumer waits before trying again for the lock another process holds on its
#: queue in its database (:func:`golconde.ledger.acquire_consumer_lock`).
CONSUMER_RETRY = 5.0
#: Seconds until the next prune when the last one ran out of time with old rows left.
PRUNE_RETRY = 10.0
#: Seconds a queue consumer stays idle before it checks that its database session is still
#: there (a session ended by the server, or a server gone, showed "connected" until the next
#: packet, or the TCP keepalives' 30-60 s).
DB_PROBE_INTERVAL = 10.0
#: Seconds without a packet after which a queue consumer takes the queue it consumed before a
#: reload for empty, and goes on to its new one (:attr:`QueueConsumer.previous_queues`).
PREVIOUS_QUEUE_IDLE = 3.0
#: Subscriptions in a row to a queue of ``previous_queues`` that the broker ended before any
#: packet came (an ``/amq/queue/`` deleted since) after which it is given up.
PREVIOUS_QUEUE_TRIES = 3
#: Failed attempts in a row (to connect or to get through a cycle) after which a listener reports
#: the standing problem ``failing`` (/health fails) until a cycle succeeds.
FAILING_AFTER = 3


#: libpq settings of the daemon's database sessions where their DSN does not set them: give up
#: connecting after 10 s; TCP keepalives after 30 s idle, every 10 s, 3 unanswered probes end the
#: session (libpq's default leaves it to the kernel: about 2 hours); and data unacknowledged for
#: 60 s ends it (``tcp_user_timeout``, ms). A network cut mid-batch is so noticed within about a
#: minute instead of blocking the listener for hours (libpq's documentation, "Parameter Key
#: Words"; Unix-domain sockets ignore them).
SESSION_DEFAULTS = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30",
                    "keepalives_interval": "10", "keepalives_count": "3",
                    "tcp_user_timeout": "60000"}


def connect(dsn: str, application_name: str) -> Any:
    """A psycopg2 connection to ``dsn`` named ``application_name`` (at most 63 characters), with
    :data:`SESSION_DEFAULTS` for what the DSN leaves unset, ``extra_float_digits`` 1 (floats
    printed exactly: PostgreSQL's default, which a database or role may have lowered) and
    ``jit`` off.

    :raises psycopg2.Error: the connection failed."""
    given = psycopg2.extensions.parse_dsn(dsn)
    settings = {key: value for key, value in SESSION_DEFAULTS.items() if key not in given}
    if "PGCONNECT_TIMEOUT" in os.environ:
        settings.pop("connect_timeout", None)
    conn = psycopg2.connect(dsn, application_name=application_name[:63], **settings)
    try:
        with conn.cursor() as cur:
            # floats printed exactly whatever the database's or role's default: a destination
            # back-fills keys as the server prints them (to_jsonb), and 0 or less rounds them.
            # No JIT: the catalog queries' estimates (recursive CTEs) set it off for hundreds
            # of ms where they run in about one, and no statement here is long enough to gain
            cur.execute("SET extra_float_digits = 1; SET jit = off")
        conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


def _without_holder(message: str) -> str:
    """``message`` without the lock holder :func:`golconde.ledger.lock_holder` put in it (its
    session's state changes from one try to the next): the wait it tells, to log it once."""
    return re.sub(r" \(held by session pid .*?its daemon is gone\)", "", message)


def idle_in_transaction_timeout(db: Any) -> Optional[str]:
    """The session's ``idle_in_transaction_session_timeout`` as PostgreSQL shows it (``"20ms"``),
    or ``None`` when it is 0 (off) or cannot be read; the transaction it opens is rolled back."""
    try:
        with db.cursor() as cur:
            cur.execute("SELECT current_setting('idle_in_transaction_session_timeout')")
            value = cur.fetchone()[0]
        db.rollback()
    except psycopg2.Error:
        try:
            db.rollback()
        except psycopg2.Error:
            pass
        return None
    return None if str(value).strip() in ("0", "0ms") else str(value)


def session_token() -> str:
    """A random token for a listener's session names (:attr:`Listener.application_name`)."""
    return uuid.uuid4().hex[:8]


def broker_key(broker: Any) -> Tuple[str, int, Optional[str], Optional[str]]:
    """Connections are shared per (host, port, login, vhost)."""
    return (broker.host, broker.port, broker.login, broker.vhost)


class Listener(threading.Thread):
    """Base supervising thread. Subclasses implement :meth:`open` and :meth:`cycle`.

    :param config: the destination's or target's configuration object.
    :param stats: this thread's :class:`~golconde.stats.ThreadStats`.
    :param role: ``"destination"`` or ``"target"``.
    """

    #: backoff bounds in seconds for reconnects
    backoff_base, backoff_cap = 0.5, 30.0

    def __init__(self, config: Any, stats: ThreadStats, role: str) -> None:
        super().__init__(name=config.thread_name, daemon=True)
        self.config = config
        self.stats = stats
        self.role = role
        #: in its sessions' application_name: tells them from another daemon's of the same name
        self.token = session_token()
        self.db: Any = None
        self.outbound: Dict[Tuple[Any, ...], BrokerConnection] = {}
        self._stopping = threading.Event()
        self._failures = 0
        #: epoch seconds of the first of the failures in a row (None: the last cycle got through)
        self.failing_since: Optional[float] = None
        self._paused = False      # the last cycle ended in a StopListener (problem "paused")
        #: the designed wait (StopListener without a problem) last logged, to log it once
        self._waiting_for: Optional[str] = None
        #: the database session's idle_in_transaction_session_timeout when set (named in errors)
        self._idle_timeout: Optional[str] = None
        #: set by a cycle that returned without getting through (its failures keep counting)
        self._incomplete = False
        self._ever_connected: set = set()    # connections opened at least once (for "reconnects")
        #: the daemon's trigger-mode destinations and what its targets feed (a cycle check);
        #: its own until the daemon gives it the shared one (build_listeners)
        self.feeds = FeedGraph()

    # -- life cycle --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the thread to finish its current batch and stop (returns at once; join to wait)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        LOGGER.info("[%s] %s listener starting", self.name, self.role)
        # the statistics outlive a listener a reload replaces: its predecessor's problem is not its
        self.stats.set_problem("failing", None)
        self.stats.set_problem("paused", None)
        self.announce()
        try:
            while not self.stopping:
                try:
                    if not self.ready():
                        self._note_lost()
                        self.open()
                    self._incomplete = False
                    self.cycle()
                    # counted until a cycle gets through, not until a reconnect: a message that
                    # fails every time after a fresh connection must back off too
                    if not self._incomplete:
                        self._got_through()
                except StopListener as exc:
                    self.stats.set_error(str(exc))
                    waiting = None if exc.problem else _without_holder(str(exc))
                    if exc.retry_after is None:
                        LOGGER.error("[%s] stopping listener: %s", self.name, exc)
                    elif exc.problem:
                        LOGGER.error("[%s] pausing %.0fs: %s", self.name, exc.retry_after, exc)
                    elif self._waiting_for != waiting:
                        # a designed wait (a standby): once, not at every try
                        LOGGER.warning("[%s] waiting (trying again every %.0fs): %s", self.name,
                                       exc.retry_after, exc)
                    else:
                        LOGGER.debug("[%s] still waiting: %s", self.name, exc)
                    self._waiting_for = waiting
                    self._release()
                    # a standing problem until a cycle gets through: /health names the cause,
                    # beside the connections the pause closed; set once the pause holds nothing,
                    # so that whoever reads it reads the lag and backlog of the pause too
                    if exc.problem:
                        self._paused = True
                        self.stats.set_problem("paused", "%s: %s" % (
                            "stopped" if exc.retry_after is None else "paused", exc))
                    if exc.retry_after is None:
                        break
                    self._stopping.wait(exc.retry_after)
                except (Exception, SystemExit) as exc:  # supervising loop: log, record, reconnect
                    # (a SystemExit, from a handler's setup say, ended the thread without a word)
                    message = describe(exc)
                    if isinstance(exc, BrokerError):
                        for connection in self.all_brokers():
                            connection.take_lost()  # the error says it better than "lost"
                    if isinstance(exc, GolcondeError) or isinstance(exc, psycopg2.Error):
                        LOGGER.error("[%s] %s", self.name, message)
                    else:
                        LOGGER.exception("[%s] unexpected error: %s", self.name, message)
                    if classify(exc) == RECONNECT and isinstance(exc, psycopg2.Error):
                        message = self._session_lost(message)
                    self._failed(message)
                    if classify(exc) == RECONNECT:
                        self._close_db()    # a session that cannot write (25006) stays so: a new one
                    self.reset()
                    self._stopping.wait(backoff(self._failures, self.backoff_base, self.backoff_cap)
                                        + (self.backoff_base if self._failures == 1 else 0))
        finally:
            self._close_logged()
            self.finish()
            self.stats.set_state(broker="stopped", database="stopped")
            LOGGER.info("[%s] %s listener stopped", self.name, self.role)

    def _release(self) -> None:
        """Pausing or stopping: close every connection, which gives in-flight packets back to the
        broker; it holds nothing then, so its lag is 0, not that of its last batch (a queue
        consumer's backlog is none, a drain's unknown until it reads again). A close that fails
        is logged: the pause or stop goes on."""
        self._close_logged()
        self.stats.set_lag(0.0)
        self.stats.set_backlog(0 if isinstance(self, QueueConsumer) else None)

    def _close_logged(self) -> None:
        """:meth:`close`, a failure logged: the pause or the stop goes on."""
        try:
            self.close()
        except Exception as exc:  # the connections are dropped all the same
            LOGGER.exception("[%s] closing its connections: %s", self.name, describe(exc))

    def _failed(self, message: str) -> None:
        """Count one failed attempt (to connect, or to get a batch through) and record its
        error; from :data:`FAILING_AFTER` in a row, the standing problem ``failing``."""
        self._failures += 1
        if self.failing_since is None:
            self.failing_since = time.time()
        self.stats.set_error(message)
        if self._failures >= FAILING_AFTER:
            self.stats.set_problem("failing", "%d failed attempts in a row, the last: %s"
                                   % (self._failures, message))

    def _note_lost(self) -> None:
        """Record as the last error a broker connection lost between two calls (seen by
        stomp.py's receiver or heart-beat thread: an idle listener's broker went away). It is
        no failed attempt: reconnecting is, if it fails."""
        for connection in self.all_brokers():
            lost = connection.take_lost()
            if lost:
                self.stats.set_error(lost)

    def _got_through(self) -> None:
        """A cycle got through: the failures in a row, and the problems ``failing`` and
        ``paused``, end."""
        if self._paused:
            self._paused = False
            self.stats.set_problem("paused", None)
        if self._waiting_for is not None:
            LOGGER.info("[%s] no longer waiting", self.name)
            self._waiting_for = None
        self.failing_since = None
        if self._failures:
            self._failures = 0
            self.stats.set_problem("failing", None)

    def ready(self) -> bool:
        """True when every connection this listener needs is up."""
        return (self.db is not None and not self.db.closed
                and all(c.connected for c in self.outbound.values()))

    def open(self) -> None:
        """Open what is missing: database first, then outbound brokers (subclasses add more)."""
        self.open_database()
        self.open_outbound()

    def cycle(self) -> None:
        """One unit of work; must return within about a second when idle."""
        raise NotImplementedError

    def reset(self) -> None:
        """Close the connections that are broken, so that :meth:`open` reopens them."""
        if self.db is not None and (self.db.closed or not self._db_alive()):
            self._close_db()
        for connection in self.outbound.values():
            if not connection.connected:
                connection.close()
        self._update_state()

    def finish(self) -> None:
        """Hook called once when the thread ends, after :meth:`close`."""

    def announce(self) -> None:
        """Hook called when the thread starts, before it connects: take over the statistics
        it shares with the listeners of its name before it."""

    def discard(self) -> None:
        """Release what the constructor took (a handler's :meth:`shutdown`) for a listener that
        is never started: a reload or a configuration check builds listeners to validate them."""

    def close(self) -> None:
        """Close every connection (at stop, or when pausing)."""
        for connection in self.outbound.values():
            connection.close()
        self._close_db()
        self._update_state()                # a paused listener's broker is no longer "connected"

    # -- database ----------------------------------------------------------------------------------
    def open_database(self) -> None:
        if self.db is not None and not self.db.closed:
            return
        self.stats.set_state(database="connecting")
        self.db = connect(self.config.pgsql, self.application_name)
        self._note_connected("database")   # even if the set-up below fails: it was a reconnect
        self._idle_timeout = idle_in_transaction_timeout(self.db)
        if self._idle_timeout:
            LOGGER.warning("[%s] the session's idle_in_transaction_session_timeout is %s: golconded"
                           " waits inside its transaction between the retries of a batch (seconds"
                           " each; a batch held by a lock waits so without limit), which may end"
                           " the session; set it to 0 for golconded's role (ALTER ROLE ... SET"
                           " idle_in_transaction_session_timeout = 0)", self.name, self._idle_timeout)
        try:
            self.on_database_open(self.db)
        except BaseException:
            self._close_db()     # so that the next attempt runs the set-up (handler.setup) again
            raise
        self.stats.set_state(database="connected")
        LOGGER.info("[%s] connected to PostgreSQL", self.name)

    @property
    def application_name(self) -> str:
        """The ``application_name`` of this listener's database sessions: ``golconde <token>
        <name>`` (at most 63 bytes): the token, random per listener (:func:`session_token`),
        tells its own sessions from those of another daemon of the same configuration."""
        # the token first: cut to PostgreSQL's 63 bytes, a long name loses its end, not the token;
        # printable ASCII only, as PostgreSQL keeps it (it turns other characters into "?"), so
        # that the name read back from pg_stat_activity is the one given
        name = "".join(c if " " <= c <= "~" else "?" for c in self.name)
        return ("golconde %s %s" % (self.token, name))[:63]

    def on_database_open(self, db: Any) -> None:
        """Hook: set up a fresh database connection (ledger, handler)."""

    def _session_lost(self, message: str) -> str:
        """``message`` about a lost database session, naming the session's
        ``idle_in_transaction_session_timeout`` when one is set: PostgreSQL says it ended the
        session ("terminating connection due to idle-in-transaction timeout") only in its own log."""
        if not self._idle_timeout:
            return message
        return ("%s (the session's idle_in_transaction_session_timeout, %s, may have ended it)"
                % (message, self._idle_timeout))

    def _note_connected(self, key: Any) -> None:
        """Count each re-established connection (every open after the first) in ``reconnects``."""
        if key in self._ever_connected:
            self.stats.count("reconnects")
        self._ever_connected.add(key)

    def _db_alive(self) -> bool:
        return self._db_problem() is None

    def _db_problem(self) -> Optional[str]:
        """``None`` when the database session answers ``SELECT 1`` (after a rollback), else the
        error's text."""
        try:
            self.db.rollback()
            with self.db.cursor() as cur:
                cur.execute("SELECT 1")
            self.db.rollback()
            return None
        except psycopg2.Error as exc:
            return describe(exc)

    def _close_db(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            try:
                db.close()
            except psycopg2.Error:
                pass
        self.stats.set_state(database="disconnected")

    def reconnect_database(self) -> bool:
        """Reconnect after a lost connection, with backoff, until connected or stopping.
        Returns False when stopping."""
        attempt = 0
        while not self.stopping:
            self._close_db()
            try:
                self.open_database()
                return True
            except psycopg2.Error as exc:
                attempt += 1
                # a failed attempt as the supervising loop's are (the problem "failing" from
                # the third in a row), also when the connection was lost in the middle of a batch
                self._failed(describe(exc))
                LOGGER.warning("[%s] PostgreSQL unavailable (%s); retrying", self.name, describe(exc))
                self._stopping.wait(backoff(attempt, self.backoff_base, self.backoff_cap) + 0.1)
        return False

    # -- brokers -----------------------------------------------------------------------------------
    def outbound_for(self, broker: Any) -> BrokerConnection:
        key = broker_key(broker)
        if key not in self.outbound:
            self.outbound[key] = BrokerConnection.from_config(broker, name=self.name + ":out")
        return self.outbound[key]

    def open_outbound(self) -> None:
        for key, connection in self.outbound.items():
            if not connection.connected:
                connection.connect()
                self._note_connected(("outbound",) + key)
        self._update_state()

    def _update_state(self) -> None:
        states = [c.connected for c in self.all_brokers()]
        self.stats.set_state(broker="connected" if states and all(states) else "disconnected")

    def all_brokers(self) -> List[BrokerConnection]:
        return list(self.outbound.values())

    def dead_lettered(self, count: int, reason: str) -> None:
        """Count ``count`` packets the dead-letter queue confirmed (``dead_lettered`` and
        ``errors``), the last one's ``reason`` the last error. Counted once the broker has them:
        the counters are what the queue received (a send that failed comes back with its batch,
        and is counted then)."""
        self.stats.count_many({"dead_lettered": count, "errors": count})
        self.stats.set_error("dead-lettered: %s" % printable(reason)[:1000])

    def dead_letter_messages(self, items: Sequence[Tuple[Delivery, str]], reasons: Sequence[str],
                             ) -> List[Outgoing]:
        """Messages for the dead-letter queue: the original body, and headers naming the reason, the
        original queue and this consumer."""
        out = []
        now = "%.3f" % time.time()
        for (delivery, pid), reason in zip(items, reasons):
            headers = {
                ID_HEADER: pid,
                "golconde-reason": printable(reason)[:1000],
                "golconde-original-queue": self.config.queue,
                "golconde-consumer": self.name,
                "golconde-dead-lettered-at": now,
                "content-type": copied_header(delivery.headers.get("content-type"), "application/json"),
            }
            # what came from the sender is copied only when short (a broker may refuse the send)
            created = created_text(delivery.headers.get(CREATED_HEADER))
            if created:
                headers[CREATED_HEADER] = created
            if envelope.BATCH_HEADER in delivery.headers:
                # a malformed batch message, dead-lettered whole: a replay must read it as one
                # (an overlong count stays wrong: the replay dead-letters it again)
                headers[envelope.BATCH_HEADER] = copied_header(delivery.headers[envelope.BATCH_HEADER], "?")
            out.append((self.config.dead_letter_queue, delivery.body, headers))
        return out


def _entries(delivery: Delivery) -> int:
    try:
        return max(1, int(delivery.headers.get(envelope.BATCH_HEADER, 1)))
    except ValueError:
        return 1


class Inbox:
    """Deliveries waiting for the listener thread, in order, holding at most ``limit`` packets (a
    batch message counts for its entries) and at most ``max_bytes`` bytes of message bodies (when
    given); one delivery is always let in, however large.

    :meth:`put` runs on stomp.py's receiver thread and blocks while the inbox is full: the thread
    stops reading the socket and the broker keeps the rest (TCP backpressure), so memory stays
    bounded in packets and in bytes whatever the broker's prefetch in messages, however the
    senders pack their packets and however large they are. Before its connection is closed the
    inbox is closed (:meth:`close`): a blocked :meth:`put` returns and later ones return at once,
    dropping their delivery (unacked: the broker redelivers it), so that the receiver thread can
    read the DISCONNECT receipt and end.
    :meth:`reopen` empties it for a new connection.
    """

    def __init__(self, limit: int, max_bytes: Optional[int] = None) -> None:
        self.limit = max(1, int(limit))
        self.max_bytes = None if max_bytes is None else max(1, int(max_bytes))
        self._items: "collections.deque[Tuple[Delivery, int, int]]" = collections.deque()
        self._packets = 0
        self._bytes = 0
        self._open = True
        self._cond = threading.Condition()

    @property
    def packets(self) -> int:
        """Packets waiting (a batch message counts for its entries)."""
        return self._packets

    @property
    def bytes(self) -> int:
        """Bytes of the message bodies waiting."""
        return self._bytes

    def _full(self, count: int, size: int) -> bool:
        if not self._items:
            return False
        return (self._packets + count > self.limit
                or (self.max_bytes is not None and self._bytes + size > self.max_bytes))

    def put(self, delivery: Delivery, while_full: Optional[Callable[[], None]] = None,
            every: float = 0.5) -> bool:
        """Queue ``delivery``, waiting while the inbox is full, calling ``while_full`` (if given)
        before each wait of at most ``every`` seconds (to keep the broker connection counted
        alive: :meth:`golconde.broker.BrokerConnection.hold`). :returns: False when the inbox is
        or gets closed (the delivery is dropped)."""
        count, size = _entries(delivery), len(delivery.body)
        with self._cond:
            while self._open and self._full(count, size):
                if while_full is not None:
                    while_full()
                self._cond.wait(every)
            if not self._open:
                return False
            self._items.append((delivery, count, size))
            self._packets += count
            self._bytes += size
            self._cond.notify_all()
        return True

    def oldest_created(self) -> Optional[float]:
        """The ``golconde-created-at`` time (epoch seconds) of the oldest delivery waiting, if it
        has one. Does not block (a read of the deque's first item)."""
        try:
            delivery = self._items[0][0]
        except IndexError:
            return None
        return _created(delivery)

    def take(self, timeout: Optional[float] = None,
             max_bytes: Optional[int] = None) -> Tuple[Delivery, int, int]:
        """The oldest delivery, its count of packets (its batch header, read once by :meth:`put`)
        and the size of its body in bytes, waiting up to ``timeout`` seconds (``None``: not at
        all). With ``max_bytes``, a delivery larger than that is left in the inbox.
        :raises queue.Empty: none came, or the oldest is larger than ``max_bytes``."""
        with self._cond:
            if not self._items and timeout:
                self._cond.wait_for(lambda: bool(self._items), timeout)
            if not self._items or (max_bytes is not None and self._items[0][2] > max_bytes):
                raise queue.Empty
            delivery, count, size = self._items.popleft()
            self._packets -= count
            self._bytes -= size
            self._cond.notify_all()
            return delivery, count, size

    def close(self) -> None:
        """Drop every waiting delivery; until :meth:`reopen`, :meth:`put` drops its delivery."""
        self._reset(False)

    def reopen(self) -> None:
        """Empty, and accept deliveries again (a new connection)."""
        self._reset(True)

    def _reset(self, accept: bool) -> None:
        with self._cond:
            self._items.clear()
            self._packets = 0
            self._bytes = 0
            self._open = accept
            self._cond.notify_all()


class BatchEntry:
    """One entry of a batch message standing for a delivery of its own (the origin of a dead
    letter or a reply): like :class:`~golconde.broker.Delivery`, but ``body`` (the entry's packet
    as JSON, UTF-8 bytes) and ``headers`` (the batch message's, without ``golconde-batch``, with
    the entry's ``golconde-id`` and ``golconde-created-at``) are built only when read, since
    almost every entry is applied and never needs them."""

    __slots__ = ("parent", "packet_id", "packet", "created", "_headers")

    def __init__(self, parent: Delivery, packet_id: str, packet: Any, created: str) -> None:
        self.parent, self.packet_id, self.packet, self.created = parent, packet_id, packet, created
        self._headers: Optional[Dict[str, str]] = None

    @property
    def generation(self) -> int:
        return self.parent.generation

    @property
    def received(self) -> float:
        return self.parent.received

    @property
    def redelivered(self) -> bool:
        return self.parent.redelivered

    @property
    def body(self) -> bytes:
        return dumps_bytes(self.packet)

    @property
    def headers(self) -> Dict[str, str]:
        if self._headers is None:
            headers = dict(self.parent.headers)
            headers.pop(envelope.BATCH_HEADER, None)
            headers[ID_HEADER] = self.packet_id
            if self.created:
                headers[CREATED_HEADER] = self.created
            self._headers = headers
        return self._headers


#: ActiveMQ's header on every message: when the broker took it, in milliseconds since the epoch.
BROKER_TIMESTAMP_HEADER = "timestamp"


def _created(delivery: Delivery) -> Optional[float]:
    """When a delivery's packet was made, epoch seconds: its ``golconde-created-at`` header
    (golconde's client and daemon stamp it; a batch message carries its first entry's, each
    entry its own); for a packet without one (a plain STOMP client's), the ``timestamp`` header
    ActiveMQ gives every message (milliseconds, when the broker took it), else when golconded
    received it (:attr:`~golconde.broker.Delivery.received`); None if none is known. The lag
    (and so a stuck listener) then shows for any sender."""
    headers = delivery.headers
    for name, scale in ((CREATED_HEADER, 1.0), (BROKER_TIMESTAMP_HEADER, 0.001)):
        try:
            value = float(headers.get(name) or "nan") * scale
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0 and (
                name == CREATED_HEADER or 1e9 < value < time.time() + 86400):
            return value                # (a sender's own "timestamp" may be anything)
    return delivery.received or None


def expand(deliveries: Sequence[Delivery]) -> Tuple[List[Delivery], List[Tuple[str, Any]]]:
    """One ``(origin, (packet_id, body))`` per packet: a plain message is one packet (id from its
    ``golconde-id`` header, else its body's hash); a batch message (:mod:`golconde.envelope`) gives
    one per entry, with an origin whose body and headers are the entry's own (so that a dead letter
    holds that packet alone, with its id and creation time). A malformed batch message is one item
    (an :class:`golconde.envelope.Malformed` body) dead-lettered whole with what is wrong with it;
    an empty one gives nothing (it is acked).
    """
    origins: List[Delivery] = []
    items: List[Tuple[str, Any]] = []
    for delivery in deliveries:
        if envelope.BATCH_HEADER in delivery.headers:
            try:
                entries = envelope.decode(delivery.body, delivery.headers[envelope.BATCH_HEADER])
            except PacketError as exc:
                reason = "malformed batch message: %s" % exc
                LOGGER.warning("%s (message %s): dead-lettered whole", reason,
                               delivery.headers.get("message-id", "?"))
                origins.append(delivery)
                items.append((ledger.packet_id(delivery.headers, delivery.body),
                              envelope.Malformed.of(delivery.body, reason)))
                continue
            for pid, packet, created in entries:
                origins.append(BatchEntry(delivery, pid, packet, created))  # type: ignore[arg-type]
                items.append((pid, packet))
            continue
        origins.append(delivery)
        items.append((ledger.packet_id(delivery.headers, delivery.body), delivery.body))
    return origins, items


class Confirmations(Generic[T]):
    """Batches sent without waiting, each with the broker receipts that confirm its sends, oldest
    first, finished in order once confirmed (acked, or the drain's position saved). Both flows
    pipeline this way: the next batch is applied or fetched while the broker confirms the last.
    """

    def __init__(self) -> None:
        self._items: "collections.deque[Tuple[List[Receipt], T]]" = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return (item for _, item in self._items)

    def add(self, receipts: List[Receipt], item: T) -> None:
        self._items.append((receipts, item))

    def clear(self) -> None:
        """Forget every batch (not finished: its packets are redelivered or sent again)."""
        self._items.clear()

    def settle(self, keep: int, finish: Callable[[T], None]) -> None:
        """Call ``finish`` on each batch whose receipts all came, oldest first, stopping at the
        first unconfirmed one; while more than ``keep`` batches are left, wait for the oldest
        instead (``keep=0``: wait for all).

        :raises BrokerError: a send was refused or not confirmed in time (that batch and the
            later ones stay; the caller resets its connections, so they are sent again).
        :raises Exception: whatever ``finish`` raises (e.g. ``BrokerError`` from an ack,
            ``psycopg2.Error`` from a DELETE); that batch stays too.
        """
        while self._items:
            receipts, item = self._items[0]
            if len(self._items) <= keep and not all(r.done() for r in receipts):
                return
            for receipt in receipts:
                receipt.wait()
            finish(item)
            self._items.popleft()


class QueueConsumer(Listener):
    """Consumes ``config.queue`` and applies each packet with the configured handler.

    Subclasses may override :meth:`after_commit` to send more (the destination's fan-out); it runs
    after the database commit and before the acks.
    """

    store_fanout = False
    #: committed batches that may wait for their receipts while the next one is applied
    max_pipeline = 2

    def __init__(self, config: Any, stats: ThreadStats, role: str) -> None:
        super().__init__(config, stats, role)
        handler_class = load_handler(config.function_name)
        options = {"mapping": config.mapping} if getattr(config, "mapping", None) else {}
        try:
            self.handler = handler_class(config.target, config.settings, role=role,
                                         name=config.thread_name, **options)
        except ConfigError:
            raise
        except (Exception, SystemExit) as exc:  # a handler's __init__ bug (or sys.exit) is a
            # configuration problem, not the end of the daemon (a reload builds it on the main thread)
            LOGGER.error("[%s] handler %s failed to initialize", config.thread_name,
                         config.function_name, exc_info=True)
            raise ConfigError("%s: handler %s failed to initialize: %s"
                              % (config.thread_name, config.function_name, describe(exc))) from exc
        self.applier = Applier(self.handler, config.thread_name, store_fanout=self.store_fanout,
                               max_retries=config.max_retries,
                               on_retry=lambda: self.stats.count("retried"))
        self.inbound = BrokerConnection.from_config(config.stomp, name=self.name,
                                                    on_message=self._inbox_put)
        self.dead_letter_broker = self.outbound_for(config.stomp)
        #: what the broker pushed, bounded in packets (``max(prefetch, batch_size)``) and in bytes
        #: (two batches' worth: one taken while the next gathers; see Inbox)
        self._inbox = Inbox(max(config.prefetch, config.batch_size), 2 * config.batch_bytes)
        self._in_flight = False
        #: receipts that after_commit() asks the ack of the current batch to wait for, and the
        #: packets it fanned out (counted in ``fanned_out`` once confirmed and acked)
        self.pending_receipts: List[Receipt] = []
        self.pending_fanned_out = 0
        #: committed batches waiting for their receipts before their ack: (its last delivery,
        #: the packets it fanned out)
        self._pending: Confirmations[Tuple[Delivery, int]] = Confirmations()
        self._next_prune = 0.0      # monotonic time of the next ledger prune (the first: at once)
        self._next_probe = time.monotonic() + DB_PROBE_INTERVAL   # of the idle database check
        #: ``(packets, created of the oldest)`` of the batch being applied, for the live stats
        self._applying: Optional[Tuple[int, Optional[float]]] = None
        #: queues this listener's name consumed before a reload changed its ``queue`` (same
        #: broker), oldest first: each is consumed until it stays empty for
        #: :data:`PREVIOUS_QUEUE_IDLE` s, then the next, then ``config.queue``, so that the
        #: packets that waited there are applied, and before the newer ones (set by the daemon
        #: before the thread starts)
        self.previous_queues: List[str] = []
        self._subscribed: Optional[str] = None
        #: monotonic time of the last delivery, subscription or ack (the broker sends the next
        #: window after an ack: a queue is taken for empty only this long after it)
        self._last_activity = 0.0
        self._previous_tries = 0            # subscriptions to previous_queues[0] without a delivery

    def announce(self) -> None:
        # its live figures from now on: not at construction, as a reload builds listeners it
        # then discards or starts later (after a stuck predecessor), which share the statistics
        self.stats.set_live(self._live_figures)

    def discard(self) -> None:
        self.finish()

    def _live_figures(self) -> Tuple[Optional[int], Optional[float]]:
        """Packets held (waiting in the inbox or being applied) and the creation time of the
        oldest of them (:meth:`golconde.stats.ThreadStats.set_live`): read by the HTTP thread, so
        that a listener stuck in a long apply (a lock wait) shows its backlog and a growing lag."""
        applying = self._applying
        held = self._inbox.packets + (applying[0] if applying else 0)
        oldest = applying[1] if applying else None
        return held, oldest if oldest is not None else self._inbox.oldest_created()

    def _inbox_put(self, delivery: Delivery) -> None:
        # on stomp.py's receiver thread: blocks while the inbox is full, the connection held alive
        self._last_activity = time.monotonic()
        self._previous_tries = 0
        self._inbox.put(delivery, while_full=self.inbound.hold, every=self.inbound.hold_interval)

    def all_brokers(self) -> List[BrokerConnection]:
        return [self.inbound] + list(self.outbound.values())

    def ready(self) -> bool:
        return super().ready() and self.inbound.connected

    def open(self) -> None:
        super().open()                     # database and outbound connections first
        if not self.inbound.connected:
            self.inbound.connect()
            self._note_connected("inbound")
            self._in_flight = False         # whatever was in flight is redelivered
            self._pending.clear()           # their acks cannot work on this connection
            self._inbox.reopen()
            prefetch = self.subscription_prefetch()
            if self.previous_queues:
                self._previous_tries += 1
                if self._previous_tries > PREVIOUS_QUEUE_TRIES:
                    # the broker ends each subscription there (an /amq/queue/ deleted since): on
                    self._leave_previous("cannot be consumed (%d subscriptions in a row ended"
                                         " without a packet: deleted?)" % PREVIOUS_QUEUE_TRIES)
            queue = self.previous_queues[0] if self.previous_queues else self.config.queue
            self.inbound.subscribe(queue, prefetch, ack="client")
            self._subscribed, self._last_activity = queue, time.monotonic()
            LOGGER.info("[%s] subscribed to %s (prefetch %d messages)%s", self.name, queue, prefetch,
                        "" if queue == self.config.queue else ": the queue it consumed before the"
                        " reload, until it is empty, then %s" % self.config.queue)
        self._update_state()

    def _maybe_leave_previous(self) -> None:
        """While idle on a queue of :attr:`previous_queues`: once nothing came for
        :data:`PREVIOUS_QUEUE_IDLE` s and nothing waits for its ack, go on to the next queue
        (the connection is opened again, subscribed there, by the supervising loop)."""
        if (not self.previous_queues or self._subscribed != self.previous_queues[0]
                or self._pending or self._inbox.packets
                or time.monotonic() - self._last_activity < PREVIOUS_QUEUE_IDLE):
            return
        self._leave_previous("is empty")
        self._drop_subscription()
        self._update_state()

    def _drop_subscription(self) -> None:
        """Leave the queue subscribed to for the next one (a change of queue, not a reconnect):
        what is unacknowledged goes back to the broker; :meth:`open` subscribes again."""
        self._subscribed = None
        self._ever_connected.discard("inbound")
        self._inbox.close()                 # first: a receiver thread blocked on it must go on
        self.inbound.close()
        self._pending.clear()
        self._in_flight = False

    def _leave_previous(self, why: str) -> None:
        done = self.previous_queues.pop(0)
        self._previous_tries = 0
        if self.db is not None and not self.db.closed:
            try:
                ledger.release_session_lock(self.db, "consume:" + done)
            except psycopg2.Error as exc:     # freed with the session anyway
                LOGGER.debug("[%s] could not release the lock of %s: %s", self.name, done, describe(exc))
        LOGGER.warning("[%s] %s, its queue before the reload, %s: going on to %s (what is sent"
                       " to %s from now on is not consumed)", self.name, done, why,
                       self.previous_queues[0] if self.previous_queues else self.config.queue, done)

    def subscription_prefetch(self) -> int:
        """Messages the broker may push ahead of the acks: ``prefetch`` (plain messages, one packet
        each, arrive on a destination's queue)."""
        return self.config.prefetch

    def on_database_open(self, db: Any) -> None:
        # one consumer of the queue per database: two would apply its batches side by side, out
        # of order (the same configuration started twice); a session lock, freed if this dies
        if not ledger.acquire_consumer_lock(db, self.config.queue,
                                            stale_holder=self.application_name):
            raise StopListener("another golconded consumes %s into this database (the same"
                               " configuration started twice, or the session of a daemon that"
                               " was killed?)%s: this listener waits, since two consumers of one"
                               " queue would apply its packets out of order"
                               % (self.config.queue, ledger.lock_holder(db, "consume:" + self.config.queue)),
                               retry_after=CONSUMER_RETRY, problem=False)
        # the queues it consumes first after a reload are locked too: a standby daemon of the
        # old configuration, waiting for the lock of its queue, would take the one being emptied
        # and apply it side by side with this one (review MM); one another session holds is
        # consumed there, in order, and left to it
        for previous in list(self.previous_queues):
            if not ledger.acquire_consumer_lock(db, previous, stale_holder=self.application_name):
                LOGGER.warning("[%s] %s, its queue before the reload, is consumed by another"
                               " session into this database%s: left to it", self.name, previous,
                               ledger.lock_holder(db, "consume:" + previous))
                self.previous_queues.remove(previous)
                self._previous_tries = 0
                if self._subscribed == previous:
                    # subscribed there (a database reconnect in the middle): leave it, as when
                    # it stays empty, its unacknowledged deliveries given back
                    self._drop_subscription()
        ledger.ensure(db)
        self.handler.setup(db)

    def reset(self) -> None:
        self._applying = None
        if self._in_flight or not self.inbound.connected:
            # a batch that failed half-way is unacked on a live connection: the broker would keep
            # it until that connection closes; closing makes it redeliver (the ledger de-duplicates)
            self._inbox.close()             # first: a receiver thread blocked on it must go on
            self.inbound.close()
            self._pending.clear()
            self._in_flight = False
        super().reset()

    def close(self) -> None:
        self._applying = None             # its packets go back to the broker: no longer held
        if self._pending and self.inbound.connected:
            try:
                self.settle(keep=0)           # ack what the broker confirmed before leaving
            except GolcondeError as exc:
                LOGGER.warning("[%s] unconfirmed sends at stop (redelivered later): %s", self.name, exc)
        self._pending.clear()
        self._inbox.close()               # a receiver thread blocked on it must read the receipt
        self.inbound.close()              # unacked deliveries go back to the broker
        super().close()

    def finish(self) -> None:
        try:
            self.handler.shutdown()
        except (Exception, SystemExit) as exc:
            LOGGER.warning("[%s] handler shutdown failed: %s", self.name, describe(exc))

    # -- the work --------------------------------------------------------------------------------
    def collect(self) -> List[Delivery]:
        """Deliveries of the current connection holding up to about ``batch_size`` packets (a batch
        message counts for its entries) and at most ``batch_bytes`` bytes of message bodies (the
        first delivery is taken whatever its size); waits up to 0.2 s for the first, not at all
        for the rest."""
        batch: List[Delivery] = []
        try:
            # short wait while committed batches wait for their acks (they are settled when idle)
            first, count, size = self._inbox.take(timeout=0.005 if self._pending else 0.2)
        except queue.Empty:
            return batch
        generation = self.inbound.generation
        packets, room = 0, self.config.batch_bytes
        if first.generation == generation:
            batch.append(first)
            packets += count
            room -= size
        while packets < self.config.batch_size and room > 0:
            try:
                delivery, count, size = self._inbox.take(max_bytes=room)
            except queue.Empty:
                break
            if delivery.generation == generation:
                batch.append(delivery)
                packets += count
                room -= size
        self.stats.set_backlog(self._inbox.packets)
        return batch

    def cycle(self) -> None:
        batch = self.collect()
        if not batch:
            # idle: ack what the broker confirmed, without waiting for the rest (collect() polls
            # every 5 ms while batches are pending), so that a slow receipt does not hold back
            # the packets arriving meanwhile
            self.settle(keep=len(self._pending))
            if not self._pending and not self._inbox.packets:
                self.stats.set_lag(0.0)        # nothing held: nothing is late
            self._maybe_prune()
            self._maybe_probe()
            self._maybe_leave_previous()
            return
        self._next_probe = time.monotonic() + DB_PROBE_INTERVAL
        self._in_flight = True
        deliveries = batch
        batch, items = expand(deliveries)      # one origin and one item per packet
        self.stats.count("received", len(items))
        self._applying = (len(items), _created(batch[0]) if batch else None)
        started = time.monotonic()
        # sent back from a dead-letter queue (golconde dlq replay): to be applied this time (not
        # when redelivered: it may have been dead-lettered again in the batch that came back)
        replayed = [pid for origin, (pid, _) in zip(batch, items)
                    if REPLAYED_HEADER in origin.headers and not origin.redelivered]
        lost = blocked = 0
        while True:
            try:
                outcomes = self.applier.apply_batch(self.db, items,
                                                    any(d.redelivered for d in deliveries),
                                                    replayed)
                break
            except Blocked as exc:
                # a lock another session holds (lock_timeout, statement_timeout): the session is
                # fine; the batch waits, without limit, a standing problem from the third time
                blocked += 1                # nothing committed: no outcome to correct below
                LOGGER.warning("[%s] blocked: %s", self.name, exc)
                self._failed("blocked: %s" % exc)
                self._stopping.wait(backoff(blocked, self.backoff_base, self.backoff_cap))
                if self.stopping or deliveries[0].generation != self.inbound.generation:
                    self._incomplete = True
                    return                  # not acked: the broker redelivers
            except ConnectionLost as exc:
                lost += 1
                message = self._session_lost(str(exc))
                LOGGER.warning("[%s] database connection lost or unusable: %s", self.name, message)
                self._failed(message)       # a standing problem if it goes on (a read-only database)
                if lost > 1:
                    # it failed again on a new session (a read-only database): back off
                    self._stopping.wait(backoff(lost - 1, self.backoff_base, self.backoff_cap))
                if (not self.reconnect_database() or not self.inbound.connected
                        or deliveries[0].generation != self.inbound.generation):
                    # (the new session may have left the queue of this batch to another one)
                    self._incomplete = True     # not through: its failures still count
                    return                 # not acked: the broker redelivers, the ledger de-duplicates
        if lost:
            # the lost attempt may have committed (its COMMIT's answer lost): a packet delivered
            # for the first time that the ledger now knows was applied by this very delivery
            for origin, outcome in zip(batch, outcomes):
                if outcome.status == DUPLICATE and not origin.redelivered:
                    outcome.status = APPLIED
        self._account(batch, outcomes, time.monotonic() - started)   # counts follow the commit
        # held until counted: the live lag covers the batch until its own lag is set
        self._applying = None
        self.pending_receipts, self.pending_fanned_out = [], 0
        self.after_commit(batch, items, outcomes)
        # Pipelined: the ack waits for the broker's receipts of this batch's sends, but the next
        # batch is applied meanwhile; acks are cumulative, so batches are acked in order.
        self._pending.add(self.pending_receipts, (deliveries[-1].ack_only(), self.pending_fanned_out))
        self.pending_receipts, self.pending_fanned_out = [], 0
        self.settle(keep=self.max_pipeline)
        self._maybe_prune()                    # under steady load too, not only when idle

    def settle(self, keep: int) -> None:
        """Ack the committed batches whose sends the broker confirmed, oldest first, waiting for
        the oldest while more than ``keep`` batches are pending (0: wait for all). A receipt
        overdue (30 s after its send) raises at once.

        :raises BrokerError: a send was refused or not confirmed in time (nothing more is acked;
            the supervising loop closes the connection, so the broker redelivers).
        """
        # 'client' ack mode: acking a batch's last delivery acks the batch
        before = len(self._pending)
        self._pending.settle(keep, self._acked)
        if len(self._pending) < before:
            self._last_activity = time.monotonic()  # the broker sends its next window now
        self._in_flight = bool(self._pending)

    def _acked(self, pending: Tuple[Delivery, int]) -> None:
        """Ack a confirmed batch (its last delivery), then count what it fanned out: once, the
        sends of a batch that comes back (not acked) being counted when it is acked."""
        delivery, fanned_out = pending
        if self.inbound.ack(delivery) and fanned_out:   # not acked: it comes back, counted then
            self.stats.count("fanned_out", fanned_out)

    def after_commit(self, batch: Sequence[Delivery], items: Sequence[Tuple[str, bytes]],
                     outcomes: Sequence[Outcome]) -> None:
        """Send dead letters (confirmed). Raises :class:`~golconde.broker.BrokerError` on failure,
        in which case nothing is acked."""
        self.send_dead_letters(batch, items, outcomes)

    def send_dead_letters(self, batch: Sequence[Delivery], items: Sequence[Tuple[str, bytes]],
                          outcomes: Sequence[Outcome]) -> None:
        dead = [(d, item[0]) for d, item, o in zip(batch, items, outcomes) if o.status == DEAD_LETTER]
        if dead:
            reasons = [o.reason or "unknown" for o in outcomes if o.status == DEAD_LETTER]
            self.dead_letter_broker.send_confirmed(self.dead_letter_messages(dead, reasons))
            self.dead_lettered(len(dead), reasons[-1])

    def _account(self, batch: Sequence[Delivery], outcomes: Sequence[Outcome], seconds: float) -> None:
        applied = [o for o in outcomes if o.status == APPLIED]
        counts = action_counts(packet for outcome in applied
                               for packet in (members(outcome.packet) if outcome.packet else ()))
        # one update: a reader never sees the batch's applied without its unmatched (dead
        # letters are counted once the broker has them: send_dead_letters)
        counts.update({"applied": len(applied), "unmatched": sum(o.unmatched for o in applied),
                       "duplicates": sum(1 for o in outcomes if o.status == DUPLICATE)})
        self.stats.count_many(counts)
        if applied:
            self.stats.observe_duration(seconds, packets=len(batch))
        created = _created(batch[-1]) if batch else None
        if created is not None:
            self.stats.set_lag(max(0.0, time.time() - created))

    def _maybe_probe(self) -> None:
        """While idle, every :data:`DB_PROBE_INTERVAL` seconds: check the database session
        (``SELECT 1``); a session found gone is closed, recorded as the last error, and opened
        again by the supervising loop (counted in ``reconnects``, or as a failed attempt)."""
        now = time.monotonic()
        if now < self._next_probe or self.db is None:
            return
        self._next_probe = now + DB_PROBE_INTERVAL
        problem = "connection closed" if self.db.closed else self._db_problem()
        if problem:
            message = self._session_lost("PostgreSQL session lost while idle: %s" % problem)
            LOGGER.warning("[%s] %s; reconnecting", self.name, message)
            self.stats.set_error(message)
            self._close_db()

    def _maybe_prune(self) -> None:
        """Prune the ledger (:func:`golconde.ledger.prune`) when it is due, idle or not: at most
        :data:`PRUNE_BUDGET` seconds at a time, again after :data:`PRUNE_RETRY` seconds while old
        rows are left."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        retention = self.config.ledger_retention
        interval = max(PRUNE_RETRY, min(PRUNE_INTERVAL, retention / 10.0))
        self._next_prune = now + interval
        try:
            deleted, done = ledger.prune(self.db, self.name, retention, time_budget=PRUNE_BUDGET)
            if deleted:
                LOGGER.info("[%s] pruned %d ledger rows older than %gs%s", self.name, deleted,
                            retention, "" if done else " (more left)")
            if not done:
                self._next_prune = time.monotonic() + PRUNE_RETRY
        except psycopg2.Error as exc:
            self.db.rollback()
            LOGGER.warning("[%s] ledger prune failed: %s", self.name, describe(exc))
