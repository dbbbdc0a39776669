"""End to end, client-based flow: a real daemon, real PostgreSQL databases, and each real STOMP
broker of the ``broker`` fixture (RabbitMQ, ActiveMQ)."""
from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest

from golconde.apply import DEAD_BEFORE
from golconde.client import Client
from golconde.compare import compare
from golconde.daemon import Daemon

from .flow_support import (drain_queue, execute, make_config, parse_config, query, send_raw,
                           wait_for, wait_for_value)

FRIENDSHIPS = """
CREATE TABLE public.friendships (
    id          serial PRIMARY KEY,
    friend_id   integer NOT NULL,
    user_id     integer NOT NULL,
    status_id   integer,
    "timestamp" timestamptz,
    note        text,
    amount      numeric(40, 20),
    tags        text[],
    scores      integer[],
    doc         jsonb,
    raw         json,
    blob        bytea,
    UNIQUE (friend_id, user_id)
)
"""


@pytest.fixture
def flow(make_database, broker):
    """Canonical + two target databases with the same friendships table, and a running daemon."""
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, FRIENDSHIPS)
    mapping = make_config(canonical, {"target1": t1, "target2": t2}, "public.friendships",
                          broker=broker)
    config = parse_config(mapping)
    daemon = Daemon(config)
    daemon.start()
    destination = config.destinations[0]
    client = Client(destination.queue, broker.host, broker.port, broker.login, broker.passcode)
    state = {"canonical": canonical, "targets": [t1, t2], "daemon": daemon, "client": client,
             "destination": destination, "config": config, "broker": broker}
    yield state
    client.close()
    assert daemon.stop(), "daemon did not stop in time"


def targets_equal(state) -> bool:
    return all(compare(state["canonical"], "public.friendships", t, "public.friendships").equal
               for t in state["targets"])


def counted(state, thread, keys, expected) -> None:
    """Wait until the counters ``keys`` of ``thread`` are ``expected`` (dead letters are counted
    once the broker confirmed them: the test's reader of the dead-letter queue may see them
    first), then compare them, for the difference."""
    stats = state["daemon"].registry.get(thread)
    wait_for_value(lambda: tuple(stats.snapshot()[key] for key in keys), expected, timeout=10,
                   message="%s counted" % thread)


def test_slides_packets_all_four_actions(flow):
    client = flow["client"]
    # The 2009 slides' packets, upper-case keys and actions included.
    client.send('{"ACTION": "ADD", "DATA": {"FRIEND_ID": 47, "USER_ID": 16, "STATUS_ID": 1}}')
    client.send('{"ACTION": "ADD", "DATA": {"FRIEND_ID": 11, "USER_ID": 126, "STATUS_ID": 1}}')
    client.send('{"ACTION": "ADD", "DATA": {"FRIEND_ID": 5, "USER_ID": 41, "STATUS_ID": 1}}')
    client.send('{"ACTION": "DELETE", "RESTRICTION": {"FRIEND_ID": 11, "USER_ID": 126}}')
    client.send('{"ACTION": "SET", "DATA": {"FRIEND_ID": 112, "USER_ID": 111, '
                '"TIMESTAMP": "WED APR 1 13:56:54 2009", "STATUS_ID": 1}}')
    client.send('{"ACTION": "UPDATE", "RESTRICTION": {"FRIEND_ID": 5, "USER_ID": 41}, '
                '"DATA": {"TIMESTAMP": "WED APR 1 13:56:38 2009", "STATUS_ID": 3}}')
    client.set({"friend_id": 112, "user_id": 111, "status_id": 2})   # upsert on the unique key
    wait_for(lambda: len(query(flow["canonical"], "SELECT 1 FROM friendships")) == 3
             and targets_equal(flow), message="targets equal to canonical")
    rows = query(flow["canonical"], "SELECT friend_id, user_id, status_id FROM friendships ORDER BY friend_id")
    assert rows == [(5, 41, 3), (47, 16, 1), (112, 111, 2)]
    # serial keys generated at the canonical relation reach the targets unchanged
    ids = query(flow["canonical"], "SELECT id, friend_id FROM friendships ORDER BY id")
    for target in flow["targets"]:
        assert query(target, "SELECT id, friend_id FROM friendships ORDER BY id") == ids


def test_nulls_and_types_round_trip(flow):
    client = flow["client"]
    client.add({"friend_id": 1, "user_id": 1, "status_id": None, "note": None,
                "amount": Decimal("12345678901234567890.12345678901234567890"),
                "timestamp": "2026-11-21T05:35:03.123456+00:00",
                "tags": ["a", "it's", "$$;--", None], "scores": [1, 2, 3],
                "doc": {"k": [1, 2.5, None, "x"], "nested": {"q": "\"quoted\""}},
                "raw": ["raw", 1], "blob": "\\x00ff10"})
    client.add({"friend_id": 2, "user_id": 2, "tags": [], "doc": "just a string", "note": "x'); DROP TABLE friendships; --"})
    wait_for(lambda: targets_equal(flow) and len(query(flow["targets"][1], "SELECT 1 FROM friendships")) == 2,
             message="typed rows distributed")
    for dsn in [flow["canonical"]] + flow["targets"]:
        row = query(dsn, "SELECT status_id, note, amount, tags, scores, doc, raw::text, blob,"
                         " \"timestamp\" = '2026-11-21T05:35:03.123456+00:00' FROM friendships WHERE friend_id = 1")[0]
        assert row[0] is None and row[1] is None
        assert row[2] == Decimal("12345678901234567890.12345678901234567890")
        assert row[3] == ["a", "it's", "$$;--", None]
        assert row[4] == [1, 2, 3]
        assert row[5] == {"k": [1, 2.5, None, "x"], "nested": {"q": "\"quoted\""}}
        assert row[6].replace(" ", "") == '["raw",1]'
        assert bytes(row[7]) == b"\x00\xff\x10"
        assert row[8] is True
        row2 = query(dsn, "SELECT tags, doc, note FROM friendships WHERE friend_id = 2")[0]
        assert row2 == ([], "just a string", "x'); DROP TABLE friendships; --")


def test_bad_packets_dead_lettered_while_good_ones_flow(flow):
    destination = flow["destination"]
    good = ['{"action": "add", "data": {"friend_id": %d, "user_id": 1}}' % i for i in range(1, 6)]
    bad = [
        b'{"action": "add", "data": ',                                      # malformed JSON
        b'\xff\xfe{"action": "add"}',                                        # invalid UTF-8
        b'{"action": "explode", "data": {"friend_id": 1}}',                 # unknown action
        b'{"action": "add", "data": {"friend_id": 99, "user_id": 1, "nope": 1}}',  # unknown column
        b'{"action": "add", "data": {"friend_id": "abc", "user_id": 1}}',   # wrong type
        b'{"action": "add", "data": {"friend_id": 1, "user_id": 1}}',       # duplicate key (23505)
        b'{"action": "delete", "restriction": {}}',                         # empty restriction
        b'[1, 2, 3]',                                                        # not an object
    ]
    bodies = []
    for index in range(max(len(good), len(bad))):
        if index < len(good):
            bodies.append(good[index])
        if index < len(bad):
            bodies.append(bad[index])
    send_raw(destination.queue, bodies, [{"golconde-id": str(uuid.uuid4())} for _ in bodies],
             broker=flow["broker"])
    wait_for(lambda: len(query(flow["canonical"], "SELECT 1 FROM friendships")) == 5 and targets_equal(flow),
             message="good packets applied everywhere")
    dead = []
    wait_for(lambda: dead.extend(drain_queue(destination.dead_letter_queue, wait=0.5,
                                             broker=flow["broker"])) or len(dead) >= len(bad),
             timeout=30, message="dead letters")
    assert len(dead) == len(bad)
    assert sorted(d.body for d in dead) == sorted(bad)
    reasons = " | ".join(d.headers["golconde-reason"] for d in dead)
    for expected in ("not valid JSON", "not valid UTF-8", "unknown action", "nope", "23505",
                     "restriction", "must be a JSON object", "22P02"):
        assert expected in reasons, (expected, reasons)
    for d in dead:
        assert d.headers["golconde-original-queue"] == destination.queue
    # dead letters are counted once the broker confirmed them: a reader may see them first
    counted(flow, destination.name, ("dead_lettered", "applied"), (len(bad), 5))


def test_malformed_and_empty_batch_messages_at_a_target(flow):
    """At a target: a batch message whose body is not a batch, or holds more entries than its
    header says or than a batch message may, is dead-lettered whole, with what is wrong with it
    (not a packet error about the key 'batch'); an empty batch is acked; the listener goes on
    with the next message."""
    target = flow["destination"].targets[0]
    good = json.dumps({"batch": [{"id": str(uuid.uuid4()), "packet": {
        "action": "add", "data": {"friend_id": 7, "user_id": 7}}}]})
    bad = json.dumps({"batch": [{"id": "x1", "packet": {"action": "add", "data": {"friend_id": 8,
                                                                                 "user_id": 8}}},
                                {"packet": {"action": "add", "data": {"friend_id": 9, "user_id": 9}}}]})
    def entries(first, n):
        return [{"id": str(uuid.uuid4()), "packet": {"action": "add", "data": {
            "friend_id": first + k, "user_id": first + k}}} for k in range(n)]

    # more entries than its header says (a receiver bounds what it holds by the header), and
    # more than a batch message may hold: each dead-lettered whole, none of its packets applied
    understated = json.dumps({"batch": entries(100, 3)})
    oversized = json.dumps({"batch": entries(1000, 501)})
    send_raw(target.queue, [json.dumps({"batch": []}), bad, understated, oversized, good],
             [{"golconde-batch": "0"}, {"golconde-batch": "2"}, {"golconde-batch": "1"},
              {"golconde-batch": "501"}, {"golconde-batch": "1"}],
             broker=flow["broker"])
    wait_for(lambda: query(flow["targets"][0], "SELECT friend_id FROM friendships") == [(7,)],
             message="the good batch applied after the bad ones")
    dead = drain_queue(target.dead_letter_queue, wait=1.0, broker=flow["broker"])
    assert [d.body for d in dead] == [bad.encode(), understated.encode(), oversized.encode()]
    assert [d.headers["golconde-reason"] for d in dead] == [
        "malformed batch message: batch message entry 1 must be {id: string, packet: object}",
        "malformed batch message: batch message holds 3 entries, but its golconde-batch header"
        " says '1'",
        "malformed batch message: batch message holds 501 entries, more than 500"]
    # still a batch message, so that golconde dlq replay sends it back as one
    assert dead[0].headers["golconde-batch"] == "2"
    counted(flow, target.thread_name, ("dead_lettered", "applied"), (3, 1))


def test_odd_packet_ids_and_a_lone_surrogate_in_batch_messages(flow):
    """Batch entry ids a PostgreSQL text cannot hold (a NUL, a lone surrogate) or longer than 200
    characters are recorded by their SHA-256: their packets are applied once, even sent twice,
    and two long ids sharing their first 200 characters stay two packets (as do two such
    golconde-id headers). An entry with an empty id makes its message malformed, dead-lettered
    whole. A lone surrogate inside a batch entry's packet dead-letters that packet alone, its
    body written with \\u escapes. None of it stops the listeners."""
    destination = flow["destination"]

    def add(n, note=None):
        data = {"friend_id": n, "user_id": n}
        if note is not None:
            data["note"] = note
        return {"action": "add", "data": data}

    odd_ids = ["nul\x00id", "sur\ud800", "L" * 300 + "-one", "L" * 300 + "-two", "ok-" + str(uuid.uuid4())]
    batch = json.dumps({"batch": [{"id": pid, "packet": add(n + 1)} for n, pid in enumerate(odd_ids)]
                        + [{"id": "bad-" + str(uuid.uuid4()), "packet": add(9, "x\ud800y")}]})
    empty = json.dumps({"batch": [{"id": "", "packet": add(20)}]})
    long_headers = [{"golconde-id": "H" * 250 + "-1"}, {"golconde-id": "H" * 250 + "-2"}]
    send_raw(destination.queue, [batch, batch, empty], [{"golconde-batch": "6"}] * 2 + [{"golconde-batch": "1"}],
             broker=flow["broker"])
    send_raw(destination.queue, [json.dumps(add(7)), json.dumps(add(8))], long_headers,
             broker=flow["broker"])
    wait_for(lambda: query(flow["canonical"], "SELECT friend_id FROM friendships ORDER BY 1")
             == [(1,), (2,), (3,), (4,), (5,), (7,), (8,)] and targets_equal(flow),
             timeout=30, message="every packet with an odd id applied everywhere")
    dead = []
    wait_for(lambda: dead.extend(drain_queue(destination.dead_letter_queue, wait=0.5,
                                             broker=flow["broker"])) or len(dead) >= 3,
             timeout=30, message="dead letters")
    dead += drain_queue(destination.dead_letter_queue, wait=1.0, broker=flow["broker"])
    reasons = sorted(d.headers["golconde-reason"] for d in dead)
    # the surrogate's packet twice (sent twice: dead-lettered again, said so), the empty id's
    # message once
    assert len(dead) == 3, reasons
    first = [r for r in reasons if r.startswith("a string holds a lone UTF-16 surrogate")]
    assert len(first) == 1 and DEAD_BEFORE + first[0] in reasons, reasons
    assert any("empty id" in reason for reason in reasons), reasons
    for letter in dead:
        if "surrogate" in letter.headers["golconde-reason"]:
            assert json.loads(letter.body) == add(9, "x\ud800y")
    for target in destination.targets:
        assert drain_queue(target.dead_letter_queue, wait=0.5, broker=flow["broker"]) == []
    counted(flow, destination.name, ("applied", "duplicates", "dead_lettered"), (7, 5, 3))


def test_redelivered_packet_is_not_applied_twice(make_database, broker):
    """Same packet id delivered twice (as after a crash between commit and ack) -> applied once,
    on a keyless table where a second apply would show as a second row."""
    canonical, t1 = make_database(), make_database()
    for dsn in (canonical, t1):
        execute(dsn, "CREATE TABLE events (kind text, n integer)")
    config = parse_config(make_config(canonical, {"t1": t1}, "events", broker=broker))
    daemon = Daemon(config)
    daemon.start()
    try:
        queue = config.destinations[0].queue
        pid = str(uuid.uuid4())
        body = '{"action": "add", "data": {"kind": "once", "n": 1}}'
        send_raw(queue, [body, body, '{"action": "add", "data": {"kind": "after", "n": 2}}'],
                 [{"golconde-id": pid}, {"golconde-id": pid}, {"golconde-id": str(uuid.uuid4())}],
                 broker=broker)
        # a plain STOMP client without golconde-id: identified by its body's hash
        send_raw(queue, ['{"action": "add", "data": {"kind": "plain", "n": 3}}'] * 2, broker=broker)
        wait_for(lambda: len(query(t1, "SELECT 1 FROM events")) == 3, message="3 rows at target")
        # give a wrongly re-applied duplicate the chance to show up
        send_raw(queue, ['{"action": "add", "data": {"kind": "sentinel", "n": 4}}'], [{"golconde-id": str(uuid.uuid4())}],
                 broker=broker)
        wait_for(lambda: len(query(t1, "SELECT 1 FROM events")) == 4, message="sentinel")
        for dsn in (canonical, t1):
            assert sorted(query(dsn, "SELECT kind, n FROM events")) == [
                ("after", 2), ("once", 1), ("plain", 3), ("sentinel", 4)]
    finally:
        daemon.stop()
