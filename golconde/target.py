"""A target listener: consumes ``/queue/golconde.<destination>.<target>`` and applies each packet
to the target relation (a distributed copy, possibly with another schema via a custom handler)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import psycopg2

from . import envelope, trigger
from . import schema as schema_module
from .errors import StopListener
from .listener import QueueConsumer
from .stats import ThreadStats

LOGGER = logging.getLogger(__name__)

#: Fewest messages a target's subscription may have unacknowledged.
MIN_PREFETCH = 16
#: Seconds between two checks of which destinations' capture triggers a target's writes fire,
#: and the pause of a target whose writes would close a cycle before it checks again.
FEED_CHECK_INTERVAL = 60.0


class FeedGraph:
    """Which destinations the targets of this process feed: a target of destination ``D`` whose
    relation carries a capture trigger of destination ``X`` feeds ``X`` (what it applies is
    captured and sent on by ``X``: a chain, ``D -> X``). A path from a destination back to
    itself is a cycle: each change would go round for ever. Thread-safe; one per process
    (:data:`FEEDS`), each target listener keeping its own entry up to date."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: Dict[int, Tuple[str, FrozenSet[str]]] = {}

    def update(self, key: int, destination: str, feeds: Sequence[str]) -> Optional[List[str]]:
        """Record that the target ``key`` (any id unique in the process) of ``destination`` feeds
        ``feeds``; returns the cycle through it, ``[destination, ..., destination]``, or None."""
        with self._lock:
            self._feeds[key] = (destination, frozenset(feeds))
            graph: Dict[str, set] = {}
            for source, targets in self._feeds.values():
                graph.setdefault(source, set()).update(targets)
        # depth-first from destination's own feeds back to destination (graphs of a few nodes)
        for first in sorted(feeds):
            path = self._path(graph, first, destination, [destination, first])
            if path is not None:
                return path
        return None

    def _path(self, graph: Dict[str, set], node: str, goal: str, path: List[str]) -> Optional[List[str]]:
        if node == goal:
            return path
        for after in sorted(graph.get(node, ())):
            if after == goal or after not in path:
                found = self._path(graph, after, goal, path + [after])
                if found is not None:
                    return found
        return None

    def forget(self, key: int) -> None:
        """Drop the entry of target ``key`` (its listener ended)."""
        with self._lock:
            self._feeds.pop(key, None)


#: The process's :class:`FeedGraph`.
FEEDS = FeedGraph()


class TargetListener(QueueConsumer):
    """Applies packets fanned out by a destination; dead-letters what cannot be applied.

    :param config: a :class:`golconde.config.TargetConfig`.
    :param stats: the thread's stats (named ``<destination>_<target>``).
    """

    store_fanout = False

    def __init__(self, config: Any, stats: ThreadStats) -> None:
        super().__init__(config, stats, role="target")
        self._next_feed_check = 0.0

    def on_database_open(self, db: Any) -> None:
        super().on_database_open(db)
        self._check_feeds(db)

    def cycle(self) -> None:
        if time.monotonic() >= self._next_feed_check:
            self._check_feeds(self.db)
        super().cycle()

    def finish(self) -> None:
        FEEDS.forget(id(self))
        super().finish()

    def _check_feeds(self, db: Any) -> None:
        """At connect and every :data:`FEED_CHECK_INTERVAL` s: which destinations' capture
        triggers fire on this target's relation (:func:`golconde.trigger.capturing_destinations`).
        Feeding another destination is a chain; feeding this target's own destination, directly
        or through other targets of this process, is a cycle.

        :raises StopListener: a cycle: the target pauses (``retry_after``
            :data:`FEED_CHECK_INTERVAL`, its packets left queued) with an error naming it, until
            a capture trigger or the configuration breaks the cycle.
        """
        self._next_feed_check = time.monotonic() + FEED_CHECK_INTERVAL
        relation = str(schema_module.parse_relation(self.config.target))
        try:
            with db.cursor() as cur:
                feeds = trigger.capturing_destinations(cur, relation)
            db.rollback()
        except psycopg2.Error as exc:
            if db.closed:
                raise
            db.rollback()
            LOGGER.warning("[%s] could not read the capture triggers of %s: %s", self.name,
                           relation, trigger.first_line(exc))
            return
        cycle = FEEDS.update(id(self), self.config.destination, feeds)
        if cycle is None:
            return
        raise StopListener(
            "%s writes %s, whose capture trigger of destination %s sends what it applies on"
            " again: a cycle (%s) would send every change round for ever; this target waits"
            " until a capture trigger or the configuration breaks it (checked every %.0f s)"
            % (self.name, relation, cycle[1], " -> ".join(cycle), FEED_CHECK_INTERVAL),
            retry_after=FEED_CHECK_INTERVAL)

    def subscription_prefetch(self) -> int:
        """A target's queue carries batch messages of up to :data:`~golconde.envelope.MAX_ENTRIES`
        packets (1 MiB), so ``prefetch`` counts packets here: the subscription takes
        ``ceil(prefetch / MAX_ENTRIES)`` messages, plus the :attr:`max_pipeline` committed batches
        awaiting their acks and the one being applied, and at least :data:`MIN_PREFETCH` (under a
        light load batch messages are small: several are applied in one transaction): 1500 -> 16
        messages unacknowledged, at most 8,000 packets or 16 MiB, of which the listener's inbox
        holds at most ``max(prefetch, batch_size)`` packets and ``2 * batch_bytes`` bytes (the
        rest waits in the socket); plain messages (dead-letter replays) are then taken 16 at a
        time."""
        return max(MIN_PREFETCH, -(-self.config.prefetch // envelope.MAX_ENTRIES) + self.max_pipeline + 1)
