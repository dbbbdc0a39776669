-- ----------------------------------------------------------------------
-- Schema: golconde
--
--     Holds the capture queue and the capture trigger function.
--     Granted to PUBLIC: USAGE on the schema and EXECUTE on
--     golconde.enqueue(), which the PL/pgSQL capture (running as the
--     writer) calls for its queue insert and which refuses any other caller
--     (capture.sql); nothing else. Writers of captured tables need no rights
--     on the queue; the drain daemon's role needs the rights queue.sql lists.
--
--     golconde.schema_version() is the version of these files: golconde
--     trigger install upgrades a schema whose version is older than its
--     own (golconde.trigger.SCHEMA_VERSION; bump both together whenever
--     any file of the install changes what it creates).
-- ----------------------------------------------------------------------
CREATE SCHEMA IF NOT EXISTS golconde;

COMMENT ON SCHEMA golconde IS 'Golconde: trigger-based capture of row changes as packets';

CREATE OR REPLACE FUNCTION golconde.schema_version()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS 'SELECT 6';
