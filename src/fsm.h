/*-------------------------------------------------------------------------
 *
 * fsm.h
 *		State machines: the trigger that enforces them and records history.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_FSM_H
#define CC_FSM_H

extern void cc_fsm_define_gucs(void);

#endif							/* CC_FSM_H */
