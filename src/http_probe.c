/*-------------------------------------------------------------------------
 *
 * http_probe.c
 *		callback_center.http_probe(): POST to URLs from SQL through http.c.
 *
 * An admin tool (granted to callback_center_admin only) to test a receiver
 * by hand, and what the TAP tests use to exercise http.c.  It runs in the
 * calling backend, not in the worker.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/tuplestore.h"

#include "errcodes.h"
#include "http.h"

#define PROBE_MAX_TIMEOUT_MS	3600000
#define PROBE_MAX_CONCURRENT	1000
#define PROBE_MAX_BODY_BYTES	(16 * 1024 * 1024)

PG_FUNCTION_INFO_V1(cc_http_probe);

/* Stops the transfers when a cancel or a termination is pending. */
static bool
probe_should_stop(void *arg)
{
	return QueryCancelPending || ProcDiePending;
}

/*
 * Returns the non-NULL text elements of a one-dimensional text array as C
 * strings; a NULL element raises 22004 naming what.
 */
static char **
probe_text_array(ArrayType *arr, const char *what, int *n)
{
	Datum	   *elems;
	bool	   *nulls;
	char	  **out;
	int			i;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, n);
	out = palloc(sizeof(char *) * Max(*n, 1));
	for (i = 0; i < *n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain nulls", what)));
		out[i] = TextDatumGetCString(elems[i]);
	}
	return out;
}

/* qsort comparator: indexes into probe_sort_keys, by string. */
static char **probe_sort_keys;

static int
probe_cmp_origin(const void *a, const void *b)
{
	return strcmp(probe_sort_keys[*(const int *) a],
				  probe_sort_keys[*(const int *) b]);
}

/*
 * Sets reqs[i].group to a dense number per origin (scheme, host and port) of
 * reqs[i].url, so that max_per_host caps each receiver.
 */
static void
probe_group_by_origin(CcHttpRequest *reqs, int n)
{
	char	  **origins = palloc(sizeof(char *) * n);
	int		   *order = palloc(sizeof(int) * n);
	int			group = -1;
	int			i;

	for (i = 0; i < n; i++)
	{
		origins[i] = cc_http_url_origin(reqs[i].url);
		if (origins[i] == NULL)
			origins[i] = pstrdup(reqs[i].url);
		order[i] = i;
	}
	probe_sort_keys = origins;
	qsort(order, n, sizeof(int), probe_cmp_origin);
	for (i = 0; i < n; i++)
	{
		if (i == 0 || strcmp(origins[order[i]], origins[order[i - 1]]) != 0)
			group++;
		reqs[order[i]].group = group;
	}
}

/*
 * Raises 22023 unless h is "Name: value" with a token name and no CR or LF.
 */
static void
probe_check_header(const char *h)
{
	const char *p;

	for (p = h; *p && *p != ':'; p++)
	{
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			  (*p >= '0' && *p <= '9') || strchr("!#$%&'*+-.^_`|~", *p)))
			break;
	}
	if (p == h || *p != ':' || strpbrk(h, "\r\n") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid request header \"%s\"", h),
				 errdetail("A header must be \"Name: value\" on one line.")));
}

/* Raises 22023 unless lo <= v <= hi. */
static void
probe_check_range(const char *name, int v, int lo, int hi)
{
	if (v < lo || v > hi)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between %d and %d", name, lo, hi),
				 errdetail("The value given was %d.", v)));
}

/*
 * http_probe(urls, request_body, headers, timeout_ms, max_concurrent,
 * max_body_bytes, max_per_host): POSTs request_body to every URL
 * concurrently (at most max_concurrent at once, at most max_per_host to one
 * origin when given) and returns one row per URL, in the order given.
 * Failed transfers are rows with an error, not ERRORs.  A cancel stops the
 * transfers within one of http.c's poll waits (CC_HTTP_POLL_MS) and raises
 * the usual 57014.
 */
Datum
cc_http_probe(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	  **urls;
	char	  **headers;
	int			nurls;
	int			nheaders;
	text	   *body;
	int			timeout_ms;
	int			max_concurrent;
	int			max_body;
	int			max_per_host;
	CcHttpRequest *reqs;
	CcHttpResult *results;
	int			i;
	const char *names[] = {"urls", "request_body", "headers", "timeout_ms",
	"max_concurrent", "max_body_bytes"};

	for (i = 0; i < lengthof(names); i++)
		cc_require_arg(fcinfo, i, names[i]);

	urls = probe_text_array(PG_GETARG_ARRAYTYPE_P(0), "urls", &nurls);
	body = PG_GETARG_TEXT_PP(1);
	headers = probe_text_array(PG_GETARG_ARRAYTYPE_P(2), "headers", &nheaders);
	timeout_ms = PG_GETARG_INT32(3);
	max_concurrent = PG_GETARG_INT32(4);
	max_body = PG_GETARG_INT32(5);
	max_per_host = PG_ARGISNULL(6) ? max_concurrent : PG_GETARG_INT32(6);

	probe_check_range("timeout_ms", timeout_ms, 1, PROBE_MAX_TIMEOUT_MS);
	probe_check_range("max_concurrent", max_concurrent, 1, PROBE_MAX_CONCURRENT);
	probe_check_range("max_body_bytes", max_body, 0, PROBE_MAX_BODY_BYTES);
	probe_check_range("max_per_host", max_per_host, 1, PROBE_MAX_CONCURRENT);
	for (i = 0; i < nheaders; i++)
		probe_check_header(headers[i]);

	cc_http_init();
	for (i = 0; i < nurls; i++)
	{
		const char *detail;
		CcUrlProblem problem = cc_http_check_url(urls[i], NULL, &detail);

		if (problem != CC_URL_OK)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid URL \"%s\"", urls[i]),
					 detail ?
					 errdetail("The URL is refused: %s: %s.",
							   cc_http_url_problem(problem), detail) :
					 errdetail("The URL is refused: %s.",
							   cc_http_url_problem(problem)),
					 errhint("Only absolute http:// and https:// URLs with a host are allowed.")));
	}

	reqs = palloc0(sizeof(CcHttpRequest) * Max(nurls, 1));
	results = palloc0(sizeof(CcHttpResult) * Max(nurls, 1));
	for (i = 0; i < nurls; i++)
	{
		reqs[i].tag = i;
		reqs[i].url = urls[i];
		reqs[i].body = VARDATA_ANY(body);
		reqs[i].body_len = VARSIZE_ANY_EXHDR(body);
		reqs[i].headers = (const char *const *) headers;
		reqs[i].nheaders = nheaders;
		reqs[i].timeout_ms = timeout_ms;
		reqs[i].group = 0;
	}

	if (max_per_host < max_concurrent)
		probe_group_by_origin(reqs, nurls);

	cc_http_run(reqs, nurls, results, max_concurrent, max_per_host,
				max_body, probe_should_stop, NULL);
	CHECK_FOR_INTERRUPTS();

	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; i < nurls; i++)
	{
		CcHttpResult *res = &results[i];
		Datum		values[7];
		bool		nulls[7] = {false};

		values[0] = CStringGetTextDatum(urls[res->tag]);
		values[1] = Int32GetDatum(res->status);
		values[2] = Float8GetDatum(res->latency_ms);
		if (res->body != NULL)
		{
			/* valid text already (http.c), cut on a character boundary */
			values[3] = CStringGetTextDatum(res->body);
			values[4] = BoolGetDatum(res->truncated);
		}
		else
		{
			nulls[3] = true;
			values[4] = BoolGetDatum(false);
		}
		if (res->retry_after_s >= 0)
			values[5] = Int32GetDatum(res->retry_after_s);
		else
			nulls[5] = true;
		if (res->error != NULL)
			values[6] = CStringGetTextDatum(res->error);
		else
			nulls[6] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_NULL();
}
