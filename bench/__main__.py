"""Golconde's benchmark harness: workload W through every mode, side by side (bench/README.md).

Usage: ``make bench`` or ``bash bench/run.sh [options]`` (= ``.venv/bin/python -m bench``).
Exit status: 0; 1 when a target differs from the source after a run or a mode failed;
2 on bad arguments or when the clusters cannot be set up; 130 when interrupted (Ctrl-C or SIGTERM,
after stopping what it started).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any, Dict, List

from . import rawstomp, report
from .cluster import Cluster, ClusterError, data_directory
from .harness import Env, run_mode
from .modes import MODES
from .workload import write_scripts

LOGGER = logging.getLogger("bench")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_MODES = ("bare", "logical", "londiste", "golconde-trigger", "golconde-client")


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, help="rows inserted and updated per run (default 100000;"
                        " --quick: 5000); half of them are deleted")
    parser.add_argument("--runs", type=int, help="runs; figures are medians (default 3; --quick: 1)")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help="comma-separated subset of %s (default: all)" % ",".join(ALL_MODES))
    parser.add_argument("--quick", action="store_true", help="5,000 rows, 1 run, short latency run")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients (-c, default 4)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench threads (-j, default 2)")
    parser.add_argument("--producers", type=int, default=4, help="client-flow producer threads (default 4)")
    parser.add_argument("--latency-seconds", type=float, help="length of the paced latency run"
                        " (default 10; --quick: 3)")
    parser.add_argument("--latency-rate", type=float,
                        help="pace the latency run at this many rows/s in every mode, instead of"
                             " half of each mode's insert rate (to compare versions at one load)")
    parser.add_argument("--raw-messages", type=int, help="messages for the raw stomp.py rates"
                        " (default 100000; --quick: 10000)")
    parser.add_argument("--backlog", type=int, help="packets queued for the memory check, once"
                        " after the runs (default 1000000; --quick: 20000; 0: skip it)")
    parser.add_argument("--plain-messages", action="store_true",
                        help="client flow: the producers send one broker message per packet"
                             " (Client(batch_messages=False)) instead of packing each send_many"
                             " into batch messages")
    parser.add_argument("--client-per-producer", action="store_true",
                        help="client flow: each producer thread its own Client (connection)"
                             " instead of one Client shared by all of them (whose sends from"
                             " several threads at once go out in one write: group commit)")
    parser.add_argument("--split", action="store_true",
                        help="run golconded as two processes (golconded --only): the destination"
                             " in one, both targets in the other")
    parser.add_argument("--port", type=int, default=5544, help="source cluster port; the target"
                        " cluster uses the next one (default 5544)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "var", "bench"),
                        help="clusters, logs, generated configurations (default var/bench)")
    parser.add_argument("--stomp", default=os.environ.get("GOLCONDE_STOMP", "127.0.0.1:61613"))
    parser.add_argument("--stomp-login", default=os.environ.get("GOLCONDE_STOMP_LOGIN", "guest"))
    parser.add_argument("--stomp-passcode", default=os.environ.get("GOLCONDE_STOMP_PASSCODE", "guest"))
    parser.add_argument("--timeout", type=float, default=900, help="seconds a phase may take (default 900)")
    parser.add_argument("--json", help="also write every figure, per run and median, to this file")
    parser.add_argument("--keep", action="store_true", help="leave the clusters running at the end")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.rows = args.rows or (5000 if args.quick else 100000)
    args.runs = args.runs or (1 if args.quick else 3)
    args.latency_seconds = args.latency_seconds or (3.0 if args.quick else 10.0)
    args.raw_messages = args.raw_messages or (10000 if args.quick else 100000)
    if args.backlog is None:
        args.backlog = 20000 if args.quick else 1000000
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in ALL_MODES]
    if unknown:
        parser.error("unknown mode(s) %s (expected %s)" % (", ".join(unknown), ", ".join(ALL_MODES)))
    if args.rows < 4 * args.clients or args.clients < 1 or args.runs < 1:
        parser.error("--rows must be at least 4 x --clients, --runs at least 1")
    args.rows -= args.rows % (2 * args.clients)
    return args


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM ends the benchmark as Ctrl-C does: every ``finally`` stops what it started
    (golconded, Londiste's workers, pgbench, the clusters), which a plain SIGTERM left running."""
    raise KeyboardInterrupt("SIGTERM")


def main(argv: List[str] = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.makedirs(args.workdir, exist_ok=True)
    lock = open(os.path.join(args.workdir, "bench.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("bench: another benchmark is running with --workdir %s" % args.workdir, file=sys.stderr)
        return 2
    prefix = "golconde-bench-%s" % uuid.uuid4().hex[:8]
    workdir = os.path.join(args.workdir, "runs", time.strftime("%Y%m%d-%H%M%S-") + prefix[-8:])
    os.makedirs(workdir, exist_ok=True)
    src = Cluster("src", data_directory(args.workdir, "src"), args.port)
    tgt = Cluster("tgt", data_directory(args.workdir, "tgt"), args.port + 1)
    try:
        src.ensure()
        tgt.ensure()
    except ClusterError as exc:
        print("bench: cannot set up the benchmark's PostgreSQL clusters: %s" % exc, file=sys.stderr)
        return 2
    env = Env(args, src, tgt, workdir, prefix, write_scripts(workdir))
    version = env.query(src.dsn(), "SELECT version()")[0][0].split(" on ")[0]
    info = report.machine(version, args.stomp_login, args.stomp_passcode)
    print(report.machine_text(info))
    print("workload W: %d INSERTs, %d UPDATEs, %d DELETEs, pgbench -n -c %d -j %d, 1 source -> 2 targets;"
          " %d run(s); clusters on ports %d (source) and %d (targets); logs in %s"
          % (args.rows, args.rows, args.rows // 2, args.clients, args.jobs, args.runs, src.port,
             tgt.port, os.path.relpath(workdir, ROOT)), flush=True)
    print("golconded: %s" % ("two processes (--split): the destination in one, both targets in the"
                             " other" if args.split else "one process"), flush=True)
    if "golconde-client" in args.modes:
        print("client flow: %s; %s" % (
            "one broker message per packet (--plain-messages)" if args.plain_messages
            else "each send_many packed into batch messages (the client's default)",
            "one Client per producer thread (--client-per-producer)" if args.client_per_producer
            else "%d producer threads sharing one Client" % args.producers), flush=True)
    londiste = None
    if "londiste" in args.modes:
        from .londiste import prepare
        londiste = prepare(args.workdir)
        if isinstance(londiste, str):
            print("londiste: skipped (%s)" % londiste, flush=True)
    runs: List[Dict[str, Any]] = []
    backlog: Dict[str, Any] = {}
    try:
        for index in range(args.runs):
            run: Dict[str, Any] = {"raw": {}, "modes": {}}
            try:
                run["raw"] = rawstomp.measure(env.stomp_host, env.stomp_port, args.stomp_login,
                                              args.stomp_passcode, args.raw_messages, prefix)
            except Exception as exc:  # any broker failure: the raw rates are missing, go on
                print("run %d: raw stomp.py rates not measured: %s" % (index + 1, exc), flush=True)
            for name in args.modes:
                if name == "londiste" and isinstance(londiste, str):
                    run["modes"][name] = {"skipped": londiste}
                    continue
                if name == "londiste":
                    from .londiste import Londiste
                    mode = Londiste(env, londiste)
                else:
                    mode = MODES[name](env)
                began = time.monotonic()
                result = run_mode(env, mode)
                run["modes"][name] = result
                total = result["phases"].get("total", {})
                print("run %d/%d %-16s %s rows/s, lag %s s, DB CPU %s s (%.0f s)%s" % (
                    index + 1, args.runs, name, report._fmt(total.get("rows_per_s")),
                    report._fmt(total.get("lag_s"), 3), report._fmt(total.get("db_cpu_s"), 1), time.monotonic() - began,
                    "" if result["equal"] else "  FAILED: %s" % (result["error"] or "; ".join(result["notes"]))),
                    flush=True)
            runs.append(run)
        if args.backlog > 0:
            from .backlog import backlog_run
            backlog = backlog_run(env, args.backlog)
            print("backlog         %s packets: peak RSS %s MB, drained in %s s%s" % (
                report._fmt(backlog["packets"]), report._fmt(backlog["peak_rss_mb"], 1),
                report._fmt(backlog["drain_s"], 1),
                "  FAILED: %s" % backlog["error"] if backlog["error"] else ""), flush=True)
    finally:
        rawstomp.delete_queues(prefix, args.stomp_login, args.stomp_passcode)
        if not args.keep:
            for cluster in (tgt, src):
                try:
                    cluster.stop()
                except ClusterError as exc:
                    print("bench: %s" % exc, file=sys.stderr)
    raw = {key: report.median([r["raw"].get(key) for r in runs])
           for key in ("publish_per_s", "consume_cumulative_per_s", "consume_each_per_s")}
    summary = report.summarize(runs)
    bars = report.bars(summary, raw, backlog)
    print(report.table(summary, raw))
    if backlog:
        print(report.backlog_text(backlog))
    print(report.bars_text(bars))
    print("\nload average at the end: %s (others' work on the machine skews every figure)"
          % ", ".join("%.2f" % x for x in os.getloadavg()))
    differs = [name for run in runs for name, r in run["modes"].items()
               if not r.get("skipped") and not r.get("equal")]
    if backlog and not backlog.get("equal"):
        differs.append("backlog")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "args": vars(args), "raw_broker": raw, "summary": summary,
                       "bars": bars, "runs": runs, "backlog": backlog, "failed": differs}, handle, indent=1, default=str)
    if differs:
        print("\nFAILED: a target differs from the source, or a mode failed: %s" % ", ".join(sorted(set(differs))))
        return 1
    print("\nall targets equal their source after every run")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:    # Ctrl-C or SIGTERM, after every finally has cleaned up
        print("bench: interrupted%s" % (" (%s)" % exc if str(exc) else ""), file=sys.stderr)
        sys.exit(130)
