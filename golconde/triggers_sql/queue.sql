-- ----------------------------------------------------------------------
-- Table: golconde.queue
--
--     One row per captured row change, written by golconde.capture() in the
--     writing transaction, so only committed changes are ever visible here.
--     The drain daemon reads rows of one destination ordered by id, sends
--     them to the broker (confirmed, persistent) and then deletes exactly
--     the ids it sent (never "id <= max": ids are taken at insert time, so a
--     transaction holding a smaller id may commit after a larger one).
--
-- Columns:
--     id           - capture order (bigserial)
--     packet_id    - unique id of the packet, for de-duplication downstream
--     destination  - Golconde destination name (first trigger argument)
--     relation     - captured table, as quote_ident(schema).quote_ident(table)
--     txid         - writing transaction id
--     created_at   - clock time of the row change
--     packet       - {"action": add|update|delete, "data": {...},
--                     "restriction": {...}}
-- ----------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS golconde.queue (
    id          bigserial   PRIMARY KEY,
    packet_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    destination text        NOT NULL,
    relation    text        NOT NULL,
    txid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    packet      jsonb       NOT NULL
);

CREATE INDEX IF NOT EXISTS queue_destination_id_idx ON golconde.queue (destination, id);

COMMENT ON TABLE golconde.queue IS 'Golconde: captured packets waiting to be sent to the broker';
