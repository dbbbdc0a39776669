"""Example custom handler: one canonical table distributed to a *legacy* schema of two tables.

Canonical relation (the destination)::

    users (id integer PRIMARY KEY, name text, email text, status_id integer, created timestamptz)

Legacy target schema (what older applications still read)::

    legacy_user       (user_id integer PRIMARY KEY, user_name text)
    legacy_user_email (user_id integer PRIMARY KEY REFERENCES legacy_user, address text NOT NULL)

Configuration of the target::

    Targets:
      legacy:
        stomp: 127.0.0.1:61613
        queue: /queue/golconde.users.legacy
        pgsql: host=db2 dbname=legacy
        target: public.legacy_user                        # the user table
        function_name: golconde.handlers.examples.LegacyUsers
        settings:
          email_table: public.legacy_user_email           # default: legacy_user_email, same schema

What each action does (``status_id``, ``created`` and other columns are not part of the legacy
schema and are ignored):

=========  ==================================================================================
add        INSERT ``legacy_user (user_id, user_name)``, and ``legacy_user_email (user_id,
           address)`` when ``email`` is not null (an existing user is an error: dead-letter)
set        the same as upserts; an ``email`` of ``null`` deletes the email row
update     ``restriction`` must be ``{"id": ...}``; ``name`` -> UPDATE legacy_user; ``email`` ->
           upsert/delete the email row; an update touching only ``email`` touches only the email
           table; a new ``id`` moves both rows to the new key
delete     ``restriction`` must be ``{"id": ...}``; deletes the email row, then the user row
=========  ==================================================================================

It shows the parts of the handler contract (:mod:`golconde.handlers.base`): ``settings``,
``setup()`` checking the relations (a missing one pauses the listener), statements on several
tables inside the listener's transaction (a packet's two writes commit or roll back together),
:class:`~golconde.errors.PacketError` for packets it cannot apply, and SQL built only with
:mod:`psycopg2.sql` (identifiers quoted, values bound).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from psycopg2 import sql

from ..errors import ConfigError, PacketError, StopListener
from ..packet import Action, Packet
from ..schema import Relation, parse_relation
from .autosql import ident
from .base import Handler

LOGGER = logging.getLogger(__name__)

#: Seconds to wait before checking again for missing legacy tables.
RELATION_RETRY = 30.0


def _table(relation: Relation) -> sql.Identifier:
    return ident(relation.schema, relation.name)


class LegacyUsers(Handler):
    """Writes canonical ``users`` packets into ``legacy_user`` + ``legacy_user_email``.

    :param relation: the legacy user table (the configuration's ``target``).
    :param settings: ``email_table``: the legacy email table, ``[schema.]table`` (default
        ``legacy_user_email`` in the user table's schema).
    :raises ConfigError: an invalid table name.
    """

    def __init__(self, relation: str, settings: Optional[Mapping[str, Any]] = None,
                 role: str = "target", name: str = "", **options: Any) -> None:
        super().__init__(relation, settings, role=role, name=name, **options)
        self.users = parse_relation(relation)
        email = self.settings.get("email_table")
        if email is None:
            self.emails = Relation(self.users.schema, "legacy_user_email")
        elif isinstance(email, str):
            self.emails = parse_relation(email if "." in email else "%s.%s" % (self.users.schema, email))
        else:
            raise ConfigError("settings.email_table: expected [schema.]table, not %r" % (email,))

    def setup(self, connection: Any) -> None:
        """Check that both legacy tables exist.

        :raises StopListener: one does not: the listener pauses, its packets kept queued."""
        super().setup(connection)
        try:
            with connection.cursor() as cur:
                for relation in (self.users, self.emails):
                    cur.execute("SELECT to_regclass(%s)", (str(relation),))
                    if cur.fetchone()[0] is None:
                        raise StopListener("%s: legacy table %s does not exist" % (self.name, relation),
                                           retry_after=RELATION_RETRY)
        finally:
            connection.rollback()

    def apply(self, cursor: Any, packet: Packet) -> Packet:
        """Apply one canonical ``users`` packet to the two legacy tables (see the module).

        :raises PacketError: no ``id`` (add/set), or a restriction other than ``{"id": ...}``.
        """
        data = {key.lower(): value for key, value in packet.data.items()}
        LOGGER.debug("%s: %s on %s and %s", self.name, packet.action.value, self.users, self.emails)
        if packet.action in (Action.ADD, Action.SET):
            if data.get("id") is None:
                raise PacketError("%s: %s packet without id" % (self.name, packet.action.value))
            insert = packet.action is Action.ADD
            self._write_user(cursor, data["id"], data, insert)
            if "email" in data and not (insert and data["email"] is None):
                self._write_email(cursor, data["id"], data["email"], insert)
            return packet
        user_id = self._restricted_id(packet)
        if packet.action is Action.DELETE:
            self._delete(cursor, self.emails, user_id)
            self._delete(cursor, self.users, user_id)
            return packet
        new_id = data.get("id", user_id)
        if new_id is None:
            raise PacketError("%s: update sets id to null" % self.name)
        if new_id != user_id:
            self._move(cursor, user_id, new_id)
        if "name" in data:
            cursor.execute(sql.SQL("UPDATE {} SET user_name = %s WHERE user_id = %s").format(
                _table(self.users)), (data["name"], new_id))
        if "email" in data:
            self._write_email(cursor, new_id, data["email"])
        return packet

    # -- statements ------------------------------------------------------------------------------
    def _restricted_id(self, packet: Packet) -> Any:
        restriction = {key.lower(): value for key, value in packet.restriction.items()}
        if set(restriction) != {"id"} or restriction["id"] is None:
            raise PacketError("%s: %s packets need the restriction {\"id\": <user id>}, not %s"
                              % (self.name, packet.action.value, sorted(packet.restriction)))
        return restriction["id"]

    def _write_user(self, cursor: Any, user_id: Any, data: Dict[str, Any], insert: bool) -> None:
        if "name" in data:
            text = "INSERT INTO {} (user_id, user_name) VALUES (%s, %s)"
            params: tuple = (user_id, data["name"])
            conflict = " ON CONFLICT (user_id) DO UPDATE SET user_name = EXCLUDED.user_name"
        else:
            text = "INSERT INTO {} (user_id) VALUES (%s)"
            params = (user_id,)
            conflict = " ON CONFLICT (user_id) DO NOTHING"
        query = sql.SQL(text if insert else text + conflict).format(_table(self.users))
        cursor.execute(query, params)

    def _write_email(self, cursor: Any, user_id: Any, address: Any, insert: bool = False) -> None:
        if address is None:
            self._delete(cursor, self.emails, user_id)
            return
        text = "INSERT INTO {} (user_id, address) VALUES (%s, %s)"
        if not insert:
            text += " ON CONFLICT (user_id) DO UPDATE SET address = EXCLUDED.address"
        cursor.execute(sql.SQL(text).format(_table(self.emails)), (user_id, address))

    def _delete(self, cursor: Any, relation: Relation, user_id: Any) -> None:
        cursor.execute(sql.SQL("DELETE FROM {} WHERE user_id = %s").format(_table(relation)), (user_id,))

    def _move(self, cursor: Any, old_id: Any, new_id: Any) -> None:
        """A changed canonical key: re-key both rows (the email row follows its user row)."""
        cursor.execute(sql.SQL("SELECT address FROM {} WHERE user_id = %s").format(_table(self.emails)),
                       (old_id,))
        row = cursor.fetchone()
        self._delete(cursor, self.emails, old_id)
        cursor.execute(sql.SQL("UPDATE {} SET user_id = %s WHERE user_id = %s").format(
            _table(self.users)), (new_id, old_id))
        if row is not None:
            self._write_email(cursor, new_id, row[0])
