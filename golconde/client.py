"""The Python client: application code enqueues packets on a destination without knowing STOMP.

Example::

    from golconde.client import Client
    with Client("/queue/golconde.friendships", host="127.0.0.1", port=61613,
                login="guest", passcode="guest") as client:
        client.add({"friend_id": 47, "user_id": 16, "status_id": 1})
        client.update({"status_id": 3}, restriction={"friend_id": 5, "user_id": 41})
        with client.batch():                   # one broker confirmation for many packets
            for row in rows:
                client.set(row)

Every packet is validated before it is sent (:class:`~golconde.errors.PacketError`), stamped with a
unique ``golconde-id`` (so a packet re-sent after a connection loss is applied once) and sent as a
persistent message; a call returns only once the broker confirmed it (a receipt), or raises
:class:`~golconde.broker.BrokerError`.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Union

from .broker import CREATED_HEADER, ID_HEADER, BrokerConnection, BrokerError, Outgoing
from .errors import ConfigError
from .packet import Action, Packet, parse


class Client:
    """A connection to one destination queue.

    :param queue: the destination's queue (``/queue/golconde.<destination>``).
    :param host, port, login, passcode, vhost: the STOMP broker.
    :param timeout: seconds to wait for a connection or a confirmation.
    """

    def __init__(self, queue: str, host: str = "127.0.0.1", port: int = 61613,
                 login: Optional[str] = None, passcode: Optional[str] = None,
                 vhost: Optional[str] = None, timeout: float = 30.0) -> None:
        self.queue = queue
        self.timeout = timeout
        self.connection = BrokerConnection(host, port, login, passcode, vhost, heartbeat_ms=0,
                                           name="golconde-client")
        self._pending: Optional[List[Outgoing]] = None

    @classmethod
    def for_destination(cls, config: Any, name: str, timeout: float = 30.0) -> "Client":
        """A client for destination ``name`` of a :class:`golconde.config.Config`.
        :raises ConfigError: no such destination."""
        for destination in config.destinations:
            if destination.name == name:
                broker = destination.stomp
                return cls(destination.queue, broker.host, broker.port, broker.login,
                           broker.passcode, broker.vhost, timeout)
        raise ConfigError("Destinations.%s: no such destination" % name)

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now (otherwise the first send connects). :raises BrokerError:"""
        if not self.connection.connected:
            self.connection.connect(self.timeout)

    def close(self) -> None:
        self.connection.close()

    # -- packets -----------------------------------------------------------------------------------
    def add(self, data: Mapping[str, Any]) -> str:
        """Enqueue an ADD (INSERT) packet. Returns its packet id."""
        return self.send({"action": "add", "data": dict(data)})

    def set(self, data: Mapping[str, Any]) -> str:
        """Enqueue a SET (upsert on the primary key or a unique key) packet."""
        return self.send({"action": "set", "data": dict(data)})

    def update(self, data: Mapping[str, Any], restriction: Mapping[str, Any]) -> str:
        """Enqueue an UPDATE packet: ``data`` where ``restriction``."""
        return self.send({"action": "update", "data": dict(data), "restriction": dict(restriction)})

    def delete(self, restriction: Mapping[str, Any]) -> str:
        """Enqueue a DELETE packet: rows matching ``restriction``."""
        return self.send({"action": "delete", "restriction": dict(restriction)})

    def send(self, packet: Union[Packet, Mapping[str, Any], str]) -> str:
        """Validate and enqueue one packet (a :class:`Packet`, a dict or JSON text).

        :returns: the packet id (``golconde-id`` header).
        :raises PacketError: the packet is invalid (nothing is sent).
        :raises BrokerError: the broker did not confirm it (after one reconnect and re-send).
        """
        return self.send_many([packet])[0]

    def send_many(self, packets: Sequence[Union[Packet, Mapping[str, Any], str]]) -> List[str]:
        """Enqueue several packets with one confirmation. Returns their ids, in order."""
        messages: List[Outgoing] = []
        ids = []
        for packet in packets:
            parsed = packet if isinstance(packet, Packet) else parse(packet)
            pid = str(uuid.uuid4())
            ids.append(pid)
            messages.append((self.queue, parsed.to_json(), {
                ID_HEADER: pid, CREATED_HEADER: "%.3f" % time.time(),
                "content-type": "application/json"}))
        if self._pending is not None:
            self._pending.extend(messages)
        else:
            self._flush(messages)
        return ids

    @contextlib.contextmanager
    def batch(self) -> Iterator["Client"]:
        """Collect the packets sent inside the block and confirm them together at its end."""
        outer = self._pending is not None
        if not outer:
            self._pending = []
        try:
            yield self
            if not outer:
                self._flush(self._pending or [])
        finally:
            if not outer:
                self._pending = None

    def _flush(self, messages: List[Outgoing]) -> None:
        if not messages:
            return
        for attempt in (1, 2):
            try:
                self.connect()
                self.connection.send_confirmed(messages, self.timeout)
                return
            except BrokerError:
                self.connection.close()
                if attempt == 2:
                    raise


__all__ = ["Client", "Action", "Packet"]
