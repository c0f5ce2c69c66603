/*-------------------------------------------------------------------------
 *
 * delivery.h
 *		The delivery pipeline: claim -> send -> wait -> judge -> record.
 *
 * The worker (worker.c) owns the lifecycle and calls cc_delivery_step
 * while it runs; everything about what is in flight lives in delivery.c.
 * See doc/delivery_round.md.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_DELIVERY_H
#define CC_DELIVERY_H

#include "postgres.h"

extern void cc_delivery_define_gucs(void);
extern bool cc_delivery_step(uint64 commit_gen, bool claim_allowed,
							 int64 *wait_ms);
extern void cc_delivery_shutdown(void);
extern void cc_delivery_abandon(void);

#endif							/* CC_DELIVERY_H */
