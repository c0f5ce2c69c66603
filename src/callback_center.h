/*-------------------------------------------------------------------------
 *
 * callback_center.h
 *		Declarations shared by the files of callback_center.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CALLBACK_CENTER_H
#define CALLBACK_CENTER_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

#define CC_EXTENSION_NAME	"callback_center"
#ifndef CC_VERSION
#error "CC_VERSION comes from the Makefile (the control file's default_version)"
#endif
#define CC_WORKER_TYPE		"callback_center worker"

/*
 * SQLSTATEs of the business errors, class CB ("callback_center").  Input
 * errors use the standard codes (22023 invalid_parameter_value, 22004
 * null_value_not_allowed, 22P02 invalid_text_representation, 42704
 * undefined_object, 42501 insufficient_privilege).  README lists them all.
 */
#define CC_ERRCODE_INSUFFICIENT_STOCK		MAKE_SQLSTATE('C','B','0','0','1')
#define CC_ERRCODE_VERSION_CONFLICT			MAKE_SQLSTATE('C','B','0','0','2')
#define CC_ERRCODE_CONTENTION				MAKE_SQLSTATE('C','B','0','0','3')
#define CC_ERRCODE_UNKNOWN_SKU				MAKE_SQLSTATE('C','B','0','0','4')
#define CC_ERRCODE_ILLEGAL_TRANSITION		MAKE_SQLSTATE('C','B','0','1','0')
#define CC_ERRCODE_UNKNOWN_STATE			MAKE_SQLSTATE('C','B','0','1','1')
#define CC_ERRCODE_PAYLOAD_MISMATCH			MAKE_SQLSTATE('C','B','0','2','0')
#define CC_ERRCODE_UNKNOWN_CALLBACK			MAKE_SQLSTATE('C','B','0','2','1')
#define CC_ERRCODE_INVALID_SIGNATURE		MAKE_SQLSTATE('C','B','0','3','0')
#define CC_ERRCODE_SIGNATURE_EXPIRED		MAKE_SQLSTATE('C','B','0','3','1')
#define CC_ERRCODE_MALFORMED_SIGNATURE		MAKE_SQLSTATE('C','B','0','3','2')
#define CC_ERRCODE_UNKNOWN_PROVIDER			MAKE_SQLSTATE('C','B','0','3','3')
#define CC_ERRCODE_UNKNOWN_ENDPOINT			MAKE_SQLSTATE('C','B','0','4','0')
#define CC_ERRCODE_DESTINATION_NOT_ALLOWED	MAKE_SQLSTATE('C','B','0','4','1')
#define CC_ERRCODE_UNKNOWN_ORDER			MAKE_SQLSTATE('C','B','0','5','0')
#define CC_ERRCODE_COUPON_UNAVAILABLE		MAKE_SQLSTATE('C','B','0','5','1')

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

/* callback_center.c */
extern PGDLLIMPORT CallbackCenterShared *cc_shared;
extern char *cc_database;
extern int	cc_poll_interval_ms;
extern int	cc_pay_timeout_s;
extern bool cc_loaded_at_startup;
extern char *cc_actor;

extern void cc_require_worker(const char *what);
extern void cc_wake_worker(bool force);
extern void cc_register_bgworker(const char *type, const char *function);
extern void cc_worker_pin_search_path(void);
extern void cc_worker_attach(CcWorkerSlot *slot);
/* Whether the extension is installed, and at the library's version. */
typedef enum CcExtensionState
{
	CC_EXT_ABSENT,
	CC_EXT_CURRENT,
	CC_EXT_OTHER_VERSION
} CcExtensionState;

extern CcExtensionState cc_extension_state(void);
extern void cc_refuse_old_schema(const char *function) pg_attribute_noreturn();

/* worker.c */
extern PGDLLEXPORT void callback_center_worker_main(Datum main_arg);
extern void cc_worker_define_gucs(void);

#endif							/* CALLBACK_CENTER_H */
