"""broker.Receipt deadlines and the idle cycle of a queue consumer: a receipt is due within its
timeout from the send, and while one is late, arriving packets are taken, not held back."""
from __future__ import annotations

import time

import pytest

from golconde.broker import BrokerConnection, BrokerError, Delivery, Receipt
from golconde.listener import Confirmations, Inbox, QueueConsumer
from golconde.stats import ThreadStats


def live_connection() -> BrokerConnection:
    """A real BrokerConnection, never connected, marked alive: receipts arrive by _receipt()."""
    broker = BrokerConnection("127.0.0.1", 1, name="test")
    broker._alive = True
    return broker


def test_a_receipt_is_done_when_answered_and_waits_no_more():
    broker = live_connection()
    receipt = Receipt(broker, "r1", timeout=30.0)
    assert not receipt.done()
    broker._receipt("r1", None)
    assert receipt.done()
    receipt.wait()


def test_a_receipt_is_done_once_overdue_and_then_raises_at_once_with_its_timeout():
    broker = live_connection()
    receipt = Receipt(broker, "never", timeout=0.05)
    assert not receipt.done()
    time.sleep(0.06)
    assert receipt.done()
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"no receipt from 127\.0\.0\.1:1 within 0\.05s"):
        receipt.wait()
    assert time.monotonic() - started < 0.05


def test_waiting_counts_from_the_send_not_from_the_wait():
    broker = live_connection()
    receipt = Receipt(broker, "never", timeout=0.3)
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(BrokerError):
        receipt.wait()
    assert time.monotonic() - started < 0.2


def test_a_refused_send_raises_with_the_broker_error():
    broker = live_connection()
    receipt = Receipt(broker, "r2")
    broker._receipt("r2", "queue not found")
    assert receipt.done()
    with pytest.raises(BrokerError, match="refused the send: queue not found"):
        receipt.wait()


def test_a_receipt_of_an_earlier_connection_fails_at_once():
    broker = live_connection()
    receipt = Receipt(broker, "r3")
    broker.generation += 1                  # reconnected: the old connection's answer never comes
    broker._receipt("r3", None)             # (nor may a same-named one of the new connection count)
    assert receipt.done()
    started = time.monotonic()
    with pytest.raises(BrokerError, match="reconnected before the send was confirmed"):
        receipt.wait()
    assert time.monotonic() - started < 1.0


def test_an_overdue_receipt_raises_at_settle_even_when_not_waiting():
    broker = live_connection()
    pipeline: Confirmations[str] = Confirmations()
    pipeline.add([Receipt(broker, "never", timeout=0.01)], "a")
    time.sleep(0.02)
    with pytest.raises(BrokerError):
        pipeline.settle(keep=10, finish=lambda item: None)
    assert list(pipeline) == ["a"]


class _Inbound:
    """What QueueConsumer.settle() needs of its broker connection: acks recorded."""

    generation = 1

    def __init__(self) -> None:
        self.acked = []

    def ack(self, delivery: Delivery) -> bool:
        if delivery.generation != self.generation:      # as BrokerConnection.ack: not acked
            return False
        self.acked.append(delivery.headers["message-id"])
        return True


def idle_consumer() -> QueueConsumer:
    consumer = QueueConsumer.__new__(QueueConsumer)      # no database, handler or broker
    consumer._inbox = Inbox(100)
    consumer._pending = Confirmations()
    consumer._in_flight = False
    consumer._next_prune = float("inf")
    consumer._next_probe = float("inf")
    consumer.previous_queues = []
    consumer.inbound = _Inbound()
    consumer.stats = ThreadStats("c", "target", "d")
    consumer._applying = None
    return consumer


def test_idle_cycle_acks_what_is_confirmed_without_waiting_for_a_late_receipt():
    broker = live_connection()
    consumer = idle_consumer()
    # each batch with the packets it fanned out, counted once it is acked
    consumer._pending.add([Receipt(broker, "r1")], (Delivery(b"", {"message-id": "m1"}, 1), 4))
    consumer._pending.add([Receipt(broker, "late")], (Delivery(b"", {"message-id": "m2"}, 1), 6))
    broker._receipt("r1", None)
    started = time.monotonic()
    consumer.cycle()
    # the late receipt was not waited for (it would be, up to its 30 s, before the packets
    # arriving meanwhile were taken)
    assert time.monotonic() - started < 1.0
    assert consumer.inbound.acked == ["m1"] and len(consumer._pending) == 1
    assert consumer.stats.snapshot()["fanned_out"] == 4
    assert consumer._in_flight                              # m2 still awaits its ack
    consumer.stats.set_lag(7.5)                             # the last batch's
    broker._receipt("late", None)
    consumer.cycle()
    assert consumer.inbound.acked == ["m1", "m2"] and not consumer._in_flight
    assert consumer.stats.snapshot()["fanned_out"] == 10
    assert consumer.stats.snapshot()["lag"] == 0.0          # nothing held any more: not late


def test_a_batch_whose_ack_came_on_an_earlier_connection_is_not_counted_fanned_out():
    """Its ack does nothing: the broker redelivers it, and its sends, made again from the ledger,
    are counted when that delivery is acked (review rv24: counted twice)."""
    broker = live_connection()
    consumer = idle_consumer()
    consumer._pending.add([Receipt(broker, "r1")], (Delivery(b"", {"message-id": "m1"}, 1), 8))
    consumer.inbound.generation = 2                          # the inbound reconnected
    broker._receipt("r1", None)
    consumer.cycle()
    assert consumer.inbound.acked == [] and not consumer._pending
    assert consumer.stats.snapshot()["fanned_out"] == 0


def test_pending_acks_keep_no_message_body():
    delivery = Delivery(b"x" * 1000, {"message-id": "m1", "subscription": "s"}, 3)
    kept = delivery.ack_only()
    assert kept.body == b"" and kept.headers == delivery.headers and kept.generation == 3
