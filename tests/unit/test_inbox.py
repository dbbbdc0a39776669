"""The listener's inbox: bounded in packets (a batch message counts for its entries) and in bytes,
blocking the broker's receiver thread while full, and releasing it when closed."""
import queue
import threading
import time

import pytest

from golconde.broker import Delivery
from golconde.listener import Inbox


def delivery(entries=None, generation=1, size=2):
    headers = {"golconde-batch": str(entries)} if entries else {}
    return Delivery(b"{" + b" " * (size - 2) + b"}", headers, generation)


def put_in_thread(inbox, item):
    done = []
    thread = threading.Thread(target=lambda: done.append(inbox.put(item)), daemon=True)
    thread.start()
    return thread, done


def test_counts_packets_and_keeps_order():
    inbox = Inbox(1000)
    first, second, third = delivery(500), delivery(), delivery(499)
    for item in (first, second, third):
        assert inbox.put(item) is True
    assert inbox.packets == 1000
    assert inbox.take() == (first, 500, 2)
    assert inbox.packets == 500
    assert [inbox.take()[0], inbox.take()[0]] == [second, third]
    assert inbox.packets == 0
    with pytest.raises(queue.Empty):
        inbox.take()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        inbox.take(timeout=0.05)
    assert time.monotonic() - started >= 0.04


def test_a_put_over_the_limit_waits_until_packets_are_taken():
    inbox = Inbox(600)
    inbox.put(delivery(500))
    thread, done = put_in_thread(inbox, delivery(200))
    thread.join(0.3)
    assert thread.is_alive() and done == [] and inbox.packets == 500     # blocked: 700 > 600
    inbox.take()
    thread.join(2)
    assert done == [True] and inbox.packets == 200


def test_one_delivery_larger_than_the_limit_is_let_in_when_the_inbox_is_empty():
    inbox = Inbox(100)
    assert inbox.put(delivery(500)) is True
    assert inbox.packets == 500


def test_close_releases_a_blocked_put_and_drops_until_reopened():
    inbox = Inbox(10)
    inbox.put(delivery(10))
    thread, done = put_in_thread(inbox, delivery(5))
    thread.join(0.2)
    assert thread.is_alive()
    inbox.close()
    thread.join(2)
    assert done == [False] and inbox.packets == 0
    assert inbox.put(delivery(3)) is False                   # closed: dropped at once
    inbox.reopen()
    assert inbox.put(delivery(3)) is True and inbox.packets == 3


def test_a_waiting_take_wakes_when_a_delivery_arrives():
    inbox = Inbox(10)
    item = delivery()
    timer = threading.Timer(0.1, inbox.put, args=(item,))
    timer.start()
    assert inbox.take(timeout=5)[0] is item


def test_bytes_are_counted_and_a_put_over_the_byte_limit_waits():
    inbox = Inbox(1000, max_bytes=100)
    inbox.put(delivery(size=60))
    assert (inbox.packets, inbox.bytes) == (1, 60)
    thread, done = put_in_thread(inbox, delivery(size=50))
    thread.join(0.3)
    assert thread.is_alive() and done == [] and inbox.bytes == 60      # blocked: 110 > 100 bytes
    assert inbox.take()[2] == 60
    thread.join(2)
    assert done == [True] and (inbox.packets, inbox.bytes) == (1, 50)


def test_one_delivery_larger_than_the_byte_limit_is_let_in_when_the_inbox_is_empty():
    inbox = Inbox(1000, max_bytes=10)
    assert inbox.put(delivery(size=500)) is True
    assert inbox.bytes == 500
    thread, done = put_in_thread(inbox, delivery(size=2))
    thread.join(0.2)
    assert thread.is_alive()                     # anything more waits until it is taken
    inbox.take()
    thread.join(2)
    assert done == [True]


def test_take_leaves_a_delivery_larger_than_max_bytes():
    inbox = Inbox(1000)
    small, large = delivery(size=10), delivery(size=300)
    inbox.put(small)
    inbox.put(large)
    assert inbox.take(max_bytes=100)[0] is small
    with pytest.raises(queue.Empty):
        inbox.take(max_bytes=100)
    assert (inbox.packets, inbox.bytes) == (1, 300)     # still there, first in line
    assert inbox.take(max_bytes=300)[0] is large
    assert inbox.bytes == 0


def test_close_forgets_the_bytes_too():
    inbox = Inbox(10, max_bytes=1000)
    inbox.put(delivery(size=400))
    inbox.close()
    inbox.reopen()
    assert (inbox.packets, inbox.bytes) == (0, 0)


def test_a_blocked_put_calls_while_full_until_it_gets_in():
    inbox = Inbox(1)
    inbox.put(delivery())
    calls = []
    thread = threading.Thread(target=inbox.put, args=(delivery(),),
                              kwargs={"while_full": lambda: calls.append(time.monotonic())}, daemon=True)
    thread.start()
    time.sleep(1.2)
    assert len(calls) >= 2                                # every 0.5 s (the default) while blocked
    inbox.take()
    thread.join(2)
    assert not thread.is_alive() and inbox.packets == 1
    held = len(calls)
    inbox.take()
    inbox.put(delivery(), while_full=lambda: calls.append(0))
    assert len(calls) == held                             # not called when there is room
