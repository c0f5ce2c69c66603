/*-------------------------------------------------------------------------
 *
 * worker_role.h
 *		The role the workers' statements run as.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_WORKER_ROLE_H
#define CC_WORKER_ROLE_H

#define CC_WORKER_ROLE "callback_center_worker"

extern void cc_worker_role_enter(void);
extern void cc_worker_role_leave(void);

#endif							/* CC_WORKER_ROLE_H */
