"""BrokerConnection.hold(): while the inbox is full, stomp.py's heart-beat monitor is told a
heart-beat came. A real stomp.py connection object, never connected (no broker needed): this
checks that the stomp.py installed still has what hold() relies on."""
import logging
import time

import stomp

from golconde.broker import BrokerConnection


def connection(heartbeat_ms=2000):
    broker = BrokerConnection("127.0.0.1", 1, heartbeat_ms=heartbeat_ms, name="test")
    broker._conn = stomp.Connection11([("127.0.0.1", 1)], heartbeats=(heartbeat_ms, heartbeat_ms))
    return broker


def test_hold_records_a_heartbeat_in_stomp_py_monitor():
    broker = connection()
    protocol = broker._conn.get_listener("protocol-listener")
    protocol.received_heartbeat = time.monotonic() - 10          # as if silent for 10 s
    broker.hold()
    assert time.monotonic() - protocol.received_heartbeat < 1


def test_hold_does_nothing_while_heartbeats_are_off_or_unconnected():
    broker = connection()
    protocol = broker._conn.get_listener("protocol-listener")
    assert protocol.received_heartbeat is None                   # heart-beats not negotiated
    broker.hold()
    assert protocol.received_heartbeat is None
    broker._conn = None
    broker.hold()                                                # closed: nothing to hold


def test_hold_warns_once_when_stomp_py_lacks_the_protocol_listener(caplog, monkeypatch):
    monkeypatch.setattr(BrokerConnection, "_hold_warned", False)
    broker = connection()
    broker._conn.remove_listener("protocol-listener")
    with caplog.at_level(logging.WARNING, logger="golconde.broker"):
        broker.hold()
        broker.hold()
    assert caplog.text.count("cannot hold stomp.py's heart-beat monitor") == 1


def test_hold_interval_is_a_third_of_the_receive_timeout_for_short_heartbeats():
    assert BrokerConnection("h", 1, heartbeat_ms=10000).hold_interval == 0.5
    assert BrokerConnection("h", 1, heartbeat_ms=0).hold_interval == 0.5
    assert BrokerConnection("h", 1, heartbeat_ms=600).hold_interval == 0.3
    assert BrokerConnection("h", 1, heartbeat_ms=1).hold_interval == 0.01
