/*-------------------------------------------------------------------------
 *
 * jobs.c
 *		The "callback_center jobs" background worker: timeout close of
 *		unpaid orders and the active query of payments stuck in PAYING.
 *
 * A second worker, next to the delivery worker, so that closing a backlog
 * of expired orders never delays deliveries (and a slow delivery round
 * never delays a close).  Started once recovery has finished (never on a
 * standby), connected to callback_center.database.  Each round runs the
 * SQL functions of src/sql/90_jobs.sql, one bounded batch per transaction:
 * close_expired_orders, query_stuck_payments, query_expired_orders (the
 * question asked before closing an order a provider may have been paid
 * for), apply_query_answers, apply_provider_answers, refund_jobs (late
 * payments refunded, open refunds queried again).  An error in a round is
 * logged and counted; the worker carries on.  When a
 * close batch fails, the due orders are closed one per transaction, and
 * each order that fails is recorded in close_failures and left alone for a
 * while (backing off), so failing orders, however many, cannot hold back
 * the others: the next batch passes over them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "extension.h"
#include "jobs.h"
#include "shmem.h"
#include "spi.h"
#include "worker_role.h"

/* Settings (PGC_SIGHUP: the worker re-reads them live). */
static bool cc_jobs_enabled = true;
static int	cc_pay_timeout_s = 1800;
static int	cc_jobs_interval_ms = 1000;
static int	cc_jobs_batch = 100;
static int	cc_pay_query_after_s = 300;
static int	cc_pay_query_interval_s = 60;
static int	cc_close_query_max_wait_s = 600;
static bool cc_refund_late_payments = true;

PG_FUNCTION_INFO_V1(cc_jobs_status);

/*
 * The jobs settings.  Defined in every process that loads the library:
 * the SQL functions read pay_query_after and pay_query_interval.
 */
void
cc_jobs_define_gucs(void)
{
	DefineCustomIntVariable("callback_center.pay_timeout",
							"How long a placed order may stay unpaid before it is closed.",
							"place_order() sets each order's pay deadline from it.",
							&cc_pay_timeout_s,
							1800,
							1,
							30 * 24 * 3600,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomBoolVariable("callback_center.jobs_enabled",
							 "Whether the jobs worker closes expired orders and queries stuck payments.",
							 "Turned off, expired orders wait; closing them later is still exactly once.",
							 &cc_jobs_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.jobs_interval",
							"Time the jobs worker sleeps when a round found nothing more to do.",
							NULL, &cc_jobs_interval_ms, 1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.jobs_batch",
							"Most orders closed, queries sent or answers applied in one transaction.",
							NULL, &cc_jobs_batch, 100, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.pay_query_after",
							"How long a payment may stay PAYING before its provider is asked for its status.",
							NULL, &cc_pay_query_after_s, 300, 1, 30 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.pay_query_interval",
							"Shortest time between two status queries for one payment.",
							NULL, &cc_pay_query_interval_s, 60, 1, 30 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("callback_center.close_query_max_wait",
							"Longest time after its deadline an order waits for its provider's answer before it is closed unasked.",
							"Orders whose payment is PAYING with a provider-format query endpoint are closed only after the provider says unpaid, or after this.",
							&cc_close_query_max_wait_s, 600, 0, 30 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomBoolVariable("callback_center.refund_late_payments",
							 "Whether money that arrived for an order that could not take it is refunded automatically.",
							 "Turned off, late payments wait for callback_center.mark_refunded().",
							 &cc_refund_late_payments, true,
							 PGC_SUSET, 0, NULL, NULL, NULL);
}

/* Counts an error and keeps its message for jobs_status(). */
static void
cc_jobs_note_error(const char *message)
{
	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->jobs_errors++;
	strlcpy(cc_shared->jobs_last_error, message ? message : "",
			CC_JOBS_ERROR_LEN);
	SpinLockRelease(&cc_shared->mutex);
}

/*
 * Logs the error being handled, counts it, and leaves no transaction
 * open.  For use in PG_CATCH; cxt is where the worker continues.  Returns
 * the error message, allocated in cxt.
 */
static char *
cc_jobs_recover(MemoryContext cxt)
{
	ErrorData  *edata;
	char	   *message;

	MemoryContextSwitchTo(cxt);
	edata = CopyErrorData();
	EmitErrorReport();
	FlushErrorState();
	AbortOutOfAnyTransaction();
	cc_jobs_note_error(edata->message);
	message = MemoryContextStrdup(cxt, edata->message ? edata->message : "");
	FreeErrorData(edata);
	MemoryContextSwitchTo(cxt);
	return message;
}

static void
cc_jobs_begin(const char *activity)
{
	pgstat_report_activity(STATE_RUNNING, activity);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	cc_worker_role_enter();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
}

static void
cc_jobs_commit(MemoryContext cxt)
{
	SPI_finish();
	PopActiveSnapshot();
	cc_worker_role_leave();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
}

/* The jobs' statements, prepared once per process (spi.h). */
typedef enum JobsPlanId
{
	JOBS_ORDERS_DUE,
	JOBS_CLOSE_ORDER,
	JOBS_NOTE_CLOSE_FAILURE,
	JOBS_CLOSE_EXPIRED,
	JOBS_QUERY_STUCK,
	JOBS_APPLY_ANSWERS,
	JOBS_QUERY_EXPIRED,
	JOBS_APPLY_PROVIDER_ANSWERS,
	JOBS_REFUNDS,
	NUM_JOBS_PLANS
} JobsPlanId;

static CcPlan plans[NUM_JOBS_PLANS] = {
	[JOBS_ORDERS_DUE] = {
		"SELECT order_id FROM callback_center._orders_due"
		" ORDER BY pay_deadline LIMIT $1",
		1, {INT4OID}
	},
	[JOBS_CLOSE_ORDER] = {
		"SELECT callback_center._close_order($1)::integer",
		1, {TEXTOID}, 1
	},
	[JOBS_NOTE_CLOSE_FAILURE] = {
		"SELECT 0 FROM callback_center._note_close_failure($1, $2)",
		2, {TEXTOID, TEXTOID}, 1
	},
	[JOBS_CLOSE_EXPIRED] = {
		"SELECT callback_center.close_expired_orders($1)",
		1, {INT4OID}, 1
	},
	[JOBS_QUERY_STUCK] = {
		"SELECT callback_center.query_stuck_payments($1)",
		1, {INT4OID}, 1
	},
	[JOBS_APPLY_ANSWERS] = {
		"SELECT callback_center.apply_query_answers($1)",
		1, {INT4OID}, 1
	},
	[JOBS_QUERY_EXPIRED] = {
		"SELECT callback_center.query_expired_orders($1)",
		1, {INT4OID}, 1
	},
	[JOBS_APPLY_PROVIDER_ANSWERS] = {
		"SELECT callback_center.apply_provider_answers($1)",
		1, {INT4OID}, 1
	},
	[JOBS_REFUNDS] = {
		"SELECT callback_center.refund_jobs($1)",
		1, {INT4OID}, 1
	},
};

/*
 * Runs a one-row SELECT of one integer in its own transaction and returns
 * the integer (0 when NULL).  Errors propagate.
 */
static int
cc_jobs_call_args(MemoryContext cxt, const char *activity, JobsPlanId id,
				  Datum *args)
{
	int			n = 0;
	bool		isnull;
	Datum		d;

	cc_jobs_begin(activity);
	if (cc_plan_exec(&plans[id], args, NULL, false, 1, SPI_OK_SELECT) != 1)
		elog(ERROR, "callback_center jobs: \"%s\" returned no row",
			 plans[id].sql);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
					  &isnull);
	if (!isnull)
		n = DatumGetInt32(d);
	cc_jobs_commit(cxt);
	return n;
}

/*
 * Runs "SELECT f($1)" for an integer-returning job function in its own
 * transaction and returns the result.  Errors propagate.
 */
static int
cc_jobs_call(MemoryContext cxt, const char *activity, JobsPlanId id,
			 Datum arg)
{
	return cc_jobs_call_args(cxt, activity, id, &arg);
}

/*
 * Closes due orders one per transaction, after a batch failed: each order
 * that fails is logged, counted and recorded in close_failures (in a
 * transaction of its own, the failed one being gone), which keeps it out of
 * the due orders until its retry time; the others are closed.  Returns how
 * many were closed.
 */
static int
cc_jobs_close_one_by_one(MemoryContext cxt)
{
	char	  **ids;
	int			nids = 0;
	volatile int closed = 0;
	int			i;
	Datum		arg = Int32GetDatum(cc_jobs_batch);

	cc_jobs_begin("callback_center jobs: listing expired orders");
	(void) cc_plan_exec(&plans[JOBS_ORDERS_DUE], &arg, NULL, true, 0,
						SPI_OK_SELECT);
	ids = MemoryContextAlloc(cxt, sizeof(char *) * Max(SPI_processed, 1));
	for (i = 0; i < (int) SPI_processed; i++)
		ids[nids++] = MemoryContextStrdup(cxt,
										  SPI_getvalue(SPI_tuptable->vals[i],
													   SPI_tuptable->tupdesc, 1));
	cc_jobs_commit(cxt);

	for (i = 0; i < nids && !ShutdownRequestPending; i++)
	{
		char	   *failure = NULL;
		Datum		args[2];

		PG_TRY();
		{
			closed += cc_jobs_call(cxt, "callback_center jobs: closing an order",
								   JOBS_CLOSE_ORDER, CStringGetTextDatum(ids[i]));
		}
		PG_CATCH();
		{
			failure = cc_jobs_recover(cxt);
		}
		PG_END_TRY();

		if (failure == NULL)
			continue;
		ereport(WARNING,
				(errmsg("callback_center jobs could not close order \"%s\"",
						ids[i]),
				 errdetail("The order stays open; it is tried again after a backoff (see callback_center.close_failures).")));
		args[0] = CStringGetTextDatum(ids[i]);
		args[1] = CStringGetTextDatum(failure);
		(void) cc_jobs_call_args(cxt, "callback_center jobs: noting a failed close",
								 JOBS_NOTE_CLOSE_FAILURE, args);
	}
	return closed;
}

/*
 * One round: a batch of each job.  Returns true when some batch was full,
 * so more may be due at once.
 */
static bool
cc_jobs_round(MemoryContext cxt)
{
	int			closed = 0;
	int			sent;
	int			asked;
	int			applied;
	int			answered;
	int			refunds;
	bool		failed = false;
	Datum		batch = Int32GetDatum(cc_jobs_batch);

	PG_TRY();
	{
		closed = cc_jobs_call(cxt, "callback_center jobs: closing expired orders",
							  JOBS_CLOSE_EXPIRED, batch);
	}
	PG_CATCH();
	{
		cc_jobs_recover(cxt);
		failed = true;
	}
	PG_END_TRY();
	if (failed)
		closed = cc_jobs_close_one_by_one(cxt);

	sent = cc_jobs_call(cxt, "callback_center jobs: querying stuck payments",
						JOBS_QUERY_STUCK, batch);
	asked = cc_jobs_call(cxt, "callback_center jobs: asking before closing",
						 JOBS_QUERY_EXPIRED, batch);
	applied = cc_jobs_call(cxt, "callback_center jobs: applying query answers",
						   JOBS_APPLY_ANSWERS, batch);
	answered = cc_jobs_call(cxt, "callback_center jobs: applying providers' answers",
							JOBS_APPLY_PROVIDER_ANSWERS, batch);
	refunds = cc_jobs_call(cxt, "callback_center jobs: refunds",
						   JOBS_REFUNDS, batch);

	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->orders_closed += closed;
	cc_shared->queries_sent += sent + asked;
	cc_shared->answers_applied += applied + answered;
	SpinLockRelease(&cc_shared->mutex);

	return (!failed && closed >= cc_jobs_batch) || sent >= cc_jobs_batch ||
		asked >= cc_jobs_batch || applied >= cc_jobs_batch ||
		answered >= cc_jobs_batch || refunds >= cc_jobs_batch;
}

/*
 * Entry point, run by the postmaster in a new process.  Returns only
 * through proc_exit.
 */
void
callback_center_jobs_main(Datum main_arg)
{
	MemoryContext loop_context;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(cc_database, NULL, 0);
	cc_worker_pin_search_path();

	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->jobs_rounds = 0;
	SpinLockRelease(&cc_shared->mutex);
	cc_worker_attach(&cc_shared->jobs);

	/* State history names the job as the actor of its moves. */
	SetConfigOption("callback_center.actor", CC_JOBS_WORKER_TYPE,
					PGC_SUSET, PGC_S_OVERRIDE);

	ereport(LOG,
			(errmsg("callback_center jobs worker started in database \"%s\"",
					cc_database)));

	loop_context = AllocSetContextCreate(TopMemoryContext,
										 "callback_center jobs loop",
										 ALLOCSET_DEFAULT_SIZES);

	while (!ShutdownRequestPending)
	{
		MemoryContext oldcontext;
		bool		more = false;

		oldcontext = MemoryContextSwitchTo(loop_context);
		if (cc_jobs_enabled)
		{
			/*
			 * An error in a round (a failed statement, the extension dropped
			 * under us) is logged and the round abandoned; every batch is
			 * its own transaction, so what committed stays done.
			 */
			PG_TRY();
			{
				if (cc_extension_state() == CC_EXT_CURRENT)
					more = cc_jobs_round(loop_context);
			}
			PG_CATCH();
			{
				cc_jobs_recover(loop_context);
				more = false;
			}
			PG_END_TRY();
		}
		pgstat_report_activity(STATE_IDLE, NULL);
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(loop_context);

		SpinLockAcquire(&cc_shared->mutex);
		cc_shared->jobs_rounds++;
		SpinLockRelease(&cc_shared->mutex);

		/* A full batch means more is due: go round again without waiting. */
		if (!more || ShutdownRequestPending)
		{
			(void) WaitLatch(MyLatch,
							 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 (long) cc_jobs_interval_ms,
							 PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			ereport(LOG,
					(errmsg("callback_center jobs worker reloaded configuration"),
					 errdetail("jobs_interval is %d ms, jobs_batch is %d.",
							   cc_jobs_interval_ms, cc_jobs_batch)));
		}
	}

	ereport(LOG, (errmsg("callback_center jobs worker shutting down")));

	/* Exit code 1: restarted after a crash or pg_terminate_backend. */
	proc_exit(1);
}

/*
 * callback_center.jobs_status(): what the jobs worker has done since it
 * started; pid NULL when it is not running.
 */
Datum
cc_jobs_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[8];
	bool		nulls[8] = {0};
	CallbackCenterShared snap;

	cc_require_worker("callback_center.jobs_status()");

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	SpinLockAcquire(&cc_shared->mutex);
	memcpy(&snap, cc_shared, sizeof(snap));
	SpinLockRelease(&cc_shared->mutex);

	if (snap.jobs.pid != 0)
	{
		values[0] = Int32GetDatum(snap.jobs.pid);
		values[1] = TimestampTzGetDatum(snap.jobs.started_at);
	}
	else
		nulls[0] = nulls[1] = true;
	values[2] = Int64GetDatum((int64) snap.jobs_rounds);
	values[3] = Int64GetDatum((int64) snap.orders_closed);
	values[4] = Int64GetDatum((int64) snap.queries_sent);
	values[5] = Int64GetDatum((int64) snap.answers_applied);
	values[6] = Int64GetDatum((int64) snap.jobs_errors);
	if (snap.jobs_last_error[0] != '\0')
		values[7] = CStringGetTextDatum(snap.jobs_last_error);
	else
		nulls[7] = true;

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
