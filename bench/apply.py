"""CPU per packet of Golconde's apply path alone: no broker, no threads, one PostgreSQL.

Usage: ``.venv/bin/python -m bench.apply [--dsn DSN] [--packets N] [--batches 1,20,500]``

It creates a scratch database (``golconde_bench_apply``, dropped at the end) holding workload W's
table ``friendships(friend_id, user_id, status_id, ts)`` and gives :class:`golconde.apply.Applier`
(with the AutoSQL handler) ``N`` packets of each action, in batches of each size, as a destination
(ledger read, apply, ledger record with the fanned-out JSON) and as a target (ledger claim,
apply). Packets are decoded objects, as :func:`golconde.listener.expand` hands them over from a
batch message. For each role, action and batch size it prints the process CPU time per packet
(``time.process_time``, microseconds: the Python and libpq work in golconded's thread) and the wall
time per packet (which adds PostgreSQL's work and the round trips). Figures vary by a few percent
from run to run; the machine is printed first.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import uuid
from typing import Any, Dict, List, Sequence, Tuple

import psycopg2
from psycopg2 import sql

from golconde import ledger
from golconde.apply import DEAD_LETTER, Applier
from golconde.handlers.autosql import AutoSQL

from . import report

DATABASE = "golconde_bench_apply"
TABLE = ("CREATE TABLE public.friendships (friend_id int, user_id int, status_id int, ts timestamptz,"
         " PRIMARY KEY (friend_id, user_id))")
ACTIONS = ("add", "update", "delete")


def packets(action: str, keys: Sequence[int], ts: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(packet_id, packet object)]`` of ``action`` for the keys (friend_id = user_id = key)."""
    if action == "add":
        bodies = [{"action": "add", "data": {"friend_id": k, "user_id": k, "status_id": 1, "ts": ts}}
                  for k in keys]
    elif action == "update":
        bodies = [{"action": "update", "data": {"status_id": 2}, "restriction": {"friend_id": k, "user_id": k}}
                  for k in keys]
    else:
        bodies = [{"action": "delete", "restriction": {"friend_id": k, "user_id": k}} for k in keys]
    return [(str(uuid.uuid4()), body) for body in bodies]


def measure(dsn: str, role: str, batch: int, count: int, base: int) -> Dict[str, Tuple[float, float]]:
    """``{action: (CPU us per packet, wall us per packet)}`` for ``role`` at batch size ``batch``."""
    handler = AutoSQL("public.friendships", {}, role=role, name="bench-%s" % role)
    applier = Applier(handler, "bench-%s-%d" % (role, base), store_fanout=role == "destination")
    conn = psycopg2.connect(dsn)
    ledger.ensure(conn)
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat()
    out = {}
    try:
        applier.apply_batch(conn, packets("add", [base - 1], ts))     # schema cache, connection warm
        keys = list(range(base, base + count))
        for action in ACTIONS:
            work = packets(action, keys, ts)
            cpu, wall = time.process_time(), time.perf_counter()
            dead = 0
            for start in range(0, len(work), batch):
                outcomes = applier.apply_batch(conn, work[start:start + batch])
                dead += sum(1 for outcome in outcomes if outcome.status == DEAD_LETTER)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            out[action] = (cpu / count * 1e6, wall / count * 1e6)
            if dead:
                raise RuntimeError("%s: %d %s packets dead-lettered: %s"
                                   % (role, dead, action, [o.reason for o in outcomes][:1]))
    finally:
        conn.close()
    return out


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.apply", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                        help="a database of the server to use; the scratch database is created beside it")
    parser.add_argument("--packets", type=int, default=10000, help="packets per action (default 10000)")
    parser.add_argument("--batches", default="1,20,500", help="batch sizes (default 1,20,500)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.batches.split(",") if size.strip()]
    admin = psycopg2.connect(args.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT version()")
        version = cur.fetchone()[0].split(" on ")[0]
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    scratch = psycopg2.extensions.make_dsn(args.dsn, dbname=DATABASE)
    try:
        conn = psycopg2.connect(scratch)
        with conn, conn.cursor() as cur:
            cur.execute(TABLE)
        conn.close()
        info = report.machine(version, "guest", "guest")
        print(report.machine_text(info))
        print("apply path, %d packets per action; us per packet: CPU of the process / wall" % args.packets)
        print("%-12s %6s  %-17s %-17s %-17s" % ("role", "batch", *ACTIONS))
        base = 1000
        for role in ("destination", "target"):
            for size in sizes:
                figures = measure(scratch, role, size, args.packets, base)
                base += args.packets + 10
                print("%-12s %6d  %s" % (role, size, " ".join(
                    "%-17s" % ("%.1f / %.1f" % figures[action]) for action in ACTIONS)), flush=True)
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE)))
        admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
