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

#include "access/xact.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "callback_center.h"

/* Seconds the postmaster waits before restarting a worker that exited. */
#define CC_WORKER_RESTART_SECONDS 5

static void cc_worker_detach(int code, Datum arg);
static bool cc_extension_ready(void);

/*
 * Registers the worker with the postmaster.  Called from _PG_init while
 * shared_preload_libraries is being processed.
 */
void
cc_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	/* RecoveryFinished: a standby never runs it; a promoted one does. */
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = CC_WORKER_RESTART_SECONDS;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, CC_EXTENSION_NAME);
	snprintf(worker.bgw_function_name, BGW_MAXLEN,
			 "callback_center_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, CC_WORKER_TYPE);
	snprintf(worker.bgw_type, BGW_MAXLEN, CC_WORKER_TYPE);
	worker.bgw_main_arg = (Datum) 0;
	worker.bgw_notify_pid = 0;
	RegisterBackgroundWorker(&worker);
}

/* Unpublishes the worker from shared memory as it exits, however it exits. */
static void
cc_worker_detach(int code, Datum arg)
{
	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->worker_pid = 0;
	cc_shared->worker_latch = NULL;
	SpinLockRelease(&cc_shared->mutex);
}

/*
 * Whether the extension is installed in our database.  The worker starts
 * before anyone runs CREATE EXTENSION, and must survive DROP EXTENSION.
 */
static bool
cc_extension_ready(void)
{
	bool		ready;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	ready = OidIsValid(get_extension_oid(CC_EXTENSION_NAME, true));
	CommitTransactionCommand();
	return ready;
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

	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->worker_pid = MyProcPid;
	cc_shared->worker_latch = MyLatch;
	cc_shared->worker_started_at = GetCurrentTimestamp();
	cc_shared->reloads = 0;
	cc_shared->loops = 0;
	SpinLockRelease(&cc_shared->mutex);
	before_shmem_exit(cc_worker_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("callback_center worker started in database \"%s\"",
					cc_database)));

	loop_context = AllocSetContextCreate(TopMemoryContext,
										 "callback_center worker loop",
										 ALLOCSET_DEFAULT_SIZES);

	while (!ShutdownRequestPending)
	{
		MemoryContext oldcontext;

		oldcontext = MemoryContextSwitchTo(loop_context);
		pgstat_report_activity(STATE_RUNNING, "callback_center: checking");
		if (cc_extension_ready())
		{
			/* Delivery and jobs plug in here. */
		}
		pgstat_report_activity(STATE_IDLE, NULL);
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(loop_context);

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 cc_poll_interval_ms,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
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
