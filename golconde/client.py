"""The Python client: application code enqueues packets on a destination without knowing STOMP.

Example::

    from golconde.client import Client
    with Client("/queue/golconde.friendships", host="127.0.0.1", port=61613,
                login="guest", passcode="guest") as client:
        client.add({"friend_id": 47, "user_id": 16, "status_id": 1})
        client.update({"status_id": 3}, restriction={"friend_id": 5, "user_id": 41})
        with client.batch():                   # one confirmation, packets packed in batch messages
            for row in rows:
                client.set(row)

Every packet is validated before it is sent (:class:`~golconde.errors.PacketError`), stamped with a
unique ``golconde-id`` (so a packet re-sent after a connection loss is applied once) and sent as a
persistent message; a call returns only once the broker confirmed it (a receipt), or raises
:class:`~golconde.broker.BrokerError`.

One client can be shared by threads (a web application's request threads, say): while one
thread's write waits for its receipt, what the others send queues up, and the next write carries
it all, packed into batch messages under one receipt (group commit). Each call still returns only
once its own packets are confirmed; a thread's packets stay in the order it sent them. Many
threads sending a packet or two each then make a few large messages instead of many small ones,
which is what the broker and the destination spend on (``broker-facts.md``); a call may wait
for the write in progress, then for the one that carries its packets. Connecting and the reply
queue's subscription (:meth:`Client.wait_outcome`) are shared too. :meth:`Client.batch` is per
thread.

Atomic groups and outcomes::

    with Client(queue, ..., reply_to="/queue/golconde.replies.app1") as client:
        with client.group() as group:          # applied all together, or not at all
            group.add({"id": 1, "name": "a"})
            group.update({"status_id": 2}, restriction={"id": 7})
        outcome = client.wait_outcome(group.id, timeout=30)   # {"id", "status", "reason"}

A group is sent as ONE message, ``{"group": [packet, ...]}``: the destination applies it in one
transaction (savepoint), records one id, fans it out as one message, and every target applies it
in one transaction too. STOMP transactions (BEGIN/COMMIT) would not do: RabbitMQ only buffers their
frames in the adapter, they are not durable (``broker-facts.md``), and the destination would still
see separate messages, possibly in separate batches.

With ``reply_to``, every message carries a ``reply-to`` header and the destination, after its
commit (or after dead-lettering it), sends the outcome there; :meth:`Client.wait_outcome` reads
it. Use one reply queue per client process: a reply read by another client is lost to this one.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .broker import CREATED_HEADER, ID_HEADER, BrokerConnection, BrokerError, Delivery, Outgoing
from .config import QUEUE_RE, QUEUE_TEXT, consumed_queues, queue_key
from .errors import ConfigError, GolcondeError, PacketError
from . import envelope, ledger
from .packet import MAX_PACKET_BYTES, Action, Group, Packet, loads, parse

LOGGER = logging.getLogger(__name__)
#: How long, in seconds, an outcome no one has waited for yet is kept for :meth:`Client.wait_outcome`
#: (a reply no one waits for, or one that came after its wait timed out, stayed for ever).
OUTCOME_TTL = 3600.0
#: Outcomes kept at most, whatever their age; beyond, the oldest are dropped (with a warning).
MAX_KEPT_OUTCOMES = 1000000

PacketLike = Union[Packet, Mapping[str, Any], str]
#: One packet to send: ``(packet_id, packet_json_text, created)`` (epoch seconds, as text).
Entry = Tuple[str, str, str]


class _Send:
    """One thread's entries waiting to be written (:meth:`Client._flush`)."""

    __slots__ = ("entries", "done", "error")

    def __init__(self, entries: List[Entry]) -> None:
        self.entries = entries
        self.done = False
        self.error: Optional[BaseException] = None


def _failed_elsewhere(error: BaseException, what: str) -> BrokerError:
    """The error for a thread whose work another thread did and failed at: ``error`` itself (a
    new BrokerError of its message) when the broker's, else a BrokerError saying that ``what``
    failed in another thread and how."""
    if isinstance(error, BrokerError):
        return BrokerError(str(error))
    return BrokerError("%s failed in another thread: %r" % (what, error))


class OutcomeTimeout(GolcondeError, TimeoutError):
    """No outcome arrived on the reply queue in time (the destination may be down or behind)."""


class PacketGroup:
    """Packets collected by :meth:`Client.group`, sent as one atomic group when the block ends.

    :ivar packets: the validated packets so far.
    :ivar id: the group's ``golconde-id``, set once it has been sent (``None`` before).
    """

    def __init__(self) -> None:
        self.packets: List[Packet] = []
        self.id: Optional[str] = None

    def send(self, packet: PacketLike) -> None:
        """Add a packet (a :class:`Packet`, a dict or JSON text). :raises PacketError:"""
        self.packets.append(packet if isinstance(packet, Packet) else parse(packet))

    def add(self, data: Mapping[str, Any]) -> None:
        """Add an ADD (INSERT) packet of ``data`` (column -> value). :raises PacketError:"""
        self.send({"action": "add", "data": dict(data)})

    def set(self, data: Mapping[str, Any]) -> None:
        """Add a SET (upsert) packet of ``data`` (column -> value). :raises PacketError:"""
        self.send({"action": "set", "data": dict(data)})

    def update(self, data: Mapping[str, Any], restriction: Mapping[str, Any]) -> None:
        """Add an UPDATE packet: ``data`` where ``restriction`` (column -> value each).
        :raises PacketError:"""
        self.send({"action": "update", "data": dict(data), "restriction": dict(restriction)})

    def delete(self, restriction: Mapping[str, Any]) -> None:
        """Add a DELETE packet of the rows matching ``restriction`` (column -> value).
        :raises PacketError:"""
        self.send({"action": "delete", "restriction": dict(restriction)})


def _destination(config: Any, name: str) -> Any:
    for destination in config.destinations:
        if destination.name == name:
            return destination
    raise ConfigError("Destinations.%s: no such destination" % name)


def packet_text(item: Union[Packet, Group]) -> str:
    """The JSON text a packet or group travels as.

    :raises PacketError: a value JSON cannot hold (a ``datetime``, a ``set``, NaN or an
        infinity), a text over :data:`golconde.packet.MAX_PACKET_BYTES` bytes of UTF-8 (the
        daemon would dead-letter it), or the text holds a lone surrogate (a JSON ``"\\ud800"`` escape, or bytes
        that were not UTF-8 read with ``surrogateescape``), which is no Unicode: stomp.py would
        send it as ``?``.
    """
    try:
        text = item.to_json()
    except (TypeError, ValueError) as exc:     # a datetime, a set, NaN or an infinity
        raise PacketError("packet cannot be written as JSON: %s (give dates and times as ISO 8601"
                          " text, numbers as finite int, float or Decimal)" % exc) from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise PacketError("packet text is not valid Unicode (%s at character %d): %.100s"
                          % (exc.reason, exc.start, text.encode("utf-8", "backslashreplace")
                             .decode("ascii", "replace"))) from None
    if size > MAX_PACKET_BYTES:     # the daemon would dead-letter it
        raise PacketError("packet is %d bytes of UTF-8, more than the %d allowed"
                          % (size, MAX_PACKET_BYTES))
    return text


class Client:
    """A connection to one destination queue.

    :param queue: the destination's queue (``/queue/golconde.<destination>``).
    :param host, port, login, passcode, vhost: the STOMP broker.
    :param timeout: seconds to wait for a connection or a confirmation.
    :param reply_to: a queue (``/queue/...``) where the destination sends the outcome of each
        message (see :meth:`wait_outcome`); ``None``: no outcomes. A queue of this client's own:
        a message there that is no outcome is left unacknowledged (it goes back to the queue when
        the client disconnects).
    :raises ConfigError: ``queue`` is not a queue name (``/queue/...`` or ``/amq/queue/...``), or
        ``reply_to`` is ``queue``.
    :param batch_messages: the packets of one :meth:`send_many` call or :meth:`batch` block go to
        the broker as batch messages (:mod:`golconde.envelope`: up to 500 packets or 1 MiB per
        message, each packet keeping its own id, outcome and dead letter), which costs the broker
        and the destination one message instead of one per packet; so do the packets of several
        threads sharing the client that go out in one write, a single :meth:`send` among them.
        ``False``: one message per packet, for a queue read by something other than golconded.
    """

    def __init__(self, queue: str, host: str = "127.0.0.1", port: int = 61613,
                 login: Optional[str] = None, passcode: Optional[str] = None,
                 vhost: Optional[str] = None, timeout: float = 30.0,
                 reply_to: Optional[str] = None, batch_messages: bool = True) -> None:
        if not isinstance(queue, str) or not QUEUE_RE.fullmatch(queue):
            # a topic, or a bare name, would take packets no destination reads
            raise ConfigError("queue: expected %s, got %r" % (QUEUE_TEXT, queue))
        if reply_to is not None and queue_key(reply_to.strip()) == queue_key(queue):
            # the client would read (and take) the packets it sends, as outcomes
            raise ConfigError("reply_to: %s is the queue the packets are sent to; give this client"
                              " a reply queue of its own" % queue)
        self.queue = queue
        self.batch_messages = batch_messages
        self.timeout = timeout
        self.reply_to = reply_to
        self.connection = BrokerConnection(host, port, login, passcode, vhost, heartbeat_ms=0,
                                           name="golconde-client", on_message=self._on_reply)
        self._local = threading.local()     # per thread: the packets of an open batch()
        self._send_cond = threading.Condition()
        self._connect_lock = threading.RLock()   # connecting, and the reply queue's subscription
        self._connects = 0                       # connection attempts made
        self._connect_error: Optional[BaseException] = None  # how the last attempt failed
        self._queued: List[_Send] = []      # sends waiting for the write in progress to end
        self._sending = False
        #: packet id -> (monotonic time received, outcome), oldest first
        self._outcomes: "collections.OrderedDict[str, Tuple[float, Dict[str, Any]]]" = \
            collections.OrderedDict()
        self._outcome_cond = threading.Condition()
        self._reply_generation: Optional[int] = None
        #: why the reply queue is not read any more: a message there was no outcome
        self._reply_refused: Optional[str] = None

    @classmethod
    def for_destination(cls, config: Any, name: str, timeout: float = 30.0,
                        reply_to: Optional[str] = None) -> "Client":
        """A client for destination ``name`` of a :class:`golconde.config.Config`.

        :param timeout: seconds to wait for a connection or a confirmation.
        :param reply_to: as for :class:`Client`.
        :raises ConfigError: no such destination, ``reply_to`` is a queue or dead-letter queue
            of the configuration, or the destination is in trigger mode: its daemon drains
            ``golconde.queue`` and consumes no broker queue, so packets sent there would wait
            unread (write the canonical table, or send to its targets: :meth:`for_targets`)."""
        destination = _destination(config, name)
        if reply_to is not None and queue_key(reply_to.strip()) in consumed_queues(config):
            raise ConfigError("reply_to: %s is a queue or dead-letter queue of the configuration:"
                              " the client would take the packets on it; give it a reply queue of"
                              " its own" % reply_to)
        if destination.mode == "trigger":
            raise ConfigError("Destinations.%s is in trigger mode: golconded reads its changes from"
                              " golconde.queue, not from %s, so packets sent there would wait"
                              " unread; write the canonical table (its capture trigger queues the"
                              " change), or send the packets to its targets (golconde send"
                              " --to-targets)" % (name, destination.queue))
        broker = destination.stomp
        return cls(destination.queue, broker.host, broker.port, broker.login, broker.passcode,
                   broker.vhost, timeout, reply_to=reply_to)

    @classmethod
    def for_targets(cls, config: Any, name: str, timeout: float = 30.0,
                    targets: Optional[Sequence[str]] = None) -> List["Client"]:
        """One client per target of destination ``name``, on the target's queue: packets sent
        with them skip the canonical relation (a repair, or a trigger-mode destination's dead
        letters once fixed), as if the destination had fanned them out.

        :param timeout: seconds to wait for the broker (connect, receipts).
        :param targets: names of the targets to address (as under the destination's
            ``Targets``), in the configuration's order whatever their order here; None: every
            target.
        :raises ConfigError: no such destination, it has no target, or ``targets`` names one it
            does not have (or none at all)."""
        destination = _destination(config, name)
        if not destination.targets:
            raise ConfigError("Destinations.%s has no target" % name)
        chosen = list(destination.targets)
        if isinstance(targets, str):
            targets = [targets]
        if targets is not None:
            known = [target.name for target in destination.targets]
            unknown = sorted(set(targets) - set(known))
            if unknown:
                raise ConfigError("Destinations.%s has no target %s (its targets: %s)" % (
                    name, ", ".join(unknown), ", ".join(known)))
            if not targets:
                raise ConfigError("Destinations.%s: no target chosen" % name)
            chosen = [target for target in destination.targets if target.name in set(targets)]
        return [cls(target.queue, target.stomp.host, target.stomp.port, target.stomp.login,
                    target.stomp.passcode, target.stomp.vhost, timeout)
                for target in chosen]

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now (otherwise the first send connects). :raises BrokerError:"""
        self._connect(self._connects)

    def _connect(self, seen: int) -> None:
        """Connect unless connected. Threads sharing the client connect one at a time; one that
        waited while another's attempt failed (an attempt made after ``seen``, the count of
        attempts when it decided to connect) takes that failure instead of making its own
        attempt, so that N threads facing a broker that does not answer wait one ``timeout``,
        not N. :raises BrokerError:"""
        with self._connect_lock:
            if self.connection.connected:
                return
            if self._connects != seen and self._connect_error is not None:
                raise _failed_elsewhere(self._connect_error, "connecting") from self._connect_error
            error: Optional[BaseException] = None
            try:
                self.connection.connect(self.timeout)
            except BaseException as exc:
                error = exc
                raise
            finally:
                # counted once it ended: a thread that came during this attempt takes its outcome
                self._connects += 1
                self._connect_error = error

    def close(self) -> None:
        """Disconnect from the broker (the reply subscription too). A thread sending or waiting
        for an outcome meanwhile connects again."""
        self.connection.close()

    # -- packets -----------------------------------------------------------------------------------
    def add(self, data: Mapping[str, Any]) -> str:
        """Enqueue an ADD (INSERT) packet of ``data`` (column -> value).

        :returns: its packet id. :raises PacketError, BrokerError: as :meth:`send`."""
        return self.send({"action": "add", "data": dict(data)})

    def set(self, data: Mapping[str, Any]) -> str:
        """Enqueue a SET (upsert on the primary key or a unique key) packet of ``data``.

        :returns: its packet id. :raises PacketError, BrokerError: as :meth:`send`."""
        return self.send({"action": "set", "data": dict(data)})

    def update(self, data: Mapping[str, Any], restriction: Mapping[str, Any]) -> str:
        """Enqueue an UPDATE packet: ``data`` where ``restriction`` (column -> value each).

        :returns: its packet id. :raises PacketError, BrokerError: as :meth:`send`."""
        return self.send({"action": "update", "data": dict(data), "restriction": dict(restriction)})

    def delete(self, restriction: Mapping[str, Any]) -> str:
        """Enqueue a DELETE packet: rows matching ``restriction`` (column -> value).

        :returns: its packet id. :raises PacketError, BrokerError: as :meth:`send`."""
        return self.send({"action": "delete", "restriction": dict(restriction)})

    def send(self, packet: Union[Packet, Mapping[str, Any], str]) -> str:
        """Validate and enqueue one packet (a :class:`Packet`, a dict or JSON text).

        :returns: the packet id (``golconde-id`` header).
        :raises PacketError: the packet is invalid (nothing is sent).
        :raises BrokerError: the broker did not confirm it (after one reconnect and re-send).
        """
        return self.send_many([packet])[0]

    def send_many(self, packets: Sequence[Union[Packet, Mapping[str, Any], str]]) -> List[str]:
        """Enqueue several packets with one confirmation, packed into batch messages unless
        :attr:`batch_messages` is off. Returns their ids, in order.

        :raises PacketError: a packet is invalid (nothing is sent).
        :raises BrokerError: as :meth:`send`.
        """
        if isinstance(packets, (str, bytes, bytearray, Mapping)):
            raise PacketError("send_many takes a sequence of packets, not one packet (%s): use"
                              " send" % type(packets).__name__)
        parsed = [packet if isinstance(packet, Packet) else parse(packet) for packet in packets]
        return self._enqueue(parsed)

    def send_group(self, packets: Sequence[PacketLike]) -> str:
        """Enqueue ``packets`` as one atomic group: one message ``{"group": [...]}``, applied
        whole or not at all, at the destination and at every target.

        :returns: the group's id (``golconde-id``), for :meth:`wait_outcome`.
        :raises PacketError: no packets, or an invalid one (nothing is sent).
        :raises BrokerError: as :meth:`send`.
        """
        members = [packet if isinstance(packet, Packet) else parse(packet) for packet in packets]
        if not members:
            raise PacketError("group is empty (expected at least one packet)")
        return self._enqueue([Group(tuple(members))])[0]

    @contextlib.contextmanager
    def group(self) -> Iterator[PacketGroup]:
        """Collect packets (``group.add(...)``...) and send them as one group when the block ends
        (nothing is sent if it raises). The id is then in ``group.id``.

        :raises PacketError: the block added no packet.
        """
        collected = PacketGroup()
        yield collected
        collected.id = self.send_group(collected.packets)

    def _enqueue(self, items: Sequence[Union[Packet, Group]]) -> List[str]:
        entries: List[Entry] = []
        created = "%.3f" % time.time()
        for item in items:
            entries.append((ledger.new_packet_id(), packet_text(item), created))
        if self._pending is not None:
            self._pending.extend(entries)
        else:
            self._flush(entries)
        return [pid for pid, _, _ in entries]

    def messages(self, entries: Sequence[Entry]) -> List[Outgoing]:
        """The broker messages for ``entries`` = ``[(packet_id, packet_json_text, created), ...]``:
        batch messages (:func:`golconde.envelope.encode`, headers ``golconde-batch`` and
        ``golconde-created-at``, that of its first entry) when
        :attr:`batch_messages` is set and there are several, else one message per packet with its
        ``golconde-id`` and ``golconde-created-at`` headers. Every message is JSON, persistent
        (set by the connection) and carries ``reply-to`` when the client has one."""
        common = {"content-type": "application/json"}
        if self.reply_to:
            common["reply-to"] = self.reply_to
        if self.batch_messages and len(entries) > 1:
            return [(self.queue, body, dict(common, **{envelope.BATCH_HEADER: str(count),
                                                       CREATED_HEADER: created}))
                    for body, count, created in envelope.with_created(entries)]
        return [(self.queue, text, dict(common, **{ID_HEADER: pid, CREATED_HEADER: created}))
                for pid, text, created in entries]

    def wait_outcome(self, packet_id: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Wait for the outcome of the message ``packet_id`` on the reply queue.

        :param timeout: seconds (default: the client's ``timeout``).
        :returns: ``{"id": packet_id, "status": "applied" | "duplicate" | "dead-lettered",
            "reason": None | str}``; ``duplicate`` means applied before (a re-send). Replies are
            kept until waited for, for :data:`OUTCOME_TTL` seconds and at most
            :data:`MAX_KEPT_OUTCOMES` of them.
        :raises GolcondeError: the client has no ``reply_to``.
        :raises ConfigError: a message on the reply queue was no outcome (see :meth:`_on_reply`).
        :raises OutcomeTimeout: nothing arrived in time.
        :raises BrokerError: the broker connection failed.
        """
        if not self.reply_to:
            raise GolcondeError("wait_outcome() needs a client created with reply_to=/queue/...")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            with self._outcome_cond:        # one received before a bad message is still there
                found = self._outcomes.pop(packet_id)[1] if packet_id in self._outcomes else None
            if found is not None:
                self._give_back_replies()
                return found
            self._leave_reply_queue()
            seen = self._connects
            with self._connect_lock:    # one subscription per connection, whatever the threads
                if not self.connection.connected or self._reply_generation != self.connection.generation:
                    self._connect(seen)
                    self.connection.subscribe(self.reply_to, 100)
                    self._reply_generation = self.connection.generation
            with self._outcome_cond:
                remaining = deadline - time.monotonic()
                if packet_id in self._outcomes:
                    return self._outcomes.pop(packet_id)[1]
                if remaining <= 0:
                    raise OutcomeTimeout("no outcome for %s on %s" % (packet_id, self.reply_to))
                if self._reply_refused is None:
                    self._outcome_cond.wait(min(remaining, 0.5))

    def _leave_reply_queue(self) -> None:
        """Once a message on the reply queue was no outcome: close the connection (the messages
        this client holds unacknowledged go back to the queue at once, for whoever reads it) and
        raise; the reply queue is not read again.

        :raises ConfigError: the reply queue holds messages that are no outcomes."""
        if self._reply_refused is None:
            return
        self._give_back_replies()
        raise ConfigError(self._reply_refused)

    def _give_back_replies(self) -> None:
        """Once the reply queue is refused (:meth:`_on_reply`), close the connection if it still
        holds the reply subscription: what it holds unacknowledged goes back to the queue."""
        with self._connect_lock:
            close = self._reply_refused is not None and self._reply_generation is not None
            if close:
                self._reply_generation = None
        if close:                   # not under the lock: a close can wait for a silent broker
            self.connection.close()

    def _on_reply(self, delivery: Delivery) -> None:
        """On stomp.py's receiver thread: keep the outcome, ack it (no receipt is awaited here).
        A message that is no outcome is not acknowledged, nor any after it: the reply queue is
        read by something else too, or is no reply queue (a target's, say), whose messages must not
        be taken; the next :meth:`wait_outcome` or send closes the connection, which gives them
        back, and :meth:`wait_outcome` raises from then on."""
        if self._reply_refused is not None:
            return
        try:
            outcome = loads(delivery.body)
            if not isinstance(outcome, dict) or "status" not in outcome:
                raise PacketError("not an outcome")
            pid = str(delivery.headers.get(ID_HEADER) or outcome.get("id"))
            with self._outcome_cond:
                # a batch delivered again (its ack lost to a fault) is answered again:
                # "duplicate" then does not replace what the first delivery did
                known = self._outcomes.get(pid)
                now = time.monotonic()
                if known is None or outcome.get("status") != "duplicate" \
                        or known[1].get("status") == "duplicate":
                    self._outcomes[pid] = (now, outcome)
                    self._outcomes.move_to_end(pid)
                self._forget_outcomes(now)
                self._outcome_cond.notify_all()
        except PacketError as exc:
            what = "not an outcome" if str(exc) == "not an outcome" else "no outcome (%s)" % exc
            with self._outcome_cond:
                self._reply_refused = (
                    "reply_to: a message on %s is %s: it is no reply queue of this client's own"
                    " (something else sends or reads there); the client stopped reading it and"
                    " gave its messages back, unacknowledged (a client reading it next meets that"
                    " message too: purge the queue, or give each client a queue of its own)"
                    % (self.reply_to, what))
                self._outcome_cond.notify_all()
            LOGGER.error("%s", self._reply_refused)
            return
        try:
            self.connection.ack(delivery)
        except BrokerError as exc:
            LOGGER.debug("could not ack a reply: %s", exc)

    def _forget_outcomes(self, now: float) -> None:
        """Drop the outcomes no one waited for within :data:`OUTCOME_TTL`, and the oldest beyond
        :data:`MAX_KEPT_OUTCOMES` (warned: a wait for them would time out)."""
        dropped = 0
        while self._outcomes:
            pid, (received, _) = next(iter(self._outcomes.items()))
            if now - received < OUTCOME_TTL and len(self._outcomes) <= MAX_KEPT_OUTCOMES:
                break
            del self._outcomes[pid]
            dropped += 1
        if dropped:
            LOGGER.warning("%d outcome(s) on %s dropped: not waited for within %.0f s, or over %d"
                           " kept", dropped, self.reply_to, OUTCOME_TTL, MAX_KEPT_OUTCOMES)

    @property
    def _pending(self) -> Optional[List[Entry]]:
        return getattr(self._local, "pending", None)

    @_pending.setter
    def _pending(self, value: Optional[List[Entry]]) -> None:
        self._local.pending = value

    @contextlib.contextmanager
    def batch(self) -> Iterator["Client"]:
        """Collect the packets sent inside the block and confirm them together at its end."""
        outer = self._pending is not None
        if not outer:
            self._pending = []
        try:
            yield self
            if not outer:
                self._flush(self._pending or [])
        finally:
            if not outer:
                self._pending = None

    def _flush(self, entries: List[Entry]) -> None:
        """Send ``entries`` and wait for the broker's confirmation. Threads sharing the client
        send together: while one thread's write waits for its receipt, the entries of the others
        queue up, and the first of them to find no write in progress sends them all in one write
        with one receipt (as PostgreSQL flushes the WAL of the commits that queued behind a flush
        in one go), so that many threads sending a few packets each make few broker messages. A
        call may wait for the write in progress (two attempts, each a connect and a receipt of up to
        ``timeout`` each) and then for the write that carries its entries.

        :raises BrokerError: as :meth:`send`: in the thread that wrote, and in every thread whose
            entries the failed write carried (a failure other than the broker's, in the thread
            that wrote, is raised there as itself and as BrokerError in the others).
        """
        if not entries:
            return
        mine = _Send(entries)
        taken: Optional[List[_Send]] = None
        error: Optional[BaseException] = None
        try:
            with self._send_cond:
                self._queued.append(mine)
                while self._sending and not mine.done:
                    self._send_cond.wait()
                if not mine.done:
                    taken, self._queued = self._queued, []
                    self._sending = True
            if taken is None:               # carried by another thread's write
                if mine.error is not None:
                    raise _failed_elsewhere(mine.error, "the write carrying these packets") from mine.error
                return
            self._write([entry for send in taken for entry in send.entries])
        except BaseException as exc:
            error = exc
            raise
        finally:
            # also when interrupted (KeyboardInterrupt) anywhere above: a write taken is ended,
            # an entry still queued is withdrawn (not sent), so that no thread waits for ever
            with self._send_cond:
                if taken is None:
                    if mine in self._queued:
                        self._queued.remove(mine)
                else:
                    for send in taken:
                        send.done, send.error = True, error
                    self._sending = False
                    self._send_cond.notify_all()

    def _write(self, entries: List[Entry]) -> None:
        messages = self.messages(entries)
        self._give_back_replies()
        for attempt in (1, 2):
            try:
                self.connect()
                self.connection.send_confirmed(messages, self.timeout)
                return
            except BrokerError:
                self.connection.close()
                if attempt == 2:
                    raise


__all__ = ["Client", "PacketGroup", "OutcomeTimeout", "Action", "Packet", "Group"]
