"""``batch_bytes``: a batch holds at most that many bytes of packets, in the client flow (the
destination's batches, taken from its inbox) and in the trigger flow (the drain's fetches from
``golconde.queue``), on RabbitMQ. Only the destination runs (``only``): each of its batches is
fanned out as one batch message per target, so the target's queue, read raw, shows how the
destination cut its batches."""
from __future__ import annotations

import json
import uuid

import psycopg2
import pytest

from golconde import envelope, trigger
from golconde.daemon import Daemon

from .flow_support import (DaemonProcess, drain_queue, execute, make_config, parse_config, query,
                           queue_backlog, send_raw, wait_for, write_config)

DOCS = "CREATE TABLE public.docs (id integer PRIMARY KEY, body text NOT NULL)"
BATCH_BYTES = 8192
PAYLOAD = 1900          # characters of body per packet: about 1,950 bytes of JSON per packet
PACKETS = 30


def entries(delivery):
    return int(delivery.headers.get(envelope.BATCH_HEADER, 1))


def count(dsn, table):
    return query(dsn, "SELECT count(*) FROM %s" % table)[0][0]     # test-only, fixed names


def run_destination_until(config, done, message):
    daemon = Daemon(config, only=[config.destinations[0].name])
    daemon.start()
    try:
        wait_for(done, timeout=60, message=message)
    finally:
        assert daemon.stop()


def check_fanned_out(target_queue, sizes, bound=BATCH_BYTES):
    """The batch messages on the target's queue: each of the ``len(sizes)`` packets (of these
    sizes) once, no batch over ``bound`` bytes."""
    total = len(sizes)
    messages = drain_queue(target_queue, wait=3.0)
    counts = [entries(message) for message in messages]
    ids = [entry[0] for message in messages for entry in envelope.decode(message.body)]
    assert sum(counts) == len(ids) == len(set(ids)) == total
    per_batch = max(1, bound // max(sizes))
    assert max(counts) <= per_batch, counts
    # without the bound, the queued packets would have gone out in one or two batches
    assert len(messages) >= total // per_batch, counts


def drain_trigger_queue(docs, bound, rows_query, params):
    """A trigger-mode destination with ``batch_bytes`` = ``bound``: installs the capture trigger,
    writes the rows (``rows_query``), runs the destination until ``golconde.queue`` is drained.
    :returns: (the target's queue, the sizes of the queued packets' JSON text)."""
    canonical, target = docs
    mapping = make_config(canonical, {"t1": target}, "public.docs", mode="trigger",
                          batch_bytes=bound, poll_interval=0.2)
    config = parse_config(mapping)
    destination = config.destinations[0]
    conn = psycopg2.connect(canonical)
    try:
        assert trigger.install(conn, "public.docs", destination.name).warning is None
    finally:
        conn.close()
    execute(canonical, rows_query, params)
    sizes = [size for (size,) in
             query(canonical, "SELECT octet_length(packet::text) FROM golconde.queue")]
    run_destination_until(config, lambda: queue_backlog(canonical, destination.name) == 0,
                          "the queue drained")
    return destination.targets[0].queue, sizes


@pytest.fixture
def docs(make_database):
    canonical, target = make_database(), make_database()
    for dsn in (canonical, target):
        execute(dsn, DOCS)
    return canonical, target


def test_client_flow_batches_stay_within_batch_bytes(docs):
    canonical, target = docs
    mapping = make_config(canonical, {"t1": target}, "public.docs", batch_bytes=BATCH_BYTES)
    config = parse_config(mapping)
    destination = config.destinations[0]
    assert destination.batch_bytes == destination.targets[0].batch_bytes == BATCH_BYTES   # inherited
    bodies = [json.dumps({"action": "add", "data": {"id": i, "body": "x" * PAYLOAD}})
              for i in range(PACKETS)]
    # queued before the destination starts: its inbox fills at once, so only the bound cuts
    send_raw(destination.queue, bodies, headers=[{"golconde-id": str(uuid.uuid4())} for _ in bodies])
    run_destination_until(config, lambda: count(canonical, "public.docs") == PACKETS,
                          "every packet applied to the canonical table")
    check_fanned_out(destination.targets[0].queue, [len(body.encode()) for body in bodies])


def test_trigger_flow_fetches_stay_within_batch_bytes(docs):
    target_queue, sizes = drain_trigger_queue(
        docs, BATCH_BYTES,
        "INSERT INTO public.docs SELECT g, repeat('x', %s) FROM generate_series(0, %s) g",
        (PAYLOAD, PACKETS - 1))
    assert len(sizes) == PACKETS
    check_fanned_out(target_queue, sizes)


def peak_rss_mb(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmHWM for pid %d" % pid)


LARGE_PACKETS, LARGE_PAYLOAD, LARGE_BOUND = 120, 256 * 1024, 1024 * 1024
RSS_LIMIT_MB = 120          # measured: 60 MB with the bound, 253 MB without it


def test_large_packets_keep_golconded_memory_bounded(docs, tmp_path):
    """120 packets of 256 KiB (30 MiB) queued at once: with batch_bytes 1 MiB golconded takes a few
    of them at a time. Without the byte bound its inbox took all of them (prefetch 1500), applied
    them in one transaction and recorded their fanned-out text in one statement."""
    canonical, target = docs
    mapping = make_config(canonical, {"t1": target}, "public.docs", batch_bytes=LARGE_BOUND)
    config = parse_config(mapping)
    bodies = [json.dumps({"action": "add",
                          "data": {"id": i, "body": "%06d" % i * (LARGE_PAYLOAD // 6)}})
              for i in range(LARGE_PACKETS)]
    for start in range(0, LARGE_PACKETS, 20):
        send_raw(config.destinations[0].queue, bodies[start:start + 20],
                 headers=[{"golconde-id": str(uuid.uuid4())} for _ in range(20)])
    daemon = DaemonProcess(write_config(str(tmp_path / "golconde.yaml"), mapping),
                           str(tmp_path / "golconded.log")).start()
    try:
        wait_for(lambda: count(target, "public.docs") == LARGE_PACKETS, timeout=120,
                 message="every packet applied at the target")
        peak = peak_rss_mb(daemon.proc.pid)
    finally:
        assert daemon.terminate() == 0
    assert query(target, "SELECT count(*) FROM public.docs WHERE length(body) = %s",
                 (LARGE_PAYLOAD // 6 * 6,))[0][0] == LARGE_PACKETS
    assert peak < RSS_LIMIT_MB, "golconded peak RSS %.1f MB" % peak


def test_trigger_flow_large_rows_drain_within_batch_bytes(docs):
    """Rows of 256 KiB with batch_bytes 1 MiB: each fetch after the first asks PostgreSQL for a few
    rows only (TriggerDestination._next_limit), and every row still goes out exactly once."""
    target_queue, sizes = drain_trigger_queue(
        docs, LARGE_BOUND,
        "INSERT INTO public.docs SELECT g, repeat(md5(g::text), %s) FROM generate_series(1, 40) g",
        (LARGE_PAYLOAD // 32,))
    assert len(sizes) == 40 and min(sizes) > LARGE_PAYLOAD
    assert LARGE_BOUND // max(sizes) == LARGE_BOUND // min(sizes)    # the same bound per batch
    check_fanned_out(target_queue, sizes, bound=LARGE_BOUND)
