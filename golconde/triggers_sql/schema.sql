-- ----------------------------------------------------------------------
-- Schema: golconde
--
--     Holds the capture queue and the capture trigger function.
--     Nothing in it is granted to PUBLIC: writers of captured tables need
--     no rights here (golconde.capture() runs the queue insert as its
--     owner); the drain daemon's role needs USAGE on the schema and the rights
--     queue.sql lists.
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
AS 'SELECT 5';
