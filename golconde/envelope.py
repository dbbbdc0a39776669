"""Batch messages: many packets in one broker message, on Golconde's internal hops and from the
Python client (:class:`golconde.client.Client` packs the packets of one ``send_many`` or ``batch``).

Per-message costs (a SEND, a RECEIPT, a delivery, an ack) dominate at high rates (broker-facts.md:
~14,000 persistent publishes/s per thread), so a destination sends the packets of one batch to each
target as a few *batch messages* instead of one message per packet. Format (JSON, UTF-8)::

    {"batch": [{"id": "<golconde-id>", "created": "<epoch seconds>", "packet": <packet or group>},
               ...]}

with the header ``golconde-batch: <number of entries>``. Each entry keeps its own packet id, so the
ledger de-duplicates per packet and a dead-lettered entry goes to the dead-letter queue alone (as
a plain packet message with its own ``golconde-id``) and, when the batch message has a
``reply-to`` header, gets an outcome of its own. Plain packet messages are accepted everywhere
(other clients, a single packet from the Python client, dead-letter replays).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

from .broker import created_text
from .errors import PacketError
from .ledger import normal_id
from .packet import MAX_PACKET_BYTES, dumps, loads

#: Header marking a batch message; its value is the number of entries.
BATCH_HEADER = "golconde-batch"
#: Most entries in one batch message.
MAX_ENTRIES = 500
#: Most body bytes in one batch message (brokers' default frame limit is 4 MiB).
MAX_BYTES = 1024 * 1024
#: What a batch message may hold beyond its packets' own limit: a packet of up to
#: :data:`golconde.packet.MAX_PACKET_BYTES` travels alone, wrapped in the envelope (its id, its
#: time, about 110 bytes), and must not be refused for the wrapping.
ENVELOPE_ALLOWANCE = 64 * 1024


def encode(entries: Sequence[Tuple[str, str, str]]) -> Iterator[Tuple[str, int]]:
    """Pack ``[(packet_id, packet_json_text, created), ...]`` into batch message bodies.

    ``packet_json_text`` must be valid JSON (it is embedded as is, not re-encoded).
    :returns: an iterator of ``(body, number_of_entries)``, each body within :data:`MAX_ENTRIES`
        and :data:`MAX_BYTES` bytes of UTF-8 (a single larger packet gets a message of its own).
    """
    parts: List[str] = []
    size = 0
    for pid, text, created in entries:
        part = '{"id":%s,"created":%s,"packet":%s}' % (dumps(str(pid)), dumps(str(created)), text)
        # bytes of UTF-8, as sent (str.isascii is a flag test in CPython: no copy for ASCII)
        length = len(part) if part.isascii() else len(part.encode("utf-8", "surrogatepass"))
        if parts and (len(parts) >= MAX_ENTRIES or size + length > MAX_BYTES):
            yield '{"batch":[' + ",".join(parts) + "]}", len(parts)
            parts, size = [], 0
        parts.append(part)
        size += length + 1
    if parts:
        yield '{"batch":[' + ",".join(parts) + "]}", len(parts)


def with_created(entries: Sequence[Tuple[str, str, str]]) -> List[Tuple[str, int, str]]:
    """:func:`encode` of ``entries``, as ``(body, count, created)`` for each message: ``created``
    is that of the message's first entry, which goes in its ``golconde-created-at`` header, so
    that a receiver knows how old a batch message is without decoding it."""
    result, start = [], 0
    for body, count in encode(entries):
        result.append((body, count, str(entries[start][2])))
        start += count
    return result


def decode(body: bytes, count: Optional[str] = None) -> List[Tuple[str, Mapping[str, Any], str]]:
    """Unpack a batch message body into ``[(packet_id, packet_object, created), ...]``; each
    id as the ledger records it (:func:`golconde.ledger.normal_id`), each ``created`` as
    :func:`golconde.broker.created_text` gives it (``""`` when it is no number).

    :param count: the message's ``golconde-batch`` header, if it must be checked: the number of
        entries (receivers bound what they hold and apply by it, before decoding).
    :raises PacketError: the body is not a well-formed batch message, holds more than
        :data:`MAX_ENTRIES` entries, or not as many as ``count`` says.
    """
    document = loads(body, max_bytes=MAX_PACKET_BYTES + ENVELOPE_ALLOWANCE)
    if not isinstance(document, dict) or not isinstance(document.get("batch"), list):
        raise PacketError("batch message must be an object with a 'batch' array")
    held = len(document["batch"])
    if held > MAX_ENTRIES:
        raise PacketError("batch message holds %d entries, more than %d" % (held, MAX_ENTRIES))
    if count is not None and count.strip() != str(held):
        raise PacketError("batch message holds %d entries, but its %s header says %r"
                          % (held, BATCH_HEADER, count[:40]))
    entries = []
    for index, entry in enumerate(document["batch"]):
        if (not isinstance(entry, dict) or not isinstance(entry.get("id"), str)
                or not isinstance(entry.get("packet"), dict)):
            raise PacketError("batch message entry %d must be {id: string, packet: object}" % index)
        if not entry["id"]:
            raise PacketError("batch message entry %d has an empty id" % index)
        entries.append((normal_id(entry["id"]), entry["packet"], created_text(entry.get("created")) or ""))
    return entries


class Malformed(bytes):
    """The body of a batch message that :func:`decode` refused, with why (``reason``): applied as
    one item, it is dead-lettered whole with that reason."""

    reason = ""

    @classmethod
    def of(cls, body: bytes, reason: str) -> "Malformed":
        item = cls(body)
        item.reason = reason
        return item
