/*-------------------------------------------------------------------------
 *
 * jobs.h
 *		The compensation jobs worker ("callback_center jobs").
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_JOBS_H
#define CC_JOBS_H

#include "postgres.h"

#define CC_JOBS_WORKER_TYPE "callback_center jobs"

extern void cc_jobs_define_gucs(void);
extern PGDLLEXPORT void callback_center_jobs_main(Datum main_arg);

#endif							/* CC_JOBS_H */
