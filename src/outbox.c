/*-------------------------------------------------------------------------
 *
 * outbox.c
 *		enqueue(): the transactional outbox's hot path, and the commit-time
 *		wake-up of the worker.
 *
 * Every outbox row is written here (cc_outbox_insert), by one prepared
 * INSERT: callback_center.enqueue() inserts one row per enabled endpoint
 * subscribed to the event type, and _enqueue_one() (behind enqueue_to and
 * the active payment query) one row for one endpoint, both in the caller's
 * transaction, with the same checks, ordering lock and wake-up.  Reading the
 * endpoints table on every call would add a scan and a buffer pin of one
 * hot page, shared by every client, to each enqueue, so each backend keeps
 * the subscription list in memory and executes a prepared INSERT ...
 * VALUES per matching endpoint.
 *
 * The list is rebuilt after any change to callback_center.endpoints: a
 * statement trigger on that table (cc_outbox_endpoints_changed) sends a
 * relcache invalidation, which every backend receives through the relcache
 * callback registered here.  Invalidations of our own transaction apply at
 * the next command, and are undone on abort, so a transaction sees its own
 * endpoint changes.  Transactions that use one snapshot throughout
 * (REPEATABLE READ, SERIALIZABLE) read endpoints with their snapshot
 * instead of using the list.
 *
 * At commit of a transaction that queued rows, the worker is woken
 * (cc_wake_worker); a transaction that aborts wakes nobody.
 *
 * Ordered endpoints deliver the events of one aggregate in id order, which
 * must be commit order.  Ids are assigned at insert, and the worker cannot
 * see uncommitted rows, so two transactions enqueueing for one aggregate at
 * once could commit in the opposite order of their ids.  Before the first
 * row for an ordered endpoint gets its id, the writer therefore takes a
 * transaction-scoped advisory lock on the aggregate: a second transaction
 * for that aggregate waits until the first ends, and its ids follow (rows
 * for unordered endpoints need no order).  Only ordered endpoints pay; the
 * key is a hash of the aggregate id, so a collision only serializes two
 * aggregates needlessly.
 * A transaction that enqueues for aggregates A then B while another
 * enqueues B then A deadlocks (one is cancelled, SQLSTATE 40P01).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/lockdefs.h"
#include "storage/sinval.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "errcodes.h"
#include "extension.h"
#include "outbox.h"
#include "shmem.h"
#include "spi.h"

/* One enabled endpoint and the event types it subscribes to. */
typedef struct CcSubscriber
{
	int32		endpoint_id;
	bool		ordered;		/* delivers each aggregate in commit order */
	bool		all_types;		/* subscribes to '*' */
	int			ntypes;
	char	  **types;
} CcSubscriber;

/* First key of the advisory lock on an aggregate of ordered endpoints ("ccor"). */
#define CC_ORDER_LOCK_CLASS 1667460978

/*
 * Largest event, in bytes, that may enter the outbox (event type, aggregate
 * id and payload; see cc_event_size).  PGC_SUSET: only a superuser may
 * raise it; the worker re-reads it on reload.
 */
int			cc_max_event_size = 1024 * 1024;

/* Whether the current transaction queued at least one outbox row. */
static bool cc_outbox_pending_wake = false;

/* Whether cc_outbox_xact_callback is registered in this backend. */
static bool cc_outbox_callback_registered = false;

/* The subscription list, valid while cc_subscribers_valid. */
static MemoryContext cc_subscribers_context = NULL;
static CcSubscriber *cc_subscribers = NULL;
static int	cc_nsubscribers = 0;
static bool cc_subscribers_valid = false;
static Oid	cc_endpoints_relid = InvalidOid;
static Oid	cc_outbox_relid = InvalidOid;
static uint64 cc_endpoints_invalidations = 0;
static bool cc_relcache_callback_registered = false;

/* The statements behind them, prepared once per backend (spi.h). */
typedef enum CcOutboxPlanId
{
	OUTBOX_SUBSCRIBERS,			/* the subscription list */
	OUTBOX_TARGETS,				/* subscribers, in the snapshot */
	OUTBOX_ENDPOINT,			/* one enabled endpoint */
	OUTBOX_INSERT,				/* the one INSERT of the outbox */
	OUTBOX_INSERT_ID,			/* the same, for callers that read the id */
	NUM_OUTBOX_PLANS
} CcOutboxPlanId;

#define CC_OUTBOX_INSERT_SQL \
	"INSERT INTO callback_center.outbox" \
	" (endpoint_id, event_type, aggregate_id, payload)" \
	" VALUES ($1, $2, $3, $4)"

static CcPlan plans[NUM_OUTBOX_PLANS] = {
	[OUTBOX_SUBSCRIBERS] = {
		"SELECT e.id, e.event_types, e.ordered FROM callback_center.endpoints e"
		" WHERE e.enabled ORDER BY e.id",
		0, {InvalidOid}
	},
	[OUTBOX_TARGETS] = {
		"SELECT e.id, e.ordered FROM callback_center.endpoints e"
		" WHERE e.enabled"
		" AND e.event_types OPERATOR(pg_catalog.&&) ARRAY[$1, '*']"
		" ORDER BY e.id",
		1, {TEXTOID}
	},
	[OUTBOX_ENDPOINT] = {
		"SELECT e.id, e.ordered FROM callback_center.endpoints e"
		" WHERE e.id OPERATOR(pg_catalog.=) $1 AND e.enabled",
		1, {INT4OID}, 1
	},
	/* RETURNING builds a result for the row: only where the id is read. */
	[OUTBOX_INSERT] = {
		CC_OUTBOX_INSERT_SQL,
		4, {INT4OID, TEXTOID, TEXTOID, JSONBOID}, 1
	},
	[OUTBOX_INSERT_ID] = {
		CC_OUTBOX_INSERT_SQL " RETURNING id",
		4, {INT4OID, TEXTOID, TEXTOID, JSONBOID}, 1
	},
};

/*
 * One event on its way into the outbox: the INSERT's arguments (endpoint
 * id first), whether the aggregate's ordering lock is held, and how many
 * rows went in.
 */
typedef struct CcOutboxWrite
{
	Datum		args[4];
	char	   *event_type;
	text	   *aggregate_id;
	bool		want_id;		/* the caller reads the rows' ids */
	bool		locked;
	int			queued;
} CcOutboxWrite;

static void cc_outbox_xact_callback(XactEvent event, void *arg);
static void cc_outbox_lock_aggregate(text *aggregate_id);
static void cc_endpoints_relcache_callback(Datum arg, Oid relid);
static void cc_load_subscribers(void);
static bool cc_subscribes(const CcSubscriber *sub, const char *event_type);
static void cc_outbox_begin(CcOutboxWrite *w, FunctionCallInfo fcinfo,
							int first_arg, bool want_id);
static int64 cc_outbox_insert(CcOutboxWrite *w, int32 endpoint_id,
							  bool ordered);
static void cc_outbox_end(CcOutboxWrite *w);

PG_FUNCTION_INFO_V1(cc_outbox_note_enqueue);
PG_FUNCTION_INFO_V1(cc_enqueue);
PG_FUNCTION_INFO_V1(cc_enqueue_one);
PG_FUNCTION_INFO_V1(cc_outbox_endpoints_changed);
PG_FUNCTION_INFO_V1(cc_event_size_sql);
PG_FUNCTION_INFO_V1(cc_check_event_size_sql);
PG_FUNCTION_INFO_V1(cc_outbox_lock_aggregate_sql);

/*
 * The outbox's settings.  Defined in every process that loads the library:
 * every writer of the outbox checks the size, and the worker too.
 */
void
cc_outbox_define_gucs(void)
{
	DefineCustomIntVariable("callback_center.max_event_size",
							"Largest event the outbox accepts: event type, aggregate id and payload.",
							"The payload counts in its jsonb form, uncompressed.  Larger events are refused with SQLSTATE 54000; the worker makes any it finds dead.",
							&cc_max_event_size, 1024 * 1024, 1024, MaxAllocSize,
							PGC_SUSET, GUC_UNIT_BYTE, NULL, NULL, NULL);
}

/*
 * The size of an event as max_event_size counts it: the bytes of event
 * type, aggregate id and payload, uncompressed, read from their headers
 * without decompressing them.
 */
static int64
cc_event_size(Datum event_type, Datum aggregate_id, Datum payload)
{
	return (int64) (toast_raw_datum_size(event_type) - VARHDRSZ) +
		(int64) (toast_raw_datum_size(aggregate_id) - VARHDRSZ) +
		(int64) (toast_raw_datum_size(payload) - VARHDRSZ);
}

/*
 * Raises 54000 when an event is larger than callback_center.max_event_size.
 * Its text form, which the worker sends, can be several times larger than
 * the jsonb it counts (a control character is 6 bytes of JSON): the bound
 * keeps every body far below the 1 GB any value may have.
 */
static void
cc_check_event_size(Datum event_type, Datum aggregate_id, Datum payload)
{
	int64		size = cc_event_size(event_type, aggregate_id, payload);

	if (size > cc_max_event_size)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("event of " INT64_FORMAT " bytes exceeds callback_center.max_event_size (%d bytes)",
						size, cc_max_event_size),
				 errdetail("The size counts the event type, the aggregate id and the payload in its jsonb form."),
				 errhint("Send a reference to the data rather than the data, or have a superuser raise callback_center.max_event_size.")));
}

/*
 * callback_center._event_size(event_type, aggregate_id, payload): the size
 * max_event_size bounds (the worker's claim reads it).
 */
Datum
cc_event_size_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT64(cc_event_size(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1),
								  PG_GETARG_DATUM(2)));
}

/*
 * _check_event_size() and _outbox_lock_aggregate(): the SQL faces through
 * which 0.1.0's enqueue_to and the first steps of the upgrade script wrote
 * the outbox.  0.2.0 drops both functions; the symbols stay so that the
 * library still loads those schemas and the upgrade script runs.
 */
Datum
cc_check_event_size_sql(PG_FUNCTION_ARGS)
{
	cc_check_event_size(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1),
						PG_GETARG_DATUM(2));
	PG_RETURN_VOID();
}

Datum
cc_outbox_lock_aggregate_sql(PG_FUNCTION_ARGS)
{
	cc_outbox_lock_aggregate(PG_GETARG_TEXT_PP(0));
	PG_RETURN_VOID();
}

/*
 * At commit, wakes the worker if the transaction queued rows; whatever the
 * outcome, the next transaction starts with the flag cleared.  A rolled
 * back subtransaction leaves the flag set: one spurious wake-up at most.
 * A prepared transaction commits elsewhere; the worker's poll finds it.
 */
static void
cc_outbox_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (cc_outbox_pending_wake)
			{
				cc_outbox_pending_wake = false;
				cc_wake_worker(false);
			}
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			cc_outbox_pending_wake = false;
			break;
		default:
			break;
	}
}

/*
 * Records that the current transaction queued outbox rows, so that its
 * commit wakes the worker.  Safe to call any number of times.
 */
static void
cc_outbox_note_enqueued(void)
{
	if (!cc_outbox_callback_registered)
	{
		RegisterXactCallback(cc_outbox_xact_callback, NULL);
		cc_outbox_callback_registered = true;
	}
	cc_outbox_pending_wake = true;
}

/*
 * callback_center._outbox_note_enqueue(): the SQL face of
 * cc_outbox_note_enqueued(), for SQL functions that insert outbox rows.
 */
Datum
cc_outbox_note_enqueue(PG_FUNCTION_ARGS)
{
	cc_outbox_note_enqueued();
	PG_RETURN_VOID();
}

/*
 * Forgets the subscription list when endpoints changes (or when every
 * relcache entry is flushed).
 */
static void
cc_endpoints_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == cc_endpoints_relid)
	{
		cc_subscribers_valid = false;
		cc_endpoints_invalidations++;
	}
	if (relid == InvalidOid || relid == cc_outbox_relid)
		cc_outbox_relid = InvalidOid;
}

/*
 * Loads the enabled endpoints and their event types into
 * cc_subscribers_context.  Must run inside SPI_connect.  The list is kept
 * (cc_subscribers_valid) only if no invalidation arrived while it was read;
 * otherwise it serves this one call and is read again next time.
 */
static void
cc_load_subscribers(void)
{
	uint64		invalidations_before;
	uint64		i;

	if (!cc_relcache_callback_registered)
	{
		CacheRegisterRelcacheCallback(cc_endpoints_relcache_callback,
									  (Datum) 0);
		cc_relcache_callback_registered = true;
	}
	if (cc_subscribers_context == NULL)
		cc_subscribers_context = AllocSetContextCreate(CacheMemoryContext,
													   "callback_center subscribers",
													   ALLOCSET_SMALL_SIZES);

	invalidations_before = cc_endpoints_invalidations;
	cc_endpoints_relid = get_relname_relid("endpoints",
										   get_namespace_oid(CC_EXTENSION_NAME, false));
	if (!OidIsValid(cc_endpoints_relid))
		elog(ERROR, "table callback_center.endpoints is missing");

	(void) cc_plan_exec(&plans[OUTBOX_SUBSCRIBERS], NULL, NULL, false, 0,
						SPI_OK_SELECT);

	MemoryContextReset(cc_subscribers_context);
	cc_subscribers = MemoryContextAllocZero(cc_subscribers_context,
											sizeof(CcSubscriber) *
											Max(SPI_processed, 1));
	cc_nsubscribers = (int) SPI_processed;
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		CcSubscriber *sub = &cc_subscribers[i];
		bool		isnull;
		Datum	   *elems;
		bool	   *elem_nulls;
		int			n;
		int			j;

		sub->endpoint_id = DatumGetInt32(SPI_getbinval(tuple, desc, 1, &isnull));
		sub->ordered = DatumGetBool(SPI_getbinval(tuple, desc, 3, &isnull));
		deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 2, &isnull)),
						  TEXTOID, -1, false, TYPALIGN_INT,
						  &elems, &elem_nulls, &n);
		sub->types = MemoryContextAlloc(cc_subscribers_context,
										sizeof(char *) * Max(n, 1));
		sub->ntypes = 0;
		for (j = 0; j < n; j++)
		{
			char	   *type;

			if (elem_nulls[j])
				continue;
			type = MemoryContextStrdup(cc_subscribers_context,
									   TextDatumGetCString(elems[j]));
			if (strcmp(type, "*") == 0)
				sub->all_types = true;
			sub->types[sub->ntypes++] = type;
		}
	}

	/* Did the endpoints change while we read them? */
	AcceptInvalidationMessages();
	cc_subscribers_valid = (cc_endpoints_invalidations == invalidations_before);
}

/* Whether sub receives events of event_type. */
static bool
cc_subscribes(const CcSubscriber *sub, const char *event_type)
{
	int			j;

	if (sub->all_types)
		return true;
	for (j = 0; j < sub->ntypes; j++)
		if (strcmp(sub->types[j], event_type) == 0)
			return true;
	return false;
}

/*
 * Takes the transaction-scoped lock that serializes enqueues for one
 * aggregate to ordered endpoints (see the head of this file): the lock of
 * pg_advisory_xact_lock(CC_ORDER_LOCK_CLASS, hashtext(aggregate_id)), the
 * one operators see in pg_locks.
 */
static void
cc_outbox_lock_aggregate(text *aggregate_id)
{
	LOCKTAG		tag;
	int32		key;

	key = DatumGetInt32(DirectFunctionCall1Coll(hashtext,
												DEFAULT_COLLATION_OID,
												PointerGetDatum(aggregate_id)));
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) CC_ORDER_LOCK_CLASS,
						 (uint32) key, 2);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/*
 * Starts writing one event whose event type, aggregate id and payload are
 * arguments first_arg to first_arg + 2 of fcinfo: refuses NULLs (22004),
 * an empty or '*' event type (22023) and an event larger than
 * max_event_size (54000), connects to SPI and takes the outbox's insert
 * lock.  With want_id, cc_outbox_insert returns the ids of the rows.
 */
static void
cc_outbox_begin(CcOutboxWrite *w, FunctionCallInfo fcinfo, int first_arg,
				bool want_id)
{
	text	   *event_type_text;
	char	   *event_type;

	if (PG_ARGISNULL(first_arg) || PG_ARGISNULL(first_arg + 1) ||
		PG_ARGISNULL(first_arg + 2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("event_type, aggregate_id and payload must not be null")));
	event_type_text = PG_GETARG_TEXT_PP(first_arg);
	event_type = text_to_cstring(event_type_text);
	if (event_type[0] == '\0' || strcmp(event_type, "*") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid event type \"%s\"", event_type),
				 errdetail("An event type is a non-empty name; \"*\" only subscribes to all of them.")));

	w->event_type = event_type;
	w->want_id = want_id;
	w->args[0] = (Datum) 0;
	w->args[1] = PointerGetDatum(event_type_text);
	w->args[2] = PG_GETARG_DATUM(first_arg + 1);
	w->args[3] = PG_GETARG_DATUM(first_arg + 2);
	w->aggregate_id = PG_GETARG_TEXT_PP(first_arg + 1);
	w->locked = false;
	w->queued = 0;
	cc_check_event_size(w->args[1], w->args[2], w->args[3]);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	/*
	 * Take the outbox's insert lock before looking at the endpoints.
	 * drop_endpoint holds SHARE on the outbox until it commits, and its
	 * invalidation is queued before it lets go: if we waited for it, taking
	 * the lock applies the invalidation and the dropped endpoint is gone from
	 * the list.  Later calls in this transaction already hold the lock, so no
	 * endpoint can be dropped under them.
	 */
	if (!OidIsValid(cc_outbox_relid))
	{
		if (!cc_relcache_callback_registered)
		{
			CacheRegisterRelcacheCallback(cc_endpoints_relcache_callback,
										  (Datum) 0);
			cc_relcache_callback_registered = true;
		}
		cc_outbox_relid = get_relname_relid("outbox",
											get_namespace_oid(CC_EXTENSION_NAME, false));
		if (!OidIsValid(cc_outbox_relid))
			elog(ERROR, "table callback_center.outbox is missing");
	}
	LockRelationOid(cc_outbox_relid, RowExclusiveLock);
}

/*
 * Inserts the event for one endpoint and returns the row's id (0 unless
 * want_id).  The first row for an ordered endpoint takes the aggregate's
 * ordering lock before it gets its id (see the head of this file).
 */
static int64
cc_outbox_insert(CcOutboxWrite *w, int32 endpoint_id, bool ordered)
{
	bool		isnull;

	if (ordered && !w->locked)
	{
		cc_outbox_lock_aggregate(w->aggregate_id);
		w->locked = true;
	}
	w->args[0] = Int32GetDatum(endpoint_id);
	(void) cc_plan_exec(&plans[w->want_id ? OUTBOX_INSERT_ID : OUTBOX_INSERT],
						w->args, NULL, false, 0,
						w->want_id ? SPI_OK_INSERT_RETURNING : SPI_OK_INSERT);
	w->queued++;
	if (!w->want_id)
		return 0;
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull));
}

/* Ends the write: its commit wakes the worker if a row went in. */
static void
cc_outbox_end(CcOutboxWrite *w)
{
	SPI_finish();
	if (w->queued > 0)
		cc_outbox_note_enqueued();
}

/*
 * Runs a prepared statement reading (id, ordered) of endpoints and inserts
 * the event for each endpoint it returns; returns the last row's id, 0 when
 * it returned none.
 */
static int64
cc_outbox_insert_for(CcOutboxWrite *w, CcOutboxPlanId plan, Datum *args)
{
	uint64		n;
	uint64		i;
	int32	   *ids;
	bool	   *ordered;
	int64		id = 0;

	/* Each INSERT replaces SPI_tuptable: copy the targets out first. */
	n = cc_plan_exec(&plans[plan], args, NULL, false, 0, SPI_OK_SELECT);
	ids = palloc(sizeof(int32) * Max(n, 1));
	ordered = palloc(sizeof(bool) * Max(n, 1));
	for (i = 0; i < n; i++)
	{
		bool		isnull;

		ids[i] = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i],
											 SPI_tuptable->tupdesc, 1, &isnull));
		ordered[i] = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i],
												SPI_tuptable->tupdesc, 2, &isnull));
	}
	for (i = 0; i < n; i++)
		id = cc_outbox_insert(w, ids[i], ordered[i]);
	return id;
}

/*
 * callback_center.enqueue(event_type, aggregate_id, payload): queues one
 * row per enabled endpoint subscribed to event_type (or to '*') in the
 * caller's transaction and returns how many; 0 when nobody subscribes.
 * NULL arguments raise 22004; an empty or '*' event type raises 22023.
 */
Datum
cc_enqueue(PG_FUNCTION_ARGS)
{
	CcOutboxWrite w;
	int			i;

	cc_outbox_begin(&w, fcinfo, 0, false);

	if (IsolationUsesXactSnapshot())
	{
		/* One snapshot for the whole transaction: read endpoints with it. */
		(void) cc_outbox_insert_for(&w, OUTBOX_TARGETS, &w.args[1]);
		cc_outbox_end(&w);
		PG_RETURN_INT32(w.queued);
	}

	/* Changes committed by others are applied before we look. */
	AcceptInvalidationMessages();
	if (!cc_subscribers_valid)
		cc_load_subscribers();
	for (i = 0; i < cc_nsubscribers; i++)
		if (cc_subscribes(&cc_subscribers[i], w.event_type))
			(void) cc_outbox_insert(&w, cc_subscribers[i].endpoint_id,
									cc_subscribers[i].ordered);
	cc_outbox_end(&w);
	PG_RETURN_INT32(w.queued);
}

/*
 * callback_center._enqueue_one(endpoint_id, event_type, aggregate_id,
 * payload): queues one event for one endpoint, whatever it subscribes to,
 * and returns the row's id; NULL when the endpoint is disabled or gone.
 * The writer behind enqueue_to and the active payment query.
 */
Datum
cc_enqueue_one(PG_FUNCTION_ARGS)
{
	CcOutboxWrite w;
	Datum		endpoint_id;
	int64		id;

	cc_require_arg(fcinfo, 0, "endpoint_id");
	endpoint_id = PG_GETARG_DATUM(0);
	cc_outbox_begin(&w, fcinfo, 1, true);
	id = cc_outbox_insert_for(&w, OUTBOX_ENDPOINT, &endpoint_id);
	cc_outbox_end(&w);
	if (w.queued == 0)
		PG_RETURN_NULL();
	PG_RETURN_INT64(id);
}

/*
 * Statement trigger on callback_center.endpoints: tells every backend
 * (ours at the next command, the others at commit) to reload its
 * subscription list.
 */
Datum
cc_outbox_endpoints_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function cc_outbox_endpoints_changed must be called as a trigger")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function cc_outbox_endpoints_changed must be fired AFTER, FOR EACH STATEMENT")));

	CacheInvalidateRelcache(trigdata->tg_relation);
	PG_RETURN_POINTER(NULL);
}
