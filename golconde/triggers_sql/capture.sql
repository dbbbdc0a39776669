-- ----------------------------------------------------------------------
-- Function: golconde.capture_plpgsql()
--
--     The PL/pgSQL capture trigger: the reference, and the body of
--     golconde.capture() wherever the C one cannot be used (capture_c.sql
--     picks one and installs it as golconde.capture(), the name triggers use).
--
--     AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW trigger that writes
--     the row change as a Golconde packet into golconde.queue, inside the
--     writing transaction (a rolled-back change is never distributed).
--     It does not NOTIFY: a transaction that notified takes a cluster-wide
--     lock at commit that serializes every such commit, which halved
--     pgbench's rate in our measurements (bench/README.md); the drain daemon
--     polls instead (poll_interval), and still LISTENs on channel 'golconde'
--     so an application may wake it at once with NOTIFY golconde, '<dest>'.
--
-- Trigger arguments:
--     TG_ARGV[0]     - destination name
--     TG_ARGV[1..n]  - key (primary key) column names, unquoted
--
-- Packets:
--     INSERT -> {"action": "add",    "data": to_jsonb(NEW)}
--     UPDATE -> {"action": "update", "data": to_jsonb(NEW),
--                "restriction": {<key>: OLD.<key>, ...}}
--     DELETE -> {"action": "delete", "restriction": {<key>: OLD.<key>, ...}}
--
--     An UPDATE that changed nothing (NEW *= OLD, binary image equality,
--     which works for every type, json and point included) makes no packet.
--     Values are written by to_jsonb(): numbers exact, timestamps ISO 8601,
--     bytea as "\\x..." hex text, json/jsonb embedded as JSON values, with
--     DateStyle (ISO: a range of dates is printed by its output function),
--     IntervalStyle, extra_float_digits and bytea_output at their defaults
--     whatever the writer's session set (SET clauses below).
--     TRUNCATE is not captured.
--
-- Security:
--     SECURITY DEFINER, so writers of a captured table need no rights on
--     golconde.queue; EXECUTE is revoked from PUBLIC, so only roles granted
--     it can attach this function to a table (CREATE TRIGGER checks it).
--     search_path is pinned and every object is schema-qualified.
-- ----------------------------------------------------------------------
CREATE OR REPLACE FUNCTION golconde.capture_plpgsql()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, MDY'
SET IntervalStyle = postgres
SET extra_float_digits = 1
SET bytea_output = hex
AS $$
DECLARE
    v_destination text;
    v_old         jsonb;
    v_restriction jsonb := '{}'::jsonb;
    v_packet      jsonb;
    v_key         text;
    i             integer;
BEGIN
    IF TG_WHEN <> 'AFTER' OR TG_LEVEL <> 'ROW' THEN
        RAISE EXCEPTION 'golconde.capture() must run AFTER ... FOR EACH ROW (trigger % on %.%)',
            TG_NAME, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME);
    END IF;
    IF TG_NARGS < 1 OR coalesce(TG_ARGV[0], '') = '' THEN
        RAISE EXCEPTION 'golconde.capture() needs the destination name as first argument (trigger % on %.%)',
            TG_NAME, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME);
    END IF;
    v_destination := TG_ARGV[0];

    IF TG_OP = 'INSERT' THEN
        v_packet := jsonb_build_object('action', 'add', 'data', to_jsonb(NEW));
    ELSIF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF TG_NARGS < 2 THEN
            RAISE EXCEPTION 'golconde.capture(): trigger % on %.% names no key column: % cannot be captured',
                TG_NAME, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME), TG_OP;
        END IF;
        IF TG_OP = 'UPDATE' AND NEW *= OLD THEN
            RETURN NULL;
        END IF;
        v_old := to_jsonb(OLD);
        FOR i IN 1 .. TG_NARGS - 1 LOOP
            v_key := TG_ARGV[i];
            IF NOT v_old ? v_key THEN
                RAISE EXCEPTION 'golconde.capture(): key column % of trigger % is not a column of %.%',
                    quote_ident(v_key), TG_NAME, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME);
            END IF;
            v_restriction := v_restriction || jsonb_build_object(v_key, v_old -> v_key);
        END LOOP;
        IF TG_OP = 'UPDATE' THEN
            v_packet := jsonb_build_object('action', 'update', 'data', to_jsonb(NEW),
                                           'restriction', v_restriction);
        ELSE
            v_packet := jsonb_build_object('action', 'delete', 'restriction', v_restriction);
        END IF;
    ELSE
        RAISE EXCEPTION 'golconde.capture(): % is not captured (trigger % on %.%)',
            TG_OP, TG_NAME, quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME);
    END IF;

    INSERT INTO golconde.queue (destination, relation, packet)
    VALUES (v_destination, quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME), v_packet);
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION golconde.capture_plpgsql() FROM PUBLIC;

COMMENT ON FUNCTION golconde.capture_plpgsql() IS
    'Golconde: the PL/pgSQL body of golconde.capture(): AFTER ROW trigger; arguments: destination, key columns. Writes packets to golconde.queue';
