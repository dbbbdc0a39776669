"""STOMP heart-beats against each real broker: a connection that receives a message now and then
and is idle in between stays up. ActiveMQ sends its heart-beats only after a whole interval
without writing, and enforces ours with no grace; with stomp.py's own margins, connections to it
dropped every few idle intervals (golconde.broker._Connection)."""
from __future__ import annotations

import time

from golconde.broker import BrokerConnection

from ..conftest import unique_queue


def test_idle_connections_between_messages_stay_up(broker):
    interval = 1000                      # ms: the shortest a configuration takes, quick to test
    received = []

    def make(name, on_message=None):
        connection = BrokerConnection(broker.host, broker.port, broker.login, broker.passcode,
                                      heartbeat_ms=interval, name=name, on_message=on_message)
        connection.connect()
        return connection

    queue = unique_queue("hb")
    consumer = make("hb-consumer", received.append)
    consumer.subscribe(queue, 10, ack="auto")
    sender = make("hb-sender")
    try:
        for round_ in range(8):
            sender.send_confirmed([(queue, "message %d" % round_, {})])
            idle_until = time.monotonic() + 2.6 * interval / 1000.0
            while time.monotonic() < idle_until:
                assert consumer.connected and sender.connected, (
                    "round %d: connection lost (%s / %s)" % (round_, consumer.last_error,
                                                             sender.last_error))
                time.sleep(0.05)
        assert [d.body for d in received] == [b"message %d" % n for n in range(8)]
        assert (consumer.generation, sender.generation) == (1, 1)   # never reconnected
    finally:
        consumer.close()
        sender.close()
