/*-------------------------------------------------------------------------
 *
 * outbox.c
 *		Wakes the worker when a transaction that queued outbox rows commits.
 *
 * callback_center.enqueue() (src/sql/10_outbox.sql) inserts the rows and
 * then calls callback_center._outbox_note_enqueue(), which sets a flag for
 * the current transaction.  A transaction callback, registered once per
 * backend, wakes the worker at commit when the flag is set and clears it at
 * the end of every transaction.  Rows queued by a transaction that aborts
 * are never seen, so waking the worker for them would be wasted work.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"

#include "callback_center.h"
#include "outbox.h"

/* Whether the current transaction queued at least one outbox row. */
static bool cc_outbox_pending_wake = false;

/* Whether cc_outbox_xact_callback is registered in this backend. */
static bool cc_outbox_callback_registered = false;

static void cc_outbox_xact_callback(XactEvent event, void *arg);

PG_FUNCTION_INFO_V1(cc_outbox_note_enqueue);

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
				cc_wake_worker();
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
void
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
 * cc_outbox_note_enqueued(), called by enqueue() after it inserted rows.
 */
Datum
cc_outbox_note_enqueue(PG_FUNCTION_ARGS)
{
	cc_outbox_note_enqueued();
	PG_RETURN_VOID();
}
