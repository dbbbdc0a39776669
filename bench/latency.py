"""Latency of each row from enqueue to visible (committed) on every target.

An ``AFTER INSERT`` trigger on each target's friendships table (``ENABLE ALWAYS``, so it fires for
replication apply sessions too, which run with ``session_replication_role = replica``) copies the
new row's key into an unlogged table ``bench_applied``; that copy commits with the row. A probe
thread empties ``bench_applied`` with ``DELETE ... RETURNING`` every 5 ms on each target and gives
each returned key the wall-clock time taken just before that statement: the row was committed
after the previous poll and before this one, so the figure is late by at most the gap between two
polls of that database, which the probe reports (``probe_gap_*``: 5 ms of sleep, three statements,
and the interpreter lock, shared with the client flow's producer threads).
(Commit timestamps cannot serve on the targets: logical replication's apply worker records the
*origin's* commit time.) The enqueue time is read at the source afterwards: the commit timestamp
of the source row (``track_commit_timestamp``) for pgbench-driven modes, the ``ts`` the client put
in the packet when sending for the client flow.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import psycopg2

from .workload import percentiles

SETUP = (
    "CREATE UNLOGGED TABLE public.bench_applied (friend_id int, user_id int)",
    "CREATE FUNCTION public.bench_applied_mark() RETURNS trigger LANGUAGE plpgsql AS"
    " $$BEGIN INSERT INTO public.bench_applied VALUES (NEW.friend_id, NEW.user_id); RETURN NULL; END$$",
    "CREATE TRIGGER bench_applied_mark AFTER INSERT ON public.friendships"
    " FOR EACH ROW EXECUTE FUNCTION public.bench_applied_mark()",
    "ALTER TABLE public.friendships ENABLE ALWAYS TRIGGER bench_applied_mark",
)
TEARDOWN = (
    "DROP TRIGGER IF EXISTS bench_applied_mark ON public.friendships",
    "DROP FUNCTION IF EXISTS public.bench_applied_mark()",
    "DROP TABLE IF EXISTS public.bench_applied",
)
POLL_INTERVAL = 0.005

Key = Tuple[int, int]


class Probe:
    """Records when each key becomes visible on each of ``dsns`` (label -> DSN), the targets, and
    on each of ``extra`` (label -> DSN: probed too, but neither waited for by :meth:`wait` nor
    counted by :meth:`latencies` unless named)."""

    def __init__(self, dsns: Dict[str, str], extra: Optional[Dict[str, str]] = None) -> None:
        self.conns = {}
        self.targets = list(dsns)
        dsns = dict(dsns, **(extra or {}))
        for label, dsn in dsns.items():
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            with conn.cursor() as cur:
                for statement in SETUP:
                    cur.execute(statement)
            self.conns[label] = conn
        self.seen: Dict[str, Dict[Key, float]] = {label: {} for label in dsns}
        #: seconds between the starts of consecutive polls of one database
        self.gaps: List[float] = []
        self._stop = threading.Event()
        self._error: List[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="latency-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        try:
            last: Dict[str, float] = {}
            while not self._stop.is_set():
                for label, conn in self.conns.items():
                    before = time.time()
                    if label in last:
                        self.gaps.append(before - last[label])
                    last[label] = before
                    with conn.cursor() as cur:
                        cur.execute("DELETE FROM public.bench_applied RETURNING friend_id, user_id")
                        rows = cur.fetchall()
                    seen = self.seen[label]
                    for key in rows:
                        seen.setdefault(key, before)
                time.sleep(POLL_INTERVAL)
        except BaseException as exc:  # reported by wait()
            self._error.append(exc)

    def wait(self, count: int, timeout: float) -> bool:
        """Wait until every target has shown ``count`` keys; False on timeout.
        :raises psycopg2.Error: the probe's query failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._error:
                raise self._error[0]
            if all(len(self.seen[label]) >= count for label in self.targets):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for conn in self.conns.values():
            try:
                with conn.cursor() as cur:
                    for statement in TEARDOWN:
                        cur.execute(statement)
            finally:
                conn.close()

    def gap_percentiles(self) -> Dict[str, Optional[float]]:
        """The probe's resolution: p50 / p99 / max in ms of the gaps between polls of a database,
        as ``probe_gap_p50_ms``..."""
        return {"probe_gap_" + k: v for k, v in percentiles(self.gaps).items()}

    def latencies(self, enqueued: Dict[Key, float], labels: Optional[List[str]] = None) -> List[float]:
        """Seconds from enqueue to visible on the last of ``labels`` (default: the targets), for
        each key seen on all of them."""
        seen_on = [self.seen[label] for label in (labels or self.targets)]
        out = []
        for key, sent in enqueued.items():
            times = [seen.get(key) for seen in seen_on]
            if all(t is not None for t in times):
                out.append(max(times) - sent)
        return out
