/*-------------------------------------------------------------------------
 *
 * delivery.c
 *		The delivery pipeline: keeps requests in flight up to the caps,
 *		judges each as soon as it finishes, records results in small
 *		transactions.
 *
 * Architecture.  The worker calls cc_delivery_step() over and over while
 * there is work; each step runs the named phases below in turn, and none
 * waits for more than one thing:
 *
 *	claim	(a transaction, committed before anything is sent) takes due
 *			events for the endpoints that have room: each endpoint holds at
 *			most its target (about CC_TARGET_MS of requests at its latency,
 *			at least one request per connection it may use) claimed or in
 *			flight, within the breaker, the token bucket and degradation;
 *	send	starts claimed events while max_concurrent and
 *			max_per_endpoint allow, signing each as it goes;
 *	wait	lets libcurl run for at most a few milliseconds, or until a
 *			request finishes;
 *	judge	decides each finished request at once (breaker, retry delay,
 *			Retry-After, 410), freeing its slot for the next step's send;
 *	record	(a transaction, synchronous commit) writes the judged results
 *			every CC_RECORD_MS or CC_RECORD_MAX results, whichever comes
 *			first, and at once when nothing is in flight.
 *
 * A slow endpoint holds only its own slots: nothing waits for a batch to
 * finish.  After a crash the receivers see again only what was in flight
 * or judged and not yet recorded (at most max_concurrent + CC_RECORD_MAX,
 * in practice max_concurrent: see doc/delivery_round.md).  No transaction
 * is open while libcurl runs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <time.h>

#include "access/xact.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "adapter.h"
#include "delivery.h"
#include "http.h"
#include "outbox.h"
#include "policy.h"
#include "queue.h"
#include "shmem.h"
#include "signature.h"
#include "worker_role.h"

/*
 * How much an endpoint may hold claimed or in flight: about this many
 * milliseconds' worth of requests at its measured latency (at least one
 * request per connection it may use), never more than batch_size.
 */
#define CC_TARGET_MS 200

/* Claim statements per claim phase at most (see ClaimPlan). */
#define CC_CLAIM_PASSES 3

/* Results are recorded at least this often (ms) while requests run... */
#define CC_RECORD_MS 5
/* ...or as soon as this many are judged. */
#define CC_RECORD_MAX 256

/* How long the wait phase waits when more could be claimed (ms). */
#define CC_WAIT_SHORT_MS 2

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

/*
 * The memory of one claim: its endpoints (cxt, kept while it is the current
 * batch or has events) and its events with the claim's working memory
 * (events, a child of cxt, freed as soon as its last event is recorded:
 * a worker at rest holds no event bodies).
 */
typedef struct ClaimBatch
{
	MemoryContext cxt;
	MemoryContext events;
	int			refs;			/* events not yet recorded, + 1 if current */
	CcEndpoint *eps;
	int			neps;
	bool		degrade;		/* non-core endpoints held back */
} ClaimBatch;

/* One claimed event, from claim to record. */
typedef struct Flight
{
	CcJob		job;
	CcEndpoint *ep;				/* in its batch */
	ClaimBatch *batch;
	bool		probe;			/* the breaker's probe */
	CcHttpRequest req;
	const char *hdr[CC_ADAPTER_MAX_HEADERS + 1];
	CcHttpResult res;
	CcJobResult out;
	bool		check;			/* a provider's answer, to verify */
	char	   *answer;			/* its normalized answer (jsonb text) */
	struct Flight *next;		/* in its endpoint's queue */
	dlist_node	live;			/* in inflight while its request runs */
	bool		running;
} Flight;

/* Runtime state of one endpoint, kept for the worker's lifetime. */
typedef struct EndpointRuntime
{
	int32		endpoint_id;	/* hash key */
	CcBreaker	breaker;
	CcTokenBucket bucket;
	bool		probing;		/* its probe is claimed and not yet judged */
	double		latency_ms;		/* moving average of successful attempts */
	bool		failing;		/* its last recorded results had a failure */
	double		latency_sum;	/* judged since the last record */
	int			nok;
	int			nfailed;
	int			in_flight;
	int			queued;			/* claimed, not yet sent */
	bool		full;			/* its last claim got all it asked for */
	Flight	   *qhead;
	Flight	   *qtail;
} EndpointRuntime;

/* What one claim plans for one endpoint (claims are made in passes). */
typedef struct ClaimPlan
{
	int32		id;
	CcEndpoint *ep;
	bool		ordered;
	bool		exact;			/* probe or token-limited: one pass only */
	int			cap;			/* most it may claim now */
	int			quota;			/* asked for in the current pass */
	int			got;			/* claimed in the current pass */
	int			total;			/* claimed over all passes */
	bool		full;			/* its last pass claimed all it asked for */
	int			tokens;			/* tokens taken from its bucket */
	bool		held;			/* no token: claims nothing now */
} ClaimPlan;

/* The pipeline. */
static HTAB *endpoint_runtime = NULL;
static ClaimBatch *current = NULL;	/* the latest claim's endpoints */
static int	total_queued = 0;
static dlist_head inflight = DLIST_STATIC_INIT(inflight);
static Flight **judged = NULL;		/* judged, not yet recorded */
static int	njudged = 0;
static int	judged_cap = 0;
static int64 first_judged_ms = 0;
static MemoryContext results_cxt = NULL;	/* reset after each record */
static MemoryContext pipeline_cxt = NULL;

static uint64 claim_gen = 0;	/* commit_gen the last claim saw */
static bool claimed_once = false;
static int64 next_claim_ms = 0;
static uint64 rng_state = 0;
static int64 last_bury_ms = 0;
static uint32 claim_start = 0;	/* endpoint the next claim asks first */

/* Automatic degradation of non-core endpoints (degrade_non_core_now). */
static int64 backlog_checked_ms = 0;
static bool backlog_high = false;
static bool auto_degraded = false;

/*
 * Signing runs between transactions, but the OpenSSL-backed HMAC registers
 * itself with CurrentResourceOwner; this owner lives as long as the worker.
 */
static ResourceOwner sign_owner = NULL;

/*
 * The delivery settings.  Called from cc_worker_define_gucs.
 */
void
cc_delivery_define_gucs(void)
{
	DefineCustomIntVariable("callback_center.batch_size",
							"Most events the worker holds claimed and not yet sent.",
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
}

static int64
now_ms(void)
{
	return GetCurrentTimestamp() / 1000;
}

/* Finds or creates the runtime state of an endpoint. */
static EndpointRuntime *
endpoint_state(int32 id)
{
	bool		found;
	EndpointRuntime *rt;

	if (endpoint_runtime == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(int32);
		ctl.entrysize = sizeof(EndpointRuntime);
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

static int
per_wave(void)
{
	return Max(1, Min(cc_max_per_endpoint, cc_max_concurrent));
}

/*
 * The most one endpoint may hold claimed or in flight: one request per
 * connection it may use while its latency is unknown or its last results
 * failed, else about CC_TARGET_MS worth of requests at its latency; never
 * above the batch size.
 */
static int
endpoint_target(const EndpointRuntime *rt)
{
	double		waves = 1.0;

	if (!rt->failing && rt->latency_ms > 0)
		waves = Max(1.0, CC_TARGET_MS / rt->latency_ms);
	return (int) Max(1.0, Min((double) cc_batch_size, per_wave() * waves));
}

/* The plan of the endpoint with this id (plans are ordered by id). */
static ClaimPlan *
find_plan(ClaimPlan *plans, int n, int32 id)
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
 * Drops one reference to a batch, freeing it with the last; the current
 * batch keeps only its endpoints once its last event is recorded.
 */
static void
batch_unref(ClaimBatch *b)
{
	if (--b->refs <= 0)
	{
		MemoryContextDelete(b->cxt);
		pfree(b);
	}
	else if (b->refs == 1 && b == current)
		MemoryContextReset(b->events);
}

/* Appends a flight to the judged list. */
static void
judged_push(Flight *f)
{
	if (njudged >= judged_cap)
	{
		judged_cap = Max(judged_cap * 2, CC_RECORD_MAX * 2);
		judged = judged == NULL ?
			MemoryContextAlloc(pipeline_cxt, sizeof(Flight *) * judged_cap) :
			repalloc(judged, sizeof(Flight *) * judged_cap);
	}
	if (njudged == 0)
		first_judged_ms = now_ms();
	judged[njudged++] = f;
}

/*
 * Whether events for non-core endpoints are held back: by
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
 * Claims for the plans whose quota is set (one statement) and queues each
 * event on its endpoint; updates got and total.  Returns the number
 * claimed.  Runs in the claim transaction, allocating in the batch.
 */
static int
claim_pass(ClaimBatch *b, ClaimPlan *plans, int nplans, int lease_s)
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
	for (i = 0; i < ngot; i++)
	{
		ClaimPlan  *p = find_plan(plans, nplans, got[i].endpoint_id);
		EndpointRuntime *rt;
		Flight	   *f;

		/* The claim's LIMIT per endpoint must hold, whatever the plan. */
		if (p == NULL || p->got >= p->quota)
			elog(ERROR, "callback_center: the claim returned more events for endpoint %d than asked",
				 got[i].endpoint_id);
		p->got++;
		p->total++;
		p->full = (p->got == p->quota);

		rt = endpoint_state(p->id);
		f = palloc0(sizeof(Flight));
		f->job = got[i];
		f->ep = p->ep;
		f->batch = b;
		f->probe = rt->probing;
		b->refs++;
		if (f->job.error != NULL)
		{
			/* Not sent, not the receiver's doing: no breaker, no retry. */
			f->out.fate = CC_FATE_DEAD;
			f->out.error = f->job.error;
			if (f->probe)
			{
				rt->breaker.probe_in_flight = false;
				rt->probing = false;
			}
			judged_push(f);
			continue;
		}
		if (rt->qtail)
			rt->qtail->next = f;
		else
			rt->qhead = f;
		rt->qtail = f;
		rt->queued++;
		total_queued++;
	}
	return ngot;
}

/*
 * Phase claim: whether to run it now.  When a commit woke the worker, when
 * the soonest retry, breaker reopening or token is due (or the poll
 * interval passed), or when an endpoint that got all it asked for last
 * time has room for half its target again.
 */
static bool
claim_due(uint64 commit_gen, int64 now)
{
	HASH_SEQ_STATUS seq;
	EndpointRuntime *rt;

	if (total_queued >= cc_batch_size)
		return false;
	if (!claimed_once || commit_gen != claim_gen || now >= next_claim_ms)
		return true;
	if (endpoint_runtime == NULL)
		return false;
	hash_seq_init(&seq, endpoint_runtime);
	while ((rt = hash_seq_search(&seq)) != NULL)
		if (rt->full && rt->in_flight + rt->queued <= endpoint_target(rt) / 2)
		{
			hash_seq_term(&seq);
			return true;
		}
	return false;
}

/*
 * Phase claim (transaction 1, committed before anything is sent): loads the
 * endpoints, decides what each may claim (room below its target, breaker,
 * degradation, tokens), shares batch_size between them and claims.  When
 * nothing was claimed, learns in the same transaction when to look next.
 * The commit need not be flushed: a claim lost in a crash leaves its rows
 * pending, as a release would, and no attempt was counted for them.
 */
static void
claim_phase(uint64 commit_gen, int64 t0)
{
	MemoryContext old;
	ClaimBatch *b;
	ClaimPlan  *plans;
	int			nplans = 0;
	int			njobs = 0;
	int			budget = cc_batch_size - total_queued;
	int			pw = per_wave();
	int64		soonest = -1;
	int64		lease_ms = 0;
	int			lease_s;
	int			i,
				k,
				pass;

	claim_gen = commit_gen;
	claimed_once = true;

	b = MemoryContextAllocZero(pipeline_cxt, sizeof(ClaimBatch));
	b->cxt = AllocSetContextCreate(pipeline_cxt, "callback_center claim",
								   ALLOCSET_SMALL_SIZES);
	b->events = AllocSetContextCreate(b->cxt, "callback_center claimed events",
									  ALLOCSET_DEFAULT_SIZES);
	b->refs = 1;				/* it becomes the current batch */

	pgstat_report_activity(STATE_RUNNING, "callback_center: claiming");
	old = CurrentMemoryContext;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) set_config_option("synchronous_commit", "off", PGC_SUSET,
							 PGC_S_SESSION, GUC_ACTION_LOCAL, true, 0, false);
	cc_worker_role_enter();
	MemoryContextSwitchTo(b->cxt);
	PushActiveSnapshot(GetTransactionSnapshot());
	b->neps = cc_queue_load_endpoints(&b->eps);
	MemoryContextSwitchTo(b->events);
	if (t0 - last_bury_ms >= CC_BURY_INTERVAL_MS)
	{
		/* Rows no endpoint will ever claim must not wait for ever. */
		(void) cc_queue_bury_orphans();
		last_bury_ms = t0;
	}
	b->degrade = degrade_non_core_now(b->eps, b->neps, t0);

	/* Which endpoints may claim now, in id order. */
	plans = palloc0(sizeof(ClaimPlan) * Max(b->neps, 1));
	for (i = 0; i < b->neps; i++)
	{
		CcEndpoint *e = &b->eps[i];
		EndpointRuntime *rt = endpoint_state(e->id);
		CcBreakerConfig cfg = breaker_config(e);
		ClaimPlan  *p;
		CcBreakerVerdict v;
		int			room;

		rt->full = false;
		if (b->degrade && !e->is_core)
			continue;
		room = endpoint_target(rt) - rt->in_flight - rt->queued;
		if (room <= 0 || rt->probing)
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
		p->cap = room;
		if (v == CC_BREAKER_PROBE)
		{
			p->cap = 1;
			p->exact = true;
			rt->probing = true;
		}
		lease_ms = Max(lease_ms, (int64) e->timeout_ms *
					   ((rt->in_flight + rt->queued + p->cap + pw - 1) / pw + 1));
	}

	/*
	 * First pass: the budget shared equally (within each endpoint's room and
	 * tokens).  Later passes share what is left between the endpoints that
	 * filled their quota.  The spare events go first to the endpoints from
	 * claim_start on, one further each claim, so that with more endpoints
	 * than the budget every endpoint still gets its turn.
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
			ClaimPlan  *p = &plans[i];

			if (pass == 0 || (!p->exact && p->full && p->total < p->cap))
				cand[i] = true;
			p->quota = 0;
			if (cand[i])
				ncand++;
		}
		if (ncand == 0)
			break;
		share = budget / ncand;
		spare = budget % ncand;
		for (k = 0; k < nplans; k++)
		{
			ClaimPlan  *p;
			CcEndpoint *e;
			EndpointRuntime *rt;
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
		{
			int			n = claim_pass(b, plans, nplans, lease_s);

			budget -= n;
			njobs += n;
		}
		pfree(cand);
	}

	if (njobs == 0 && nplans > 0)
	{
		/*
		 * Nothing claimed: learn when to look next.  Only the endpoints that
		 * could claim count; those held back had their own wake-up time put
		 * in soonest above, or wait for the poll interval.
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
			due = CC_LOCKED_WAIT_MS;	/* due, not claimed: rows locked */
		else if (due > 0)
			due = Max(due - (now_ms() - t0), 1);
		if (due >= 0 && (soonest < 0 || due < soonest))
			soonest = due;
	}
	PopActiveSnapshot();
	cc_worker_role_leave();
	CommitTransactionCommand();
	MemoryContextSwitchTo(old);
	pgstat_report_stat(false);

	for (i = 0; i < nplans; i++)
	{
		ClaimPlan  *p = &plans[i];
		EndpointRuntime *rt = endpoint_state(p->id);

		/* Tokens taken but not used by the claim go back to their buckets. */
		if (p->tokens > p->total)
			rt->bucket.tokens = Min(Max(p->ep->rate_per_s, 1.0),
									rt->bucket.tokens + (p->tokens - p->total));
		if (rt->probing && p->exact && p->cap == 1 && p->total == 0 &&
			rt->in_flight == 0 && rt->queued == 0)
		{
			rt->breaker.probe_in_flight = false;
			rt->probing = false;
		}
		rt->full = p->full;
	}

	/*
	 * Never later than the poll interval: the next-due look-up also sees
	 * the rows this pipeline holds 'delivering' (due at their lease's end),
	 * and events behind them (an ordered aggregate's next) fall due when
	 * they are recorded, not at a time it can tell.
	 */
	next_claim_ms = now_ms() + (soonest < 0 ? cc_poll_interval_ms :
								Min(Max(soonest, 1), cc_poll_interval_ms));
	{
		ClaimBatch *prev = current;

		current = b;
		if (prev != NULL)
			batch_unref(prev);
		if (b->refs == 1)
			MemoryContextReset(b->events);	/* claimed nothing */
	}
}

/*
 * The request of a flight to a provider-format endpoint: the one the claim
 * built and signed (adapter.h), with our User-Agent.  A request that
 * cannot be read gets no URL, so that its start fails and says so.
 */
static void
provider_request(Flight *f, const char *ua)
{
	CcEndpoint *e = f->ep;
	CcJob	   *job = &f->job;
	CcAdapterRequest ar;
	const char *why;
	int			i;

	memset(&f->req, 0, sizeof(f->req));
	f->req.tag = job->id;
	f->req.timeout_ms = e->timeout_ms;
	f->req.group = e->id;
	if (!cc_adapter_read_request(job->body, job->body_len, &ar, &why))
	{
		ereport(WARNING,
				(errmsg("callback_center: event %lld: %s", (long long) job->id, why)));
		return;
	}
	for (i = 0; i < ar.nheaders; i++)
		f->hdr[i] = ar.headers[i];
	f->hdr[i++] = ua;
	f->req.url = ar.url;
	f->req.method = ar.method;
	f->req.body = ar.body;
	f->req.body_len = strcmp(ar.method, "GET") == 0 ? 0 : ar.body_len;
	f->req.headers = f->hdr;
	f->req.nheaders = i;
	f->req.capture = cc_adapter_capture(e->format);
}

/* Builds the signed request of a flight (no transaction open). */
static void
sign_request(Flight *f, const char *ua)
{
	CcEndpoint *e = f->ep;
	CcJob	   *job = &f->job;
	char		msg_id[32];
	int64		ts = (int64) time(NULL);
	char	   *sig;

	if (e->format != NULL)
	{
		provider_request(f, ua);
		return;
	}

	snprintf(msg_id, sizeof(msg_id), "msg_" INT64_FORMAT, job->id);
	sig = cc_sign_webhook(e->key, e->keylen, msg_id, ts, job->body,
						  job->body_len);
	/* During a rotation sign with both secrets (space-separated). */
	if (e->prev_key)
		sig = psprintf("%s %s", sig,
					   cc_sign_webhook(e->prev_key, e->prev_keylen, msg_id,
									   ts, job->body, job->body_len));
	f->hdr[0] = "Content-Type: application/json";
	f->hdr[1] = ua;
	f->hdr[2] = psprintf("webhook-id: %s", msg_id);
	f->hdr[3] = psprintf("webhook-timestamp: " INT64_FORMAT, ts);
	f->hdr[4] = psprintf("webhook-signature: %s", sig);
	f->req.tag = job->id;
	f->req.url = e->url;
	f->req.body = job->body;
	f->req.body_len = job->body_len;
	f->req.headers = f->hdr;
	f->req.nheaders = 5;
	f->req.timeout_ms = e->timeout_ms;
	f->req.group = e->id;
}

static void judge(Flight *f);

/*
 * A failed attempt: retried after the endpoint's schedule (Retry-After of
 * a 429 or 503 honoured), dead once it is exhausted.
 */
static void
schedule_retry(Flight *f, int64 t)
{
	CcEndpoint *e = f->ep;
	CcHttpResult *r = &f->res;
	CcJobResult *out = &f->out;
	int64		delay = cc_retry_delay_ms(e->delays_ms, e->ndelays,
										  f->job.attempt, e->max_attempts,
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
		/* look again when it falls due */
		next_claim_ms = Min(next_claim_ms, t + Max(delay, 1));
	}
	if (out->error == NULL)
		out->error = psprintf("HTTP %d", r->status);
}

/*
 * Requests whose outcome is not yet durable: running, or judged and not
 * recorded.  max_concurrent caps this, not only what runs, so that a crash
 * re-sends at most max_concurrent requests.
 */
static int
unrecorded(void)
{
	return cc_http_stream_active() + njudged;
}

/*
 * Phase send: starts claimed events while max_concurrent and
 * max_per_endpoint allow, one endpoint after another, round robin.
 */
static void
send_phase(void)
{
	static char ua[64];
	int			limit;
	int			per_ep;
	bool		progress = true;

	if (total_queued == 0)
		return;
	cc_http_init();
	limit = cc_http_stream_limit(cc_max_concurrent, cc_response_cap);
	per_ep = Max(1, Min(cc_max_per_endpoint, limit));
	if (ua[0] == '\0')
		snprintf(ua, sizeof(ua), "User-Agent: callback_center/%s", CC_VERSION);
	if (sign_owner == NULL)
		sign_owner = ResourceOwnerCreate(NULL, "callback_center signing");
	pgstat_report_activity(STATE_RUNNING, "callback_center: delivering");

	while (progress && total_queued > 0 && unrecorded() < limit)
	{
		HASH_SEQ_STATUS seq;
		EndpointRuntime *rt;

		progress = false;
		hash_seq_init(&seq, endpoint_runtime);
		while ((rt = hash_seq_search(&seq)) != NULL)
		{
			Flight	   *f = rt->qhead;
			MemoryContext old;

			if (f == NULL || rt->in_flight >= per_ep)
				continue;
			if (unrecorded() >= limit)
			{
				hash_seq_term(&seq);
				break;
			}
			rt->qhead = f->next;
			if (rt->qhead == NULL)
				rt->qtail = NULL;
			f->next = NULL;
			rt->queued--;
			total_queued--;
			rt->in_flight++;
			progress = true;

			old = MemoryContextSwitchTo(f->batch->events);
			Assert(CurrentResourceOwner == NULL || CurrentResourceOwner == sign_owner);
			CurrentResourceOwner = sign_owner;
			sign_request(f, ua);
			CurrentResourceOwner = NULL;
			MemoryContextSwitchTo(results_cxt);
			if (cc_http_stream_start(&f->req, &f->res))
			{
				f->running = true;
				dlist_push_tail(&inflight, &f->live);
			}
			else
				judge(f);		/* could not start: its result says why */
			MemoryContextSwitchTo(old);
		}
	}
}

/*
 * Phase judge: decides one finished request against its endpoint's policy
 * (breaker, retry schedule, Retry-After, 410) and queues it for the
 * record.  Strings go into results_cxt.
 */
static void
judge(Flight *f)
{
	CcEndpoint *e = f->ep;
	EndpointRuntime *rt = endpoint_state(e->id);
	CcHttpResult *r = &f->res;
	CcJobResult *out = &f->out;
	CcBreakerConfig cfg = breaker_config(e);
	CcAttemptClass cls;
	int64		t = now_ms();

	rt->in_flight--;
	if (f->running)
	{
		dlist_delete(&f->live);
		f->running = false;
	}
	out->http_status = r->status;
	out->latency_ms = r->latency_ms;
	out->error = r->error;
	out->response = r->body;
	cls = cc_classify_attempt(r->status, r->error != NULL);

	/*
	 * A provider answers in its own terms, 4xx included (WeChat Pay's 404
	 * ORDER_NOT_EXIST): any whole response short of 5xx, 408 and 429 is an
	 * answer, a success only once its signature verifies (check_answers).
	 * The breaker hears of it then: a forged answer is a failure, and a
	 * probe stays out (rt->probing) until it is known.
	 */
	if (e->format != NULL && r->error == NULL && !r->truncated &&
		r->status >= 200 && r->status < 500 && r->status != 408 &&
		r->status != 429 && r->status != 410)
	{
		cls = CC_ATTEMPT_SUCCESS;
		f->check = true;
	}
	else
	{
		cc_breaker_record(&rt->breaker, &cfg, cls == CC_ATTEMPT_SUCCESS,
						  f->probe, t);
		if (f->probe)
			rt->probing = false;
	}
	if (cls == CC_ATTEMPT_SUCCESS)
	{
		rt->nok++;
		rt->latency_sum += r->latency_ms;
		out->fate = CC_FATE_DELIVERED;
	}
	else
		rt->nfailed++;
	if (cls == CC_ATTEMPT_GONE)
	{
		out->fate = CC_FATE_DEAD;
		out->error = psprintf("410 Gone: endpoint disabled%s%s",
							  r->error ? ": " : "", r->error ? r->error : "");
	}
	else if (cls != CC_ATTEMPT_SUCCESS)
		schedule_retry(f, t);
	judged_push(f);
}

/*
 * Phase wait: lets the transfers run until one finishes or timeout_ms
 * passes, and judges every one that finished.
 */
static void
wait_phase(int timeout_ms)
{
	CcHttpResult *done[64];
	int			n;
	int			i;
	MemoryContext old;

	if (cc_http_stream_active() == 0)
		return;
	old = MemoryContextSwitchTo(results_cxt);
	n = cc_http_stream_wait(timeout_ms, done, lengthof(done));
	/* Without the postmaster exit at once (see cc_delivery_step). */
	if (!PostmasterIsAlive())
		proc_exit(1);
	for (i = 0; i < n; i++)
		judge((Flight *) ((char *) done[i] - offsetof(Flight, res)));
	MemoryContextSwitchTo(old);
}

/*
 * Providers' answers (the adapter layer): verifies, in a transaction of its
 * own, every judged answer of a provider-format endpoint (_adapter_check).
 * One whose signature does not verify, or that cannot be read, becomes a
 * failed attempt, retried on the schedule and charged to the endpoint's
 * breaker as a failure; the others are its successes and carry their
 * normalized answer to the record.
 */
static void
check_answers(void)
{
	int64	   *ids;
	int		   *statuses;
	char	  **headers;
	char	  **bodies;
	bool	   *ok;
	char	  **answers;
	char	  **errors;
	Flight	  **fl;
	int			n = 0;
	int			i;
	int64		t = now_ms();
	MemoryContext old;

	for (i = 0; i < njudged; i++)
		if (judged[i]->check)
			n++;
	if (n == 0)
		return;
	old = MemoryContextSwitchTo(results_cxt);
	ids = palloc(sizeof(int64) * n);
	statuses = palloc(sizeof(int) * n);
	headers = palloc(sizeof(char *) * n);
	bodies = palloc(sizeof(char *) * n);
	ok = palloc(sizeof(bool) * n);
	answers = palloc(sizeof(char *) * n);
	errors = palloc(sizeof(char *) * n);
	fl = palloc(sizeof(Flight *) * n);
	n = 0;
	for (i = 0; i < njudged; i++)
	{
		Flight	   *f = judged[i];

		if (!f->check)
			continue;
		fl[n] = f;
		ids[n] = f->job.id;
		statuses[n] = f->res.status;
		headers[n] = f->res.headers;
		bodies[n] = f->res.body;
		n++;
	}

	pgstat_report_activity(STATE_RUNNING, "callback_center: checking provider answers");
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	cc_worker_role_enter();
	MemoryContextSwitchTo(results_cxt);
	PushActiveSnapshot(GetTransactionSnapshot());
	cc_queue_check_answers(n, ids, statuses, headers, bodies, ok, answers,
						   errors);
	PopActiveSnapshot();
	cc_worker_role_leave();
	CommitTransactionCommand();
	MemoryContextSwitchTo(results_cxt);

	for (i = 0; i < n; i++)
	{
		Flight	   *f = fl[i];
		EndpointRuntime *rt = endpoint_state(f->ep->id);
		CcBreakerConfig cfg = breaker_config(f->ep);

		f->check = false;
		cc_breaker_record(&rt->breaker, &cfg, ok[i], f->probe, t);
		if (f->probe)
			rt->probing = false;
		if (ok[i])
		{
			f->answer = answers[i];
			continue;
		}
		/* Judged a success: count it as the failure it is. */
		rt->nok--;
		rt->latency_sum -= f->res.latency_ms;
		rt->nfailed++;
		f->out.error = errors[i] ? errors[i] : "the provider's answer does not verify";
		schedule_retry(f, t);
	}
	MemoryContextSwitchTo(old);
}

/*
 * Keeps, in the record's transaction, the normalized answers of the
 * provider-format events now done: delivered (their checked answer) or
 * dead (their last error), for the jobs worker to apply.
 */
static void
record_answers(void)
{
	int64	   *ids = palloc(sizeof(int64) * njudged);
	int		   *attempts = palloc(sizeof(int) * njudged);
	int		   *statuses = palloc(sizeof(int) * njudged);
	char	  **answers = palloc(sizeof(char *) * njudged);
	char	  **errors = palloc(sizeof(char *) * njudged);
	int			n = 0;
	int			i;

	for (i = 0; i < njudged; i++)
	{
		Flight	   *f = judged[i];

		if (f->ep->format == NULL ||
			(f->out.fate != CC_FATE_DELIVERED && f->out.fate != CC_FATE_DEAD))
			continue;
		ids[n] = f->job.id;
		attempts[n] = f->job.attempt;
		statuses[n] = f->out.http_status;
		answers[n] = f->out.fate == CC_FATE_DELIVERED ? f->answer : NULL;
		errors[n] = f->out.error;
		n++;
	}
	cc_queue_record_answers(n, ids, attempts, statuses, answers, errors);
}

/*
 * Phase record (transaction 2, synchronous commit): the judged results in
 * one set-based statement (outbox rows, attempts log, endpoint state),
 * then what they say of each endpoint's latency.  With force, whatever is
 * judged; else only every CC_RECORD_MS, or at CC_RECORD_MAX results, or
 * when nothing is in flight.
 */
static void
record_phase(bool force)
{
	CcJob	   *jobs;
	CcJobResult *results;
	int32	   *gone;
	int			ngone = 0;
	CcEndpointSnapshot *snaps = NULL;
	int			nsnaps = 0;
	int			i;
	MemoryContext old;
	HASH_SEQ_STATUS seq;
	EndpointRuntime *rt;

	if (njudged == 0)
		return;
	if (!force && njudged < Min(CC_RECORD_MAX, Max(1, cc_max_concurrent / 2)) &&
		cc_http_stream_active() > 0 &&
		now_ms() - first_judged_ms < CC_RECORD_MS)
		return;
	check_answers();

	old = MemoryContextSwitchTo(results_cxt);
	jobs = palloc(sizeof(CcJob) * njudged);
	results = palloc(sizeof(CcJobResult) * njudged);
	gone = palloc(sizeof(int32) * njudged);
	for (i = 0; i < njudged; i++)
	{
		jobs[i] = judged[i]->job;
		results[i] = judged[i]->out;
		if (results[i].fate == CC_FATE_DEAD && results[i].http_status == 410)
			gone[ngone++] = judged[i]->job.endpoint_id;
	}
	if (current != NULL)
	{
		int64		t = now_ms();

		snaps = palloc0(sizeof(CcEndpointSnapshot) * Max(current->neps, 1));
		for (i = 0; i < current->neps; i++)
		{
			CcEndpoint *e = &current->eps[i];
			EndpointRuntime *ert = endpoint_state(e->id);
			CcBreakerConfig cfg = breaker_config(e);

			snaps[i].endpoint_id = e->id;
			snaps[i].breaker = ert->breaker.state == CC_BREAKER_OPEN ? "open" :
				ert->breaker.state == CC_BREAKER_HALF_OPEN ? "half_open" : "closed";
			snaps[i].opened_at = ert->breaker.state == CC_BREAKER_CLOSED ? 0 :
				(TimestampTz) ert->breaker.opened_at_ms * 1000;
			cc_breaker_window(&ert->breaker, &cfg, t, &snaps[i].window_ok,
							  &snaps[i].window_fail);
			snaps[i].tokens = e->rate_per_s > 0 ? ert->bucket.tokens : -1;
			snaps[i].degraded = current->degrade && !e->is_core;
		}
		nsnaps = current->neps;
	}

	pgstat_report_activity(STATE_RUNNING, "callback_center: recording");
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	cc_worker_role_enter();
	MemoryContextSwitchTo(results_cxt);
	PushActiveSnapshot(GetTransactionSnapshot());
	cc_queue_record(jobs, results, njudged, gone, ngone, snaps, nsnaps);
	record_answers();
	PopActiveSnapshot();
	cc_worker_role_leave();
	CommitTransactionCommand();
	MemoryContextSwitchTo(old);
	pgstat_report_stat(false);

	/* What these results say of each endpoint's latency, for its target. */
	hash_seq_init(&seq, endpoint_runtime);
	while ((rt = hash_seq_search(&seq)) != NULL)
	{
		if (rt->nok + rt->nfailed == 0)
			continue;
		rt->failing = (rt->nfailed > 0);
		if (rt->nok > 0)
		{
			double		avg = rt->latency_sum / rt->nok;

			rt->latency_ms = rt->latency_ms > 0 ?
				(rt->latency_ms + avg) / 2 : avg;
		}
		rt->nok = rt->nfailed = 0;
		rt->latency_sum = 0;
	}

	for (i = 0; i < njudged; i++)
	{
		/* The next event of an ordered aggregate may be due now. */
		if (judged[i]->ep->ordered)
			next_claim_ms = 0;
		batch_unref(judged[i]->batch);
	}
	njudged = 0;
	MemoryContextReset(results_cxt);
}

/* Creates the pipeline's memory on first use. */
static void
pipeline_init(void)
{
	if (pipeline_cxt != NULL)
		return;
	pipeline_cxt = AllocSetContextCreate(TopMemoryContext,
										 "callback_center pipeline",
										 ALLOCSET_DEFAULT_SIZES);
	results_cxt = AllocSetContextCreate(pipeline_cxt,
										"callback_center results",
										ALLOCSET_DEFAULT_SIZES);
}

/*
 * One step of the pipeline: claim (when claim_allowed and due), send,
 * wait, judge, record.  Returns whether work remains in the pipeline
 * (claimed, in flight or unrecorded): the worker then calls again at once.
 * Otherwise *wait_ms says how long it may sleep before something falls due
 * (0: call again at once).  Runs with no transaction open; an ERROR
 * leaves the pipeline to cc_delivery_abandon.
 */
bool
cc_delivery_step(uint64 commit_gen, bool claim_allowed, int64 *wait_ms)
{
	int64		t = now_ms();
	int			timeout;

	pipeline_init();
	if (claim_allowed && claim_due(commit_gen, t))
		claim_phase(commit_gen, t);
	send_phase();

	/*
	 * Wait briefly while slots are free (a commit may bring events to
	 * claim), else until a request finishes; never past the record's
	 * deadline.
	 */
	timeout = 100;
	if (claim_allowed && total_queued < cc_batch_size &&
		unrecorded() < cc_max_concurrent)
		timeout = CC_WAIT_SHORT_MS;
	if (njudged > 0)
		timeout = Min(timeout, Max(0, CC_RECORD_MS - (int) (now_ms() - first_judged_ms)));
	wait_phase(timeout);
	record_phase(false);

	if (cc_http_stream_active() > 0 || total_queued > 0 || njudged > 0)
	{
		*wait_ms = 0;
		return true;
	}
	t = now_ms();
	/* Paused, there is no claim to time: sleep until the poll or a wake(). */
	if (!claim_allowed)
		*wait_ms = cc_poll_interval_ms;
	else
		*wait_ms = claim_due(commit_gen, t) ? 0 : Max(next_claim_ms - t, 1);
	return false;
}

/*
 * Shutdown: abandons the transfers in flight and releases every claimed
 * event not yet judged (back to pending, due now, no attempt counted, no
 * breaker charged), recording what was judged with them.
 */
void
cc_delivery_shutdown(void)
{
	HASH_SEQ_STATUS seq;
	EndpointRuntime *rt;

	if (pipeline_cxt == NULL)
		return;
	cc_http_stream_abandon();
	while (!dlist_is_empty(&inflight))
	{
		Flight	   *f = dlist_container(Flight, live,
										dlist_pop_head_node(&inflight));

		f->running = false;
		endpoint_state(f->ep->id)->in_flight--;
		if (f->probe)
		{
			endpoint_state(f->ep->id)->breaker.probe_in_flight = false;
			endpoint_state(f->ep->id)->probing = false;
		}
		f->out.fate = CC_FATE_RELEASED;
		judged_push(f);
	}
	if (endpoint_runtime != NULL)
	{
		hash_seq_init(&seq, endpoint_runtime);
		while ((rt = hash_seq_search(&seq)) != NULL)
		{
			Flight	   *f;

			for (f = rt->qhead; f != NULL; f = f->next)
			{
				f->out.fate = CC_FATE_RELEASED;
				judged_push(f);
			}
			rt->qhead = rt->qtail = NULL;
			rt->queued = 0;
		}
	}
	total_queued = 0;
	record_phase(true);
}

/*
 * After an ERROR: forgets everything in the pipeline.  The claimed rows
 * stay 'delivering' until the worker's recovery makes them due again; what
 * was judged and not recorded is sent again.
 */
void
cc_delivery_abandon(void)
{
	HASH_SEQ_STATUS seq;
	EndpointRuntime *rt;

	if (pipeline_cxt == NULL)
		return;
	cc_http_stream_abandon();
	if (endpoint_runtime != NULL)
	{
		hash_seq_init(&seq, endpoint_runtime);
		while ((rt = hash_seq_search(&seq)) != NULL)
		{
			rt->qhead = rt->qtail = NULL;
			rt->queued = 0;
			rt->in_flight = 0;
			if (rt->probing)
				rt->breaker.probe_in_flight = false;
			rt->probing = false;
			rt->full = false;
		}
	}
	total_queued = 0;
	dlist_init(&inflight);
	njudged = 0;
	judged = NULL;
	judged_cap = 0;
	current = NULL;
	claimed_once = false;
	CurrentResourceOwner = NULL;
	MemoryContextDelete(pipeline_cxt);
	pipeline_cxt = NULL;
	results_cxt = NULL;
}
