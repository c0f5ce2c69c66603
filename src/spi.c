/*-------------------------------------------------------------------------
 *
 * spi.c
 *		Plan tables: each module's SPI statements prepared once per backend,
 *		run with their result checked (see spi.h).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"

#include "spi.h"

/*
 * Returns p's kept plan, preparing it on first use.  Must be called while
 * connected to SPI.
 */
SPIPlanPtr
cc_plan(CcPlan *p)
{
	if (p->plan == NULL)
	{
		SPIPlanPtr	plan;

		Assert(p->nargs <= CC_PLAN_MAX_ARGS);
		plan = SPI_prepare_cursor(p->sql, p->nargs, p->argtypes,
								  p->cursor_options);
		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed for \"%s\": %s",
				 p->sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed for \"%s\"", p->sql);
		p->plan = plan;
	}
	return p->plan;
}

/*
 * Runs p (SPI_execute_plan's arguments) and returns the number of rows
 * processed.  A result other than expect, or more rows than p->max_rows, is
 * an internal error (XX000), raised before the statement's changes can
 * commit.
 */
uint64
cc_plan_exec(CcPlan *p, Datum *args, const char *nulls, bool read_only,
			 long count, int expect)
{
	int			rc;

	rc = SPI_execute_plan(cc_plan(p), args, nulls, read_only, count);
	if (rc != expect)
		elog(ERROR, "statement failed: %s (%s)",
			 SPI_result_code_string(rc), p->sql);
	if (p->max_rows > 0 && SPI_processed > p->max_rows)
		elog(ERROR, "statement processed " UINT64_FORMAT
			 " rows, at most " UINT64_FORMAT " expected (%s)",
			 SPI_processed, p->max_rows, p->sql);
	return SPI_processed;
}
