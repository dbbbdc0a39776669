"""Workload W: the friendships table, its keys, pgbench scripts, and waiting for the targets.

Keys: row ``i`` (0-based) of a key range starting at ``base`` has key ``k = base + i + 1``, stored
as ``friend_id = k / 100``, ``user_id = k % 100``. With C pgbench clients, client ``j`` owns rows
``j*per .. j*per+per-1`` (``per = rows / C``) and uses each key once per phase: INSERT every key
(status_id 1, ts now()), UPDATE every key (status_id 2), DELETE the first half of each client's
range. The client flow sends the same rows as packets.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import psycopg2

LOGGER = logging.getLogger(__name__)

TABLE = "public.friendships"
CREATE_TABLE = ("CREATE TABLE public.friendships (friend_id int, user_id int, status_id int,"
                " ts timestamptz, PRIMARY KEY (friend_id, user_id))")
PHASES = ("insert", "update", "delete")
#: Key range bases: the main rows, the paced latency run, the client flow's intake run.
MAIN_BASE, LATENCY_BASE, INTAKE_BASE = 0, 10_000_000, 20_000_000

SCRIPTS = {
    "insert": "\\set n :n + 1\n\\set k :base + :client_id * :per + :n\n"
              "INSERT INTO public.friendships (friend_id, user_id, status_id, ts)"
              " VALUES (:k / 100, :k % 100, 1, now());\n",
    "update": "\\set n :n + 1\n\\set k :base + :client_id * :per + :n\n"
              "UPDATE public.friendships SET status_id = 2 WHERE friend_id = :k / 100 AND user_id = :k % 100;\n",
    "delete": "\\set n :n + 1\n\\set k :base + :client_id * :per + :n\n"
              "DELETE FROM public.friendships WHERE friend_id = :k / 100 AND user_id = :k % 100;\n",
}


class BenchError(RuntimeError):
    """The benchmark cannot go on (a tool failed, the targets did not catch up in time)."""


@dataclass(frozen=True)
class KeyRange:
    """``rows`` keys from ``base``, split among ``clients`` (``rows`` a multiple of ``clients``)."""

    base: int
    rows: int
    clients: int

    @property
    def per(self) -> int:
        return self.rows // self.clients

    def keys(self, phase: str = "insert") -> List[Tuple[int, int]]:
        """``(friend_id, user_id)`` of the rows a phase touches, in per-client order."""
        out = []
        for client in range(self.clients):
            count = self.per // 2 if phase == "delete" else self.per
            for n in range(1, count + 1):
                k = self.base + client * self.per + n
                out.append((k // 100, k % 100))
        return out

    def count(self, phase: str) -> int:
        return self.clients * (self.per // 2) if phase == "delete" else self.rows


def expected_after(phase: str, main: KeyRange, state: Tuple[int, int]) -> Tuple[int, int]:
    """``(rows, rows with status_id 2)`` after ``phase`` of the main key range, from ``state``."""
    total, updated = state
    if phase == "insert":
        return total + main.rows, updated
    if phase == "update":
        return total, updated + main.rows
    deleted = main.count("delete")
    return total - deleted, updated - deleted


def write_scripts(directory: str) -> Dict[str, str]:
    """Write the pgbench scripts; return phase -> path."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for phase, text in SCRIPTS.items():
        paths[phase] = os.path.join(directory, "w_%s.sql" % phase)
        with open(paths[phase], "w") as handle:
            handle.write(text)
    return paths


def pgbench(script: str, port: int, dbname: str, keys: KeyRange, phase: str, jobs: int,
            rate: Optional[float] = None, log: Optional[str] = None) -> Tuple[float, float]:
    """Run pgbench (``-n``, one-row transactions) for ``phase`` over ``keys``; with ``rate``,
    throttled to that many transactions per second in total (``-R``, Poisson schedule).

    :returns: ``(start, end)`` of the run, ``time.monotonic()`` seconds.
    :raises BenchError: pgbench failed or a transaction failed.
    """
    argv = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n",
            "-c", str(keys.clients), "-j", str(min(jobs, keys.clients)),
            "-t", str(keys.count(phase) // keys.clients),
            "-D", "n=0", "-D", "base=%d" % keys.base, "-D", "per=%d" % keys.per, "-f", script]
    if rate:
        argv[1:1] = ["-R", "%.1f" % rate]
    argv.append(dbname)
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    end = time.monotonic()
    if log:
        with open(log, "a") as handle:
            handle.write("$ %s\n%s%s\n" % (" ".join(argv), result.stdout, result.stderr))
    failed = "number of failed transactions: 0 " not in result.stdout and "failed" in result.stdout
    if result.returncode or failed:
        raise BenchError("pgbench %s failed (exit %d): %s" % (phase, result.returncode,
                                                             (result.stderr or result.stdout)[-1500:]))
    return start, end


class Watcher:
    """Persistent autocommit sessions on the databases to watch, and waiting for a state.

    Their backend pids are :attr:`pids` (per cluster name) so that their CPU can be excluded.
    """

    QUERY = "SELECT count(*), count(*) FILTER (WHERE status_id = 2) FROM public.friendships"

    def __init__(self, dsns: Dict[str, str], clusters: Dict[str, str]) -> None:
        """:param dsns: label -> DSN; :param clusters: label -> cluster name (for :attr:`pids`)."""
        self.conns = {}
        self.pids: Dict[str, List[int]] = {}
        for label, dsn in dsns.items():
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            self.conns[label] = conn
            self.pids.setdefault(clusters[label], []).append(conn.get_backend_pid())

    def state(self, label: str) -> Tuple[int, int]:
        with self.conns[label].cursor() as cur:
            cur.execute(self.QUERY)
            total, updated = cur.fetchone()
        return int(total), int(updated)

    def wait(self, labels: Sequence[str], expected: Tuple[int, int], timeout: float) -> Dict[str, float]:
        """Poll ``labels`` until each holds ``expected`` ``(rows, rows with status 2)``.

        Polls every 10 ms when close, less often while far behind (a quarter of the time left at
        the observed pace, at most 1 s), so the resolution near the end is about 10 ms plus one
        query.

        :returns: label -> ``time.monotonic()`` when it was first seen in the state.
        :raises BenchError: not reached within ``timeout`` seconds.
        """
        done: Dict[str, float] = {}
        first: Optional[Tuple[float, int]] = None
        deadline = time.monotonic() + timeout
        last: Dict[str, Tuple[int, int]] = {}
        while True:
            remaining = 0
            for label in labels:
                if label in done:
                    continue
                state = self.state(label)
                last[label] = state
                if state == expected:
                    done[label] = time.monotonic()
                else:
                    remaining = max(remaining, abs(expected[0] - state[0]) + abs(expected[1] - state[1]))
            if len(done) == len(labels):
                return done
            now = time.monotonic()
            if now > deadline:
                raise BenchError("timed out after %.0fs waiting for %s to hold %s rows (last seen %s)"
                                 % (timeout, ", ".join(labels), expected, last))
            if first is None:
                first = (now, remaining)
                pause = 0.01
            else:
                rate = (first[1] - remaining) / max(now - first[0], 0.001)
                pause = remaining / rate / 4.0 if rate > 0 else 0.05
            time.sleep(min(max(pause, 0.01), 1.0))

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def commit_times(dsn: str, key_range: KeyRange, column: str = "commit") -> Dict[Tuple[int, int], float]:
    """``(friend_id, user_id)`` -> epoch seconds for the rows of ``key_range``: the commit time of
    the row's inserting transaction (``track_commit_timestamp``), or with ``column="ts"`` its ts."""
    low = (key_range.base + 1) // 100
    high = (key_range.base + key_range.rows) // 100
    expr = ("extract(epoch FROM pg_xact_commit_timestamp(xmin))" if column == "commit"
            else "extract(epoch FROM ts)")
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT friend_id, user_id, " + expr + "::float8 FROM public.friendships"
                        " WHERE friend_id BETWEEN %s AND %s", (low, high))
            return {(f, u): t for f, u, t in cur.fetchall() if t is not None}
    finally:
        conn.close()


def percentiles(values: List[float]) -> Dict[str, Optional[float]]:
    """p50/p99/max of ``values`` (seconds) in milliseconds (nearest-rank)."""
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        index = max(0, min(len(ordered) - 1, int(-(-p * len(ordered) // 100)) - 1))
        return ordered[index]

    return {"p50_ms": round(rank(50) * 1000, 1), "p99_ms": round(rank(99) * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1)}
