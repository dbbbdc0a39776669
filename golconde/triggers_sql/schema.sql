-- ----------------------------------------------------------------------
-- Schema: golconde
--
--     Holds the capture queue and the capture trigger function.
--     Nothing in it is granted to PUBLIC: writers of captured tables need
--     no rights here (golconde.capture() is SECURITY DEFINER); the drain
--     daemon's role needs USAGE on the schema and SELECT, DELETE on
--     golconde.queue.
-- ----------------------------------------------------------------------
CREATE SCHEMA IF NOT EXISTS golconde;

COMMENT ON SCHEMA golconde IS 'Golconde: trigger-based capture of row changes as packets';
