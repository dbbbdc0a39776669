"""A target listener: consumes ``/queue/golconde.<destination>.<target>`` and applies each packet
to the target relation (a distributed copy, possibly with another schema via a custom handler)."""
from __future__ import annotations

from typing import Any

from .listener import QueueConsumer
from .stats import ThreadStats


class TargetListener(QueueConsumer):
    """Applies packets fanned out by a destination; dead-letters what cannot be applied.

    :param config: a :class:`golconde.config.TargetConfig`.
    :param stats: the thread's stats (named ``<destination>_<target>``).
    """

    store_fanout = False

    def __init__(self, config: Any, stats: ThreadStats) -> None:
        super().__init__(config, stats, role="target")
