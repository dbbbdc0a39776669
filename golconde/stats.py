"""Thread-safe activity counters of the listener threads, read by the HTTP side.

Each listener thread (one per destination, one per target) owns a :class:`ThreadStats` obtained from
the daemon's :class:`Registry`; it counts what it does and reports the state of its connections.
The HTTP server (:mod:`golconde.httpd`) only calls :meth:`Registry.snapshot`: it never touches a
database or a broker. Counters are a :class:`collections.Counter` under a lock, after psycopg_pool's
``get_stats()``.

Shape of :meth:`Registry.snapshot` (a superset of Golconde 0.6's ``/stats``)::

    {"worker_threads": 2,
     "threads": [{"<name>": {"add": 0, "set": 0, "update": 0, "delete": 0,
                             "command_duration": 0.0012,   # mean seconds per packet
                             "last_duration": 0.0009,      # seconds of the last packet or batch, or null
                             "apply_duration": {"le": [0.0005, ..., 60.0],  # DURATION_BUCKETS
                                                "cumulative": [0, ..., 7, 7],  # one more: +Inf
                                                "sum": 0.0084, "count": 7},  # seconds, packets
                             "errors": 0, "received": 0, "applied": 0, "duplicates": 0,
                             "dead_lettered": 0, "retried": 0, "fanned_out": 0, "reconnects": 0,
                             "unmatched": 0,   # packets applied without changing a row
                             "role": "destination" | "target", "destination": "<destination name>",
                             "broker": "<state>", "database": "<state>",
                             "backlog": 12 | null, "lag": 0.5 | null,
                             "last_error": "<text>" | null,
                             "last_error_at": "2024-01-01T00:00:00.000+00:00" | null,
                             "problems": ["<text>", ...]}},   # standing conditions, see set_problem
                 ...],
     "uptime": 12.5,            # seconds since the registry was created
     "version": "1.0.0"}

Target threads are named ``<destination>_<target>``, as in 2009. Counters only grow, so that a
reader can compute rates from two snapshots.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from . import __version__

LOGGER = logging.getLogger(__name__)

#: Roles of a listener thread.
ROLES = ("destination", "target")
#: Connection states reported for the broker and the database.
STATES = ("connected", "connecting", "disconnected", "stopped")
#: Per-action counters (the 2009 keys).
ACTION_KEYS = ("add", "set", "update", "delete")
#: Every counter accepted by :meth:`ThreadStats.count`, in display order.
COUNTER_KEYS = ("received", "applied") + ACTION_KEYS + (
    "duplicates", "fanned_out", "retried", "dead_lettered", "errors", "reconnects", "unmatched")

_COUNTER_SET = frozenset(COUNTER_KEYS)

#: Upper bounds, in seconds, of the apply-duration histogram buckets (a last, implicit +Inf bucket
#: follows). Each packet of a batch of ``n`` packets applied in ``s`` seconds is one observation of
#: ``s / n`` seconds, so that the histogram's sum / count is ``command_duration``.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0)


def _now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds, e.g. ``2024-01-01T00:00:00.000+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def action_counts(packets: Iterable[Any]) -> "Counter[str]":
    """How many of ``packets`` (:class:`~golconde.packet.Packet`) each action counts
    (``{"add": n, "update": m, ...}``), for :meth:`ThreadStats.count_many`."""
    return Counter(packet.action.value for packet in packets)


class ThreadStats:
    """Counters and state of one listener thread. Every method is thread-safe.

    :param name: the thread's name (``<destination>`` or ``<destination>_<target>``).
    :param role: ``"destination"`` or ``"target"``.
    :param destination: name of the destination the thread belongs to.

    Both connection states start as ``"disconnected"``; backlog, lag and last error start as ``None``.
    """

    def __init__(self, name: str, role: str, destination: str) -> None:
        if role not in ROLES:
            raise ValueError("role must be one of %s, not %r" % (", ".join(ROLES), role))
        self.name = name
        self.role = role
        self.destination = destination
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._unknown: Set[str] = set()
        self._duration_last: Optional[float] = None
        self._duration_total = 0.0
        self._duration_packets = 0
        self._duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)   # not cumulative; last: +Inf
        self._broker = "disconnected"
        self._database = "disconnected"
        self._backlog: Optional[int] = None
        self._lag: Optional[float] = None
        self._live: Optional[Callable[[], Tuple[Optional[int], Optional[float]]]] = None
        self._last_error: Optional[str] = None
        self._last_error_at: Optional[str] = None
        self._problems: Dict[str, str] = {}

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` (>= 0) to the counter ``key``, one of :data:`COUNTER_KEYS`.

        An unknown key is ignored, with one warning per key and thread: statistics must never stop
        a listener.

        :raises ValueError: if ``n`` is not an integer >= 0 (counters only grow).
        """
        self.count_many({key: n})

    def count_many(self, counts: Dict[str, int]) -> None:
        """Add each ``counts[key]`` (>= 0) to the counter ``key`` at once: a snapshot sees all of
        them added or none (a batch's ``applied`` with its ``unmatched``, say). Unknown keys as in
        :meth:`count`.

        :raises ValueError: if a value is not an integer >= 0 (nothing is added then).
        """
        known = {}
        for key, n in counts.items():
            if key not in _COUNTER_SET:
                with self._lock:
                    first = key not in self._unknown
                    self._unknown.add(key)
                if first:
                    LOGGER.warning("[%s] unknown statistics counter %r ignored (expected one of"
                                   " %s)", self.name, key, ", ".join(COUNTER_KEYS))
                continue
            if not isinstance(n, int) or n < 0:
                raise ValueError("counter %r takes an integer n >= 0, not %r" % (key, n))
            known[key] = n
        with self._lock:
            for key, n in known.items():
                self._counts[key] += n

    def observe_duration(self, seconds: float, packets: int = 1) -> None:
        """Record the time taken to apply one packet, or a batch of ``packets`` packets.

        ``command_duration`` in the snapshot is the mean over all packets (total seconds / packets);
        ``last_duration`` is ``seconds`` of the last call. The ``apply_duration`` histogram counts
        ``packets`` observations of ``seconds / packets`` each (see :data:`DURATION_BUCKETS`).

        :raises ValueError: if ``seconds`` is negative or not finite, or ``packets`` < 1.
        """
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("duration must be a finite number of seconds >= 0, not %r" % seconds)
        if packets < 1:
            raise ValueError("packets must be >= 1, not %r" % packets)
        index = bisect.bisect_left(DURATION_BUCKETS, seconds / packets)  # bucket: value <= le
        with self._lock:
            self._duration_last = seconds
            self._duration_total += seconds
            self._duration_packets += packets
            self._duration_buckets[index] += packets

    def set_state(self, broker: Optional[str] = None, database: Optional[str] = None) -> None:
        """Set the state of the broker and/or database connection (``None`` leaves it unchanged).

        :raises ValueError: on a state not in :data:`STATES`.
        """
        for state in (broker, database):
            if state is not None and state not in STATES:
                raise ValueError("state must be one of %s, not %r" % (", ".join(STATES), state))
        with self._lock:
            if broker is not None:
                self._broker = broker
            if database is not None:
                self._database = database

    def set_error(self, message: Optional[str]) -> None:
        """Remember ``message`` as the last error, stamped with the current UTC time; ``None``
        clears both. This does not count an error: call ``count("errors")`` for that."""
        with self._lock:
            if message is None:
                self._last_error = self._last_error_at = None
            else:
                self._last_error = str(message)
                self._last_error_at = _now_iso()

    def set_problem(self, key: str, message: Optional[str]) -> bool:
        """Set (``message``) or clear (``None``) the standing problem ``key``: a condition that
        holds until the listener sees it gone (a capture trigger whose key columns are not the
        table's primary key, say), unlike ``last_error``, which the next error replaces. The
        snapshot lists the problems' texts under ``problems``; the health check
        (:func:`golconde.metrics.health`) fails while there is one.

        :returns: True when this changed the problem (a new or other text, or one cleared), so
            that the caller logs it once, not at every check."""
        with self._lock:
            previous = self._problems.pop(key, None)
            if message is not None:
                self._problems[key] = str(message)
            return previous != (None if message is None else str(message))

    def set_backlog(self, n: Optional[int]) -> None:
        """Set the number of packets waiting in the thread's queue (``None``: unknown).

        :raises ValueError: ``n`` is negative."""
        if n is not None:
            n = int(n)
            if n < 0:
                raise ValueError("backlog cannot be negative, not %r" % n)
        with self._lock:
            self._backlog = n

    def set_live(self, source: Optional[Callable[[], Tuple[Optional[int], Optional[float]]]]) -> None:
        """Give :meth:`snapshot` the figures that move while the thread is busy (applying a
        batch, waiting on a lock): ``source()`` returns ``(packets held, created)``, the packets
        the thread holds (waiting or being applied) and the creation time (epoch seconds) of the
        oldest of them, each ``None`` when unknown. The snapshot's backlog is then at least the
        packets held, and its lag at least the age of the oldest, so that a stuck thread shows.
        ``source`` runs on the reader's thread; it must be quick and never block."""
        with self._lock:
            self._live = source

    def set_lag(self, seconds: Optional[float]) -> None:
        """Set how old, in seconds, the last applied packet was (``None``: unknown). A negative
        value (clock skew between hosts) is recorded as 0.

        :raises ValueError: if ``seconds`` is not finite.
        """
        if seconds is not None:
            seconds = float(seconds)
            if not math.isfinite(seconds):
                raise ValueError("lag must be a finite number of seconds, not %r" % seconds)
            seconds = max(seconds, 0.0)
        with self._lock:
            self._lag = seconds

    def snapshot(self) -> Dict[str, Any]:
        """A consistent copy of this thread's statistics: the inner dict of the module docstring's
        shape (without the name), JSON-serialisable. Backlog and lag take in the live figures of
        :meth:`set_live`."""
        held = oldest = None
        live = self._live
        if live is not None:
            try:
                held, oldest = live()
            except Exception:  # statistics must never fail a reader
                held = oldest = None
        with self._lock:
            counts = dict(self._counts)
            total, packets, last = self._duration_total, self._duration_packets, self._duration_last
            buckets = list(self._duration_buckets)
            result: Dict[str, Any] = {key: counts.get(key, 0) for key in COUNTER_KEYS}
            result.update({
                "command_duration": total / packets if packets else 0.0,
                "last_duration": last,
                "apply_duration": {"le": list(DURATION_BUCKETS),
                                   "cumulative": list(itertools.accumulate(buckets)),
                                   "sum": total, "count": packets},
                "role": self.role,
                "destination": self.destination,
                "broker": self._broker,
                "database": self._database,
                "backlog": (self._backlog if held is None
                            else max(int(held), self._backlog or 0)),
                "lag": (self._lag if oldest is None
                        else max(self._lag or 0.0, time.time() - float(oldest), 0.0)),
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
                "problems": [self._problems[key] for key in sorted(self._problems)],
            })
        return result

    def __repr__(self) -> str:
        return "<ThreadStats %s role=%s destination=%s>" % (self.name, self.role, self.destination)


class Registry:
    """The daemon's set of :class:`ThreadStats`, by thread name, in creation order. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: Dict[str, ThreadStats] = {}
        self._started = time.monotonic()

    def thread(self, name: str, role: str, destination: str) -> ThreadStats:
        """Return the statistics of thread ``name``, creating them on first use. Counters survive
        a listener's restart (e.g. after a reload) as long as the name is the same.

        :raises ValueError: if ``name`` exists with another role or destination (e.g. a destination
            named ``a_b`` and the target ``b`` of destination ``a``).
        """
        with self._lock:
            stats = self._threads.get(name)
            if stats is None:
                stats = self._threads[name] = ThreadStats(name, role, destination)
            elif (stats.role, stats.destination) != (role, destination):
                raise ValueError("thread name %r is already used by the %s of destination %r"
                                 % (name, stats.role, stats.destination))
            return stats

    def get(self, name: str) -> Optional[ThreadStats]:
        """The statistics of thread ``name``, or ``None``."""
        with self._lock:
            return self._threads.get(name)

    def names(self) -> List[str]:
        """The names of every thread, in creation order."""
        with self._lock:
            return list(self._threads)

    def remove(self, name: str) -> None:
        """Forget thread ``name`` (no error if unknown)."""
        with self._lock:
            self._threads.pop(name, None)

    def snapshot(self) -> Dict[str, Any]:
        """Statistics of every thread, shaped as in the module docstring (JSON-serialisable)."""
        with self._lock:
            threads = list(self._threads.values())
        entries: List[Dict[str, Dict[str, Any]]] = [{stats.name: stats.snapshot()} for stats in threads]
        return {
            "worker_threads": len(entries),
            "threads": entries,
            "uptime": round(time.monotonic() - self._started, 3),
            "version": __version__,
        }
