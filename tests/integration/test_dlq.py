"""``golconde dlq list|replay|purge`` against a real daemon, PostgreSQL and RabbitMQ.

The scenario of the README: a packet is dead-lettered for a column the canonical relation lacks;
the operator adds the column and replays the dead-letter queue; the packet is applied once at the
destination and at every target; replaying again, or the same packet sent again (as after a crash
between the replay's send and its ack), doubles nothing. The tables are keyless, so that a second
apply would show as a second row rather than as a key violation.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Tuple

import pytest

from golconde import dlq as dlq_module
from golconde.cli import admin_main
from golconde.daemon import Daemon

from .flow_support import (execute, make_config, parse_config, query, send_raw, wait_for,
                           write_config)

ITEMS = "CREATE TABLE public.items (n integer NOT NULL, name text)"


def stats_of(daemon: Daemon, name: str) -> Dict[str, Any]:
    for entry in daemon.registry.snapshot()["threads"]:
        if name in entry:
            return entry[name]
    raise AssertionError("no thread %s" % name)


@pytest.fixture
def flow(make_database, tmp_path):
    """Canonical + two targets (keyless ``items``), a running daemon and its configuration file."""
    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, ITEMS)
    mapping = make_config(canonical, {"t1": t1, "t2": t2}, "public.items")
    path = write_config(str(tmp_path / "golconde.yaml"), mapping)
    config = parse_config(mapping)
    daemon = Daemon(config)
    daemon.start()
    destination = config.destinations[0]
    state = {"canonical": canonical, "targets": [t1, t2], "daemon": daemon, "path": path,
             "destination": destination, "config": config, "dbs": [canonical, t1, t2]}
    yield state
    assert daemon.stop(), "daemon did not stop in time"
    for queue in [destination.queue, destination.dead_letter_queue] + [
            q for t in destination.targets for q in (t.queue, t.dead_letter_queue)]:
        purge_queue(config, queue)


def purge_queue(config: Any, queue: str) -> None:
    broker = config.destinations[0].stomp
    dlq_module.DeadLetterQueue(broker, queue).purge()


def cli(capsys, *argv: str):
    """Run ``golconde`` in-process: (exit status, stdout)."""
    status = admin_main(list(argv))
    return status, capsys.readouterr().out


def dlq_list(capsys, state, *extra: str) -> List[Dict[str, Any]]:
    status, out = cli(capsys, "dlq", "list", "-c", state["path"], "--destination",
                      state["destination"].name, "--json", *extra)
    assert status == 0, out
    return json.loads(out)["packets"]


def send(state, body: str, pid: str = "") -> str:
    pid = pid or str(uuid.uuid4())
    send_raw(state["destination"].queue, [body], [{"golconde-id": pid}])
    return pid


def add_column(state, ddl: str) -> None:
    """Run ``ddl`` in every database, then let the destination's cached schema (read when the
    packet was dead-lettered) age past ``SchemaCache.refresh_if_stale``'s 1 s: a packet naming an
    unknown column re-reads the catalog at most once a second."""
    for dsn in state["dbs"]:
        execute(dsn, ddl)
    time.sleep(1.2)


def rows(dsn: str) -> List[tuple]:
    return query(dsn, "SELECT * FROM items ORDER BY n, name")


def test_missing_column_replayed_once_after_the_operator_adds_it(flow, capsys):
    name = flow["destination"].name
    body = '{"action": "add", "data": {"n": 1, "name": "first", "color": "red"}}'
    pid = send(flow, body)
    wait_for(lambda: stats_of(flow["daemon"], name)["dead_lettered"] == 1, timeout=30,
             message="the packet dead-lettered")

    # list shows it, twice in a row (listing leaves it in the queue), via the management API ...
    for _ in range(2):
        listed = dlq_list(capsys, flow)
        assert len(listed) == 1
        entry = listed[0]
        assert entry["golconde_id"] == pid and entry["body"] == body
        assert entry["original_queue"] == flow["destination"].queue and entry["consumer"] == name
        assert "color" in entry["reason"] and entry["dead_lettered_at"].endswith("+00:00")
    # ... and over STOMP
    status, out = cli(capsys, "dlq", "list", "-c", flow["path"], "--destination", name,
                      "--management-url", "")
    assert status == 0 and "golconde-id: %s" % pid in out and "read via STOMP" in out
    assert "color" in out
    assert len(dlq_list(capsys, flow)) == 1
    # the text form shows a truncated body with its full size
    status, out = cli(capsys, "dlq", "list", "-c", flow["path"], "--destination", name,
                      "--body-limit", "10")
    assert status == 0 and "body: %s ... (%d bytes in all)" % (body[:10], len(body)) in out

    # the operator adds the column everywhere, then replays
    add_column(flow, "ALTER TABLE items ADD COLUMN color text")
    status, out = cli(capsys, "dlq", "replay", "-c", flow["path"], "--destination", name)
    assert status == 0 and "replayed 1 packet(s)" in out, out
    for dsn in flow["dbs"]:
        wait_for(lambda dsn=dsn: rows(dsn) == [(1, "first", "red")], timeout=30,
                 message="the replayed packet applied")
    assert dlq_list(capsys, flow) == []

    # replay again: nothing to replay
    status, out = cli(capsys, "dlq", "replay", "-c", flow["path"], "--destination", name)
    assert status == 0 and "replayed 0 packet(s)" in out
    # the same packet replayed again (a crash between the replay's send and its ack): de-duplicated
    send(flow, body, pid)
    send(flow, '{"action": "add", "data": {"n": 2, "name": "sentinel"}}')
    for dsn in flow["dbs"]:
        wait_for(lambda dsn=dsn: len(rows(dsn)) >= 2, timeout=30, message="the sentinel")
        assert rows(dsn) == [(1, "first", "red"), (2, "sentinel", None)]
    wait_for(lambda: all(stats_of(flow["daemon"], t)["duplicates"] == 1
                         for t in (name, name + "_t1", name + "_t2")), timeout=30,
             message="duplicates counted at the destination and both targets")
    assert stats_of(flow["daemon"], name)["dead_lettered"] == 1
    assert dlq_list(capsys, flow) == []


def test_target_dead_letter_replayed_to_that_target_only(flow, capsys):
    name = flow["destination"].name
    t1 = flow["targets"][0]
    execute(t1, "ALTER TABLE items ADD CONSTRAINT small CHECK (n < 100)")
    pid = send(flow, '{"action": "add", "data": {"n": 500, "name": "big"}}')
    wait_for(lambda: stats_of(flow["daemon"], name + "_t1")["dead_lettered"] == 1, timeout=30,
             message="dead-lettered at t1")
    wait_for(lambda: rows(flow["targets"][1]) == [(500, "big")], timeout=30, message="t2 applied")
    status, out = cli(capsys, "dlq", "list", "-c", flow["path"], "--destination", name,
                      "--target", "t1", "--json")
    listed = json.loads(out)["packets"]
    assert status == 0 and [p["golconde_id"] for p in listed] == [pid]
    assert listed[0]["original_queue"] == flow["destination"].targets[0].queue
    assert "23514" in listed[0]["reason"] and listed[0]["consumer"] == name + "_t1"
    assert dlq_list(capsys, flow) == []          # the destination's own queue is empty

    execute(t1, "ALTER TABLE items DROP CONSTRAINT small")
    status, out = cli(capsys, "dlq", "replay", "-c", flow["path"], "--destination", name,
                      "--target", "t1")
    assert status == 0 and "replayed 1 packet(s)" in out
    assert "check the targets with 'golconde compare'" in out    # applied late: later packets
    wait_for(lambda: rows(t1) == [(500, "big")], timeout=30, message="t1 applied")
    send(flow, '{"action": "add", "data": {"n": 7, "name": "sentinel"}}')
    for dsn in flow["dbs"]:
        wait_for(lambda dsn=dsn: rows(dsn) == [(7, "sentinel"), (500, "big")], timeout=30,
                 message="sentinel everywhere, nothing doubled")


@pytest.mark.parametrize("management", [True, False], ids=["management-api", "stomp-only"])
def test_replay_of_a_still_bad_packet_does_not_loop(flow, capsys, management):
    name = flow["destination"].name
    body = '{"action": "add", "data": {"n": 1, "nope": 2}}'
    pid = send(flow, body)
    wait_for(lambda: stats_of(flow["daemon"], name)["dead_lettered"] == 1, timeout=30,
             message="dead-lettered")
    extra = () if management else ("--management-url", "")
    status, out = cli(capsys, "dlq", "replay", "-c", flow["path"], "--destination", name, *extra)
    assert status in (0, 1), out
    assert "replayed 1 packet(s)" in out
    wait_for(lambda: stats_of(flow["daemon"], name)["dead_lettered"] == 2, timeout=30,
             message="dead-lettered again")
    listed = dlq_list(capsys, flow)
    assert [(p["golconde_id"], p["body"]) for p in listed] == [(pid, body)]
    assert all(rows(dsn) == [] for dsn in flow["dbs"])


def test_purge_needs_yes_and_empties_the_queue(flow, capsys):
    name = flow["destination"].name
    for n in range(3):
        send(flow, '{"action": "add", "data": {"n": %d, "missing": true}}' % n)
    wait_for(lambda: stats_of(flow["daemon"], name)["dead_lettered"] == 3, timeout=30,
             message="three dead letters")
    status, out = cli(capsys, "dlq", "purge", "-c", flow["path"], "--destination", name)
    assert status == 2 and "--yes" in out
    assert len(dlq_list(capsys, flow)) == 3
    status, out = cli(capsys, "dlq", "purge", "-c", flow["path"], "--destination", name,
                      "--limit", "1", "--yes")
    assert status == 0 and "purged 1 packet(s)" in out
    assert len(dlq_list(capsys, flow)) == 2
    status, out = cli(capsys, "dlq", "purge", "-c", flow["path"], "--queue",
                      flow["destination"].dead_letter_queue, "--yes", "--json")
    assert status == 0 and json.loads(out)["purged"] == 2
    assert dlq_list(capsys, flow) == []
    assert all(rows(dsn) == [] for dsn in flow["dbs"])


def two_dead_letters(state) -> Tuple[str, str]:
    """Two packets naming a column the table lacks, dead-lettered: their ids."""
    first = send(state, '{"action": "add", "data": {"n": 1, "later": "x"}}')
    second = send(state, '{"action": "add", "data": {"n": 2, "later": "y"}}')
    wait_for(lambda: stats_of(state["daemon"], state["destination"].name)["dead_lettered"] == 2,
             timeout=30, message="two dead letters")
    return first, second


def test_replay_selected_ids_and_leaves_what_it_cannot_replay(flow, capsys):
    """--id picks packets; a trigger-mode dead letter (original queue golconde.queue) and a packet
    without golconde-id are left in the queue and reported (exit status 1)."""
    destination = flow["destination"]
    name = destination.name
    first, second = two_dead_letters(flow)
    send_raw(destination.dead_letter_queue,
             ['{"action": "add", "data": {"n": 3}}', '{"action": "add", "data": {"n": 4}}'],
             [{"golconde-id": "from-trigger", "golconde-original-queue": "golconde.queue",
               "golconde-reason": "test"},
              {"golconde-original-queue": destination.queue, "golconde-reason": "test"}])
    add_column(flow, "ALTER TABLE items ADD COLUMN later text")
    status, out = cli(capsys, "dlq", "replay", "-c", flow["path"], "--destination", name,
                      "--id", second, "--json")
    assert status == 0 and json.loads(out) == {"queue": destination.dead_letter_queue,
                                               "replayed": 1, "skipped": []}
    for dsn in flow["dbs"]:
        wait_for(lambda dsn=dsn: rows(dsn) == [(2, None, "y")], timeout=30, message="second applied")
    assert [p["golconde_id"] for p in dlq_list(capsys, flow)] == [first, "from-trigger", None]
    # list --id lists those packets only, and says which it did not find (exit status 1)
    assert [p["golconde_id"] for p in dlq_list(capsys, flow, "--id", "from-trigger")] == ["from-trigger"]
    status, out = cli(capsys, "dlq", "list", "-c", flow["path"], "--destination", name, "--json",
                      "--id", first, "--id", "nonexistent")
    assert status == 1 and [p["golconde_id"] for p in json.loads(out)["packets"]] == [first]

    status, out = cli(capsys, "dlq", "replay", "-c", flow["path"], "--destination", name)
    assert status == 1
    assert "replayed 1 packet(s)" in out
    assert "left from-trigger" in out and "not a STOMP queue" in out
    assert "left a packet without golconde-id" in out
    for dsn in flow["dbs"]:
        wait_for(lambda dsn=dsn: rows(dsn) == [(1, None, "x"), (2, None, "y")], timeout=30,
                 message="first applied")
    assert [p["golconde_id"] for p in dlq_list(capsys, flow)] == ["from-trigger", None]


def test_usage_errors(flow, capsys):
    path, name = flow["path"], flow["destination"].name
    status = admin_main(["dlq", "list", "-c", path])
    assert status == 2 and "give --destination NAME" in capsys.readouterr().err
    status = admin_main(["dlq", "list", "-c", path, "--destination", "Nope"])
    assert status == 2 and "Destinations.Nope: no such destination" in capsys.readouterr().err
    status = admin_main(["dlq", "list", "-c", path, "--destination", name, "--target", "zz"])
    assert status == 2 and "Targets.zz: no such target" in capsys.readouterr().err
    status = admin_main(["dlq", "list", "-c", path, "--destination", name, "--queue", "/queue/x"])
    assert status == 2 and "is not the dead-letter queue of" in capsys.readouterr().err
    # a queue a listener consumes is no dead-letter queue: a purge there would drop live packets
    for queue in (flow["destination"].queue, flow["destination"].targets[0].queue,
                  "/amq/queue/" + flow["destination"].queue[len("/queue/"):]):
        status = admin_main(["dlq", "purge", "-c", path, "--queue", queue, "--yes"])
        assert status == 2 and "consumes, not a dead-letter queue" in capsys.readouterr().err


def test_ids_not_found_or_past_the_limit_are_reported(flow, capsys):
    """--id naming nothing in the queue, or a packet --limit did not reach (the limit counts the
    packets selected, not those read), exits 1 and says which."""
    destination = flow["destination"]
    name = destination.name
    first, second = two_dead_letters(flow)
    status, out = cli(capsys, "dlq", "purge", "-c", flow["path"], "--destination", name,
                      "--id", "no-such-id", "--yes")
    assert status == 1 and "left no-such-id" in out and "not found among the 2 packet(s) read" in out
    assert "purged 0 packet(s)" in out
    # the second packet with --limit 1: selected, though the first is read before it
    status, out = cli(capsys, "dlq", "purge", "-c", flow["path"], "--destination", name,
                      "--id", second, "--limit", "1", "--yes")
    assert status == 0 and "purged 1 packet(s)" in out
    status, out = cli(capsys, "dlq", "purge", "-c", flow["path"], "--destination", name,
                      "--id", first, "--id", "other", "--limit", "1", "--yes", "--json")
    assert status == 1 and json.loads(out) == {
        "queue": destination.dead_letter_queue, "purged": 1,
        "skipped": [{"golconde_id": "other", "why": "not reached: --limit 1 was reached first"}]}
    assert dlq_list(capsys, flow) == []



def test_the_default_management_url_is_used_only_for_its_own_broker(make_database, broker):
    """With both brokers on one host (as the set-up installs them), RabbitMQ's management API
    answers for any queue name, "none here", also for an ActiveMQ queue: the default URL is used
    only when that RabbitMQ's STOMP port is the broker's, so an ActiveMQ dead-letter queue is
    read over STOMP and counted by nobody, not listed or counted as empty."""
    from golconde.status import Management

    canonical = make_database()
    config = parse_config(make_config(canonical, {"t1": make_database()}, "public.items", broker=broker))
    stomp, queue = config.destinations[0].stomp, config.destinations[0].dead_letter_queue
    body = '{"action": "add", "data": {"n": 1}}'
    send_raw(queue, [body], [{"golconde-id": "dl-1", "golconde-reason": "for the test"}], broker=broker)
    dlq = dlq_module.DeadLetterQueue(stomp, queue)
    try:
        listed = dlq.list()
        assert [(d.packet_id, d.body.decode("utf-8")) for d in listed] == [("dl-1", body)]
        depth, why = Management().depth(stomp, queue)
        if broker.name == "rabbitmq":
            assert dlq.read_via == "management API" and dlq.depth() == 1
            # its statistics are refreshed every few seconds: a new queue may have none yet
            assert (depth, why) == (1, None) or "no statistics yet" in why, (depth, why)
        else:
            assert dlq.read_via == "STOMP" and dlq.depth() is None
            assert depth is None and "not RabbitMQ" in why and "ActiveMQ" in why, why
            # the verdict is the ActiveMQ's alone: the RabbitMQ beside it is still read through
            # the same Management (its host's API)
            status = Management()
            rabbit = parse_config(make_config(canonical, {"t1": make_database()}, "public.items"))
            assert status.depth(stomp, queue)[0] is None
            why = status.depth(rabbit.destinations[0].stomp, rabbit.destinations[0].dead_letter_queue)[1]
            assert why is None or "no statistics yet" in why, why
    finally:
        dlq.purge()


def test_a_broker_that_cannot_be_reached_is_not_read_through_a_management_api_beside_it(
        make_database, tmp_path, capsys):
    """The default management URL is the broker host's port 15672: with the configured broker
    down (an ActiveMQ stopped beside a running RabbitMQ, say), that API is not the broker's own.
    dlq list listed the RabbitMQ queue of that name; it now fails, naming the broker."""
    import socket

    from golconde.status import Management

    with socket.socket() as probe:          # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mapping = make_config(make_database(), {"t1": make_database()}, "public.items")
    up = parse_config(mapping)
    queue = up.destinations[0].dead_letter_queue
    send_raw(queue, ['{"action": "add", "data": {"n": 1}}'],
             [{"golconde-id": "dl-1", "golconde-reason": "for the test"}])
    try:
        for destination in mapping["Destinations"].values():
            for entry in [destination] + list(destination["Targets"].values()):
                entry["stomp"] = "127.0.0.1:%d" % port
        down = parse_config(mapping)
        path = write_config(str(tmp_path / "down.yaml"), mapping)
        status = admin_main(["dlq", "list", "-c", path, "--destination", down.destinations[0].name])
        out, err = capsys.readouterr()
        assert status != 0 and "dl-1" not in out, out
        assert "cannot connect to STOMP broker 127.0.0.1:%d" % port in err, err
        depth, why = Management().depth(down.destinations[0].stomp, queue)
        assert depth is None and "127.0.0.1:%d" % port in why and "cannot be told" in why, why
    finally:
        purge_queue(up, queue)
