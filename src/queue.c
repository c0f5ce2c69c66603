/*-------------------------------------------------------------------------
 *
 * queue.c
 *		Claims due outbox events and records delivery results (SPI).
 *
 * Every function here runs inside a transaction the worker opened, and
 * connects to SPI itself; what it returns is allocated in the memory
 * context current at the call.  The statements are set-based (arrays in,
 * one statement per batch) and prepared once per process.
 *
 * Claims are made per endpoint with a quota the worker computes from the
 * breaker, the token bucket and the concurrency caps, so an open breaker
 * or an empty bucket simply claims nothing: events wait without burning
 * attempts.  A claimed event is 'delivering' with a lease: if the worker
 * dies, cc_queue_recover (at the next start) or the lease's expiry makes it
 * due again, and the receiver sees the same webhook-id twice at worst.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "queue.h"
#include "signature.h"
#include "spi.h"

/*
 * The workers run with search_path pinned to pg_catalog, pg_temp (see
 * worker.c), and every function and operator their statements name is
 * qualified besides: a look-alike with exact argument types in any schema
 * on a path would beat the polymorphic built-in (cardinality(anyarray),
 * unnest(anyarray), jsonb_build_object(VARIADIC "any"), numeric * numeric)
 * and run with the worker's rights.  OP("=") is OPERATOR(pg_catalog.=);
 * mind that every OPERATOR() binds alike (tighter than comparisons), so
 * expressions mixing them are parenthesized.
 */
#define OP(o) " OPERATOR(pg_catalog." o ") "

/* The statuses of an undelivered row (the partial indexes' predicate). */
#define UNDELIVERED(col) \
" " col OP("=") "ANY (ARRAY['pending', 'delivering']::text[])"

static const char endpoints_sql[] =
"SELECT e.id, e.name, e.url, s.secret,"
"       CASE WHEN s.rotated_at" OP(">") "(pg_catalog.now()" OP("-") "interval '24 hours')"
"            THEN s.previous_secret END,"
"       e.timeout_ms,"
"       coalesce(e.max_attempts, pg_catalog.cardinality(r.delays)" OP("+") "1),"
"       ARRAY(SELECT (extract(epoch FROM d)" OP("*") "1000)::int8"
"               FROM pg_catalog.unnest(r.delays) d),"
"       coalesce(e.rate_limit_per_s, 0)::float8,"
"       e.breaker_failure_ratio::float8, e.breaker_window_s,"
"       e.breaker_min_requests, e.breaker_open_ms,"
"       e.is_core, e.ordered, e.format"
"  FROM callback_center.endpoints e"
"  JOIN callback_center.endpoint_secrets s ON s.endpoint_id" OP("=") "e.id"
"  JOIN callback_center.retry_schedules r ON r.name" OP("=") "e.retry_schedule"
" WHERE e.enabled ORDER BY e.id";

/*
 * For an ordered endpoint (q.ordered), only the oldest undelivered event of
 * each aggregate may go: the claim and the next-due look-up share this
 * condition on outbox row o.
 */
#define AGGREGATE_HEAD \
"       AND (NOT q.ordered OR NOT EXISTS (" \
"             SELECT 1 FROM callback_center.outbox p" \
"              WHERE p.endpoint_id" OP("=") "o.endpoint_id" \
"                AND p.aggregate_id" OP("=") "o.aggregate_id" \
"                AND" UNDELIVERED("p.status") \
"                AND p.id" OP("<") "o.id))"

/*
 * When the first event the claim could take for each endpoint in $1 falls
 * due, in milliseconds after the claim's now() (0: it was due then).  For an
 * ordered endpoint ($2) only the head of each aggregate counts: events
 * waiting behind an earlier one that waits for its retry are not due,
 * however old their next_attempt_at.
 */
static const char next_due_sql[] =
"SELECT GREATEST(0, pg_catalog.ceil(extract(epoch FROM"
"         pg_catalog.min(n.t)" OP("-") "pg_catalog.now())" OP("*") "1000))::int8"
"  FROM ROWS FROM (pg_catalog.unnest($1::int4[]), pg_catalog.unnest($2::bool[]))"
"       AS q(endpoint_id, ordered)"
"  CROSS JOIN LATERAL ("
"    SELECT o.next_attempt_at AS t FROM callback_center.outbox o"
"     WHERE o.endpoint_id" OP("=") "q.endpoint_id"
"       AND" UNDELIVERED("o.status")
AGGREGATE_HEAD
"     ORDER BY o.next_attempt_at LIMIT 1) n";

/*
 * Claims oldest-due first, per endpoint, respecting ordering.  The rows are
 * picked and locked once, in a materialized CTE (an UPDATE joined to a
 * LIMIT ... SKIP LOCKED sub-select may run the sub-select again for each
 * row of a nested loop, and lock different rows each time), then updated
 * by primary key (= ANY of an array, never by a join the planner could
 * turn into a scan of the whole outbox: the outbox keeps its delivered
 * history, the claim must not see it).
 *
 * The body is built only for an event no larger than callback_center.
 * max_event_size ($5; see _event_size): a larger one comes back with a
 * NULL body and its size, and is made dead instead of sent (an event whose
 * text passes 1 GB would fail the whole statement, every round).
 */
#define CLAIM_PICK \
"WITH picked AS MATERIALIZED (" \
"  SELECT d.id" \
"    FROM ROWS FROM (pg_catalog.unnest($1::int4[]), pg_catalog.unnest($2::int4[])," \
"                    pg_catalog.unnest($3::bool[])) AS q(endpoint_id, n, ordered)" \
"   CROSS JOIN LATERAL (" \
"    SELECT o.id FROM callback_center.outbox o" \
"     WHERE o.endpoint_id" OP("=") "q.endpoint_id" \
"       AND" UNDELIVERED("o.status") \
"       AND o.next_attempt_at" OP("<=") "pg_catalog.now()" \
AGGREGATE_HEAD \
"     ORDER BY o.next_attempt_at" \
"     LIMIT q.n" \
"     FOR UPDATE SKIP LOCKED) d) " \
"UPDATE callback_center.outbox o" \
"   SET status = 'delivering'," \
"       next_attempt_at = pg_catalog.now()" OP("+") "pg_catalog.make_interval(secs => $4)" \
" WHERE o.id" OP("=") "ANY (ARRAY(SELECT p.id FROM picked p)) "

#define EVENT_SIZE \
"callback_center._event_size(o.event_type, o.aggregate_id, o.payload)"

/*
 * What a request is built from (event_body_copy): for an endpoint of a
 * provider format (in $6) the request _adapter_request builds and signs,
 * fresh for this attempt (src/sql/46_adapters.sql); for the others the
 * columns of the webhook body, which C prints.  Only for an event no larger
 * than max_event_size (parameter max; the formats' endpoints in fmt).
 */
#define EVENT_PARTS(max, fmt) \
"CASE WHEN " EVENT_SIZE OP("<=") max " AND o.endpoint_id" OP("=") "ANY (" fmt "::int4[])" \
"     THEN callback_center._adapter_request(o.endpoint_id, o.event_type," \
"                                           o.aggregate_id, o.payload) END," \
"  o.event_type, o.created_at, o.aggregate_id," \
"  CASE WHEN " EVENT_SIZE OP("<=") max " AND NOT o.endpoint_id" OP("=") "ANY (" fmt "::int4[])" \
"       THEN o.payload END"

static const char claim_sql[] =
CLAIM_PICK
"RETURNING o.id, o.endpoint_id, o.attempts" OP("+") "1, " EVENT_SIZE ","
"  " EVENT_PARTS("$5", "$6");

/*
 * The same claim without building any body, for when building them failed:
 * cc_queue_claim then builds each body alone (body_sql), so that one row
 * whose body cannot be built is made dead and the others go.
 */
static const char claim_bare_sql[] =
CLAIM_PICK
"RETURNING o.id, o.endpoint_id, o.attempts" OP("+") "1, " EVENT_SIZE;

static const char body_sql[] =
"SELECT " EVENT_PARTS("$2", "$3")
"  FROM callback_center.outbox o"
" WHERE o.id" OP("=") "$1";

/* The endpoints of a provider format, for the claim's $6. */
static int32 *formatted_ids = NULL;
static int	nformatted = 0;

/*
 * The record: the outbox rows, the attempts log (not for released jobs:
 * they were not attempted) and the published endpoint state, in one
 * statement per batch, each part reading the same arrays.  Each
 * data-modifying CTE runs to completion whether or not the query reads it;
 * they touch different tables, so sharing one snapshot changes nothing.
 * Returns how many outbox rows were updated.
 *
 * IS DISTINCT FROM finds its "=" on the search_path (it cannot be
 * qualified): the pinned path makes it pg_catalog's.
 */
static const char record_sql[] =
"WITH outbox AS ("
"  UPDATE callback_center.outbox o"
"     SET status = CASE WHEN r.fate" OP("=") "ANY (ARRAY['retry', 'released']) THEN 'pending'"
"                       ELSE r.fate END,"
"         attempts = o.attempts" OP("+") "(r.fate" OP("<>") "'released')::int,"
"         next_attempt_at = CASE WHEN r.fate" OP("=") "ANY (ARRAY['retry', 'released'])"
"                           THEN coalesce(r.next_at, pg_catalog.now()) ELSE pg_catalog.now() END,"
"         delivered_at = CASE WHEN r.fate" OP("=") "'delivered' THEN pg_catalog.now() END,"
"         last_http_status = CASE WHEN r.fate" OP("=") "'released' THEN o.last_http_status ELSE r.http_status END,"
"         last_error = CASE WHEN r.fate" OP("=") "'released' THEN o.last_error ELSE r.error END"
"    FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($2::text[]),"
"                    pg_catalog.unnest($3::timestamptz[]), pg_catalog.unnest($4::int4[]),"
"                    pg_catalog.unnest($5::text[]))"
"         AS r(id, fate, next_at, http_status, error)"
"   WHERE o.id" OP("=") "r.id"
"  RETURNING 1"
"), attempts AS ("
"  INSERT INTO callback_center.delivery_attempts"
"    (outbox_id, endpoint_id, attempt, http_status, latency_ms, error, response_body)"
"  SELECT a.id, a.endpoint_id, a.attempt, a.http_status, a.latency_ms, a.error, a.response_body"
"    FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($6::int4[]),"
"                    pg_catalog.unnest($7::int4[]), pg_catalog.unnest($4::int4[]),"
"                    pg_catalog.unnest($8::float4[]), pg_catalog.unnest($5::text[]),"
"                    pg_catalog.unnest($9::text[]), pg_catalog.unnest($2::text[]))"
"         AS a(id, endpoint_id, attempt, http_status, latency_ms, error, response_body, fate)"
"   WHERE a.fate" OP("<>") "'released'"
"), state AS ("
"  INSERT INTO callback_center.endpoint_state AS s"
"    (endpoint_id, breaker, opened_at, window_ok, window_fail, tokens, degraded, updated_at)"
"  SELECT u.*, pg_catalog.now()"
"    FROM ROWS FROM (pg_catalog.unnest($10::int4[]), pg_catalog.unnest($11::text[]),"
"                    pg_catalog.unnest($12::timestamptz[]), pg_catalog.unnest($13::int4[]),"
"                    pg_catalog.unnest($14::int4[]), pg_catalog.unnest($15::float8[]),"
"                    pg_catalog.unnest($16::bool[]))"
"         AS u(endpoint_id, breaker, opened_at, window_ok, window_fail, tokens, degraded)"
"      ON CONFLICT (endpoint_id) DO UPDATE"
"     SET breaker = excluded.breaker, opened_at = excluded.opened_at,"
"         window_ok = excluded.window_ok, window_fail = excluded.window_fail,"
"         tokens = excluded.tokens, degraded = excluded.degraded,"
"         updated_at = excluded.updated_at"
"   WHERE (s.breaker, s.opened_at, s.window_ok, s.window_fail, s.tokens, s.degraded)"
"         IS DISTINCT FROM (excluded.breaker, excluded.opened_at, excluded.window_ok,"
"                           excluded.window_fail, excluded.tokens, excluded.degraded)"
") "
"SELECT pg_catalog.count(*)::int8 FROM outbox";

static const char due_count_sql[] =
"SELECT pg_catalog.count(*)::int4 FROM ("
"  SELECT 1 FROM callback_center.outbox o"
"   WHERE o.endpoint_id" OP("=") "ANY ($1)"
"     AND" UNDELIVERED("o.status")
"     AND o.next_attempt_at" OP("<=") "pg_catalog.now()"
"   LIMIT $2) d";

static const char disable_sql[] =
"UPDATE callback_center.endpoints"
"   SET enabled = false, updated_at = pg_catalog.now()"
" WHERE id" OP("=") "ANY ($1) AND enabled"
" RETURNING id";

static const char bury_sql[] =
"WITH RECURSIVE ids(endpoint_id) AS ("
"  (SELECT o.endpoint_id FROM callback_center.outbox o"
"    WHERE" UNDELIVERED("o.status")
"    ORDER BY o.endpoint_id LIMIT 1)"
"  UNION ALL"
"  SELECT (SELECT o.endpoint_id FROM callback_center.outbox o"
"           WHERE" UNDELIVERED("o.status")
"             AND o.endpoint_id" OP(">") "ids.endpoint_id"
"           ORDER BY o.endpoint_id LIMIT 1)"
"    FROM ids WHERE ids.endpoint_id IS NOT NULL"
"), orphans AS MATERIALIZED ("
"  SELECT i.endpoint_id FROM ids i"
"   WHERE i.endpoint_id IS NOT NULL"
"     AND NOT EXISTS (SELECT 1 FROM callback_center.endpoints e"
"                      WHERE e.id" OP("=") "i.endpoint_id)"
") "
"UPDATE callback_center.outbox o"
"   SET status = 'dead', next_attempt_at = pg_catalog.now(),"
"       last_error = pg_catalog.format('endpoint %s no longer exists',"
"                                      o.endpoint_id)"
"  FROM orphans"
" WHERE o.endpoint_id" OP("=") "orphans.endpoint_id"
"   AND" UNDELIVERED("o.status");

/*
 * The statements, prepared once per process (spi.h) with a generic plan:
 * the arrays they take vary from one element to a whole batch, and a plan
 * made for one size (a hash join over the whole outbox for a large batch)
 * must not be kept for the others.  The generic plans probe indexes.
 */
/*
 * Provider-format endpoints (the adapter layer): each judged answer checked
 * with _adapter_check, in the order given; done events' answers kept with
 * _adapter_record (src/sql/46_adapters.sql).
 */
static const char check_answers_sql[] =
"SELECT r.i, c.ok, c.answer::text, c.error"
"  FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($2::int4[]),"
"                  pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[]))"
"       WITH ORDINALITY AS r(id, st, h, b, i)"
"  CROSS JOIN LATERAL callback_center._adapter_check(r.id, r.st, r.h, r.b) c";

static const char record_answers_sql[] =
"SELECT callback_center._adapter_record($1, $2, $3, $4::pg_catalog.jsonb[], $5)";

typedef enum QueuePlanId
{
	QUEUE_ENDPOINTS,
	QUEUE_NEXT_DUE,
	QUEUE_CLAIM,
	QUEUE_CLAIM_BARE,
	QUEUE_BODY,
	QUEUE_RECORD,
	QUEUE_DUE_COUNT,
	QUEUE_DISABLE,
	QUEUE_BURY,
	QUEUE_CHECK_ANSWERS,
	QUEUE_RECORD_ANSWERS,
	NUM_QUEUE_PLANS
} QueuePlanId;

#define GENERIC CURSOR_OPT_GENERIC_PLAN
static CcPlan plans[NUM_QUEUE_PLANS] = {
	[QUEUE_ENDPOINTS] = {endpoints_sql, 0, {InvalidOid}, 0, GENERIC},
	[QUEUE_NEXT_DUE] = {next_due_sql, 2, {INT4ARRAYOID, BOOLARRAYOID}, 0, GENERIC},
	[QUEUE_CLAIM] = {claim_sql, 6,
	{INT4ARRAYOID, INT4ARRAYOID, BOOLARRAYOID, FLOAT8OID, INT8OID, INT4ARRAYOID},
	0, GENERIC},
	[QUEUE_CLAIM_BARE] = {claim_bare_sql, 6,
	{INT4ARRAYOID, INT4ARRAYOID, BOOLARRAYOID, FLOAT8OID, INT8OID, INT4ARRAYOID},
	0, GENERIC},
	[QUEUE_BODY] = {body_sql, 3, {INT8OID, INT8OID, INT4ARRAYOID}, 0, GENERIC},
	[QUEUE_RECORD] = {record_sql, 16,
	{INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, INT4ARRAYOID, TEXTARRAYOID,
		INT4ARRAYOID, INT4ARRAYOID, FLOAT4ARRAYOID, TEXTARRAYOID,
		INT4ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, INT4ARRAYOID,
	INT4ARRAYOID, FLOAT8ARRAYOID, BOOLARRAYOID}, 0, GENERIC},
	[QUEUE_DUE_COUNT] = {due_count_sql, 2, {INT4ARRAYOID, INT4OID}, 0, GENERIC},
	[QUEUE_DISABLE] = {disable_sql, 1, {INT4ARRAYOID}, 0, GENERIC},
	[QUEUE_BURY] = {bury_sql, 0, {InvalidOid}, 0, GENERIC},
	[QUEUE_CHECK_ANSWERS] = {check_answers_sql, 4,
	{INT8ARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID}, 0, GENERIC},
	[QUEUE_RECORD_ANSWERS] = {record_answers_sql, 5,
	{INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID},
	0, GENERIC},
};
#undef GENERIC

/* Builds a one-dimensional array Datum; nulls may be NULL. */
static Datum
make_array(Datum *elems, bool *nulls, int n, Oid elemtype)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1];
	int			lbs[1];

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	dims[0] = n;
	lbs[0] = 1;
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs,
											  elemtype, typlen, typbyval,
											  typalign));
}

/*
 * Makes events left 'delivering' by a previous worker due now.  Nothing to
 * give back: an attempt is counted only when its outcome is recorded (with
 * its row in delivery_attempts, in the same statement), so a row claimed
 * and never sent, or sent and never recorded, counts no attempt.  The
 * receiver may have seen a request of the second kind: it gets the same
 * webhook-id again.
 */
int
cc_queue_recover(void)
{
	int			ret;
	uint64		n;

	SPI_connect();
	ret = SPI_execute("UPDATE callback_center.outbox"
					  "   SET status = 'pending', next_attempt_at = pg_catalog.now()"
					  " WHERE status" OP("=") "'delivering'", false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "callback_center: recovery failed: %s",
			 SPI_result_code_string(ret));
	n = SPI_processed;
	SPI_finish();
	return (int) n;
}

/* Returns the int8[] Datum as a palloc'd C array. */
static int64 *
int8_array(Datum d, int *n)
{
	ArrayType  *arr = DatumGetArrayTypeP(d);
	Datum	   *elems;
	bool	   *nulls;
	int			count;
	int64	   *out;
	int			i;

	deconstruct_array(arr, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &elems, &nulls, &count);
	out = palloc(sizeof(int64) * Max(count, 1));
	for (i = 0; i < count; i++)
		out[i] = nulls[i] ? 0 : DatumGetInt64(elems[i]);
	*n = count;
	return out;
}

/*
 * Loads every enabled endpoint with its decoded secret(s) and schedule.
 * Endpoints whose secret cannot be decoded are skipped with a WARNING (the
 * table's CHECK makes that unlikely).
 */
int
cc_queue_load_endpoints(CcEndpoint **endpoints)
{
	MemoryContext outer = CurrentMemoryContext;
	int			ret;
	int			i,
				n = 0;
	CcEndpoint *eps;

	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_ENDPOINTS]), NULL, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "callback_center: loading endpoints failed: %s",
			 SPI_result_code_string(ret));

	eps = MemoryContextAllocZero(outer,
								 sizeof(CcEndpoint) * Max(SPI_processed, 1));
	for (i = 0; i < (int) SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		CcEndpoint *e = &eps[n];
		bool		isnull;
		char	   *secret;
		char	   *prev;
		MemoryContext old;

		e->id = DatumGetInt32(SPI_getbinval(tup, td, 1, &isnull));
		old = MemoryContextSwitchTo(outer);
		e->name = SPI_getvalue(tup, td, 2);
		e->url = SPI_getvalue(tup, td, 3);
		secret = SPI_getvalue(tup, td, 4);
		prev = SPI_getvalue(tup, td, 5);
		if (!cc_webhook_secret_key(secret, &e->key, &e->keylen))
		{
			MemoryContextSwitchTo(old);
			ereport(WARNING,
					(errmsg("callback_center: endpoint \"%s\" has an unusable secret; skipped",
							e->name)));
			continue;
		}
		if (prev == NULL || !cc_webhook_secret_key(prev, &e->prev_key,
												   &e->prev_keylen))
			e->prev_key = NULL;
		e->delays_ms = int8_array(SPI_getbinval(tup, td, 8, &isnull),
								  &e->ndelays);
		MemoryContextSwitchTo(old);

		e->timeout_ms = DatumGetInt32(SPI_getbinval(tup, td, 6, &isnull));
		e->max_attempts = DatumGetInt32(SPI_getbinval(tup, td, 7, &isnull));
		e->rate_per_s = DatumGetFloat8(SPI_getbinval(tup, td, 9, &isnull));
		e->breaker_ratio = DatumGetFloat8(SPI_getbinval(tup, td, 10, &isnull));
		e->breaker_window_ms = DatumGetInt32(SPI_getbinval(tup, td, 11, &isnull)) * 1000;
		e->breaker_min_requests = DatumGetInt32(SPI_getbinval(tup, td, 12, &isnull));
		e->breaker_open_ms = DatumGetInt32(SPI_getbinval(tup, td, 13, &isnull));
		e->is_core = DatumGetBool(SPI_getbinval(tup, td, 14, &isnull));
		e->ordered = DatumGetBool(SPI_getbinval(tup, td, 15, &isnull));
		{
			char	   *format = SPI_getvalue(tup, td, 16);

			e->format = (format == NULL ||
						 strcmp(format, "standard_webhooks") == 0) ? NULL :
				MemoryContextStrdup(outer, format);
		}
		n++;
	}
	SPI_finish();

	/* The claim asks _adapter_request for these endpoints' requests. */
	if (formatted_ids == NULL)
		formatted_ids = MemoryContextAlloc(TopMemoryContext,
										   sizeof(int32) * Max(n, 1));
	else
		formatted_ids = repalloc(formatted_ids, sizeof(int32) * Max(n, 1));
	nformatted = 0;
	for (i = 0; i < n; i++)
		if (eps[i].format != NULL)
			formatted_ids[nformatted++] = eps[i].id;
	*endpoints = eps;
	return n;
}

/*
 * The webhook body: the text of jsonb_build_object('type', event_type,
 * 'timestamp', created_at, 'aggregate_id', aggregate_id, 'data', payload),
 * printed here instead: building that object copies the payload into a new
 * jsonb only to print it again.  The keys come in jsonb's order (shorter
 * first, then bytewise) and the timestamp as jsonb prints one, in the
 * worker's TimeZone; receivers see the bytes they always did.
 */
static void
event_body(StringInfo out, Datum event_type, Datum created_at,
		   Datum aggregate_id, Datum payload)
{
	Jsonb	   *data = DatumGetJsonbP(payload);
	char		ts[MAXDATELEN + 1];

	appendStringInfoString(out, "{\"data\": ");
	(void) JsonbToCString(out, &data->root, VARSIZE(data));
	appendStringInfoString(out, ", \"type\": ");
	escape_json(out, TextDatumGetCString(event_type));
	appendStringInfoString(out, ", \"timestamp\": \"");
	appendStringInfoString(out, JsonEncodeDateTime(ts, created_at,
												   TIMESTAMPTZOID, NULL));
	appendStringInfoString(out, "\", \"aggregate_id\": ");
	escape_json(out, TextDatumGetCString(aggregate_id));
	appendStringInfoChar(out, '}');
}

/*
 * Sets job's body from the EVENT_PARTS columns of tup starting at column
 * col (allocated in cxt): the provider request, or the webhook body built
 * from its columns.  False when there is neither (too large to build).
 */
static bool
job_body(CcJob *job, HeapTuple tup, TupleDesc td, int col, MemoryContext cxt)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, td, col, &isnull);

	if (!isnull)
	{
		text	   *body = DatumGetTextPP(d);

		job->body_len = VARSIZE_ANY_EXHDR(body);
		job->body = MemoryContextAlloc(cxt, job->body_len + 1);
		memcpy(job->body, VARDATA_ANY(body), job->body_len);
		job->body[job->body_len] = '\0';
		return true;
	}
	d = SPI_getbinval(tup, td, col + 4, &isnull);
	if (!isnull)
	{
		StringInfoData buf;
		bool		n1,
					n2,
					n3;

		initStringInfo(&buf);
		event_body(&buf, SPI_getbinval(tup, td, col + 1, &n1),
				   SPI_getbinval(tup, td, col + 2, &n2),
				   SPI_getbinval(tup, td, col + 3, &n3), d);
		job->body_len = buf.len;
		job->body = MemoryContextAlloc(cxt, buf.len + 1);
		memcpy(job->body, buf.data, buf.len + 1);
		pfree(buf.data);
		return true;
	}
	return false;
}

/*
 * Copies the claim's result rows into jobs[] (allocated in cxt).  A row
 * without a body was too large to build (its size is column 4); with bare,
 * no row has a body yet.
 */
static CcJob *
claim_copy_jobs(MemoryContext cxt, int count, int64 max_size, bool bare)
{
	CcJob	   *out = MemoryContextAllocZero(cxt, sizeof(CcJob) * Max(count, 1));
	int			i;

	for (i = 0; i < count; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		size;

		out[i].id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
		out[i].endpoint_id = DatumGetInt32(SPI_getbinval(tup, td, 2, &isnull));
		out[i].attempt = DatumGetInt32(SPI_getbinval(tup, td, 3, &isnull));
		size = DatumGetInt64(SPI_getbinval(tup, td, 4, &isnull));
		if (bare ? size > max_size : !job_body(&out[i], tup, td, 5, cxt))
			out[i].error = MemoryContextStrdup(cxt,
											   psprintf("event of " INT64_FORMAT " bytes exceeds callback_center.max_event_size (" INT64_FORMAT " bytes)",
														size, max_size));
	}
	return out;
}

/*
 * Builds the body of each job that has neither a body nor an error, one
 * statement per job in a subtransaction of its own: a job whose body
 * cannot be built gets the error instead, and the others their bodies.
 * For the rare round whose claim failed to build the batch's bodies.
 */
static void
claim_build_bodies_one_by_one(MemoryContext cxt, CcJob *jobs, int count,
							  Datum max_size, Datum formatted)
{
	SPIPlanPtr	body_plan = cc_plan(&plans[QUEUE_BODY]);
	Datum		args[3] = {0, max_size, formatted};
	int			i;

	for (i = 0; i < count; i++)
	{
		ResourceOwner owner = CurrentResourceOwner;
		if (jobs[i].body != NULL || jobs[i].error != NULL)
			continue;
		args[0] = Int64GetDatum(jobs[i].id);
		BeginInternalSubTransaction(NULL);
		PG_TRY();
		{
			int			ret = SPI_execute_plan(body_plan, args, NULL, false, 1);

			if (ret != SPI_OK_SELECT)
				elog(ERROR, "callback_center: building a request failed: %s",
					 SPI_result_code_string(ret));
			if (SPI_processed != 1 ||
				!job_body(&jobs[i], SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
						  1, cxt))
				jobs[i].error = MemoryContextStrdup(cxt, "the event is gone");
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
			/* A cancel says nothing of the row: the round is abandoned. */
			if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
				ReThrowError(edata);
			if (jobs[i].body != NULL)
				pfree(jobs[i].body);
			jobs[i].body = NULL;
			jobs[i].body_len = 0;
			jobs[i].error = psprintf("could not build the request: %s",
									 edata->message);
			ereport(WARNING,
					(errmsg("callback_center: event %lld cannot be sent: %s",
							(long long) jobs[i].id, edata->message),
					 errdetail("The event is made dead; the others are sent.")));
			FreeErrorData(edata);
		}
		PG_END_TRY();
	}
}

/*
 * Claims up to quotas[i] due events of endpoint endpoint_ids[i] (oldest
 * first; with ordered[i], only the oldest undelivered event of each
 * aggregate), marks them delivering with a lease of lease_s seconds and
 * returns each with the number its attempt will have (counted when its
 * outcome is recorded).  Returns the number claimed.
 *
 * A job whose request cannot be built (larger than max_size bytes, or its
 * body fails to build) comes back with error set and no body: the caller
 * makes it dead without sending it.  The batch's bodies are built in the
 * claim statement, in a subtransaction; when that fails, the claim is
 * rolled back and made again without bodies, and each body is built on its
 * own, so that one bad row cannot keep the others from being sent.
 */
int
cc_queue_claim(const int32 *endpoint_ids, const int32 *quotas,
			   const bool *ordered, int n, int lease_s, int64 max_size,
			   CcJob **jobs)
{
	MemoryContext outer = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Datum		values[6];
	Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *qs = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *ords = palloc(sizeof(Datum) * Max(n, 1));
	CcJob	   *volatile out = NULL;
	volatile int count = 0;
	volatile bool failed = false;
	int			ret;
	int			i;

	*jobs = NULL;
	if (n == 0)
		return 0;
	for (i = 0; i < n; i++)
	{
		ids[i] = Int32GetDatum(endpoint_ids[i]);
		qs[i] = Int32GetDatum(quotas[i]);
		ords[i] = BoolGetDatum(ordered[i]);
	}
	values[0] = make_array(ids, NULL, n, INT4OID);
	values[1] = make_array(qs, NULL, n, INT4OID);
	values[2] = make_array(ords, NULL, n, BOOLOID);
	values[3] = Float8GetDatum((double) lease_s);
	values[4] = Int64GetDatum(max_size);
	{
		Datum	   *fids = palloc(sizeof(Datum) * Max(nformatted, 1));

		for (i = 0; i < nformatted; i++)
			fids[i] = Int32GetDatum(formatted_ids[i]);
		values[5] = make_array(fids, NULL, nformatted, INT4OID);
	}

	SPI_connect();
	(void) cc_plan(&plans[QUEUE_CLAIM]);
	(void) cc_plan(&plans[QUEUE_CLAIM_BARE]);

	BeginInternalSubTransaction(NULL);
	PG_TRY();
	{
		ret = SPI_execute_plan(cc_plan(&plans[QUEUE_CLAIM]), values, NULL,
							   false, 0);
		if (ret != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "callback_center: claim failed: %s",
				 SPI_result_code_string(ret));
		count = (int) SPI_processed;
		out = claim_copy_jobs(outer, count, max_size, false);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(outer);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = owner;
		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(edata);
		ereport(WARNING,
				(errmsg("callback_center: claiming a batch failed: %s",
						edata->message),
				 errdetail("The batch is claimed again and each request built on its own.")));
		FreeErrorData(edata);
		failed = true;
	}
	PG_END_TRY();

	if (failed)
	{
		ret = SPI_execute_plan(cc_plan(&plans[QUEUE_CLAIM_BARE]), values,
							   NULL, false, 0);
		if (ret != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "callback_center: claim failed: %s",
				 SPI_result_code_string(ret));
		count = (int) SPI_processed;
		out = claim_copy_jobs(outer, count, max_size, true);
		claim_build_bodies_one_by_one(outer, out, count, values[4], values[5]);
	}
	SPI_finish();
	*jobs = out;
	return count;
}

static Datum
text_or_null(const char *s, bool *isnull)
{
	*isnull = (s == NULL);
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

/*
 * Records the outcome of n jobs and the published endpoint state in one
 * set-based statement (record_sql).  Endpoints in gone[] answered 410 and
 * are disabled.
 */
void
cc_queue_record(const CcJob *jobs, const CcJobResult *results, int n,
				const int32 *gone, int ngone,
				const CcEndpointSnapshot *snaps, int nsnaps)
{
	static const char *fate_names[] = {"delivered", "retry", "dead", "released"};
	Datum		values[16];
	int			m = Max(Max(n, nsnaps), 1);
	Datum	   *d_id = palloc(sizeof(Datum) * m);
	Datum	   *d_fate = palloc(sizeof(Datum) * m);
	Datum	   *d_next = palloc(sizeof(Datum) * m);
	bool	   *n_next = palloc(sizeof(bool) * m);
	Datum	   *d_status = palloc(sizeof(Datum) * m);
	bool	   *n_status = palloc(sizeof(bool) * m);
	Datum	   *d_err = palloc(sizeof(Datum) * m);
	bool	   *n_err = palloc(sizeof(bool) * m);
	Datum	   *d_ep = palloc(sizeof(Datum) * m);
	Datum	   *d_att = palloc(sizeof(Datum) * m);
	Datum	   *d_lat = palloc(sizeof(Datum) * m);
	Datum	   *d_resp = palloc(sizeof(Datum) * m);
	bool	   *n_resp = palloc(sizeof(bool) * m);
	Datum	   *s_id = palloc(sizeof(Datum) * m);
	Datum	   *s_br = palloc(sizeof(Datum) * m);
	Datum	   *s_op = palloc(sizeof(Datum) * m);
	bool	   *sn_op = palloc(sizeof(bool) * m);
	Datum	   *s_ok = palloc(sizeof(Datum) * m);
	Datum	   *s_fail = palloc(sizeof(Datum) * m);
	Datum	   *s_tok = palloc(sizeof(Datum) * m);
	bool	   *sn_tok = palloc(sizeof(bool) * m);
	Datum	   *s_deg = palloc(sizeof(Datum) * m);
	int			i;
	int			ret;

	for (i = 0; i < n; i++)
	{
		const CcJobResult *r = &results[i];

		d_id[i] = Int64GetDatum(jobs[i].id);
		d_fate[i] = CStringGetTextDatum(fate_names[r->fate]);
		d_next[i] = TimestampTzGetDatum(r->next_at);
		n_next[i] = (r->fate != CC_FATE_RETRY);
		d_status[i] = Int32GetDatum(r->http_status);
		n_status[i] = (r->http_status == 0);
		d_err[i] = text_or_null(r->error, &n_err[i]);
		d_ep[i] = Int32GetDatum(jobs[i].endpoint_id);
		d_att[i] = Int32GetDatum(jobs[i].attempt);
		d_lat[i] = Float4GetDatum((float4) r->latency_ms);
		d_resp[i] = text_or_null(r->response, &n_resp[i]);
	}
	for (i = 0; i < nsnaps; i++)
	{
		s_id[i] = Int32GetDatum(snaps[i].endpoint_id);
		s_br[i] = CStringGetTextDatum(snaps[i].breaker);
		s_op[i] = TimestampTzGetDatum(snaps[i].opened_at);
		sn_op[i] = (snaps[i].opened_at == 0);
		s_ok[i] = Int32GetDatum(snaps[i].window_ok);
		s_fail[i] = Int32GetDatum(snaps[i].window_fail);
		/* tokens rounded so an idle bucket does not rewrite its row */
		s_tok[i] = Float8GetDatum(floor(snaps[i].tokens));
		sn_tok[i] = (snaps[i].tokens < 0);
		s_deg[i] = BoolGetDatum(snaps[i].degraded);
	}
	values[0] = make_array(d_id, NULL, n, INT8OID);
	values[1] = make_array(d_fate, NULL, n, TEXTOID);
	values[2] = make_array(d_next, n_next, n, TIMESTAMPTZOID);
	values[3] = make_array(d_status, n_status, n, INT4OID);
	values[4] = make_array(d_err, n_err, n, TEXTOID);
	values[5] = make_array(d_ep, NULL, n, INT4OID);
	values[6] = make_array(d_att, NULL, n, INT4OID);
	values[7] = make_array(d_lat, NULL, n, FLOAT4OID);
	values[8] = make_array(d_resp, n_resp, n, TEXTOID);
	values[9] = make_array(s_id, NULL, nsnaps, INT4OID);
	values[10] = make_array(s_br, NULL, nsnaps, TEXTOID);
	values[11] = make_array(s_op, sn_op, nsnaps, TIMESTAMPTZOID);
	values[12] = make_array(s_ok, NULL, nsnaps, INT4OID);
	values[13] = make_array(s_fail, NULL, nsnaps, INT4OID);
	values[14] = make_array(s_tok, sn_tok, nsnaps, FLOAT8OID);
	values[15] = make_array(s_deg, NULL, nsnaps, BOOLOID);

	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_RECORD]), values, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "callback_center: recording results failed: %s",
			 SPI_result_code_string(ret));
	{
		bool		isnull;
		int64		updated = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														  SPI_tuptable->tupdesc,
														  1, &isnull));

		/* Fewer when drop_endpoint removed rows in flight; never more. */
		if (updated > n)
			elog(ERROR, "callback_center: recording %d results changed " INT64_FORMAT " outbox rows",
				 n, updated);
	}
	if (ngone > 0)
	{
		Datum	   *g = palloc(sizeof(Datum) * ngone);
		Datum		values[1];

		for (i = 0; i < ngone; i++)
			g[i] = Int32GetDatum(gone[i]);
		values[0] = make_array(g, NULL, ngone, INT4OID);
		ret = SPI_execute_plan(cc_plan(&plans[QUEUE_DISABLE]),
							   values, NULL, false, 0);
		if (ret != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "callback_center: disabling endpoints failed: %s",
				 SPI_result_code_string(ret));
		for (i = 0; i < (int) SPI_processed; i++)
		{
			bool		isnull;

			ereport(LOG,
					(errmsg("callback_center: endpoint %d answered 410 Gone and was disabled",
							DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i],
														SPI_tuptable->tupdesc,
														1, &isnull)))));
		}
	}
	SPI_finish();
}

/*
 * Milliseconds from the claim's now() until the first event the claim could
 * take for one of the n endpoints falls due (0 when one was due then), or
 * -1 when none waits.  The caller passes only the endpoints it would
 * claim for: events held back (open breaker, empty bucket, degraded) must
 * not count, or the worker would wake at once to claim nothing, for ever.
 * One index probe per endpoint (more for an ordered endpoint with events
 * blocked behind a retry, as in the claim).
 */
int64
cc_queue_next_due_ms(const int32 *endpoint_ids, const bool *ordered, int n)
{
	Datum		values[2];
	Datum	   *ids;
	Datum	   *ords;
	int			ret;
	int			i;
	int64		result = -1;

	if (n == 0)
		return -1;
	ids = palloc(sizeof(Datum) * n);
	ords = palloc(sizeof(Datum) * n);
	for (i = 0; i < n; i++)
	{
		ids[i] = Int32GetDatum(endpoint_ids[i]);
		ords[i] = BoolGetDatum(ordered[i]);
	}
	values[0] = make_array(ids, NULL, n, INT4OID);
	values[1] = make_array(ords, NULL, n, BOOLOID);
	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_NEXT_DUE]),
						   values, NULL, true, 1);
	if (ret == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			result = DatumGetInt64(d);
	}
	SPI_finish();
	return result;
}

/*
 * Marks dead the undelivered events whose endpoint no longer exists (a
 * REPEATABLE READ enqueue whose snapshot predates drop_endpoint can still
 * queue one; see doc/outbox.md), with last_error naming the endpoint id.
 * Returns how many.  Finds the endpoints of the pending set with one index
 * probe per distinct endpoint (a skip scan of outbox_due), so it costs the
 * same however long the backlog.
 */
int
cc_queue_bury_orphans(void)
{
	int			ret;
	uint64		n;

	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_BURY]), NULL, NULL, false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "callback_center: marking events of dropped endpoints failed: %s",
			 SPI_result_code_string(ret));
	n = SPI_processed;
	SPI_finish();
	if (n > 0)
		ereport(LOG,
				(errmsg("callback_center: marked " UINT64_FORMAT " events of dropped endpoints dead",
						n)));
	return (int) n;
}

/*
 * How many events of the given endpoints are due now, counting no further
 * than limit: at most limit entries of outbox_due are read, however long
 * the backlog.
 */
int
cc_queue_due_count(const int32 *endpoint_ids, int n, int limit)
{
	Datum		values[2];
	Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
	int			ret;
	int			i;
	int			count = 0;

	if (n == 0 || limit <= 0)
		return 0;
	for (i = 0; i < n; i++)
		ids[i] = Int32GetDatum(endpoint_ids[i]);
	values[0] = make_array(ids, NULL, n, INT4OID);
	values[1] = Int32GetDatum(limit);
	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_DUE_COUNT]),
						   values, NULL, true, 1);
	if (ret == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			count = DatumGetInt32(d);
	}
	SPI_finish();
	return count;
}

/*
 * Checks the responses of n provider-format events (outbox ids[i], HTTP
 * statuses[i], captured headers[i], bodies[i]) with _adapter_check: ok[i]
 * when the provider's signature verifies, with answers[i] the normalized
 * answer (jsonb text); else errors[i] says why.  One statement; results
 * are allocated in the caller's context.
 */
void
cc_queue_check_answers(int n, const int64 *ids, const int *statuses,
					   char *const *headers, char *const *bodies,
					   bool *ok, char **answers, char **errors)
{
	MemoryContext outer = CurrentMemoryContext;
	Datum		values[4];
	Datum	   *d_id = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *d_st = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *d_h = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_h = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *d_b = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_b = palloc(sizeof(bool) * Max(n, 1));
	int			ret;
	int			i;

	if (n == 0)
		return;
	for (i = 0; i < n; i++)
	{
		d_id[i] = Int64GetDatum(ids[i]);
		d_st[i] = Int32GetDatum(statuses[i]);
		d_h[i] = text_or_null(headers[i], &n_h[i]);
		d_b[i] = text_or_null(bodies[i], &n_b[i]);
		ok[i] = false;
		answers[i] = NULL;
		errors[i] = "the response was not checked";
	}
	values[0] = make_array(d_id, NULL, n, INT8OID);
	values[1] = make_array(d_st, NULL, n, INT4OID);
	values[2] = make_array(d_h, n_h, n, TEXTOID);
	values[3] = make_array(d_b, n_b, n, TEXTOID);
	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_CHECK_ANSWERS]), values, NULL,
						   false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "callback_center: checking provider answers failed: %s",
			 SPI_result_code_string(ret));
	for (i = 0; i < (int) SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		k = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull)) - 1;
		MemoryContext old;

		if (k < 0 || k >= n)
			continue;
		ok[k] = DatumGetBool(SPI_getbinval(tup, td, 2, &isnull)) && !isnull;
		old = MemoryContextSwitchTo(outer);
		answers[k] = SPI_getvalue(tup, td, 3);
		errors[k] = SPI_getvalue(tup, td, 4);
		MemoryContextSwitchTo(old);
	}
	SPI_finish();
}

/*
 * Keeps the normalized answers of n provider-format events that are done
 * (answers[i] for a delivered one, errors[i] for a dead one) with
 * _adapter_record, in the transaction recording their attempts.
 */
void
cc_queue_record_answers(int n, const int64 *ids, const int *attempts,
						const int *statuses, char *const *answers,
						char *const *errors)
{
	Datum		values[5];
	Datum	   *d_id = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *d_att = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *d_st = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_st = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *d_ans = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_ans = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *d_err = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_err = palloc(sizeof(bool) * Max(n, 1));
	int			ret;
	int			i;

	if (n == 0)
		return;
	for (i = 0; i < n; i++)
	{
		d_id[i] = Int64GetDatum(ids[i]);
		d_att[i] = Int32GetDatum(attempts[i]);
		d_st[i] = Int32GetDatum(statuses[i]);
		n_st[i] = (statuses[i] == 0);
		d_ans[i] = text_or_null(answers[i], &n_ans[i]);
		d_err[i] = text_or_null(errors[i], &n_err[i]);
	}
	values[0] = make_array(d_id, NULL, n, INT8OID);
	values[1] = make_array(d_att, NULL, n, INT4OID);
	values[2] = make_array(d_st, n_st, n, INT4OID);
	values[3] = make_array(d_ans, n_ans, n, TEXTOID);
	values[4] = make_array(d_err, n_err, n, TEXTOID);
	SPI_connect();
	ret = SPI_execute_plan(cc_plan(&plans[QUEUE_RECORD_ANSWERS]), values, NULL,
						   false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "callback_center: recording provider answers failed: %s",
			 SPI_result_code_string(ret));
	SPI_finish();
}
