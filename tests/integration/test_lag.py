"""The lag of packets from a plain STOMP client (no golconde-created-at header), on each broker:
a destination stuck on a lock shows it growing, and /health fails past max_lag, as for packets of
golconde's own client (ActiveMQ's timestamp header, else the time golconded received them)."""
from __future__ import annotations

import json
import time

import psycopg2

from golconde.daemon import Daemon
from golconde.metrics import health

from .flow_support import execute, make_config, parse_config, query, send_raw, wait_for

TABLE = "CREATE TABLE public.items (id integer PRIMARY KEY, v text)"


def test_a_destination_stuck_on_plain_clients_packets_shows_a_growing_lag(make_database, broker):
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, TABLE)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.items", broker=broker))
    destination = config.destinations[0]
    daemon = Daemon(config)
    daemon.start()
    stats = daemon.registry.get(destination.thread_name)
    locker = psycopg2.connect(canonical)
    try:
        send_raw(destination.queue, [json.dumps({"action": "add", "data": {"id": 0}})], broker=broker)
        wait_for(lambda: query(t1, "SELECT id FROM public.items") == [(0,)], message="warm-up")
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE public.items IN ACCESS EXCLUSIVE MODE")
        sent = time.time()
        send_raw(destination.queue, [json.dumps({"action": "add", "data": {"id": n}})
                                     for n in range(1, 6)], broker=broker)
        wait_for(lambda: (stats.snapshot()["lag"] or 0) > 3.0, timeout=20,
                 message="the stuck destination's lag growing")
        assert stats.snapshot()["lag"] <= time.time() - sent + 1.0     # the packets' age
        ok, document = health(daemon.registry.snapshot(), max_backlog=10000, max_lag=2.0)
        assert not ok and any(r.startswith("%s: lag " % destination.thread_name)
                              for r in document["reasons"]), document
    finally:
        locker.rollback()
        locker.close()
    try:
        wait_for(lambda: query(t1, "SELECT count(*) FROM public.items") == [(6,)],
                 message="applied once the lock is gone")
        wait_for(lambda: stats.snapshot()["lag"] == 0.0, timeout=10, message="lag back to 0")
    finally:
        assert daemon.stop()
