/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The callback_center background worker: lifecycle and main loop.
 *
 * One worker per cluster, started by the postmaster once recovery has
 * finished (so never on a standby), connected to callback_center.database.
 * This file is its lifecycle only: signals, the schema-version check, the
 * release of what a predecessor left in flight, the latch, reloads and
 * shutdown.  The delivery itself is the pipeline of delivery.c, stepped
 * while it has work; when it has none the worker sleeps on its latch,
 * woken by committing backends, the poll interval or the next due time.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
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

#include "delivery.h"
#include "extension.h"
#include "queue.h"
#include "shmem.h"
#include "worker.h"
#include "worker_role.h"

static bool cc_delivery_enabled = true;
static bool extension_was_ready = false;

/*
 * The worker's settings (the delivery ones are delivery.c's).  Called from
 * _PG_init when preloaded.
 */
void
cc_worker_define_gucs(void)
{
	cc_delivery_define_gucs();
	DefineCustomBoolVariable("callback_center.delivery_enabled",
							 "Whether the worker delivers outbox events at all.",
							 "Turned off, events wait in the outbox; nothing is lost.",
							 &cc_delivery_enabled, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/*
 * Makes events a predecessor left 'delivering' due again, once per start
 * (and after an error abandoned the pipeline).
 */
static void
recover_in_flight(void)
{
	int			n;

	StartTransactionCommand();
	cc_worker_role_enter();
	PushActiveSnapshot(GetTransactionSnapshot());
	n = cc_queue_recover();
	PopActiveSnapshot();
	cc_worker_role_leave();
	CommitTransactionCommand();
	if (n > 0)
		ereport(LOG,
				(errmsg("callback_center worker released %d events left in flight by its predecessor",
						n)));
}

/*
 * One step of the pipeline; an error in it (a failed statement, the
 * extension dropped under us) is logged and the pipeline abandoned, and the
 * worker carries on: what was claimed is released by the next recovery, so
 * nothing waits for a lease.  Returns whether the pipeline has work left.
 */
/*
 * Whether the extension is installed at the library's version.  A step
 * comes every few milliseconds while requests are in flight, and each
 * look-up is a transaction of its own, so a current extension is asked
 * again only once per poll interval, and at once after an error or while
 * it is not current (a dropped or older schema is noticed by the next
 * statement that fails, which clears extension_was_ready).
 */
static bool
extension_current(void)
{
	static TimestampTz checked_at = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (!extension_was_ready ||
		TimestampDifferenceExceeds(checked_at, now, cc_poll_interval_ms))
	{
		checked_at = now;
		return cc_extension_state() == CC_EXT_CURRENT;
	}
	return true;
}

/*
 * Gives the heap the worker freed back to the system, at most every
 * CC_HEAP_RELEASE_MS.  glibc keeps freed chunks inside its heap resident
 * (it trims only the top), so the batches of a long drain leave the
 * worker's RSS at the highest it ever touched, and the RSS an operator
 * watches creeps up with the shape of the traffic although the memory in
 * use stays flat.  malloc_trim(0) returns the free pages; it walks the free
 * lists of a heap of a few megabytes, a fraction of a millisecond.
 */
#define CC_HEAP_RELEASE_MS 10000

static void
release_free_heap(void)
{
#ifdef __GLIBC__
	static TimestampTz released_at = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (TimestampDifferenceExceeds(released_at, now, CC_HEAP_RELEASE_MS))
	{
		(void) malloc_trim(0);
		released_at = now;
	}
#endif
}

static bool
delivery_step(MemoryContext cxt, uint64 gen, int64 *wait_ms)
{
	volatile bool busy = false;

	PG_TRY();
	{
		busy = cc_delivery_step(gen, cc_delivery_enabled, wait_ms);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		EmitErrorReport();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		cc_delivery_abandon();
		extension_was_ready = false;
		busy = false;
		*wait_ms = cc_poll_interval_ms;
	}
	PG_END_TRY();
	return busy;
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
		bool		busy = false;
		uint64		gen_seen;

		/* Wake requests up to here are answered by this round. */
		SpinLockAcquire(&cc_shared->mutex);
		gen_seen = cc_shared->commit_gen;
		SpinLockRelease(&cc_shared->mutex);

		oldcontext = MemoryContextSwitchTo(loop_context);
		if (extension_current())
		{
			if (!extension_was_ready)
			{
				recover_in_flight();
				extension_was_ready = true;
			}
			MemoryContextSwitchTo(loop_context);
			busy = delivery_step(loop_context, gen_seen, &wait_ms);
			more = busy || wait_ms == 0;
		}
		else
		{
			cc_delivery_abandon();
			extension_was_ready = false;
		}
		if (!busy)
			pgstat_report_activity(STATE_IDLE, NULL);
		MemoryContextSwitchTo(oldcontext);
		MemoryContextReset(loop_context);
		release_free_heap();

		/*
		 * Work in the pipeline, or more due at once: step again without
		 * waiting (the step itself waits on the receivers).
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

	/* Release what is claimed and not yet judged; record what is. */
	if (extension_was_ready)
	{
		PG_TRY();
		{
			cc_delivery_shutdown();
		}
		PG_CATCH();
		{
			EmitErrorReport();
			FlushErrorState();
			AbortOutOfAnyTransaction();
		}
		PG_END_TRY();
	}

	/*
	 * Exit code 1 asks the postmaster to restart us after the restart
	 * interval when only the worker was terminated (pg_terminate_backend);
	 * during server shutdown nothing is restarted.  Exit code 0 would
	 * unregister the worker for good.
	 */
	proc_exit(1);
}
