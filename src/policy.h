/*-------------------------------------------------------------------------
 *
 * policy.h
 *		Delivery policy as pure functions: retry schedule with jitter,
 *		Retry-After bounds, circuit breaker and token bucket.
 *
 * Nothing here reads the clock, allocates or touches the database: callers
 * pass "now" in milliseconds and own the state structs, so every rule can
 * be unit-tested (test/unit/policy_test.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_POLICY_H
#define CC_POLICY_H

#include "c.h"

/* Number of time buckets in the breaker's sliding window. */
#define CC_BREAKER_BUCKETS 10

typedef enum CcBreakerState
{
	CC_BREAKER_CLOSED = 0,
	CC_BREAKER_OPEN,
	CC_BREAKER_HALF_OPEN
} CcBreakerState;

typedef struct CcBreakerConfig
{
	double		failure_ratio;	/* open when failures / total exceeds it */
	int			window_ms;		/* sliding window length */
	int			min_requests;	/* no verdict below this many in the window */
	int			open_ms;		/* how long it stays open before a probe */
} CcBreakerConfig;

typedef struct CcBreaker
{
	CcBreakerState state;
	int64		opened_at_ms;
	bool		probe_in_flight;
	int64		bucket_start_ms[CC_BREAKER_BUCKETS];
	int			bucket_ok[CC_BREAKER_BUCKETS];
	int			bucket_fail[CC_BREAKER_BUCKETS];
} CcBreaker;

typedef enum CcBreakerVerdict
{
	CC_BREAKER_ALLOW = 0,		/* closed: send */
	CC_BREAKER_PROBE,			/* half open: send this one as the probe */
	CC_BREAKER_DENY				/* open (or a probe is out): hold back */
} CcBreakerVerdict;

typedef struct CcTokenBucket
{
	double		tokens;
	int64		last_ms;
	bool		started;
} CcTokenBucket;

/* Outcome classes of one delivery attempt. */
typedef enum CcAttemptClass
{
	CC_ATTEMPT_SUCCESS = 0,		/* 2xx */
	CC_ATTEMPT_RETRY,			/* transport error, 408, 429, 5xx, other */
	CC_ATTEMPT_GONE				/* 410: the endpoint asked to be disabled */
} CcAttemptClass;

extern CcAttemptClass cc_classify_attempt(int http_status, bool transport_error);

/*
 * The longest retry delay and token wait the worker schedules, whatever an
 * endpoint's row says: the settings are bounded where they are written
 * (retry_schedules caps delays at 30 days, rate_limit_per_s is at least
 * 0.001), and the worker does not trust them beyond that either, so that a
 * timestamp computed from them cannot overflow.
 */
#define CC_MAX_RETRY_DELAY_MS	((int64) 30 * 24 * 3600 * 1000)
#define CC_MAX_BUCKET_WAIT_MS	((int64) 3600 * 1000)

extern int64 cc_retry_delay_ms(const int64 *delays_ms, int ndelays,
							   int attempts_done, int max_attempts,
							   int retry_after_s, int64 max_retry_after_ms,
							   double jitter, uint64 *rng);

extern uint64 cc_rng_next(uint64 *state);

extern CcBreakerVerdict cc_breaker_check(CcBreaker *b,
										 const CcBreakerConfig *cfg,
										 int64 now_ms);
extern void cc_breaker_record(CcBreaker *b, const CcBreakerConfig *cfg,
							  bool success, bool probe, int64 now_ms);
extern void cc_breaker_window(const CcBreaker *b, const CcBreakerConfig *cfg,
							  int64 now_ms, int *ok, int *fail);

extern bool cc_bucket_take(CcTokenBucket *bucket, double rate_per_s,
						   double burst, int64 now_ms);
extern int64 cc_bucket_wait_ms(const CcTokenBucket *bucket, double rate_per_s);

#endif							/* CC_POLICY_H */
