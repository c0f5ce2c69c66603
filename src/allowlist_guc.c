/*-------------------------------------------------------------------------
 *
 * allowlist_guc.c
 *		The callback_center.allowed_destinations setting.
 *
 * The setting is parsed once by its check hook (a malformed entry is
 * refused there, so a bad postgresql.conf line keeps the previous list);
 * the parsed list is the GUC's "extra" and is what http.c consults at
 * every new connection and url_check.c at endpoint create time.  See
 * allowlist.c for the rules.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/guc.h"

#include "allowlist.h"

static char *cc_allowed_destinations = NULL;
static const CcAllowList *allow_current = NULL;
static uint64 allow_generation = 0;

/* Refuses a malformed list, naming the entry; hands the parsed list on. */
static bool
cc_allowlist_check_hook(char **newval, void **extra, GucSource source)
{
	char		err[512];
	CcAllowList *list = cc_allowlist_parse(*newval, err, sizeof(err));

	if (list == NULL)
	{
		GUC_check_errdetail("%s", err);
		GUC_check_errhint("List host names (\"hooks.example.com\", \"*.example.com\"), IP addresses or networks (\"10.0.0.0/8\", \"fd00::/8\"), separated by commas; empty allows every public destination.");
		return false;
	}
	*extra = list;
	return true;
}

/*
 * Makes the parsed list current and, when its text changed (a reload sets
 * every setting in the file again), tells http.c, which then drops its
 * kept-alive connections.
 */
static void
cc_allowlist_assign_hook(const char *newval, void *extra)
{
	static char *last = NULL;

	allow_current = (const CcAllowList *) extra;
	if (last != NULL && newval != NULL && strcmp(last, newval) == 0)
		return;
	free(last);
	last = newval ? strdup(newval) : NULL;
	allow_generation++;
}

/*
 * Defines callback_center.allowed_destinations.  Called from _PG_init in
 * every process that loads the library: backends check endpoint URLs
 * against it, the worker and http_probe check every connection.
 */
void
cc_allowlist_define_gucs(void)
{
	DefineCustomStringVariable("callback_center.allowed_destinations",
							   "Host names and IP networks that deliveries may connect to.",
							   "Comma-separated host names (\"*.example.com\" for any name below a domain), IPv4 or IPv6 addresses and CIDR networks; empty allows every public address. Loopback, link-local, private and this host's own addresses are refused unless a listed network inside their range allows them.",
							   &cc_allowed_destinations,
							   "",
							   PGC_SIGHUP,
							   0,
							   cc_allowlist_check_hook,
							   cc_allowlist_assign_hook,
							   NULL);
}

/*
 * The list in force, possibly with no entries (the defaults then apply:
 * every public address, no reserved one).  Never NULL.
 */
const CcAllowList *
cc_allowlist_current(void)
{
	static const CcAllowList empty = {0};

	return allow_current != NULL ? allow_current : &empty;
}

/* Changes every time the setting is assigned (a reload that changed it). */
uint64
cc_allowlist_generation(void)
{
	return allow_generation;
}
