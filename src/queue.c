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

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "queue.h"
#include "signature.h"

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr record_plan = NULL;
static SPIPlanPtr attempts_plan = NULL;
static SPIPlanPtr state_plan = NULL;
static SPIPlanPtr endpoints_plan = NULL;
static SPIPlanPtr next_due_plan = NULL;

static const char *endpoints_sql =
"SELECT e.id, e.name, e.url, s.secret,"
"       CASE WHEN s.rotated_at > now() - interval '24 hours'"
"            THEN s.previous_secret END,"
"       e.timeout_ms,"
"       coalesce(e.max_attempts, cardinality(r.delays) + 1),"
"       ARRAY(SELECT (extract(epoch FROM d) * 1000)::int8"
"               FROM unnest(r.delays) d),"
"       coalesce(e.rate_limit_per_s, 0)::float8,"
"       e.breaker_failure_ratio::float8, e.breaker_window_s,"
"       e.breaker_min_requests, e.breaker_open_ms,"
"       e.is_core, e.ordered"
"  FROM callback_center.endpoints e"
"  JOIN callback_center.endpoint_secrets s ON s.endpoint_id = e.id"
"  JOIN callback_center.retry_schedules r ON r.name = e.retry_schedule"
" WHERE e.enabled ORDER BY e.id";

/*
 * For an ordered endpoint (q.ordered), only the oldest undelivered event of
 * each aggregate may go: the claim and the next-due look-up share this
 * condition on outbox row o.
 */
#define AGGREGATE_HEAD \
"       AND (NOT q.ordered OR NOT EXISTS (" \
"             SELECT 1 FROM callback_center.outbox p" \
"              WHERE p.endpoint_id = o.endpoint_id" \
"                AND p.aggregate_id = o.aggregate_id" \
"                AND p.status IN ('pending', 'delivering')" \
"                AND p.id < o.id))"

/*
 * When the first event the claim could take for each endpoint in $1 falls
 * due, in milliseconds after the claim's now() (0: it was due then).  For an
 * ordered endpoint ($2) only the head of each aggregate counts: events
 * waiting behind an earlier one that waits for its retry are not due,
 * however old their next_attempt_at.
 */
static const char *next_due_sql =
"SELECT greatest(0, ceil(extract(epoch FROM min(n.t) - now()) * 1000))::int8"
"  FROM unnest($1::int4[], $2::bool[]) AS q(endpoint_id, ordered)"
"  CROSS JOIN LATERAL ("
"    SELECT o.next_attempt_at AS t FROM callback_center.outbox o"
"     WHERE o.endpoint_id = q.endpoint_id"
"       AND o.status IN ('pending', 'delivering')"
AGGREGATE_HEAD
"     ORDER BY o.next_attempt_at LIMIT 1) n";

/*
 * Claims oldest-due first, per endpoint, respecting ordering.  The rows to
 * update are found by primary key from the locked ids (= ANY of an array),
 * never by a join the planner could turn into a scan of the whole outbox:
 * the outbox keeps its delivered history, the claim must not see it.
 */
static const char *claim_sql =
"UPDATE callback_center.outbox o"
"   SET status = 'delivering', attempts = o.attempts + 1,"
"       next_attempt_at = now() + make_interval(secs => $4)"
" WHERE o.id = ANY (ARRAY("
"  SELECT d.id"
"    FROM unnest($1::int4[], $2::int4[], $3::bool[]) AS q(endpoint_id, n, ordered)"
"   CROSS JOIN LATERAL ("
"    SELECT o.id FROM callback_center.outbox o"
"     WHERE o.endpoint_id = q.endpoint_id"
"       AND o.status IN ('pending', 'delivering')"
"       AND o.next_attempt_at <= now()"
AGGREGATE_HEAD
"     ORDER BY o.next_attempt_at"
"     LIMIT q.n"
"     FOR UPDATE SKIP LOCKED) d)) "
"RETURNING o.id, o.endpoint_id, o.attempts,"
"  jsonb_build_object('type', o.event_type, 'timestamp', o.created_at,"
"                     'aggregate_id', o.aggregate_id, 'data', o.payload)::text";

static const char *record_sql =
"UPDATE callback_center.outbox o"
"   SET status = CASE r.fate WHEN 'released' THEN 'pending' WHEN 'retry' THEN 'pending' ELSE r.fate END,"
"       attempts = o.attempts - (r.fate = 'released')::int,"
"       next_attempt_at = CASE WHEN r.fate IN ('retry', 'released') THEN coalesce(r.next_at, now()) ELSE now() END,"
"       delivered_at = CASE WHEN r.fate = 'delivered' THEN now() END,"
"       last_http_status = CASE WHEN r.fate = 'released' THEN o.last_http_status ELSE r.http_status END,"
"       last_error = CASE WHEN r.fate = 'released' THEN o.last_error ELSE r.error END"
"  FROM unnest($1::int8[], $2::text[], $3::timestamptz[], $4::int4[], $5::text[])"
"       AS r(id, fate, next_at, http_status, error)"
" WHERE o.id = r.id";

static const char *attempts_sql =
"INSERT INTO callback_center.delivery_attempts"
"  (outbox_id, endpoint_id, attempt, http_status, latency_ms, error, response_body)"
"SELECT * FROM unnest($1::int8[], $2::int4[], $3::int4[], $4::int4[],"
"                     $5::float4[], $6::text[], $7::text[])";

static const char *state_sql =
"INSERT INTO callback_center.endpoint_state AS s"
"  (endpoint_id, breaker, opened_at, window_ok, window_fail, tokens, degraded, updated_at)"
"SELECT u.*, now() FROM unnest($1::int4[], $2::text[], $3::timestamptz[], $4::int4[],"
"                              $5::int4[], $6::float8[], $7::bool[])"
"       AS u(endpoint_id, breaker, opened_at, window_ok, window_fail, tokens, degraded)"
"    ON CONFLICT (endpoint_id) DO UPDATE"
"   SET breaker = excluded.breaker, opened_at = excluded.opened_at,"
"       window_ok = excluded.window_ok, window_fail = excluded.window_fail,"
"       tokens = excluded.tokens, degraded = excluded.degraded,"
"       updated_at = excluded.updated_at"
" WHERE (s.breaker, s.opened_at, s.window_ok, s.window_fail, s.tokens, s.degraded)"
"       IS DISTINCT FROM (excluded.breaker, excluded.opened_at, excluded.window_ok,"
"                         excluded.window_fail, excluded.tokens, excluded.degraded)";

/*
 * Prepares a statement once per process, with a generic plan: the arrays
 * the statements take vary from one element to a whole batch, and a plan
 * made for one size (a hash join over the whole outbox for a large batch)
 * must not be kept for the others.  The generic plans probe indexes.
 */
static SPIPlanPtr
prepare_once(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, types,
										   CURSOR_OPT_GENERIC_PLAN);

		if (p == NULL)
			elog(ERROR, "callback_center: SPI_prepare failed: %s",
				 SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}

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
 * Makes events left 'delivering' by a previous worker due now.  Their
 * attempt stays counted: it may have reached the receiver.
 */
int
cc_queue_recover(void)
{
	int			ret;
	uint64		n;

	SPI_connect();
	ret = SPI_execute("UPDATE callback_center.outbox"
					  "   SET status = 'pending', next_attempt_at = now()"
					  " WHERE status = 'delivering'", false, 0);
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
	ret = SPI_execute_plan(prepare_once(&endpoints_plan, endpoints_sql, 0,
										NULL),
						   NULL, NULL, true, 0);
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
		n++;
	}
	SPI_finish();
	*endpoints = eps;
	return n;
}

/*
 * Claims up to quotas[i] due events of endpoint endpoint_ids[i] (oldest
 * first; with ordered[i], only the oldest undelivered event of each
 * aggregate), marks them delivering with a lease of lease_s seconds and
 * counts the attempt.  Returns the number claimed.
 */
int
cc_queue_claim(const int32 *endpoint_ids, const int32 *quotas,
			   const bool *ordered, int n, int lease_s, CcJob **jobs)
{
	MemoryContext outer = CurrentMemoryContext;
	Oid			types[4] = {INT4ARRAYOID, INT4ARRAYOID, BOOLARRAYOID, FLOAT8OID};
	Datum		values[4];
	Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *qs = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *ords = palloc(sizeof(Datum) * Max(n, 1));
	CcJob	   *out;
	int			ret;
	int			i;
	int			count;

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

	SPI_connect();
	ret = SPI_execute_plan(prepare_once(&claim_plan, claim_sql, 4, types),
						   values, NULL, false, 0);
	if (ret != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "callback_center: claim failed: %s",
			 SPI_result_code_string(ret));

	count = (int) SPI_processed;
	out = MemoryContextAlloc(outer, sizeof(CcJob) * Max(count, 1));
	for (i = 0; i < count; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		text	   *body;

		out[i].id = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull));
		out[i].endpoint_id = DatumGetInt32(SPI_getbinval(tup, td, 2, &isnull));
		out[i].attempt = DatumGetInt32(SPI_getbinval(tup, td, 3, &isnull));
		body = DatumGetTextPP(SPI_getbinval(tup, td, 4, &isnull));
		out[i].body_len = VARSIZE_ANY_EXHDR(body);
		out[i].body = MemoryContextAlloc(outer, out[i].body_len + 1);
		memcpy(out[i].body, VARDATA_ANY(body), out[i].body_len);
		out[i].body[out[i].body_len] = '\0';
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
 * Records the outcome of n jobs in three set-based statements: the outbox
 * rows, the attempts log (not for released jobs: they were not attempted),
 * and the published endpoint state.  Endpoints in gone[] answered 410 and
 * are disabled.
 */
void
cc_queue_record(const CcJob *jobs, const CcJobResult *results, int n,
				const int32 *gone, int ngone,
				const CcEndpointSnapshot *snaps, int nsnaps)
{
	static const char *fate_names[] = {"delivered", "retry", "dead", "released"};
	Datum	   *d_id = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *d_fate = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *d_next = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_next = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *d_status = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_status = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *d_err = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *n_err = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *a_id = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *a_ep = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *a_att = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *a_status = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *an_status = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *a_lat = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *a_err = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *an_err = palloc(sizeof(bool) * Max(n, 1));
	Datum	   *a_resp = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *an_resp = palloc(sizeof(bool) * Max(n, 1));
	int			na = 0;
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

		if (r->fate == CC_FATE_RELEASED)
			continue;
		a_id[na] = Int64GetDatum(jobs[i].id);
		a_ep[na] = Int32GetDatum(jobs[i].endpoint_id);
		a_att[na] = Int32GetDatum(jobs[i].attempt);
		a_status[na] = d_status[i];
		an_status[na] = n_status[i];
		a_lat[na] = Float4GetDatum((float4) r->latency_ms);
		a_err[na] = d_err[i];
		an_err[na] = n_err[i];
		a_resp[na] = text_or_null(r->response, &an_resp[na]);
		na++;
	}

	SPI_connect();
	if (n > 0)
	{
		Oid			types[5] = {INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
		INT4ARRAYOID, TEXTARRAYOID};
		Datum		values[5];

		values[0] = make_array(d_id, NULL, n, INT8OID);
		values[1] = make_array(d_fate, NULL, n, TEXTOID);
		values[2] = make_array(d_next, n_next, n, TIMESTAMPTZOID);
		values[3] = make_array(d_status, n_status, n, INT4OID);
		values[4] = make_array(d_err, n_err, n, TEXTOID);
		ret = SPI_execute_plan(prepare_once(&record_plan, record_sql, 5, types),
							   values, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "callback_center: recording results failed: %s",
				 SPI_result_code_string(ret));
	}
	if (na > 0)
	{
		Oid			types[7] = {INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID,
			INT4ARRAYOID, FLOAT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
		Datum		values[7];

		values[0] = make_array(a_id, NULL, na, INT8OID);
		values[1] = make_array(a_ep, NULL, na, INT4OID);
		values[2] = make_array(a_att, NULL, na, INT4OID);
		values[3] = make_array(a_status, an_status, na, INT4OID);
		values[4] = make_array(a_lat, NULL, na, FLOAT4OID);
		values[5] = make_array(a_err, an_err, na, TEXTOID);
		values[6] = make_array(a_resp, an_resp, na, TEXTOID);
		ret = SPI_execute_plan(prepare_once(&attempts_plan, attempts_sql, 7, types),
							   values, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "callback_center: logging attempts failed: %s",
				 SPI_result_code_string(ret));
	}
	if (ngone > 0)
	{
		Datum	   *g = palloc(sizeof(Datum) * ngone);
		Datum		values[1];
		Oid			types[1] = {INT4ARRAYOID};

		for (i = 0; i < ngone; i++)
			g[i] = Int32GetDatum(gone[i]);
		values[0] = make_array(g, NULL, ngone, INT4OID);
		ret = SPI_execute_with_args("UPDATE callback_center.endpoints"
									"   SET enabled = false, updated_at = now()"
									" WHERE id = ANY ($1) AND enabled",
									1, types, values, NULL, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "callback_center: disabling endpoints failed: %s",
				 SPI_result_code_string(ret));
		for (i = 0; i < (int) SPI_processed; i++)
			ereport(LOG,
					(errmsg("callback_center: endpoint %d answered 410 Gone and was disabled",
							gone[i])));
	}
	if (nsnaps > 0)
	{
		Oid			types[7] = {INT4ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
			INT4ARRAYOID, INT4ARRAYOID, FLOAT8ARRAYOID, BOOLARRAYOID};
		Datum		values[7];
		Datum	   *s_id = palloc(sizeof(Datum) * nsnaps);
		Datum	   *s_br = palloc(sizeof(Datum) * nsnaps);
		Datum	   *s_op = palloc(sizeof(Datum) * nsnaps);
		bool	   *sn_op = palloc(sizeof(bool) * nsnaps);
		Datum	   *s_ok = palloc(sizeof(Datum) * nsnaps);
		Datum	   *s_fail = palloc(sizeof(Datum) * nsnaps);
		Datum	   *s_tok = palloc(sizeof(Datum) * nsnaps);
		bool	   *sn_tok = palloc(sizeof(bool) * nsnaps);
		Datum	   *s_deg = palloc(sizeof(Datum) * nsnaps);

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
		values[0] = make_array(s_id, NULL, nsnaps, INT4OID);
		values[1] = make_array(s_br, NULL, nsnaps, TEXTOID);
		values[2] = make_array(s_op, sn_op, nsnaps, TIMESTAMPTZOID);
		values[3] = make_array(s_ok, NULL, nsnaps, INT4OID);
		values[4] = make_array(s_fail, NULL, nsnaps, INT4OID);
		values[5] = make_array(s_tok, sn_tok, nsnaps, FLOAT8OID);
		values[6] = make_array(s_deg, NULL, nsnaps, BOOLOID);
		ret = SPI_execute_plan(prepare_once(&state_plan, state_sql, 7, types),
							   values, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "callback_center: publishing endpoint state failed: %s",
				 SPI_result_code_string(ret));
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
	Oid			types[2] = {INT4ARRAYOID, BOOLARRAYOID};
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
	ret = SPI_execute_plan(prepare_once(&next_due_plan, next_due_sql, 2, types),
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
	ret = SPI_execute("WITH RECURSIVE ids(endpoint_id) AS ("
					  "  (SELECT o.endpoint_id FROM callback_center.outbox o"
					  "    WHERE o.status IN ('pending', 'delivering')"
					  "    ORDER BY o.endpoint_id LIMIT 1)"
					  "  UNION ALL"
					  "  SELECT (SELECT o.endpoint_id FROM callback_center.outbox o"
					  "           WHERE o.status IN ('pending', 'delivering')"
					  "             AND o.endpoint_id > ids.endpoint_id"
					  "           ORDER BY o.endpoint_id LIMIT 1)"
					  "    FROM ids WHERE ids.endpoint_id IS NOT NULL"
					  "), orphans AS ("
					  "  SELECT i.endpoint_id FROM ids i"
					  "   WHERE i.endpoint_id IS NOT NULL"
					  "     AND NOT EXISTS (SELECT 1 FROM callback_center.endpoints e"
					  "                      WHERE e.id = i.endpoint_id)"
					  ") "
					  "UPDATE callback_center.outbox o"
					  "   SET status = 'dead', next_attempt_at = now(),"
					  "       last_error = 'endpoint ' || o.endpoint_id || ' no longer exists'"
					  "  FROM orphans"
					  " WHERE o.endpoint_id = orphans.endpoint_id"
					  "   AND o.status IN ('pending', 'delivering')", false, 0);
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
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT4ARRAYOID, INT4OID};
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
	ret = SPI_execute_plan(prepare_once(&plan,
										"SELECT count(*)::int4 FROM ("
										"  SELECT 1 FROM callback_center.outbox o"
										"   WHERE o.endpoint_id = ANY ($1)"
										"     AND o.status IN ('pending', 'delivering')"
										"     AND o.next_attempt_at <= now()"
										"   LIMIT $2) d", 2, types),
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
