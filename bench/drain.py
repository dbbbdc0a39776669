"""Source CPU of the trigger flow's queue: what deleting drained rows costs the canonical database.

Usage: ``.venv/bin/python -m bench.drain [--rows N] [--rounds R] [--port P] [--workdir DIR]``

On a PostgreSQL cluster of its own (``bench/cluster.py``, port 5546 by default), with the capture
trigger (``golconde trigger install``; C when the library is installed) on workload W's table
``friendships``, ``pgbench -n -c 4 -j 2`` inserts ``N`` rows in one-row transactions while one
connection drains ``golconde.queue`` in batches of 500, in one of three ways:

* ``delete``: :func:`golconde.trigger.fetch_batch` then :func:`golconde.trigger.delete_batch`, as
  golconded did up to ``b2c647e`` (autovacuum then vacuums the deleted rows);
* ``window``: :func:`golconde.trigger.fetch_window`, and :func:`golconde.trigger.save_position`
  at most every ``SAVE_INTERVAL`` s, as golconded does now: windows between transaction snapshots, nothing deleted
  (the partitions are truncated once sent; here the table is emptied at the end of the run);
* ``read``: reads the rows after the last id read, in index order, and deletes nothing; the table
  is emptied with one ``TRUNCATE`` at the end. The least a drain can do: it is not a drain
  Golconde could use, as a row whose transaction took a smaller id but committed later is skipped
  (the figure ``missed`` counts them).

For each round and mode it prints the cluster's CPU seconds over the run (the postmaster's
process tree from ``/proc``, :mod:`bench.procstat`: pgbench's backends with their capture
trigger, the drain's backend, autovacuum, the WAL writer...), per inserted row, and the wall
time. The rounds alternate the modes; the machine is printed first. Autovacuum wakes once a
minute (``autovacuum_naptime``), so part of the vacuuming of a run's deletes may fall outside the
run: the difference is a lower bound of what deleting costs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List

import psycopg2

from golconde import trigger
from golconde.destination import SAVE_INTERVAL

from .cluster import Cluster, data_directory
from .procstat import process_cpu, tree_cpu
from .report import machine, machine_text

DESTINATION = "Drain"
BATCH = 500


def _drain(dsn: str, mode: str, stop: threading.Event, read: List[float]) -> None:
    """Drain ``golconde.queue`` until ``stop`` is set and 20 polls in a row found nothing; adds
    the rows read to ``read[0]`` and its backend's CPU seconds to ``read[1]``."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    backend = conn.get_backend_pid()
    started = process_cpu(backend, children=False)
    last, idle, position, saved = 0, 0, trigger.DrainPosition(), 0.0
    with conn.cursor() as cur:
        while idle <= 20 or not stop.is_set():
            if mode == "delete":
                rows = [row.id for row in trigger.fetch_batch(cur, DESTINATION, BATCH)]
                trigger.delete_batch(cur, DESTINATION, rows)
            elif mode == "window":
                batch, position = trigger.fetch_window(cur, DESTINATION, position, BATCH)
                rows = [row.id for row in batch]
                if rows and time.monotonic() - saved >= SAVE_INTERVAL:
                    trigger.save_position(cur, DESTINATION, position)
                    saved = time.monotonic()
            else:
                cur.execute(trigger._INDEX_ORDER + "SELECT id, packet_id::text, created_at, relation,"
                            " packet::text FROM golconde.queue WHERE destination = %s AND id > %s"
                            " ORDER BY id LIMIT %s", (DESTINATION, last, BATCH))
                rows = [row[0] for row in cur.fetchall()]
                last = rows[-1] if rows else last
            read[0] += len(rows)
            idle = 0 if rows else idle + 1
            if not rows:
                time.sleep(0.01)
    read[1] = process_cpu(backend, children=False) - started
    conn.close()


def run(cluster: Cluster, mode: str, rows: int, script: str) -> Dict[str, float]:
    """One run of ``mode``: the cluster's CPU seconds, wall seconds and rows read."""
    admin = psycopg2.connect(cluster.dsn("golconde_bench_drain"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("TRUNCATE friendships")
        cur.execute("TRUNCATE golconde.queue, golconde.drain_position")
        cur.execute("VACUUM ANALYZE golconde.queue")
        cur.execute("CHECKPOINT")
    time.sleep(1.0)
    stop, read = threading.Event(), [0.0, 0.0]
    pid = cluster.pid()
    before, started = tree_cpu(pid), time.monotonic()
    drain = threading.Thread(target=_drain, args=(cluster.dsn("golconde_bench_drain"), mode, stop, read))
    drain.start()
    subprocess.run([os.path.join(cluster.bindir, "pgbench"), "-n", "-c", "4", "-j", "2",
                    "-t", str(rows // 4), "-f", script, "-h", "127.0.0.1", "-p", str(cluster.port),
                    "-U", "postgres", "golconde_bench_drain"], check=True, capture_output=True)
    stop.set()
    drain.join()
    wall = time.monotonic() - started
    with admin.cursor() as cur:
        cur.execute("TRUNCATE golconde.queue")
    admin.close()
    time.sleep(1.0)         # let the postmaster reap the backends that ended
    return {"cpu": tree_cpu(pid) - before, "wall": wall, "read": read[0], "drain": read[1]}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100000, help="rows inserted per run (a multiple of 4)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--port", type=int, default=5546)
    parser.add_argument("--workdir", default=os.path.join(os.getcwd(), "var", "bench"))
    parser.add_argument("--modes", default="delete,window,read",
                        help="comma-separated, among delete, window, read")
    args = parser.parse_args(argv)
    args.rows -= args.rows % 4      # 4 clients, as many transactions each
    cluster = Cluster("drain", data_directory(args.workdir, "drain"), args.port)
    cluster.ensure()
    print(machine_text(machine(cluster.version, "guest", "guest")))
    cluster.recreate_databases(["golconde_bench_drain"])
    conn = psycopg2.connect(cluster.dsn("golconde_bench_drain"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE friendships (friend_id int, user_id int, status_id int,"
                    " ts timestamptz, PRIMARY KEY (friend_id, user_id))")
        cur.execute("CREATE SEQUENCE friend_ids")
    capture = trigger.install(conn, "friendships", DESTINATION).capture
    conn.close()
    script = os.path.join(args.workdir, "drain_insert.sql")
    with open(script, "w") as handle:
        handle.write("INSERT INTO friendships VALUES (nextval('friend_ids'), 1, 1, now());\n")
    print("%d rows per run, pgbench -c 4 -j 2, capture in %s, drained in batches of %d"
          % (args.rows, "C" if capture == "c" else "PL/pgSQL", BATCH))
    results: Dict[str, List[Dict[str, float]]] = {"delete": [], "window": [], "read": []}
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(results))
    if unknown or not modes:
        parser.error("--modes: unknown %s (expected delete, window, read)" % ", ".join(unknown))
    results = {mode: [] for mode in results if mode in modes}
    for number in range(1, args.rounds + 1):
        for mode in results:
            figures = run(cluster, mode, args.rows, script)
            results[mode].append(figures)
            print("round %d %-6s cluster CPU %6.2f s (%5.1f us/row; the drain's backend %4.1f),"
                  " wall %6.2f s, missed %d"
                  % (number, mode, figures["cpu"], figures["cpu"] / args.rows * 1e6,
                     figures["drain"] / args.rows * 1e6, figures["wall"],
                     max(0, args.rows - int(figures["read"]))), flush=True)
    medians = {mode: sorted(r["cpu"] for r in runs)[len(runs) // 2] for mode, runs in results.items()}
    print("median cluster CPU per row: " + ", ".join(
        "%s %.1f us" % (mode, median / args.rows * 1e6) for mode, median in medians.items()))
    cluster.drop_databases(["golconde_bench_drain"])
    if cluster.started_here:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
