"""Packets: the JSON documents Golconde distributes.

Format (compatible with Golconde 0.6, 2009)::

    {"action": "add" | "set" | "update" | "delete",
     "data": {"<column>": <value>, ...},          # add, set, update
     "restriction": {"<column>": <value>, ...}}   # update, delete

Top-level keys and action names are case-insensitive (the 2009 slides wrote ``"ACTION": "ADD"``).
Column names keep their case here; the handler resolves them against the relation.

A *group* is one message carrying several packets to apply atomically (all or none, one ledger id,
fanned out as one message)::

    {"group": [<packet>, <packet>, ...]}          # at least one packet; groups do not nest

:func:`parse` reads one packet (a group is refused); :func:`parse_message` reads either.

Values are JSON values. Numbers with a fraction or exponent are parsed as :class:`decimal.Decimal`
so that ``numeric`` values survive a round trip exactly; how each PostgreSQL type is written in a
packet is documented in the README ("Values").

This module knows nothing of STOMP or of databases.
"""
from __future__ import annotations

import collections.abc
import enum
import sys
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import simplejson

from .errors import PacketError

#: Largest packet accepted, in bytes (RabbitMQ's default STOMP frame limit is 4 MiB).
MAX_PACKET_BYTES = 4 * 1024 * 1024
#: Deepest nesting of JSON arrays/objects accepted inside a packet.
MAX_DEPTH = 64


#: isinstance() against typing.Mapping is several times slower than against the abc
_MAPPING = collections.abc.Mapping


class Action(str, enum.Enum):
    """The four packet actions. ``ADD`` = INSERT, ``SET`` = upsert (INSERT ... ON CONFLICT DO
    UPDATE), ``UPDATE`` = UPDATE data WHERE restriction, ``DELETE`` = DELETE WHERE restriction."""

    ADD = "add"
    SET = "set"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True)
class Packet:
    """One change to distribute.

    :ivar action: the :class:`Action`.
    :ivar data: column name -> value (empty for DELETE).
    :ivar restriction: column name -> value that selects the rows (empty for ADD and SET).
    """

    action: Action
    data: Mapping[str, Any] = field(default_factory=dict)
    restriction: Mapping[str, Any] = field(default_factory=dict)
    #: False for what a destination applied without changing a row (an ``update`` or
    #: ``delete`` whose restriction matched none, an ``add`` or ``set`` a trigger refused): not
    #: fanned out (the targets must hold what the canonical relation holds; a target's filter
    #: would turn an update into an upsert of a row the canonical relation does not hold). Not
    #: part of the JSON.
    matched: bool = field(default=True, compare=False)

    def with_data(self, data: Mapping[str, Any]) -> "Packet":
        """Return a copy of this packet with ``data`` replaced (e.g. keys back-filled by ADD)."""
        return replace(self, data=dict(data))

    def unmatched(self) -> "Packet":
        """A copy marked as having changed no row (:attr:`matched` False)."""
        return replace(self, matched=False)

    @staticmethod
    def changed_no_row(result: Any) -> bool:
        """Whether ``result``, what a handler returned for a packet (a :class:`Packet`, ``None``
        or anything else), is a packet marked :meth:`unmatched`."""
        return isinstance(result, Packet) and not result.matched

    def as_dict(self) -> Dict[str, Any]:
        """The packet as a plain dict in the canonical lower-case form."""
        return self._as_dict(copy=True)

    def to_json(self) -> str:
        """Encode as JSON text (``Decimal`` written as exact JSON numbers), as :meth:`as_dict`."""
        return dumps(self._as_dict(copy=False))

    def _as_dict(self, copy: bool) -> Dict[str, Any]:
        # without copy, plain dicts are shared (to be encoded at once, not kept)
        out: Dict[str, Any] = {"action": self.action.value}
        if self.data or self.action is not Action.DELETE:
            out["data"] = self.data if not copy and type(self.data) is dict else dict(self.data)
        if self.restriction:
            out["restriction"] = (self.restriction if not copy and type(self.restriction) is dict
                                  else dict(self.restriction))
        return out


@dataclass(frozen=True)
class Group:
    """Packets applied as one unit: all of them in one transaction (or savepoint), or none.

    :ivar packets: the member packets, in order (at least one).
    """

    packets: Tuple[Packet, ...]

    def as_dict(self) -> Dict[str, Any]:
        """``{"group": [<packet dict>, ...]}``."""
        return {"group": [packet.as_dict() for packet in self.packets]}

    def to_json(self) -> str:
        """Encode as JSON text, like :meth:`Packet.to_json` (members' dicts not copied)."""
        return dumps({"group": [packet._as_dict(copy=False) for packet in self.packets]})


#: simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")) builds an
#: encoder per call; one built once encodes the same (NaN and Infinity refused: allow_nan=False).
_ENCODER = simplejson.JSONEncoder(use_decimal=True, ensure_ascii=False, separators=(",", ":"),
                                  allow_nan=False)


#: The same, writing every non-ASCII character as an escape (:func:`dumps_bytes`).
_ASCII_ENCODER = simplejson.JSONEncoder(use_decimal=True, ensure_ascii=True, separators=(",", ":"),
                                        allow_nan=False)


def dumps_bytes(obj: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes; when ``obj`` holds a lone UTF-16 surrogate (``"\\ud800"`` in
    the JSON received, which UTF-8 cannot encode), every non-ASCII character is written as a
    ``\\uXXXX`` escape instead (RFC 8259 section 7), so that the packet is still sent as it was
    received (to a dead-letter queue, say).

    :raises ValueError: NaN or an infinite float. :raises TypeError: a value JSON cannot hold.
    """
    text = _ENCODER.encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII_ENCODER.encode(obj).encode("ascii")


def fanout_text(item: Union[Packet, "Group"]) -> str:
    """The JSON text a destination fans out for what it applied: the packet, or the group of
    its members that changed a row; ``""`` when nothing did (:attr:`Packet.matched`)."""
    if isinstance(item, Group):
        members = [packet for packet in item.packets if packet.matched]
        if not members:
            return ""
        return item.to_json() if len(members) == len(item.packets) else Group(tuple(members)).to_json()
    return item.to_json() if item.matched else ""


def dumps(obj: Any) -> str:
    """JSON-encode ``obj``; :class:`~decimal.Decimal` values are written as exact numbers.

    :raises ValueError: NaN or an infinite float (no JSON for them).
    :raises TypeError: a value JSON cannot hold.
    """
    return _ENCODER.encode(obj)


def _reject_constant(name: str) -> Any:
    raise PacketError("packet contains %s, which is not valid JSON" % name)


#: One decoder for every packet (simplejson.loads with options builds one per call): numbers with
#: a fraction or an exponent as Decimal, NaN and Infinity refused.
_DECODER = simplejson.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


def _wide_int(text: str) -> Any:
    """An integer as ``int``, or as ``Decimal`` past Python's limit on the digits of an int read
    from text (``sys.get_int_max_str_digits()``, 4300 by default since 3.11; 0: no limit), which
    PostgreSQL's numeric is not held to (131072 digits before the point)."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    return Decimal(text) if limit and len(text.lstrip("-")) > limit else int(text)


#: The decoder for a packet :data:`_DECODER` refused: integers of any length (:func:`_wide_int`;
#: a Python call per integer, so not the decoder of every packet).
_WIDE_DECODER = simplejson.JSONDecoder(parse_float=Decimal, parse_int=_wide_int,
                                       parse_constant=_reject_constant)


def _check_value(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise PacketError("%s is nested deeper than %d levels" % (where, MAX_DEPTH))
    if isinstance(value, str):
        if "\x00" in value:
            raise PacketError("%s contains a NUL character, which PostgreSQL text cannot hold" % where)
    elif isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise PacketError("%s has a key containing a NUL character" % where)
            _check_value(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_value(item, where, depth + 1)


#: A packet's keys (lower case; parse() folds others).
_KEYS = frozenset(("action", "data", "restriction"))
#: Action names as written in packets -> Action (parse() folds others).
_ACTIONS = {action.value: action for action in Action}

#: Values that need no check (a str needs the NUL check, a list or dict a walk).
_SCALARS = (int, float, Decimal, bool, type(None))


def _columns(value: Any, name: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PacketError("%s must be a JSON object of column: value, not %s" % (name, json_type(value)))
    for key, item in value.items():
        if not isinstance(key, str):
            raise PacketError("%s has a column name that is not a string: %s" % (name, _short_repr(key)))
        if not key.strip():
            raise PacketError("%s has an empty column name" % name)
        if "\x00" in key:
            raise PacketError("%s has a column name containing a NUL character" % name)
        kind = type(item)
        if kind is str:
            if "\x00" in item:
                _check_value(item, "%s.%s" % (name, key))     # raises, naming the column
        elif kind not in _SCALARS:
            _check_value(item, "%s.%s" % (name, key))
    return value


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def json_type(value: Any) -> str:
    """What JSON value ``value`` (as decoded) is, for error messages: ``"a number"``, ``"null"``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, Decimal)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def utf8_size_over(text: str, max_bytes: int) -> Optional[int]:
    """The size of ``text`` in bytes of UTF-8 (as the broker carries it) when it is over
    ``max_bytes``, else None; encoded only when it may be (up to 4 bytes a character)."""
    if len(text) <= max_bytes // 4:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > max_bytes else None


def loads(body: Union[bytes, str], max_bytes: int = MAX_PACKET_BYTES) -> Any:
    """Decode JSON text or UTF-8 bytes, numbers with a fraction as ``Decimal``.

    :param max_bytes: the longest body accepted (a batch message's envelope around one packet
        of :data:`MAX_PACKET_BYTES` takes a little more: :mod:`golconde.envelope`).
    :raises PacketError: invalid UTF-8, invalid JSON, NaN/Infinity, too deep or too large.
    """
    if not isinstance(body, (bytes, bytearray, memoryview, str)):
        raise PacketError("packet must be JSON text, UTF-8 bytes or a JSON object, not %s"
                          % type(body).__name__)
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if len(body) > max_bytes:
            raise PacketError("packet is %d bytes, more than the %d allowed" % (len(body), max_bytes))
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PacketError("packet is not valid UTF-8: %s" % exc) from None
    else:
        size = utf8_size_over(body, max_bytes)
        if size is not None:
            raise PacketError("packet is %d bytes of UTF-8, more than the %d allowed" % (size, max_bytes))
    try:
        try:
            return _DECODER.decode(body)
        except ValueError:
            # an integer over Python's digit limit, or invalid JSON (then refused again here)
            return _WIDE_DECODER.decode(body)
    except PacketError:
        raise
    except RecursionError:
        raise PacketError("packet JSON is nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise PacketError("packet is not valid JSON: %s" % exc) from None


def parse(body: Union[bytes, str, Mapping[str, Any]]) -> Packet:
    """Parse and validate one packet.

    :param body: the message body (UTF-8 bytes or text), or an already decoded JSON object.
    :returns: a :class:`Packet`.
    :raises PacketError: with a message naming what is wrong (malformed JSON, not an object,
        unknown or missing action, unknown top-level key, ``data``/``restriction`` not objects,
        empty ``data`` for add/set/update, empty ``restriction`` for update/delete, NUL characters).
    """
    document = body if isinstance(body, _MAPPING) else loads(body)
    if not isinstance(document, dict):
        raise PacketError("packet must be a JSON object, not %s" % json_type(document))
    fields: Mapping[str, Any]
    if document.keys() <= _KEYS:     # the usual lower-case keys: nothing to fold
        fields = document
    else:
        fields = {}
        for key, value in document.items():
            lowered = key.lower() if isinstance(key, str) else key
            if lowered not in _KEYS:
                raise PacketError("unknown packet key %r (expected action, data, restriction)" % (key,))
            if lowered in fields:
                raise PacketError("packet key %r given twice (keys are case-insensitive)" % (key,))
            fields[lowered] = value
    raw_action: Optional[Any] = fields.get("action")
    if raw_action is None:
        raise PacketError("packet has no action (expected one of add, set, update, delete)")
    if not isinstance(raw_action, str):
        raise PacketError("packet action must be a string, not %s" % json_type(raw_action))
    action = _ACTIONS.get(raw_action)
    if action is None:
        try:
            action = Action(raw_action.strip().lower())
        except ValueError:
            raise PacketError("unknown action %r (expected one of add, set, update, delete)"
                              % raw_action[:100]) from None
    data = _columns(fields.get("data"), "data")
    restriction = _columns(fields.get("restriction"), "restriction")
    if action in (Action.ADD, Action.SET, Action.UPDATE) and not data:
        raise PacketError("%s packet needs a non-empty data object" % action.value)
    if action in (Action.UPDATE, Action.DELETE) and not restriction:
        raise PacketError("%s packet needs a non-empty restriction (refusing to touch every row)"
                          % action.value)
    if action is Action.DELETE and data:
        raise PacketError("delete packet takes a restriction, not data")
    if action in (Action.ADD, Action.SET) and restriction:
        raise PacketError("%s packet takes data, not a restriction" % action.value)
    return Packet(action, dict(data), dict(restriction))


def parse_message(body: Union[bytes, str, Mapping[str, Any]]) -> Union[Packet, Group]:
    """Parse a message body: one packet, or a group ``{"group": [packet, ...]}`` (key
    case-insensitive).

    :returns: a :class:`Packet` or a :class:`Group`.
    :raises PacketError: everything :func:`parse` raises; for a group also: ``group`` not an array,
        an empty group, a key beside ``group``, a member that is not a valid packet or is itself a
        group; a member's problem is prefixed with ``group member <i> (0-based, of <n>):``.
    """
    document = body if isinstance(body, _MAPPING) else loads(body)
    if not isinstance(document, dict):
        raise PacketError("packet must be a JSON object, not %s" % json_type(document))
    keys = [key.lower() if isinstance(key, str) else key for key in document]
    if "group" not in keys:
        return parse(document)
    if len(keys) != 1:
        raise PacketError("a group message has the single key 'group', not %s"
                          % ", ".join(repr(key) for key in document))
    members = next(iter(document.values()))
    if not isinstance(members, list):
        raise PacketError("group must be a JSON array of packets, not %s" % json_type(members))
    if not members:
        raise PacketError("group is empty (expected at least one packet)")
    packets = []
    for index, member in enumerate(members):
        where = "group member %d (0-based, of %d)" % (index, len(members))
        if isinstance(member, dict) and any(isinstance(key, str) and key.lower() == "group"
                                            for key in member):
            raise PacketError("%s: groups do not nest" % where)
        try:
            packets.append(parse(member if isinstance(member, dict) else _not_object(member)))
        except PacketError as exc:
            raise PacketError("%s: %s" % (where, exc)) from None
    return Group(tuple(packets))


def _not_object(value: Any) -> Any:
    raise PacketError("packet must be a JSON object, not %s" % json_type(value))
