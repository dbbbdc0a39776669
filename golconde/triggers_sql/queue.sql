-- ----------------------------------------------------------------------
-- Table: golconde.queue
--
--     One row per captured row change, written by golconde.capture() in the
--     writing transaction, so only committed changes are ever visible here.
--     The drain daemon never deletes a row it sent: like PgQ (Skytools 3)
--     it reads the queue in windows between two transaction snapshots and
--     keeps its position in golconde.drain_position; whole partitions are
--     emptied with TRUNCATE once every destination has sent all of their
--     rows (golconde.trigger.rotate_queue). Deleting each sent row cost the
--     canonical cluster about 73 us of CPU a row (bench/drain.py), more
--     than the capture itself.
--
-- Columns:
--     id           - capture order (golconde.queue_id_seq)
--     packet_id    - unique id of the packet, for de-duplication downstream
--     destination  - Golconde destination name (first trigger argument)
--     relation     - captured table, as quote_ident(schema).quote_ident(table)
--     txid         - writing (top-level) transaction id
--     created_at   - clock time of the row change
--     packet       - {"action": add|update|delete, "data": {...},
--                     "restriction": {...}}
--
-- Partitions:
--     golconde.queue_0, _1 and _2, by (id / 500000) % 3: ids 0-499999 go
--     to _0, the next 500,000 to _1, then _2, then _0 again. A partition
--     the sequence has left is truncated once every row in it has been
--     sent; one the drain could not empty in time simply keeps its rows
--     and takes the new ones too (nothing ever fails for a writer).
--     Autovacuum never runs for their inserts or to ANALYZE them (the drain
--     reads them in index order whatever their statistics), and vacuums a
--     partition only once 100,000 of its rows are dead: rows a drain deletes
--     where it does not truncate (golconde.trigger.delete_sent), whose space
--     was otherwise never reused (the queue grew with every row ever
--     captured), or rows of writers that rolled back. A partition is
--     usually truncated long before. (A wraparound vacuum runs when due.)
--
--     Two indexes: (destination, id), as the drain reads one destination
--     in id order, and (destination, txid), as it finds a window's rows by
--     their transaction ids (PgQ's only index is on the transaction id).
--     Each index costs every captured row an insert (about 4 us of CPU
--     here).
--
-- Upgrade:
--     A queue of an earlier layout (a plain table) is replaced by this one
--     with its rows and its sequence: it takes an ACCESS EXCLUSIVE lock on
--     golconde.queue (waiting at most 10 s for it). Stop the drain daemons
--     of the database first, and upgrade them with it.
-- ----------------------------------------------------------------------
CREATE SEQUENCE IF NOT EXISTS golconde.queue_id_seq;

DO $upgrade$
DECLARE
    v_kind  "char";
    v_txid  boolean;
BEGIN
    -- wait at most 10 s for a lock: writers of captured tables hold theirs until they commit,
    -- and queue behind this install's lock request while it waits
    PERFORM pg_catalog.set_config('lock_timeout', '10s', true);
    SELECT c.relkind INTO v_kind FROM pg_catalog.pg_class c
    WHERE c.oid = pg_catalog.to_regclass('golconde.queue');
    IF v_kind = 'p' THEN
        RETURN;
    END IF;
    IF v_kind IS NOT NULL THEN
        LOCK TABLE golconde.queue IN ACCESS EXCLUSIVE MODE;
        ALTER TABLE golconde.queue RENAME TO queue_before_partitions;
        ALTER SEQUENCE golconde.queue_id_seq OWNED BY NONE;
    END IF;
    CREATE TABLE golconde.queue (
        id          bigint      NOT NULL DEFAULT pg_catalog.nextval('golconde.queue_id_seq'),
        packet_id   uuid        NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
        destination text        NOT NULL,
        relation    text        NOT NULL,
        txid        xid8        NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
        created_at  timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
        packet      jsonb       NOT NULL
    ) PARTITION BY LIST (((id / 500000) % 3));
    CREATE TABLE golconde.queue_0 PARTITION OF golconde.queue FOR VALUES IN (0);
    CREATE TABLE golconde.queue_1 PARTITION OF golconde.queue FOR VALUES IN (1);
    CREATE TABLE golconde.queue_2 PARTITION OF golconde.queue FOR VALUES IN (2);
    CREATE INDEX queue_drain_idx ON golconde.queue (destination, id);
    CREATE INDEX queue_txid_idx ON golconde.queue (destination, txid);
    ALTER SEQUENCE golconde.queue_id_seq OWNED BY golconde.queue.id;
    IF v_kind IS NOT NULL THEN
        SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                       WHERE attrelid = 'golconde.queue_before_partitions'::regclass
                         AND attname = 'txid' AND NOT attisdropped) INTO v_txid;
        EXECUTE 'INSERT INTO golconde.queue (id, packet_id, destination, relation, txid,'
                ' created_at, packet) SELECT id, packet_id, destination, relation, '
                || CASE WHEN v_txid THEN 'txid' ELSE 'pg_catalog.pg_current_xact_id()' END
                || ', created_at, packet FROM golconde.queue_before_partitions';
        DROP TABLE golconde.queue_before_partitions;
    END IF;
END
$upgrade$;

-- the partitions' autovacuum (see Partitions above), also on a queue of an earlier version
-- (SHARE UPDATE EXCLUSIVE: writers are not blocked)
ALTER TABLE golconde.queue_0 SET (autovacuum_enabled = true, autovacuum_vacuum_insert_threshold = -1,
                                  autovacuum_vacuum_threshold = 100000,
                                  autovacuum_vacuum_scale_factor = 0,
                                  autovacuum_analyze_threshold = 2147483647);
ALTER TABLE golconde.queue_1 SET (autovacuum_enabled = true, autovacuum_vacuum_insert_threshold = -1,
                                  autovacuum_vacuum_threshold = 100000,
                                  autovacuum_vacuum_scale_factor = 0,
                                  autovacuum_analyze_threshold = 2147483647);
ALTER TABLE golconde.queue_2 SET (autovacuum_enabled = true, autovacuum_vacuum_insert_threshold = -1,
                                  autovacuum_vacuum_threshold = 100000,
                                  autovacuum_vacuum_scale_factor = 0,
                                  autovacuum_analyze_threshold = 2147483647);

COMMENT ON TABLE golconde.queue IS 'Golconde: captured packets waiting to be sent to the broker';

-- ----------------------------------------------------------------------
-- Table: golconde.drain_position
--
--     Where the drain daemon of each destination is in golconde.queue,
--     written after the broker confirmed what it sent (a crash re-sends
--     from there: at-least-once; the targets' ledgers drop duplicates).
--     A row of the destination has been sent when sent_snapshot sees its
--     transaction, or when window_snapshot sees it and its id is at most
--     last_id (golconde.trigger.DrainPosition).
--
-- Columns:
--     destination     - Golconde destination name
--     sent_snapshot   - every row whose transaction it sees has been sent
--                       (NULL: none yet)
--     window_snapshot - the window being sent (NULL between windows):
--                       rows it sees and sent_snapshot does not
--     window_hi       - the largest id in that window
--     last_id         - the window's rows up to this id have been sent
--     updated_at      - when it was written
--
--     The drain daemon's role needs SELECT, INSERT, UPDATE here, SELECT on
--     golconde.queue and golconde.queue_id_seq, and TRUNCATE on the
--     queue's partitions (without it, the daemon DELETEs the rows it sent
--     instead, which needs DELETE).
-- ----------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS golconde.drain_position (
    destination     text        PRIMARY KEY,
    sent_snapshot   pg_snapshot,
    window_snapshot pg_snapshot,
    window_hi       bigint      NOT NULL DEFAULT 0,
    last_id         bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);

COMMENT ON TABLE golconde.drain_position IS 'Golconde: how far each destination''s drain has sent golconde.queue';
