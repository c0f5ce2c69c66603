/*-------------------------------------------------------------------------
 *
 * callback_center.c
 *		Module entry point: GUCs, shared memory and worker registration.
 *
 * The SQL API works whenever the library is loaded.  The background worker
 * and the shared state it publishes exist only when the library is loaded
 * through shared_preload_libraries; functions that need them say so.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "allowlist.h"
#include "callback_center.h"
#include "callbacks.h"
#include "jobs.h"
#include "outbox.h"

PG_MODULE_MAGIC;

/* Seconds the postmaster waits before restarting a worker that exited. */
#define CC_WORKER_RESTART_SECONDS 5

CallbackCenterShared *cc_shared = NULL;
char	   *cc_database = NULL;
int			cc_poll_interval_ms = 1000;
int			cc_pay_timeout_s = 1800;
bool		cc_loaded_at_startup = false;
char	   *cc_actor = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

void		_PG_init(void);
static void cc_shmem_request(void);
static void cc_shmem_startup(void);
static void cc_worker_detach(int code, Datum arg);

PG_FUNCTION_INFO_V1(cc_worker_status);
PG_FUNCTION_INFO_V1(cc_wake);

/*
 * Defines the GUCs in every process that loads the library; registers the
 * worker and requests shared memory only at postmaster start.
 */
void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

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

	DefineCustomStringVariable("callback_center.actor",
							   "Who is making the current change, recorded in state history.",
							   "Set it per transaction (SET LOCAL) in application code; empty means the current role.",
							   &cc_actor,
							   "",
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

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

	/*
	 * Settings read only at server start can be defined only while
	 * shared_preload_libraries is processed; a backend that loads us later
	 * must not define them (that is FATAL).
	 */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomStringVariable("callback_center.database",
								   "Database the callback_center worker connects to.",
								   "The extension must be created in this database for the worker to do anything.",
								   &cc_database,
								   "postgres",
								   PGC_POSTMASTER,
								   GUC_SUPERUSER_ONLY,
								   NULL, NULL, NULL);

	cc_inbound_define_gucs();
	if (process_shared_preload_libraries_in_progress)
		cc_worker_define_gucs();
	cc_jobs_define_gucs();
	cc_outbox_define_gucs();

	cc_allowlist_define_gucs();
	MarkGUCPrefixReserved("callback_center");

	if (!process_shared_preload_libraries_in_progress)
		return;

	cc_loaded_at_startup = true;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = cc_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = cc_shmem_startup;

	cc_register_bgworker(CC_WORKER_TYPE, "callback_center_worker_main");
	cc_register_bgworker(CC_JOBS_WORKER_TYPE, "callback_center_jobs_main");
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

static void
cc_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(CallbackCenterShared)));
}

/*
 * Attaches to (or, first time round, creates) the shared state of both
 * workers.  Runs in the
 * postmaster and again in every child on EXEC_BACKEND builds.
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

/*
 * Whether the extension is installed in the worker's database, and at the
 * library's version.  A worker starts before anyone runs CREATE EXTENSION,
 * must survive DROP EXTENSION, and after a new library is installed meets
 * the old schema until ALTER EXTENSION ... UPDATE: its statements are
 * written for the schema of its own version, so it waits rather than run
 * them against another.  It asks this each time round, in a transaction of
 * its own, and says once per version seen why it waits.
 */
CcExtensionState
cc_extension_state(void)
{
	static char warned_for[NAMEDATALEN] = "";
	CcExtensionState state = CC_EXT_ABSENT;
	Oid			extoid;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	extoid = get_extension_oid(CC_EXTENSION_NAME, true);
	if (OidIsValid(extoid))
	{
		HeapTuple	tup = SearchSysCache1(EXTENSIONOID, ObjectIdGetDatum(extoid));

		state = CC_EXT_OTHER_VERSION;
		if (HeapTupleIsValid(tup))
		{
			bool		isnull;
			Datum		d = SysCacheGetAttr(EXTENSIONOID, tup,
											Anum_pg_extension_extversion,
											&isnull);
			char	   *version = isnull ? "" : TextDatumGetCString(d);

			if (strcmp(version, CC_VERSION) == 0)
			{
				state = CC_EXT_CURRENT;
				warned_for[0] = '\0';
			}
			else if (strcmp(version, warned_for) != 0)
			{
				ereport(WARNING,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("callback_center %s is installed in database \"%s\" but the library is %s",
								version, get_database_name(MyDatabaseId),
								CC_VERSION),
						 errdetail("The %s waits, and changes nothing, until the versions agree.",
								   MyBgworkerEntry ? MyBgworkerEntry->bgw_type : "worker"),
						 errhint("Run ALTER EXTENSION callback_center UPDATE in that database.")));
				strlcpy(warned_for, version, sizeof(warned_for));
			}
			ReleaseSysCache(tup);
		}
	}
	CommitTransactionCommand();
	return state;
}

/*
 * Raises the error of a C function that the installed SQL still names but
 * this library no longer serves with that contract: the schema is older
 * than the library (pg_stat_statements keeps such entry points the same
 * way).  Called by the entry points kept for older install scripts.
 */
void
cc_refuse_old_schema(const char *function)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("function %s of an older callback_center schema is not supported by library %s",
					function, CC_VERSION),
			 errhint("Run ALTER EXTENSION callback_center UPDATE.")));
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
