/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The callback_center background worker: lifecycle and main loop.
 *
 * One worker per cluster, started by the postmaster once recovery has
 * finished (so never on a standby), connected to callback_center.database.
 * It waits on its latch, woken by committing backends or by the poll
 * interval, and does a round of work each time it wakes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <time.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "extension.h"
#include "http.h"
#include "outbox.h"
#include "policy.h"
#include "queue.h"
#include "shmem.h"
#include "signature.h"
#include "worker.h"

/*
 * How long a round should take for one endpoint: an endpoint is given
 * about this many milliseconds' worth of requests at its measured latency
 * (at least one request per connection it may use), so a slow receiver
 * never holds a round up for long, and a fast one gets whole batches.
 */
#define CC_ROUND_TARGET_MS 200

/* Claim statements per round at most (see CcClaimPlan). */
#define CC_CLAIM_PASSES 3

/*
 * How long to wait when events were due at the claim but none could be
 * claimed: another transaction holds their rows locked (a replay, an
 * operator's UPDATE), and its commit may not wake the worker.
 */
#define CC_LOCKED_WAIT_MS 100

/* How often events of dropped endpoints are looked for (and made dead). */
#define CC_BURY_INTERVAL_MS 5000

/* Delivery settings (PGC_SIGHUP: the worker re-reads them live). */
static int	cc_batch_size = 1000;
static int	cc_max_concurrent = 64;
static int	cc_max_per_endpoint = 32;
static int	cc_response_cap = 4096;
static double cc_retry_jitter = 0.2;
static int	cc_max_retry_after_s = 3600;
static bool cc_degrade_non_core = false;
static bool cc_degrade_on_core_breaker = false;
static int	cc_degrade_core_backlog = 0;
static bool cc_delivery_enabled = true;

/* Runtime state of one endpoint, kept in the worker for its lifetime. */
typedef struct CcEndpointRuntime
{
	int32		endpoint_id;	/* hash key */
	CcBreaker	breaker;
	CcTokenBucket bucket;
	bool		probing;		/* this round's claim is the breaker probe */
	double		latency_ms;		/* moving average of successful attempts */
	bool		failing;		/* its last round had a failed attempt */
} CcEndpointRuntime;

/*
 * What one round plans for one endpoint it may claim for.  Claims are made
 * in passes: the first shares the batch between the endpoints, later ones
 * share what is left between the endpoints that filled their quota.
 */
typedef struct CcClaimPlan
{
	int32		id;
	CcEndpoint *ep;				/* its entry in the round's endpoint list */
	bool		ordered;
	bool		exact;			/* probe or token-limited: one pass only */
	int			cap;			/* most it may claim this round */
	int			quota;			/* asked for in the current pass */
	int			got;			/* claimed in the current pass */
	int			total;			/* claimed over all passes */
	bool		full;			/* its last pass claimed all it asked for */
	double		latency_sum;	/* of this round's successful attempts */
	int			nok;
	int			nfailed;
	int			tokens;			/* tokens taken from its bucket */
	bool		held;			/* no token: claims nothing this round */
} CcClaimPlan;

static HTAB *endpoint_runtime = NULL;
static uint64 rng_state = 0;
static int64 last_bury_ms = 0;
static uint32 claim_start = 0;	/* endpoint the next round asks first */

/* Automatic degradation of non-core endpoints (degrade_non_core_now). */
static int64 backlog_checked_ms = 0;
static bool backlog_high = false;
static bool auto_degraded = false;

/*
 * Signing runs between transactions, but the OpenSSL-backed HMAC registers
 * itself with CurrentResourceOwner; this owner lives as long as the worker.
 */
static ResourceOwner sign_owner = NULL;
static bool extension_was_ready = false;

static int	cc_delivery_round(MemoryContext cxt, int64 *wait_ms, bool *more);
static bool cc_should_stop(void *arg);

/*
 * The worker's delivery settings.  Called from _PG_init when preloaded.
 */
void
cc_worker_define_gucs(void)
{
	DefineCustomIntVariable("callback_center.batch_size",
							"Most events the worker claims in one round.",
							NULL, &cc_batch_size, 1000, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.max_concurrent",
							"Most HTTP requests the worker has in flight at once.",
							"Also capped below the worker's open-file limit.",
							&cc_max_concurrent, 64, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.max_per_endpoint",
							"Most HTTP requests in flight to one endpoint at once.",
							NULL, &cc_max_per_endpoint, 32, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.response_cap",
							"Bytes of each response body kept in the attempts log.",
							NULL, &cc_response_cap, 4096, 0, 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
	DefineCustomRealVariable("callback_center.retry_jitter",
							 "Fraction by which each retry delay is randomly spread either way.",
							 NULL, &cc_retry_jitter, 0.2, 0.0, 1.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.max_retry_after",
							"Longest Retry-After from a receiver that the worker honours.",
							NULL, &cc_max_retry_after_s, 3600, 0, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomBoolVariable("callback_center.degrade_non_core",
							 "Holds back events for non-core endpoints while core ones flow.",
							 "Held events wait without burning attempts; turn it off to catch up.",
							 &cc_degrade_non_core, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("callback_center.degrade_on_core_breaker",
							 "Holds back events for non-core endpoints while a core endpoint's circuit breaker is open.",
							 "They flow again once every core breaker has closed.",
							 &cc_degrade_on_core_breaker, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.degrade_core_backlog",
							"Holds back events for non-core endpoints while at least this many core events are due.",
							"Zero turns it off.  The worker counts due core events at most once a second.",
							&cc_degrade_core_backlog, 0, 0, 10000000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("callback_center.delivery_enabled",
							 "Whether the worker delivers outbox events at all.",
							 "Turned off, events wait in the outbox; nothing is lost.",
							 &cc_delivery_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/*
 * Asked by the HTTP loop at least every 100 ms.  Without the postmaster the
 * worker exits at once, as WL_EXIT_ON_PM_DEATH would: its claimed rows stay
 * 'delivering' and the next worker releases them (receivers may see those
 * webhook-ids again), and a restarted postmaster is not kept waiting for
 * the slowest receiver.
 */
static bool
cc_should_stop(void *arg)
{
	if (!PostmasterIsAlive())
		proc_exit(1);
	return ShutdownRequestPending;
}

static int64
now_ms(void)
{
	return GetCurrentTimestamp() / 1000;
}

/* Finds or creates the runtime state of an endpoint. */
static CcEndpointRuntime *
endpoint_state(int32 id)
{
	bool		found;
	CcEndpointRuntime *rt;

	if (endpoint_runtime == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(int32);
		ctl.entrysize = sizeof(CcEndpointRuntime);
		endpoint_runtime = hash_create("callback_center endpoints", 64, &ctl,
									   HASH_ELEM | HASH_BLOBS);
	}
	rt = hash_search(endpoint_runtime, &id, HASH_ENTER, &found);
	if (!found)
	{
		memset(rt, 0, sizeof(*rt));
		rt->endpoint_id = id;
	}
	return rt;
}

static CcBreakerConfig
breaker_config(const CcEndpoint *e)
{
	CcBreakerConfig cfg;

	cfg.failure_ratio = e->breaker_ratio;
	cfg.window_ms = e->breaker_window_ms;
	cfg.min_requests = e->breaker_min_requests;
	cfg.open_ms = e->breaker_open_ms;
	return cfg;
}

/*
 * The most one endpoint may claim this round: one request per connection it
 * may use while its latency is unknown or its last round failed, else about
 * CC_ROUND_TARGET_MS worth of requests at its latency; never above the
 * batch size.
 */
static int
endpoint_cap(const CcEndpointRuntime *rt)
{
	int			per_wave = Min(cc_max_per_endpoint, cc_max_concurrent);
	double		waves = 1.0;

	if (!rt->failing && rt->latency_ms > 0)
		waves = Max(1.0, CC_ROUND_TARGET_MS / rt->latency_ms);
	return (int) Max(1.0, Min((double) cc_batch_size, per_wave * waves));
}

/* The plan of the endpoint with this id (plans are ordered by id). */
static CcClaimPlan *
find_plan(CcClaimPlan *plans, int n, int32 id)
{
	int			lo = 0,
				hi = n - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;

		if (plans[mid].id == id)
			return &plans[mid];
		if (plans[mid].id < id)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return NULL;
}

/*
 * Claims for the plans whose quota is set (one statement) and appends the
 * jobs to *jobs and the index of each job's plan to *job_plan, so that the
 * rest of the round never looks a job's endpoint up again; updates got and
 * total.  Returns the number claimed.
 */
static int
claim_pass(CcClaimPlan *plans, int nplans, int lease_s, CcJob **jobs,
		   int **job_plan, int *njobs)
{
	int32	   *ids = palloc(sizeof(int32) * Max(nplans, 1));
	int32	   *quotas = palloc(sizeof(int32) * Max(nplans, 1));
	bool	   *ordered = palloc(sizeof(bool) * Max(nplans, 1));
	int			nq = 0;
	CcJob	   *got;
	int			ngot;
	int			i;

	for (i = 0; i < nplans; i++)
	{
		plans[i].got = 0;
		if (plans[i].quota <= 0)
			continue;
		plans[i].full = false;
		ids[nq] = plans[i].id;
		quotas[nq] = plans[i].quota;
		ordered[nq] = plans[i].ordered;
		nq++;
	}
	ngot = cc_queue_claim(ids, quotas, ordered, nq, lease_s,
						  (int64) cc_max_event_size, &got);
	if (ngot > 0)
	{
		if (*jobs == NULL)
		{
			*jobs = got;
			*job_plan = palloc(sizeof(int) * ngot);
		}
		else
		{
			*jobs = repalloc(*jobs, sizeof(CcJob) * (*njobs + ngot));
			memcpy(*jobs + *njobs, got, sizeof(CcJob) * ngot);
			*job_plan = repalloc(*job_plan, sizeof(int) * (*njobs + ngot));
		}
		for (i = 0; i < ngot; i++)
		{
			CcClaimPlan *p = find_plan(plans, nplans, got[i].endpoint_id);

			/* The claim's LIMIT per endpoint must hold, whatever the plan. */
			if (p == NULL || p->got >= p->quota)
				elog(ERROR, "callback_center: the claim returned more events for endpoint %d than asked",
					 got[i].endpoint_id);
			(*job_plan)[*njobs + i] = (int) (p - plans);
			p->got++;
			p->total++;
			p->full = (p->got == p->quota);
		}
		*njobs += ngot;
	}
	return ngot;
}

/*
 * Whether events for non-core endpoints are held back this round: by
 * callback_center.degrade_non_core, or automatically while a core
 * endpoint's breaker is open or probing (degrade_on_core_breaker) or while at
 * least degrade_core_backlog core events are due (counted at most once a
 * second, reading no more than that many index entries).  Runs in the
 * claim transaction; logs when automatic degradation starts and ends.
 */
static bool
degrade_non_core_now(const CcEndpoint *eps, int neps, int64 now)
{
	const char *why = NULL;
	int			i;

	if (cc_degrade_non_core)
		return true;
	if (cc_degrade_on_core_breaker)
		for (i = 0; i < neps && why == NULL; i++)
		{
			CcBreaker  *b = &endpoint_state(eps[i].id)->breaker;

			/* Half open with no probe: it has nothing due to deliver. */
			if (eps[i].is_core && (b->state == CC_BREAKER_OPEN ||
								   (b->state == CC_BREAKER_HALF_OPEN &&
									b->probe_in_flight)))
				why = "a core endpoint's circuit breaker is open";
		}
	if (why == NULL && cc_degrade_core_backlog > 0)
	{
		if (now - backlog_checked_ms >= 1000 || now < backlog_checked_ms)
		{
			int32	   *core = palloc(sizeof(int32) * Max(neps, 1));
			int			ncore = 0;

			for (i = 0; i < neps; i++)
				if (eps[i].is_core)
					core[ncore++] = eps[i].id;
			backlog_high = cc_queue_due_count(core, ncore,
											  cc_degrade_core_backlog) >=
				cc_degrade_core_backlog;
			backlog_checked_ms = now;
		}
		if (backlog_high)
			why = "the backlog of due core events reached callback_center.degrade_core_backlog";
	}
	if ((why != NULL) != auto_degraded)
	{
		auto_degraded = (why != NULL);
		if (auto_degraded)
			ereport(LOG,
					(errmsg("callback_center worker holds back non-core endpoints: %s", why)));
		else
			ereport(LOG,
					(errmsg("callback_center worker delivers to non-core endpoints again")));
	}
	return auto_degraded;
}

/*
 * One round: claim what is due (per endpoint, within its breaker, rate
 * limit and caps), deliver it with no transaction open, record the
 * results.  Returns the number of events claimed; sets *wait_ms to how
 * long the worker may sleep before something else falls due, and *more
 * when an endpoint claimed all it was allowed (more may be due at once).
 */
static int
cc_delivery_round(MemoryContext cxt, int64 *wait_ms, bool *more)
{
	CcEndpoint *eps;
	int			neps;
	CcClaimPlan *plans;
	int			nplans = 0;
	CcJob	   *jobs = NULL;
	int		   *job_plan = NULL;
	int			njobs = 0;
	int			i;
	int			k;
	int			pass;
	int			budget = cc_batch_size;
	int			per_wave = Min(cc_max_per_endpoint, cc_max_concurrent);
	int64		t0 = now_ms();
	int64		soonest = -1;
	CcHttpRequest *reqs;
	CcHttpResult *res;
	int		   *req_of_job;
	int			nreqs = 0;
	CcJobResult *results;
	int32	   *gone;
	int			ngone = 0;
	CcEndpointSnapshot *snaps;
	int			lease_s;
	int64		lease_ms = 0;
	char		ua[64];
	bool		degrade;

	*more = false;

	/* Transaction 1: load endpoints, claim, commit. */
	pgstat_report_activity(STATE_RUNNING, "callback_center: claiming");
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	/* What the round keeps must outlive its transactions: the loop context. */
	MemoryContextSwitchTo(cxt);
	PushActiveSnapshot(GetTransactionSnapshot());
	neps = cc_queue_load_endpoints(&eps);
	if (t0 - last_bury_ms >= CC_BURY_INTERVAL_MS)
	{
		/* Rows no endpoint will ever claim must not wait for ever. */
		(void) cc_queue_bury_orphans();
		last_bury_ms = t0;
	}

	degrade = degrade_non_core_now(eps, neps, t0);

	/* Which endpoints may send now (breaker, degradation), in id order. */
	plans = palloc0(sizeof(CcClaimPlan) * Max(neps, 1));
	for (i = 0; i < neps; i++)
	{
		CcEndpoint *e = &eps[i];
		CcEndpointRuntime *rt = endpoint_state(e->id);
		CcBreakerConfig cfg = breaker_config(e);
		CcClaimPlan *p;
		CcBreakerVerdict v;

		rt->probing = false;
		if (degrade && !e->is_core)
			continue;
		v = cc_breaker_check(&rt->breaker, &cfg, t0);
		if (v == CC_BREAKER_DENY)
		{
			int64		reopen = rt->breaker.opened_at_ms + cfg.open_ms - t0;

			if (reopen > 0 && (soonest < 0 || reopen < soonest))
				soonest = reopen;
			continue;
		}
		p = &plans[nplans++];
		p->id = e->id;
		p->ep = e;
		p->ordered = e->ordered;
		p->cap = endpoint_cap(rt);
		if (v == CC_BREAKER_PROBE)
		{
			p->cap = 1;
			p->exact = true;
			rt->probing = true;
		}
		lease_ms = Max(lease_ms, (int64) e->timeout_ms *
					   ((p->cap + per_wave - 1) / per_wave));
	}

	/*
	 * First pass: the batch shared equally (within each endpoint's cap and
	 * tokens).  Later passes share what is left between the endpoints that
	 * filled their quota, so one busy endpoint among idle ones still gets
	 * whole batches.
	 */
	lease_s = (int) (lease_ms / 1000) + 60;
	claim_start++;
	for (pass = 0; pass < CC_CLAIM_PASSES && budget > 0; pass++)
	{
		bool	   *cand = palloc0(sizeof(bool) * Max(nplans, 1));
		int			ncand = 0;
		int			share;
		int			spare;

		for (i = 0; i < nplans; i++)
		{
			CcClaimPlan *p = &plans[i];

			if (pass == 0 || (!p->exact && p->full && p->total < p->cap))
				cand[i] = true;
			p->quota = 0;
			if (cand[i])
				ncand++;
		}
		if (ncand == 0)
			break;
		/* budget / ncand each; the first budget % ncand get one more */
		share = budget / ncand;
		spare = budget % ncand;

		/*
		 * The spare events go first to the endpoints from claim_start on,
		 * one further each round: with more endpoints than the batch holds
		 * (share 0) every endpoint still gets its turn; starting at the
		 * lowest id starved the others.
		 */
		for (k = 0; k < nplans; k++)
		{
			CcClaimPlan *p;
			CcEndpoint *e;
			CcEndpointRuntime *rt;
			int			q;

			i = (int) ((claim_start + k) % nplans);
			p = &plans[i];

			if (!cand[i])
				continue;
			q = share + (spare > 0 ? 1 : 0);
			if (spare > 0)
				spare--;
			q = Min(q, p->cap - p->total);
			if (q <= 0)
				continue;
			e = p->ep;
			rt = endpoint_state(p->id);
			if (e->rate_per_s > 0)
			{
				int			tokens = 0;

				/* Take the tokens there are; unused ones go back below. */
				while (tokens < q &&
					   cc_bucket_take(&rt->bucket, e->rate_per_s,
									  Max(e->rate_per_s, 1.0), t0))
					tokens++;
				p->tokens += tokens;
				p->exact = true;
				q = tokens;
				if (q == 0)
				{
					int64		w = cc_bucket_wait_ms(&rt->bucket,
													  e->rate_per_s);

					p->held = true;
					if (soonest < 0 || w < soonest)
						soonest = w;
				}
			}
			p->quota = q;
		}
		budget -= claim_pass(plans, nplans, lease_s, &jobs, &job_plan, &njobs);
		pfree(cand);
	}

	if (njobs == 0 && nplans > 0)
	{
		/*
		 * Nothing to send: learn in the same transaction when to look next.
		 * Only the endpoints that could claim count; those held back
		 * (breaker open, no token, degraded) had their own wake-up time put
		 * in soonest above, or wait for the poll interval.  Counting their
		 * due events made the worker go round every millisecond.
		 */
		int32	   *ids = palloc(sizeof(int32) * nplans);
		bool	   *ord = palloc(sizeof(bool) * nplans);
		int			nids = 0;
		int64		due;

		for (i = 0; i < nplans; i++)
		{
			if (plans[i].held)
				continue;
			ids[nids] = plans[i].id;
			ord[nids] = plans[i].ordered;
			nids++;
		}
		due = cc_queue_next_due_ms(ids, ord, nids);
		if (due == 0)
		{
			/* Due at the claim, yet not claimed: their rows are locked. */
			due = CC_LOCKED_WAIT_MS;
		}
		else if (due > 0)
			due = Max(due - (now_ms() - t0), 1);
		if (due >= 0 && (soonest < 0 || due < soonest))
			soonest = due;
	}
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);

	for (i = 0; i < nplans; i++)
	{
		CcClaimPlan *p = &plans[i];
		CcEndpointRuntime *rt = endpoint_state(p->id);

		/* Tokens taken but not used by the claim go back to their buckets. */
		if (p->tokens > p->total)
		{
			CcEndpoint *e = p->ep;

			rt->bucket.tokens = Min(Max(e->rate_per_s, 1.0),
									rt->bucket.tokens + (p->tokens - p->total));
		}
		if (rt->probing && p->total == 0)
		{
			rt->breaker.probe_in_flight = false;
			rt->probing = false;
		}
		/* It claimed all it was allowed: more may be due right away. */
		if (p->full)
			*more = true;
	}

	if (njobs == 0)
	{
		*wait_ms = soonest < 0 ? cc_poll_interval_ms : Max(soonest, 1);
		return 0;
	}

	/* Deliver, with no transaction open. */
	pgstat_report_activity(STATE_RUNNING, "callback_center: delivering");
	if (sign_owner == NULL)
		sign_owner = ResourceOwnerCreate(NULL, "callback_center signing");
	Assert(CurrentResourceOwner == NULL || CurrentResourceOwner == sign_owner);
	CurrentResourceOwner = sign_owner;
	snprintf(ua, sizeof(ua), "User-Agent: callback_center/%s", CC_VERSION);
	reqs = palloc0(sizeof(CcHttpRequest) * njobs);
	res = palloc0(sizeof(CcHttpResult) * njobs);
	req_of_job = palloc(sizeof(int) * njobs);
	for (i = 0; i < njobs; i++)
	{
		CcJob	   *job = &jobs[i];
		CcEndpoint *e = plans[job_plan[i]].ep;
		char		msg_id[32];
		int64		ts = (int64) time(NULL);
		char	   *sig;
		const char **hdr;
		CcHttpRequest *req;

		Assert(e != NULL);
		/* No request can be made of it: it is made dead below. */
		req_of_job[i] = -1;
		if (job->error != NULL)
			continue;
		req_of_job[i] = nreqs;
		req = &reqs[nreqs++];
		hdr = palloc(sizeof(char *) * 5);
		snprintf(msg_id, sizeof(msg_id), "msg_" INT64_FORMAT, job->id);
		sig = cc_sign_webhook(e->key, e->keylen, msg_id, ts, job->body,
							  job->body_len);
		/* During a rotation sign with both secrets (space-separated). */
		if (e->prev_key)
			sig = psprintf("%s %s", sig,
						   cc_sign_webhook(e->prev_key, e->prev_keylen, msg_id,
										   ts, job->body, job->body_len));
		hdr[0] = "Content-Type: application/json";
		hdr[1] = ua;
		hdr[2] = psprintf("webhook-id: %s", msg_id);
		hdr[3] = psprintf("webhook-timestamp: " INT64_FORMAT, ts);
		hdr[4] = psprintf("webhook-signature: %s", sig);
		req->tag = job->id;
		req->url = e->url;
		req->body = job->body;
		req->body_len = job->body_len;
		req->headers = hdr;
		req->nheaders = 5;
		req->timeout_ms = e->timeout_ms;
		req->group = e->id;
	}
	CurrentResourceOwner = NULL;
	if (nreqs > 0)
	{
		cc_http_init();
		cc_http_run(reqs, nreqs, res, cc_max_concurrent, cc_max_per_endpoint,
					cc_response_cap, cc_should_stop, NULL);
	}

	/* Judge each result against its endpoint's policy. */
	results = palloc0(sizeof(CcJobResult) * njobs);
	gone = palloc(sizeof(int32) * njobs);
	for (i = 0; i < njobs; i++)
	{
		CcJob	   *job = &jobs[i];
		CcHttpResult *r;
		CcJobResult *out = &results[i];
		CcClaimPlan *plan = &plans[job_plan[i]];
		CcEndpoint *e = plan->ep;
		CcEndpointRuntime *rt;
		CcBreakerConfig cfg;
		CcAttemptClass cls;
		int64		t = now_ms();

		Assert(e != NULL);
		rt = endpoint_state(e->id);
		if (req_of_job[i] < 0)
		{
			/* Not sent, not the receiver's doing: no breaker, no retry. */
			out->fate = CC_FATE_DEAD;
			out->error = job->error;
			if (rt->probing)
				rt->breaker.probe_in_flight = false;
			continue;
		}
		r = &res[req_of_job[i]];
		cfg = breaker_config(e);
		out->http_status = r->status;
		out->latency_ms = r->latency_ms;
		out->error = r->error;
		out->response = r->body;

		if (r->error != NULL && strcmp(r->error, CC_HTTP_INTERRUPTED) == 0)
		{
			/* Shutdown cut it short: give the attempt back. */
			out->fate = CC_FATE_RELEASED;
			if (rt->probing)
				rt->breaker.probe_in_flight = false;
			continue;
		}
		cls = cc_classify_attempt(r->status, r->error != NULL);
		cc_breaker_record(&rt->breaker, &cfg, cls == CC_ATTEMPT_SUCCESS,
						  rt->probing, t);
		if (cls == CC_ATTEMPT_SUCCESS)
		{
			plan->nok++;
			plan->latency_sum += r->latency_ms;
		}
		else
			plan->nfailed++;
		if (cls == CC_ATTEMPT_SUCCESS)
			out->fate = CC_FATE_DELIVERED;
		else if (cls == CC_ATTEMPT_GONE)
		{
			out->fate = CC_FATE_DEAD;
			out->error = psprintf("410 Gone: endpoint disabled%s%s",
								  r->error ? ": " : "", r->error ? r->error : "");
			gone[ngone++] = e->id;
		}
		else
		{
			int64		delay = cc_retry_delay_ms(e->delays_ms, e->ndelays,
												  job->attempt, e->max_attempts,
												  (r->status == 429 || r->status == 503) ?
												  r->retry_after_s : -1,
												  (int64) cc_max_retry_after_s * 1000,
												  cc_retry_jitter, &rng_state);

			if (delay < 0)
				out->fate = CC_FATE_DEAD;
			else
			{
				out->fate = CC_FATE_RETRY;
				out->next_at = GetCurrentTimestamp() + delay * 1000;
				if (soonest < 0 || delay < soonest)
					soonest = delay;
			}
			if (out->error == NULL)
				out->error = psprintf("HTTP %d", r->status);
		}
	}

	/* What this round says of each endpoint's latency, for its next cap. */
	for (i = 0; i < nplans; i++)
	{
		CcClaimPlan *p = &plans[i];
		CcEndpointRuntime *rt = endpoint_state(p->id);

		if (p->nok + p->nfailed == 0)
			continue;
		rt->failing = (p->nfailed > 0);
		if (p->nok > 0)
		{
			double		avg = p->latency_sum / p->nok;

			rt->latency_ms = rt->latency_ms > 0 ?
				(rt->latency_ms + avg) / 2 : avg;
		}
	}

	/* Transaction 2: record everything at once. */
	snaps = palloc0(sizeof(CcEndpointSnapshot) * Max(neps, 1));
	for (i = 0; i < neps; i++)
	{
		CcEndpointRuntime *rt = endpoint_state(eps[i].id);
		CcBreakerConfig cfg = breaker_config(&eps[i]);
		int64		t = now_ms();

		snaps[i].endpoint_id = eps[i].id;
		snaps[i].breaker = rt->breaker.state == CC_BREAKER_OPEN ? "open" :
			rt->breaker.state == CC_BREAKER_HALF_OPEN ? "half_open" : "closed";
		snaps[i].opened_at = rt->breaker.state == CC_BREAKER_CLOSED ? 0 :
			(TimestampTz) rt->breaker.opened_at_ms * 1000;
		cc_breaker_window(&rt->breaker, &cfg, t, &snaps[i].window_ok,
						  &snaps[i].window_fail);
		snaps[i].tokens = eps[i].rate_per_s > 0 ? rt->bucket.tokens : -1;
		snaps[i].degraded = degrade && !eps[i].is_core;
	}
	pgstat_report_activity(STATE_RUNNING, "callback_center: recording");
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	MemoryContextSwitchTo(cxt);
	PushActiveSnapshot(GetTransactionSnapshot());
	cc_queue_record(jobs, results, njobs, gone, ngone, snaps, neps);
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);

	*wait_ms = soonest < 0 ? cc_poll_interval_ms : Max(soonest, 1);
	return njobs;
}

/*
 * Entry point, run by the postmaster in a new process.  Returns only
 * through proc_exit.
 */
void
callback_center_worker_main(Datum main_arg)
{
	MemoryContext loop_context;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cc_database, NULL, 0);
	cc_worker_pin_search_path();

	/*
	 * The worker's statements touch a batch of rows through indexes, but
	 * their generic plans (a LIMIT from a parameter) are costed high enough
	 * to be JIT-compiled, which costs far more than running them (about 200
	 * ms against 10 ms per claim).  No JIT here, whatever the server's
	 * setting.
	 */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->reloads = 0;
	cc_shared->loops = 0;
	SpinLockRelease(&cc_shared->mutex);
	cc_worker_attach(&cc_shared->worker);

	ereport(LOG,
			(errmsg("callback_center worker started in database \"%s\"",
					cc_database)));

	loop_context = AllocSetContextCreate(TopMemoryContext,
										 "callback_center worker loop",
										 ALLOCSET_DEFAULT_SIZES);

	while (!ShutdownRequestPending)
	{
		MemoryContext oldcontext;
		int64		wait_ms = cc_poll_interval_ms;
		bool		more = false;
		uint64		gen_seen;

		/* Wake requests up to here are answered by this round. */
		SpinLockAcquire(&cc_shared->mutex);
		gen_seen = cc_shared->commit_gen;
		SpinLockRelease(&cc_shared->mutex);

		oldcontext = MemoryContextSwitchTo(loop_context);
		if (cc_extension_state() == CC_EXT_CURRENT)
		{
			if (!extension_was_ready)
			{
				int			n;

				StartTransactionCommand();
				PushActiveSnapshot(GetTransactionSnapshot());
				n = cc_queue_recover();
				PopActiveSnapshot();
				CommitTransactionCommand();
				if (n > 0)
					ereport(LOG,
							(errmsg("callback_center worker released %d events left in flight by its predecessor",
									n)));
				extension_was_ready = true;
			}
			MemoryContextSwitchTo(loop_context);
			if (cc_delivery_enabled)
			{
				/*
				 * An error in a round (a failed statement, the extension
				 * dropped under us) is logged and the round abandoned; the
				 * worker carries on.  What the round had claimed is released
				 * at the next recovery, so nothing waits for a lease.
				 */
				PG_TRY();
				{
					(void) cc_delivery_round(loop_context, &wait_ms, &more);
				}
				PG_CATCH();
				{
					MemoryContextSwitchTo(loop_context);
					EmitErrorReport();
					FlushErrorState();
					AbortOutOfAnyTransaction();
					extension_was_ready = false;
					more = false;
					wait_ms = cc_poll_interval_ms;
				}
				PG_END_TRY();
			}
		}
		else
			extension_was_ready = false;
		pgstat_report_activity(STATE_IDLE, NULL);
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(loop_context);

		/*
		 * An endpoint that claimed all it was allowed may have more due: go
		 * round again without waiting.
		 */
		if (!more || ShutdownRequestPending)
		{
			bool		sleep = true;

			/*
			 * Events committed during the round: go round again at once.
			 * Otherwise ask for the next commit's wake-up (not while delivery
			 * is paused: the poll and a reload are enough then), checked and
			 * set under the lock that wake requests take.
			 */
			SpinLockAcquire(&cc_shared->mutex);
			if (cc_delivery_enabled && !ShutdownRequestPending &&
				cc_shared->commit_gen != gen_seen)
				sleep = false;
			else
				cc_shared->worker_waiting = cc_delivery_enabled;
			SpinLockRelease(&cc_shared->mutex);
			if (sleep)
			{
				wait_ms = Max(Min(wait_ms, (int64) cc_poll_interval_ms), 1);
				(void) WaitLatch(MyLatch,
								 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 (long) wait_ms,
								 PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				SpinLockAcquire(&cc_shared->mutex);
				cc_shared->worker_waiting = false;
				SpinLockRelease(&cc_shared->mutex);
			}
		}
		CHECK_FOR_INTERRUPTS();

		SpinLockAcquire(&cc_shared->mutex);
		cc_shared->loops++;
		SpinLockRelease(&cc_shared->mutex);

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			SpinLockAcquire(&cc_shared->mutex);
			cc_shared->reloads++;
			SpinLockRelease(&cc_shared->mutex);
			ereport(LOG,
					(errmsg("callback_center worker reloaded configuration"),
					 errdetail("poll_interval is %d ms.", cc_poll_interval_ms)));
		}
	}

	ereport(LOG, (errmsg("callback_center worker shutting down")));

	/*
	 * Exit code 1 asks the postmaster to restart us after the restart
	 * interval when only the worker was terminated (pg_terminate_backend);
	 * during server shutdown nothing is restarted.  Exit code 0 would
	 * unregister the worker for good.
	 */
	proc_exit(1);
}
