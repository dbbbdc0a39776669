"""Which destinations the targets of one daemon feed, to find distribution cycles.

A target of destination ``D`` whose relation (or one of its partitions) carries a capture trigger
of destination ``X``, where ``X`` is a trigger-mode destination of the same daemon draining that
very database, feeds ``X``: what it applies is captured and sent on by ``X`` (a chain, ``D ->
X``). A path from a destination back to itself is a cycle, in which each change would go round
for ever. Destinations are told apart within one daemon by name (a configuration's names are
unique); that ``X`` drains the target's own database is seen from its session's
``application_name``, random per listener, in the target database's ``pg_stat_activity``
(:meth:`golconde.listener.Listener.application_name`), so neither the spelling of the DSNs nor
a destination of the same name in another configuration matters.
"""
from __future__ import annotations

import threading
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple


class FeedGraph:
    """One daemon's trigger-mode destinations (by name, with their sessions' application_name)
    and what each of its targets feeds. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: Dict[int, Tuple[str, FrozenSet[str]]] = {}
        self._drains: Dict[str, Tuple[int, str]] = {}

    def drain_started(self, key: int, destination: str, application_name: str) -> None:
        """The trigger-mode destination ``destination`` (listener ``key``, any id unique in the
        process) drains the database where its sessions are named ``application_name``."""
        with self._lock:
            self._drains[destination] = (key, application_name)

    def drain_stopped(self, key: int, destination: str) -> None:
        """That listener ended (a replacement's own entry is kept)."""
        with self._lock:
            if self._drains.get(destination, (None,))[0] == key:
                del self._drains[destination]

    def drains(self) -> Dict[str, str]:
        """``{destination: application_name}`` of the trigger-mode destinations started."""
        with self._lock:
            return {name: application for name, (_, application) in self._drains.items()}

    def update(self, key: int, destination: str, feeds: Sequence[str]) -> Optional[List[str]]:
        """Record that the target ``key`` of ``destination`` feeds ``feeds``; returns the cycle
        through it, ``[destination, ..., destination]``, or None."""
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
