"""One golconde.client.Client shared by threads, against each broker of GOLCONDE_TEST_BROKERS:
sends from several threads at once go out together in one confirmed write (group commit), every
packet once, each thread's in its order; Client.batch() is per thread; threads waiting for
outcomes while others send share one connection and one reply subscription."""
from __future__ import annotations

import json
import threading
import time
from typing import Dict, List

from golconde.client import Client, OutcomeTimeout

from ..conftest import unique_queue
from .flow_support import drain_queue, wait_for


def _run(threads: List[threading.Thread], timeout: float = 60) -> None:
    """Start ``threads`` (daemon threads: one stuck does not keep the test run alive), join them,
    and fail if one has not ended within ``timeout`` seconds."""
    for thread in threads:
        thread.daemon = True
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "threads still waiting"


def _entries(messages) -> List[Dict]:
    """``[{"id", "packet"}, ...]`` of the messages in queue order, batch messages unpacked."""
    out = []
    for message in messages:
        body = json.loads(message.body)
        if "golconde-batch" in message.headers:
            out.extend({"id": e["id"], "packet": e["packet"]} for e in body["batch"])
        else:
            out.append({"id": message.headers["golconde-id"], "packet": body})
    return out


def _hold_first_write(client: Client) -> threading.Event:
    """Hold the client's first broker write (the real one, sent once released) until the returned
    event is set, so that other threads' sends queue up behind it."""
    release = threading.Event()
    real = client.connection.send_confirmed
    calls = []

    def held(messages, timeout=30.0):
        calls.append(len(messages))
        if len(calls) == 1:
            release.wait(30)
        return real(messages, timeout)

    client.connection.send_confirmed = held
    return release


def test_sends_queued_behind_a_write_go_out_together_in_the_next(broker):
    queue = unique_queue("threads.")
    with Client(queue, broker.host, broker.port, broker.login, broker.passcode) as client:
        release = _hold_first_write(client)
        ids: Dict[int, str] = {}

        def send(n: int) -> None:
            ids[n] = client.add({"id": n})

        first = threading.Thread(target=send, args=(0,), daemon=True)
        first.start()
        wait_for(lambda: client._sending, timeout=10, interval=0.01, message="the first write")
        others = [threading.Thread(target=send, args=(n,), daemon=True) for n in range(1, 8)]
        for thread in others:
            thread.start()
        wait_for(lambda: len(client._queued) == 7, timeout=10, interval=0.01,
                 message="seven sends queued behind the first write")
        assert not ids                   # none returned before its packets were confirmed
        release.set()
        for thread in [first] + others:
            thread.join(30)
        assert not [t for t in [first] + others if t.is_alive()]
    assert sorted(ids) == list(range(8))
    messages = drain_queue(queue, wait=0.5, broker=broker)
    # the first write alone (a plain message), then the seven others in one batch message
    assert [m.headers.get("golconde-batch") for m in messages] == [None, "7"]
    entries = _entries(messages)
    assert entries[0] == {"id": ids[0], "packet": {"action": "add", "data": {"id": 0}}}
    assert sorted((e["id"], e["packet"]["data"]["id"]) for e in entries[1:]) == \
        sorted((ids[n], n) for n in range(1, 8))


def test_many_threads_sharing_a_client_send_every_packet_once_each_in_order(broker):
    queue = unique_queue("threads.")
    threads, per_thread = 8, 40
    sent: Dict[int, List[str]] = {t: [] for t in range(threads)}
    errors: List[BaseException] = []
    start = threading.Barrier(threads)
    with Client(queue, broker.host, broker.port, broker.login, broker.passcode, timeout=60) as client:
        def produce(t: int) -> None:
            try:
                start.wait()
                for i in range(per_thread):
                    sent[t].append(client.set({"t": t, "i": i}))
            except BaseException as exc:
                errors.append(exc)

        _run([threading.Thread(target=produce, args=(t,)) for t in range(threads)], 120)
    assert not errors
    messages = drain_queue(queue, wait=1.0, broker=broker)
    entries = _entries(messages)
    assert len(entries) == threads * per_thread
    assert len({e["id"] for e in entries}) == len(entries)
    for t in range(threads):
        mine = [e for e in entries if e["packet"]["data"]["t"] == t]
        assert [e["packet"]["data"]["i"] for e in mine] == list(range(per_thread))   # in order
        assert [e["id"] for e in mine] == sent[t]
    # 320 sends, 8 threads at once: writes carried several threads' packets
    assert len(messages) < threads * per_thread


def test_a_batch_block_is_per_thread(broker):
    queue = unique_queue("threads.")
    with Client(queue, broker.host, broker.port, broker.login, broker.passcode) as client:
        in_block, other_sent = threading.Event(), threading.Event()
        batched: List[str] = []

        def batch() -> None:
            with client.batch():
                batched.extend(client.add({"n": n}) for n in range(3))
                in_block.set()
                other_sent.wait(30)

        holder = threading.Thread(target=batch, daemon=True)
        holder.start()
        assert in_block.wait(30)
        started = time.monotonic()
        single = client.add({"n": 99})   # not taken into the other thread's open batch
        assert time.monotonic() - started < 10
        other_sent.set()
        holder.join(30)
        assert not holder.is_alive()
    messages = drain_queue(queue, wait=0.5, broker=broker)
    assert [m.headers.get("golconde-batch") for m in messages] == [None, "3"]
    assert [e["id"] for e in _entries(messages)] == [single] + batched


def test_threads_waiting_for_outcomes_and_sending_share_one_connection(broker):
    """A fresh client with reply_to: half the threads start with wait_outcome (which connects and
    subscribes to the reply queue), half with a send (which connects), all at once. One
    connection, one subscription: the waits time out (no daemon answers), the sends are
    confirmed, nothing fails on a connection another thread replaced."""
    queue, replies = unique_queue("threads."), unique_queue("threads.replies.")
    count = 16
    outcomes: Dict[int, object] = {}
    start = threading.Barrier(count)
    client = Client(queue, broker.host, broker.port, broker.login, broker.passcode, timeout=10,
                    reply_to=replies)

    def work(n: int) -> None:
        start.wait()
        try:
            if n % 2:
                client.wait_outcome("none-%d" % n, timeout=1.0)
            else:
                outcomes[n] = client.add({"id": n})
                return
        except OutcomeTimeout:
            outcomes[n] = "timed out"
        except Exception as exc:
            outcomes[n] = exc

    try:
        _run([threading.Thread(target=work, args=(n,)) for n in range(count)], 60)
        assert client.connection.generation == 1     # connected once
    finally:
        client.close()
    assert {n: o for n, o in outcomes.items() if n % 2} == {n: "timed out" for n in range(1, count, 2)}
    sent = {outcomes[n] for n in range(0, count, 2)}
    assert all(isinstance(pid, str) for pid in sent)
    assert {e["id"] for e in _entries(drain_queue(queue, wait=0.5, broker=broker))} == sent
