/*
 * Unit tests of src/policy.c, printing TAP.  Built and run by
 * test/t/060_policy_unit.pl; links policy.c alone (it calls nothing of the
 * server).
 */
#include "postgres.h"

#include <math.h>
#include <stdio.h>

#include "policy.h"

/* port.h maps printf to pg_printf, which lives in the server binary. */
#undef printf

static int	ntests = 0;
static int	nfailed = 0;

static void
ok(bool cond, const char *name)
{
	ntests++;
	if (!cond)
		nfailed++;
	printf("%sok %d - %s\n", cond ? "" : "not ", ntests, name);
}

static void
test_classify(void)
{
	ok(cc_classify_attempt(200, false) == CC_ATTEMPT_SUCCESS, "200 succeeds");
	ok(cc_classify_attempt(204, false) == CC_ATTEMPT_SUCCESS, "204 succeeds");
	ok(cc_classify_attempt(302, false) == CC_ATTEMPT_RETRY, "302 (not followed) is retried");
	ok(cc_classify_attempt(429, false) == CC_ATTEMPT_RETRY, "429 is retried");
	ok(cc_classify_attempt(500, false) == CC_ATTEMPT_RETRY, "500 is retried");
	ok(cc_classify_attempt(410, false) == CC_ATTEMPT_GONE, "410 disables");
	ok(cc_classify_attempt(200, true) == CC_ATTEMPT_RETRY, "transport error is retried");
}

static void
test_retry(void)
{
	int64		def[] = {1000, 3000, 5000};
	uint64		rng = 42;
	int			i;
	bool		in_band = true;
	bool		varies = false;
	int64		first = -2;

	ok(cc_retry_delay_ms(def, 3, 1, 0, -1, 0, 0, &rng) == 1000, "after attempt 1: 1 s");
	ok(cc_retry_delay_ms(def, 3, 2, 0, -1, 0, 0, &rng) == 3000, "after attempt 2: 3 s");
	ok(cc_retry_delay_ms(def, 3, 3, 0, -1, 0, 0, &rng) == 5000, "after attempt 3: 5 s");
	ok(cc_retry_delay_ms(def, 3, 4, 0, -1, 0, 0, &rng) == -1, "after attempt 4: dead");
	ok(cc_retry_delay_ms(def, 3, 2, 2, -1, 0, 0, &rng) == -1, "max_attempts 2 stops early");
	{
		/* about 300,000 years: the row is not trusted beyond 30 days */
		int64		huge[] = {INT64CONST(9467280000000000)};
		int64		neg[] = {-5};

		int64		jittered = cc_retry_delay_ms(huge, 1, 1, 0, -1, 0, 0.2, &rng);

		ok(cc_retry_delay_ms(huge, 1, 1, 0, -1, 0, 0, &rng) == CC_MAX_RETRY_DELAY_MS,
		   "a delay of 300,000 years is capped at 30 days");
		ok(jittered <= CC_MAX_RETRY_DELAY_MS && jittered >= CC_MAX_RETRY_DELAY_MS * 4 / 5,
		   "and spread by the jitter below the cap, never above");
		ok(cc_retry_delay_ms(neg, 1, 1, 0, -1, 0, 0, &rng) == 0, "a negative delay is none");
	}
	ok(cc_retry_delay_ms(def, 3, 5, 7, -1, 0, 0, &rng) == 5000, "past the schedule the last delay repeats");
	ok(cc_retry_delay_ms(def, 3, 7, 7, -1, 0, 0, &rng) == -1, "max_attempts 7: dead after 7");
	ok(cc_retry_delay_ms(def, 0, 1, 0, -1, 0, 0, &rng) == -1, "empty schedule: dead after one attempt");

	for (i = 0; i < 1000; i++)
	{
		int64		d = cc_retry_delay_ms(def, 3, 2, 0, -1, 0, 0.2, &rng);

		if (d < 2400 || d > 3600)
			in_band = false;
		if (first == -2)
			first = d;
		else if (d != first)
			varies = true;
	}
	ok(in_band, "20% jitter keeps 3 s within [2.4 s, 3.6 s]");
	ok(varies, "jitter varies");

	ok(cc_retry_delay_ms(def, 3, 1, 0, 30, 60000, 0, &rng) == 30000,
	   "Retry-After 30 s lengthens a 1 s delay");
	ok(cc_retry_delay_ms(def, 3, 1, 0, 3600, 60000, 0, &rng) == 60000,
	   "Retry-After is bounded");
	ok(cc_retry_delay_ms(def, 3, 3, 0, 1, 60000, 0, &rng) == 5000,
	   "Retry-After never shortens the schedule");
}

static void
test_breaker(void)
{
	CcBreakerConfig cfg = {0.5, 10000, 20, 5000};
	CcBreaker	b;
	int			i;
	int64		t = 1000000;

	memset(&b, 0, sizeof(b));
	for (i = 0; i < 19; i++)
		cc_breaker_record(&b, &cfg, false, false, t);
	ok(b.state == CC_BREAKER_CLOSED, "19 failures: below min_requests, still closed");
	cc_breaker_record(&b, &cfg, false, false, t);
	ok(b.state == CC_BREAKER_OPEN, "20 failures: open");
	ok(cc_breaker_check(&b, &cfg, t + 4999) == CC_BREAKER_DENY, "open: denies for 5 s");
	ok(cc_breaker_check(&b, &cfg, t + 5000) == CC_BREAKER_PROBE, "after 5 s: one probe");
	ok(cc_breaker_check(&b, &cfg, t + 5001) == CC_BREAKER_DENY, "only one probe at a time");
	cc_breaker_record(&b, &cfg, false, true, t + 5100);
	ok(b.state == CC_BREAKER_OPEN, "failed probe reopens");
	ok(cc_breaker_check(&b, &cfg, t + 9000) == CC_BREAKER_DENY, "reopened: denies again");
	ok(cc_breaker_check(&b, &cfg, t + 10100) == CC_BREAKER_PROBE, "probe after another 5 s");
	cc_breaker_record(&b, &cfg, true, true, t + 10200);
	ok(b.state == CC_BREAKER_CLOSED, "successful probe closes");
	ok(cc_breaker_check(&b, &cfg, t + 10201) == CC_BREAKER_ALLOW, "closed: allows");

	/* 50% exactly does not open (must pass 50%); 11/20 does. */
	memset(&b, 0, sizeof(b));
	for (i = 0; i < 10; i++)
	{
		cc_breaker_record(&b, &cfg, true, false, t);
		cc_breaker_record(&b, &cfg, false, false, t);
	}
	ok(b.state == CC_BREAKER_CLOSED, "50% failures: closed");
	cc_breaker_record(&b, &cfg, false, false, t);
	ok(b.state == CC_BREAKER_OPEN, "11 of 21 failed: open");

	/* Old failures leave the window. */
	memset(&b, 0, sizeof(b));
	for (i = 0; i < 15; i++)
		cc_breaker_record(&b, &cfg, false, false, t);
	for (i = 0; i < 15; i++)
		cc_breaker_record(&b, &cfg, false, false, t + 20000);
	ok(b.state == CC_BREAKER_CLOSED, "failures spread past the window do not add up");

	/*
	 * A batch to an endpoint failing 60% of the time: the breaker opens
	 * part way through; the batch's later results, sent before it opened,
	 * must not close it (nor reopen it later), only the probe decides.
	 */
	memset(&b, 0, sizeof(b));
	for (i = 0; i < 100; i++)
		cc_breaker_record(&b, &cfg, (i % 5) >= 3, false, t + i);
	ok(b.state == CC_BREAKER_OPEN,
	   "60% failures in one batch: open at the end of the batch");
	ok(b.opened_at_ms < t + 30,
	   "late results of the batch do not push the reopen time back");
	{
		int64		opened = b.opened_at_ms;

		cc_breaker_record(&b, &cfg, true, false, opened + 1);
		ok(b.state == CC_BREAKER_OPEN,
		   "a success sent before the breaker opened does not close it");
		ok(cc_breaker_check(&b, &cfg, opened + 4999) == CC_BREAKER_DENY,
		   "still denies until open_ms have passed");
		ok(cc_breaker_check(&b, &cfg, opened + 5000) == CC_BREAKER_PROBE,
		   "then one probe");
		cc_breaker_record(&b, &cfg, true, false, opened + 5001);
		ok(b.state == CC_BREAKER_HALF_OPEN && b.probe_in_flight,
		   "half open: a late non-probe success does not close it");
		ok(cc_breaker_check(&b, &cfg, opened + 5002) == CC_BREAKER_DENY,
		   "half open: still only the one probe");
		cc_breaker_record(&b, &cfg, true, true, opened + 5010);
		ok(b.state == CC_BREAKER_CLOSED, "the probe's success closes it");
	}
}

static void
test_bucket(void)
{
	CcTokenBucket bucket;
	int			taken = 0;
	int			i;
	int64		t;

	memset(&bucket, 0, sizeof(bucket));
	for (i = 0; i < 100; i++)
		taken += cc_bucket_take(&bucket, 10, 10, 0) ? 1 : 0;
	ok(taken == 10, "a full bucket of 10 gives 10 at once");
	ok(cc_bucket_wait_ms(&bucket, 10) == 100, "empty at 10/s: next token in 100 ms");
	ok(!cc_bucket_take(&bucket, 10, 10, 50), "no token after 50 ms");
	ok(cc_bucket_take(&bucket, 10, 10, 100), "a token after 100 ms");

	/* Over 10 s at 10/s with burst 10: at most 10 + 100 tokens. */
	memset(&bucket, 0, sizeof(bucket));
	taken = 0;
	for (t = 0; t <= 10000; t += 7)
		while (cc_bucket_take(&bucket, 10, 10, t))
			taken++;
	ok(taken <= 110 && taken >= 100, "rate holds over 10 s");

	/* a rate near zero or not a number waits the longest, no overflow */
	memset(&bucket, 0, sizeof(bucket));
	(void) cc_bucket_take(&bucket, 1e-300, 1, 0);
	(void) cc_bucket_take(&bucket, 1e-300, 1, 1);
	ok(cc_bucket_wait_ms(&bucket, 1e-300) == CC_MAX_BUCKET_WAIT_MS,
	   "a rate of 1e-300 per second waits one hour, not an overflow");
	ok(cc_bucket_wait_ms(&bucket, NAN) == 0, "a NaN rate does not wait");
	ok(cc_bucket_wait_ms(&bucket, 0.5) == 2000, "half a token per second waits 2 s");
}

int
main(void)
{
	test_classify();
	test_retry();
	test_breaker();
	test_bucket();
	printf("1..%d\n", ntests);
	return nfailed == 0 ? 0 : 1;
}
