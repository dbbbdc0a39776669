"""Runs one mode through workload W and measures it (see bench/README.md for every figure).

Per phase (insert, update, delete; the client flow adds ``intake``): the clock starts when the
source workload starts and stops when both targets hold the phase's rows (``count(*)`` and
``count(*) FILTER (WHERE status_id = 2)`` as expected, then checked with golconde.compare's count +
hash); ``lag_s`` runs from the end of the source workload to that moment. CPU seconds of the source
cluster, the target cluster and the mode's own processes are read at the same two moments. After
the phases, a paced INSERT run at half the insert phase's rate gives the latency of each row from
enqueue to committed on every target.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

import psycopg2

from golconde.compare import compare

from . import procstat
from .latency import Probe
from .workload import (CREATE_TABLE, INTAKE_BASE, LATENCY_BASE, MAIN_BASE, PHASES, TABLE, BenchError,
                       KeyRange, Watcher, commit_times, expected_after, percentiles)

LOGGER = logging.getLogger(__name__)


class Env:
    """What every mode needs: arguments, the two clusters, the broker, the run's directory."""

    def __init__(self, args: Any, src: Any, tgt: Any, workdir: str, prefix: str, scripts: Dict[str, str]) -> None:
        self.args, self.src, self.tgt, self.workdir = args, src, tgt, workdir
        self.prefix = prefix
        self.prefix_id = prefix.replace("-", "_").replace(".", "_")
        self.scripts = scripts
        host, _, port = args.stomp.partition(":")
        self.stomp_host, self.stomp_port = host, int(port or 61613)
        self.stomp_login, self.stomp_passcode = args.stomp_login, args.stomp_passcode

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    @staticmethod
    def bin(name: str) -> str:
        return os.path.join(os.path.dirname(sys.executable), name)

    @staticmethod
    def execute(dsn: str, statement: Any, params: Any = None) -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
        finally:
            conn.close()

    @staticmethod
    def query(dsn: str, statement: Any, params: Any = None) -> List[tuple]:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall()
        finally:
            conn.close()


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(value, digits)


def run_mode(env: Env, mode: Any) -> Dict[str, Any]:
    """Run ``mode`` (a :class:`bench.modes.Mode`) through the workload on fresh databases.

    :returns: ``{"mode", "phases": {phase: figures}, "latency": {...}, "equal": bool,
        "error": str|None, "notes": [...]}``; see bench/README.md for the figures.
    """
    args = env.args
    main = KeyRange(MAIN_BASE, args.rows, args.clients)
    result: Dict[str, Any] = {"mode": mode.name, "phases": {}, "latency": {}, "equal": True,
                              "error": None, "notes": []}
    env.src.recreate_databases(["src"])
    env.tgt.recreate_databases(["t1", "t2"])
    for dsn in (env.src.dsn("src"), env.tgt.dsn("t1"), env.tgt.dsn("t2")):
        env.execute(dsn, CREATE_TABLE)
    watcher = None
    try:
        mode.setup()
        watcher = Watcher({"src": env.src.dsn("src"), "t1": env.tgt.dsn("t1"), "t2": env.tgt.dsn("t2")},
                          {"src": "src", "t1": "tgt", "t2": "tgt"})
        targets = ["t1", "t2"] if mode.replicated else []
        state = (0, 0)
        for phase in PHASES:
            state = expected_after(phase, main, state)
            result["phases"][phase] = measure_phase(env, mode, watcher, phase, main, state, targets)
        if mode.replicated:
            insert_rate = result["phases"]["insert"]["rows_per_s"]
            result["latency"] = latency_run(env, mode, watcher, insert_rate, state)
            state = (state[0] + result["latency"]["rows"], state[1])
        if mode.applies_canonical:  # client flow: intake from a preloaded queue
            result["phases"]["intake"] = intake_run(env, mode, watcher, state)
        result["phases"]["total"] = total(result["phases"])
        if mode.replicated:
            for target in targets:
                outcome = compare(env.src.dsn("src"), TABLE, env.tgt.dsn(target), TABLE)
                if not outcome.equal:
                    result["equal"] = False
                    result["notes"].append("%s DIFFERS from the source: %s" % (target, outcome.summary()))
        result["notes"].extend(mode.notes())
    except Exception as exc:  # any failure of one mode is reported, and the other modes still run
        LOGGER.error("%s: %s", mode.name, exc, exc_info=not isinstance(exc, BenchError))
        result["error"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        result["equal"] = False
    finally:
        try:
            mode.teardown()
        finally:
            if watcher is not None:
                watcher.close()
    return result


def _meter(env: Env, mode: Any, watcher: Watcher) -> procstat.CpuMeter:
    meter = procstat.CpuMeter()
    meter.add_tree("src", env.src.pid(), watcher.pids.get("src", []))
    meter.add_tree("tgt", env.tgt.pid(), watcher.pids.get("tgt", []))
    for pid in mode.workers():
        meter.add_process("worker", pid)
    return meter


def _figures(rows: int, seconds: float, lag: Optional[float], cpu: Dict[str, float], mode: Any,
             replicated: bool, source_seconds: Optional[float] = None) -> Dict[str, Any]:
    rss = [procstat.peak_rss_mb(pid) for pid in mode.workers()]
    rss = [value for value in rss if value is not None]
    return {
        "rows": rows, "seconds": _round(seconds), "rows_per_s": round(rows / seconds) if seconds > 0 else None,
        "source_per_s": round(rows / source_seconds) if source_seconds else None,
        "lag_s": _round(lag), "db_cpu_src_s": cpu.get("src"),
        "db_cpu_tgt_s": cpu.get("tgt") if replicated else None,
        "db_cpu_s": round(cpu.get("src", 0) + (cpu.get("tgt", 0) if replicated else 0), 2),
        "worker_cpu_s": cpu.get("worker") if mode.workers() else None,
        "worker_rss_mb": round(sum(rss), 1) if rss else None,
    }


def verify(env: Env, targets: List[str], timeout: float) -> None:
    """Compare each target with the source (count + hash); a difference found right after the
    counts matched is re-checked until ``timeout`` (:raises BenchError: still different)."""
    deadline = time.monotonic() + timeout
    for target in targets:
        while True:
            outcome = compare(env.src.dsn("src"), TABLE, env.tgt.dsn(target), TABLE)
            if outcome.equal:
                break
            if time.monotonic() > deadline:
                raise BenchError("%s differs from the source: %s" % (target, outcome.summary()))
            time.sleep(0.5)


def measure_phase(env: Env, mode: Any, watcher: Watcher, phase: str, keys: KeyRange,
                  expected: Any, targets: List[str]) -> Dict[str, Any]:
    meter = _meter(env, mode, watcher)
    meter.start()
    start, end = mode.drive(phase, keys)
    intake = None
    if mode.applies_canonical:  # client flow: the canonical table is written by golconded
        intake = watcher.wait(["src"], expected, env.args.timeout)["src"]
    done = end
    if targets:
        done = max(watcher.wait(targets, expected, env.args.timeout).values())
    cpu = meter.read()
    figures = _figures(keys.count(phase), done - start, done - end if targets else None, cpu, mode,
                       bool(targets), end - start)
    if intake is not None:
        figures["intake_per_s"] = round(keys.count(phase) / (intake - start))
        figures["lag_s"] = _round(done - intake)
    verify(env, targets, 30)
    LOGGER.info("%s %s: %s", mode.name, phase, figures)
    return figures


def latency_run(env: Env, mode: Any, watcher: Watcher, max_rate: float, state: Any) -> Dict[str, Any]:
    """Paced INSERTs at half ``max_rate`` (rows/s), or at ``--latency-rate``; latency of each row
    from enqueue (source commit, or the client's send time) to visible on the last of the targets
    (:mod:`bench.latency`)."""
    args = env.args
    rate = getattr(args, "latency_rate", None) or max(max_rate / 2.0, 1.0)
    rows = int(min(args.rows, max(1000, rate * args.latency_seconds)))
    rows -= rows % args.clients
    keys = KeyRange(LATENCY_BASE, rows, args.clients)
    # client flow: golconded writes the canonical table too; probing it splits the latency into
    # the destination's part (enqueue -> canonical) and the targets' part
    canonical = mode.applies_canonical
    probe = Probe({"t1": env.tgt.dsn("t1"), "t2": env.tgt.dsn("t2")},
                  extra={"src": env.src.dsn("src")} if canonical else None)
    try:
        probe.start()
        mode.drive("insert", keys, rate=rate)
        if not probe.wait(rows, args.timeout):
            raise BenchError("latency run: the targets did not show all %d rows within %ds" % (rows, args.timeout))
    finally:
        probe.close()
    watcher.wait(["t1", "t2"], (state[0] + rows, state[1]), args.timeout)
    enqueued = commit_times(env.src.dsn("src"), keys, mode.enqueue_column)
    latencies = probe.latencies(enqueued)
    figures = {"rate_per_s": round(rate), "rows": rows, "measured": len(latencies),
               "fixed_rate": bool(getattr(args, "latency_rate", None))}
    figures.update(percentiles(latencies))
    figures.update(probe.gap_percentiles())
    if canonical:
        figures.update({"canonical_" + k: v for k, v in
                        percentiles(probe.latencies(enqueued, labels=["src"])).items()})
    LOGGER.info("%s latency: %s", mode.name, figures)
    return figures


def intake_run(env: Env, mode: Any, watcher: Watcher, state: Any) -> Dict[str, Any]:
    """Client flow only: stop golconded, enqueue the insert phase's rows again (new keys), start
    golconded and time the destination's intake from the first row applied at the canonical table
    to the last (its rows/s is ``intake_per_s``), then until both targets hold them."""
    args = env.args
    keys = KeyRange(INTAKE_BASE, args.rows, args.clients)
    expected = (state[0] + keys.rows, state[1])
    mode.stop_daemon()
    mode.drive("insert", keys)
    mode.start_daemon()
    meter = _meter(env, mode, watcher)
    deadline = time.monotonic() + args.timeout
    while True:  # first row applied at the canonical table
        first = watcher.state("src")[0]
        if first > state[0]:
            break
        if time.monotonic() > deadline:
            raise BenchError("golconded applied nothing from the preloaded queue in %ds" % args.timeout)
        time.sleep(0.005)
    start = time.monotonic()
    meter.start()
    canonical = watcher.wait(["src"], expected, args.timeout)["src"]
    done = max(watcher.wait(["t1", "t2"], expected, args.timeout).values())
    cpu = meter.read()
    rows = expected[0] - first
    figures = _figures(rows, done - start, done - canonical, cpu, mode, True)
    figures["intake_per_s"] = round(rows / (canonical - start)) if canonical > start else None
    verify(env, ["t1", "t2"], 30)
    return figures


def total(phases: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The insert, update and delete phases together: rows / seconds summed, the largest lag,
    CPU summed, the largest peak RSS."""
    parts = [phases[p] for p in PHASES if p in phases]
    rows = sum(p["rows"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)

    def add(key: str) -> Optional[float]:
        values = [p[key] for p in parts if p.get(key) is not None]
        return round(sum(values), 2) if values else None

    def most(key: str) -> Optional[float]:
        values = [p[key] for p in parts if p.get(key) is not None]
        return max(values) if values else None

    figures = {"rows": rows, "seconds": round(seconds, 3),
               "rows_per_s": round(rows / seconds) if seconds else None, "lag_s": most("lag_s"),
               "db_cpu_src_s": add("db_cpu_src_s"), "db_cpu_tgt_s": add("db_cpu_tgt_s"),
               "db_cpu_s": add("db_cpu_s"), "worker_cpu_s": add("worker_cpu_s"),
               "worker_rss_mb": most("worker_rss_mb")}
    source_seconds = sum(p["rows"] / p["source_per_s"] for p in parts if p.get("source_per_s"))
    figures["source_per_s"] = round(rows / source_seconds) if source_seconds else None
    if any("intake_per_s" in p for p in parts):
        intake_seconds = sum(p["rows"] / p["intake_per_s"] for p in parts if p.get("intake_per_s"))
        figures["intake_per_s"] = round(rows / intake_seconds) if intake_seconds else None
    return figures
