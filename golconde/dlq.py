"""Dead-letter queues: list, replay and purge the packets a listener could not apply.

A listener dead-letters a packet with its body unchanged and the headers ``golconde-id``,
``golconde-reason``, ``golconde-original-queue``, ``golconde-consumer`` and
``golconde-dead-lettered-at`` (seconds since the epoch). :class:`DeadLetterQueue` works on one such
queue:

* :meth:`~DeadLetterQueue.list` reads packets without removing them: through RabbitMQ's management
  API (``POST /api/queues/<vhost>/<queue>/get`` with ``ackmode: ack_requeue_true``) when it
  answers, else over STOMP (subscribe with client-individual acks, never ack, disconnect: the broker
  puts the packets back). Either way the broker marks them ``redelivered``; a classic RabbitMQ queue
  keeps their order, other brokers may not.
* :meth:`~DeadLetterQueue.replay` sends each packet back to its ``golconde-original-queue`` with
  the same ``golconde-id`` and a ``golconde-replayed-from`` header (persistent, confirmed by a
  broker receipt), and only then acks it from the dead-letter queue. The consumer's ledger
  (``golconde.applied``) records a dead-lettered packet as such; the header makes the consumer
  drop that record, so a replay applies it once; replaying it again (e.g. after a crash between
  the send and the ack) is de-duplicated by that ledger.
* :meth:`~DeadLetterQueue.purge` acks (drops) packets.

Replay and purge consume over STOMP and take at most the number of packets the queue held when
they started (counted through the management API when it answers), so that a packet dead-lettered
again during a replay is not replayed in a loop; without the management API they stop when no
packet came for ``idle`` seconds or when a packet already replayed in this run comes back.
"""
from __future__ import annotations

import base64
import json
import logging
import queue as queue_module
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .broker import CREATED_HEADER, ID_HEADER, REPLAYED_HEADER, BrokerConnection, Delivery
from .envelope import BATCH_HEADER
from .errors import ConfigError, GolcondeError
from .ledger import normal_id
from .status import management_serves

LOGGER = logging.getLogger(__name__)

REASON_HEADER = "golconde-reason"
ORIGINAL_QUEUE_HEADER = "golconde-original-queue"
CONSUMER_HEADER = "golconde-consumer"
DEAD_LETTERED_AT_HEADER = "golconde-dead-lettered-at"
#: Headers a replayed packet keeps (besides ``persistent``, which every send sets).
REPLAY_HEADERS = (ID_HEADER, CREATED_HEADER, "golconde-destination", "content-type",
                  BATCH_HEADER)   # a malformed batch message dead-lettered whole
#: Most packets ``golconde dlq list --id`` reads to find them, unless ``--limit`` says otherwise.
LIST_ID_LIMIT = 10000
#: Port of RabbitMQ's management API, used when no URL is given.
MANAGEMENT_PORT = 15672
#: Packets per confirmed batch when replaying.
REPLAY_BATCH = 100
#: Prefetch when replaying or purging selected ids: packets passed over stay unacked, in flight.
SELECT_WINDOW = 5000


class DeadLetterError(GolcondeError):
    """A dead-letter queue operation failed (broker unreachable, send not confirmed...)."""


class ManagementUnavailable(GolcondeError):
    """The RabbitMQ management API cannot be used (not running, refused the login, not RabbitMQ)."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered packet.

    :ivar body: the body as read (at most the requested number of bytes when listing).
    :ivar size: the body's full size in bytes.
    :ivar headers: the message headers.
    """

    body: bytes
    size: int
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def packet_id(self) -> Optional[str]:
        return self.headers.get(ID_HEADER)

    @property
    def reason(self) -> Optional[str]:
        return self.headers.get(REASON_HEADER)

    @property
    def original_queue(self) -> Optional[str]:
        return self.headers.get(ORIGINAL_QUEUE_HEADER)

    @property
    def consumer(self) -> Optional[str]:
        return self.headers.get(CONSUMER_HEADER)

    @property
    def dead_lettered_at(self) -> Optional[str]:
        """When it was dead-lettered, ISO 8601 UTC (``None`` if the header is missing or bad)."""
        try:
            stamp = float(self.headers[DEAD_LETTERED_AT_HEADER])
            return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds")
        except (KeyError, ValueError, OverflowError, OSError):
            return None

    def body_text(self, limit: int) -> str:
        """The body as text, at most ``limit`` characters; invalid UTF-8 as ``\\xNN`` escapes."""
        text = self.body.decode("utf-8", "backslashreplace")
        return text if len(text) <= limit else text[:limit]

    def truncated(self, limit: int) -> bool:
        return self.size > len(self.body) or len(self.body.decode("utf-8", "backslashreplace")) > limit

    def as_dict(self, body_limit: int) -> Dict[str, Any]:
        """JSON-able view: ``golconde_id``, ``reason``, ``original_queue``, ``consumer``,
        ``dead_lettered_at``, ``body`` (at most ``body_limit`` characters), ``body_bytes`` (full
        size), ``body_truncated``."""
        return {"golconde_id": self.packet_id, "reason": self.reason,
                "original_queue": self.original_queue, "consumer": self.consumer,
                "dead_lettered_at": self.dead_lettered_at, "body": self.body_text(body_limit),
                "body_bytes": self.size, "body_truncated": self.truncated(body_limit)}


@dataclass
class Result:
    """What :meth:`DeadLetterQueue.replay` or :meth:`DeadLetterQueue.purge` did.

    :ivar done: packets replayed (or purged).
    :ivar skipped: ``(golconde-id, why)`` of packets left in the dead-letter queue.
    """

    done: int = 0
    skipped: List[Tuple[Optional[str], str]] = field(default_factory=list)


def amqp_queue_name(stomp_queue: str) -> Optional[str]:
    """The AMQP name of a RabbitMQ STOMP queue (``/queue/x`` and ``/amq/queue/x`` -> ``x``)."""
    for prefix in ("/queue/", "/amq/queue/"):
        if stomp_queue.startswith(prefix) and len(stomp_queue) > len(prefix):
            return stomp_queue[len(prefix):]
    return None


class ManagementAPI:
    """The few calls of RabbitMQ's management HTTP API this module needs.

    :param url: base URL, e.g. ``http://127.0.0.1:15672``.
    :param login, passcode: the broker user (the STOMP credentials).
    :param vhost: the virtual host (``None``: ``/``).
    :param timeout: seconds per request.
    """

    def __init__(self, url: str, login: Optional[str], passcode: Optional[str],
                 vhost: Optional[str] = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.vhost = vhost or "/"
        self.timeout = timeout
        self._auth = "Basic " + base64.b64encode(
            ("%s:%s" % (login or "guest", passcode or "guest")).encode("utf-8")).decode("ascii")

    def get(self, name: str, count: int, truncate: Optional[int] = None) -> List[Dict[str, Any]]:
        """Up to ``count`` messages of AMQP queue ``name``, requeued at once (``ack_requeue_true``);
        ``[]`` when the queue does not exist.

        :raises ManagementUnavailable: the API did not answer as RabbitMQ's does.
        """
        payload: Dict[str, Any] = {"count": count, "ackmode": "ack_requeue_true",
                                   "encoding": "auto"}
        if truncate is not None:
            payload["truncate"] = truncate
        path = "/api/queues/%s/%s/get" % (urllib.parse.quote(self.vhost, safe=""),
                                          urllib.parse.quote(name, safe=""))
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode("utf-8"),
                                         method="POST", headers={
                                             "Authorization": self._auth,
                                             "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and b"no queue" in exc.read():
                return []
            raise ManagementUnavailable("management API %s answered HTTP %d" % (self.url, exc.code)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ManagementUnavailable("management API %s: %s" % (self.url, exc)) from None
        if not isinstance(answer, list):
            raise ManagementUnavailable("management API %s: unexpected answer" % self.url)
        return answer

    def depth(self, name: str) -> int:
        """Messages in queue ``name`` now (exact: from ``basic.get``'s message count, not from the
        periodically refreshed statistics). Touches (requeues) the first message.

        :raises ManagementUnavailable: as :meth:`get`.
        """
        messages = self.get(name, 1, truncate=1)
        return int(messages[0].get("message_count", 0)) + 1 if messages else 0


def _from_management(message: Mapping[str, Any]) -> DeadLetter:
    properties = message.get("properties") or {}
    headers = {str(k): str(v) for k, v in (properties.get("headers") or {}).items()}
    if properties.get("content_type"):
        headers["content-type"] = properties["content_type"]
    payload = message.get("payload", "")
    if message.get("payload_encoding") == "base64":
        body = base64.b64decode(payload)
    else:
        body = payload.encode("utf-8")
    return DeadLetter(body, int(message.get("payload_bytes", len(body))), headers)


class DeadLetterQueue:
    """One dead-letter queue on one broker.

    :param broker: a :class:`golconde.config.BrokerConfig` (address, login, passcode, vhost).
    :param queue: the dead-letter queue, e.g. ``/queue/golconde.friendships.dlq``.
    :param management_url: the RabbitMQ management API's base URL; ``None``: port
        :data:`MANAGEMENT_PORT` of the broker's host where that API is the broker's
        (:func:`golconde.status.management_serves`); ``""``: never use it (STOMP only).
    :param idle: seconds without a new packet after which a STOMP read ends.
    """

    def __init__(self, broker: Any, queue: str, management_url: Optional[str] = None,
                 idle: float = 1.0) -> None:
        self.broker = broker
        self.queue = queue
        self.idle = idle
        name = amqp_queue_name(queue)
        guessed = management_url is None
        if guessed:
            host = "[%s]" % broker.host if ":" in broker.host else broker.host
            management_url = "http://%s:%d" % (host, MANAGEMENT_PORT)
        self.management = (ManagementAPI(management_url, broker.login, broker.passcode,
                                         broker.vhost) if management_url and name else None)
        if self.management is not None and guessed:
            # the default URL: only if that RabbitMQ is this broker (not one beside an ActiveMQ)
            why_not = management_serves(self.management.url, broker)
            if why_not is not None:
                LOGGER.info("%s; reading %s over STOMP", why_not, queue)
                self.management = None
        self._amqp_name = name
        #: how the last :meth:`list` read the queue: ``"management API"`` or ``"STOMP"``
        self.read_via: Optional[str] = None

    # -- reading ------------------------------------------------------------------------------
    def depth(self) -> Optional[int]:
        """Packets in the queue now, or ``None`` when the management API is not available."""
        if self.management is None:
            return None
        try:
            return self.management.depth(self._amqp_name or "")
        except ManagementUnavailable as exc:
            LOGGER.info("%s; counting %s over STOMP instead", exc, self.queue)
            return None

    def list(self, limit: int = 100, body_limit: int = 200) -> List[DeadLetter]:
        """Up to ``limit`` packets, oldest first, left in the queue (bodies read up to
        ``4 * body_limit + 4`` bytes through the management API, whole over STOMP).

        :raises DeadLetterError: neither the management API nor STOMP could read the queue.
        """
        if self.management is not None:
            try:
                messages = self.management.get(self._amqp_name or "", limit,
                                               truncate=4 * body_limit + 4)
                self.read_via = "management API"
                return [_from_management(message) for message in messages]
            except ManagementUnavailable as exc:
                LOGGER.warning("%s; reading %s over STOMP instead", exc, self.queue)
        self.read_via = "STOMP"
        connection, inbox = self._consume(prefetch=max(1, limit))
        try:
            deliveries = []
            while len(deliveries) < limit:
                delivery = self._next(inbox)
                if delivery is None:
                    break
                deliveries.append(delivery)
        finally:
            connection.close()          # nothing acked: the broker keeps every packet
        return [DeadLetter(d.body, len(d.body), d.headers) for d in deliveries]

    # -- replay and purge ---------------------------------------------------------------------
    def replay(self, limit: Optional[int] = None, ids: Optional[Iterable[str]] = None) -> Result:
        """Send up to ``limit`` packets (only those whose ``golconde-id`` is in ``ids``, if given)
        back to their original queue, each with its ``golconde-id``, persistent and confirmed;
        then ack them. Packets without a STOMP original queue (e.g. dead-lettered by a trigger-mode
        destination, ``golconde.queue``) are left in the dead-letter queue and reported.

        :raises DeadLetterError: the broker failed; packets not yet acked stay in the queue
            (those already sent are de-duplicated by the consumer's ledger if replayed again).
        """
        return self._drain(limit, ids, replay=True)

    def purge(self, limit: Optional[int] = None, ids: Optional[Iterable[str]] = None) -> Result:
        """Ack (drop) up to ``limit`` packets (only those whose ``golconde-id`` is in ``ids``, if
        given). :raises DeadLetterError: the broker failed."""
        return self._drain(limit, ids, replay=False)

    def _drain(self, limit: Optional[int], ids: Optional[Iterable[str]], replay: bool) -> Result:
        """Read the queue once (at most its depth, when known), replaying or purging up to
        ``limit`` packets among those selected (all, or those whose id is in ``ids``). Each id
        asked for and not found is reported in ``skipped``, with how many packets were read: a
        selection holds the packets it passes over unacknowledged, so it sees at most
        :data:`SELECT_WINDOW` of them at a time."""
        wanted = set(ids) if ids is not None else None
        depth = self.depth()
        result = Result()
        seen: set = set()
        scanned = 0
        if limit != 0 and depth != 0:
            scanned = self._take(limit, depth, wanted, replay, result, seen)
        if wanted is not None:
            reached = limit is not None and result.done >= limit
            for pid in sorted(wanted - seen):
                result.skipped.append((pid, (
                    "not reached: --limit %d was reached first" % limit if reached else
                    "not found among the %d packet(s) read%s" % (scanned, (
                        " (a selection reads at most %d at a time: replay or purge others"
                        " first)" % SELECT_WINDOW) if scanned >= SELECT_WINDOW else ""))))
        return result

    def _take(self, limit: Optional[int], depth: Optional[int], wanted: Optional[set],
              replay: bool, result: Result, seen: set) -> int:
        """:meth:`_drain`'s reading: replay or purge the selected packets by batches, counting
        them in ``result`` and their ids in ``seen``. :returns: the packets read."""
        # skipped packets stay unacked and hold prefetch slots: a selection needs a wider window
        window = SELECT_WINDOW if wanted is not None else REPLAY_BATCH
        bounds = [count for count in (window, depth, None if wanted else limit) if count]
        connection, inbox = self._consume(prefetch=min(bounds))
        scanned = 0
        try:
            while limit is None or result.done < limit:
                batch: List[Delivery] = []
                while (len(batch) < REPLAY_BATCH
                       and (limit is None or result.done + len(batch) < limit)
                       and (depth is None or scanned < depth)):
                    delivery = self._next(inbox, wait=not batch)
                    if delivery is None:
                        break
                    pid = delivery.headers.get(ID_HEADER)
                    if depth is None and pid is not None and pid in seen:
                        # dead-lettered again during this run: stop before looping over it
                        result.skipped.append((pid, "dead-lettered again during this run"))
                        depth = scanned
                        break
                    scanned += 1
                    why = self._skip_reason(delivery, wanted, replay)
                    if why:
                        result.skipped.append((pid, why))
                        continue
                    seen.add(pid)
                    batch.append(delivery)
                if not batch:
                    break
                if replay:
                    self._send_back(connection, batch)
                for delivery in batch:
                    connection.ack(delivery)
                result.done += len(batch)
                LOGGER.info("%s %d packet(s) from %s", "replayed" if replay else "purged",
                            len(batch), self.queue)
        except GolcondeError as exc:
            raise DeadLetterError("%s of %s stopped after %d packet(s): %s" % (
                "replay" if replay else "purge", self.queue, result.done, exc)) from None
        finally:
            connection.close()          # skipped (unacked) packets go back to the queue
        return scanned

    @staticmethod
    def _skip_reason(delivery: Delivery, wanted: Optional[set], replay: bool) -> Optional[str]:
        pid = delivery.headers.get(ID_HEADER)
        if wanted is not None and pid not in wanted:
            return "not selected"
        if not replay:
            return None
        if not pid:
            return "no %s header" % ID_HEADER
        original = delivery.headers.get(ORIGINAL_QUEUE_HEADER, "")
        if not original.startswith("/"):
            return ("original queue %r is not a STOMP queue (a trigger-mode dead letter): fix the "
                    "packet and send it to the targets with 'golconde send --to-targets'" % original)
        return None

    def _send_back(self, connection: BrokerConnection, batch: Sequence[Delivery]) -> None:
        messages = []
        for delivery in batch:
            headers = {key: delivery.headers[key] for key in REPLAY_HEADERS if key in delivery.headers}
            headers[REPLAYED_HEADER] = self.queue    # the consumer applies it, dead before or not
            messages.append((delivery.headers[ORIGINAL_QUEUE_HEADER], delivery.body, headers))
        connection.send_confirmed(messages)

    # -- STOMP --------------------------------------------------------------------------------
    def _consume(self, prefetch: int) -> Tuple[BrokerConnection, "queue_module.Queue[Delivery]"]:
        inbox: "queue_module.Queue[Delivery]" = queue_module.Queue()
        connection = BrokerConnection.from_config(self.broker, name="golconde-dlq",
                                                  on_message=inbox.put)
        try:
            connection.connect()
            connection.subscribe(self.queue, prefetch)
        except GolcondeError as exc:
            connection.close()
            raise DeadLetterError("cannot read %s: %s" % (self.queue, exc)) from None
        return connection, inbox

    def _next(self, inbox: "queue_module.Queue[Delivery]", wait: bool = True) -> Optional[Delivery]:
        try:
            return inbox.get(timeout=self.idle) if wait else inbox.get(timeout=0.05)
        except queue_module.Empty:
            return None


# -- choosing the queue from a configuration ------------------------------------------------------

def _queue_name(queue: str) -> str:
    """A queue's name without its STOMP prefix (``/queue/x``, ``/amq/queue/x`` and ``x`` name one
    queue)."""
    return amqp_queue_name(queue) or queue


def locate(config: Any, destination: Optional[str] = None, target: Optional[str] = None,
           queue: Optional[str] = None) -> Tuple[Any, str]:
    """``(broker config, dead-letter queue)`` of the destination (or of its target) named, or of
    the listener whose dead-letter queue is ``queue`` (any queue on the first destination's broker
    if none is).

    :raises ConfigError: no such destination or target, neither a destination nor a queue, or a
        queue a listener consumes (a purge there would drop live packets).
    """
    listeners = []
    for dest in config.destinations:
        listeners.append(dest)
        listeners.extend(dest.targets)
    if destination is not None:
        matches = [d for d in config.destinations if d.name == destination]
        if not matches:
            raise ConfigError("Destinations.%s: no such destination" % destination)
        chosen = matches[0]
        if target is not None:
            targets = [t for t in chosen.targets if t.name == target]
            if not targets:
                raise ConfigError("Destinations.%s.Targets.%s: no such target" % (destination, target))
            chosen = targets[0]
        if queue is not None and queue != chosen.dead_letter_queue:
            raise ConfigError("--queue %s is not the dead-letter queue of %s (%s)"
                              % (queue, chosen.thread_name, chosen.dead_letter_queue))
        return chosen.stomp, chosen.dead_letter_queue
    if target is not None:
        raise ConfigError("--target needs --destination")
    if queue is None:
        raise ConfigError("give --destination NAME [--target NAME] or --queue /queue/...")
    consumers = [item for item in listeners if _queue_name(item.queue) == _queue_name(queue)]
    if consumers:
        raise ConfigError("--queue %s is the queue %s consumes, not a dead-letter queue (its"
                          " dead-letter queue is %s)" % (queue, consumers[0].thread_name,
                                                         consumers[0].dead_letter_queue))
    owners = [item for item in listeners if item.dead_letter_queue == queue]
    return (owners[0] if owners else config.destinations[0]).stomp, queue


# -- the command ----------------------------------------------------------------------------------

def _print_list(dlq: DeadLetterQueue, letters: Sequence[DeadLetter], body_limit: int,
                as_json: bool, out: Any) -> None:
    if as_json:
        json.dump({"queue": dlq.queue, "read_via": dlq.read_via,
                   "packets": [letter.as_dict(body_limit) for letter in letters]}, out, indent=2)
        out.write("\n")
        return
    for number, letter in enumerate(letters, 1):
        out.write("%d. golconde-id: %s\n" % (number, letter.packet_id or "-"))
        out.write("   reason: %s\n" % (letter.reason or "-"))
        out.write("   original queue: %s   consumer: %s   dead-lettered at: %s\n" % (
            letter.original_queue or "-", letter.consumer or "-", letter.dead_lettered_at or "-"))
        suffix = " ... (%d bytes in all)" % letter.size if letter.truncated(body_limit) else ""
        out.write("   body: %s%s\n" % (letter.body_text(body_limit), suffix))
    out.write("%d dead-lettered packet(s) listed from %s (read via %s; they stay in the queue)\n"
              % (len(letters), dlq.queue, dlq.read_via))


def run(args: Any, config: Any, out: Any) -> int:
    """``golconde dlq list|replay|purge`` (``args`` from the argparse sub-command: ``operation``,
    ``destination``, ``target``, ``queue``, ``limit``, ``json``, ``yes``, ``id``,
    ``management_url``, ``body_limit``). Returns the exit status: 0 done, 1 some packets were
    skipped (``list --id``: some id not found), 2 usage error.

    :raises ConfigError: see :func:`locate`. :raises DeadLetterError: the broker failed.
    """
    broker, queue = locate(config, args.destination, args.target, args.queue)
    dlq = DeadLetterQueue(broker, queue, management_url=args.management_url)
    given = [normal_id(pid) for pid in args.id or ()]     # as the ledger and headers hold them
    if args.operation == "list":
        wanted = set(given)
        # with --id, the packets are looked for further than the 100 listed by default
        limit = args.limit if args.limit is not None else (LIST_ID_LIMIT if wanted else 100)
        letters = dlq.list(limit, args.body_limit)
        if wanted:
            letters = [letter for letter in letters if letter.packet_id in wanted]
        _print_list(dlq, letters, args.body_limit, args.json, out)
        missing = sorted(wanted - {letter.packet_id for letter in letters})
        for pid in missing:
            LOGGER.error("no packet with golconde-id %s among the first %d of %s", pid, limit, queue)
        return 1 if missing else 0
    if args.operation == "purge" and not args.yes:
        out.write("golconde: purge drops dead-lettered packets for good: add --yes to confirm\n")
        return 2
    ids = given or None
    result = dlq.replay(args.limit, ids) if args.operation == "replay" else dlq.purge(args.limit, ids)
    verb = "replayed" if args.operation == "replay" else "purged"
    problems = [(pid, why) for pid, why in result.skipped if why != "not selected"]
    if args.json:
        json.dump({"queue": queue, verb: result.done,
                   "skipped": [{"golconde_id": pid, "why": why} for pid, why in problems]}, out,
                  indent=2)
        out.write("\n")
    else:
        for pid, why in problems:
            out.write("left %s in %s: %s\n" % (pid or "a packet without golconde-id", queue, why))
        out.write("%s %d packet(s) from %s\n" % (verb, result.done, queue))
        if args.operation == "replay" and result.done:
            # applied after the packets that followed them, which replay does not repeat
            out.write("a replayed packet is applied after the packets that followed it: check the"
                      " targets with 'golconde compare' (README, Dead-letter queues)\n")
    return 1 if problems else 0
