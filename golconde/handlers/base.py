"""The handler contract: what turns a packet into SQL on one relation.

Life cycle (after gmr/rejected's consumer hooks)::

    handler = HandlerClass(relation, settings, role=..., name=...)   # at start and reload (a
                                   # reload and a configuration check also build handlers they
                                   # never start: those get shutdown() at once)
    handler.setup(connection)      # after every (re)connect to the database
    handler.apply_batch(cursor, packets)   # fast path: the new packets of a delivery batch
    handler.apply(cursor, packet)  # per packet (careful path, group members), inside the
                                   # listener's open transaction, in a savepoint
    handler.on_schema_error()      # the relation changed under us: drop cached schema
    handler.shutdown()             # once, when the listener stops

A handler is named in the configuration by ``function_name: package.module.Class`` (``handler:`` is
an alias) and receives the destination's or target's ``settings:`` mapping; see
:mod:`golconde.handlers.examples` for a complete one that writes a legacy schema.

The listener owns the transaction: a handler never commits, rolls back, acks or sends (it may run
any number of statements, on any relation of its database, through the cursor it is given; they
commit or roll back with the packet). On the fast path the connection is in autocommit mode
inside the listener's explicit ``BEGIN`` (:func:`golconde.apply.explicit_transaction`): there
``connection.commit()`` and ``rollback()`` do nothing, and a named (server-side) cursor cannot be
opened, which sends every batch to the careful path. What a handler raises decides the packet's
fate:

* :class:`~golconde.errors.PacketError` (or a permanent database error): dead-letter it, with
  ``str(exc)`` as the ``golconde-reason`` header;
* :class:`~golconde.errors.RetryPacket` (or a transient database error): retry with backoff,
  ``max_retries`` times, then dead-letter it;
* :class:`~golconde.errors.StopListener`: stop this listener only (its packets stay in the queue);
  with ``retry_after=<seconds>`` pause it and try again;
* any other exception (a bug in the handler): logged with its traceback and the packet
  dead-lettered with ``<ExceptionType>: <message>`` as reason; the listener goes on.

Nothing a handler does stops a running daemon: an exception from ``__init__`` is reported as a
configuration error naming the listener (golconded refuses to start, ``--check`` fails, a SIGHUP
reload is refused and the running configuration kept); an exception from ``setup`` is handled like
a database connection failure (the
connection is closed and everything retried with exponential backoff, the packets waiting in the
queue); an exception from ``on_schema_error`` or ``shutdown`` is logged.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

from ..errors import ConfigError
from ..packet import Packet


class Handler:
    """Base class of packet handlers (AutoSQL and custom ones, loaded by dotted path).

    :param relation: the relation from the configuration's ``target`` key, ``[schema.]table``.
    :param settings: the handler's ``settings`` sub-dict from the YAML (may be empty).
    :param role: ``"destination"`` (the canonical relation) or ``"target"``.
    :param name: the listener's name, for log lines (``Test1`` or ``Test1_target1``).
    :param mapping: a target's :class:`golconde.mapping.TargetMapping` (``columns``, ``exclude``,
        ``constants``, ``defaults``, ``filter``), or ``None``. Only passed when configured.
    :raises ConfigError: a mapping is configured but the class does not set
        :attr:`supports_mapping` (it would be silently ignored).
    """

    #: True if the handler applies :attr:`mapping` (AutoSQL does); a mapping configured for a
    #: handler without it is a configuration error.
    supports_mapping = False

    def __init__(self, relation: str, settings: Optional[Mapping[str, Any]] = None,
                 role: str = "target", name: str = "", mapping: Any = None) -> None:
        self.relation = relation
        self.settings = dict(settings or {})
        self.role = role
        self.name = name or relation
        self.connection: Any = None
        if mapping and not self.supports_mapping:
            raise ConfigError("%s: handler %s does not apply columns, exclude, constants, defaults"
                              " or filter; remove them or use AutoSQL"
                              % (self.name, type(self).__name__))
        self.mapping = mapping

    def setup(self, connection: Any) -> None:
        """Called with a fresh psycopg2 connection after each (re)connect, outside any packet's
        transaction (e.g. to check that the relations exist, or to prepare statements). Leave no
        transaction open (commit or roll back what you ran).

        :raises StopListener: e.g. a relation is missing: ``retry_after`` pauses the listener.
        :raises Exception: anything else: the connection is closed and set-up retried with backoff.
        """
        self.connection = connection

    def apply(self, cursor: Any, packet: Packet) -> Packet:
        """Apply one packet with ``cursor`` inside the open transaction.

        :returns: the packet to fan out (e.g. with keys generated by the database written into
            ``data``); return ``packet`` unchanged when nothing was added (``None`` means the
            same; at a destination, anything else that is no Packet dead-letters the packet; a
            target, which fans nothing out, does not use it). ``packet.data`` and
            ``packet.restriction`` hold column names as the sender wrote them (any case).
        :raises PacketError: the packet can never be applied.
        :raises RetryPacket: try again later.
        """
        raise NotImplementedError

    def apply_batch(self, cursor: Any, packets: Sequence[Packet]) -> List[Packet]:
        """Apply several packets, in order, with ``cursor`` inside the open transaction.

        Called on the fast path with every new packet of a delivery batch (members of groups
        included, in order); override it to apply many rows with fewer statements. It must have the
        same effect as calling :meth:`apply` for each packet in turn: if it raises, the transaction
        is rolled back and the batch is applied again packet by packet with :meth:`apply`, each in
        its own savepoint, to find and dead-letter the packet at fault.

        :returns: one packet per packet given, in order (as :meth:`apply` returns).
        :raises: as :meth:`apply`.
        """
        return [self.apply(cursor, packet) for packet in packets]

    def missing_privileges(self, cursor: Any, packet: Packet) -> List[str]:
        """Called after ``packet`` failed with SQLSTATE 42501 (insufficient privilege): the
        privileges the current role lacks on this handler's relations for that packet's action,
        held on nothing at all, e.g. ``["INSERT on public.items"]``, so that every packet would
        fail the same way and the listener pauses instead of dead-lettering them; ``[]`` (the
        default, for a handler that cannot tell) when the refusal may be this packet's own (a
        row-level security policy), which is then dead-lettered."""
        return []

    def explain_error(self, cursor: Any, packet: Packet, error: BaseException) -> Optional[str]:
        """Called after ``packet`` failed with ``error`` and is to be dead-lettered: which of its
        values is at fault, e.g. ``"data.amount"`` or ``"restriction.id"``, named in the dead
        letter's reason before the database's error, which often does not say (``smallint out of
        range``). ``cursor`` is inside the failed packet's rolled-back savepoint and may run
        read-only statements in savepoints of its own. ``None`` (the default): cannot tell."""
        return None

    def on_schema_error(self) -> None:
        """The database reported that the relation changed (SQLSTATE 42703, 42P01...): forget any
        cached schema so that the retried packet reads the catalog again."""

    def schema_changed(self, cursor: Any) -> bool:
        """Called after a packet failed with a data error (SQLSTATE class 22, or a value the
        cached type refuses) that is to be dead-lettered: whether the relation's schema changed
        since the handler cached it (then the packet is tried once more, after
        :meth:`on_schema_error`). ``cursor`` is inside the failed packet's rolled-back
        savepoint; a cheap catalog query at most. ``False`` (the default): no cache, or cannot tell."""
        return False

    def shutdown(self) -> None:
        """Called once when the listener stops, or when it is never started (a handler built
        to check a configuration or a reload's)."""
