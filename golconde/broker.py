"""STOMP connections: connect with a timeout, subscribe with prefetch, confirmed persistent sends.

Built on stomp.py (STOMP 1.1). Facts this module relies on (see ``broker-facts.md``):

* ``on_message`` runs on stomp.py's single receiver thread, which also delivers RECEIPT frames, so
  messages are only *handed over* here (to a callback that queues them); waiting for a receipt
  happens on the listener's own thread.
* stomp.py does not reconnect or resubscribe after a lost connection: :class:`BrokerConnection`
  reports the loss (``connected`` turns false, ``generation`` changes on the next connect) and the
  owning listener thread reconnects.
* A RECEIPT for a persistent SEND arrives only once the broker has confirmed the message
  (RabbitMQ publisher confirms; ActiveMQ synchronous persistent sends), and frames on one
  connection are handled in order: a receipt on the last SEND of a batch confirms the batch.

Both RabbitMQ (STOMP plugin) and Apache ActiveMQ Classic are supported with the same frames
(checked against RabbitMQ 3.10 and ActiveMQ 5.17 by the integration tests):

* ``persistent:true`` on every SEND (ActiveMQ does not persist messages without it).
* Custom headers (``golconde-id``, ``golconde-reason``, ...) and ``content-type`` come back
  unchanged on both; ActiveMQ adds ``expires``, ``priority``, ``timestamp``, ``persistent``.
  A body sent with ``content-length`` (stomp.py always sends it) is a bytes message on ActiveMQ,
  so invalid UTF-8 reaches a dead-letter queue intact.
* Prefetch: ``prefetch-count`` (RabbitMQ) and ``activemq.prefetchSize`` (ActiveMQ) are both sent;
  each broker ignores the other's. ActiveMQ pages in only ``maxPageSize`` (default 200) messages
  per queue: its configuration must raise that above the prefetch (``scripts/setup-activemq.sh``
  sets 5000).
* ``client-individual`` acks by ``message-id`` + ``subscription`` on both. ``message-id`` changes on
  redelivery with RabbitMQ and is stable with ActiveMQ: identity comes from ``golconde-id``.
* Header values: a carriage return makes RabbitMQ drop the connection and a NUL ends the frame on
  both, so outgoing values are cleaned (:func:`header_value`).
"""
from __future__ import annotations

import errno
import logging
import math
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import List, Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import stomp
import stomp.exception

from .errors import GolcondeError

LOGGER = logging.getLogger(__name__)

#: Header carrying a packet's identity, stamped by the publisher (client, destination, trigger drain).
ID_HEADER = "golconde-id"
#: Header carrying when the change was made at the source (seconds since the epoch, float).
CREATED_HEADER = "golconde-created-at"
#: Longest header value golconded copies from a message it received into one it sends (a
#: ``content-type``, a ``golconde-batch`` count); ActiveMQ refuses a frame whose headers pass about
#: 10 KB (stomp.py's escaping may double a value), on every redelivery of the message.
MAX_COPIED_HEADER = 200


#: A number as golconded sends it on unchanged in ``golconde-created-at`` (ASCII, JSON's form).
_PLAIN_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def created_text(value: Any) -> Optional[str]:
    """A ``golconde-created-at`` value fit to send on, from a received header or a batch entry's
    ``created``: the text itself when it is a plain ASCII number (JSON's form) of at most 32
    characters, else the number as Python's shortest ``repr`` (at most 24 characters; Python
    also reads ``1_700``, ``+5`` and other scripts' digits); ``None`` when it is no finite number
    (a sender's header is copied into the fan-out and dead-letter messages, where the broker may
    refuse an overlong one for ever)."""
    if value is None or isinstance(value, bool):
        return None
    text = value if type(value) is str else str(value)
    # golconde's own ("%.3f"), at a fraction of the cost of the pattern below
    if (len(text) <= 32 and text.isascii() and text[:1].isdigit() and text[-1:].isdigit()
            and "e" not in text and "E" not in text):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and "_" not in text:
            return text
    text = text.strip()
    if len(text) <= 32 and _PLAIN_NUMBER.fullmatch(text):
        number = float(text)
        return text if math.isfinite(number) else None
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return repr(number) if math.isfinite(number) else None


def copied_header(value: Any, default: Optional[str] = None) -> Optional[str]:
    """A received header value to copy into a message golconded sends: ``value`` when it is at most
    :data:`MAX_COPIED_HEADER` characters, else ``default``."""
    if value is None:
        return default
    text = str(value)
    return text if len(text) <= MAX_COPIED_HEADER else default


#: Header ``golconde dlq replay`` puts on the packets it sends back (the dead-letter queue they
#: come from): the consumer applies them even though its ledger records them as dead-lettered.
REPLAYED_HEADER = "golconde-replayed-from"


class BrokerError(GolcondeError):
    """The broker connection failed, refused a frame, or did not confirm a send in time."""


@dataclass(frozen=True)
class Delivery:
    """A MESSAGE frame received on a subscription.

    :ivar body: the raw body (bytes: invalid UTF-8 must reach the dead-letter queue intact).
    :ivar headers: the frame's headers.
    :ivar generation: the connection generation it arrived on; acking is only possible on the
        same generation (after a reconnect the broker redelivers it anyway).
    :ivar received: when it arrived (epoch seconds; 0: unknown).
    """

    body: bytes
    headers: Mapping[str, str]
    generation: int
    received: float = 0.0

    @property
    def redelivered(self) -> bool:
        return str(self.headers.get("redelivered", "")).lower() == "true"

    def ack_only(self) -> "Delivery":
        """This delivery without its body: what an ack needs, kept while a batch awaits its
        receipts (so pending acks do not hold batch bodies of up to 1 MiB each)."""
        return Delivery(b"", self.headers, self.generation, self.received)


#: One message to send: (queue, body, headers).
Outgoing = Tuple[str, Union[str, bytes], Mapping[str, str]]


def header_value(value: Any) -> str:
    """A header value both brokers accept: ``str(value)`` with CR / CRLF turned into LF
    (RabbitMQ drops a connection whose frame has a bare CR in a header: STOMP 1.1 has no escape
    for it) and NUL into the text ``\\x00`` (NUL ends a frame). Colons, backslashes and LF are
    escaped by stomp.py."""
    text = value if isinstance(value, str) else str(value)
    if "\r" in text or "\x00" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "\\x00")
    return text


class _Listener(stomp.ConnectionListener):
    def __init__(self, owner: "BrokerConnection", generation: int) -> None:
        self.owner = owner
        self.generation = generation

    def on_connected(self, frame: Any) -> None:
        if self.generation != self.owner.generation:
            return          # a late answer to an attempt given up: not the connection waited for
        server = (getattr(frame, "headers", None) or {}).get("server")
        self.owner.server = server.decode("utf-8", "replace") if isinstance(server, bytes) else server
        self.owner._connected_event.set()

    def on_message(self, frame: Any) -> None:
        self.owner._deliver(frame, self.generation)

    def on_receipt(self, frame: Any) -> None:
        self.owner._receipt(frame.headers.get("receipt-id"), None)

    def on_error(self, frame: Any) -> None:
        message = frame.headers.get("message", "") if frame.headers else ""
        body = frame.body.decode("utf-8", "replace") if isinstance(frame.body, bytes) else str(frame.body)
        text = ("%s %s" % (message, body)).strip()[:500]
        LOGGER.warning("[%s] broker ERROR frame: %s", self.owner.name, text)
        self.owner.last_error = "broker ERROR: %s" % text
        self.owner._receipt(frame.headers.get("receipt-id") if frame.headers else None, text)
        self._wake_connect()

    def on_disconnected(self) -> None:
        self.owner._lost(self.generation, "disconnected")
        self._wake_connect()

    def _wake_connect(self) -> None:
        """A refused login (ERROR, then the broker closes) must not wait for connect()'s timeout."""
        if self.generation == self.owner.generation:
            self.owner._connected_event.set()

    def on_heartbeat_timeout(self) -> None:
        self.owner._lost(self.generation, "heart-beat timeout")


#: How long stomp.py waits for a frame from the broker, as a multiple of the negotiated
#: heart-beat interval, before it drops the connection (stomp.py's own default: 1.5).
HEARTBEAT_RECEIVE_SCALE = 2.5
#: Seconds :meth:`BrokerConnection.close` waits for the broker's receipt of DISCONNECT before it
#: closes the socket itself.
CLOSE_TIMEOUT = 5.0
#: Our heart-beats go out at this fraction of the interval we promised the broker.
HEARTBEAT_SEND_SCALE = 0.5


class _Connection(stomp.Connection11):
    """stomp.py's STOMP 1.1 connection with heart-beat margins both brokers accept.

    ActiveMQ sends a heart-beat only once it has written nothing for a whole interval, so after
    a MESSAGE its next frame may come almost two intervals later: stomp.py's default grace of
    1.5 intervals dropped such connections (:data:`HEARTBEAT_RECEIVE_SCALE`). And ActiveMQ checks
    at a fixed period equal to the interval we promised that something came in each period, with
    no grace: heart-beats sent at exactly that interval drift across a period's end, and the broker
    closes the connection ("Channel was inactive for too (>10000) long"). Ours go out twice as
    often as promised (:data:`HEARTBEAT_SEND_SCALE`), so every period sees one. (STOMP 1.1,
    "Heart-beating"; ActiveMQ's StompInactivityMonitor.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("heart_beat_receive_scale", HEARTBEAT_RECEIVE_SCALE)
        super().__init__(*args, **kwargs)

    def on_connected(self, frame: Any) -> None:
        super().on_connected(frame)         # negotiates the intervals, starts the heart-beat thread
        if getattr(self, "running", False) and getattr(self, "send_sleep", 0):
            self.send_sleep = self.send_sleep * HEARTBEAT_SEND_SCALE
            due = getattr(self, "next_outbound_heartbeat", None)
            if due is not None:
                self.next_outbound_heartbeat = min(due, time.monotonic() + self.send_sleep)


class BrokerConnection:
    """One STOMP connection owned by one listener thread.

    :param host, port: the broker's STOMP address.
    :param login, passcode, vhost: credentials and STOMP ``host`` header (``None`` = none sent).
    :param heartbeat_ms: heart-beat interval in milliseconds, both directions (0 = off).
    :param name: for log lines (the listener name).
    :param on_message: called with each :class:`Delivery`, on stomp.py's receiver thread: it must
        only queue the delivery (blocking while full, calling :meth:`hold` meanwhile).
    """

    #: whether :meth:`hold` has warned that it cannot work (once per process)
    _hold_warned = False

    def __init__(self, host: str, port: int, login: Optional[str] = None,
                 passcode: Optional[str] = None, vhost: Optional[str] = None,
                 heartbeat_ms: int = 10000, name: str = "",
                 on_message: Optional[Callable[[Delivery], None]] = None) -> None:
        self.host, self.port = host, int(port)
        self._login, self._passcode, self.vhost = login, passcode, vhost
        self.heartbeat_ms = int(heartbeat_ms)
        self.name = name or "%s:%d" % (host, port)
        self.on_message = on_message
        self.generation = 0
        self.last_error: Optional[str] = None
        #: why the broker connection was lost (stomp.py saw it close, or heart-beats stop),
        #: until its owner takes it (:meth:`take_lost`)
        self.lost: Optional[str] = None
        #: the CONNECTED frame's ``server`` header (``RabbitMQ/3.12.1``, ``ActiveMQ/5.17.2``), once
        #: connected, if the broker sent one
        self.server: Optional[str] = None
        self._conn: Optional[stomp.Connection11] = None
        self._connected_event = threading.Event()
        self._alive = False
        #: held while the connection object is swapped (connect, close), never while waiting
        self._swap_lock = threading.Lock()
        self._lock = threading.Lock()
        self._receipts: Dict[str, Optional[str]] = {}
        self._receipt_cond = threading.Condition(self._lock)

    @classmethod
    def from_config(cls, broker: Any, name: str = "",
                    on_message: Optional[Callable[[Delivery], None]] = None) -> "BrokerConnection":
        """Build from a :class:`golconde.config.BrokerConfig`."""
        return cls(broker.host, broker.port, broker.login, broker.passcode, broker.vhost,
                   broker.heartbeat_ms, name=name, on_message=on_message)

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    @classmethod
    def product(cls, broker: Any, timeout: float = 5.0) -> Optional[str]:
        """The ``server`` header of the CONNECTED frame of the broker of ``broker`` (a
        :class:`golconde.config.BrokerConfig`), e.g. ``RabbitMQ/3.12.1`` (one connection, closed
        at once); ``None`` when the broker does not say (STOMP 1.1, "CONNECTED Frame").

        :param timeout: seconds to wait for the connection.
        :raises BrokerError: it cannot connect (the broker is down, refuses the login...)."""
        connection = cls.from_config(broker, name="golconde-probe")
        try:
            connection.connect(timeout=timeout)
            return connection.server
        finally:
            connection.close()

    @property
    def connected(self) -> bool:
        """True while the connection is established and no loss has been reported."""
        conn = self._conn
        return bool(self._alive and conn is not None and conn.is_connected())

    # -- connection life cycle -------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Open the connection and wait for CONNECTED.

        :raises BrokerError: the socket could not connect, the broker refused the login, or no
            CONNECTED frame came within ``timeout`` seconds.
        """
        self.close()
        self.generation += 1
        with self._receipt_cond:
            self._receipts.clear()     # answers of the old connection (receipts of its sends fail)
        hb = max(0, self.heartbeat_ms)
        conn = _Connection([(self.host, self.port)], heartbeats=(hb, hb),
                                  reconnect_attempts_max=1, vhost=self.vhost, auto_decode=False,
                                  timeout=timeout, try_loopback_connect=False)
        self._connected_event = threading.Event()
        conn.set_listener("golconde", _Listener(self, self.generation))
        with self._swap_lock:
            self._conn = conn
        try:
            conn.connect(self._login, self._passcode, wait=False)
        except (stomp.exception.StompException, OSError) as exc:
            self.close()
            if (isinstance(exc, stomp.exception.NotConnectedException)
                    or isinstance(exc, OSError) and exc.errno in (errno.EBADF, errno.EPIPE, errno.ECONNRESET)):
                # the peer closed before the CONNECT frame was written (stomp.py closed the socket)
                raise self._closed_early() from None
            # stomp.py's ConnectFailedException has no message: it logged the socket's error
            reason = str(exc) or ("no connection accepted (is the broker running there?)"
                                  if isinstance(exc, stomp.exception.ConnectFailedException) else type(exc).__name__)
            raise BrokerError("cannot connect to STOMP broker %s: %s" % (self.address, reason)) from None
        _no_delay(conn)
        answered = self._connected_event.wait(timeout)
        with self._swap_lock:
            replaced = self._conn is not conn
            connected = not replaced and answered and conn.is_connected()
            if connected:
                self._alive = True
        if replaced:                        # close() from another thread meanwhile
            self._close_connection(conn, answering=False)
            raise BrokerError("connection to STOMP broker %s closed while connecting" % self.address)
        if not connected:
            refused = self.last_error       # an ERROR frame: the broker said no
            self.close()
            if refused:
                raise BrokerError("STOMP broker %s refused the connection: %s" % (self.address, refused))
            if answered:                    # woken by the connection's end, not by CONNECTED
                raise self._closed_early()
            raise BrokerError("STOMP broker %s did not answer: no CONNECTED frame within %.0fs"
                              % (self.address, timeout))
        self.last_error = None
        LOGGER.info("[%s] connected to STOMP broker %s", self.name, self.address)

    def _closed_early(self) -> BrokerError:
        """The broker closed the connection before its CONNECTED frame (stomp.py sees it as the
        CONNECT frame's write failing, or as the connection's end while waiting)."""
        return BrokerError("STOMP broker %s closed the connection without a CONNECTED frame"
                           " (is it a STOMP port?)" % self.address)

    def close(self) -> None:
        """Disconnect (best effort, never raises). Unacknowledged messages go back to the broker.
        Waits up to :data:`CLOSE_TIMEOUT` seconds for the broker to confirm, when it was
        answering; a connection whose broker stopped answering (a receipt overdue, heart-beats
        lost) or that never got its CONNECTED frame has its socket closed at once."""
        with self._swap_lock:
            conn, self._conn = self._conn, None
            answering = self._alive
            self._alive = False
        if conn is not None:
            self._close_connection(conn, answering)
        with self._receipt_cond:
            self._receipt_cond.notify_all()

    def _close_connection(self, conn: Any, answering: bool) -> None:
        try:
            if conn.is_connected():
                conn.disconnect()
        except Exception as exc:  # closing a broken connection: nothing more to do
            LOGGER.debug("[%s] error while disconnecting: %s", self.name, exc)
        # The broker answers DISCONNECT with a receipt, on which stomp.py closes the socket and its
        # receiver thread ends; transport.stop() waits for that without limit, so a broker that no
        # longer answers (hung, or a network that drops packets) would hold this call for ever;
        # and a connection that never got CONNECTED is not "connected" to stomp.py, whose
        # disconnect() then leaves its socket open (a late CONNECTED made it a live session).
        deadline = time.monotonic() + (CLOSE_TIMEOUT if answering else 0.0)
        try:
            while conn.is_connected() and time.monotonic() < deadline:
                time.sleep(0.005)
            if conn.is_connected() or not answering:
                if answering:
                    LOGGER.warning("[%s] %s did not confirm the disconnect within %gs; closing"
                                   " the socket", self.name, self.address, CLOSE_TIMEOUT)
                conn.transport.disconnect_socket()
            conn.transport.stop()
        except Exception:
            pass

    @property
    def hold_interval(self) -> float:
        """Seconds between :meth:`hold` calls: 0.5, or less for heart-beats under 1 s (a third of
        1.5 intervals; stomp.py gives up on a silent broker after
        :data:`HEARTBEAT_RECEIVE_SCALE`), at least 0.01."""
        if self.heartbeat_ms <= 0:
            return 0.5
        return max(0.01, min(0.5, self.heartbeat_ms / 1000.0 * 1.5 / 3))

    def hold(self) -> None:
        """Pretend, to stomp.py's heart-beat monitor, that a heart-beat just came, while the
        receiver thread deliberately stops reading (the listener's inbox is full: TCP
        backpressure). The broker's heart-beats then wait unread in the socket, and the monitor
        would take the silence for a dead broker after 1.5 negotiated intervals, drop the
        connection and have everything prefetched redelivered. Call it on the receiver thread
        every :attr:`hold_interval` seconds while blocked. Plain TCP only (stomp.py's blocking
        mode, where our own heart-beats keep going out from its heart-beat thread meanwhile).

        The price: a broker lost while the inbox is full is noticed when the listener next acks
        (the ack fails, the listener reconnects, the ledger drops what is redelivered) or once the
        receiver reads again, not by the heart-beat monitor; until then stomp.py logs an error
        for each heart-beat it fails to send. Never raises; if stomp.py's internals no longer
        allow it, warns once and does nothing."""
        conn = self._conn
        if conn is None:
            return
        try:
            # stomp.py's protocol (a HeartbeatListener) registers itself as "protocol-listener";
            # on_heartbeat() records a heart-beat received now (nothing while heart-beats are off)
            protocol = conn.get_listener("protocol-listener")
            if protocol is None or not hasattr(protocol, "on_heartbeat"):
                raise AttributeError("no stomp.py protocol listener with on_heartbeat()")
            protocol.on_heartbeat()
        except Exception as exc:  # stomp.py internals changed: lose only this protection
            if not BrokerConnection._hold_warned:
                BrokerConnection._hold_warned = True
                LOGGER.warning("[%s] cannot hold stomp.py's heart-beat monitor while the inbox is"
                               " full (%s): a long apply may drop the connection", self.name, exc)

    def _lost(self, generation: int, why: str) -> None:
        if generation == self.generation and self._alive:
            self._alive = False
            # a broker closing the connection on purpose says why first, in an ERROR frame
            self.lost = "lost STOMP connection to %s (%s%s)" % (
                self.address, why, "; %s" % " ".join(self.last_error.split()) if self.last_error else "")
            LOGGER.warning("[%s] %s", self.name, self.lost)
        with self._receipt_cond:
            self._receipt_cond.notify_all()

    def take_lost(self) -> Optional[str]:
        """Why the connection was lost since the last call (``"lost STOMP connection to
        host:port (disconnected)"``), or ``None``: a loss noticed by stomp.py's threads, which
        raised in no call of its owner."""
        lost, self.lost = self.lost, None
        return lost

    def _require(self) -> stomp.Connection11:
        conn = self._conn
        if conn is None or not self.connected:
            raise BrokerError("not connected to STOMP broker %s" % self.address)
        return conn

    # -- consuming -----------------------------------------------------------------------------
    def subscribe(self, queue: str, prefetch: int, ack: str = "client-individual") -> None:
        """Subscribe to ``queue`` with at most ``prefetch`` unacknowledged messages in flight
        (``prefetch-count`` for RabbitMQ, ``activemq.prefetchSize`` for ActiveMQ)."""
        conn = self._require()
        headers = {"prefetch-count": str(prefetch), "activemq.prefetchSize": str(prefetch)}
        conn.subscribe(queue, id=self.name or "golconde", ack=ack, headers=headers)

    def _deliver(self, frame: Any, generation: int) -> None:
        if self.on_message is None:
            return
        body = frame.body if isinstance(frame.body, bytes) else str(frame.body or "").encode("utf-8")
        self.on_message(Delivery(body, dict(frame.headers), generation, time.time()))

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge one delivery. Returns False (and does nothing) when the delivery came on an
        earlier connection: the broker will redeliver it.

        :raises BrokerError: the connection is gone.
        """
        if delivery.generation != self.generation:
            return False
        conn = self._require()
        try:
            conn.ack(delivery.headers["message-id"], delivery.headers.get("subscription"))
        except (stomp.exception.StompException, OSError) as exc:
            raise BrokerError("ack failed on %s: %s" % (self.address, exc)) from None
        return True

    # -- producing -----------------------------------------------------------------------------
    def _receipt(self, receipt_id: Optional[str], error: Optional[str]) -> None:
        with self._receipt_cond:
            if receipt_id is not None:
                self._receipts[receipt_id] = error
            elif error is not None:
                self._receipts["*"] = error
            self._receipt_cond.notify_all()

    def _write(self, messages: Sequence[Outgoing]) -> str:
        """Write persistent SEND frames, a receipt requested on the last; return the receipt id."""
        conn = self._require()
        receipt = "golconde-%s" % uuid.uuid4().hex
        with self._receipt_cond:
            self._receipts.pop("*", None)
        try:
            last = len(messages) - 1
            for index, (queue, body, headers) in enumerate(messages):
                frame_headers = {name: header_value(value) for name, value in headers.items()}
                frame_headers["persistent"] = "true"
                if index == last:
                    frame_headers["receipt"] = receipt
                conn.send(queue, body, headers=frame_headers)
        except (stomp.exception.StompException, OSError) as exc:
            self._alive = False
            raise BrokerError("send to %s failed: %s" % (self.address, exc)) from None
        return receipt

    def send_confirmed(self, messages: Sequence[Outgoing], timeout: float = 30.0) -> None:
        """Send ``messages`` as persistent messages and wait until the broker confirmed all of them
        (one receipt, on the last message).

        :raises BrokerError: the connection dropped, the broker answered ERROR, or no receipt
            came within ``timeout`` seconds. Some messages may then have been delivered:
            receivers de-duplicate by the ``golconde-id`` header.
        """
        if messages:
            self._wait_receipt(self._write(messages), timeout)

    def _wait_receipt(self, receipt: str, timeout: float, stated: Optional[float] = None) -> None:
        with self._receipt_cond:
            in_time = self._receipt_cond.wait_for(
                lambda: receipt in self._receipts or "*" in self._receipts or not self._alive,
                timeout)
            if receipt in self._receipts:
                error, confirmed = self._receipts.pop(receipt), True
            else:
                error, confirmed = self._receipts.pop("*", None), False
        if confirmed and error is None:
            return
        self._alive = False
        if error is not None:
            raise BrokerError("broker %s refused the send: %s" % (self.address, error))
        if not in_time:
            raise BrokerError("no receipt from %s within %gs" % (self.address,
                                                                 timeout if stated is None else stated))
        raise BrokerError("connection to %s lost before the send was confirmed" % self.address)


def _no_delay(conn: Any) -> None:
    """Turn Nagle's algorithm off on the connection's socket (stomp.py leaves it on). With it on,
    a frame written while the previous one is unacknowledged waits for the broker's delayed ACK:
    a batch sent to two targets (two SEND frames) waited 40 ms: one row's trip through the trigger
    flow took 54 ms with it on, 8.5 ms with it off (median of 30, unloaded)."""
    sock = getattr(getattr(conn, "transport", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        LOGGER.debug("cannot set TCP_NODELAY: %s", exc)


class Receipt:
    """A confirmation to come for messages written by :func:`send_all_async`.

    :meth:`done` tells without waiting whether the broker answered (or the connection is gone);
    :meth:`wait` waits and raises :class:`BrokerError` unless the broker confirmed.
    """

    def __init__(self, connection: BrokerConnection, receipt_id: str, timeout: float = 30.0) -> None:
        self.connection = connection
        self.receipt_id = receipt_id
        #: the connection's generation when sent: after a reconnect the answer can never come
        self.generation = connection.generation
        self.timeout = timeout
        #: monotonic time by which the broker must have answered (``timeout`` s after the send)
        self.deadline = time.monotonic() + timeout

    def done(self) -> bool:
        """True once the broker answered, the connection is gone or was reconnected, or the
        deadline passed (in those last cases :meth:`wait` raises at once)."""
        owner = self.connection
        with owner._receipt_cond:
            answered = self.receipt_id in owner._receipts or "*" in owner._receipts or not owner._alive
        return (answered or owner.generation != self.generation
                or time.monotonic() >= self.deadline)

    def wait(self) -> None:
        """Wait until the broker answers, at most until :attr:`deadline`.

        :raises BrokerError: as :meth:`BrokerConnection.send_confirmed`; "no receipt within
            ``timeout`` s" once the deadline has passed; the connection was reconnected since
            the send (its answer can never come).
        """
        if self.connection.generation != self.generation:
            raise BrokerError("connection to %s was reconnected before the send was confirmed"
                              % self.connection.address)
        self.connection._wait_receipt(self.receipt_id, max(0.0, self.deadline - time.monotonic()),
                                      stated=self.timeout)


def send_all_async(groups: Iterable[Tuple[BrokerConnection, Sequence[Outgoing]]],
                   timeout: float = 30.0) -> List[Receipt]:
    """Write several batches, each on its own connection, as persistent messages with a receipt
    requested on the last of each; return the :class:`Receipt` objects (each due within
    ``timeout`` seconds of now) without waiting.

    :raises BrokerError: a frame could not be written.
    """
    return [Receipt(connection, connection._write(messages), timeout)
            for connection, messages in groups if messages]


def send_all_confirmed(groups: Iterable[Tuple[BrokerConnection, Sequence[Outgoing]]],
                       timeout: float = 30.0) -> None:
    """Send several batches, each on its own connection, and wait for every confirmation.

    All frames are written first, then every receipt is awaited, so that N brokers cost one round
    trip rather than N.

    :param timeout: seconds to wait for each receipt.
    :raises BrokerError: as :meth:`BrokerConnection.send_confirmed`.
    """
    for receipt in send_all_async(groups, timeout):
        receipt.wait()
