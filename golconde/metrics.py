"""Monitoring views of the statistics: Prometheus metrics and the health verdict.

Both only read :meth:`golconde.stats.Registry.snapshot` (the HTTP side never talks to a database or
a broker).

* :class:`RegistryCollector` is a prometheus_client custom collector: at each scrape it turns one
  snapshot into metric families; :func:`render` gives the exposition (text format 0.0.4, or
  OpenMetrics when the scraper asks for it). Every per-listener metric has the labels
  ``destination``, ``target`` (empty for a destination's own listener), ``thread`` (the 2009 thread
  name) and ``role`` (``destination`` or ``target``)::

      golconde_packets_total{action="add|set|update|delete"}  counter: packets applied, by action
      golconde_received_total, golconde_applied_total, golconde_duplicates_total,
      golconde_fanned_out_total, golconde_retries_total, golconde_dead_letters_total,
      golconde_errors_total, golconde_reconnects_total,
      golconde_unmatched_total                                 counters
      golconde_apply_duration_seconds                          histogram, per packet
      golconde_backlog_packets                                 gauge (absent when unknown)
      golconde_lag_seconds                                     gauge (absent when unknown)
      golconde_connection_state{connection="broker|database", state="connected|connecting|
                                disconnected|stopped"}         gauge: 1 for the current state, else 0
      golconde_up                                              gauge: 1 when both are connected
      golconde_last_error_timestamp_seconds                    gauge (absent when no error)
      golconde_problems                                        gauge: standing problems reported
      golconde_listeners, golconde_uptime_seconds, golconde_build_info{version}

* :func:`health` judges a snapshot against :class:`~golconde.config.HealthConfig`-like thresholds.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Dict, Iterator, List, Optional, Tuple

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from .stats import ACTION_KEYS, STATES, Registry

LOGGER = logging.getLogger(__name__)

LABELS = ("destination", "target", "thread", "role")

#: (stats counter, metric name without ``_total``, help text)
COUNTERS = (
    ("received", "golconde_received", "Packets taken from the listener's queue (or queue table)."),
    ("applied", "golconde_applied", "Packets applied and committed."),
    ("duplicates", "golconde_duplicates", "Redelivered packets skipped (already applied)."),
    ("fanned_out", "golconde_fanned_out", "Packets sent to target queues (destinations), one per"
                                          " target, counted once the broker confirmed them (client"
                                          " flow: and the batch was acked)."),
    ("retried", "golconde_retries", "Retries of transient database errors."),
    ("dead_lettered", "golconde_dead_letters", "Packets sent to the dead-letter queue, counted once"
                                               " the broker confirmed them."),
    ("errors", "golconde_errors", "Errors: packets that failed (dead-lettered, once the broker"
                                  " confirmed the letter), and capture triggers found naming"
                                  " other keys than their tables'."),
    ("reconnects", "golconde_reconnects", "Reconnections after a broker or database failure."),
    ("unmatched", "golconde_unmatched", "Packets applied without changing a row (an update or delete"
                                        " whose restriction matched none, an add or set a trigger"
                                        " refused; at a target, a sign that it lacks rows the"
                                        " canonical relation holds)."),
)


def thread_labels(name: str, stats: Dict[str, Any]) -> Tuple[str, str, str, str]:
    """(destination, target, thread, role) of one snapshot entry; ``target`` is ``""`` for a
    destination's listener, else the thread name without its ``<destination>_`` prefix."""
    destination = str(stats.get("destination", name))
    role = str(stats.get("role", "destination"))
    target = ""
    if role == "target":
        prefix = destination + "_"
        target = name[len(prefix):] if name.startswith(prefix) else name
    return destination, target, name, role


def iter_threads(snapshot: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(thread name, its statistics) for every entry of a snapshot, in order."""
    for entry in snapshot.get("threads", ()):
        for name, stats in entry.items():
            yield name, stats


class RegistryCollector(Collector):
    """prometheus_client collector of a :class:`~golconde.stats.Registry` (one snapshot per
    scrape, so that every value of a scrape is consistent per listener)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def describe(self) -> List[Any]:
        # No up-front description: the metrics' label values are only known at scrape time.
        return []

    def collect(self) -> Iterator[Any]:
        snapshot = self.registry.snapshot()
        threads = list(iter_threads(snapshot))
        packets = CounterMetricFamily("golconde_packets", "Packets applied, by action.",
                                      labels=LABELS + ("action",))
        counters = {key: CounterMetricFamily(metric, text, labels=LABELS)
                    for key, metric, text in COUNTERS}
        duration = HistogramMetricFamily(
            "golconde_apply_duration_seconds",
            "Seconds to apply one packet (a batch of n packets in s seconds counts n times s/n).",
            labels=LABELS, unit="seconds")
        backlog = GaugeMetricFamily("golconde_backlog_packets",
                                    "Packets waiting for the listener (prefetched, or in the "
                                    "queue table for a trigger-mode destination).", labels=LABELS)
        lag = GaugeMetricFamily("golconde_lag_seconds",
                                "Age of the last applied packet when it was applied, or of "
                                "the oldest packet held if older (a stuck listener's grows); "
                                "0 once nothing is held.",
                                labels=LABELS, unit="seconds")
        state = GaugeMetricFamily("golconde_connection_state",
                                  "1 for the current state of the listener's broker or database "
                                  "connection, 0 for the other states.",
                                  labels=LABELS + ("connection", "state"))
        up = GaugeMetricFamily("golconde_up", "1 when the listener's broker and database "
                               "connections are both connected.", labels=LABELS)
        last_error = GaugeMetricFamily("golconde_last_error_timestamp_seconds",
                                       "Unix time of the listener's last error.",
                                       labels=LABELS, unit="seconds")
        problems = GaugeMetricFamily("golconde_problems", "Standing problems the listener reports "
                                     "(e.g. a capture trigger whose key is not the table's primary "
                                     "key); the texts are in /stats.", labels=LABELS)
        for name, stats in threads:
            labels = list(thread_labels(name, stats))
            for action in ACTION_KEYS:
                packets.add_metric(labels + [action], stats.get(action, 0))
            for key, family in counters.items():
                family.add_metric(labels, stats.get(key, 0))
            histogram = stats.get("apply_duration")
            if histogram:
                buckets = [(_le(bound), count) for bound, count
                           in zip(histogram["le"], histogram["cumulative"])]
                buckets.append(("+Inf", histogram["count"]))
                duration.add_metric(labels, buckets, histogram["sum"])
            if stats.get("backlog") is not None:
                backlog.add_metric(labels, stats["backlog"])
            if stats.get("lag") is not None:
                lag.add_metric(labels, stats["lag"])
            for connection in ("broker", "database"):
                for value in STATES:
                    state.add_metric(labels + [connection, value],
                                     1.0 if stats.get(connection) == value else 0.0)
            up.add_metric(labels, 1.0 if _connected(stats) else 0.0)
            problems.add_metric(labels, len(stats.get("problems") or ()))
            when = _timestamp(stats.get("last_error_at"))
            if when is not None:
                last_error.add_metric(labels, when)
        yield packets
        yield from counters.values()
        yield from (duration, backlog, lag, state, up, last_error, problems)
        yield GaugeMetricFamily("golconde_listeners", "Listener threads of the daemon.",
                                value=len(threads))
        yield GaugeMetricFamily("golconde_uptime_seconds", "Seconds since the daemon started.",
                                value=snapshot.get("uptime", 0.0), unit="seconds")
        info = GaugeMetricFamily("golconde_build_info", "Golconde version (value 1).",
                                 labels=("version",))
        info.add_metric([str(snapshot.get("version", ""))], 1.0)
        yield info


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.5``, ``1.0``)."""
    return repr(float(bound))


def _timestamp(iso: Optional[str]) -> Optional[float]:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _connected(stats: Dict[str, Any]) -> bool:
    return stats.get("broker") == "connected" and stats.get("database") == "connected"


def prometheus_registry(registry: Registry) -> CollectorRegistry:
    """A prometheus_client registry holding only a :class:`RegistryCollector` of ``registry``
    (not the process-wide default one: each daemon, or test, has its own)."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(RegistryCollector(registry))
    return collectors


def render(collectors: CollectorRegistry, accept: Optional[str] = None) -> Tuple[bytes, str]:
    """(body, content type) of a scrape: OpenMetrics if ``accept`` (the request's ``Accept``
    header) asks for it, else the Prometheus text format 0.0.4."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(collectors), content_type


def health(snapshot: Dict[str, Any], max_backlog: int, max_lag: float) -> Tuple[bool, Dict[str, Any]]:
    """Judge a :meth:`~golconde.stats.Registry.snapshot`: healthy when every listener's broker and
    database connections are ``connected``, no backlog (packets) is over ``max_backlog`` nor
    lag (seconds) over ``max_lag`` (unknown values pass), and no listener reports a standing
    problem (:meth:`~golconde.stats.ThreadStats.set_problem`, each one a reason).

    :returns: ``(healthy, document)``, the document being JSON-able::

        {"status": "ok" | "fail",
         "reasons": ["Test1_t1: broker disconnected", "Test1: backlog 12000 > 10000", ...],
         "thresholds": {"max_backlog": 10000, "max_lag": 300.0},
         "listeners": {"<thread>": {"status": "ok" | "fail", "broker": ..., "database": ...,
                                    "backlog": ..., "lag": ...}}}
    """
    reasons: List[str] = []
    listeners: Dict[str, Dict[str, Any]] = {}
    for name, stats in iter_threads(snapshot):
        own: List[str] = []
        for connection in ("broker", "database"):
            if stats.get(connection) != "connected":
                own.append("%s %s" % (connection, stats.get(connection)))
        backlog, lag = stats.get("backlog"), stats.get("lag")
        if backlog is not None and backlog > max_backlog:
            own.append("backlog %d > %d" % (backlog, max_backlog))
        if lag is not None and lag > max_lag:
            own.append("lag %.1f s > %g s" % (lag, max_lag))
        own.extend(stats.get("problems") or ())
        reasons.extend("%s: %s" % (name, reason) for reason in own)
        listeners[name] = {"status": "fail" if own else "ok", "broker": stats.get("broker"),
                           "database": stats.get("database"), "backlog": backlog, "lag": lag}
    return not reasons, {"status": "fail" if reasons else "ok", "reasons": reasons,
                         "thresholds": {"max_backlog": max_backlog, "max_lag": max_lag},
                         "listeners": listeners}
