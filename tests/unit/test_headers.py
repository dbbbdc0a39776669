"""Header values golconded takes from what it received: packet ids and the times and types it
sends on (pure functions of golconde.broker and golconde.ledger)."""
from __future__ import annotations

from decimal import Decimal

import pytest

from golconde.broker import MAX_COPIED_HEADER, copied_header, created_text
from golconde.ledger import normal_id, packet_id


@pytest.mark.parametrize("value, expected", [
    ("1700000000.123", "1700000000.123"),
    (" 1700000000.5 ", "1700000000.5"),
    (1700000000, "1700000000"),
    (Decimal("1700000000.25"), "1700000000.25"),
    ("1700000000." + "5" * 100, "1700000000.5555556"),  # a finite number, too long: repr
    ("1.79769313486231570000000000000000000e308", "1.7976931348623157e+308"),
    ("\u0661\u0667\u0660\u0660", "1700.0"), ("1_700_000_000", "1700000000.0"), ("+5", "5.0"),
    ("1e-400", "1e-400"), ("-1700000000", "-1700000000"),
    ("1.e5", "100000.0"), ("1700000000.e0", "1700000000.0"),   # float() reads them; JSON does not
    ("1" + "0" * 20000, None),                          # inf
    ("inf", None), ("nan", None), ("-Infinity", None),
    ("yesterday", None), ("", None), (None, None), (True, None),
])
def test_created_text(value, expected):
    assert created_text(value) == expected


def test_copied_header():
    assert copied_header("application/json") == "application/json"
    assert copied_header(None, "application/json") == "application/json"
    assert copied_header("x" * MAX_COPIED_HEADER) == "x" * MAX_COPIED_HEADER
    assert copied_header("x" * (MAX_COPIED_HEADER + 1), "application/json") == "application/json"
    assert copied_header("x" * (MAX_COPIED_HEADER + 1)) is None


def test_ids_read_from_bytes_that_were_no_utf8_stay_apart():
    """stomp.py decodes header bytes that are no UTF-8 with errors="replace": ``caf\\xe9`` and
    ``caf\\xe8`` both read ``caf\\ufffd``. Two packets with such ids must not be one (the second
    was dropped as a duplicate); the same message sent again still is the same packet."""
    first = packet_id({"golconde-id": "caf\ufffd"}, b'{"action": "add", "data": {"id": 51}}')
    second = packet_id({"golconde-id": "caf\ufffd"}, b'{"action": "add", "data": {"id": 52}}')
    assert first != second and first.startswith("id-sha256:") and second.startswith("id-sha256:")
    assert first == packet_id({"golconde-id": "caf\ufffd"}, b'{"action": "add", "data": {"id": 51}}')
    assert normal_id(first) == first           # as a dead letter's golconde-id, replayed
    assert packet_id({"golconde-id": "café"}, b"{}") == "café"
    assert packet_id({}, b"{}").startswith("sha256:")


@pytest.mark.parametrize("value", ["1 ", " 1", "5.", "1e", "1_0", "0x10", "1e5", "12", "1.e5", "1.E-3"])
def test_created_text_fast_path_agrees_with_the_pattern(value):
    """The fast path for golconde's own stamps gives what the pattern and float() give."""
    text = value.strip()
    if broker_pattern().fullmatch(text):
        assert created_text(value) == text
    else:
        try:
            expected = repr(float(text))
        except ValueError:
            expected = None
        assert created_text(value) == expected


def broker_pattern():
    from golconde import broker
    return broker._PLAIN_NUMBER
