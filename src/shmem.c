/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		The state the workers share with backends, the wake-ups that go
 *		through it, and the registration of the workers.
 *
 * Everything here exists only when the library is loaded through
 * shared_preload_libraries; SQL functions that need it say so
 * (cc_require_worker).  A backend's commit wakes the delivery worker
 * through its latch, published here; the poll interval is the worker's
 * fallback when no wake-up comes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "extension.h"
#include "shmem.h"

/* Seconds the postmaster waits before restarting a worker that exited. */
#define CC_WORKER_RESTART_SECONDS 5

CallbackCenterShared *cc_shared = NULL;
char	   *cc_database = NULL;
int			cc_poll_interval_ms = 1000;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void cc_shmem_request(void);
static void cc_shmem_startup(void);
static void cc_worker_detach(int code, Datum arg);

PG_FUNCTION_INFO_V1(cc_worker_status);
PG_FUNCTION_INFO_V1(cc_wake);

/*
 * Defines the settings of the workers' processes and, while
 * shared_preload_libraries is processed, requests the shared state.
 * Settings read only at server start can be defined only then; a backend
 * that loads the library later must not define them (that is FATAL).
 */
void
cc_shmem_init(void)
{
	DefineCustomIntVariable("callback_center.poll_interval",
							"Longest time the worker sleeps between looks at its queue.",
							"The worker is normally woken when work commits; this is the fallback.",
							&cc_poll_interval_ms,
							1000,
							10,
							3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	if (process_shared_preload_libraries_in_progress)
		DefineCustomStringVariable("callback_center.database",
								   "Database the callback_center worker connects to.",
								   "The extension must be created in this database for the worker to do anything.",
								   &cc_database,
								   "postgres",
								   PGC_POSTMASTER,
								   GUC_SUPERUSER_ONLY,
								   NULL, NULL, NULL);


	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = cc_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = cc_shmem_startup;
}

/*
 * Registers a worker of this library with the postmaster: connected to a
 * database, started once recovery has finished (a standby never runs it; a
 * promoted one does), restarted after CC_WORKER_RESTART_SECONDS when it
 * exits with code 1.  type names it in pg_stat_activity.backend_type;
 * function is its exported entry point.  Called from _PG_init while
 * shared_preload_libraries is being processed.
 */
void
cc_register_bgworker(const char *type, const char *function)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS |
		BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = CC_WORKER_RESTART_SECONDS;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, CC_EXTENSION_NAME);
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(worker.bgw_name, BGW_MAXLEN, "%s", type);
	snprintf(worker.bgw_type, BGW_MAXLEN, "%s", type);
	worker.bgw_main_arg = (Datum) 0;
	worker.bgw_notify_pid = 0;
	RegisterBackgroundWorker(&worker);
}

/*
 * Pins the calling worker's search_path to pg_catalog, then pg_temp, for
 * its whole life (PGC_S_OVERRIDE: no ALTER DATABASE or ALTER ROLE setting,
 * nor the configuration file, can change it).  A worker connects as the
 * bootstrap superuser: with the default "$user", public, a function or
 * operator with exact argument types planted in public (by the database
 * owner) or in a schema named after that role (by anyone with CREATE on
 * the database) would beat the polymorphic built-in a statement means, and
 * run as superuser.  The statements qualify every name besides.
 */
void
cc_worker_pin_search_path(void)
{
	SetConfigOption("search_path", "pg_catalog, pg_temp",
					PGC_SUSET, PGC_S_OVERRIDE);
}

static void
cc_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(CallbackCenterShared)));
}

/*
 * Attaches to (or, first time round, creates) the shared state of both
 * workers.  Runs in the postmaster and again in every child on
 * EXEC_BACKEND builds.
 */
static void
cc_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	cc_shared = ShmemInitStruct("callback_center",
								sizeof(CallbackCenterShared), &found);
	if (!found)
	{
		memset(cc_shared, 0, sizeof(CallbackCenterShared));
		SpinLockInit(&cc_shared->mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Publishes the calling worker in its slot of the shared state, and
 * unpublishes it as it exits, however it exits.
 */
void
cc_worker_attach(CcWorkerSlot *slot)
{
	SpinLockAcquire(&cc_shared->mutex);
	slot->pid = MyProcPid;
	slot->latch = MyLatch;
	slot->started_at = GetCurrentTimestamp();
	SpinLockRelease(&cc_shared->mutex);
	before_shmem_exit(cc_worker_detach, PointerGetDatum(slot));
}

static void
cc_worker_detach(int code, Datum arg)
{
	CcWorkerSlot *slot = (CcWorkerSlot *) DatumGetPointer(arg);

	SpinLockAcquire(&cc_shared->mutex);
	slot->pid = 0;
	slot->latch = NULL;
	SpinLockRelease(&cc_shared->mutex);
}

/*
 * Raises a clear error when the caller needs the worker or its shared state
 * but the library was not preloaded.
 */
void
cc_require_worker(const char *what)
{
	if (cc_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s requires callback_center to be loaded via shared_preload_libraries",
						what),
				 errhint("Add callback_center to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/*
 * Wakes the delivery worker: at the commit of a transaction that queued
 * events, or when asked (force, callback_center.wake()).  A commit sets the
 * worker's latch only when the worker is asleep waiting for one, so a busy
 * stream of commits costs no syscalls and a worker with delivery paused is
 * not woken at all; every request bumps commit_gen, which the worker reads
 * under the same lock before it sleeps, so no request is lost between the
 * end of a round and the wait.
 */
void
cc_wake_worker(bool force)
{
	Latch	   *latch = NULL;

	if (cc_shared == NULL)
		return;
	SpinLockAcquire(&cc_shared->mutex);
	cc_shared->wakeups++;
	cc_shared->commit_gen++;
	if (force || cc_shared->worker_waiting)
	{
		latch = cc_shared->worker.latch;
		cc_shared->worker_waiting = false;
	}
	SpinLockRelease(&cc_shared->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * callback_center.worker_status(): one row describing the worker, with
 * pid NULL when it is not running.
 */
Datum
cc_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[6];
	bool		nulls[6] = {0};
	CallbackCenterShared snap;

	cc_require_worker("callback_center.worker_status()");

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	SpinLockAcquire(&cc_shared->mutex);
	memcpy(&snap, cc_shared, sizeof(snap));
	SpinLockRelease(&cc_shared->mutex);

	if (snap.worker.pid != 0)
	{
		values[0] = Int32GetDatum(snap.worker.pid);
		values[1] = TimestampTzGetDatum(snap.worker.started_at);
	}
	else
		nulls[0] = nulls[1] = true;
	values[2] = CStringGetTextDatum(cc_database ? cc_database : "");
	values[3] = Int64GetDatum((int64) snap.reloads);
	values[4] = Int64GetDatum((int64) snap.loops);
	values[5] = Int64GetDatum((int64) snap.wakeups);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * callback_center.wake(): wakes the worker now.  Returns whether a worker
 * was running to be woken.
 */
Datum
cc_wake(PG_FUNCTION_ARGS)
{
	bool		running;

	cc_require_worker("callback_center.wake()");
	SpinLockAcquire(&cc_shared->mutex);
	running = cc_shared->worker.latch != NULL;
	SpinLockRelease(&cc_shared->mutex);
	cc_wake_worker(true);
	PG_RETURN_BOOL(running);
}
