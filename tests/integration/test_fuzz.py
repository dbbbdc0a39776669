"""Fuzzed packets through a real daemon: every bad packet is dead-lettered, every good one applied.

Hypothesis builds the packets (``derandomize=True``: the same packets on every run, varied across
categories): malformed JSON, wrong JSON types at the top level and per key, unknown or missing
action, unknown top-level keys, empty data or restriction, unknown columns (names full of quotes,
semicolons and ``$$``), values of the wrong type for their column (text full of the same),
constraint violations, 2000-digit numbers, 1 MB strings into a ``varchar(10)``, JSON nested
thousands deep, invalid UTF-8, NUL characters, malformed groups. They are sent, interleaved with
good packets (``add``/``set`` of new rows whose text is just as hostile), to an in-process
:class:`~golconde.daemon.Daemon` with a canonical database and two targets.

Asserted: the dead-letter queue holds exactly the bad packets, byte for byte, each with a
``golconde-reason``; every good packet is applied at the canonical relation and at both targets
with exactly the values sent; no bad packet left a trace (a row with an id only bad packets use, or
a change to the rows they aim at); every listener thread is alive, never reconnected, and its
counters add up.

``GOLCONDE_FUZZ_PACKETS`` sets the number of bad packets (default 10,000; one good packet is sent
per ten bad ones). The 1 MB packets are a fixed few (one per 2,000 bad packets, at least 3).
"""
from __future__ import annotations

import collections
import hashlib
import os
import re
import queue as queue_module
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

import simplejson
from psycopg2 import sql
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from golconde.broker import BrokerConnection, Delivery
from golconde.compare import compare
from golconde.daemon import Daemon

from ..conftest import RABBITMQ
from .flow_support import execute, make_config, parse_config, query

BAD_PACKETS = int(os.environ.get("GOLCONDE_FUZZ_PACKETS", "10000"))
GOOD_PACKETS = max(10, BAD_PACKETS // 10)
HUGE_PACKETS = max(3, BAD_PACKETS // 2000)
#: Seconds allowed for the daemon to go through everything (about 4 ms per packet, at least 60 s).
DEADLINE = max(60.0, 0.012 * (BAD_PACKETS + GOOD_PACKETS) + 2.0 * HUGE_PACKETS)

TABLE = "public.fuzz"
FUZZ_TABLE = """
CREATE TABLE public.fuzz (
    id      integer PRIMARY KEY,
    code    varchar(10),
    n       integer CHECK (n >= 0),
    amount  numeric(10, 2),
    flag    boolean,
    doc     jsonb,
    ts      timestamptz,
    tags    text[],
    note    text
);
INSERT INTO public.fuzz (id, n, note) SELECT g, -g, 'pre-existing ' || g FROM generate_series(-10, -1) g;
"""
COLUMNS = ("id", "code", "n", "amount", "flag", "doc", "ts", "tags", "note")
ACTIONS = ("add", "set", "update", "delete")
#: Ids of the rows present before the run: bad packets aim at them; they must not change.
PRE_IDS = st.integers(-10, -1)
#: Ids bad packets insert: any such row after the run is a bad packet that was applied.
BAD_IDS = st.integers(10 ** 6, 2 ** 31 - 1)

# -- building blocks ------------------------------------------------------------------------------

NASTY = ["'", '"', ";", "$$", "$tag$", "--", "/*", "*/", "\\", "%", "%s", "%(id)s", "{}", "E'",
         "\n", "');", "'; DROP TABLE fuzz; --", "\" OR 1=1 --", "\u2028", "\U0001f600", "\t"]
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
nasty_text = st.lists(st.one_of(st.sampled_from(NASTY), st.text(CHARS, max_size=4)),
                      max_size=6).map("".join)
#: Text that no PostgreSQL integer, numeric, boolean or array input accepts.
not_a_value = nasty_text.map(lambda text: "x" + text)
unknown_column = nasty_text.filter(lambda k: k.strip() != "" and k.lower() not in COLUMNS)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), nasty_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(nasty_text, inner, max_size=3)), max_leaves=6)
not_an_object = st.one_of(st.booleans(), st.integers(), nasty_text, st.lists(json_scalars, max_size=3))
big_number = st.integers(1, 9).map(lambda digit: str(digit) * 2000)


def dumps(document: Any, ascii_only: bool = False) -> str:
    return simplejson.dumps(document, use_decimal=True, ensure_ascii=ascii_only)


def cased(word: str, upper: bool) -> str:
    return word.upper() if upper else word


@st.composite
def packet(draw, action: Optional[str] = None, data: Any = None, restriction: Any = None) -> str:
    """JSON text of a packet; top-level keys and the action sometimes upper-case (valid)."""
    upper = draw(st.booleans())
    doc: Dict[str, Any] = {cased("action", upper): cased(action or draw(st.sampled_from(ACTIONS)), upper)}
    if data is not None:
        doc[cased("data", upper)] = data
    if restriction is not None:
        doc[cased("restriction", upper)] = restriction
    return dumps(doc, ascii_only=draw(st.booleans()))


# -- good packets ---------------------------------------------------------------------------------

GOOD_VALUES = {
    "code": st.text(CHARS, max_size=10),
    "n": st.integers(0, 2 ** 31 - 1),
    "amount": st.decimals(min_value=-99999999, max_value=99999999, places=2),
    "flag": st.booleans(),
    "doc": json_values,
    "ts": st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1),
                       timezones=st.just(timezone.utc)),
    "tags": st.lists(st.one_of(st.none(), nasty_text), max_size=4),
    "note": nasty_text,
}
good_packets = st.tuples(st.sampled_from(("add", "set")),
                         st.fixed_dictionaries({}, optional=GOOD_VALUES), st.booleans())


def good_body(ident: int, action: str, values: Dict[str, Any], upper: bool) -> bytes:
    """A good packet for row ``ident`` (column keys upper-case when ``upper``: also valid)."""
    data: Dict[str, Any] = {cased("id", upper): ident}
    for key, value in values.items():
        data[cased(key, upper)] = value.isoformat() if isinstance(value, datetime) else value
    doc = {cased("action", upper): cased(action, upper), cased("data", upper): data}
    return dumps(doc, ascii_only=upper).encode("utf-8")


# -- bad packets: each strategy gives (category, body) and every body must be dead-lettered --------

def bad(category: str, strategy: Any) -> Any:
    return strategy.map(lambda body: (category, body if isinstance(body, bytes) else body.encode("utf-8")))


@st.composite
def some_packet_text(draw) -> str:
    """A packet-looking JSON text (valid or not: the base of syntax damage)."""
    return draw(packet(data=draw(st.dictionaries(st.sampled_from(COLUMNS), json_scalars, max_size=3)),
                       restriction=draw(st.none() | st.dictionaries(st.sampled_from(COLUMNS),
                                                                     json_scalars, max_size=2))))


@st.composite
def malformed_json(draw) -> str:
    base = draw(some_packet_text())
    damage = draw(st.sampled_from(("prefix", "suffix", "quotes", "comma", "constant", "comment",
                                   "blank", "bare")))
    if damage == "prefix":                      # a proper prefix of an object is never complete
        return base[:draw(st.integers(0, len(base) - 1))]
    if damage == "suffix":
        return base + draw(st.sampled_from((",", "}", "]", "x", "{", '"', "[1", "'", ";")))
    if damage == "quotes":
        return base.replace('"', "'")
    if damage == "comma":
        return base[:-1] + ",}"
    if damage == "constant":
        return '{"action": "add", "data": {"id": %d, "%s": %s}}' % (
            draw(BAD_IDS), draw(st.sampled_from(("n", "amount", "doc"))),
            draw(st.sampled_from(("NaN", "Infinity", "-Infinity"))))
    if damage == "comment":
        return "/*%s*/%s" % (draw(nasty_text), base)
    if damage == "blank":
        return draw(st.sampled_from(("", " ", "\n", "\t \r\n")))
    return "{action: %s, data: {id: %d}}" % (draw(st.sampled_from(ACTIONS)), draw(BAD_IDS))


wrong_top_type = st.one_of(st.lists(json_values, max_size=3), json_scalars,
                           st.floats(allow_nan=False, allow_infinity=False)).map(dumps)


@st.composite
def wrong_key_type(draw) -> str:
    which = draw(st.sampled_from(("action", "data", "restriction")))
    if which == "action":
        upper = draw(st.booleans())
        return dumps({cased("action", upper): draw(st.one_of(st.integers(), st.booleans(),
                                                               st.lists(st.sampled_from(ACTIONS), max_size=2),
                                                               st.dictionaries(nasty_text, json_scalars, max_size=2))),
                      cased("data", upper): {"id": draw(BAD_IDS)}})
    if which == "data":
        return draw(packet(action=draw(st.sampled_from(("add", "set", "update"))), data=draw(not_an_object),
                           restriction={"id": draw(PRE_IDS)}))
    return draw(packet(action=draw(st.sampled_from(("update", "delete"))), data={"n": 1},
                       restriction=draw(not_an_object)))


@st.composite
def bad_action(draw) -> str:
    data = {"id": draw(BAD_IDS), "note": draw(nasty_text)}
    if draw(st.booleans()):                     # missing (or null) action
        doc: Dict[str, Any] = {"data": data}
        if draw(st.booleans()):
            doc["action"] = None
        return dumps(doc)
    action = draw(nasty_text.filter(lambda a: a.strip().lower() not in ACTIONS))
    return dumps({"action": action, "data": data, "restriction": {"id": draw(PRE_IDS)}})


@st.composite
def unknown_top_key(draw) -> str:
    doc: Dict[str, Any] = {"action": "add", "data": {"id": draw(BAD_IDS)}}
    if draw(st.booleans()):
        key = draw(nasty_text.filter(lambda k: k.lower() not in ("action", "data", "restriction", "group")))
        doc[key] = draw(json_values)
    else:                                       # the same key twice, in two cases
        doc[draw(st.sampled_from(("ACTION", "Action", "aCTION")))] = "add"
    return dumps(doc)


@st.composite
def empty_parts(draw) -> str:
    case = draw(st.sampled_from(("no restriction", "no data", "delete with data", "add with restriction")))
    empty = draw(st.sampled_from(({}, None, "absent")))
    if case in ("no restriction", "no data"):
        action = draw(st.sampled_from(("update", "delete") if case == "no restriction"
                                      else ("add", "set", "update")))
        doc: Dict[str, Any] = {"action": action}
        if action == "update":
            doc["data" if case == "no restriction" else "restriction"] = (
                {"n": 1} if case == "no restriction" else {"id": draw(PRE_IDS)})
        if empty != "absent":
            doc["restriction" if case == "no restriction" else "data"] = empty
        return dumps(doc)
    if case == "delete with data":
        return dumps({"action": "delete", "data": {"n": 1}, "restriction": {"id": draw(PRE_IDS)}})
    return dumps({"action": draw(st.sampled_from(("add", "set"))), "data": {"id": draw(BAD_IDS)},
                  "restriction": {"id": draw(PRE_IDS)}})


@st.composite
def deep_nesting(draw) -> str:
    depth = draw(st.integers(66, 5000))
    opener, closer = draw(st.sampled_from((("[", "]"), ('{"k":', "}"))))
    nested = opener * depth + ("1" if opener != "[" else "") + closer * depth
    if draw(st.booleans()):
        return nested                           # the whole body
    column = draw(st.sampled_from(("doc", "tags", "note")))
    return '{"action": "add", "data": {"id": %d, "%s": %s}}' % (draw(BAD_IDS), column, nested)


INVALID_UTF8 = (b"\xff", b"\xfe", b"\xc0\x80", b"\xc1\xbf", b"\x80", b"\xbf", b"\xed\xa0\x80",
                b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xf0\x9f\x98")


def _invalid_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@st.composite
def invalid_utf8(draw) -> bytes:
    base = draw(good_packets)
    body = good_body(draw(BAD_IDS), *base)
    where = draw(st.integers(0, len(body)))
    return body[:where] + draw(st.sampled_from(INVALID_UTF8)) + body[where:]


@st.composite
def nul_character(draw) -> str:
    text = draw(nasty_text)
    where = draw(st.integers(0, len(text)))
    nul = text[:where] + "\x00" + text[where:]
    if draw(st.booleans()):
        return dumps({"action": "add", "data": {"id": draw(BAD_IDS), "note": nul}})
    if draw(st.booleans()):
        return dumps({"action": "add", "data": {"id": draw(BAD_IDS), "doc": {"k": [nul]}}})
    return dumps({"action": "add", "data": {"id": draw(BAD_IDS), nul: 1}})


@st.composite
def unknown_columns(draw) -> str:
    name = draw(unknown_column)
    value = draw(json_values)
    where = draw(st.sampled_from(("add", "set", "update data", "update restriction", "delete")))
    if where in ("add", "set"):
        data = {"id": draw(BAD_IDS), name: value}
        if draw(st.booleans()):
            data["note"] = draw(nasty_text)
        return draw(packet(action=where, data=data))
    if where == "update data":
        return draw(packet(action="update", data={name: value}, restriction={"id": draw(PRE_IDS)}))
    restriction = {"id": draw(PRE_IDS), name: value}
    if where == "delete":
        return draw(packet(action="delete", restriction=restriction))
    return draw(packet(action="update", data={"n": 1}, restriction=restriction))


#: Values each column refuses, always (a cast error, or a JSON kind AutoSQL refuses).
WRONG_VALUES = {
    "id": st.one_of(not_a_value, st.integers(2 ** 31, 2 ** 63), st.lists(st.integers(), max_size=2),
                    st.dictionaries(nasty_text, json_scalars, max_size=2)),
    "code": st.one_of(st.lists(nasty_text, max_size=2), st.dictionaries(nasty_text, json_scalars, max_size=2)),
    "n": st.one_of(not_a_value, st.integers(2 ** 31, 2 ** 70), st.integers(-2 ** 70, -2 ** 31 - 1),
                   st.dictionaries(nasty_text, json_scalars, max_size=2)),
    "amount": st.one_of(not_a_value, st.integers(10 ** 8, 10 ** 40), st.lists(st.integers(), max_size=2)),
    "flag": st.one_of(not_a_value, st.lists(st.booleans(), max_size=2),
                      st.dictionaries(nasty_text, st.booleans(), max_size=2)),
    "ts": st.one_of(st.integers(), st.booleans(), st.lists(nasty_text, max_size=2)),
    "tags": st.one_of(not_a_value, st.integers(), st.booleans(),
                      st.dictionaries(nasty_text, json_scalars, max_size=2),
                      st.lists(st.dictionaries(nasty_text, json_scalars, min_size=1, max_size=1),
                               min_size=1, max_size=2)),
    "note": st.one_of(st.lists(nasty_text, max_size=2), st.dictionaries(nasty_text, json_scalars, max_size=2)),
}


#: In a restriction a number too big for numeric(10, 2) is no error (the comparison is made as
#: unbounded numeric, matching nothing): only assigning it fails.
WRONG_IN_RESTRICTION = dict(WRONG_VALUES, amount=st.one_of(not_a_value, st.lists(st.integers(), max_size=2)))


@st.composite
def wrong_value_type(draw) -> str:
    column = draw(st.sampled_from(sorted(WRONG_VALUES)))
    where = draw(st.sampled_from(("add", "update data", "restriction")))
    value = draw((WRONG_IN_RESTRICTION if where == "restriction" else WRONG_VALUES)[column])
    if where == "add" or column == "id" and where == "update data":
        data = {"id": draw(BAD_IDS)}
        data[column] = value
        return draw(packet(action="add", data=data))
    if where == "update data":
        return draw(packet(action="update", data={column: value}, restriction={"id": draw(PRE_IDS)}))
    action = draw(st.sampled_from(("update", "delete")))
    return draw(packet(action=action, data={"n": 1} if action == "update" else None,
                       restriction={column: value}))


@st.composite
def constraint_violation(draw) -> str:
    case = draw(st.sampled_from(("check", "duplicate key", "null key", "update check", "set no key")))
    if case == "check":
        return draw(packet(action=draw(st.sampled_from(("add", "set"))),
                           data={"id": draw(BAD_IDS), "n": draw(st.integers(-2 ** 31, -1))}))
    if case == "duplicate key":
        return draw(packet(action="add", data={"id": draw(PRE_IDS), "note": draw(nasty_text)}))
    if case == "null key":
        return draw(packet(action=draw(st.sampled_from(("add", "set"))), data={"id": None, "n": 1}))
    if case == "update check":
        return draw(packet(action="update", data={"n": draw(st.integers(-2 ** 31, -1))},
                           restriction={"id": draw(PRE_IDS)}))
    return draw(packet(action="set", data={"note": draw(nasty_text), "n": 1}))


@st.composite
def big_numbers(draw) -> str:
    """2000 digits (maybe with a fraction) for an integer, numeric(10, 2) or timestamptz column,
    in a new row or in an update of an existing one."""
    digits = draw(big_number) + draw(st.sampled_from(("", ".5", ".25")))
    column = draw(st.sampled_from(("id", "n", "amount", "ts")))
    if column == "id":
        return '{"action": "add", "data": {"id": %s}}' % digits
    if draw(st.booleans()):
        return '{"action": "add", "data": {"id": %d, "%s": %s}}' % (draw(BAD_IDS), column, digits)
    return '{"action": "update", "data": {"%s": %s}, "restriction": {"id": %d}}' % (
        column, digits, draw(PRE_IDS))


@st.composite
def bad_group(draw) -> str:
    case = draw(st.sampled_from(("empty", "not a list", "nested", "bad member", "extra key")))
    if case == "empty":
        return dumps({"group": []})
    if case == "not a list":
        return dumps({"group": draw(not_an_array)})
    if case == "nested":
        return dumps({"group": [{"group": [{"action": "add", "data": {"id": draw(BAD_IDS)}}]}]})
    if case == "extra key":
        return dumps({"group": [{"action": "add", "data": {"id": draw(BAD_IDS)}}], "action": "add"})
    # a good member first, then one the database refuses: the group is all or nothing
    return dumps({"group": [{"action": "add", "data": {"id": draw(BAD_IDS), "note": draw(nasty_text)}},
                            {"action": "add", "data": {"id": draw(BAD_IDS), "n": draw(not_a_value)}}]})


not_an_array = st.one_of(st.booleans(), st.integers(), nasty_text,
                         st.dictionaries(nasty_text, json_scalars, max_size=2))

bad_packets = st.one_of(
    bad("malformed JSON", malformed_json()),
    bad("wrong top-level type", wrong_top_type),
    bad("wrong key type", wrong_key_type()),
    bad("unknown or missing action", bad_action()),
    bad("unknown top-level key", unknown_top_key()),
    bad("empty data or restriction", empty_parts()),
    bad("deep nesting", deep_nesting()),
    bad("invalid UTF-8", invalid_utf8().filter(_invalid_utf8)),
    bad("NUL character", nul_character()),
    bad("unknown column", unknown_columns()),
    bad("wrong value type", wrong_value_type()),
    bad("constraint violation", constraint_violation()),
    bad("2000-digit number", big_numbers()),
    bad("bad group", bad_group()),
)


#: What each category's golconde-reason must say: a packet refused for another reason than the
#: one its category meant would show a hole in the generator (or in the checks it aims at).
REASONS = {
    "malformed JSON": r"not valid JSON",
    "wrong top-level type": r"^packet must be a JSON object, not",
    "wrong key type": r"must be a JSON object of column: value|action must be a string",
    "unknown or missing action": r"has no action|unknown action",
    "unknown top-level key": r"unknown packet key|given twice",
    "empty data or restriction": r"needs a non-empty|takes data, not a restriction|takes a restriction, not data",
    "deep nesting": r"nested|must be a JSON object, not an array|unknown packet key 'k'",
    "invalid UTF-8": r"^packet is not valid UTF-8",
    "NUL character": r"NUL character",
    "unknown column": r"names column .* that public\.fuzz does not have",
    "wrong value type": r"SQLSTATE (22P02|22003|42846)|accepted only for json|cannot hold a JSON "
                        r"object|expected a JSON array",
    "constraint violation": r"SQLSTATE (23514|23505|23502|22003)|needs a primary key or unique key",
    "2000-digit number": r"SQLSTATE (22003|42846)|expected an integer, not [0-9.]+\.\.\.[0-9.]+ \(2\d{3} characters\)",
    "bad group": r"group|SQLSTATE 22P02|unknown packet key",
    "1 MB string": r"SQLSTATE (22001|22P02)",
}


@st.composite
def huge_packets(draw) -> Tuple[str, bytes]:
    """A 1 MB string into varchar(10) (22001), or into an integer column (22P02)."""
    size = draw(st.integers(1_000_000, 1_050_000))
    fill = draw(st.sampled_from(("a", "'", "$", ";", "\u00e9")))
    column = draw(st.sampled_from(("code", "code", "n")))
    body = dumps({"action": "add", "data": {"id": draw(BAD_IDS), column: fill * size}})
    return "1 MB string", body.encode("utf-8")


def generate(strategy: Any, count: int) -> List[Any]:
    """``count`` examples of ``strategy``, the same on every run (derandomized Hypothesis)."""
    examples: List[Any] = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        examples.append(example)

    collect()
    assert examples, "hypothesis generated nothing"
    while len(examples) < count:               # a small strategy space: repeat (ids still differ)
        examples.extend(examples[:count - len(examples)])
    return examples[:count]


# -- the run --------------------------------------------------------------------------------------

Message = Tuple[str, Optional[str], bytes]     # (category or "good", golconde-id or None, body)


def build_messages() -> Tuple[List[Message], Dict[int, Dict[str, Any]]]:
    """Every message in sending order (one good packet after every ten bad ones, the 1 MB ones
    spread out), and the row each good packet must produce, by id."""
    bad = generate(bad_packets, BAD_PACKETS)
    huge = generate(huge_packets(), HUGE_PACKETS)
    good = generate(good_packets, GOOD_PACKETS)
    messages: List[Message] = []
    expected: Dict[int, Dict[str, Any]] = {}
    spacing = max(1, len(bad) // (len(huge) + 1))
    for index, (category, body) in enumerate(bad):
        # one bad packet in ten comes from a plain STOMP client: no golconde-id header
        messages.append((category, None if index % 10 == 9 else "bad-%d" % index, body))
        if index % spacing == spacing - 1 and huge:
            category, body = huge.pop()
            messages.append((category, "huge-%d" % index, body))
        if index % 10 == 9 and good:
            ident = len(expected) + 1
            action, values, upper = good.pop()
            expected[ident] = {column: values.get(column) for column in COLUMNS[1:]}
            messages.append(("good", "good-%d" % ident, good_body(ident, action, values, upper)))
    messages.extend((category, "huge-end-%d" % i, body) for i, (category, body) in enumerate(huge))
    for action, values, upper in good:
        ident = len(expected) + 1
        expected[ident] = {column: values.get(column) for column in COLUMNS[1:]}
        messages.append(("good", "good-%d" % ident, good_body(ident, action, values, upper)))
    return messages, expected


def send_all(queue: str, messages: List[Message]) -> None:
    """Send persistent, confirmed, in batches of at most 500 messages or ~8 MB."""
    connection = BrokerConnection(RABBITMQ.host, RABBITMQ.port, RABBITMQ.login, RABBITMQ.passcode,
                                  heartbeat_ms=0, name="fuzz-send")
    connection.connect()
    try:
        batch: List[Tuple[str, bytes, Dict[str, str]]] = []
        size = 0
        for _, pid, body in messages:
            batch.append((queue, body, {"golconde-id": pid} if pid else {}))
            size += len(body)
            if len(batch) >= 500 or size > 8_000_000:
                connection.send_confirmed(batch, timeout=120)
                batch, size = [], 0
        connection.send_confirmed(batch, timeout=120)
    finally:
        connection.close()


def collect_dead_letters(queue: str, expected: int, timeout: float) -> List[Delivery]:
    """Consume ``queue`` (acking), until ``expected`` messages came and then 2 s passed quietly,
    or ``timeout``."""
    inbox: "queue_module.Queue[Delivery]" = queue_module.Queue()
    connection = BrokerConnection(RABBITMQ.host, RABBITMQ.port, RABBITMQ.login, RABBITMQ.passcode,
                                  heartbeat_ms=0, name="fuzz-dlq", on_message=inbox.put)
    connection.connect()
    connection.subscribe(queue, 1000)
    received: List[Delivery] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                delivery = inbox.get(timeout=2.0)
            except queue_module.Empty:
                if len(received) >= expected:
                    break
                continue
            received.append(delivery)
            connection.ack(delivery)
    finally:
        connection.close()
    return received


def thread_stats(daemon: Daemon) -> Dict[str, Dict[str, Any]]:
    return {name: values for entry in daemon.registry.snapshot()["threads"]
            for name, values in entry.items()}


def rows(dsn: str, where: str) -> List[tuple]:
    """The fuzz table's rows where ``where``, a constant SQL condition of the test."""
    return query(dsn, sql.SQL("SELECT id, code, n, amount, flag, doc, ts, tags, note FROM fuzz"
                              " WHERE {} ORDER BY id").format(sql.SQL(where)))


def test_fuzzed_packets_are_dead_lettered_and_good_ones_applied(make_database):
    started = time.monotonic()
    messages, expected = build_messages()
    bad = [m for m in messages if m[0] != "good"]
    generated = time.monotonic()

    canonical, t1, t2 = make_database(), make_database(), make_database()
    for dsn in (canonical, t1, t2):
        execute(dsn, FUZZ_TABLE)
    before = rows(canonical, "id < 0")
    config = parse_config(make_config(canonical, {"t1": t1, "t2": t2}, TABLE))
    destination = config.destinations[0]
    names = [destination.name] + [target.thread_name for target in destination.targets]
    daemon = Daemon(config)
    daemon.start()
    try:
        send_all(destination.queue, messages)

        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            stats = thread_stats(daemon)
            dest = stats[destination.name]
            if (dest["applied"] + dest["dead_lettered"] >= len(messages)
                    and all(stats[name]["applied"] >= dest["applied"] for name in names[1:])
                    or not all(listener.is_alive() for listener in daemon.listeners.values())):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("not every packet was handled within %.0fs: %s" % (DEADLINE, {
                name: {key: stats[name][key] for key in ("received", "applied", "dead_lettered",
                                                         "reconnects", "last_error")}
                for name in names}))
        processed = time.monotonic()
        dead = collect_dead_letters(destination.dead_letter_queue, len(bad), timeout=120)
        time.sleep(1.0)                         # anything late would show in the counters below

        # no bad packet left a trace
        for dsn in (canonical, t1, t2):
            applied_bad = rows(dsn, "id >= 1000000")
            assert applied_bad == [], "bad packets applied: %s" % applied_bad[:5]
            assert rows(dsn, "id < 0") == before

        # the daemon never stopped, never reconnected, and its counters add up
        assert all(listener.is_alive() for listener in daemon.listeners.values())
        stats = thread_stats(daemon)
        total = len(messages)
        dest = stats[destination.name]
        assert (dest["received"], dest["applied"], dest["dead_lettered"], dest["errors"],
                dest["duplicates"], dest["retried"], dest["fanned_out"], dest["reconnects"]) == (
            total, len(expected), len(bad), len(bad), 0, 0, 2 * len(expected), 0), dest
        assert dest["add"] + dest["set"] == len(expected)
        assert dest["broker"] == "connected" and dest["database"] == "connected"
        for name in names[1:]:
            target = stats[name]
            assert (target["received"], target["applied"], target["dead_lettered"], target["errors"],
                    target["duplicates"], target["reconnects"]) == (
                len(expected), len(expected), 0, 0, 0, 0), (name, target)

        # the dead-letter queue holds exactly the bad packets, byte for byte, each with a reason
        assert len(dead) == len(bad), "dead letters: %d, bad packets: %d" % (len(dead), len(bad))
        assert collections.Counter(d.body for d in dead) == collections.Counter(m[2] for m in bad)
        by_id = {pid: (category, body) for category, pid, body in bad if pid}
        by_body = {body: category for category, _, body in bad}
        unexpected = []
        for delivery in dead:
            headers = delivery.headers
            assert headers["golconde-original-queue"] == destination.queue
            assert headers["golconde-consumer"] == destination.name
            pid = headers["golconde-id"]
            if pid.startswith("sha256:"):
                assert pid == "sha256:" + hashlib.sha256(delivery.body).hexdigest()
                category = by_body[delivery.body]
            else:
                category, body = by_id.pop(pid)
                assert body == delivery.body
            if not re.search(REASONS[category], headers["golconde-reason"]):
                unexpected.append((category, headers["golconde-reason"], delivery.body[:200]))
        assert not by_id, "bad packets with an id missing from the dead-letter queue: %s" % list(by_id)[:5]
        assert not unexpected, "dead-lettered for another reason than meant: %s" % unexpected[:10]

        # every good packet is applied everywhere with the values sent; no bad packet left a trace
        for dsn in (canonical, t1, t2):
            got = {row[0]: dict(zip(COLUMNS[1:], row[1:])) for row in rows(dsn, "id > 0")}
            assert sorted(got) == sorted(expected)
            for ident, values in expected.items():
                assert got[ident] == values, (ident, got[ident], values)
        for dsn in (t1, t2):
            assert compare(canonical, TABLE, dsn, TABLE).equal
    finally:
        assert daemon.stop(), "daemon did not stop in time"
    categories = collections.Counter(m[0] for m in bad)
    print("\nfuzz: %d bad packets (%s), %d good; generated in %.1fs, handled in %.1fs, total %.1fs"
          % (len(bad), ", ".join("%s %d" % item for item in sorted(categories.items())),
             len(expected), generated - started, processed - generated, time.monotonic() - started))
