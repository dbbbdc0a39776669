-- ----------------------------------------------------------------------
-- Function: golconde.capture(), the function capture triggers execute.
--
--     C (sql/capture_c/golconde_capture.c) when this server has the library
--     golconde_capture.so of the version this file expects; otherwise the
--     PL/pgSQL body of golconde.capture_plpgsql() (capture.sql). Both write
--     the same packets; the C one costs a captured row about half the CPU.
--     scripts/build-capture.sh builds and installs the library (it needs the
--     server headers, Debian's postgresql-server-dev-<major>).
--
--     golconde.capture() is replaced in place: it keeps its OID, so triggers
--     already attached switch too. When the C function cannot be used, a
--     NOTICE (library missing) or a WARNING (wrong version, not loadable,
--     not allowed) names why; other errors (a lock timeout...) abort the
--     install. Exception: a C golconde.capture() that this role may not
--     replace (creating a C function needs a superuser) stays as it is,
--     with a WARNING. The PL/pgSQL fallback is SECURITY DEFINER: it formats
--     the row as the owner of schema golconde's functions, and a
--     user-defined cast to json (any owner of a captured table, or of the
--     type of one of its columns, can create one) then runs as that owner,
--     who may also alter the function itself and so reach every writer's
--     session: the install warns (README, "Trigger-based flow").
--
--     A server process keeps the library it loaded first: after replacing
--     golconde_capture.so, reconnect (or restart the server) before
--     installing.
--
--     The C function is SECURITY INVOKER: it formats the row with the
--     writer's rights and switches to its owner only for the queue insert,
--     which names every object schema-qualified (no search_path needed).
--     golconde.capture_version() is the library's version (anyone may ask
--     it: golconde trigger install does, to tell a library that cannot be
--     loaded here, as on a standby or a restored copy without it).
--
--     Bump c_expected here and CAPTURE_VERSION in golconde_capture.c
--     together whenever the packets or the queue insert change.
-- ----------------------------------------------------------------------
DO $install$
DECLARE
    c_expected CONSTANT integer := 4;
    v_current  text := (SELECT l.lanname FROM pg_catalog.pg_proc p
                        JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                        WHERE p.oid = pg_catalog.to_regprocedure('golconde.capture()'));
    v_version  integer;
    v_reason   text;
    v_state    text;
BEGIN
    BEGIN
        CREATE OR REPLACE FUNCTION golconde.capture_version()
        RETURNS integer
        LANGUAGE c IMMUTABLE
        AS '$libdir/golconde_capture', 'golconde_capture_version';
        v_version := golconde.capture_version();
        IF v_version <> c_expected THEN
            RAISE EXCEPTION 'golconde_capture is version %, this install expects % (rebuild it: scripts/build-capture.sh)',
                v_version, c_expected;
        END IF;
        CREATE OR REPLACE FUNCTION golconde.capture()
        RETURNS trigger
        LANGUAGE c
        AS '$libdir/golconde_capture', 'golconde_capture';
    EXCEPTION
        -- the library is missing (58P01), lacks a symbol (42883), may not be used by this role
        -- (42501), is of another build (XX000: incompatible library) or version (P0001, above);
        -- anything else (a lock timeout, a deadlock...) aborts the install
        WHEN undefined_file OR undefined_function OR insufficient_privilege OR internal_error
             OR raise_exception THEN
            -- this block's changes are rolled back: both functions are as they were
            v_reason := SQLERRM;
            v_state := SQLSTATE;
    END;

    IF v_reason IS NOT NULL AND v_state = '42501' AND v_current = 'c' THEN
        -- nothing changed, and this role may not change it
        RAISE WARNING 'golconde.capture() stays the C function installed before: %', v_reason;
        RETURN;
    END IF;
    IF v_reason IS NOT NULL THEN
        EXECUTE pg_catalog.format(
            'CREATE OR REPLACE FUNCTION golconde.capture() RETURNS trigger LANGUAGE plpgsql'
            ' SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET DateStyle = ''ISO, MDY'''
            ' SET IntervalStyle = postgres'
            ' SET extra_float_digits = 1 SET bytea_output = hex AS %L',
            (SELECT prosrc FROM pg_catalog.pg_proc
             WHERE oid = 'golconde.capture_plpgsql()'::pg_catalog.regprocedure));
        IF v_state = '58P01' THEN
            RAISE NOTICE 'golconde.capture() is in PL/pgSQL: golconde_capture is not installed in this server (scripts/build-capture.sh builds it): %',
                v_reason;
        ELSE
            RAISE WARNING 'golconde.capture() is in PL/pgSQL: golconde_capture cannot be used: %', v_reason;
        END IF;
        RAISE WARNING 'golconde.capture() is in PL/pgSQL and SECURITY DEFINER: a user-defined cast to json of the type of a captured column runs as its owner, %, and whoever owns a captured table or the type of one of its columns can create one; let only roles you trust as much own them, or install the C capture (README, "Trigger-based flow")',
            (SELECT p.proowner::pg_catalog.regrole FROM pg_catalog.pg_proc p
             WHERE p.oid = 'golconde.capture()'::pg_catalog.regprocedure);
    END IF;
    REVOKE ALL ON FUNCTION golconde.capture() FROM PUBLIC;
    COMMENT ON FUNCTION golconde.capture() IS
        'Golconde: AFTER ROW trigger; arguments: destination, key columns. Writes packets to golconde.queue';
END
$install$;
