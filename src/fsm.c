/*-------------------------------------------------------------------------
 *
 * fsm.c
 *		The state-machine trigger: refuses illegal moves, records history
 *		and emits outbox events.
 *
 * attach_state_machine() fires the one function twice per row: BEFORE the
 * write it checks the move (under the row lock, before anything is
 * written); AFTER the write it checks the row as written and records it.
 * Only AFTER row triggers are sure the row was written: BEFORE INSERT
 * triggers also fire for rows ON CONFLICT DO NOTHING then skips, and for
 * rows a later BEFORE trigger drops.
 *
 * The definitions (callback_center.state_machines, machine_states,
 * transitions) are loaded once per backend into a cache.  A statement
 * trigger on each of those tables (fsm_invalidate) sends a relcache
 * invalidation for the table; our relcache callback drops the cache, and
 * the next row reloads it.  Every backend therefore sees committed changes
 * at its next transaction, and the changing backend at its next command.
 *
 * History rows and enqueue() calls run as the owner of the extension's
 * tables, so that a role that may only update its own table (for instance
 * one with just callback_center_app) can still move states.  That owner is
 * a superuser: nothing the table's owner controls (output functions and
 * casts of the row's column types) runs while we act as it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_class.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "nodes/pg_list.h"
#include "nodes/plannodes.h"
#include "tcop/pquery.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/portal.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "errcodes.h"
#include "extension.h"
#include "fsm.h"
#include "spi.h"

/* callback_center.actor: the application's claim of who acts. */
static char *cc_actor = NULL;

/* Defines the state machines' settings. */
void
cc_fsm_define_gucs(void)
{
	DefineCustomStringVariable("callback_center.actor",
							   "Who is making the current change, recorded in state history.",
							   "Set it per transaction (SET LOCAL) in application code; empty means the current role.",
							   &cc_actor,
							   "",
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);
}

PG_FUNCTION_INFO_V1(cc_fsm_trigger);
PG_FUNCTION_INFO_V1(cc_fsm_trigger_v2);
PG_FUNCTION_INFO_V1(cc_fsm_unknown_state);
PG_FUNCTION_INFO_V1(cc_fsm_invalidate);
PG_FUNCTION_INFO_V1(cc_fsm_installing);

typedef struct FsmState
{
	char	   *name;
	bool		is_initial;
	bool		is_final;
} FsmState;

typedef struct FsmTransition
{
	char	   *from;
	char	   *to;
	char	   *event;
	int			nemits;
	char	  **emits;
} FsmTransition;

typedef struct FsmMachine
{
	char		name[NAMEDATALEN];	/* hash key */
	List	   *states;			/* of FsmState * */
	List	   *transitions;	/* of FsmTransition * */
} FsmMachine;

/* The cache: everything below lives in fsm_cache_cxt. */
static MemoryContext fsm_cache_cxt = NULL;
static HTAB *fsm_machines = NULL;
static bool fsm_cache_valid = false;
static uint64 fsm_inval_count = 0;
static bool fsm_callback_registered = false;

/* What the cache was loaded against. */
static Oid	fsm_machines_relid = InvalidOid;
static Oid	fsm_states_relid = InvalidOid;
static Oid	fsm_transitions_relid = InvalidOid;
static Oid	fsm_owner = InvalidOid;

/* The statements, prepared once per backend (spi.h). */
typedef enum FsmPlanId
{
	FSM_PLAN_MACHINES,
	FSM_PLAN_STATES,
	FSM_PLAN_TRANSITIONS,
	FSM_PLAN_HISTORY,
	FSM_PLAN_ENQUEUE,
	NUM_FSM_PLANS
} FsmPlanId;

static CcPlan plans[NUM_FSM_PLANS] = {
	[FSM_PLAN_MACHINES] = {
		"SELECT machine FROM callback_center.state_machines",
		0, {InvalidOid}
	},
	[FSM_PLAN_STATES] = {
		"SELECT machine, state, is_initial, is_final"
		" FROM callback_center.machine_states"
		" ORDER BY machine, state COLLATE pg_catalog.\"C\"",
		0, {InvalidOid}
	},
	[FSM_PLAN_TRANSITIONS] = {
		"SELECT machine, from_state, to_state, event, emits"
		" FROM callback_center.transitions"
		" ORDER BY machine, from_state COLLATE pg_catalog.\"C\","
		" to_state COLLATE pg_catalog.\"C\"",
		0, {InvalidOid}
	},
	[FSM_PLAN_HISTORY] = {
		"INSERT INTO callback_center.state_history"
		" (machine, table_name, entity_id, from_state,"
		" to_state, event, actor, session_role)"
		" VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
		8, {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
		TEXTOID}, 1
	},

	/*
	 * Looked up by name: whichever enqueue() is installed now.  Every other
	 * name is qualified, the plan being made under the session's
	 * search_path.
	 */
	[FSM_PLAN_ENQUEUE] = {
		"SELECT callback_center.enqueue($1, $2,"
		" pg_catalog.jsonb_build_object("
		"'machine', $3, 'entity_id', $2, 'from', $4,"
		" 'to', $5, 'event', $6)"
		" OPERATOR(pg_catalog.||) CASE WHEN $7 IS NULL"
		" THEN '{}'::pg_catalog.jsonb"
		" ELSE pg_catalog.jsonb_build_object('row', $7) END)",
		7, {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID}, 1
	},
};

/*
 * Drops the cache when one of the definition tables changes (or on a
 * full relcache reset).  Only flags: it may run in the middle of a load.
 */
static void
fsm_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == fsm_machines_relid ||
		relid == fsm_states_relid || relid == fsm_transitions_relid)
	{
		fsm_cache_valid = false;
		fsm_inval_count++;
	}
}

static Oid
fsm_relid(Oid nspid, const char *relname)
{
	Oid			relid = get_relname_relid(relname, nspid);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"callback_center.%s\" does not exist",
						relname),
				 errhint("Is the extension callback_center installed?")));
	return relid;
}

/*
 * Finds the definition tables and their owner (the extension owner) in the
 * system caches; needs no privilege.
 */
static void
fsm_lookup_relations(void)
{
	Oid			nspid;
	HeapTuple	reltup;

	nspid = get_namespace_oid("callback_center", false);
	fsm_machines_relid = fsm_relid(nspid, "state_machines");
	fsm_states_relid = fsm_relid(nspid, "machine_states");
	fsm_transitions_relid = fsm_relid(nspid, "transitions");

	reltup = SearchSysCache1(RELOID, ObjectIdGetDatum(fsm_machines_relid));
	if (!HeapTupleIsValid(reltup))
		elog(ERROR, "cache lookup failed for relation %u", fsm_machines_relid);
	fsm_owner = ((Form_pg_class) GETSTRUCT(reltup))->relowner;
	ReleaseSysCache(reltup);
}

static char *
fsm_cache_string(HeapTuple tup, TupleDesc desc, int col)
{
	char	   *s = SPI_getvalue(tup, desc, col);

	return MemoryContextStrdup(fsm_cache_cxt, s ? s : "");
}

static FsmMachine *
fsm_cache_machine(const char *name, HASHACTION action)
{
	char		key[NAMEDATALEN];

	/* Machine names are shorter than NAMEDATALEN (a CHECK says so). */
	if (strlen(name) >= NAMEDATALEN)
	{
		if (action == HASH_FIND)
			return NULL;
		elog(ERROR, "state machine name too long: \"%s\"", name);
	}
	memset(key, 0, sizeof(key));
	strlcpy(key, name, sizeof(key));
	return (FsmMachine *) hash_search(fsm_machines, key, action, NULL);
}

/*
 * Fills the cache from the definition tables.  Must run inside SPI, as the
 * extension owner.
 */
static void
fsm_load(void)
{
	HASHCTL		ctl;
	uint64		i;

	if (!fsm_callback_registered)
	{
		CacheRegisterRelcacheCallback(fsm_relcache_callback, (Datum) 0);
		fsm_callback_registered = true;
	}

	if (fsm_cache_cxt == NULL)
		fsm_cache_cxt = AllocSetContextCreate(CacheMemoryContext,
											  "callback_center fsm cache",
											  ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(fsm_cache_cxt);
	fsm_machines = NULL;

	fsm_lookup_relations();

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = NAMEDATALEN;
	ctl.entrysize = sizeof(FsmMachine);
	ctl.hcxt = fsm_cache_cxt;
	fsm_machines = hash_create("callback_center fsm machines", 16, &ctl,
							   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	(void) cc_plan_exec(&plans[FSM_PLAN_MACHINES], NULL, NULL, true, 0,
						SPI_OK_SELECT);
	for (i = 0; i < SPI_processed; i++)
	{
		char	   *name = SPI_getvalue(SPI_tuptable->vals[i],
										SPI_tuptable->tupdesc, 1);
		FsmMachine *m = fsm_cache_machine(name, HASH_ENTER);

		m->states = NIL;
		m->transitions = NIL;
	}

	(void) cc_plan_exec(&plans[FSM_PLAN_STATES], NULL, NULL, true, 0,
						SPI_OK_SELECT);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		FsmMachine *m = fsm_cache_machine(SPI_getvalue(tup, desc, 1),
										  HASH_FIND);
		FsmState   *s;
		bool		isnull;
		MemoryContext old;

		if (m == NULL)
			continue;
		s = MemoryContextAlloc(fsm_cache_cxt, sizeof(FsmState));
		s->name = fsm_cache_string(tup, desc, 2);
		s->is_initial = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull));
		s->is_final = DatumGetBool(SPI_getbinval(tup, desc, 4, &isnull));
		old = MemoryContextSwitchTo(fsm_cache_cxt);
		m->states = lappend(m->states, s);
		MemoryContextSwitchTo(old);
	}

	(void) cc_plan_exec(&plans[FSM_PLAN_TRANSITIONS], NULL, NULL, true, 0,
						SPI_OK_SELECT);
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		FsmMachine *m = fsm_cache_machine(SPI_getvalue(tup, desc, 1),
										  HASH_FIND);
		FsmTransition *t;
		Datum		arr;
		bool		isnull;
		Datum	   *elems;
		bool	   *nulls;
		int			n;
		MemoryContext old;

		if (m == NULL)
			continue;
		t = MemoryContextAllocZero(fsm_cache_cxt, sizeof(FsmTransition));
		t->from = fsm_cache_string(tup, desc, 2);
		t->to = fsm_cache_string(tup, desc, 3);
		t->event = fsm_cache_string(tup, desc, 4);
		arr = SPI_getbinval(tup, desc, 5, &isnull);
		if (!isnull)
		{
			deconstruct_array(DatumGetArrayTypeP(arr), TEXTOID, -1, false,
							  TYPALIGN_INT, &elems, &nulls, &n);
			t->emits = MemoryContextAlloc(fsm_cache_cxt,
										  sizeof(char *) * Max(n, 1));
			for (int j = 0; j < n; j++)
			{
				if (nulls[j])
					continue;
				t->emits[t->nemits++] =
					MemoryContextStrdup(fsm_cache_cxt,
										TextDatumGetCString(elems[j]));
			}
		}
		old = MemoryContextSwitchTo(fsm_cache_cxt);
		m->transitions = lappend(m->transitions, t);
		MemoryContextSwitchTo(old);
	}
}

/*
 * Makes the cache valid.  Must run inside SPI, as the extension owner.
 * Loads again if an invalidation arrived while loading.
 */
static void
fsm_ensure_cache(void)
{
	while (!fsm_cache_valid)
	{
		uint64		before = fsm_inval_count;

		fsm_load();
		if (fsm_inval_count == before)
			fsm_cache_valid = true;
	}
}

static FsmState *
fsm_find_state(FsmMachine *m, const char *state)
{
	ListCell   *lc;

	foreach(lc, m->states)
	{
		FsmState   *s = lfirst(lc);

		if (strcmp(s->name, state) == 0)
			return s;
	}
	return NULL;
}

static FsmTransition *
fsm_find_transition(FsmMachine *m, const char *from, const char *to)
{
	ListCell   *lc;

	foreach(lc, m->transitions)
	{
		FsmTransition *t = lfirst(lc);

		if (strcmp(t->from, from) == 0 && strcmp(t->to, to) == 0)
			return t;
	}
	return NULL;
}

/* "a", "b" (quoted, in the order loaded): the legal targets from a state. */
static char *
fsm_targets(FsmMachine *m, const char *from)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, m->transitions)
	{
		FsmTransition *t = lfirst(lc);

		if (strcmp(t->from, from) != 0)
			continue;
		appendStringInfo(&buf, "%s\"%s\"", buf.len > 0 ? ", " : "", t->to);
	}
	return buf.data;
}

/* The states a new row may start in, as for fsm_targets. */
static char *
fsm_initials(FsmMachine *m)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, m->states)
	{
		FsmState   *s = lfirst(lc);

		if (s->is_initial)
			appendStringInfo(&buf, "%s\"%s\"", buf.len > 0 ? ", " : "",
							 s->name);
	}
	return buf.data;
}

static char *
fsm_known_states(FsmMachine *m)
{
	StringInfoData buf;
	ListCell   *lc;

	initStringInfo(&buf);
	foreach(lc, m->states)
	{
		FsmState   *s = lfirst(lc);

		appendStringInfo(&buf, "%s\"%s\"", buf.len > 0 ? ", " : "", s->name);
	}
	return buf.data;
}

/*
 * to_jsonb(NEW) (row_to_json reads the row type from the datum).  It runs
 * the output functions of the row's column types and their casts to json,
 * which whoever owns a column's type may have written: call it as the
 * invoking user, never as the extension owner (a superuser), or a table
 * owner's cast would run with superuser rights.
 */
static Datum
fsm_row_jsonb(HeapTuple newtuple, TupleDesc desc)
{
	Datum		row;

	row = DirectFunctionCall1(row_to_json,
							  heap_copy_tuple_as_datum(newtuple, desc));
	return DirectFunctionCall1(jsonb_in,
							   CStringGetDatum(TextDatumGetCString(row)));
}

/*
 * Appends the history row and calls enqueue() once per emitted event type.
 * The payload names the machine, the entity, both states and the event,
 * and carries row (from fsm_payload_row) only when the attachment chose
 * columns for it: row is (Datum) 0 otherwise.  Must run inside SPI, as the
 * extension owner, and must run no code the table's owner controls: see
 * fsm_row_jsonb.  from and t are NULL for an insert.  t must not point into
 * the cache: enqueue() may fire this trigger on another table, which may
 * reload the cache.  actor is the application's claim, session_role the
 * role the server authenticated (session_user).
 */
static void
fsm_record(const char *machine, const char *table_name, const char *entity_id,
		   const char *from, const char *to, FsmTransition *t,
		   const char *actor, const char *session_role, Datum row)
{
	Datum		values[8];
	char		nulls[8];
	int			i;

	memset(nulls, ' ', sizeof(nulls));
	values[0] = CStringGetTextDatum(machine);
	values[1] = CStringGetTextDatum(table_name);
	values[2] = CStringGetTextDatum(entity_id);
	if (from)
		values[3] = CStringGetTextDatum(from);
	else
		nulls[3] = 'n';
	values[4] = CStringGetTextDatum(to);
	if (t)
		values[5] = CStringGetTextDatum(t->event);
	else
		nulls[5] = 'n';
	values[6] = CStringGetTextDatum(actor);
	values[7] = CStringGetTextDatum(session_role);
	(void) cc_plan_exec(&plans[FSM_PLAN_HISTORY], values, nulls, false, 0,
						SPI_OK_INSERT);

	if (t == NULL || t->nemits == 0)
		return;

	memset(nulls, ' ', sizeof(nulls));
	values[1] = CStringGetTextDatum(entity_id);
	values[2] = CStringGetTextDatum(machine);
	values[3] = CStringGetTextDatum(from);
	values[4] = CStringGetTextDatum(to);
	values[5] = CStringGetTextDatum(t->event);
	if (row != (Datum) 0)
		values[6] = row;
	else
		nulls[6] = 'n';
	for (i = 0; i < t->nemits; i++)
	{
		values[0] = CStringGetTextDatum(t->emits[i]);
		(void) cc_plan_exec(&plans[FSM_PLAN_ENQUEUE], values, nulls, false, 0,
							SPI_OK_SELECT);
	}
}

static int
fsm_column(Relation rel, const char *table_name, const char *colname)
{
	int			fnum = SPI_fnumber(RelationGetDescr(rel), colname);

	if (fnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of table %s does not exist",
						colname, table_name)));
	return fnum;
}

/*
 * The payload's row: the columns the attachment named (trigger arguments
 * after the third), as a JSON object, or the whole row for the one name
 * "*"; (Datum) 0 when it named none.  Call it as the invoking user: see
 * fsm_row_jsonb.  Raises 42703 for a named column the table no longer has.
 */
static Datum
fsm_payload_row(Relation rel, const char *table_name, Trigger *trigger,
				HeapTuple newtuple)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			ncols = trigger->tgnargs - 3;
	TupleDesc	pdesc;
	Datum	   *values;
	bool	   *nulls;

	if (ncols <= 0)
		return (Datum) 0;
	if (ncols == 1 && strcmp(trigger->tgargs[3], "*") == 0)
		return fsm_row_jsonb(newtuple, desc);

	pdesc = CreateTemplateTupleDesc(ncols);
	values = palloc(sizeof(Datum) * ncols);
	nulls = palloc(sizeof(bool) * ncols);
	for (int i = 0; i < ncols; i++)
	{
		int			fnum = fsm_column(rel, table_name, trigger->tgargs[3 + i]);
		Form_pg_attribute att = TupleDescAttr(desc, fnum - 1);

		TupleDescInitEntry(pdesc, i + 1, NameStr(att->attname),
						   att->atttypid, att->atttypmod, 0);
		values[i] = heap_getattr(newtuple, fnum, desc, &nulls[i]);
	}
	pdesc = BlessTupleDesc(pdesc);
	return fsm_row_jsonb(heap_form_tuple(pdesc, values, nulls), pdesc);
}

/*
 * True when the row comes from a COPY FROM into this very table (or into a
 * partitioned table above it) that the table's owner or a superuser runs as
 * the session's statement, outside any SECURITY DEFINER function: what
 * pg_restore and psql of a dump do.  Such rows are loaded as they are, as
 * ALTER TABLE ... DISABLE TRIGGER would let them in (which that role may do
 * anyway).  A COPY by any other role, a row a trigger inserts into this
 * table during a COPY into another one, INSERT and UPDATE are all checked.
 * It reads the portal the statement runs in rather than a hook, so it holds
 * when the library is first loaded by this very trigger, in the middle of
 * the COPY (a session where it is not preloaded).
 */
static bool
fsm_owner_copy(Relation rel, int sec_context)
{
	Portal		portal = ActivePortal;
	PlannedStmt *pstmt;
	CopyStmt   *copy;
	Oid			relid = RelationGetRelid(rel);
	Oid			target;

	if (portal == NULL || portal->commandTag != CMDTAG_COPY ||
		list_length(portal->stmts) != 1)
		return false;
	if ((sec_context & (SECURITY_LOCAL_USERID_CHANGE |
						SECURITY_RESTRICTED_OPERATION)) != 0)
		return false;
	pstmt = linitial_node(PlannedStmt, portal->stmts);
	if (pstmt->commandType != CMD_UTILITY ||
		pstmt->utilityStmt == NULL || !IsA(pstmt->utilityStmt, CopyStmt))
		return false;
	copy = (CopyStmt *) pstmt->utilityStmt;
	if (!copy->is_from || copy->relation == NULL)
		return false;
	target = RangeVarGetRelid(copy->relation, NoLock, true);
	if (!OidIsValid(target))
		return false;
	if (target != relid &&
		!(rel->rd_rel->relispartition &&
		  list_member_oid(get_partition_ancestors(relid), target)))
		return false;
	return pg_class_ownercheck(relid, GetUserId());
}

/*
 * Returns the transition that takes a row from old_state to new_state
 * (NULL for a row that starts out), or raises CB010 / CB011.
 */
static FsmTransition *
fsm_check(FsmMachine *m, const char *machine, const char *old_state,
		  const char *new_state, const char *entity_id,
		  const char *table_name)
{
	FsmState   *s = fsm_find_state(m, new_state);
	FsmTransition *t;
	char	   *targets;

	if (s == NULL)
		ereport(ERROR,
				(errcode(CC_ERRCODE_UNKNOWN_STATE),
				 errmsg("unknown state \"%s\" in state machine \"%s\"",
						new_state, machine),
				 errdetail("Row with id \"%s\" of table %s.",
						   entity_id, table_name),
				 errhint("Known states: %s.", fsm_known_states(m))));

	if (old_state == NULL)
	{
		/* A new row, or a row without a state yet: must start out. */
		if (!s->is_initial)
			ereport(ERROR,
					(errcode(CC_ERRCODE_ILLEGAL_TRANSITION),
					 errmsg("illegal transition in state machine \"%s\": NULL -> \"%s\"",
							machine, new_state),
					 errdetail("Row with id \"%s\" of table %s must start in an initial state.",
							   entity_id, table_name),
					 errhint("Initial states: %s.", fsm_initials(m))));
		return NULL;
	}

	t = fsm_find_transition(m, old_state, new_state);
	if (t != NULL)
		return t;

	targets = fsm_targets(m, old_state);
	if (fsm_find_state(m, old_state) == NULL)
		ereport(ERROR,
				(errcode(CC_ERRCODE_UNKNOWN_STATE),
				 errmsg("unknown state \"%s\" in state machine \"%s\"",
						old_state, machine),
				 errdetail("Row with id \"%s\" of table %s is in that state.",
						   entity_id, table_name)));
	ereport(ERROR,
			(errcode(CC_ERRCODE_ILLEGAL_TRANSITION),
			 errmsg("illegal transition in state machine \"%s\": \"%s\" -> \"%s\"",
					machine, old_state, new_state),
			 errdetail("Row with id \"%s\" of table %s is in state \"%s\".",
					   entity_id, table_name, old_state),
			 targets[0] != '\0' ?
			 errhint("Legal targets from \"%s\": %s.", old_state, targets) :
			 errhint("State \"%s\" is final: no transition leaves it.",
					 old_state)));
	return NULL;				/* keep compiler quiet */
}

/*
 * Raises 39P01 unless the table also has the other half of the pair that
 * attach_state_machine() creates: the same function with the same
 * arguments and columns, fired at the other time (AFTER for a BEFORE
 * trigger and the reverse), not disabled.  Without it moves would be
 * checked but never recorded, or recorded unchecked.
 */
static void
fsm_require_pair(Relation rel, Trigger *trigger, bool before,
				 const char *table_name)
{
	TriggerDesc *trigdesc = rel->trigdesc;

	for (int i = 0; trigdesc != NULL && i < trigdesc->numtriggers; i++)
	{
		Trigger    *o = &trigdesc->triggers[i];
		int			j;

		if (o->tgoid == trigger->tgoid || o->tgfoid != trigger->tgfoid ||
			o->tgenabled == TRIGGER_DISABLED ||
			!TRIGGER_FOR_ROW(o->tgtype) ||
			!TRIGGER_FOR_INSERT(o->tgtype) ||
			!TRIGGER_FOR_UPDATE(o->tgtype) ||
			(before ? !TRIGGER_FOR_AFTER(o->tgtype) :
			 !TRIGGER_FOR_BEFORE(o->tgtype)) ||
			o->tgnargs != trigger->tgnargs ||
			o->tgnattr != trigger->tgnattr ||
			(o->tgnattr > 0 &&
			 memcmp(o->tgattr, trigger->tgattr,
					sizeof(int16) * o->tgnattr) != 0))
			continue;
		for (j = 0; j < o->tgnargs; j++)
			if (strcmp(o->tgargs[j], trigger->tgargs[j]) != 0)
				break;
		if (j == o->tgnargs)
			return;
	}
	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("trigger \"%s\" on table %s has no matching %s trigger",
					trigger->tgname, table_name, before ? "AFTER" : "BEFORE"),
			 errdetail("callback_center.fsm_trigger() checks a move BEFORE the row is written and records it AFTER; it needs both triggers, with the same arguments."),
			 errhint("Use callback_center.attach_state_machine() to create the triggers.")));
}

/*
 * Row trigger on INSERT OR UPDATE OF <state column>, arguments (machine,
 * state_column, id_column, payload columns...), created twice by
 * attach_state_machine(): once BEFORE and once AFTER, with the same
 * arguments.
 *
 * BEFORE, under the row lock and before the write: lets a row in only if
 * its state is an initial state, and lets an update through only if the
 * machine has a transition from the old state to the new one (an unchanged
 * state passes untouched).  Records nothing.
 *
 * AFTER, for rows actually written (not for an INSERT that ON CONFLICT DO
 * NOTHING skipped, nor for a row another BEFORE trigger dropped): checks
 * the written row the same way (another BEFORE trigger may have changed
 * it), appends one history row and calls enqueue() for each event type the
 * transition emits, with the payload columns of the row as written.  All in
 * the caller's transaction: if the statement fails, none of it stays.
 *
 * A row that the table's owner (or a superuser) loads with COPY FROM into
 * that table passes both halves untouched: see fsm_owner_copy.
 *
 * Raises CB010 (illegal move), CB011 (unknown state or machine), 22004
 * (NULL state or id), 39P01 (not fired as such a pair).
 */
Datum
cc_fsm_trigger_v2(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Trigger    *trigger;
	Relation	rel;
	TupleDesc	desc;
	HeapTuple	newtuple;
	HeapTuple	oldtuple = NULL;
	bool		before;
	const char *machine;
	int			state_col;
	int			id_col;
	Oid			state_type;
	bool		isnull;
	Datum		d;
	char	   *new_state;
	char	   *old_state = NULL;
	char	   *entity_id;
	char	   *table_name;
	Oid			save_userid;
	int			save_sec_context;
	Oid			owner = InvalidOid;
	bool		use_spi;
	FsmMachine *m;
	FsmTransition *t;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("callback_center.fsm_trigger() was not called by the trigger manager")));
	if (TRIGGER_FIRED_INSTEAD(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		  TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("callback_center.fsm_trigger() must be fired BEFORE or AFTER INSERT OR UPDATE FOR EACH ROW")));
	before = TRIGGER_FIRED_BEFORE(trigdata->tg_event);
	trigger = trigdata->tg_trigger;
	if (trigger->tgnargs < 3)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("callback_center.fsm_trigger() takes at least 3 arguments, got %d",
						trigger->tgnargs),
				 errhint("Use callback_center.attach_state_machine() to create the trigger.")));

	rel = trigdata->tg_relation;
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		oldtuple = trigdata->tg_trigtuple;
		newtuple = trigdata->tg_newtuple;
	}
	else
		newtuple = trigdata->tg_trigtuple;

	/* A restore, or its like: the rows go in as they are. */
	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) &&
		fsm_owner_copy(rel, save_sec_context))
		return PointerGetDatum(before ? newtuple : NULL);

	machine = trigger->tgargs[0];
	desc = RelationGetDescr(rel);
	table_name = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
											RelationGetRelationName(rel));
	state_col = fsm_column(rel, table_name, trigger->tgargs[1]);
	id_col = fsm_column(rel, table_name, trigger->tgargs[2]);
	state_type = SPI_gettypeid(desc, state_col);
	if (state_type != TEXTOID && state_type != VARCHAROID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("state column \"%s\" of table %s has type %s",
						trigger->tgargs[1], table_name,
						format_type_be(state_type)),
				 errdetail("A state column must be of type text or varchar.")));

	d = SPI_getbinval(newtuple, desc, state_col, &isnull);
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("state column \"%s\" of table %s cannot be null",
						trigger->tgargs[1], table_name),
				 errdetail("State machine \"%s\" is attached to that column.",
						   machine)));
	new_state = TextDatumGetCString(d);

	if (oldtuple != NULL)
	{
		d = SPI_getbinval(oldtuple, desc, state_col, &isnull);
		if (!isnull)
		{
			old_state = TextDatumGetCString(d);
			if (strcmp(old_state, new_state) == 0)
				return PointerGetDatum(before ? newtuple : NULL);
		}
	}

	/*
	 * Read here, as the invoking user: the id column's output function may
	 * be anybody's code.  Below, only the definitions and the history are
	 * handled as the extension owner (see fsm_row_jsonb).
	 */
	entity_id = SPI_getvalue(newtuple, desc, id_col);
	if (entity_id == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("id column \"%s\" of table %s cannot be null",
						trigger->tgargs[2], table_name),
				 errdetail("State machine \"%s\" records history by that column.",
						   machine)));

	/*
	 * Read the definitions and write history as the extension owner.  An
	 * error restores the user on (sub)transaction abort.  The BEFORE half
	 * needs SPI only to load the cache.
	 */
	use_spi = !before || !fsm_cache_valid;
	if (use_spi)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (!fsm_cache_valid)
			fsm_lookup_relations();
		owner = fsm_owner;
		SetUserIdAndSecContext(owner,
							   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
		fsm_ensure_cache();
	}

	m = fsm_cache_machine(machine, HASH_FIND);
	if (m == NULL)
		ereport(ERROR,
				(errcode(CC_ERRCODE_UNKNOWN_STATE),
				 errmsg("state machine \"%s\" does not exist", machine),
				 errdetail("It is attached to column \"%s\" of table %s.",
						   trigger->tgargs[1], table_name)));

	t = fsm_check(m, machine, old_state, new_state, entity_id, table_name);
	fsm_require_pair(rel, trigger, before, table_name);

	if (!before)
	{
		FsmTransition *copy = NULL;
		char	   *actor;
		char	   *session_role;
		Datum		row = (Datum) 0;

		/*
		 * Whose change it is: the application's claim (the setting, which
		 * any role may set), else the role acting now; and beside it the
		 * role the session authenticated as, which no setting changes.
		 */
		if (cc_actor != NULL && cc_actor[0] != '\0')
			actor = pstrdup(cc_actor);
		else
			actor = GetUserNameFromId(save_userid, false);
		session_role = GetUserNameFromId(GetSessionUserId(), false);

		if (t != NULL)
		{
			copy = palloc0(sizeof(FsmTransition));
			copy->event = pstrdup(t->event);
			copy->emits = palloc(sizeof(char *) * Max(t->nemits, 1));
			for (int i = 0; i < t->nemits; i++)
				copy->emits[i] = pstrdup(t->emits[i]);
			copy->nemits = t->nemits;
		}

		/* The row's JSON runs user code: back to the invoking user for it. */
		if (copy != NULL && copy->nemits > 0 && trigger->tgnargs > 3)
		{
			SetUserIdAndSecContext(save_userid, save_sec_context);
			row = fsm_payload_row(rel, table_name, trigger, newtuple);
			SetUserIdAndSecContext(owner,
								   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
		}
		fsm_record(machine, table_name, entity_id, old_state, new_state,
				   copy, actor, session_role, row);
	}

	if (use_spi)
	{
		SetUserIdAndSecContext(save_userid, save_sec_context);
		SPI_finish();
	}

	return PointerGetDatum(before ? newtuple : NULL);
}

/*
 * The 0.1.0 entry point: its schema has no state_history.session_role.
 */
Datum
cc_fsm_trigger(PG_FUNCTION_ARGS)
{
	cc_refuse_old_schema("callback_center.fsm_trigger");
}

/*
 * _fsm_unknown_state(tbl regclass, state_column name, states text[]):
 * the first non-NULL value of tbl.state_column that is not in states, or
 * NULL.  attach_state_machine() asks it.  The scan may run code the table's
 * owner wrote (a row-level security policy it forces on itself), so it
 * runs as that owner, as a security-restricted operation with search_path
 * pg_catalog, pg_temp, as ANALYZE and CREATE INDEX run a table's
 * expressions: never with the rights of the admin who attaches.  Raises
 * 42501 unless the caller has the TRIGGER privilege on tbl.
 */
Datum
cc_fsm_unknown_state(PG_FUNCTION_ARGS)
{
	Oid			relid;
	char	   *colname;
	Datum		states;
	HeapTuple	reltup;
	Form_pg_class relform;
	Oid			owner;
	char	   *qrel;
	const char *qcol;
	char	   *query;
	Oid			argtypes[1] = {TEXTARRAYOID};
	Datum		args[1];
	Oid			save_userid;
	int			save_sec_context;
	int			save_nestlevel;
	char	   *bad = NULL;
	int			rc;

	cc_require_arg(fcinfo, 0, "tbl");
	cc_require_arg(fcinfo, 1, "state_column");
	cc_require_arg(fcinfo, 2, "states");
	relid = PG_GETARG_OID(0);
	colname = NameStr(*PG_GETARG_NAME(1));
	states = PG_GETARG_DATUM(2);

	reltup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(reltup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	relform = (Form_pg_class) GETSTRUCT(reltup);
	owner = relform->relowner;
	qrel = quote_qualified_identifier(get_namespace_name(relform->relnamespace),
									  NameStr(relform->relname));
	ReleaseSysCache(reltup);

	if (pg_class_aclcheck(relid, GetUserId(), ACL_TRIGGER) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for table %s", qrel),
				 errdetail("Attaching a state machine needs the TRIGGER privilege on the table.")));

	qcol = quote_identifier(colname);
	query = psprintf("SELECT %s::pg_catalog.text FROM %s"
					 " WHERE %s IS NOT NULL AND NOT (%s::pg_catalog.text"
					 " OPERATOR(pg_catalog.=) ANY ($1)) LIMIT 1",
					 qcol, qrel, qcol, qcol);
	args[0] = states;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(owner, save_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog, pg_temp",
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args(query, 1, argtypes, args, NULL, true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not scan %s: %s", qrel, SPI_result_code_string(rc));
	if (SPI_processed > 0)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1);

		if (v != NULL)
			bad = MemoryContextStrdup(TopTransactionContext, v);
	}
	SPI_finish();

	AtEOXact_GUC(false, save_nestlevel);
	SetUserIdAndSecContext(save_userid, save_sec_context);

	if (bad == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(bad));
}

/*
 * AFTER ... FOR EACH STATEMENT on the definition tables: every backend
 * drops its cache when this transaction commits (this one at once).
 */
Datum
cc_fsm_invalidate(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("callback_center.fsm_invalidate() was not called by the trigger manager")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("callback_center.fsm_invalidate() must be fired AFTER ... FOR EACH STATEMENT")));

	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}

/*
 * True while the script of CREATE or ALTER EXTENSION callback_center runs.
 * set_transition_emits() asks: what the script sets on built-in
 * transitions it sets again on restore, so only later changes are kept
 * for pg_dump.
 */
Datum
cc_fsm_installing(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(creating_extension &&
				   CurrentExtensionObject ==
				   get_extension_oid("callback_center", true));
}
