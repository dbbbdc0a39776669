"""A target listener: consumes ``/queue/golconde.<destination>.<target>`` and applies each packet
to the target relation (a distributed copy, possibly with another schema via a custom handler)."""
from __future__ import annotations

from typing import Any

from . import envelope
from .listener import QueueConsumer
from .stats import ThreadStats


#: Fewest messages a target's subscription may have unacknowledged.
MIN_PREFETCH = 16


class TargetListener(QueueConsumer):
    """Applies packets fanned out by a destination; dead-letters what cannot be applied.

    :param config: a :class:`golconde.config.TargetConfig`.
    :param stats: the thread's stats (named ``<destination>_<target>``).
    """

    store_fanout = False

    def __init__(self, config: Any, stats: ThreadStats) -> None:
        super().__init__(config, stats, role="target")

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
