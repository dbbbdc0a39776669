"""Groups of packets: parsing and encoding (pure logic)."""
import pytest

from golconde.errors import PacketError
from golconde.packet import Action, Group, Packet, loads, parse, parse_message


def test_a_plain_packet_is_still_a_packet():
    packet = parse_message('{"action": "add", "data": {"a": 1}}')
    assert packet == Packet(Action.ADD, {"a": 1})
    assert parse_message({"ACTION": "DELETE", "RESTRICTION": {"id": 1}}) == parse('{"action": "delete", "restriction": {"id": 1}}')


def test_a_group_parses_into_its_members_in_order():
    group = parse_message(b'{"group": [{"action": "add", "data": {"id": 1}},'
                          b' {"ACTION": "UPDATE", "DATA": {"s": 2}, "RESTRICTION": {"id": 1}},'
                          b' {"action": "delete", "restriction": {"id": 0}}]}')
    assert isinstance(group, Group)
    assert [p.action for p in group.packets] == [Action.ADD, Action.UPDATE, Action.DELETE]
    assert group.packets[1].restriction == {"id": 1}


def test_group_key_is_case_insensitive_and_round_trips():
    group = parse_message('{"GROUP": [{"action": "set", "data": {"n": 1.10}}]}')
    assert loads(group.to_json()) == {"group": [{"action": "set", "data": {"n": loads("1.10")}}]}
    assert parse_message(group.to_json()) == group
    assert group.as_dict() == {"group": [{"action": "set", "data": {"n": loads("1.10")}}]}


@pytest.mark.parametrize("body, message", [
    ('{"group": []}', "group is empty"),
    ('{"group": {}}', "group must be a JSON array of packets, not an object"),
    ('{"group": null}', "group must be a JSON array of packets, not null"),
    ('{"group": [{"action": "add", "data": {"a": 1}}], "action": "add"}', "a group message has the single key 'group'"),
    ('{"group": [{"group": [{"action": "add", "data": {"a": 1}}]}]}',
     "group member 0 (0-based, of 1): groups do not nest"),
    ('{"group": [{"action": "add", "data": {"a": 1}}, {"GROUP": []}]}',
     "group member 1 (0-based, of 2): groups do not nest"),
    ('{"group": [{"action": "add", "data": {"a": 1}}, {"action": "explode"}]}',
     "group member 1 (0-based, of 2): unknown action 'explode'"),
    ('{"group": [{"action": "add", "data": {"a": 1}}, 5]}',
     "group member 1 (0-based, of 2): packet must be a JSON object, not a number"),
    ('{"group": [{"action": "delete", "restriction": {}}]}',
     "group member 0 (0-based, of 1): delete packet needs a non-empty restriction"),
    ('[{"action": "add"}]', "packet must be a JSON object, not an array"),
    ('{"group": [', "not valid JSON"),
])
def test_invalid_groups_are_packet_errors(body, message):
    with pytest.raises(PacketError) as info:
        parse_message(body)
    assert message in str(info.value)


def test_parse_refuses_a_group_as_before():
    with pytest.raises(PacketError, match="unknown packet key 'group'"):
        parse('{"group": [{"action": "add", "data": {"a": 1}}]}')


def test_groups_are_values():
    a = parse_message('{"group": [{"action": "add", "data": {"a": 1}}]}')
    b = parse_message('{"group": [{"action": "add", "data": {"a": 1}}]}')
    assert a == b and a.packets[0] == Packet(Action.ADD, {"a": 1})
