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
--
--     The primary key (destination, id) is the only index: the drain reads
--     one destination in id order and deletes by (destination, id). Each
--     index costs every captured row an insert (about 4 us of CPU here);
--     queues installed before had a primary key on id plus an index on
--     (destination, id), and are moved to this layout below: it takes an
--     ACCESS EXCLUSIVE lock on golconde.queue (waiting at most 10 s for it)
--     while it rebuilds the key. Upgrade the drain daemons first: an older
--     one deletes by id alone, which this key does not serve.
-- ----------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS golconde.queue (
    id          bigserial   NOT NULL,
    packet_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    destination text        NOT NULL,
    relation    text        NOT NULL,
    txid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    packet      jsonb       NOT NULL,
    CONSTRAINT queue_pkey PRIMARY KEY (destination, id)
);

DO $upgrade$
DECLARE
    v_key     text[];
    v_pk_name name;
BEGIN
    -- wait at most 10 s for a lock: writers of captured tables hold theirs until they commit,
    -- and queue behind this install's lock request while it waits
    PERFORM pg_catalog.set_config('lock_timeout', '10s', true);
    SELECT c.conname, pg_catalog.array_agg(a.attname::text ORDER BY k.n)
    INTO v_pk_name, v_key
    FROM pg_catalog.pg_constraint c
    CROSS JOIN LATERAL pg_catalog.unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
    WHERE c.conrelid = 'golconde.queue'::regclass AND c.contype = 'p'
    GROUP BY c.conname;
    IF v_key IS DISTINCT FROM ARRAY['destination', 'id'] THEN
        IF v_pk_name IS NOT NULL THEN
            EXECUTE pg_catalog.format('ALTER TABLE golconde.queue DROP CONSTRAINT %I', v_pk_name);
        END IF;
        ALTER TABLE golconde.queue ADD CONSTRAINT queue_pkey PRIMARY KEY (destination, id);
    END IF;
    IF pg_catalog.to_regclass('golconde.queue_destination_id_idx') IS NOT NULL THEN
        DROP INDEX golconde.queue_destination_id_idx;
    END IF;
END
$upgrade$;

COMMENT ON TABLE golconde.queue IS 'Golconde: captured packets waiting to be sent to the broker';
