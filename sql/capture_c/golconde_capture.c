/*-------------------------------------------------------------------------
 * golconde_capture.c
 *
 *     golconde.capture() in C: the same AFTER ... FOR EACH ROW capture
 *     trigger as golconde.capture_plpgsql() in sql/triggers/capture.sql
 *     (the reference, and golconde.capture()'s fallback body), writing
 *     the same packets into golconde.queue inside the writing transaction,
 *     at a fraction of its CPU cost per row (no PL/pgSQL statements, no per-call SET of
 *     search_path: every object is reached by OID or by a schema-qualified
 *     name in a plan prepared once per backend).
 *
 *     The idea is PgQ's logutriga (Skytools, sql/pgq/triggers/logutriga.c):
 *     a C row trigger that formats the change and inserts it into the queue
 *     table through one saved SPI plan.
 *
 * Trigger arguments: TG_ARGV[0] destination name; TG_ARGV[1..n] key columns.
 *
 * Packets (JSON, stored as jsonb, so key order and spacing are jsonb's):
 *     INSERT -> {"action": "add",    "data": <row>}
 *     UPDATE -> {"action": "update", "data": <new row>,
 *                "restriction": {<key>: <old value>, ...}}
 *     DELETE -> {"action": "delete", "restriction": {<key>: <old value>, ...}}
 * <row> is row_to_json() of the row and each key value to_json() of the old
 * value, which once stored as jsonb equal to_jsonb()'s, as the PL/pgSQL
 * function writes them. An UPDATE whose new row is binary-identical to the
 * old one (NEW *= OLD) makes no packet.
 *
 * The packet id is drawn here rather than by the column's default: see
 * packet_id().
 *
 * Rights: the function is SECURITY INVOKER. The row is formatted as the
 * writer (so a user-defined cast to json runs with the writer's rights, not
 * the owner's), and only the queue insert runs as the function's owner, the
 * way a SECURITY DEFINER function would run it (writers need no rights on
 * golconde.queue).
 *
 * golconde_capture_version() returns CAPTURE_VERSION; capture_c.sql uses the
 * library only when it is the version its SQL expects (bump both together
 * whenever the packets or the queue insert change).
 *
 * Build and install (PGXS): make && make install (see Makefile).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/bytea.h"
#include "utils/float.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "miscadmin.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/uuid.h"
#if PG_VERSION_NUM >= 150000
#include "common/pg_prng.h"
#endif

PG_MODULE_MAGIC;

#define CAPTURE_VERSION 4

PG_FUNCTION_INFO_V1(golconde_capture);
PG_FUNCTION_INFO_V1(golconde_capture_version);

Datum
golconde_capture_version(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(CAPTURE_VERSION);
}

/* INSERT into the queue, prepared once per backend (the plan cache replans it when needed). */
static SPIPlanPtr insert_plan = NULL;

#define INSERT_SQL \
	"INSERT INTO golconde.queue (packet_id, destination, relation, packet) " \
	"VALUES ($1, $2, $3, $4::pg_catalog.jsonb)"

/*
 * A random (version 4, RFC 4122 section 4.4) UUID for the packet id.  From
 * PostgreSQL 15 on, from the backend's pg_prng state (xoroshiro128**, seeded
 * from pg_strong_random() when the backend starts): the id must be unique,
 * not secret, and gen_random_uuid(), the column's default, costs a call to
 * the strong source per row (about 4 us of CPU here).
 */
static Datum
packet_id(void)
{
	pg_uuid_t  *uuid = palloc(sizeof(pg_uuid_t));
#if PG_VERSION_NUM >= 150000
	uint64		high = pg_prng_uint64(&pg_global_prng_state);
	uint64		low = pg_prng_uint64(&pg_global_prng_state);

	memcpy(uuid->data, &high, 8);
	memcpy(uuid->data + 8, &low, 8);
#else
	if (!pg_strong_random(uuid->data, UUID_LEN))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("golconde.capture(): could not generate a random packet id")));
#endif
	uuid->data[6] = (uuid->data[6] & 0x0f) | 0x40;	/* version 4 */
	uuid->data[8] = (uuid->data[8] & 0x3f) | 0x80;	/* variant RFC 4122 */
	return UUIDPGetDatum(uuid);
}

/*
 * The owner of the function being called.  Looked up on every call (one
 * syscache probe): ALTER FUNCTION ... OWNER TO keeps the function's OID, and
 * a cached owner would outlive it in pooled sessions.
 */
static Oid
function_owner(FunctionCallInfo fcinfo)
{
	Oid			function = fcinfo->flinfo->fn_oid;
	HeapTuple	tuple = SearchSysCache1(PROCOID, ObjectIdGetDatum(function));
	Oid			owner;

	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "golconde.capture(): cache lookup failed for function %u", function);
	owner = ((Form_pg_proc) GETSTRUCT(tuple))->proowner;
	ReleaseSysCache(tuple);
	return owner;
}

/* Is every (non-dropped) column binary-identical in both tuples?  As record_image_eq (*=). */
static bool
rows_identical(HeapTuple a, HeapTuple b, TupleDesc desc)
{
	int			i;

	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		null_a,
					null_b;
		Datum		value_a,
					value_b;

		if (att->attisdropped)
			continue;
		value_a = heap_getattr(a, i + 1, desc, &null_a);
		value_b = heap_getattr(b, i + 1, desc, &null_b);
		if (null_a != null_b)
			return false;
		if (!null_a && !datum_image_eq(value_a, value_b, att->attbyval, att->attlen))
			return false;
	}
	return true;
}

/*
 * Values are written as PostgreSQL's default settings print them, whatever
 * the writer's session set: DateStyle (a range of dates or timestamps is
 * printed by its output function: 'SQL, DMY' writes 01/02/2020 for
 * February 1st, which reads back as January 2nd where DateStyle is MDY;
 * ISO is read the same under every DateStyle), IntervalStyle (sql_standard
 * writes "-1 2:00:00", which reads back as -1 day +2 hours where
 * IntervalStyle is postgres), extra_float_digits (0 or less rounds doubles
 * to 15 digits) and bytea_output (escape).  Checked first, so that only a session that changed
 * one of them pays for a GUC nest level around the formatting.  Returns the
 * nest level to pass to AtEOXact_GUC, or -1 when nothing was set.
 */
static int
pin_output_settings(void)
{
	int			nest;

	if (DateStyle == USE_ISO_DATES && IntervalStyle == INTSTYLE_POSTGRES &&
		extra_float_digits > 0 && bytea_output == BYTEA_OUTPUT_HEX)
		return -1;
	nest = NewGUCNestLevel();
	if (DateStyle != USE_ISO_DATES)
		(void) set_config_option("datestyle", "ISO", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	if (IntervalStyle != INTSTYLE_POSTGRES)
		(void) set_config_option("intervalstyle", "postgres", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	if (extra_float_digits <= 0)
		(void) set_config_option("extra_float_digits", "1", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	if (bytea_output != BYTEA_OUTPUT_HEX)
		(void) set_config_option("bytea_output", "hex", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	return nest;
}

/* Append row_to_json(tuple) to buf. */
static void
append_row(StringInfo buf, HeapTuple tuple, TupleDesc desc)
{
	Datum		row = heap_copy_tuple_as_datum(tuple, desc);
	text	   *json = DatumGetTextPP(DirectFunctionCall1(row_to_json, row));

	appendBinaryStringInfo(buf, VARDATA_ANY(json), VARSIZE_ANY_EXHDR(json));
}

/* Append to_json(value) of a column of type att (or null) to buf. */
static void
append_value(StringInfo buf, Datum value, bool isnull, Form_pg_attribute att)
{
	FmgrInfo	flinfo;
	text	   *json;

	if (isnull)
	{
		appendStringInfoString(buf, "null");
		return;
	}
	/* to_json(anyelement) reads its argument's type from the call expression */
	fmgr_info(F_TO_JSON, &flinfo);
	flinfo.fn_expr = (Node *) makeFuncExpr(F_TO_JSON, JSONOID,
										   list_make1(makeNullConst(att->atttypid, att->atttypmod,
																	att->attcollation)),
										   InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
	json = DatumGetTextPP(FunctionCall1(&flinfo, value));
	appendBinaryStringInfo(buf, VARDATA_ANY(json), VARSIZE_ANY_EXHDR(json));
}

/*
 * Append {"key": old value, ...} for the key columns named by tgargs[1..];
 * relation is the table's qualified name, for the error message.
 */
static void
append_restriction(StringInfo buf, Trigger *trigger, TupleDesc desc, const char *relation,
				   HeapTuple old)
{
	int			i;

	appendStringInfoChar(buf, '{');
	for (i = 1; i < trigger->tgnargs; i++)
	{
		const char *key = trigger->tgargs[i];
		int			attnum = SPI_fnumber(desc, key);
		bool		isnull;
		Datum		value;

		if (attnum <= 0)		/* SPI_fnumber skips dropped columns */
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("golconde.capture(): key column %s of trigger %s is not a column of %s",
							quote_identifier(key), trigger->tgname, relation)));
		if (i > 1)
			appendStringInfoString(buf, ", ");
		escape_json(buf, key);
		appendStringInfoString(buf, ": ");
		value = heap_getattr(old, attnum, desc, &isnull);
		append_value(buf, value, isnull, TupleDescAttr(desc, attnum - 1));
	}
	appendStringInfoChar(buf, '}');
}

Datum
golconde_capture(PG_FUNCTION_ARGS)
{
	TriggerData *tg;
	Trigger    *trigger;
	Relation	rel;
	TupleDesc	desc;
	char	   *relation;
	StringInfoData packet;
	Datum		values[4];
	int			ret;
	int			nest;
	Oid			save_userid;
	int			save_sec_context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("golconde.capture() must be called as a trigger")));
	tg = (TriggerData *) fcinfo->context;
	trigger = tg->tg_trigger;
	rel = tg->tg_relation;
	desc = RelationGetDescr(rel);
	relation = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
										  RelationGetRelationName(rel));

	if (!TRIGGER_FIRED_AFTER(tg->tg_event) || !TRIGGER_FIRED_FOR_ROW(tg->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("golconde.capture() must run AFTER ... FOR EACH ROW (trigger %s on %s)",
						trigger->tgname, relation)));
	if (trigger->tgnargs < 1 || trigger->tgargs[0][0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("golconde.capture() needs the destination name as first argument (trigger %s on %s)",
						trigger->tgname, relation)));

	initStringInfo(&packet);
	nest = pin_output_settings();
	if (TRIGGER_FIRED_BY_INSERT(tg->tg_event))
	{
		appendStringInfoString(&packet, "{\"action\": \"add\", \"data\": ");
		append_row(&packet, tg->tg_trigtuple, desc);
		appendStringInfoChar(&packet, '}');
	}
	else if (TRIGGER_FIRED_BY_UPDATE(tg->tg_event) || TRIGGER_FIRED_BY_DELETE(tg->tg_event))
	{
		bool		update = TRIGGER_FIRED_BY_UPDATE(tg->tg_event);

		if (trigger->tgnargs < 2)
			ereport(ERROR,
					(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
					 errmsg("golconde.capture(): trigger %s on %s names no key column: %s cannot be captured",
							trigger->tgname, relation, update ? "UPDATE" : "DELETE")));
		if (update && rows_identical(tg->tg_newtuple, tg->tg_trigtuple, desc))
		{
			if (nest >= 0)
				AtEOXact_GUC(true, nest);
			return PointerGetDatum(NULL);
		}
		if (update)
		{
			appendStringInfoString(&packet, "{\"action\": \"update\", \"data\": ");
			append_row(&packet, tg->tg_newtuple, desc);
			appendStringInfoString(&packet, ", \"restriction\": ");
		}
		else
			appendStringInfoString(&packet, "{\"action\": \"delete\", \"restriction\": ");
		append_restriction(&packet, trigger, desc, relation, tg->tg_trigtuple);
		appendStringInfoChar(&packet, '}');
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("golconde.capture(): TRUNCATE is not captured (trigger %s on %s)",
						trigger->tgname, relation)));

	if (nest >= 0)
		AtEOXact_GUC(true, nest);	/* an error before this: the (sub)transaction's abort */

	values[0] = packet_id();
	values[1] = CStringGetTextDatum(trigger->tgargs[0]);
	values[2] = CStringGetTextDatum(relation);
	values[3] = CStringGetTextDatum(packet.data);

	/*
	 * The insert alone, its planning included (golconde is looked up with
	 * the current user's rights), runs as the function's owner.  An error
	 * leaves the user switched: (sub)transaction abort switches it back.
	 */
	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(function_owner(fcinfo),
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "golconde.capture(): SPI_connect failed");
	if (insert_plan == NULL)
	{
		Oid			types[4] = {UUIDOID, TEXTOID, TEXTOID, TEXTOID};
		SPIPlanPtr	plan = SPI_prepare(INSERT_SQL, 4, types);

		if (plan == NULL)
			elog(ERROR, "golconde.capture(): cannot prepare the queue insert: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "golconde.capture(): SPI_keepplan failed");
		insert_plan = plan;
	}
	ret = SPI_execute_plan(insert_plan, values, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "golconde.capture(): queue insert failed: %s", SPI_result_code_string(ret));
	SPI_finish();
	SetUserIdAndSecContext(save_userid, save_sec_context);
	return PointerGetDatum(NULL);
}
