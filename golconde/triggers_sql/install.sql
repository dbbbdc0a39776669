-- ----------------------------------------------------------------------
-- Golconde trigger-based capture: install order.
--
--     psql -v ON_ERROR_STOP=1 -1 -f sql/triggers/install.sql
--
-- golconde.trigger.install_schema() reads the \ir lines below, in order,
-- and runs each file in one transaction. Every file is idempotent.
-- Needs PostgreSQL 13+ (gen_random_uuid(), xid8, pg_current_xact_id()).
-- ----------------------------------------------------------------------
\ir schema.sql
\ir queue.sql
\ir capture.sql
\ir capture_c.sql
