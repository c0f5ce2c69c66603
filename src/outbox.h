/*-------------------------------------------------------------------------
 *
 * outbox.h
 *		The outbox's commit-time wake-up, for C code that queues rows.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_OUTBOX_H
#define CC_OUTBOX_H

/* callback_center.max_event_size, in bytes. */
extern int	cc_max_event_size;

extern void cc_outbox_define_gucs(void);

/* Makes the current transaction wake the worker when it commits. */
extern void cc_outbox_note_enqueued(void);

#endif							/* CC_OUTBOX_H */
