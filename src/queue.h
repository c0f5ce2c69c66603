/*-------------------------------------------------------------------------
 *
 * queue.h
 *		The worker's view of the outbox: endpoints, claims and results.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_QUEUE_H
#define CC_QUEUE_H

#include "postgres.h"

#include "datatype/timestamp.h"

/* An enabled endpoint, as the worker needs it for one round. */
typedef struct CcEndpoint
{
	int32		id;
	char	   *name;
	char	   *url;
	uint8	   *key;			/* decoded whsec_ secret */
	size_t		keylen;
	uint8	   *prev_key;		/* previous secret during rotation, or NULL */
	size_t		prev_keylen;
	int			timeout_ms;
	int			max_attempts;
	int64	   *delays_ms;
	int			ndelays;
	double		rate_per_s;		/* 0 = unlimited */
	double		breaker_ratio;
	int			breaker_window_ms;
	int			breaker_min_requests;
	int			breaker_open_ms;
	bool		is_core;
	bool		ordered;
	char	   *format;			/* NULL for standard_webhooks; else the
								 * provider API its requests speak
								 * (adapter.h) */
} CcEndpoint;

/* A claimed event: one delivery attempt to make. */
typedef struct CcJob
{
	int64		id;				/* outbox id; webhook-id is "msg_<id>" */
	int32		endpoint_id;
	int			attempt;		/* this attempt's number, from 1 */
	char	   *body;			/* NULL when error is set */
	size_t		body_len;
	char	   *error;			/* why no request can be built, or NULL */
} CcJob;

/* What became of one job, for cc_queue_record. */
typedef enum CcJobFate
{
	CC_FATE_DELIVERED,
	CC_FATE_RETRY,				/* failed; next attempt at next_at */
	CC_FATE_DEAD,				/* failed, exhausted (or 410) */
	CC_FATE_RELEASED			/* not attempted (shutdown): attempt given back */
} CcJobFate;

typedef struct CcJobResult
{
	CcJobFate	fate;
	TimestampTz next_at;		/* CC_FATE_RETRY */
	int			http_status;	/* 0 = no response */
	double		latency_ms;
	char	   *error;			/* NULL or a short message */
	char	   *response;		/* NULL or the (capped) response body */
} CcJobResult;

/* Per-endpoint breaker state published for the views. */
typedef struct CcEndpointSnapshot
{
	int32		endpoint_id;
	const char *breaker;		/* "closed", "open", "half_open" */
	TimestampTz opened_at;		/* 0 when closed */
	int			window_ok;
	int			window_fail;
	double		tokens;			/* -1 when unlimited */
	bool		degraded;
} CcEndpointSnapshot;

extern int	cc_queue_recover(void);
extern int	cc_queue_load_endpoints(CcEndpoint **endpoints);
extern int	cc_queue_claim(const int32 *endpoint_ids, const int32 *quotas,
						   const bool *ordered, int n, int lease_s,
						   int64 max_size, CcJob **jobs);
extern void cc_queue_record(const CcJob *jobs, const CcJobResult *results,
							int n, const int32 *gone, int ngone,
							const CcEndpointSnapshot *snaps, int nsnaps);
extern int64 cc_queue_next_due_ms(const int32 *endpoint_ids,
								  const bool *ordered, int n);
extern int	cc_queue_bury_orphans(void);
extern int	cc_queue_due_count(const int32 *endpoint_ids, int n, int limit);

/* Provider-format endpoints (the adapter layer, doc/adapters.md). */
extern void cc_queue_check_answers(int n, const int64 *ids,
								   const int *statuses,
								   char *const *headers, char *const *bodies,
								   bool *ok, char **answers, char **errors);
extern void cc_queue_record_answers(int n, const int64 *ids,
									const int *attempts, const int *statuses,
									char *const *answers,
									char *const *errors);

#endif							/* CC_QUEUE_H */
