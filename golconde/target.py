"""A target listener: consumes ``/queue/golconde.<destination>.<target>`` and applies each packet
to the target relation (a distributed copy, possibly with another schema via a custom handler)."""
from __future__ import annotations

import logging
import time
from typing import Any

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
        self.feeds.forget(id(self))
        super().finish()

    def _check_feeds(self, db: Any) -> None:
        """At connect and every :data:`FEED_CHECK_INTERVAL` s: which trigger-mode destinations of
        this daemon capture what this target writes, in this very database (their capture
        trigger fires on its relation or one of its partitions, and their drain's session is
        connected here: :mod:`golconde.feeds`). Feeding another destination is a chain; feeding
        this target's own destination, directly or through other targets of the daemon, is a
        cycle.

        :raises StopListener: a cycle: the target pauses (``retry_after``
            :data:`FEED_CHECK_INTERVAL`, its packets left queued) with an error naming it, until
            a capture trigger or the configuration breaks the cycle.
        """
        self._next_feed_check = time.monotonic() + FEED_CHECK_INTERVAL
        relation = str(schema_module.parse_relation(self.config.target))
        drains = self.feeds.drains()
        try:
            fed = []
            if drains:                  # no trigger-mode destination here: nothing to feed
                with db.cursor() as cur:
                    named = [name for name in trigger.capturing_destinations(cur, relation)
                             if name in drains]
                    fed = trigger.draining_here(cur, {name: drains[name] for name in named})
                db.rollback()
        except psycopg2.Error as exc:
            if db.closed:
                raise
            db.rollback()
            LOGGER.warning("[%s] could not read the capture triggers of %s: %s", self.name,
                           relation, trigger.first_line(exc))
            return
        cycle = self.feeds.update(id(self), self.config.destination, fed)
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
