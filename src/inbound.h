/*-------------------------------------------------------------------------
 *
 * inbound.h
 *		Inbound callbacks: idempotent recording and signature verification.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_INBOUND_H
#define CC_INBOUND_H

extern int	cc_signature_tolerance_s;
extern int	cc_callback_max_retries;

extern void cc_inbound_define_gucs(void);

#endif							/* CC_INBOUND_H */
