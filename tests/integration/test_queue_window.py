"""The drain's windows over golconde.queue (golconde.trigger.fetch_window, DrainPosition) and the
rotation of its partitions (rotate_queue, delete_sent), against a real PostgreSQL: every
committed row sent exactly once, each key's changes in order, rolled-back rows never, whatever
the commit order; a partition truncated only once every destination has sent it."""
from __future__ import annotations

import random
import threading
import time
import uuid

import psycopg2
import pytest

from golconde import trigger
from golconde.trigger import DrainPosition, Snapshot

from .test_trigger import execute, query_one

DEST = "Win"
#: the partition ids go to once they crossed from partition 0
Q1 = "golconde.queue_1"


@pytest.fixture
def items(db):
    execute(db, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    trigger.install(db, "items", DEST)
    return db


def drain(conn, position, destination=DEST, limit=1000, max_bytes=None):
    """Fetch windows until one comes back empty: ``(queue ids in the order sent, position)``."""
    ids = []
    with conn.cursor() as cur:
        while True:
            batch, position = trigger.fetch_window(cur, destination, position, limit, max_bytes)
            ids.extend(queued.id for queued in batch)
            if not batch and position.window is None:
                return ids, position


def test_snapshot_text_and_visibility():
    snap = Snapshot.parse("100:110:103,107")
    assert (snap.xmin, snap.xmax, snap.xip) == (100, 110, (103, 107))
    assert str(snap) == "100:110:103,107" and str(Snapshot.parse("5:5:")) == "5:5:"
    assert [x for x in range(98, 112) if snap.visible(x)] == [98, 99, 100, 101, 102, 104, 105, 106,
                                                              108, 109]
    for bad in ("", "1:2", "a:b:", "1:2:3;4"):
        with pytest.raises(trigger.TriggerError, match="not a pg_snapshot"):
            Snapshot.parse(bad)


def test_a_transaction_that_commits_late_is_sent_in_a_later_window_in_key_order(items, database):
    """A transaction took a small id and stays open over several windows; the rows committed
    meanwhile are sent, then its row when it commits, then the later change of the same key
    that waited for it; nothing is sent twice, a rolled-back row never."""
    execute(items, "INSERT INTO items VALUES (1, 0)")                      # queue id 1
    assert drain(items, DrainPosition())[0] == [1]
    slow, later, gone = (psycopg2.connect(database) for _ in range(3))
    try:
        execute(slow, "UPDATE items SET v = 1 WHERE id = 1")               # id 2, open
        for n in range(2, 6):
            execute(items, "INSERT INTO items VALUES (%s, 0)", (n,))       # ids 3-6
        execute(gone, "INSERT INTO items VALUES (99, 0)")                  # id 7, rolled back
        sent, position = drain(items, DrainPosition(), limit=2)
        assert sent == [1, 3, 4, 5, 6]
        gone.rollback()
        done = threading.Event()

        def update_after_slow():
            execute(later, "UPDATE items SET v = 2 WHERE id = 1")         # waits for slow's lock
            later.commit()
            done.set()

        thread = threading.Thread(target=update_after_slow)
        thread.start()
        assert not done.wait(0.3)
        execute(items, "INSERT INTO items VALUES (7, 0)")                  # id 8
        more, position = drain(items, position, limit=2)
        assert more == [8]
        slow.commit()
        thread.join(10)
        assert done.is_set()
        last, position = drain(items, position, limit=1)
        assert last == [2, 9]                          # slow's UPDATE, then the one that waited
        with items.cursor() as cur:
            cur.execute("SELECT packet->'data'->>'v' FROM golconde.queue WHERE id = ANY(%s)"
                        " ORDER BY id", (last,))
            assert [row[0] for row in cur.fetchall()] == ["1", "2"]
        ids = query_one(items, "SELECT array_agg(id ORDER BY id) FROM golconde.queue")
        assert sorted(sent + more + last) == ids == [1, 2, 3, 4, 5, 6, 8, 9]
        assert drain(items, position)[0] == []
        with items.cursor() as cur:
            assert trigger.backlog(cur, DEST, position) == (0, None)
    finally:
        for conn in (slow, later, gone):
            conn.close()


def test_concurrent_writers_every_committed_row_once_and_keys_in_order(items, database):
    """Writers update random keys in transactions of random size that commit or roll back while
    the drain reads small windows (and a byte bound); afterwards every committed queue row was
    sent exactly once, and each key's rows were sent in id order (the order of its changes)."""
    execute(items, "INSERT INTO items SELECT g, 0 FROM generate_series(1, 30) g")
    start = query_one(items, "SELECT max(id) FROM golconde.queue")
    _, position = drain(items, DrainPosition())
    stop = threading.Event()
    errors = []

    def writer(seed):
        rnd = random.Random(seed)
        conn = psycopg2.connect(database)
        try:
            while not stop.is_set():
                with conn.cursor() as cur:
                    for _ in range(rnd.randint(1, 4)):
                        cur.execute("UPDATE items SET v = v + 1 WHERE id = %s", (rnd.randint(1, 30),))
                if rnd.random() < 0.2:
                    conn.rollback()
                else:
                    conn.commit()
        except psycopg2.errors.DeadlockDetected:
            conn.rollback()
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    sent = []
    reader = psycopg2.connect(database)
    reader.autocommit = True
    try:
        with reader.cursor() as cur:
            deadline, round_number = time.monotonic() + 3.0, 0
            while time.monotonic() < deadline or round_number < 300:
                round_number += 1
                batch, position = trigger.fetch_window(cur, DEST, position, random.randint(1, 9),
                                                       max_bytes=random.choice([None, 200]))
                sent.extend(queued.id for queued in batch)
                if round_number % 50 == 0:               # as after a restart
                    trigger.save_position(cur, DEST, position)
                    position = trigger.load_position(cur, DEST)
        stop.set()
        for thread in threads:
            thread.join(30)
        more, position = drain(reader, position, limit=7)
        sent.extend(more)
    finally:
        reader.close()
    assert not errors
    committed = query_one(items, "SELECT array_agg(id ORDER BY id) FROM golconde.queue WHERE id > %s"
                          % start)
    assert len(committed) > 100
    assert len(sent) == len(set(sent)) and sorted(sent) == committed
    with items.cursor() as cur:
        cur.execute("SELECT id, (packet->'restriction'->>'id')::int FROM golconde.queue WHERE id > %s",
                    (start,))
        key_of = dict(cur.fetchall())
    by_key = {}
    for queue_id in sent:
        by_key.setdefault(key_of[queue_id], []).append(queue_id)
    assert all(ids == sorted(ids) for ids in by_key.values())
    # the rows sent are the table's changes: replaying them gives the table
    assert query_one(items, "SELECT sum(v) FROM items") == len(sent)


def test_saved_position_resumes_in_the_middle_of_a_window(items):
    execute(items, "INSERT INTO items SELECT g FROM generate_series(1, 10) g")
    with items.cursor() as cur:
        assert trigger.load_position(cur, DEST) == DrainPosition()
        assert trigger.backlog(cur, DEST)[0] == 10
        batch, position = trigger.fetch_window(cur, DEST, DrainPosition(), 4)
        assert position.window is not None and position.last_id == batch[-1].id
        assert position.window_hi == 10 and position.sent is None
        trigger.save_position(cur, DEST, position)
        assert trigger.load_position(cur, DEST) == position
        assert trigger.backlog(cur, DEST)[0] == 6
        loaded = trigger.load_position(cur, DEST)
    rest, end = drain(items, loaded)
    assert [queued.id for queued in batch] + rest == list(range(1, 11))
    with items.cursor() as cur:
        trigger.save_position(cur, DEST, end)
        assert trigger.load_position(cur, DEST) == end and end.window is None
        assert trigger.backlog(cur, DEST) == (0, None)


def test_a_window_ended_by_a_full_batch_reads_the_next_window_in_the_same_call(items):
    """A batch full by count leaves its window open; when nothing of it is left, the next call
    reads a new window at once: no rows back means nothing committed is waiting (the drain
    reported a backlog of 0 and slept while rows committed after the window waited)."""
    execute(items, "INSERT INTO items SELECT g FROM generate_series(1, 4) g")
    with items.cursor() as cur:
        first, position = trigger.fetch_window(cur, DEST, DrainPosition(), 4)
        assert [queued.id for queued in first] == [1, 2, 3, 4] and position.window is not None
        execute(items, "INSERT INTO items SELECT g FROM generate_series(5, 6) g")
        second, position = trigger.fetch_window(cur, DEST, position, 4)
        assert [queued.id for queued in second] == [5, 6] and position.window is None
        assert trigger.fetch_window(cur, DEST, position, 4)[0] == []
        assert trigger.backlog(cur, DEST, position) == (0, None)


def test_rotation_truncates_a_partition_once_every_destination_sent_it(db, database):
    """Ids cross from partition 0 into 1: partition 0 is truncated only once no destination has a
    row there it did not send (one without a saved position blocks it) and no writer that took
    one of its ids is still running; the partition new ids go to is never truncated."""
    execute(db, "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    trigger.install(db, "items", DEST)
    execute(db, "CREATE TABLE other (id int PRIMARY KEY)")
    trigger.install(db, "other", "Other")
    execute(db, "SELECT setval('golconde.queue_id_seq', %s)", (trigger.QUEUE_PARTITION_IDS - 5,))
    execute(db, "INSERT INTO other VALUES (1)")                          # id 499996, partition 0
    open_writer = psycopg2.connect(database)
    try:
        execute(open_writer, "INSERT INTO items VALUES (1)")            # id 499997, still running
        execute(db, "INSERT INTO items SELECT g FROM generate_series(2, 10) g")   # up to 500006
        assert query_one(db, "SELECT count(*) FROM golconde.queue_1") == 7
        assert trigger.rotate_queue(db) == trigger.Rotation((), (("golconde.queue_0", "Other"),), current=Q1)
        # the same check, for the rows below an id only (those of a round before)
        assert trigger.unsent_below(db, "golconde.queue_0", trigger.QUEUE_PARTITION_IDS) == "Other"
        assert trigger.unsent_below(db, "golconde.queue_0", trigger.QUEUE_PARTITION_IDS - 4) is None
        assert trigger.rotate_queue(db).current_start == trigger.QUEUE_PARTITION_IDS
        _, other = drain(db, DrainPosition(), "Other")
        with db.cursor() as cur:
            trigger.save_position(cur, "Other", other)
        # Win has no saved position yet
        assert trigger.rotate_queue(db).blocked == (("golconde.queue_0", DEST),)
        sent, mine = drain(db, DrainPosition())
        with db.cursor() as cur:
            trigger.save_position(cur, DEST, mine)
        # the running writer's row is not visible yet: the check passes, its lock does not
        assert trigger.rotate_queue(db, lock_timeout_ms=50) == trigger.Rotation(busy=("golconde.queue_0",), current=Q1)
        open_writer.commit()
        assert trigger.rotate_queue(db).blocked == (("golconde.queue_0", DEST),)   # not sent yet
        late, mine = drain(db, mine)
        assert late == [trigger.QUEUE_PARTITION_IDS - 3]
        with db.cursor() as cur:
            trigger.save_position(cur, DEST, mine)
        assert trigger.rotate_queue(db) == trigger.Rotation(("golconde.queue_0",), current=Q1)
    finally:
        open_writer.close()
    assert query_one(db, "SELECT count(*) FROM golconde.queue_0") == 0
    assert query_one(db, "SELECT count(*) FROM golconde.queue_1") == 7   # where ids go now
    assert trigger.rotate_queue(db) == trigger.Rotation(current=Q1)
    assert drain(db, mine)[0] == []
    execute(db, "INSERT INTO items VALUES (11)")
    assert drain(db, mine)[0] == [trigger.QUEUE_PARTITION_IDS + 7]


def test_delete_sent_deletes_only_what_was_sent(items, database):
    """Batch by batch within its budget; every row the sent snapshot sees, also while a
    transaction older than those rows still runs (it held every delete back: xmin), and not the
    rows of that transaction once it commits, nor those after the snapshot."""
    execute(items, "INSERT INTO items SELECT g FROM generate_series(1, 3) g")
    older = psycopg2.connect(database)        # running before rows 4 and 5 are written
    try:
        with older.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (100)")
        execute(items, "INSERT INTO items SELECT g FROM generate_series(4, 5) g")
        sent, position = drain(items, DrainPosition())
        assert sorted(sent) == [1, 2, 3, 5, 6]
        execute(items, "INSERT INTO items VALUES (6)")
        assert trigger.delete_sent(items, DEST, position, limit=2) == 2       # one batch
        assert trigger.delete_sent(items, DEST, position, limit=1, budget=10.0) == 3
        older.commit()
    finally:
        older.close()
    assert query_one(items, "SELECT array_agg(id ORDER BY id) FROM golconde.queue") == [4, 7]
    assert drain(items, position)[0] == [4, 7]


def test_a_row_that_is_not_utf8_fails_alone_in_a_sql_ascii_database():
    """A database in SQL_ASCII takes any byte: a captured value that is not UTF-8 makes its row's
    error (the drain dead-letters it), and the rows around it are read as usual."""
    from psycopg2 import sql as pgsql

    from ..conftest import PG_DSN, dsn_for, drop_database
    name = "golconde_test_ascii_%s" % uuid.uuid4().hex[:10]
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(pgsql.SQL("CREATE DATABASE {} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"
                              " TEMPLATE template0").format(pgsql.Identifier(name)))
    admin.close()
    dsn = dsn_for(name)
    try:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        try:
            execute(conn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
            trigger.install(conn, "t", DEST)
            execute(conn, "INSERT INTO t VALUES (1, 'plain'), (2, E'caf\\xe9'), (3, 'after')")
            batch, _ = trigger.fetch_window(conn.cursor(), DEST, DrainPosition(), 10)
            assert [queued.id for queued in batch] == [1, 2, 3]
            assert [queued.error is None for queued in batch] == [True, False, True]
            assert "not valid UTF-8" in batch[1].error
            assert batch[2].packet["data"] == {"id": 3, "v": "after"}
            assert isinstance(batch[0].relation, str) and isinstance(batch[0].packet_id, str)
        finally:
            conn.close()
    finally:
        drop_database(dsn)
