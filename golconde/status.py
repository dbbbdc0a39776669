"""``golconde status``: each destination and its targets, as a tree (after ``londiste status``).

For every listener (destination or target) of a configuration it reports the state of its
connections, backlog, lag, rates and last error. Sources:

* the daemon's ``GET /stats`` (the ``HTTPServer`` of the configuration, or ``--url``): states,
  counters, lag, last error; two snapshots ``interval`` seconds apart give the rates;
* the broker, where it can tell: RabbitMQ's management API
  ``GET /api/queues/<vhost>/<queue>`` (port 15672, the listener's broker login) gives the number of
  messages waiting in the listener's queue (ready + unacknowledged; a destination's fan-out message
  may carry a batch of packets) and in its dead-letter queue.
  Where that fails (another broker, no management plugin), and for a trigger-mode destination
  (whose backlog is its queue table), the backlog comes from ``/stats``.

:func:`collect` returns a JSON-able document (``golconde status --json``); :func:`render` draws
the tree.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .metrics import iter_threads

LOGGER = logging.getLogger(__name__)

#: Default port of RabbitMQ's management API.
MANAGEMENT_PORT = 15672


def queue_name(destination: str) -> str:
    """The broker's queue name of a STOMP destination: ``/queue/x`` and ``/amq/queue/x`` -> ``x``."""
    for prefix in ("/amq/queue/", "/queue/"):
        if destination.startswith(prefix):
            return destination[len(prefix):]
    return destination


def daemon_url(config: Any) -> Optional[str]:
    """``http://host:port`` of the daemon's HTTP server per ``config``, or ``None`` if disabled.
    A wildcard listen address (``0.0.0.0``, ``::``) is reached on the loopback address."""
    http = config.http
    if not http.enabled:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(http.listen, http.listen)
    return ("http://[%s]:%d" if ":" in host else "http://%s:%d") % (host, http.port)


def _get_json(url: str, timeout: float, auth: Optional[Tuple[str, str]] = None) -> Any:
    """Decoded JSON of ``GET url``.

    :raises OSError: (urllib.error.URLError, HTTPError, socket errors) when it cannot be had.
    :raises ValueError: when the body is not JSON.
    """
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth is not None:
        token = b64encode(("%s:%s" % auth).encode("utf-8")).decode("ascii")
        request.add_header("Authorization", "Basic " + token)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def management_serves(base: str, broker: Any, timeout: float = 5.0) -> Optional[str]:
    """Whether the RabbitMQ management API guessed for ``broker`` (a
    :class:`golconde.config.BrokerConfig`) at ``base`` (its host, port 15672) may be used: the
    broker says it is RabbitMQ (the ``server`` header of its STOMP CONNECTED frame,
    :meth:`golconde.broker.BrokerConnection.product`). An ActiveMQ on the host of a RabbitMQ
    would otherwise be read through that RabbitMQ, which holds none of its queues ("0 packets").
    A broker that does not say is given the benefit of the doubt; one that cannot be reached is
    not (a RabbitMQ beside a stopped ActiveMQ would answer for it: its queues, or "0 packets").

    :param timeout: seconds to wait for the broker's STOMP connection.
    :returns: ``None`` when it may be used, else why not (text).
    """
    from .broker import BrokerConnection, BrokerError
    try:
        product = BrokerConnection.product(broker, timeout)
    except BrokerError as exc:
        return ("%s: whether the management API at %s is its own cannot be told" % (exc, base))
    if product is None or product.lower().startswith("rabbitmq"):
        return None
    return ("the broker at %s:%d is %s, not RabbitMQ: the management API at %s is not its own"
            % (broker.host, broker.port, product, base))


def _not_found(error: urllib.error.HTTPError) -> bool:
    """Whether a 404 is RabbitMQ's management API saying the queue does not exist
    (``{"error": "Object Not Found", ...}``), not some other server at that URL."""
    try:
        document = json.loads(error.read())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("error") == "Object Not Found"


class Management:
    """RabbitMQ management API client for queue depths, one base URL per broker host.

    :param url: base URL (``http://host:15672``) for every broker; ``None``: each broker's host on
        :data:`MANAGEMENT_PORT`, used only for a broker that says it is RabbitMQ
        (:func:`management_serves`).
    :param timeout: seconds per request.
    """

    def __init__(self, url: Optional[str] = None, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/") if url else None
        self.timeout = timeout
        self._down: Dict[str, str] = {}     # base URL -> why it is not used any more
        #: (host, STOMP port) -> why the guessed URL is not that broker's (None: it may be used)
        self._verdicts: Dict[Tuple[str, int], Optional[str]] = {}

    def base(self, broker: Any) -> str:
        if self.url:
            return self.url
        host = broker.host
        return ("http://[%s]:%d" if ":" in host else "http://%s:%d") % (host, MANAGEMENT_PORT)

    def depth(self, broker: Any, destination: str) -> Tuple[Optional[int], Optional[str]]:
        """(messages in the queue of STOMP ``destination`` - ready plus unacknowledged - , None),
        or (None, why not). A queue the broker does not know yet holds 0 messages."""
        base = self.base(broker)
        if base in self._down:
            return None, self._down[base]
        if not self.url:                # the guessed URL: only for a RabbitMQ
            address = (broker.host, broker.port)
            if address not in self._verdicts:
                self._verdicts[address] = management_serves(base, broker, self.timeout)
            if self._verdicts[address] is not None:
                return None, self._verdicts[address]
        vhost = broker.vhost or "/"
        url = "%s/api/queues/%s/%s?columns=messages,messages_ready,messages_unacknowledged" % (
            base, urllib.parse.quote(vhost, safe=""), urllib.parse.quote(queue_name(destination), safe=""))
        try:
            document = _get_json(url, self.timeout, (broker.login or "guest", broker.passcode or "guest"))
            if isinstance(document, dict) and "messages" in document:
                return int(document["messages"] or 0), None
            # RabbitMQ answers so for a queue whose statistics are not collected yet
            why, permanent = "management API %s: no statistics yet for %s" % (base, destination), False
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and _not_found(exc):
                return 0, None      # RabbitMQ's answer for a queue it does not have (yet)
            why = "management API %s: HTTP %d" % (base, exc.code)
            permanent = exc.code in (401, 403)
        except (OSError, ValueError) as exc:
            why = "management API %s: %s" % (base, getattr(exc, "reason", exc))
            permanent = True
        if permanent:
            self._down[base] = why          # do not wait on it again for every queue
        LOGGER.debug("queue depth of %s not available: %s", destination, why)
        return None, why


def _rate(now: Dict[str, Any], before: Optional[Dict[str, Any]], key: str,
          seconds: float) -> Optional[float]:
    if before is None or seconds <= 0:
        return None
    delta = now.get(key, 0) - before.get(key, 0)
    return round(delta / seconds, 2) if delta >= 0 else None


def _state(stats: Optional[Dict[str, Any]]) -> str:
    if stats is None:
        return "unknown"
    if stats.get("broker") == "connected" and stats.get("database") == "connected":
        return "up"
    states = (stats.get("broker"), stats.get("database"))
    return "down" if "stopped" in states or "disconnected" in states else "connecting"


def _read_daemon(url: str, interval: float, timeout: float
                 ) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]], float]:
    """One daemon's ``/stats``, twice ``interval`` apart: ``(daemon entry, threads now, threads
    before, seconds between)`` (no threads when it cannot be read: the entry says why)."""
    daemon: Dict[str, Any] = {"url": url, "reachable": False, "error": None, "version": None,
                              "uptime": None}
    try:
        first = _get_json(url.rstrip("/") + "/stats", timeout)
        started = time.monotonic()
        before: Dict[str, Dict[str, Any]] = {}
        seconds = 0.0
        if interval > 0:
            time.sleep(interval)
            before = dict(iter_threads(first))
            snapshot = _get_json(url.rstrip("/") + "/stats", timeout)
            seconds = time.monotonic() - started
        else:
            snapshot = first
        daemon.update(reachable=True, version=snapshot.get("version"), uptime=snapshot.get("uptime"))
        return daemon, dict(iter_threads(snapshot)), before, seconds
    except (OSError, ValueError) as exc:
        daemon["error"] = "cannot read %s/stats: %s" % (url.rstrip("/"), getattr(exc, "reason", exc))
        return daemon, {}, {}, 0.0


def collect(config: Any, url: Union[None, str, Sequence[str]] = None,
            management: Optional[Management] = None,
            interval: float = 1.0, timeout: float = 5.0, destination: Optional[str] = None,
            progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda items: items,
            ) -> Dict[str, Any]:
    """The status of every listener of ``config`` (or of ``destination`` only).

    :param url: the daemon's base URL (default: :func:`daemon_url`), or the URLs of the daemons
        one configuration is spread over (``golconded --only``): each listener is read from the
        first daemon that runs it.
    :param management: queue depths from RabbitMQ (``None``: only from the daemon).
    :param interval: seconds between the two ``/stats`` snapshots that give rates (0: no rates).
    :param progress: wraps the iteration over listeners (e.g. a progress bar).
    :returns: ``{"daemon": {"url", "reachable", "error", "version", "uptime"},
        "daemons": [{the same, for each URL}], "destinations": [{..., "targets": [...]}]}``
        (``daemon``: the first URL's, ``reachable`` only when every one answered, ``error``
        naming each that did not); each destination and target has ``name``,
        ``thread``, ``role``, ``queue``, ``relation``, ``state`` (``up``, ``down``, ``connecting``,
        ``unknown``), ``broker``, ``database``, ``backlog``, ``backlog_source`` (``broker``,
        ``daemon`` or null), ``dead_letter_backlog`` (packets waiting in its dead-letter queue, from
        the broker, or null), ``lag`` (seconds), ``applied_rate`` and ``received_rate`` (packets
        per second over the interval), ``applied``,
        ``errors``, ``dead_lettered``, ``unmatched`` (updates and deletes applied without
        finding their row, and a destination's adds and sets its triggers refused), ``last_error``,
        ``last_error_at``, ``problems`` (texts of
        its standing problems, :meth:`golconde.stats.ThreadStats.set_problem`).
    """
    urls = [url] if isinstance(url, str) else list(url or [])
    urls = urls or [u for u in [daemon_url(config)] if u]
    stats: Dict[str, Dict[str, Any]] = {}
    before: Dict[str, Dict[str, Any]] = {}
    seconds: Dict[str, float] = {}
    daemons = []
    for address in urls:
        found, now, then, elapsed = _read_daemon(address, interval, timeout)
        daemons.append(found)
        for thread, figures in now.items():
            if thread not in stats:                 # the first daemon that runs it
                stats[thread] = figures
                seconds[thread] = elapsed
                if thread in then:
                    before[thread] = then[thread]
    if daemons:
        errors = [d["error"] for d in daemons if d["error"]]
        daemon = dict(daemons[0], reachable=not errors, error="; ".join(errors) or None)
    else:
        daemon = {"url": None, "reachable": False, "version": None, "uptime": None,
                  "error": "HTTPServer disabled in the configuration (give --url)"}
    destinations = [d for d in config.destinations if destination in (None, d.name)]
    items = [(d, None) for d in destinations] + [(d, t) for d in destinations for t in d.targets]
    entries: Dict[Tuple[str, Optional[str]], Dict[str, Any]] = {}
    for dest, target in progress(items):
        item = target or dest
        thread = item.thread_name
        current = stats.get(thread)
        entry: Dict[str, Any] = {
            "name": item.name, "thread": thread, "role": "target" if target else "destination",
            "queue": item.queue, "relation": item.target, "state": _state(current),
            "broker": current.get("broker") if current else None,
            "database": current.get("database") if current else None,
            "backlog": None, "backlog_source": None, "dead_letter_backlog": None,
            "lag": current.get("lag") if current else None,
            "applied_rate": (_rate(current, before.get(thread), "applied", seconds.get(thread, 0.0))
                     if current else None),
            "received_rate": (_rate(current, before.get(thread), "received",
                                    seconds.get(thread, 0.0)) if current else None),
        }
        for key in ("applied", "errors", "dead_lettered", "unmatched", "last_error",
                    "last_error_at"):
            entry[key] = current.get(key) if current else None
        entry["problems"] = list(current.get("problems") or ()) if current else []
        consumes_queue = target is not None or dest.mode == "client"
        if management is not None and consumes_queue:
            depth, why = management.depth(item.stomp, item.queue)
            if depth is not None:
                entry.update(backlog=depth, backlog_source="broker")
            entry["dead_letter_backlog"] = management.depth(item.stomp, item.dead_letter_queue)[0]
            if why:
                entry["backlog_note"] = why
        if entry["backlog"] is None and current and current.get("backlog") is not None:
            entry.update(backlog=current["backlog"], backlog_source="daemon")
        if target is None:
            entry["mode"] = dest.mode
        entries[(dest.name, target.name if target else None)] = entry
    result = []
    for dest in destinations:
        entry = dict(entries[(dest.name, None)])
        entry["targets"] = [entries[(dest.name, t.name)] for t in dest.targets]
        result.append(entry)
    return {"daemon": daemon, "daemons": daemons, "destinations": result}


def healthy(document: Dict[str, Any]) -> bool:
    """True when the daemon answered and every listener is up with no standing problem."""
    listeners = [d for d in document["destinations"]] + [
        t for d in document["destinations"] for t in d["targets"]]
    return document["daemon"]["reachable"] and all(
        item["state"] == "up" and not item.get("problems") for item in listeners)


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value < 1:
        return "%.0f ms" % (value * 1000)
    if value < 120:
        return "%.1f s" % value
    return "%.1f min" % (value / 60)


def _number(value: Any) -> str:
    return "-" if value is None else str(value)


def _lines(entry: Dict[str, Any]) -> List[str]:
    backlog = _number(entry["backlog"])
    if entry["backlog_source"]:
        backlog += " (%s)" % entry["backlog_source"]
    rate = "-" if entry["applied_rate"] is None else "%.1f" % entry["applied_rate"]
    figures = "backlog %s, lag %s, %s packets/s, applied %s, errors %s, dead-lettered %s" % (
        backlog, _seconds(entry["lag"]), rate, _number(entry["applied"]),
        _number(entry["errors"]), _number(entry["dead_lettered"]))
    if entry.get("unmatched"):          # when any (README "Packets": what each role counts)
        figures += ", unmatched %d" % entry["unmatched"]
    if entry["dead_letter_backlog"]:
        figures += ", %d waiting in the dead-letter queue" % entry["dead_letter_backlog"]
    lines = ["broker %s, database %s" % (entry["broker"] or "?", entry["database"] or "?"), figures]
    if entry["last_error"]:
        lines.append("last error (%s): %s" % (entry["last_error_at"], entry["last_error"]))
    lines.extend("problem: %s" % problem for problem in entry.get("problems") or ())
    return lines


def render(document: Dict[str, Any]) -> str:
    """The status document as a tree, one destination after the other::

        golconded 1.0.0 at http://127.0.0.1:8080 (up 3.2 min)
        Friendships  destination (client mode)  UP  /queue/golconde.friendships -> public.friendships
        |   broker connected, database connected
        |   backlog 0 (broker), lag 12 ms, 40.0 packets/s, applied 120, errors 0, dead-lettered 0
        +-- target1  UP  /queue/golconde.friendships.target1 -> public.friendships
        |       ...
        +-- target2  DOWN  ...
                last error (...): ...
    """
    out = []
    for daemon in document.get("daemons") or [document["daemon"]]:
        if daemon["reachable"]:
            out.append("golconded %s at %s (up %s)" % (daemon["version"], daemon["url"],
                                                       _seconds(daemon["uptime"])))
        else:
            out.append("golconded: %s" % daemon["error"])
    for dest in document["destinations"]:
        out.append("%s  destination (%s mode)  %s  %s -> %s" % (
            dest["name"], dest["mode"], dest["state"].upper(),
            dest["queue"] if dest["mode"] == "client" else "queue table", dest["relation"]))
        last = len(dest["targets"]) - 1
        prefix = "|   " if dest["targets"] else "    "
        out.extend(prefix + line for line in _lines(dest))
        for index, target in enumerate(dest["targets"]):
            out.append("+-- %s  %s  %s -> %s" % (target["name"], target["state"].upper(),
                                                 target["queue"], target["relation"]))
            inner = ("|       " if index < last else "        ")
            out.extend(inner + line for line in _lines(target))
    return "\n".join(out)
