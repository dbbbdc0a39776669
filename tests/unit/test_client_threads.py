"""A failed write of a Client shared by threads, against a real socket: a peer that answers
CONNECTED and then never confirms a send. Every thread whose packets the write carried raises
BrokerError; none returns as if its packets were confirmed."""
from __future__ import annotations

import socket
import threading
import time
from typing import List

from golconde.broker import BrokerError
from golconde.client import Client


class SilentBroker:
    """Accepts STOMP connections, answers CONNECTED, records the SEND frames' headers and never
    confirms one (it confirms a DISCONNECT only)."""

    def __init__(self) -> None:
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
        with conn:
            self._frames(conn)

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
                if command in (b"CONNECT", b"STOMP"):
                    conn.sendall(b"CONNECTED\nversion:1.1\nheart-beat:0,0\n\n\x00")
                elif command == b"SEND":
                    self.sends.append(frame.split(b"\n\n", 1)[0].decode())
                elif command == b"DISCONNECT":     # confirmed, as a broker does
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
        others = [threading.Thread(target=send, args=(n,), daemon=True) for n in (1, 2, 3)]
        for thread in others:
            thread.start()
        while len(client._queued) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(client._queued) == 3
        for thread in [first] + others:
            thread.join(30)
        assert not [t for t in [first] + others if t.is_alive()]
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
