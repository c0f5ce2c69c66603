/*-------------------------------------------------------------------------
 *
 * outbox.h
 *		The outbox's settings, for the modules that write or read events.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_OUTBOX_H
#define CC_OUTBOX_H

/* callback_center.max_event_size, in bytes. */
extern int	cc_max_event_size;

extern void cc_outbox_define_gucs(void);

#endif							/* CC_OUTBOX_H */
