-- ----------------------------------------------------------------------
-- Function: golconde.capture(), in C when the server has the library.
--
--     sql/capture_c/golconde_capture.c is the same trigger as the PL/pgSQL
--     one above (which stays the reference, and the fallback): same
--     arguments, same packets, same checks, at a fraction of its CPU per row.
--     scripts/build-capture.sh builds it and installs golconde_capture.so
--     into the server's $libdir (it needs the server headers, Debian's
--     postgresql-server-dev-<major>). When the library is there, this
--     replaces the PL/pgSQL body in place: the function keeps its OID, so
--     triggers already attached to it switch too, and its privileges and
--     comment stay. When it is not, the PL/pgSQL function stays, with a
--     NOTICE (library missing) or a WARNING (library unusable, e.g. built
--     for another major version) naming the reason.
--
--     No SET search_path is needed: the C code reaches golconde.queue by a
--     schema-qualified name in a plan prepared once per backend, and types
--     and functions by OID.
-- ----------------------------------------------------------------------
DO $install$
BEGIN
    CREATE OR REPLACE FUNCTION golconde.capture()
    RETURNS trigger
    LANGUAGE c
    SECURITY DEFINER
    AS '$libdir/golconde_capture', 'golconde_capture';
EXCEPTION
    WHEN undefined_file THEN
        RAISE NOTICE 'golconde.capture() stays in PL/pgSQL: golconde_capture is not installed in this server''s library directory (scripts/build-capture.sh builds it)';
    WHEN OTHERS THEN
        RAISE WARNING 'golconde.capture() stays in PL/pgSQL: golconde_capture cannot be used: %', SQLERRM;
END
$install$;
