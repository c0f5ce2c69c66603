/*-------------------------------------------------------------------------
 *
 * stock.c
 *		Stock deduction with optimistic locking, and its compensation.
 *
 * deduct_stock records what a biz id (an order) takes of each SKU in
 * callback_center.stock_deductions, then takes it from callback_center.stock
 * with a conditional UPDATE.  Under READ COMMITTED the UPDATE re-checks its
 * condition against the newest row version after waiting for a row lock
 * (EvalPlanQual), so "available >= quantity" and "version = expected" are
 * exact without a retry loop.  Several SKUs are taken in bytewise sku_id
 * order, duplicates merged, so two orders never wait on each other in a
 * cycle.  restore_stock gives back what a biz id took, once.
 *
 * A hot SKU (set_hot_sku) keeps its units in callback_center.stock_slots,
 * spread over several rows, and 0 in its stock row; deduct_hot() below
 * takes from one slot, preferably without waiting, or exactly across
 * slots.
 *
 * doc/stock.md explains the decisions (no internal retry, REPEATABLE READ).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <stdlib.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/syscache.h"
#include "utils/tuplestore.h"

#include "errcodes.h"
#include "spi.h"

PG_FUNCTION_INFO_V1(cc_deduct_stock);
PG_FUNCTION_INFO_V1(cc_deduct_stock_items);
PG_FUNCTION_INFO_V1(cc_deduct_stock_arrays);
PG_FUNCTION_INFO_V1(cc_restore_stock);
PG_FUNCTION_INFO_V1(cc_restore_stock_sku);

/* One SKU of a deduction request, after validation. */
typedef struct StockItem
{
	text	   *sku;			/* detoasted sku_id */
	int64		qty;			/* > 0 */
	bool		has_version;	/* compare-and-set on expected? */
	int64		expected;
} StockItem;

/* What one SKU of a deduction or restore came to. */
typedef struct StockOutcome
{
	int64		qty;
	int64		available;
	int64		version;
	bool		stock_found;	/* false only if the stock row vanished */
	const char *status;
} StockOutcome;

/*
 * The statements, prepared once per backend (a plan table, spi.h).  They
 * never depend on the caller's search_path: every table, function,
 * operator and collation is schema-qualified, and they are prepared and
 * run only under the pinned path of stock_enter().
 */
typedef enum StockPlanId
{
	PLAN_RECORD,
	PLAN_TAKE,
	PLAN_TAKE_CAS,
	PLAN_CURRENT,
	PLAN_RECORDED,
	PLAN_BIZ_SKUS,
	PLAN_MARK_RESTORED,
	PLAN_GIVE_BACK,
	PLAN_TOTAL,
	PLAN_SLOT_TAKE,
	PLAN_SLOT_WAIT,
	PLAN_SLOT_LOCK_ALL,
	PLAN_SLOT_ADD,
	PLAN_SLOT_GIVE,
	PLAN_ORDER_STATE,
	NUM_STOCK_PLANS
} StockPlanId;

/*
 * max_rows is the most rows a statement may process: a statement that
 * processes more raises an internal error instead of committing, so that
 * an UPDATE whose effect a plan could multiply (a sub-select run again for
 * each outer row) can never take or give units more than once.  0: no
 * limit (a list of rows).
 */
static CcPlan plans[NUM_STOCK_PLANS] = {
	[PLAN_RECORD] = {
		"INSERT INTO callback_center.stock_deductions (biz_id, sku_id, quantity)"
		" VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
		3, {TEXTOID, TEXTOID, INT8OID}, 1
	},
	[PLAN_TAKE] = {
		"UPDATE callback_center.stock"
		" SET available = available OPERATOR(pg_catalog.-) $2,"
		" version = version OPERATOR(pg_catalog.+) 1,"
		" updated_at = pg_catalog.now()"
		" WHERE sku_id OPERATOR(pg_catalog.=) $1"
		" AND available OPERATOR(pg_catalog.>=) $2"
		" RETURNING available, version",
		2, {TEXTOID, INT8OID}, 1
	},
	[PLAN_TAKE_CAS] = {
		"UPDATE callback_center.stock"
		" SET available = available OPERATOR(pg_catalog.-) $2,"
		" version = version OPERATOR(pg_catalog.+) 1,"
		" updated_at = pg_catalog.now()"
		" WHERE sku_id OPERATOR(pg_catalog.=) $1"
		" AND available OPERATOR(pg_catalog.>=) $2"
		" AND version OPERATOR(pg_catalog.=) $3"
		" RETURNING available, version",
		3, {TEXTOID, INT8OID, INT8OID}, 1
	},
	[PLAN_CURRENT] = {
		"SELECT available, version, slots FROM callback_center.stock"
		" WHERE sku_id OPERATOR(pg_catalog.=) $1",
		1, {TEXTOID}, 1
	},
	[PLAN_RECORDED] = {
		"SELECT quantity, restored FROM callback_center.stock_deductions"
		" WHERE biz_id OPERATOR(pg_catalog.=) $1"
		" AND sku_id OPERATOR(pg_catalog.=) $2",
		2, {TEXTOID, TEXTOID}, 1
	},
	[PLAN_BIZ_SKUS] = {
		"SELECT sku_id FROM callback_center.stock_deductions"
		" WHERE biz_id OPERATOR(pg_catalog.=) $1 AND NOT restored"
		" ORDER BY sku_id COLLATE pg_catalog.\"C\"",
		1, {TEXTOID}, 0
	},
	[PLAN_MARK_RESTORED] = {
		"UPDATE callback_center.stock_deductions"
		" SET restored = true, restored_at = pg_catalog.now()"
		" WHERE biz_id OPERATOR(pg_catalog.=) $1"
		" AND sku_id OPERATOR(pg_catalog.=) $2 AND NOT restored"
		" RETURNING quantity",
		2, {TEXTOID, TEXTOID}, 1
	},
	[PLAN_GIVE_BACK] = {
		"UPDATE callback_center.stock"
		" SET available = available OPERATOR(pg_catalog.+) $2,"
		" version = version OPERATOR(pg_catalog.+) 1,"
		" updated_at = pg_catalog.now()"
		" WHERE sku_id OPERATOR(pg_catalog.=) $1"
		" AND slots OPERATOR(pg_catalog.=) 0"
		" RETURNING available, version",
		2, {TEXTOID, INT8OID}, 1
	},
	/* The true total: a hot SKU's units are in its slots. */
	[PLAN_TOTAL] = {
		"SELECT s.available OPERATOR(pg_catalog.+) CAST(COALESCE("
		" (SELECT pg_catalog.sum(t.available)"
		" FROM callback_center.stock_slots AS t"
		" WHERE t.sku_id OPERATOR(pg_catalog.=) $1), 0) AS pg_catalog.int8),"
		" s.version FROM callback_center.stock AS s"
		" WHERE s.sku_id OPERATOR(pg_catalog.=) $1",
		1, {TEXTOID}, 1
	},
	/*
	 * The slot statements choose one slot and change it.  The choice is a
	 * MATERIALIZED CTE, which PostgreSQL evaluates once per statement
	 * whatever the plan, or an uncorrelated scalar sub-select (an InitPlan,
	 * also evaluated once).  Not a sub-select in FROM: the planner may put
	 * it on the inner side of a nested loop and run it again for each outer
	 * row, and each run of a SKIP LOCKED LIMIT 1 picks another free slot,
	 * so that one statement would change many slots (max_rows 1 refuses
	 * such a statement too).
	 */

	/*
	 * Takes $2 units from the first slot in [$3, $4) that has them and that
	 * no other transaction holds; never waits.
	 */
	[PLAN_SLOT_TAKE] = {
		"WITH p AS MATERIALIZED (SELECT f.slot"
		" FROM callback_center.stock_slots AS f"
		" WHERE f.sku_id OPERATOR(pg_catalog.=) $1"
		" AND f.slot OPERATOR(pg_catalog.>=) $3"
		" AND f.slot OPERATOR(pg_catalog.<) $4"
		" AND f.available OPERATOR(pg_catalog.>=) $2"
		" ORDER BY f.slot LIMIT 1 FOR UPDATE SKIP LOCKED)"
		" UPDATE callback_center.stock_slots AS t"
		" SET available = t.available OPERATOR(pg_catalog.-) $2"
		" FROM p"
		" WHERE t.sku_id OPERATOR(pg_catalog.=) $1"
		" AND t.slot OPERATOR(pg_catalog.=) p.slot"
		" AND t.available OPERATOR(pg_catalog.>=) $2"
		" RETURNING t.slot",
		4, {TEXTOID, INT8OID, INT4OID, INT4OID}, 1
	},
	/*
	 * Takes $2 units from one slot that had them when the statement
	 * started, the first from slot $3 on (then from 0), waiting for it if
	 * another transaction holds it.
	 */
	[PLAN_SLOT_WAIT] = {
		"UPDATE callback_center.stock_slots AS t"
		" SET available = t.available OPERATOR(pg_catalog.-) $2"
		" WHERE t.sku_id OPERATOR(pg_catalog.=) $1"
		" AND t.slot OPERATOR(pg_catalog.=) (SELECT f.slot"
		" FROM callback_center.stock_slots AS f"
		" WHERE f.sku_id OPERATOR(pg_catalog.=) $1"
		" AND f.available OPERATOR(pg_catalog.>=) $2"
		" ORDER BY f.slot OPERATOR(pg_catalog.<) $3, f.slot LIMIT 1)"
		" AND t.available OPERATOR(pg_catalog.>=) $2"
		" RETURNING t.slot",
		3, {TEXTOID, INT8OID, INT4OID}, 1
	},
	/* Read through a cursor: each fetch waits for and locks one slot. */
	[PLAN_SLOT_LOCK_ALL] = {
		"SELECT slot, available FROM callback_center.stock_slots"
		" WHERE sku_id OPERATOR(pg_catalog.=) $1"
		" ORDER BY slot FOR UPDATE",
		1, {TEXTOID}, 0
	},
	[PLAN_SLOT_ADD] = {
		"UPDATE callback_center.stock_slots"
		" SET available = available OPERATOR(pg_catalog.+) $3"
		" WHERE sku_id OPERATOR(pg_catalog.=) $1"
		" AND slot OPERATOR(pg_catalog.=) $2",
		3, {TEXTOID, INT4OID, INT8OID}, 1
	},
	/* Gives $2 units to the first slot in [$3, $4) no other xact holds. */
	[PLAN_SLOT_GIVE] = {
		"WITH p AS MATERIALIZED (SELECT f.slot"
		" FROM callback_center.stock_slots AS f"
		" WHERE f.sku_id OPERATOR(pg_catalog.=) $1"
		" AND f.slot OPERATOR(pg_catalog.>=) $3"
		" AND f.slot OPERATOR(pg_catalog.<) $4"
		" ORDER BY f.slot LIMIT 1 FOR UPDATE SKIP LOCKED)"
		" UPDATE callback_center.stock_slots AS t"
		" SET available = t.available OPERATOR(pg_catalog.+) $2"
		" FROM p"
		" WHERE t.sku_id OPERATOR(pg_catalog.=) $1"
		" AND t.slot OPERATOR(pg_catalog.=) p.slot"
		" RETURNING t.slot",
		4, {TEXTOID, INT8OID, INT4OID, INT4OID}, 1
	},
	/* The built-in order a biz id names, if it names one. */
	[PLAN_ORDER_STATE] = {
		"SELECT status, pay_status FROM callback_center.orders"
		" WHERE order_id OPERATOR(pg_catalog.=) $1",
		1, {TEXTOID}, 1
	},
};

/* Runs a statement of the table (SPI_execute_plan, read-write, all rows). */
static uint64
stock_exec(StockPlanId id, Datum *args, int expect)
{
	return cc_plan_exec(&plans[id], args, NULL, false, 0, expect);
}

/*
 * Who a stock function runs as, and the search path its statements see.
 *
 * deduct_stock and restore_stock are neither SECURITY DEFINER nor declared
 * with SET search_path: fmgr_security_definer's GUC nest level, the
 * search_path assignment and AtEOXact_GUC would weigh on every deduction,
 * a call that does little else.  stock_enter() does the same job directly:
 *
 * - The user id becomes the owner of the called function (pg_proc), with
 *   SECURITY_LOCAL_USERID_CHANGE added to the security context, as
 *   fmgr_security_definer does; stock_leave() restores the caller's.  An
 *   error in between needs no cleanup here: AbortTransaction and
 *   AbortSubTransaction (xact.c, PG15) reset the user id and security
 *   context to those saved when the (sub)transaction began, which is also
 *   how a SECURITY DEFINER function is unwound.
 *
 * - The search path is pinned to pg_catalog, then the function's own
 *   schema, with PushOverrideSearchPath; the temp schema is not searched
 *   at all (SET search_path would still search pg_temp first for tables).
 *   On error, AtEOXact_Namespace and AtEOSubXact_Namespace pop override
 *   entries pushed at or above the aborting level.  In PG15 a
 *   CachedPlanSource keeps the path it was analyzed under only to compare
 *   it with the current one (RevalidateCachedQuery): on a mismatch, or
 *   after an invalidation, it re-analyzes under the path current at that
 *   moment.  Under the pinned path that is always the same path, so a
 *   caller's schemas, tables or operators are never seen, and a caller
 *   with another search_path does not force a re-analysis per call.  The
 *   statements qualify every name besides, so even a re-analysis under a
 *   hostile path would find the same objects.
 *
 * - PostgreSQL 17 removed PushOverrideSearchPath.  There (and on older
 *   versions built with -DCC_NO_OVERRIDE_SEARCH_PATH, to test it) the path
 *   is set as a SECURITY DEFINER function's SET clause sets it: a new GUC
 *   nest level, search_path = pg_catalog, the function's schema, pg_temp
 *   (temp last, for tables; functions and operators are never looked up
 *   there unless named), and AtEOXact_GUC on the way out.  On error,
 *   AbortTransaction and AbortSubTransaction run AtEOXact_GUC down to the
 *   (sub)transaction's own nest level, which unwinds this one too.  The
 *   plan cache compares the resulting schema list, the same every call.
 *
 * Owner and schema are read once per function and cached until pg_proc
 * changes (ALTER FUNCTION ... OWNER TO, DROP EXTENSION).
 */
#if PG_VERSION_NUM >= 170000 || defined(CC_NO_OVERRIDE_SEARCH_PATH)
#define STOCK_PATH_BY_GUC
#endif

typedef struct StockRunAs
{
	Oid			fn_oid;
	Oid			owner;
#ifdef STOCK_PATH_BY_GUC
	char	   *path;			/* search_path value, in TopMemoryContext */
#else
	OverrideSearchPath path;	/* schemas list in TopMemoryContext */
#endif
} StockRunAs;

#define STOCK_RUN_AS_SLOTS 8

static StockRunAs run_as[STOCK_RUN_AS_SLOTS];
static int	run_as_count = 0;
static bool run_as_callback = false;

/* What stock_leave() restores. */
typedef struct StockCall
{
	Oid			save_userid;
	int			save_sec_context;
#ifdef STOCK_PATH_BY_GUC
	int			guc_nest_level;
#endif
} StockCall;

/* Forgets every cached owner and schema when a pg_proc row changes. */
static void
run_as_invalidate(Datum arg, int cacheid, uint32 hashvalue)
{
	run_as_count = 0;
}

/* Returns the owner and pinned path of function fn_oid, from the cache. */
static StockRunAs *
run_as_lookup(Oid fn_oid)
{
	HeapTuple	tup;
	Form_pg_proc proc;
	StockRunAs *r;
#ifdef STOCK_PATH_BY_GUC
	char	   *path;
#else
	MemoryContext old;
#endif

	for (int i = 0; i < run_as_count; i++)
		if (run_as[i].fn_oid == fn_oid)
			return &run_as[i];

	if (!run_as_callback)
	{
		CacheRegisterSyscacheCallback(PROCOID, run_as_invalidate, (Datum) 0);
		run_as_callback = true;
	}
	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn_oid));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", fn_oid);
	proc = (Form_pg_proc) GETSTRUCT(tup);
#ifdef STOCK_PATH_BY_GUC
	{
		char	   *nspname = get_namespace_name(proc->pronamespace);

		if (nspname == NULL)
			elog(ERROR, "cache lookup failed for namespace %u",
				 proc->pronamespace);
		path = psprintf("pg_catalog, %s, pg_temp", quote_identifier(nspname));
	}
#endif

	/* No catalog access from here on: no invalidation can interleave. */
	if (run_as_count == STOCK_RUN_AS_SLOTS)
		run_as_count = 0;
	r = &run_as[run_as_count];
#ifdef STOCK_PATH_BY_GUC
	if (r->path != NULL)
		pfree(r->path);
	r->path = MemoryContextStrdup(TopMemoryContext, path);
#else
	list_free(r->path.schemas);
	old = MemoryContextSwitchTo(TopMemoryContext);
	r->path.schemas = list_make2_oid(PG_CATALOG_NAMESPACE,
									 proc->pronamespace);
	MemoryContextSwitchTo(old);
	r->path.addCatalog = false;
	r->path.addTemp = false;
	r->path.generation = 0;
#endif
	r->owner = proc->proowner;
	r->fn_oid = fn_oid;
	ReleaseSysCache(tup);
	run_as_count++;
	return r;
}

/*
 * Runs the rest of the call as the owner of the called function, under the
 * pinned search path, connected to SPI; stock_leave() undoes all three.
 */
static void
stock_enter(FunctionCallInfo fcinfo, StockCall *call)
{
	StockRunAs *r;

	if (fcinfo->flinfo == NULL || !OidIsValid(fcinfo->flinfo->fn_oid))
		elog(ERROR, "stock functions must be called as SQL functions");
	r = run_as_lookup(fcinfo->flinfo->fn_oid);
	GetUserIdAndSecContext(&call->save_userid, &call->save_sec_context);
	SetUserIdAndSecContext(r->owner,
						   call->save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
#ifdef STOCK_PATH_BY_GUC
	call->guc_nest_level = NewGUCNestLevel();
	(void) set_config_option("search_path", r->path, PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
#else
	PushOverrideSearchPath(&r->path);
#endif
	SPI_connect();
}

/* Disconnects from SPI and gives the caller back its user and path. */
static void
stock_leave(const StockCall *call)
{
	SPI_finish();
#ifdef STOCK_PATH_BY_GUC
	AtEOXact_GUC(true, call->guc_nest_level);
#else
	PopOverrideSearchPath();
#endif
	SetUserIdAndSecContext(call->save_userid, call->save_sec_context);
}

/* Reads a non-null column of row 0 of the last SPI result. */
static Datum
spi_col(int col)
{
	bool		isnull;
	Datum		d;

	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col,
					  &isnull);
	if (isnull)
		elog(ERROR, "unexpected null in stock row");
	return d;
}

#define spi_int8(col) DatumGetInt64(spi_col(col))
#define spi_int4(col) DatumGetInt32(spi_col(col))

/*
 * Orders two sku ids bytewise, as COLLATE "C" does: the lock order of
 * every multi-SKU call.
 */
static int
sku_cmp(const text *a, const text *b)
{
	int			la = VARSIZE_ANY_EXHDR(a);
	int			lb = VARSIZE_ANY_EXHDR(b);
	int			r;

	r = memcmp(VARDATA_ANY(a), VARDATA_ANY(b), Min(la, lb));
	if (r != 0)
		return r;
	return (la > lb) - (la < lb);
}

static int
item_cmp(const void *a, const void *b)
{
	return sku_cmp(((const StockItem *) a)->sku, ((const StockItem *) b)->sku);
}

/* Raises 22023 unless qty is positive. */
static void
check_quantity(const text *sku, int64 qty)
{
	if (qty <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quantity must be positive: " INT64_FORMAT, qty),
				 errdetail("SKU \"%s\" was asked for " INT64_FORMAT " units.",
						   text_to_cstring(sku), qty)));
}

/*
 * Sorts items by sku_id bytewise and merges duplicates (quantities add up;
 * expected versions, where given, must agree).  Returns the new count.
 */
static int
sort_and_merge(StockItem *items, int n)
{
	int			out = 0;

	qsort(items, n, sizeof(StockItem), item_cmp);
	for (int i = 0; i < n; i++)
	{
		StockItem  *prev = out > 0 ? &items[out - 1] : NULL;

		if (prev != NULL && sku_cmp(prev->sku, items[i].sku) == 0)
		{
			if (pg_add_s64_overflow(prev->qty, items[i].qty, &prev->qty))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("quantity out of range for SKU \"%s\"",
								text_to_cstring(prev->sku))));
			if (items[i].has_version)
			{
				if (prev->has_version && prev->expected != items[i].expected)
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("conflicting expected versions for SKU \"%s\"",
									text_to_cstring(prev->sku)),
							 errdetail("The SKU is listed with versions "
									   INT64_FORMAT " and " INT64_FORMAT ".",
									   prev->expected, items[i].expected)));
				prev->has_version = true;
				prev->expected = items[i].expected;
			}
			continue;
		}
		if (out != i)
			items[out] = items[i];
		out++;
	}
	return out;
}

/* Fills o's available (the true total) and version from a fresh read. */
static void
read_total(Datum sku, StockOutcome *o)
{
	o->stock_found = stock_exec(PLAN_TOTAL, &sku, SPI_OK_SELECT) == 1;
	if (o->stock_found)
	{
		o->available = spi_int8(1);
		o->version = spi_int8(2);
	}
}

/*
 * Hot SKUs.
 *
 * A hot SKU's units are in slot rows 0 .. n-1 of stock_slots; its stock
 * row holds 0 available (so the ordinary conditional UPDATE of the stock
 * row matches nothing and locks nothing) and its version, which counts
 * admin changes only: deductions and restores change slots, never the
 * stock row, or they would all queue on it again.  Hence compare-and-set
 * is refused on a hot SKU (it needs one row whose version moves with
 * every change).
 *
 * A deduction takes, in the first of three steps that succeeds:
 *
 * 1. free: from a random slot on (wrapping), the first slot that has the
 *    quantity and that no other transaction holds (FOR UPDATE SKIP
 *    LOCKED).  Never waits.  The common case.
 * 2. wait: every slot with enough is held by others, typically until
 *    their commits.  Waits for one of them, the first from the same random
 *    slot on that had enough at the start, and takes from it if it still
 *    has enough.  Without this step such callers would all queue in step
 *    3 on slot 0.
 * 3. exact: waits for and locks the slots in slot order, one at a time,
 *    until the locked ones hold the quantity, and takes it across them.
 *    If all slots are locked and fall short, the SKU has fewer units than
 *    asked (CB001), unless set_hot_sku changed the slots meanwhile (the
 *    stock row's version moved), in which case the deduction starts over.
 *
 * Deadlock freedom.  Order the locks of one SKU as: deduction records
 * (biz_id, sku_id), then the stock row, then slot 0, 1, ... n-1; SKUs
 * bytewise, as for normal SKUs.  A call waits only for a lock later in
 * that order than every lock it holds; then no cycle of waits can form.
 *
 * - A row that a locking statement locked but then rejected, because its
 *   newest version no longer has the quantity (the EvalPlanQual re-check),
 *   stays locked until the (sub)transaction ends, at whatever slot.  So
 *   steps 1 and 2 each run in a subtransaction of their own, rolled back
 *   when it takes nothing: each starts holding no slot of the SKU, and
 *   after a miss holds none again.  A hit holds one slot and the call is
 *   done with the SKU.
 * - Step 1 never waits.  Step 2 waits once, for one slot, holding none.
 * - Step 3 waits only for slots in ascending order, holding only lower
 *   slots, and never for the stock row.  Its condition is the key, which
 *   no re-check can reject, so it holds exactly the prefix it read.
 * - set_hot_sku, set_stock and adjust_stock lock the stock row, then all
 *   slots in slot order.
 * - A restore of a hot SKU gives back to a slot no other transaction
 *   holds, or one this transaction holds, without waiting (the condition
 *   is the key only); only when every slot is held by others does it wait
 *   for one, holding no slot of the SKU.
 *
 * A waiter therefore holds only locks earlier in the order than the one
 * it waits for, so no cycle can form: every wait goes forward.  As for
 * normal SKUs, separate calls in one transaction follow the caller's
 * order: a second deduction of the same hot SKU in a transaction already
 * holding one of its slots may wait in slot order while holding it.
 */

/*
 * The slot statements find their rows by the primary key (sku_id, slot).
 * A hot SKU's slot rows fill a few pages (fillfactor 10), few enough that
 * the planner prefers sequential scans: the choice of a slot then reads
 * and sorts every slot row, and the UPDATE hashes them all to join, where
 * two index probes do (77,000 of the 519,000 instructions of a hot
 * deduction, callgrind).  So they run with enable_seqscan off, set around
 * their executions only, since the plan cache plans under the settings of
 * the moment it plans.  read_total keeps the planner's choice: to sum
 * every slot a sequential scan is the cheaper.  Only plans change, and no
 * statement's effect depends on its plan (the STOCK_PLANS test runs).  An
 * error in between needs no cleanup: aborting the (sub)transaction unwinds
 * the GUC nest level, as it does a SET clause's.
 */
static int
slots_by_key_begin(void)
{
	int			level = NewGUCNestLevel();

	(void) set_config_option("enable_seqscan", "off", PGC_USERSET,
							 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	return level;
}

static void
slots_by_key_end(int level)
{
	AtEOXact_GUC(true, level);
}

/*
 * Takes qty from one slot of a hot SKU with nslots slots, starting at slot
 * start, in a subtransaction that is rolled back when it takes nothing, so
 * that no row it locked stays locked then.  PLAN_SLOT_TAKE never waits and
 * tries the slots from start on, then those before it; PLAN_SLOT_WAIT
 * waits for one slot.
 */
static bool
slot_take_sub(StockPlanId id, Datum sku, int64 qty, int32 start)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	bool		taken = false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		Datum		args[4];

		args[0] = sku;
		args[1] = Int64GetDatum(qty);
		args[2] = Int32GetDatum(start);
		args[3] = Int32GetDatum(PG_INT32_MAX);
		taken = stock_exec(id, args, SPI_OK_UPDATE_RETURNING) == 1;
		if (!taken && id == PLAN_SLOT_TAKE && start > 0)
		{
			args[2] = Int32GetDatum(0);
			args[3] = Int32GetDatum(start);
			taken = stock_exec(id, args, SPI_OK_UPDATE_RETURNING) == 1;
		}
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ReThrowError(edata);
	}
	PG_END_TRY();

	if (taken)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(oldcxt);
	CurrentResourceOwner = oldowner;
	return taken;
}

/*
 * Locks the slots of a hot SKU in slot order, waiting as needed, until
 * the locked ones hold qty, and takes qty across them.  Returns false,
 * with all slots locked and their sum in *total, if they fall short.
 */
static bool
slot_take_exact(Datum sku, int64 qty, int64 *total)
{
	Portal		portal;
	int			cap = 16;
	int			n = 0;
	int32	   *slot = palloc(sizeof(int32) * cap);
	int64	   *avail = palloc(sizeof(int64) * cap);
	int64		sum = 0;
	int64		left = qty;

	portal = SPI_cursor_open(NULL, cc_plan(&plans[PLAN_SLOT_LOCK_ALL]), &sku,
							 NULL, false);
	while (sum < qty)
	{
		SPI_cursor_fetch(portal, true, 1);
		if (SPI_processed == 0)
			break;
		if (n == cap)
		{
			cap *= 2;
			slot = repalloc(slot, sizeof(int32) * cap);
			avail = repalloc(avail, sizeof(int64) * cap);
		}
		slot[n] = spi_int4(1);
		avail[n] = spi_int8(2);
		if (pg_add_s64_overflow(sum, avail[n], &sum))
			sum = PG_INT64_MAX;
		n++;
	}
	SPI_cursor_close(portal);
	if (sum < qty)
	{
		*total = sum;
		return false;
	}
	for (int i = 0; i < n && left > 0; i++)
	{
		int64		take = Min(avail[i], left);
		Datum		args[3];

		if (take == 0)
			continue;
		args[0] = sku;
		args[1] = Int32GetDatum(slot[i]);
		args[2] = Int64GetDatum(-take);
		if (stock_exec(PLAN_SLOT_ADD, args, SPI_OK_UPDATE) != 1)
			elog(ERROR, "locked stock slot vanished");
		left -= take;
	}
	return true;
}

/*
 * Longest biz id or SKU id, in bytes: the limit every key of the API has
 * (callback_center._require_key), so that a huge key is a clear 22023 and
 * not an index row too large (54000) or a megabyte in every log line.
 * Checked where a key is written; a restore only looks up what was.
 */
#define CC_KEY_MAX_BYTES 200

/*
 * Hot SKUs this backend has deducted from, with their slot count and the
 * stock row's version as last read.  A deduction of a SKU found here goes
 * to its slots at once, instead of first running the stock row's
 * conditional UPDATE (which matches nothing on a hot SKU's 0 available)
 * and reading the row: two of the five statements of a hot deduction.
 *
 * Only a hint, never trusted for a decision: deduct_hot() already runs
 * after the stock row was read, with no lock on it, so set_hot_sku may have
 * changed the slots by the time it runs, and it checks.  A SKU gone normal
 * has no slot rows: the three steps take nothing, the version read at the
 * end differs (every admin change bumps it), and the deduction starts over
 * on the stock row, forgetting the hint.  A changed slot count only skews
 * the random start, since the steps scan every slot.  So the hint needs no
 * invalidation; a compare-and-set never uses it (it must be refused on a
 * hot SKU, which takes the read).
 */
#define HOT_HINT_SLOTS 16

typedef struct HotHint
{
	int			len;			/* bytes of sku; 0: entry unused */
	char		sku[CC_KEY_MAX_BYTES];
	int32		nslots;
	int64		version;
} HotHint;

static HotHint hot_hints[HOT_HINT_SLOTS];
static int	hot_hint_next = 0;

/* The hint of sku, or NULL. */
static HotHint *
hot_hint_find(const text *sku)
{
	int			len = VARSIZE_ANY_EXHDR(sku);

	for (int i = 0; i < HOT_HINT_SLOTS; i++)
		if (hot_hints[i].len == len &&
			memcmp(hot_hints[i].sku, VARDATA_ANY(sku), len) == 0)
			return &hot_hints[i];
	return NULL;
}

/* Remembers that sku was hot with nslots slots at version. */
static void
hot_hint_set(const text *sku, int32 nslots, int64 version)
{
	HotHint    *h = hot_hint_find(sku);
	int			len = VARSIZE_ANY_EXHDR(sku);

	if (len == 0 || len > CC_KEY_MAX_BYTES)
		return;
	if (h == NULL)
	{
		h = &hot_hints[hot_hint_next];
		hot_hint_next = (hot_hint_next + 1) % HOT_HINT_SLOTS;
		memcpy(h->sku, VARDATA_ANY(sku), len);
		h->len = len;
	}
	h->nslots = nslots;
	h->version = version;
}

/* Forgets the hint of sku, if any. */
static void
hot_hint_forget(const text *sku)
{
	HotHint    *h = hot_hint_find(sku);

	if (h != NULL)
		h->len = 0;
}

/*
 * Deducts item from hot SKU with nslots slots, whose stock row had
 * version when read (just now, or earlier: a hint).  Returns false when
 * set_hot_sku changed the SKU since and the deduction must start over;
 * raises CB001 when the slots hold fewer units than asked.
 */
static bool
deduct_hot(const StockItem *item, int32 nslots, int64 version,
		   StockOutcome *o)
{
	Datum		sku = PointerGetDatum(item->sku);
	int64		total;
	int32		start;
	int			level;
	bool		taken;

	start = (int32) pg_prng_uint64_range(&pg_global_prng_state, 0,
										 (uint64) nslots - 1);
	level = slots_by_key_begin();
	taken = slot_take_sub(PLAN_SLOT_TAKE, sku, item->qty, start) ||
		slot_take_sub(PLAN_SLOT_WAIT, sku, item->qty, start) ||
		slot_take_exact(sku, item->qty, &total);
	slots_by_key_end(level);
	if (!taken)
	{
		/*
		 * Every slot is locked and they fall short: exact, unless the set
		 * of slots changed since the SKU was read (a slot added after the
		 * cursor's snapshot is not among them).  Any such change bumps
		 * the version, and none can commit while this call holds the
		 * slots it found.
		 */
		if (stock_exec(PLAN_CURRENT, &sku, SPI_OK_SELECT) != 1 ||
			spi_int8(2) != version || spi_int4(3) == 0)
			return false;
		ereport(ERROR,
				(errcode(CC_ERRCODE_INSUFFICIENT_STOCK),
				 errmsg("insufficient stock for SKU \"%s\"",
						text_to_cstring(item->sku)),
				 errdetail("Requested " INT64_FORMAT " units, " INT64_FORMAT
						   " available.", item->qty,
						   total + spi_int8(1))));
	}
	o->qty = item->qty;
	o->status = "deducted";
	read_total(sku, o);
	return true;
}

/* Raises 22023 when a key is longer than CC_KEY_MAX_BYTES. */
static void
check_key(Datum key, const char *name)
{
	text	   *t = DatumGetTextPP(key);
	int			len = VARSIZE_ANY_EXHDR(t);

	if (len > CC_KEY_MAX_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long: %d bytes, at most %d",
						name, len, CC_KEY_MAX_BYTES)));
}

/*
 * Deducts one item for biz, once.  If (biz, sku) is already recorded,
 * changes nothing and reports the recorded quantity.  Otherwise records it
 * and takes the units, or raises CB004 (unknown SKU), 0A000 (a version on
 * a hot SKU), CB002 (version mismatch) or CB001 (insufficient stock); the
 * caller's statement then rolls the record back with everything else.
 */
static StockOutcome
deduct_one(Datum biz, const StockItem *item)
{
	StockOutcome o;
	Datum		args[3];
	int64		cur_avail;
	int64		cur_version;
	int32		cur_slots;

	check_key(biz, "biz_id");
	check_key(PointerGetDatum(item->sku), "sku");

	o.stock_found = true;
	args[0] = biz;
	args[1] = PointerGetDatum(item->sku);
	args[2] = Int64GetDatum(item->qty);
	if (stock_exec(PLAN_RECORD, args, SPI_OK_INSERT) == 0)
	{
		/* Recorded before (committed, or earlier in this transaction). */
		bool		isnull;

		if (stock_exec(PLAN_RECORDED, args, SPI_OK_SELECT) != 1)
			elog(ERROR, "stock deduction row vanished");
		o.qty = spi_int8(1);
		o.status = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 2,
											  &isnull))
			? "already_restored" : "already_deducted";
		read_total(args[1], &o);
		return o;
	}

	if (!item->has_version)
	{
		HotHint    *h = hot_hint_find(item->sku);

		if (h != NULL)
		{
			if (deduct_hot(item, h->nslots, h->version, &o))
				return o;
			hot_hint_forget(item->sku);
		}
	}

	args[0] = PointerGetDatum(item->sku);
	args[1] = Int64GetDatum(item->qty);
	args[2] = Int64GetDatum(item->expected);
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (stock_exec(item->has_version ? PLAN_TAKE_CAS : PLAN_TAKE, args,
					   SPI_OK_UPDATE_RETURNING) == 1)
		{
			o.qty = item->qty;
			o.available = spi_int8(1);
			o.version = spi_int8(2);
			o.status = "deducted";
			return o;
		}

		/* Nothing updated: tell the reasons apart, most specific first. */
		if (stock_exec(PLAN_CURRENT, args, SPI_OK_SELECT) == 0)
			ereport(ERROR,
					(errcode(CC_ERRCODE_UNKNOWN_SKU),
					 errmsg("unknown SKU \"%s\"", text_to_cstring(item->sku)),
					 errhint("Create it with callback_center.set_stock().")));
		cur_avail = spi_int8(1);
		cur_version = spi_int8(2);
		cur_slots = spi_int4(3);
		if (cur_slots > 0)
		{
			if (item->has_version)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("compare-and-set is not supported on hot SKU \"%s\"",
								text_to_cstring(item->sku)),
						 errdetail("Its units are spread over %d slots, and its version changes only when an admin changes the SKU.",
								   cur_slots),
						 errhint("Deduct without an expected version, or make the SKU normal again with callback_center.set_hot_sku(sku_id, 1).")));
			hot_hint_set(item->sku, cur_slots, cur_version);
			if (deduct_hot(item, cur_slots, cur_version, &o))
				return o;
			hot_hint_forget(item->sku);
			continue;
		}
		if (item->has_version && cur_version != item->expected)
			ereport(ERROR,
					(errcode(CC_ERRCODE_VERSION_CONFLICT),
					 errmsg("version conflict on SKU \"%s\"",
							text_to_cstring(item->sku)),
					 errdetail("Expected version " INT64_FORMAT ", current version "
							   INT64_FORMAT ".", item->expected, cur_version),
					 errhint("Read the SKU again and retry with its current version.")));
		/* Units arrived between the two reads (or the SKU stopped being hot). */
		if (cur_avail >= item->qty)
			continue;
		ereport(ERROR,
				(errcode(CC_ERRCODE_INSUFFICIENT_STOCK),
				 errmsg("insufficient stock for SKU \"%s\"",
						text_to_cstring(item->sku)),
				 errdetail("Requested " INT64_FORMAT " units, " INT64_FORMAT
						   " available.", item->qty, cur_avail)));
	}
}

/*
 * Gives qty back to a hot SKU with nslots slots: to a slot no other
 * transaction holds (or one this one holds), from a random one; when all
 * are held, waits for a random one.  Returns false if the slots changed
 * meanwhile (set_hot_sku) and the restore must look again.
 */
static bool
slot_give(Datum sku, int64 qty, int32 nslots)
{
	Datum		args[4];
	int32		start;
	int			level;
	bool		given;

	start = (int32) pg_prng_uint64_range(&pg_global_prng_state, 0,
										 (uint64) nslots - 1);
	args[0] = sku;
	args[1] = Int64GetDatum(qty);
	args[2] = Int32GetDatum(start);
	args[3] = Int32GetDatum(PG_INT32_MAX);
	level = slots_by_key_begin();
	given = stock_exec(PLAN_SLOT_GIVE, args, SPI_OK_UPDATE_RETURNING) == 1;
	if (!given && start > 0)
	{
		args[2] = Int32GetDatum(0);
		args[3] = Int32GetDatum(start);
		given = stock_exec(PLAN_SLOT_GIVE, args, SPI_OK_UPDATE_RETURNING) == 1;
	}
	if (!given)
	{
		args[1] = Int32GetDatum(start);
		args[2] = Int64GetDatum(qty);
		given = stock_exec(PLAN_SLOT_ADD, args, SPI_OK_UPDATE) == 1;
	}
	slots_by_key_end(level);
	return given;
}

/*
 * Raises CB005 unless biz may have its stock back: a biz id that names a
 * built-in order (callback_center.orders) may only when the order failed,
 * closed without being paid (pay status pay_failed or closed), or was
 * refunded in full before it was fulfilled (status refunded: the refund
 * path moves it there, then restores), the states from which it never
 * takes goods; a paid order keeps its stock, and one still waiting for
 * money may yet be paid.  Those states are
 * final, so once seen they hold; an order in another state may reach one
 * later (the payment failure and timeout close paths restore right after
 * moving it there).  Any other biz id is the application's, restored
 * unconditionally.
 *
 * Called once a deduction of biz has been found and locked, by a later
 * statement: under READ COMMITTED it sees the order row that the
 * transaction which wrote the deduction wrote with it (place_order does
 * both in one transaction), so a restore racing a place_order cannot miss
 * the order and take its stock back.
 */
static void
check_order_state(Datum biz)
{
	char	   *status;
	char	   *pay_status;

	if (stock_exec(PLAN_ORDER_STATE, &biz, SPI_OK_SELECT) == 0)
		return;
	status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	pay_status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	if (status != NULL && pay_status != NULL &&
		(strcmp(status, "failed") == 0 || strcmp(status, "refunded") == 0 ||
		 (strcmp(status, "closed") == 0 &&
		  (strcmp(pay_status, "pay_failed") == 0 ||
		   strcmp(pay_status, "closed") == 0))))
		return;
	ereport(ERROR,
			(errcode(CC_ERRCODE_ORDER_HOLDS_STOCK),
			 errmsg("cannot restore the stock of order \"%s\"",
					TextDatumGetCString(biz)),
			 errdetail("The order is %s, pay status %s: only an order that failed, closed unpaid, or was refunded in full before fulfilment gives its stock back.",
					   status ? status : "(null)",
					   pay_status ? pay_status : "(null)"),
			 errhint("An order's stock comes back when it closes on a payment failure or at its pay deadline; a paid order keeps it.")));
}

/*
 * Restores biz's deduction of sku if it was not restored yet; returns
 * false when there was nothing to restore.  A concurrent restore of the
 * same pair waits for the row lock and then finds it restored.  Unless
 * *order_checked, checks first that biz may have stock back
 * (check_order_state) and sets it.
 */
static bool
restore_one(Datum biz, Datum sku, StockOutcome *o, bool *order_checked)
{
	Datum		args[2];

	args[0] = biz;
	args[1] = sku;
	if (stock_exec(PLAN_MARK_RESTORED, args, SPI_OK_UPDATE_RETURNING) == 0)
		return false;
	o->qty = spi_int8(1);
	if (!*order_checked)
	{
		check_order_state(biz);
		*order_checked = true;
	}
	o->status = "restored";
	args[0] = sku;
	args[1] = Int64GetDatum(o->qty);
	for (;;)
	{
		int32		nslots;

		CHECK_FOR_INTERRUPTS();
		if (stock_exec(PLAN_GIVE_BACK, args, SPI_OK_UPDATE_RETURNING) == 1)
		{
			o->available = spi_int8(1);
			o->version = spi_int8(2);
			o->stock_found = true;
			return true;
		}
		if (stock_exec(PLAN_CURRENT, args, SPI_OK_SELECT) == 0)
			ereport(ERROR,
					(errcode(CC_ERRCODE_UNKNOWN_SKU),
					 errmsg("unknown SKU \"%s\"",
							TextDatumGetCString(sku)),
					 errdetail("The deduction being restored names a SKU that is no longer in callback_center.stock.")));
		nslots = spi_int4(3);
		if (nslots > 0 && slot_give(sku, o->qty, nslots))
		{
			read_total(sku, o);
			return true;
		}
	}
}

/*
 * Deducts every item for biz in sorted order inside one SPI connection and
 * appends one row per item to the materialized result of fcinfo.  Any
 * error aborts the whole call: no item is deducted unless all are.
 */
static void
deduct_items(FunctionCallInfo fcinfo, Datum biz, StockItem *items, int n)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	StockCall	call;

	n = sort_and_merge(items, n);
	stock_enter(fcinfo, &call);
	for (int i = 0; i < n; i++)
	{
		StockOutcome o = deduct_one(biz, &items[i]);
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		values[0] = PointerGetDatum(items[i].sku);
		values[1] = Int64GetDatum(o.qty);
		values[2] = Int64GetDatum(o.available);
		values[3] = Int64GetDatum(o.version);
		values[4] = CStringGetTextDatum(o.status);
		nulls[2] = nulls[3] = !o.stock_found;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc,
							 values, nulls);
	}
	stock_leave(&call);
}

/*
 * deduct_stock(biz_id, sku_id, quantity, expected_version) -> one row.
 * The hot path: no JSON, no arrays, the result descriptor cached.
 */
Datum
cc_deduct_stock(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc = (TupleDesc) fcinfo->flinfo->fn_extra;
	StockItem	item;
	StockOutcome o;
	StockCall	call;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};

	cc_require_arg(fcinfo, 0, "biz_id");
	cc_require_arg(fcinfo, 1, "sku_id");
	cc_require_arg(fcinfo, 2, "quantity");
	item.sku = PG_GETARG_TEXT_PP(1);
	item.qty = PG_GETARG_INT64(2);
	item.has_version = !PG_ARGISNULL(3);
	item.expected = item.has_version ? PG_GETARG_INT64(3) : 0;
	check_quantity(item.sku, item.qty);

	if (tupdesc == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);

		if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "return type must be a row type");
		tupdesc = BlessTupleDesc(CreateTupleDescCopy(tupdesc));
		MemoryContextSwitchTo(old);
		fcinfo->flinfo->fn_extra = tupdesc;
	}

	stock_enter(fcinfo, &call);
	o = deduct_one(PointerGetDatum(PG_GETARG_TEXT_PP(0)), &item);
	stock_leave(&call);

	values[0] = PointerGetDatum(item.sku);
	values[1] = Int64GetDatum(o.qty);
	values[2] = Int64GetDatum(o.available);
	values[3] = Int64GetDatum(o.version);
	values[4] = CStringGetTextDatum(o.status);
	nulls[2] = nulls[3] = !o.stock_found;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* Converts a JSON number to int64, or raises 22023 naming what it is. */
static int64
item_int8(const JsonbValue *v, const char *key, int index)
{
	char	   *s;
	char	   *end;
	long long	r;

	if (v->type != jbvNumeric)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("item %d: \"%s\" must be an integer", index, key)));
	s = numeric_normalize(v->val.numeric);
	errno = 0;
	r = strtoll(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("item %d: \"%s\" must be an integer, not %s",
						index, key, s)));
	return (int64) r;
}

/*
 * deduct_stock(biz_id, items jsonb) -> one row per distinct SKU.  items is
 * a non-empty array of {"sku": text, "qty": integer, "version": integer or
 * null or absent}; other keys are refused so that a typo is not ignored.
 */
Datum
cc_deduct_stock_items(PG_FUNCTION_ARGS)
{
	Jsonb	   *jb;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	StockItem  *items;
	int			n = 0;
	int			cap;

	cc_require_arg(fcinfo, 0, "biz_id");
	cc_require_arg(fcinfo, 1, "items");
	jb = PG_GETARG_JSONB_P(1);
	if (!JB_ROOT_IS_ARRAY(jb) || JB_ROOT_IS_SCALAR(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("items must be a JSON array"),
				 errhint("Pass [{\"sku\": \"A\", \"qty\": 1}, ...].")));
	cap = JB_ROOT_COUNT(jb);
	if (cap == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("items must not be empty")));
	items = palloc(sizeof(StockItem) * cap);

	it = JsonbIteratorInit(&jb->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		JsonbValue	kv;
		JsonbIterator *kit;
		JsonbIteratorToken ktok;
		bool		has_sku = false;
		bool		has_qty = false;
		StockItem  *item;

		if (tok != WJB_ELEM)
			continue;
		item = &items[n++];
		if (v.type != jbvBinary || !JsonContainerIsObject(v.val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("item %d must be a JSON object", n)));
		item->has_version = false;
		item->expected = 0;
		kit = JsonbIteratorInit(v.val.binary.data);
		while ((ktok = JsonbIteratorNext(&kit, &kv, true)) != WJB_DONE)
		{
			char	   *key;
			JsonbValue	val;

			if (ktok != WJB_KEY)
				continue;
			key = pnstrdup(kv.val.string.val, kv.val.string.len);
			if (JsonbIteratorNext(&kit, &val, true) != WJB_VALUE)
				elog(ERROR, "malformed jsonb object");
			if (strcmp(key, "sku") == 0)
			{
				if (val.type == jbvNull)
					continue;
				if (val.type != jbvString)
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("item %d: \"sku\" must be a string", n)));
				item->sku = cstring_to_text_with_len(val.val.string.val,
													 val.val.string.len);
				has_sku = true;
			}
			else if (strcmp(key, "qty") == 0)
			{
				if (val.type == jbvNull)
					continue;
				item->qty = item_int8(&val, "qty", n);
				has_qty = true;
			}
			else if (strcmp(key, "version") == 0)
			{
				if (val.type == jbvNull)
					continue;
				item->expected = item_int8(&val, "version", n);
				item->has_version = true;
			}
			else
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("item %d: unknown key \"%s\"", n, key),
						 errhint("An item has the keys \"sku\", \"qty\" and optionally \"version\".")));
		}
		if (!has_sku || !has_qty)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("item %d: \"%s\" must not be null or missing",
							n, has_sku ? "qty" : "sku")));
		check_quantity(item->sku, item->qty);
	}

	InitMaterializedSRF(fcinfo, 0);
	deduct_items(fcinfo, PointerGetDatum(PG_GETARG_TEXT_PP(0)), items, n);
	return (Datum) 0;
}

/*
 * deduct_stock(biz_id, sku_ids[], quantities[], expected_versions[]) ->
 * one row per distinct SKU.  The arrays are one-dimensional and of equal
 * length; expected_versions may be null, or hold nulls.
 */
Datum
cc_deduct_stock_arrays(PG_FUNCTION_ARGS)
{
	ArrayType  *skus_a;
	ArrayType  *qtys_a;
	Datum	   *skus,
			   *qtys,
			   *vers = NULL;
	bool	   *skus_null,
			   *qtys_null,
			   *vers_null = NULL;
	int			n,
				nq,
				nv;
	StockItem  *items;

	cc_require_arg(fcinfo, 0, "biz_id");
	cc_require_arg(fcinfo, 1, "sku_ids");
	cc_require_arg(fcinfo, 2, "quantities");
	skus_a = PG_GETARG_ARRAYTYPE_P(1);
	qtys_a = PG_GETARG_ARRAYTYPE_P(2);
	if (ARR_NDIM(skus_a) > 1 || ARR_NDIM(qtys_a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sku_ids and quantities must be one-dimensional")));
	deconstruct_array(skus_a, TEXTOID, -1, false, TYPALIGN_INT,
					  &skus, &skus_null, &n);
	deconstruct_array(qtys_a, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &qtys, &qtys_null, &nq);
	if (!PG_ARGISNULL(3))
	{
		ArrayType  *vers_a = PG_GETARG_ARRAYTYPE_P(3);

		if (ARR_NDIM(vers_a) > 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("expected_versions must be one-dimensional")));
		deconstruct_array(vers_a, INT8OID, 8, FLOAT8PASSBYVAL,
						  TYPALIGN_DOUBLE, &vers, &vers_null, &nv);
		if (nv != n)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("expected_versions has %d elements, sku_ids %d",
							nv, n)));
	}
	if (nq != n)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quantities has %d elements, sku_ids %d", nq, n)));
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sku_ids must not be empty")));

	items = palloc(sizeof(StockItem) * n);
	for (int i = 0; i < n; i++)
	{
		if (skus_null[i] || qtys_null[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("element %d of %s must not be null", i + 1,
							skus_null[i] ? "sku_ids" : "quantities")));
		items[i].sku = DatumGetTextPP(skus[i]);
		items[i].qty = DatumGetInt64(qtys[i]);
		items[i].has_version = vers != NULL && !vers_null[i];
		items[i].expected = items[i].has_version ? DatumGetInt64(vers[i]) : 0;
		check_quantity(items[i].sku, items[i].qty);
	}

	InitMaterializedSRF(fcinfo, 0);
	deduct_items(fcinfo, PointerGetDatum(PG_GETARG_TEXT_PP(0)), items, n);
	return (Datum) 0;
}

/* Appends a restore outcome to the materialized result of fcinfo. */
static void
put_restored(FunctionCallInfo fcinfo, Datum sku, const StockOutcome *o)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};

	values[0] = sku;
	values[1] = Int64GetDatum(o->qty);
	values[2] = Int64GetDatum(o->available);
	values[3] = Int64GetDatum(o->version);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * restore_stock(biz_id) -> one row per SKU this call gave back.  Gives
 * back every deduction of biz_id not yet restored, in sku_id order; an
 * unknown biz id, or one already restored, returns no rows.
 */
Datum
cc_restore_stock(PG_FUNCTION_ARGS)
{
	Datum		biz;
	Datum	   *skus;
	uint64		n;
	StockCall	call;
	bool		order_checked = false;

	cc_require_arg(fcinfo, 0, "biz_id");
	biz = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	InitMaterializedSRF(fcinfo, 0);

	stock_enter(fcinfo, &call);
	n = stock_exec(PLAN_BIZ_SKUS, &biz, SPI_OK_SELECT);
	skus = palloc(sizeof(Datum) * (n + 1));
	for (uint64 i = 0; i < n; i++)
	{
		bool		isnull;

		skus[i] = datumCopy(SPI_getbinval(SPI_tuptable->vals[i],
										  SPI_tuptable->tupdesc, 1, &isnull),
							false, -1);
	}
	for (uint64 i = 0; i < n; i++)
	{
		StockOutcome o;

		if (restore_one(biz, skus[i], &o, &order_checked))
			put_restored(fcinfo, skus[i], &o);
	}
	stock_leave(&call);
	return (Datum) 0;
}

/*
 * restore_stock(biz_id, sku_id) -> a row if this call gave the deduction
 * of sku_id by biz_id back, none if there was none or it was restored.
 */
Datum
cc_restore_stock_sku(PG_FUNCTION_ARGS)
{
	Datum		biz;
	Datum		sku;
	StockOutcome o;
	StockCall	call;
	bool		order_checked = false;

	cc_require_arg(fcinfo, 0, "biz_id");
	cc_require_arg(fcinfo, 1, "sku_id");
	biz = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	sku = PointerGetDatum(PG_GETARG_TEXT_PP(1));
	InitMaterializedSRF(fcinfo, 0);

	stock_enter(fcinfo, &call);
	if (restore_one(biz, sku, &o, &order_checked))
		put_restored(fcinfo, sku, &o);
	stock_leave(&call);
	return (Datum) 0;
}
