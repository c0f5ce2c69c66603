/*-------------------------------------------------------------------------
 *
 * shmem.h
 *		The state the workers share with backends, the wake-ups that go
 *		through it, and the registration of the workers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_SHMEM_H
#define CC_SHMEM_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

/* Bytes of the jobs worker's last error message kept for jobs_status(). */
#define CC_JOBS_ERROR_LEN	256

/* Whether, and since when, one background worker runs. */
typedef struct CcWorkerSlot
{
	pid_t		pid;			/* 0 while the worker does not run */
	Latch	   *latch;			/* its proc latch, or NULL */
	TimestampTz started_at;
} CcWorkerSlot;

/*
 * State the workers share with backends.  Backends read it for the status
 * functions and use the delivery worker's latch to wake it when work
 * commits.
 */
typedef struct CallbackCenterShared
{
	slock_t		mutex;			/* protects every field below */

	/* the delivery worker */
	CcWorkerSlot worker;
	uint64		reloads;		/* SIGHUPs processed since start */
	uint64		loops;			/* latch wake-ups (work or timeout) */
	uint64		wakeups;		/* wake requests from backends */
	uint64		commit_gen;		/* bumped by every wake request */
	bool		worker_waiting; /* asleep and wants the next wake request */

	/* the jobs worker, since it started */
	CcWorkerSlot jobs;
	uint64		jobs_rounds;
	uint64		orders_closed;
	uint64		queries_sent;
	uint64		answers_applied;
	uint64		jobs_errors;
	char		jobs_last_error[CC_JOBS_ERROR_LEN];
} CallbackCenterShared;

/* NULL unless the library was loaded through shared_preload_libraries. */
extern PGDLLIMPORT CallbackCenterShared *cc_shared;
extern char *cc_database;
extern int	cc_poll_interval_ms;

extern void cc_shmem_init(void);
extern void cc_register_bgworker(const char *type, const char *function);
extern void cc_worker_pin_search_path(void);
extern void cc_worker_attach(CcWorkerSlot *slot);
extern void cc_require_worker(const char *what);
extern void cc_wake_worker(bool force);

#endif							/* CC_SHMEM_H */
