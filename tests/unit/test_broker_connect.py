"""How BrokerConnection.connect names a peer that is no STOMP broker, against real sockets:
one that closes at once, one that accepts and stays silent."""
from __future__ import annotations

import socket
import threading

import pytest

from golconde.broker import BrokerConnection, BrokerError


def _server(close_at_once: bool):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if close_at_once:
                conn.close()
            else:
                accepted.append(conn)       # kept open, silent

    threading.Thread(target=serve, daemon=True).start()
    return listener, accepted


@pytest.mark.parametrize("close_at_once, expected", [
    (True, "closed the connection without a CONNECTED frame"),
    (False, "did not answer: no CONNECTED frame within 1s")])
def test_a_peer_that_is_no_stomp_broker_is_named_for_what_it_did(close_at_once, expected):
    listener, accepted = _server(close_at_once)
    port = listener.getsockname()[1]
    try:
        connection = BrokerConnection("127.0.0.1", port, heartbeat_ms=0, name="probe")
        with pytest.raises(BrokerError) as raised:
            connection.connect(timeout=1.0)
        assert ("STOMP broker 127.0.0.1:%d %s" % (port, expected)) in str(raised.value), str(raised.value)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
