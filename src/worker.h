/*-------------------------------------------------------------------------
 *
 * worker.h
 *		The delivery worker ("callback_center worker").
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_WORKER_H
#define CC_WORKER_H

#include "postgres.h"

#define CC_WORKER_TYPE		"callback_center worker"

extern void cc_worker_define_gucs(void);
extern PGDLLEXPORT void callback_center_worker_main(Datum main_arg);

#endif							/* CC_WORKER_H */
