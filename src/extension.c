/*-------------------------------------------------------------------------
 *
 * extension.c
 *		Whether the schema installed in the database is the one this library
 *		was built for.
 *
 * The library is replaced by make install and read at the next start; the
 * schema changes only with ALTER EXTENSION ... UPDATE.  Between the two, the
 * workers wait and the entry points kept for older scripts refuse, each
 * with the hint to update.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "utils/builtins.h"
#include "utils/syscache.h"

#include "extension.h"

/*
 * Whether the extension is installed in the worker's database, and at the
 * library's version.  A worker starts before anyone runs CREATE EXTENSION,
 * must survive DROP EXTENSION, and after a new library is installed meets
 * the old schema until ALTER EXTENSION ... UPDATE: its statements are
 * written for the schema of its own version, so it waits rather than run
 * them against another.  It asks this each time round, in a transaction of
 * its own, and says once per version seen why it waits.
 */
CcExtensionState
cc_extension_state(void)
{
	static char warned_for[NAMEDATALEN] = "";
	CcExtensionState state = CC_EXT_ABSENT;
	Oid			extoid;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	extoid = get_extension_oid(CC_EXTENSION_NAME, true);
	if (OidIsValid(extoid))
	{
		HeapTuple	tup = SearchSysCache1(EXTENSIONOID, ObjectIdGetDatum(extoid));

		state = CC_EXT_OTHER_VERSION;
		if (HeapTupleIsValid(tup))
		{
			bool		isnull;
			Datum		d = SysCacheGetAttr(EXTENSIONOID, tup,
											Anum_pg_extension_extversion,
											&isnull);
			char	   *version = isnull ? "" : TextDatumGetCString(d);

			if (strcmp(version, CC_VERSION) == 0)
			{
				state = CC_EXT_CURRENT;
				warned_for[0] = '\0';
			}
			else if (strcmp(version, warned_for) != 0)
			{
				ereport(WARNING,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("callback_center %s is installed in database \"%s\" but the library is %s",
								version, get_database_name(MyDatabaseId),
								CC_VERSION),
						 errdetail("The %s waits, and changes nothing, until the versions agree.",
								   MyBgworkerEntry ? MyBgworkerEntry->bgw_type : "worker"),
						 errhint("Run ALTER EXTENSION callback_center UPDATE in that database.")));
				strlcpy(warned_for, version, sizeof(warned_for));
			}
			ReleaseSysCache(tup);
		}
	}
	CommitTransactionCommand();
	return state;
}

/*
 * Raises the error of a C function that the installed SQL still names but
 * this library no longer serves with that contract: the schema is older
 * than the library (pg_stat_statements keeps such entry points the same
 * way).  Called by the entry points kept for older install scripts.
 */
void
cc_refuse_old_schema(const char *function)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("function %s of an older callback_center schema is not supported by library %s",
					function, CC_VERSION),
			 errhint("Run ALTER EXTENSION callback_center UPDATE.")));
}
