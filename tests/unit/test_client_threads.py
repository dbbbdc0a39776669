"""A failed write of a Client shared by threads, against a real socket: a peer that answers
CONNECTED and then never confirms a send. Every thread whose packets the write carried raises
BrokerError; none returns as if its packets were confirmed. Threads facing a peer that does not
answer CONNECT wait for one attempt, not one each; a peer that does not confirm DISCONNECT does
not hold close() for ever."""
from __future__ import annotations

import socket
import threading
import time
from typing import List

import pytest

from golconde import broker as broker_module
from golconde.broker import BrokerError
from golconde.client import Client


def _start(target, args_list) -> List[threading.Thread]:
    """Daemon threads running ``target(*args)`` for each of ``args_list``, started."""
    threads = [threading.Thread(target=target, args=args, daemon=True) for args in args_list]
    for thread in threads:
        thread.start()
    return threads


def _join(threads: List[threading.Thread], timeout: float = 30) -> None:
    """Join ``threads``; fail if one is still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "threads still running"


class SilentBroker:
    """Accepts STOMP connections, answers CONNECTED, records the SEND frames' headers and never
    confirms one (it confirms a DISCONNECT only). ``connected=False``: never answers CONNECT
    either; ``disconnect=False``: nor DISCONNECT (a hung broker)."""

    def __init__(self, connected: bool = True, disconnect: bool = True,
                 connect_delay: float = 0.0) -> None:
        self.connected, self.disconnect, self.connect_delay = connected, disconnect, connect_delay
        self.open = 0                   # connections the client has not closed
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.sends: List[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self.open += 1
        try:
            with conn:
                self._frames(conn)
        finally:
            self.open -= 1

    def _frames(self, conn: socket.socket) -> None:
        data = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            data += chunk
            while b"\x00" in data:
                frame, data = data.split(b"\x00", 1)
                frame = frame.lstrip(b"\r\n")
                command = frame.split(b"\n", 1)[0]
                if command in (b"CONNECT", b"STOMP") and self.connected:
                    time.sleep(self.connect_delay)
                    conn.sendall(b"CONNECTED\nversion:1.1\nheart-beat:0,0\n\n\x00")
                elif command == b"SEND":
                    self.sends.append(frame.split(b"\n\n", 1)[0].decode())
                elif command == b"DISCONNECT" and self.disconnect:     # confirmed, as a broker does
                    for line in frame.split(b"\n\n", 1)[0].split(b"\n"):
                        if line.startswith(b"receipt:"):
                            conn.sendall(b"RECEIPT\nreceipt-id:" + line[8:] + b"\n\n\x00")
                    return

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)    # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()


def test_every_thread_a_failed_write_carried_raises():
    broker = SilentBroker()
    client = Client("/queue/golconde.test.silent", "127.0.0.1", broker.port, "guest", "guest",
                    timeout=1.0)
    outcomes: dict = {}

    def send(n: int) -> None:
        try:
            outcomes[n] = client.add({"id": n})
        except BrokerError as exc:
            outcomes[n] = exc

    try:
        first = threading.Thread(target=send, args=(0,), daemon=True)
        first.start()
        deadline = time.monotonic() + 10
        while not broker.sends and time.monotonic() < deadline:
            time.sleep(0.01)
        assert broker.sends, "the first write never reached the peer"
        others = _start(send, [(n,) for n in (1, 2, 3)])
        while len(client._queued) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(client._queued) == 3
        _join([first] + others)
    finally:
        client.close()
        broker.close()
    assert sorted(outcomes) == [0, 1, 2, 3]
    for n in range(4):
        assert isinstance(outcomes[n], BrokerError), (n, outcomes[n])
        assert "no receipt" in str(outcomes[n])
    # the first write (sent, and again after a reconnect), then one write carrying the three
    # threads queued behind it (a batch message of 3, twice)
    batches = [[line for line in headers.splitlines() if line.startswith("golconde-batch:")]
               for headers in broker.sends]
    assert batches == [[], [], ["golconde-batch:3"], ["golconde-batch:3"]]


def test_threads_that_waited_for_a_failed_connect_share_its_failure():
    broker = SilentBroker(connected=False)
    client = Client("/queue/golconde.test.silent", "127.0.0.1", broker.port, "guest", "guest",
                    timeout=1.0)
    outcomes: dict = {}
    start = threading.Barrier(6)

    def connect(n: int) -> None:
        start.wait()
        try:
            client.connect()
            outcomes[n] = "connected"
        except BrokerError as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=connect, args=(n,), daemon=True) for n in range(6)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        took = time.monotonic() - started
        assert not [t for t in threads if t.is_alive()]
    finally:
        client.close()
        broker.close()
    assert all(isinstance(outcomes[n], BrokerError) for n in range(6)), outcomes
    assert all("no CONNECTED frame within 1s" in str(outcomes[n]) for n in range(6))
    assert took < 4.0                # one attempt of 1 s for all, not 6 one after another


def test_threads_that_came_during_a_connect_that_fails_take_its_failure():
    broker = SilentBroker(connected=False)
    client = Client("/queue/golconde.test.silent", "127.0.0.1", broker.port, "guest", "guest",
                    timeout=2.0)
    took: dict = {}

    def connect(n: int) -> None:
        started = time.monotonic()
        with pytest.raises(BrokerError, match="no CONNECTED frame within 2s"):
            client.connect()
        took[n] = time.monotonic() - started

    first = threading.Thread(target=connect, args=(0,), daemon=True)
    try:
        first.start()
        time.sleep(0.5)                 # the others come while the first attempt runs
        others = _start(connect, [(n,) for n in range(1, 5)])
        _join([first] + others)
    finally:
        client.close()
        broker.close()
    assert sorted(took) == [0, 1, 2, 3, 4]
    assert all(took[n] < 3.0 for n in range(1, 5)), took    # the first attempt's 1.5 s left, not 2 s more


def test_a_close_while_another_thread_connects_leaves_no_connection_open():
    broker = SilentBroker(connect_delay=1.0)
    client = Client("/queue/golconde.test.silent", "127.0.0.1", broker.port, "guest", "guest",
                    timeout=5.0)
    outcome: list = []

    def connect() -> None:
        try:
            client.connect()
            outcome.append("connected")
        except BrokerError as exc:
            outcome.append(exc)

    connecting = threading.Thread(target=connect, daemon=True)
    try:
        connecting.start()
        deadline = time.monotonic() + 10
        while broker.open < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)                 # CONNECT sent, CONNECTED not yet
        client.close()
        connecting.join(10)
        assert not connecting.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], BrokerError), outcome
        assert "closed while connecting" in str(outcome[0])
        assert not client.connection.connected
        while broker.open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert broker.open == 0         # the attempt's socket closed, no live session left behind
    finally:
        broker.close()


def test_a_send_whose_receipt_is_overdue_does_not_wait_for_the_disconnect():
    broker = SilentBroker(disconnect=False)
    client = Client("/queue/golconde.test.silent", "127.0.0.1", broker.port, "guest", "guest",
                    timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerError, match="no receipt"):
            client.add({"id": 1})       # no receipt twice (1 s each); the broker is not waited for
        assert time.monotonic() - started < broker_module.CLOSE_TIMEOUT
    finally:
        client.close()
        broker.close()


def test_close_does_not_wait_for_ever_for_a_broker_that_does_not_confirm_it(monkeypatch):
    monkeypatch.setattr(broker_module, "CLOSE_TIMEOUT", 0.5)
    broker = SilentBroker(disconnect=False)
    client = Client("/queue/golconde.test.silent", "127.0.0.1", broker.port, "guest", "guest",
                    timeout=1.0)
    try:
        client.connect()
        closing = threading.Thread(target=client.close, daemon=True)
        closing.start()
        closing.join(10)
        assert not closing.is_alive()
        started = time.monotonic()
        sender = threading.Thread(target=lambda: pytest.raises(BrokerError, client.add, {"id": 1}),
                                  daemon=True)
        sender.start()        # no receipt twice (1 s each), each followed by a close
        sender.join(20)
        assert not sender.is_alive()
        assert time.monotonic() - started < 10
    finally:
        broker.close()
