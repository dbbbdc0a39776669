"""Packet parsing and validation (pure logic)."""
from decimal import Decimal

import pytest

from golconde.errors import PacketError
from golconde.packet import Action, Packet, dumps, loads, parse


def test_slides_upper_case_packet():
    packet = parse('{"ACTION": "ADD", "DATA": {"FRIEND_ID": 47, "USER_ID": 16, "STATUS_ID": 1}}')
    assert packet.action is Action.ADD
    assert packet.data == {"FRIEND_ID": 47, "USER_ID": 16, "STATUS_ID": 1}
    assert packet.restriction == {}


@pytest.mark.parametrize("action", ["add", "ADD", "Add", " set ", "UPDATE", "delete"])
def test_actions_case_insensitive(action):
    body = {"action": action, "data": {"a": 1}, "restriction": {"k": 1}}
    if action.strip().lower() in ("add", "set"):
        del body["restriction"]
    if action.strip().lower() == "delete":
        del body["data"]
    assert parse(body).action.value == action.strip().lower()


def test_numbers_keep_their_precision_and_round_trip():
    packet = parse(b'{"action": "set", "data": {"n": 12345678901234567890.123456789012345678, "i": 10000000000000000000001}}')
    assert packet.data["n"] == Decimal("12345678901234567890.123456789012345678")
    assert packet.data["i"] == 10000000000000000000001
    again = parse(packet.to_json())
    assert again == packet


def test_to_json_is_canonical_lower_case():
    packet = parse('{"Action": "DELETE", "Restriction": {"id": 1}}')
    assert loads(packet.to_json()) == {"action": "delete", "restriction": {"id": 1}}


@pytest.mark.parametrize("body, message", [
    (b'{"action": "add", "data": ', "not valid JSON"),
    (b'\xff\xfe', "not valid UTF-8"),
    (b'[1]', "must be a JSON object, not an array"),
    (b'"x"', "must be a JSON object, not a string"),
    (b'{"data": {"a": 1}}', "no action"),
    (b'{"action": 1, "data": {"a": 1}}', "action must be a string"),
    (b'{"action": "merge", "data": {"a": 1}}', "unknown action 'merge'"),
    (b'{"action": "add", "data": {"a": 1}, "extra": 1}', "unknown packet key 'extra'"),
    (b'{"action": "add", "ACTION": "add", "data": {"a": 1}}', "given twice"),
    (b'{"action": "add"}', "non-empty data"),
    (b'{"action": "add", "data": {}}', "non-empty data"),
    (b'{"action": "add", "data": [1]}', "data must be a JSON object"),
    (b'{"action": "update", "data": {"a": 1}}', "non-empty restriction"),
    (b'{"action": "delete", "restriction": {}}', "non-empty restriction"),
    (b'{"action": "delete", "restriction": {"a": 1}, "data": {"b": 2}}', "takes a restriction, not data"),
    (b'{"action": "set", "data": {"a": 1}, "restriction": {"a": 1}}', "takes data, not a restriction"),
    (b'{"action": "add", "data": {"": 1}}', "empty column name"),
    (b'{"action": "add", "data": {"a": "x\\u0000y"}}', "NUL character"),
    (b'{"action": "add", "data": {"a": NaN}}', "not valid JSON"),
    (b'{"action": "add", "data": {"a": Infinity}}', "not valid JSON"),
])
def test_bad_packets_name_the_problem(body, message):
    with pytest.raises(PacketError, match=message):
        parse(body)


def test_deep_nesting_is_a_packet_error_not_a_crash():
    deep = b'{"action": "add", "data": {"a": ' + b"[" * 100000 + b"]" * 100000 + b"}}"
    with pytest.raises(PacketError):
        parse(deep)
    nested = b'{"action": "add", "data": {"a": ' + b"[" * 70 + b"]" * 70 + b"}}"
    with pytest.raises(PacketError, match="nested deeper"):
        parse(nested)


def test_oversized_packet_refused():
    with pytest.raises(PacketError, match="bytes, more than"):
        parse(b'{"action": "add", "data": {"a": "' + b"x" * (5 * 1024 * 1024) + b'"}}')


def test_with_data_returns_a_copy():
    packet = Packet(Action.ADD, {"a": 1})
    filled = packet.with_data({"a": 1, "id": 7})
    assert packet.data == {"a": 1} and filled.data == {"a": 1, "id": 7}
    assert dumps({"x": Decimal("1.10")}) == '{"x":1.10}'


@pytest.mark.parametrize("data, reason", [
    ({"id": 1, "t": __import__("datetime").datetime(2026, 1, 1)}, "Object of type datetime"),
    ({"id": float("nan")}, "nan"),
    ({"id": Decimal("Infinity")}, "inf"),
    ({"id": {1, 2}}, "Object of type set"),
])
def test_the_client_refuses_values_json_cannot_hold_with_a_packet_error(data, reason):
    """Nothing is sent (the client is not even connected): the packet is refused first."""
    from golconde.client import Client

    with pytest.raises(PacketError, match="packet cannot be written as JSON: .*%s" % reason):
        Client("/queue/golconde.unit").add(data)


def test_the_client_refuses_what_the_daemon_would_dead_letter_or_lose_before_sending():
    """Nothing is sent (the client is not even connected): a packet over MAX_PACKET_BYTES of
    UTF-8 (3 Mi characters of 2 bytes each, under the limit in characters), a body that is no
    packet at all, one packet given to send_many, and a queue that is not a queue."""
    from golconde.client import Client
    from golconde.errors import ConfigError
    from golconde.packet import MAX_PACKET_BYTES, loads

    client = Client("/queue/golconde.unit")
    with pytest.raises(PacketError, match=r"packet is \d+ bytes of UTF-8, more than the %d allowed"
                       % MAX_PACKET_BYTES):
        client.add({"id": 1, "name": "\u00e9" * (3 * 1024 * 1024)})
    with pytest.raises(PacketError, match="more than the %d allowed" % MAX_PACKET_BYTES):
        loads('{"name": "%s"}' % ("\u00e9" * (3 * 1024 * 1024)))      # text, counted in bytes
    for body in (None, 5, 1.5):
        with pytest.raises(PacketError, match="packet must be JSON text, UTF-8 bytes or a JSON object"):
            client.send(body)
    with pytest.raises(PacketError, match="send_many takes a sequence of packets"):
        client.send_many('{"action": "add", "data": {"id": 1}}')
    for queue in ("/topic/golconde.unit", "golconde.unit", "/queue/", None):
        with pytest.raises(ConfigError, match="expected a queue name"):
            Client(queue)


def test_a_column_name_that_is_not_a_string_is_refused():
    with pytest.raises(PacketError, match="data has a column name that is not a string: 1"):
        parse({"action": "add", "data": {1: 2}})


def test_a_duplicate_reply_does_not_replace_the_first_outcome():
    """A batch delivered again after a fault is answered again, "duplicate": the client keeps
    what the first delivery did."""
    import json
    from types import SimpleNamespace

    from golconde.client import Client

    client = Client("/queue/golconde.unit", reply_to="/queue/golconde.unit.replies")
    client.connection.ack = lambda delivery: None

    def reply(pid, status):
        body = json.dumps({"id": pid, "status": status, "reason": None}).encode()
        client._on_reply(SimpleNamespace(body=body, headers={"golconde-id": pid}))

    reply("a", "applied")
    reply("a", "duplicate")
    reply("b", "duplicate")
    reply("c", "dead-lettered")
    reply("c", "duplicate")
    assert {pid: o["status"] for pid, (_, o) in client._outcomes.items()} == {
        "a": "applied", "b": "duplicate", "c": "dead-lettered"}


def test_the_client_forgets_outcomes_no_one_waited_for(monkeypatch):
    """Replies no one waits for (or that came after their wait timed out) no longer pile up: those
    older than OUTCOME_TTL go, and the oldest beyond MAX_KEPT_OUTCOMES; a later 'duplicate' does
    not replace an outcome kept."""
    import json

    from golconde import client as client_module
    from golconde.broker import Delivery

    clock = [1000.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(client_module, "MAX_KEPT_OUTCOMES", 3)
    monkeypatch.setattr(client_module, "OUTCOME_TTL", 60.0)
    client = client_module.Client("/queue/golconde.unit", reply_to="/queue/golconde.unit.replies")

    def reply(pid, status="applied"):
        body = json.dumps({"id": pid, "status": status, "reason": None}).encode()
        client._on_reply(Delivery(body, {"golconde-id": pid}, -1))   # an old generation: no ack sent

    for n in range(5):
        reply("p%d" % n)
    reply("p4", "duplicate")
    assert list(client._outcomes) == ["p2", "p3", "p4"]
    assert client._outcomes["p4"][1]["status"] == "applied"
    clock[0] += 30
    reply("p5")
    clock[0] += 31               # p2..p4 are 61 s old, p5 31 s
    reply("p6")
    assert list(client._outcomes) == ["p5", "p6"]
