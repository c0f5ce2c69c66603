/*-------------------------------------------------------------------------
 *
 * policy.c
 *		Retry schedule, circuit breaker and token bucket (pure functions).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "policy.h"

/*
 * Classifies an attempt.  2xx succeeds; 410 Gone means the receiver wants
 * no more events; everything else, transport failures included, is retried
 * on the schedule (a 4xx may be a receiver's temporary misconfiguration,
 * and dead-lettering keeps it visible either way).
 */
CcAttemptClass
cc_classify_attempt(int http_status, bool transport_error)
{
	if (transport_error)
		return CC_ATTEMPT_RETRY;
	if (http_status >= 200 && http_status < 300)
		return CC_ATTEMPT_SUCCESS;
	if (http_status == 410)
		return CC_ATTEMPT_GONE;
	return CC_ATTEMPT_RETRY;
}

/* xorshift64*: small, fast, good enough for jitter; never returns 0 state. */
uint64
cc_rng_next(uint64 *state)
{
	uint64		x = *state ? *state : UINT64CONST(0x9E3779B97F4A7C15);

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * UINT64CONST(0x2545F4914F6CDD1D);
}

/*
 * Delay before the next attempt after attempts_done failed attempts, or -1
 * when the event is exhausted and becomes dead.
 *
 * delays_ms[k] is the wait after failed attempt k+1; past the end of the
 * schedule the last delay repeats until max_attempts (when max_attempts is
 * larger than the schedule).  Jitter spreads each delay uniformly over
 * [d * (1 - jitter), d * (1 + jitter)] so that a receiver coming back is
 * not hit by every retry at once.  A Retry-After from the receiver (429,
 * 503) lengthens the delay, bounded by max_retry_after_ms; it never
 * shortens the schedule.
 */
int64
cc_retry_delay_ms(const int64 *delays_ms, int ndelays, int attempts_done,
				  int max_attempts, int retry_after_s,
				  int64 max_retry_after_ms, double jitter, uint64 *rng)
{
	int64		base;
	double		spread;
	double		unit;
	int			idx;

	if (max_attempts <= 0)
		max_attempts = ndelays + 1;
	if (attempts_done >= max_attempts || ndelays <= 0)
		return -1;

	/* attempts_done >= 1 here: we only ask after a failed attempt */
	idx = Min(Max(attempts_done, 1), ndelays) - 1;
	base = Min(Max(delays_ms[idx], 0), CC_MAX_RETRY_DELAY_MS);

	if (jitter > 0)
	{
		jitter = Min(jitter, 1.0);
		unit = (double) (cc_rng_next(rng) >> 11) / (double) (UINT64CONST(1) << 53);
		spread = 1.0 - jitter + 2.0 * jitter * unit;
		base = (int64) llround((double) base * spread);
	}

	if (retry_after_s > 0)
	{
		int64		ra = Min((int64) retry_after_s * 1000, max_retry_after_ms);

		base = Max(base, ra);
	}
	return Min(Max(base, 0), CC_MAX_RETRY_DELAY_MS);
}

/* Index of the window bucket that now_ms falls in. */
static int
bucket_index(const CcBreakerConfig *cfg, int64 now_ms, int64 *start)
{
	int64		width = Max(cfg->window_ms / CC_BREAKER_BUCKETS, 1);
	int64		slot = now_ms / width;

	*start = slot * width;
	return (int) (slot % CC_BREAKER_BUCKETS);
}

/*
 * Successes and failures recorded in the window that ends at now_ms.
 */
void
cc_breaker_window(const CcBreaker *b, const CcBreakerConfig *cfg,
				  int64 now_ms, int *ok, int *fail)
{
	int64		horizon = now_ms - cfg->window_ms;
	int			i;

	*ok = 0;
	*fail = 0;
	for (i = 0; i < CC_BREAKER_BUCKETS; i++)
	{
		if (b->bucket_start_ms[i] > horizon &&
			b->bucket_start_ms[i] <= now_ms)
		{
			*ok += b->bucket_ok[i];
			*fail += b->bucket_fail[i];
		}
	}
}

/*
 * May a request go to this endpoint now?  Closed: yes.  Open: no, until
 * open_ms have passed; then the breaker is half open and exactly one
 * request goes as the probe while the others wait.
 */
CcBreakerVerdict
cc_breaker_check(CcBreaker *b, const CcBreakerConfig *cfg, int64 now_ms)
{
	switch (b->state)
	{
		case CC_BREAKER_CLOSED:
			return CC_BREAKER_ALLOW;
		case CC_BREAKER_OPEN:
			if (now_ms - b->opened_at_ms < cfg->open_ms)
				return CC_BREAKER_DENY;
			b->state = CC_BREAKER_HALF_OPEN;
			b->probe_in_flight = false;
			/* FALLTHROUGH */
		case CC_BREAKER_HALF_OPEN:
			if (b->probe_in_flight)
				return CC_BREAKER_DENY;
			b->probe_in_flight = true;
			return CC_BREAKER_PROBE;
	}
	return CC_BREAKER_ALLOW;	/* keep compilers quiet */
}

/*
 * Records an attempt's outcome; probe says whether it is the result of the
 * probe cc_breaker_check let through.  Open or half open, only the probe
 * decides: success closes the breaker with a clean window, failure reopens
 * it for another open_ms.  Other results arriving then belong to requests
 * sent before the breaker opened (the rest of the batch that opened it):
 * they say nothing of the receiver now, so they neither close it nor push
 * its reopening back.  Closed, it opens when the window holds at least
 * min_requests and the failure ratio exceeds failure_ratio.
 */
void
cc_breaker_record(CcBreaker *b, const CcBreakerConfig *cfg, bool success,
				  bool probe, int64 now_ms)
{
	int64		start;
	int			i = bucket_index(cfg, now_ms, &start);
	int			ok,
				fail;

	if (b->state == CC_BREAKER_HALF_OPEN || b->state == CC_BREAKER_OPEN)
	{
		if (!probe || !b->probe_in_flight)
			return;
		b->probe_in_flight = false;
		if (success)
		{
			memset(b, 0, sizeof(*b));
			b->state = CC_BREAKER_CLOSED;
		}
		else
		{
			b->state = CC_BREAKER_OPEN;
			b->opened_at_ms = now_ms;
		}
		return;
	}

	if (b->bucket_start_ms[i] != start)
	{
		b->bucket_start_ms[i] = start;
		b->bucket_ok[i] = 0;
		b->bucket_fail[i] = 0;
	}
	if (success)
		b->bucket_ok[i]++;
	else
		b->bucket_fail[i]++;

	cc_breaker_window(b, cfg, now_ms, &ok, &fail);
	if (ok + fail >= cfg->min_requests &&
		(double) fail > cfg->failure_ratio * (double) (ok + fail))
	{
		b->state = CC_BREAKER_OPEN;
		b->opened_at_ms = now_ms;
		b->probe_in_flight = false;
	}
}

/*
 * Takes one token if one is available.  The bucket refills at rate_per_s
 * and holds at most burst tokens (at least one); it starts full.
 */
bool
cc_bucket_take(CcTokenBucket *bucket, double rate_per_s, double burst,
			   int64 now_ms)
{
	burst = Max(burst, 1.0);
	if (!bucket->started)
	{
		bucket->tokens = burst;
		bucket->last_ms = now_ms;
		bucket->started = true;
	}
	else if (now_ms > bucket->last_ms)
	{
		bucket->tokens = Min(burst, bucket->tokens +
							 rate_per_s * (double) (now_ms - bucket->last_ms) / 1000.0);
		bucket->last_ms = now_ms;
	}
	if (bucket->tokens >= 1.0)
	{
		bucket->tokens -= 1.0;
		return true;
	}
	return false;
}

/* Milliseconds until the next token, 0 when one is available now. */
int64
cc_bucket_wait_ms(const CcTokenBucket *bucket, double rate_per_s)
{
	double		wait;

	if (!bucket->started || bucket->tokens >= 1.0 || !(rate_per_s > 0))
		return 0;
	wait = ceil((1.0 - bucket->tokens) * 1000.0 / rate_per_s);
	/* a rate near zero (or a NaN) waits the longest, never overflows */
	if (!(wait < (double) CC_MAX_BUCKET_WAIT_MS))
		return CC_MAX_BUCKET_WAIT_MS;
	return (int64) wait;
}
