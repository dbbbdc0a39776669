"""Memory with a large backlog (issue: golconded under 150 MB RSS with 1,000,000 packets queued).

With golconded stopped, N ADD packets of workload W's table are queued on the client-flow
destination's queue (plain messages, as clients send them), and the same N packets, as batch
messages with the same ids, on each target's queue (what a destination leaves there while its
targets are down). golconded then starts facing the three backlogs at once; its peak RSS
(``VmHWM``, summed over both processes with ``--split``) is read once the canonical table and both targets hold the N rows. The targets apply
their backlog first and then recognise the destination's fan-out of the same ids as duplicates
(ledger), so every queue is drained.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Tuple

from . import procstat
from .workload import CREATE_TABLE, BenchError, KeyRange, Watcher

LOGGER = logging.getLogger(__name__)

#: Key range of the backlog run (apart from the main, latency and intake ranges).
BACKLOG_BASE = 30_000_000
#: Packets per confirmed enqueue.
CHUNK = 1000


def _packets(keys: List[Tuple[int, int]], ts: str) -> List[Dict[str, Any]]:
    return [{"action": "add", "data": {"friend_id": f, "user_id": u, "status_id": 1, "ts": ts}}
            for f, u in keys]


def preload(env: Any, mode: Any, keys: List[Tuple[int, int]]) -> None:
    """Queue ``keys`` as packets: plain messages on the destination's queue, batch messages with
    the same ids on each target's queue."""
    from golconde import envelope
    from golconde.broker import ID_HEADER, BrokerConnection
    from golconde.client import Client
    from golconde.packet import dumps

    ts = "2026-01-01T00:00:00+00:00"
    client = Client(mode.queue, env.stomp_host, env.stomp_port, env.stomp_login, env.stomp_passcode)
    broker = BrokerConnection(env.stomp_host, env.stomp_port, env.stomp_login, env.stomp_passcode,
                              name="bench-backlog")
    client.connect()
    broker.connect()
    try:
        created = "%.3f" % time.time()
        for start in range(0, len(keys), CHUNK):
            packets = _packets(keys[start:start + CHUNK], ts)
            ids = client.send_many(packets)
            entries = [(pid, dumps(packet), created) for pid, packet in zip(ids, packets)]
            messages = []
            for target in ("t1", "t2"):
                for body, count in envelope.encode(entries):
                    messages.append(("%s.%s" % (mode.queue, target), body,
                                     {envelope.BATCH_HEADER: str(count), ID_HEADER: "batch-" + ids[0],
                                      "content-type": "application/json"}))
            broker.send_confirmed(messages)
    finally:
        client.close()
        broker.close()


def backlog_run(env: Any, packets: int) -> Dict[str, Any]:
    """Run the backlog measurement with ``packets`` packets (see the module docstring).

    :returns: ``{"packets", "preload_s", "drain_s", "peak_rss_mb", "equal", "error"}``.
    """
    from .harness import verify
    from .modes import GolcondeClient

    args = env.args
    result: Dict[str, Any] = {"packets": packets, "preload_s": None, "drain_s": None,
                              "peak_rss_mb": None, "equal": False, "error": None}
    env.src.recreate_databases(["src"])
    env.tgt.recreate_databases(["t1", "t2"])
    for dsn in (env.src.dsn("src"), env.tgt.dsn("t1"), env.tgt.dsn("t2")):
        env.execute(dsn, CREATE_TABLE)
    mode = GolcondeClient(env)
    watcher = Watcher({"src": env.src.dsn("src"), "t1": env.tgt.dsn("t1"), "t2": env.tgt.dsn("t2")},
                      {"src": "src", "t1": "tgt", "t2": "tgt"})
    try:
        mode.write_config()
        keys = KeyRange(BACKLOG_BASE, packets, args.clients).keys("insert")
        began = time.monotonic()
        preload(env, mode, keys)
        result["preload_s"] = round(time.monotonic() - began, 1)
        began = time.monotonic()
        mode.start_daemon()
        pids = mode.workers()
        watcher.wait(["src", "t1", "t2"], (packets, 0), args.timeout)
        result["drain_s"] = round(time.monotonic() - began, 1)
        result["peak_rss_mb"] = round(sum(procstat.peak_rss_mb(pid) or 0 for pid in pids), 1)
        verify(env, ["t1", "t2"], 60)
        result["equal"] = True
    except Exception as exc:  # reported with the figures; the benchmark goes on
        LOGGER.error("backlog run: %s", exc, exc_info=not isinstance(exc, BenchError))
        result["error"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
    finally:
        try:
            mode.teardown()
        finally:
            watcher.close()
    return result
