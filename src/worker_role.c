/*-------------------------------------------------------------------------
 *
 * worker_role.c
 *		The workers' statements run as callback_center_worker, a role
 *		holding only the rights they need, not as the superuser they
 *		connect as.
 *
 * PostgreSQL 15 refuses a background worker's connection as a role
 * without LOGIN, and a LOGIN role would be one more way into the cluster,
 * so the workers connect as the bootstrap superuser and switch to the
 * NOLOGIN role for each transaction, as a security-restricted operation
 * (the way autovacuum runs index functions as the table's owner).  A
 * statement that could still be made to run someone's code (the class of
 * CVE-2018-1058, already closed by the pinned search_path and qualified
 * names) would get the worker role's rights: the extension's queue
 * tables and a few functions, nothing of the cluster.  An error's abort
 * restores the superuser by itself; a commit does not, hence leave().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/acl.h"

#include "worker_role.h"

static Oid	saved_userid = InvalidOid;
static int	saved_sec_context = 0;
static bool	entered = false;

/*
 * Switches the current transaction to the worker role.  55000 when the
 * role is missing: created by CREATE EXTENSION and the update to 0.2.0.
 */
void
cc_worker_role_enter(void)
{
	Oid			role = get_role_oid(CC_WORKER_ROLE, true);

	if (!OidIsValid(role))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("role \"%s\" does not exist", CC_WORKER_ROLE),
				 errhint("CREATE EXTENSION callback_center and ALTER EXTENSION callback_center UPDATE create it; the workers run their statements as it.")));
	GetUserIdAndSecContext(&saved_userid, &saved_sec_context);
	SetUserIdAndSecContext(role, saved_sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	entered = true;
}

/* Back to the connecting superuser, before the transaction commits. */
void
cc_worker_role_leave(void)
{
	if (!entered)
		return;
	SetUserIdAndSecContext(saved_userid, saved_sec_context);
	entered = false;
}
