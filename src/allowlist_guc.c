/*-------------------------------------------------------------------------
 *
 * allowlist_guc.c
 *		The callback_center.allowed_destinations setting and the create-time
 *		check of endpoint URLs against it.
 *
 * The setting is parsed once by its check hook (a malformed entry is
 * refused there, so a bad postgresql.conf line keeps the previous list);
 * the parsed list is the GUC's "extra" and is what http.c consults at
 * every new connection.  See allowlist.c for the matching rules.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "allowlist.h"
#include "errcodes.h"

PG_FUNCTION_INFO_V1(cc_check_destination);

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
		GUC_check_errhint("List host names (\"hooks.example.com\", \"*.example.com\"), IP addresses or networks (\"10.0.0.0/8\", \"fd00::/8\"), separated by commas; empty allows every destination.");
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
							   "Comma-separated host names (\"*.example.com\" for any name below a domain), IPv4 or IPv6 addresses and CIDR networks; empty allows every http or https destination.",
							   &cc_allowed_destinations,
							   "",
							   PGC_SIGHUP,
							   0,
							   cc_allowlist_check_hook,
							   cc_allowlist_assign_hook,
							   NULL);
}

/* The list in force (NULL when empty: no restriction). */
const CcAllowList *
cc_allowlist_current(void)
{
	if (allow_current == NULL || allow_current->n == 0)
		return NULL;
	return allow_current;
}

/* Changes every time the setting is assigned (a reload that changed it). */
uint64
cc_allowlist_generation(void)
{
	return allow_generation;
}

/*
 * callback_center._check_destination(url text, allowed text DEFAULT NULL)
 * returns url when its host may be delivered to under the list allowed
 * (NULL: the setting in force), else raises CB041.  url must already have
 * passed _check_url.  Names are not resolved here: a name that the list
 * does not name is accepted when the list has networks, because its
 * addresses are checked at every connection.
 */
Datum
cc_check_destination(PG_FUNCTION_ARGS)
{
	text	   *url_t;
	char	   *url;
	const CcAllowList *list;
	CcAllowList *own = NULL;
	CURLU	   *h;
	char	   *host = NULL;
	char	   *hostcopy;
	int			verdict;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("url must not be null")));
	url_t = PG_GETARG_TEXT_PP(0);
	url = text_to_cstring(url_t);
	if (PG_NARGS() > 1 && !PG_ARGISNULL(1))
	{
		char		err[512];
		char	   *spec = text_to_cstring(PG_GETARG_TEXT_PP(1));

		own = cc_allowlist_parse(spec, err, sizeof(err));
		if (own == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid destination list \"%s\"", spec),
					 errdetail("%s", err)));
		list = own;
	}
	else
		list = cc_allowlist_current();

	if (list == NULL || list->n == 0)
	{
		free(own);
		PG_RETURN_TEXT_P(url_t);
	}

	h = curl_url();
	if (h == NULL ||
		curl_url_set(h, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK ||
		curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK)
	{
		curl_url_cleanup(h);
		free(own);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("url \"%s\" has no valid host", url)));
	}
	hostcopy = pstrdup(host);
	curl_free(host);
	curl_url_cleanup(h);

	verdict = cc_allowlist_check_host(list, hostcopy);
	free(own);
	if (verdict == CC_ALLOW_BAD_IP)
		ereport(ERROR,
				(errcode(CC_ERRCODE_DESTINATION_NOT_ALLOWED),
				 errmsg("destination \"%s\" is not allowed", hostcopy),
				 errdetail("The address is in none of the networks of callback_center.allowed_destinations."),
				 errhint("Add the address or its network to callback_center.allowed_destinations and reload.")));
	if (verdict == CC_ALLOW_BAD_NAME)
		ereport(ERROR,
				(errcode(CC_ERRCODE_DESTINATION_NOT_ALLOWED),
				 errmsg("destination \"%s\" is not allowed", hostcopy),
				 errdetail("The setting callback_center.allowed_destinations names no such host and lists no networks its addresses could be in."),
				 errhint("Add the host name or its network to callback_center.allowed_destinations and reload.")));
	PG_RETURN_TEXT_P(url_t);
}
