/*-------------------------------------------------------------------------
 *
 * callback_center.c
 *		Module entry point: each module defines its settings and hooks.
 *
 * The SQL API works whenever the library is loaded.  The background
 * workers and the shared state they publish exist only when the library
 * is loaded through shared_preload_libraries; functions that need them say
 * so.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "allowlist.h"
#include "fsm.h"
#include "inbound.h"
#include "jobs.h"
#include "outbox.h"
#include "shmem.h"
#include "worker.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

	cc_shmem_init();
	cc_fsm_define_gucs();
	cc_inbound_define_gucs();
	cc_jobs_define_gucs();
	cc_outbox_define_gucs();
	cc_allowlist_define_gucs();
	if (process_shared_preload_libraries_in_progress)
		cc_worker_define_gucs();
	MarkGUCPrefixReserved("callback_center");

	if (process_shared_preload_libraries_in_progress)
	{
		cc_register_bgworker(CC_WORKER_TYPE, "callback_center_worker_main");
		cc_register_bgworker(CC_JOBS_WORKER_TYPE, "callback_center_jobs_main");
	}
}
