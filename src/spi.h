/*-------------------------------------------------------------------------
 *
 * spi.h
 *		The one way a module prepares the statements it runs through SPI.
 *
 * A module lists its statements in a table indexed by an enum, with
 * designated initializers (stock.c is the model):
 *
 *		static CcPlan plans[NUM_X_PLANS] = {
 *			[X_PLAN_READ] = {"SELECT ... WHERE k OPERATOR(pg_catalog.=) $1",
 *							 1, {TEXTOID}},
 *		};
 *		... cc_plan_exec(&plans[X_PLAN_READ], args, NULL, true, 1, SPI_OK_SELECT);
 *
 * Each statement is prepared on first use and kept for the life of the
 * backend (SPI_keepplan); the plan cache re-plans it after DDL on what it
 * reads, a DROP and CREATE EXTENSION included.  Plans are cached across
 * calls made under different search_paths, so every function, operator,
 * type and collation in them is schema-qualified.
 *
 * Only statements that run once per process (the worker's recovery) or
 * whose text is built per call (a scan of a named table) use SPI_execute
 * directly.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_SPI_H
#define CC_SPI_H

#include "postgres.h"

#include "executor/spi.h"

#define CC_PLAN_MAX_ARGS 8

/* One statement of a module's plan table, and its kept plan. */
typedef struct CcPlan
{
	const char *sql;
	int			nargs;
	Oid			argtypes[CC_PLAN_MAX_ARGS];
	uint64		max_rows;		/* most rows it may process; 0: no limit */
	int			cursor_options; /* for SPI_prepare_cursor; 0: SPI_prepare's */
	SPIPlanPtr	plan;			/* NULL until first use */
} CcPlan;

extern SPIPlanPtr cc_plan(CcPlan *p);
extern uint64 cc_plan_exec(CcPlan *p, Datum *args, const char *nulls,
						   bool read_only, long count, int expect);

#endif							/* CC_SPI_H */
