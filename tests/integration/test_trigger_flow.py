"""End to end, trigger-based flow: capture trigger -> golconde.queue -> daemon -> targets, on each
STOMP broker of the ``broker`` fixture (RabbitMQ, ActiveMQ)."""
from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg2
import pytest
from psycopg2 import sql

from golconde import destination as destination_module
from golconde import trigger
from golconde.compare import compare
from golconde.daemon import Daemon
from golconde.packet import MAX_PACKET_BYTES

from .flow_support import (drain_queue, execute, make_config, parse_config, query, queue_backlog,
                           wait_for)

ACCOUNTS = """
CREATE TABLE public.accounts (
    aid      integer PRIMARY KEY,
    balance  numeric(20, 4) NOT NULL DEFAULT 0,
    owner    text,
    tags     text[],
    profile  jsonb,
    updated  timestamptz DEFAULT now()
)
"""


@pytest.fixture
def trigger_flow(make_database, broker):
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, ACCOUNTS)
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.accounts", mode="trigger",
                          broker=broker, poll_interval=0.5)
    config = parse_config(mapping)
    destination = config.destinations[0]
    conn = psycopg2.connect(canonical)
    result = trigger.install(conn, "public.accounts", destination.name)
    conn.close()
    assert result.warning is None
    daemon = Daemon(config)
    daemon.start()
    yield {"canonical": canonical, "targets": [t1, t2], "daemon": daemon, "destination": destination,
           "broker": broker}
    assert daemon.stop()


def equal(state, table="public.accounts"):
    return all(compare(state["canonical"], table, t, table).equal for t in state["targets"])


def test_changes_are_distributed_and_rollbacks_are_not(trigger_flow):
    canonical = trigger_flow["canonical"]
    execute(canonical, "INSERT INTO accounts (aid, balance, owner, tags, profile)"
                       " SELECT g, g * 1.5, 'owner ' || g, ARRAY['a', NULL, 'it''s'], jsonb_build_object('g', g)"
                       " FROM generate_series(1, 200) g")
    execute(canonical, "UPDATE accounts SET balance = balance + 0.0001, owner = NULL WHERE aid % 3 = 0")
    execute(canonical, "DELETE FROM accounts WHERE aid % 10 = 0")
    conn = psycopg2.connect(canonical)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO accounts (aid, owner) VALUES (100000, 'rolled back')")
        cur.execute("UPDATE accounts SET owner = 'rolled back' WHERE aid = 1")
    conn.rollback()
    conn.close()
    execute(canonical, "INSERT INTO accounts (aid, owner) VALUES (500, 'sentinel')")
    wait_for(lambda: query(trigger_flow["targets"][1], "SELECT count(*) FROM accounts WHERE aid = 500")[0][0] == 1
             and equal(trigger_flow), message="targets equal to canonical")
    for target in trigger_flow["targets"]:
        assert query(target, "SELECT count(*) FROM accounts WHERE owner = 'rolled back'")[0][0] == 0
        assert query(target, "SELECT count(*) FROM accounts")[0][0] == 181
    # the queue table is drained: every row sent, by the drain's saved position
    wait_for(lambda: queue_backlog(canonical, trigger_flow["destination"].name) == 0, timeout=10,
             message="queue table drained")


def test_a_drain_stuck_on_a_lock_shows_a_growing_lag(trigger_flow):
    """A drain whose fetch waits on a lock (here on golconde.queue) showed the lag of its last
    batch, 0, while nothing could be distributed: /health said ok. The cycle in progress now
    counts in the live lag, which falls back to 0 once the lock is gone."""
    from golconde.metrics import health
    canonical, daemon = trigger_flow["canonical"], trigger_flow["daemon"]
    name = trigger_flow["destination"].thread_name
    stats = daemon.registry.get(name)
    execute(canonical, "INSERT INTO accounts (aid) VALUES (1)")
    wait_for(lambda: all(query(t, "SELECT count(*) FROM accounts")[0][0] == 1
                         for t in trigger_flow["targets"]), message="warm-up distributed")
    wait_for(lambda: stats.snapshot()["lag"] == 0.0, timeout=10, message="idle lag 0")
    assert health(daemon.registry.snapshot(), max_backlog=10000, max_lag=1.0)[0]
    locker = psycopg2.connect(canonical)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE golconde.queue IN ACCESS EXCLUSIVE MODE")
        locked = time.time()
        wait_for(lambda: (stats.snapshot()["lag"] or 0) > 2.0, timeout=20,
                 message="the stuck drain's lag growing")
        assert stats.snapshot()["lag"] <= time.time() - locked + 1.0
        ok, document = health(daemon.registry.snapshot(), max_backlog=10000, max_lag=1.0)
        assert not ok and any(r.startswith("%s: lag " % name) for r in document["reasons"]), document
    finally:
        locker.rollback()
        locker.close()
    wait_for(lambda: stats.snapshot()["lag"] == 0.0, timeout=10, message="lag back to 0")
    execute(canonical, "INSERT INTO accounts (aid) VALUES (2)")
    wait_for(lambda: equal(trigger_flow), message="distributing again after the lock")


def test_a_change_over_the_packet_size_limit_is_dead_lettered_with_its_reason(trigger_flow):
    """A captured row whose packet exceeds MAX_PACKET_BYTES (too large for a broker message) is
    dead-lettered with the reason and what identifies the change (queue id, packet id, table,
    time), and leaves the queue; the changes after it flow."""
    canonical = trigger_flow["canonical"]
    execute(canonical, "INSERT INTO accounts (aid, owner) VALUES (1, repeat('x', 4500000))")
    execute(canonical, "INSERT INTO accounts (aid, owner) VALUES (2, 'after')")
    for target in trigger_flow["targets"]:
        wait_for(lambda target=target: query(target, "SELECT aid FROM accounts") == [(2,)],
                 message="the change after the large one applied")
    letters = drain_queue(trigger_flow["destination"].dead_letter_queue, wait=2.0,
                          broker=trigger_flow["broker"])
    assert len(letters) == 1
    assert "more than the 4194304 allowed" in letters[0].headers["golconde-reason"]
    headers = letters[0].headers        # as every dead letter's: when, and when captured
    assert abs(float(headers["golconde-dead-lettered-at"]) - time.time()) < 120
    assert float(headers["golconde-created-at"]) <= float(headers["golconde-dead-lettered-at"])
    body = json.loads(letters[0].body)["undecodable"]
    assert body["relation"].endswith("accounts")
    assert body["queue_id"] > 0 and letters[0].headers["golconde-id"].endswith(body["packet_id"])
    wait_for(lambda: queue_backlog(canonical, trigger_flow["destination"].name) == 0, timeout=10,
             message="queue table drained")


def test_queue_rows_that_are_not_packet_objects_are_dead_lettered_alone(trigger_flow, caplog):
    """A row written into golconde.queue by hand whose packet is JSON but not an object (a
    number, null, a string holding packet text, an array) is dead-lettered with what it is and
    its JSON text as queued, and logged; the captured changes around it, in the same
    transaction, flow."""
    caplog.set_level("WARNING", logger="golconde.destination")
    canonical, name = trigger_flow["canonical"], trigger_flow["destination"].name
    odd = ["5", "null", "true", json.dumps(json.dumps({"action": "add", "data": {"aid": 21}})), "[1, 2]"]
    conn = psycopg2.connect(canonical)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO accounts (aid, owner) VALUES (20, 'before')")
        for text in odd:
            cur.execute("INSERT INTO golconde.queue (destination, relation, packet)"
                        " VALUES (%s, 'public.accounts', %s::jsonb)", (name, text))
        cur.execute("INSERT INTO accounts (aid, owner) VALUES (22, 'after')")
    conn.commit()
    conn.close()
    for target in trigger_flow["targets"]:
        wait_for(lambda target=target: query(target, "SELECT aid FROM accounts ORDER BY aid") == [(20,), (22,)],
                 message="the captured changes around the odd rows applied")
    letters = []
    wait_for(lambda: letters.extend(drain_queue(trigger_flow["destination"].dead_letter_queue,
                                                wait=0.5, broker=trigger_flow["broker"]))
             or len(letters) >= len(odd), timeout=30, message="the odd rows dead-lettered")
    by_body = {letter.body: letter.headers["golconde-reason"] for letter in letters}
    assert by_body == {
        b"5": "packet must be a JSON object, not a number",
        b"null": "packet must be a JSON object, not null",
        b"true": "packet must be a JSON object, not a boolean",
        json.dumps(json.dumps({"action": "add", "data": {"aid": 21}})).encode():
            "packet must be a JSON object, not a string",
        b"[1, 2]": "packet must be a JSON object, not an array"}, by_body
    for target in trigger_flow["destination"].targets:
        assert drain_queue(target.dead_letter_queue, wait=0.2, broker=trigger_flow["broker"]) == []
    # counted once the broker confirmed them (a reader of the queue may see them first); the
    # last one's reason is the last error, as at a client-flow destination
    stats = trigger_flow["daemon"].registry.get(name)
    wait_for(lambda: stats.snapshot()["dead_lettered"] == len(odd), timeout=10,
             message="the odd rows counted: %s" % stats.snapshot())
    assert stats.snapshot()["last_error"] == "dead-lettered: packet must be a JSON object, not an array"
    logged = [r.getMessage() for r in caplog.records if "dead-lettered: packet must be" in r.getMessage()]
    assert sorted(line.split(": ", 1)[1] for line in logged) == sorted(by_body.values()), logged
    wait_for(lambda: queue_backlog(canonical, name) == 0, timeout=10, message="queue table drained")


def test_a_change_of_exactly_the_packet_size_limit_is_applied(trigger_flow):
    """A packet of exactly MAX_PACKET_BYTES passes the drain and travels alone in a batch
    message a little larger (its envelope): the targets apply it."""
    canonical = trigger_flow["canonical"]
    conn = psycopg2.connect(canonical)
    try:     # the packet's size for a known length of the text, in a transaction rolled back
        with conn.cursor() as cur:
            # a fixed time: now()'s text is a character shorter when its microseconds end in 0
            cur.execute("INSERT INTO accounts (aid, owner, updated)"
                        " VALUES (3, repeat('y', 4000000), '2026-01-02 03:04:05.123456+00')")
            cur.execute("SELECT octet_length(packet::text) FROM golconde.queue")
            overhead = cur.fetchone()[0] - 4000000
        conn.rollback()
    finally:
        conn.close()
    conn = psycopg2.connect(canonical)
    try:     # measured before the commit: once committed, the drain may rotate the row away
        with conn.cursor() as cur:
            cur.execute("INSERT INTO accounts (aid, owner, updated)"
                        " VALUES (3, repeat('y', %s), '2026-01-02 03:04:05.123456+00')",
                        (MAX_PACKET_BYTES - overhead,))
            cur.execute("SELECT octet_length(packet::text) FROM golconde.queue"
                        " WHERE txid = pg_catalog.pg_current_xact_id()")
            assert cur.fetchall() == [(MAX_PACKET_BYTES,)]
        conn.commit()
    finally:
        conn.close()
    for target in trigger_flow["targets"]:
        wait_for(lambda target=target: query(target, "SELECT aid, length(owner) FROM accounts")
                 == [(3, MAX_PACKET_BYTES - overhead)], message="the largest packet applied")


def test_out_of_order_commits_are_not_skipped(trigger_flow):
    """A transaction that took its queue id first but commits last is still distributed."""
    canonical = trigger_flow["canonical"]
    slow = psycopg2.connect(canonical)
    with slow.cursor() as cur:
        cur.execute("INSERT INTO accounts (aid, owner) VALUES (1, 'slow, smaller queue id')")
    # later transactions commit and get drained while the slow one is open
    for aid in range(2, 50):
        execute(canonical, "INSERT INTO accounts (aid, owner) VALUES (%s, 'fast')", (aid,))
    wait_for(lambda: query(trigger_flow["targets"][0], "SELECT count(*) FROM accounts")[0][0] == 48,
             message="fast rows distributed")
    slow.commit()
    slow.close()
    wait_for(lambda: equal(trigger_flow) and query(trigger_flow["targets"][0],
             "SELECT count(*) FROM accounts")[0][0] == 49, message="slow row distributed")


def test_concurrent_writers_keep_per_row_order(trigger_flow):
    canonical = trigger_flow["canonical"]
    execute(canonical, "INSERT INTO accounts (aid, balance) SELECT g, 0 FROM generate_series(1, 20) g")

    def writer(seed: int) -> None:
        conn = psycopg2.connect(canonical)
        conn.autocommit = True
        with conn.cursor() as cur:
            for i in range(150):
                cur.execute("UPDATE accounts SET balance = balance + 1, owner = %s WHERE aid = %s",
                            ("w%d-%d" % (seed, i), (i * 7 + seed) % 20 + 1))
        conn.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert query(canonical, "SELECT sum(balance) FROM accounts")[0][0] == 600
    wait_for(lambda: equal(trigger_flow), message="targets equal after concurrent updates")


def test_keyless_table_distributes_inserts(make_database, broker):
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE history (tid integer, delta integer, mtime timestamp)")
    config = parse_config(make_config(canonical, {"t1": t1}, "history", mode="trigger",
                                      broker=broker))
    conn = psycopg2.connect(canonical)
    result = trigger.install(conn, "history", config.destinations[0].name)
    conn.close()
    assert "no primary key" in result.warning
    daemon = Daemon(config)
    daemon.start()
    try:
        execute(canonical, "INSERT INTO history SELECT g, g, now() FROM generate_series(1, 300) g")
        wait_for(lambda: compare(canonical, "history", t1, "history").equal
                 and query(t1, "SELECT count(*) FROM history")[0][0] == 300, message="history distributed")
    finally:
        daemon.stop()


def test_values_a_writer_prints_its_own_way_and_integers_of_any_length(make_database, broker):
    """A writer with DateStyle 'SQL, DMY' (ranges are printed by their output function) and
    integers past Python's 4300 digits: the targets get the canonical table's values."""
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE vals (id int PRIMARY KEY, n numeric, dr daterange, tr tstzrange)")
    config = parse_config(make_config(canonical, {"t1": t1}, "vals", mode="trigger", broker=broker))
    conn = psycopg2.connect(canonical)
    trigger.install(conn, "vals", config.destinations[0].name)
    conn.close()
    daemon = Daemon(config)
    daemon.start()
    try:
        execute(canonical, "SET DateStyle = 'SQL, DMY';"
                           " INSERT INTO vals VALUES (1, repeat('9', 5000)::numeric, '[2020-02-01,2020-03-05)',"
                           " '[2020-02-01 00:00+00,2020-03-05 00:00+00)'), (2, 6, NULL, NULL);"
                           " UPDATE vals SET n = -n WHERE id = 1")
        wait_for(lambda: compare(canonical, "vals", t1, "vals").equal
                 and query(t1, "SELECT count(*) FROM vals")[0][0] == 2, message="vals distributed")
        assert query(t1, "SELECT lower(dr)::text, length(n::text) FROM vals WHERE id = 1") == [
            ("2020-02-01", 5001)]
    finally:
        assert daemon.stop()


def _accounts(make_database, broker, poll_interval):
    """A canonical and a target database with table accounts, captured by the trigger of the
    configuration's one destination: ``(canonical, target, config)``."""
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ACCOUNTS)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.accounts", mode="trigger",
                                      broker=broker, poll_interval=poll_interval))
    conn = psycopg2.connect(canonical)
    try:
        trigger.install(conn, "public.accounts", config.destinations[0].name)
    finally:
        conn.close()
    return canonical, t1, config


def test_notify_wakes_the_drain_before_its_poll_interval(make_database, broker):
    """The capture trigger does not NOTIFY (it would serialize commits); the daemon polls every
    poll_interval while the queue is empty, and an application's NOTIFY wakes it at once."""
    canonical, t1, config = _accounts(make_database, broker, poll_interval=60)
    destination = config.destinations[0].name
    daemon = Daemon(config)
    daemon.start()
    try:
        wait_for(lambda: all(listener.ready() for listener in daemon.listeners.values()), timeout=30,
                 message="listeners connected")
        time.sleep(1)           # the drain found the queue empty and waits its poll interval
        execute(canonical, "INSERT INTO accounts (aid) VALUES (1)")
        wait_for(lambda: query(canonical, "SELECT count(*) FROM golconde.queue")[0][0] == 1, timeout=5)
        execute(canonical, "SELECT pg_notify('golconde', %s)", (destination,))
        wait_for(lambda: query(t1, "SELECT count(*) FROM accounts")[0][0] == 1, timeout=10,
                 message="row drained after NOTIFY, well before the 60 s poll interval")
    finally:
        daemon.stop()


def test_batch_linger_lets_a_partial_batch_gather(make_database, broker):
    """After a batch that was not full, the drain fetches again only ``batch_linger`` seconds after
    the previous fetch: rows committed one by one within that time reach the targets together
    (each target applies one batch message per transaction: distinct xmin = transactions)."""
    canonical, target = make_database(), make_database()
    for dsn in (canonical, target):
        execute(dsn, ACCOUNTS)
    config = parse_config(make_config(canonical, {"t1": target}, "public.accounts", mode="trigger",
                                      broker=broker, batch_linger=1.0))
    assert config.destinations[0].batch_linger == 1.0
    conn = psycopg2.connect(canonical)
    trigger.install(conn, "public.accounts", config.destinations[0].name)
    conn.close()
    daemon = Daemon(config)
    daemon.start()
    try:
        writer = psycopg2.connect(canonical)
        writer.autocommit = True
        with writer.cursor() as cur:
            for aid in range(1, 11):           # ten transactions, 50 ms apart: 0.5 s in all
                cur.execute("INSERT INTO accounts (aid) VALUES (%s)", (aid,))
                time.sleep(0.05)
        writer.close()
        wait_for(lambda: query(target, "SELECT count(*) FROM accounts")[0][0] == 10,
                 message="the ten rows at the target")
        # the first row may go alone; the rest gathered for up to 1 s (without the linger, the
        # drain polls every 10 ms while rows flow: about ten batches)
        assert query(target, "SELECT count(DISTINCT xmin::text) FROM accounts")[0][0] <= 3
    finally:
        assert daemon.stop()


def test_the_drain_truncates_sent_partitions_and_deletes_its_rows_when_another_blocks(
        make_database, broker, monkeypatch):
    """Ids cross into the next partition: once the targets have everything, the drain truncates
    the partition it left. A destination nobody drains keeps a partition from being truncated;
    after ROTATE_PATIENCE the drain deletes its own sent rows there instead, and leaves the
    other's."""
    monkeypatch.setattr(destination_module, "ROTATE_INTERVAL", 0.2)
    monkeypatch.setattr(destination_module, "ROTATE_PATIENCE", 1.0)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ACCOUNTS)
    execute(canonical, "CREATE TABLE ghost (id int PRIMARY KEY)")
    config = parse_config(make_config(canonical, {"t1": t1}, "public.accounts", mode="trigger",
                                      broker=broker, poll_interval=0.2))
    name = config.destinations[0].name
    conn = psycopg2.connect(canonical)
    trigger.install(conn, "public.accounts", name)
    trigger.install(conn, "ghost", "Ghost")
    conn.close()
    execute(canonical, "SELECT setval('golconde.queue_id_seq', %s)",
            (trigger.QUEUE_PARTITION_IDS - 100,))
    execute(canonical, "INSERT INTO accounts (aid) SELECT g FROM generate_series(1, 60) g")
    daemon = Daemon(config)
    daemon.start()
    try:
        execute(canonical, "UPDATE accounts SET owner = 'second' WHERE aid <= 30")  # partition 0
        execute(canonical, "INSERT INTO accounts (aid) SELECT g FROM generate_series(61, 200) g")
        wait_for(lambda: equal({"canonical": canonical, "targets": [t1]}), message="targets equal")
        wait_for(lambda: query(canonical, "SELECT count(*) FROM golconde.queue_0")[0][0] == 0,
                 timeout=20, message="partition 0 truncated")
        # ids 499,901 to 500,130: those from 500,000 on are in partition 1, where ids still go
        assert query(canonical, "SELECT count(*) FROM golconde.queue_1")[0][0] == 131
        # a destination nobody drains: its row holds partition 1 once ids go on to partition 2
        execute(canonical, "INSERT INTO ghost VALUES (1)")
        execute(canonical, "SELECT setval('golconde.queue_id_seq', %s)",
                (2 * trigger.QUEUE_PARTITION_IDS,))
        execute(canonical, "INSERT INTO accounts (aid) VALUES (1000)")
        wait_for(lambda: query(canonical, "SELECT destination, count(*) FROM golconde.queue_1"
                                          " GROUP BY 1") == [("Ghost", 1)],
                 timeout=20, message="the drain's own rows deleted, the other's kept")
        assert query(t1, "SELECT count(*) FROM accounts")[0][0] == 201
        assert queue_backlog(canonical, name) == 0 and queue_backlog(canonical, "Ghost") == 1
    finally:
        assert daemon.stop()


def test_a_partition_a_running_transaction_keeps_from_being_truncated_is_a_standing_problem(
        make_database, broker, monkeypatch):
    """A writer left idle in its transaction after writing a row of a partition that ids then
    leave keeps it from being truncated (the partition takes the next rows when ids come back):
    after ROTATE_PATIENCE that is the standing problem queue-rotation, naming the partition and
    the session (/health fails; it said ok while the queue grew), also while ids are back in
    it and that writer still runs; cleared once its rows are sent, and the partition truncated
    once ids left it again."""
    from golconde.metrics import health

    monkeypatch.setattr(destination_module, "ROTATE_INTERVAL", 0.2)
    monkeypatch.setattr(destination_module, "ROTATE_PATIENCE", 1.0)
    canonical, t1, config = _accounts(make_database, broker, poll_interval=0.2)
    execute(canonical, "SELECT setval('golconde.queue_id_seq', %s)",
            (trigger.QUEUE_PARTITION_IDS - 10,))
    idle = psycopg2.connect(canonical)
    daemon = Daemon(config)
    daemon.start()
    try:
        with idle.cursor() as cur:          # an id of partition 0, and idle in transaction
            cur.execute("INSERT INTO accounts (aid) VALUES (1)")
        execute(canonical, "INSERT INTO accounts (aid) SELECT g FROM generate_series(2, 40) g")
        pid = idle.get_backend_pid()
        stats = daemon.registry.get(config.destinations[0].thread_name)
        wait_for(lambda: any(p.startswith("golconde.queue_0 not truncated for ") and
                             "its lock is held (pid %d RowExclusiveLock, idle in transaction for "
                             % pid in p for p in stats.snapshot()["problems"]),
                 timeout=30, message="the stuck partition reported")
        assert not health(daemon.registry.snapshot(), 10000, 300.0)[0]
        # ids come back to partition 0, which still holds its rows: still reported
        execute(canonical, "SELECT setval('golconde.queue_id_seq', %s)",
                (3 * trigger.QUEUE_PARTITION_IDS,))
        execute(canonical, "INSERT INTO accounts (aid) VALUES (41)")
        wait_for(lambda: any("ids came back to it while it still held rows of the round before"
                             " (pid %d RowExclusiveLock, idle in transaction" % pid
                             in p for p in stats.snapshot()["problems"]),
                 timeout=30, message="still reported with ids back in it")
        time.sleep(1.0)
        assert any(p.startswith("golconde.queue_0 not truncated") for p in stats.snapshot()["problems"])
        idle.commit()
        # its row sent, nothing of the round before waits: no problem any more, though the
        # partition is emptied only once ids move on (it stayed reported, /health failing,
        # until then: days on a quiet queue)
        wait_for(lambda: stats.snapshot()["problems"] == [], timeout=30,
                 message="cleared while ids are back in it")
        assert query(canonical, "SELECT count(*) FROM golconde.queue_0")[0][0] > 0
        execute(canonical, "SELECT setval('golconde.queue_id_seq', %s)",
                (4 * trigger.QUEUE_PARTITION_IDS,))
        execute(canonical, "INSERT INTO accounts (aid) VALUES (42)")
        wait_for(lambda: query(canonical, "SELECT count(*) FROM golconde.queue_0")[0][0] == 0,
                 timeout=30, message="partition 0 truncated")
        wait_for(lambda: stats.snapshot()["problems"] == [], timeout=30,
                 message="the problem cleared")
        wait_for(lambda: equal({"canonical": canonical, "targets": [t1]}), message="targets equal")
    finally:
        idle.close()
        assert daemon.stop()


def test_a_queue_sequence_with_a_cache_is_a_standing_problem(make_database, broker, monkeypatch):
    """With CACHE n, ids no longer follow the writers' lock order (a key's changes could be sent
    out of order): the drain reports it until the sequence hands out ids one at a time again."""
    monkeypatch.setattr(destination_module, "KEY_CHECK_INTERVAL", 0.2)
    canonical, _, config = _accounts(make_database, broker, poll_interval=0.2)
    execute(canonical, "ALTER SEQUENCE golconde.queue_id_seq CACHE 20")
    daemon = Daemon(config)
    daemon.start()
    stats = daemon.registry.get(config.destinations[0].thread_name)
    try:
        wait_for(lambda: stats.snapshot()["problems"] == [
            "golconde.queue_id_seq has CACHE 20: ids no longer follow the order of the writers'"
            " row locks, so a key's changes may be sent out of order; run ALTER SEQUENCE"
            " golconde.queue_id_seq CACHE 1"], timeout=20, message="the problem reported")
        execute(canonical, "ALTER SEQUENCE golconde.queue_id_seq CACHE 1")
        wait_for(lambda: stats.snapshot()["problems"] == [], timeout=20, message="cleared")
    finally:
        assert daemon.stop()


def test_a_primary_key_changed_after_the_install_is_a_standing_problem(make_database, broker,
                                                                        monkeypatch):
    """The capture trigger's key columns are fixed at its install: after the table's primary key
    changed, the drain reports it (logged, counted once, in /stats and failing /health) and goes
    on draining; a reinstall clears it."""
    from golconde.metrics import health

    monkeypatch.setattr(destination_module, "KEY_CHECK_INTERVAL", 0.2)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ACCOUNTS)
        execute(dsn, "ALTER TABLE accounts ADD region text NOT NULL DEFAULT 'eu'")
    config = parse_config(make_config(canonical, {"t1": t1}, "public.accounts", mode="trigger",
                                      broker=broker, poll_interval=0.2))
    name = config.destinations[0].name
    conn = psycopg2.connect(canonical)
    conn.autocommit = True
    trigger.install(conn, "public.accounts", name)
    execute(canonical, "ALTER TABLE accounts DROP CONSTRAINT accounts_pkey,"
                       " ADD PRIMARY KEY (aid, region)")
    daemon = Daemon(config)
    daemon.start()
    stats = daemon.registry.get(config.destinations[0].thread_name)
    try:
        wait_for(lambda: stats.snapshot()["problems"], timeout=20, message="the problem reported")
        snapshot = stats.snapshot()
        assert snapshot["problems"] == [
            "capture trigger %s on public.accounts restricts its UPDATE and DELETE packets by"
            " (aid), but the table's primary key is now (aid, region): run 'golconde trigger"
            " install' for this table again" % trigger.trigger_name(name)]
        ok, document = health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)
        assert not ok and any("primary key is now (aid, region)" in r for r in document["reasons"])
        execute(canonical, "INSERT INTO accounts (aid) SELECT g FROM generate_series(1, 20) g")
        wait_for(lambda: equal({"canonical": canonical, "targets": [t1]}), message="still drained")
        time.sleep(0.5)                 # several checks: the same problem is counted once
        assert stats.snapshot()["errors"] == 1
        trigger.install(conn, "public.accounts", name)
        wait_for(lambda: not stats.snapshot()["problems"], timeout=20, message="the problem cleared")
        assert health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)[0]
    finally:
        conn.close()
        assert daemon.stop()


def test_a_drain_role_that_may_not_truncate_deletes_the_rows_it_sent(make_database, broker,
                                                                      monkeypatch, caplog):
    """The drain's role with only the rights the README lists (no TRUNCATE): the rotation is
    refused, logged once, and the drain deletes the rows it sent from the partitions ids left
    instead; everything reaches the target."""
    monkeypatch.setattr(destination_module, "ROTATE_INTERVAL", 0.2)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ACCOUNTS)
    role = "golconde_drain_%s" % uuid.uuid4().hex[:8]
    conn = psycopg2.connect(canonical)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        config = parse_config(make_config(canonical, {"t1": t1}, "public.accounts", mode="trigger",
                                          broker=broker, poll_interval=0.2))
        name = config.destinations[0].name
        trigger.install(conn, "public.accounts", name)
        with conn.cursor() as cur:
            for grant in ("GRANT USAGE ON SCHEMA golconde TO {}",
                          "GRANT SELECT, INSERT, UPDATE ON golconde.drain_position TO {}",
                          "GRANT SELECT, DELETE ON golconde.queue TO {}",
                          "GRANT SELECT ON golconde.queue_id_seq TO {}"):
                cur.execute(sql.SQL(grant).format(sql.Identifier(role)))
        params = psycopg2.extensions.parse_dsn(canonical)
        params["user"] = role
        mapping = make_config(canonical, {"t1": t1}, "public.accounts", mode="trigger",
                              name=name, broker=broker, poll_interval=0.2)
        mapping["Destinations"][name]["pgsql"] = psycopg2.extensions.make_dsn(**params)
        config = parse_config(mapping)
        execute(canonical, "SELECT setval('golconde.queue_id_seq', %s)",
                (trigger.QUEUE_PARTITION_IDS - 100,))
        execute(canonical, "INSERT INTO accounts (aid) SELECT g FROM generate_series(1, 60) g")
        daemon = Daemon(config)
        with caplog.at_level("INFO", logger="golconde.destination"):
            daemon.start()
            try:
                execute(canonical, "UPDATE accounts SET owner = 'x' WHERE aid <= 30")
                execute(canonical, "INSERT INTO accounts (aid) SELECT g FROM generate_series(61, 200) g")
                wait_for(lambda: equal({"canonical": canonical, "targets": [t1]}),
                         message="target equal")
                # ids 499,901 to 500,130, in partitions 0 and 1: the sent rows deleted from both
                wait_for(lambda: query(canonical, "SELECT count(*) FROM golconde.queue")[0][0] == 0,
                         timeout=20, message="the sent rows deleted")
                execute(canonical, "DELETE FROM accounts WHERE aid > 150")
                wait_for(lambda: equal({"canonical": canonical, "targets": [t1]}),
                         message="target equal after the deletes")
                wait_for(lambda: queue_backlog(canonical, name) == 0, timeout=10,
                         message="the position saved")
            finally:
                assert daemon.stop()
        refused = [r for r in caplog.records if "may not truncate" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in caplog.records]
        assert not [r for r in caplog.records if "could not delete" in r.getMessage()
                    or "truncated" in r.getMessage()]
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        conn.close()


def test_a_client_mode_destination_lists_its_own_capture_trigger_left_installed(make_database, broker,
                                                                               monkeypatch):
    """A destination switched from trigger to client mode without ``golconde trigger remove``:
    golconded's own writes were captured into golconde.queue for no one, and back in trigger
    mode sent to the targets again (review RR). It is a standing problem (health fails), the
    flow going on, until the trigger is removed. Another destination's capture trigger on the
    same table (a chain) is no problem of this one."""
    from golconde.client import Client
    from golconde.metrics import health

    monkeypatch.setattr(destination_module, "MAPPING_CHECK_INTERVAL", 0.5)
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, ACCOUNTS)
    config = parse_config(make_config(canonical, {"t1": t1}, "public.accounts", broker=broker))
    destination = config.destinations[0]
    conn = psycopg2.connect(canonical)
    trigger.install(conn, "public.accounts", "SomeoneElse")
    conn.commit()
    daemon = Daemon(config)
    daemon.start()
    try:
        stats = daemon.registry.get(destination.name)
        wait_for(lambda: stats.snapshot()["database"] == "connected", message="destination connected")
        time.sleep(1.0)
        assert stats.snapshot()["problems"] == []
        trigger.install(conn, "public.accounts", destination.name)
        conn.commit()
        wait_for(lambda: any("has the capture trigger of this destination, which is in client mode"
                             in problem for problem in stats.snapshot()["problems"]),
                 timeout=20, message="the problem listed")
        assert not health(daemon.registry.snapshot(), max_backlog=10000, max_lag=300.0)[0]
        with Client.for_destination(config, destination.name) as client:
            client.add({"aid": 1, "owner": "applied all the same"})
        wait_for(lambda: query(t1, "SELECT owner FROM accounts") == [("applied all the same",)],
                 message="the flow goes on")
        # a drain of that name connected there: a trigger-mode destination of the same name in
        # another configuration (a second tier), which captures these writes on purpose
        drain = psycopg2.connect(canonical)
        try:
            assert trigger.acquire_drain_lock(drain, destination.name)
            wait_for(lambda: stats.snapshot()["problems"] == [], timeout=20,
                     message="no problem while a drain of the name is connected")
        finally:
            drain.close()
        wait_for(lambda: stats.snapshot()["problems"] != [], timeout=20, message="listed again")
        trigger.remove(conn, "public.accounts", destination.name)
        conn.commit()
        wait_for(lambda: stats.snapshot()["problems"] == [], timeout=20, message="the problem cleared")
    finally:
        conn.close()
        assert daemon.stop()
