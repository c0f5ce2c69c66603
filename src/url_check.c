/*-------------------------------------------------------------------------
 *
 * url_check.c
 *		The create-time check of endpoint URLs: _check_url and
 *		_check_destination.
 *
 * A URL is judged by the parse the delivery itself makes
 * (cc_http_check_url in http.c: libcurl's URL parser, whose handle the
 * transfer is given), so that what create_endpoint accepts is exactly
 * what the worker connects to; then its host is judged by
 * callback_center.allowed_destinations (allowlist.c) as far as it can be
 * without resolving a name.  The worker judges every connection again, on
 * the resolved address.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"

#include "allowlist.h"
#include "errcodes.h"
#include "http.h"

/* Longest endpoint URL, in characters. */
#define CC_URL_MAX_CHARS 2048

PG_FUNCTION_INFO_V1(cc_check_url);
PG_FUNCTION_INFO_V1(cc_check_destination);

/*
 * Parses url as a delivery would and returns its host (palloc'd), or
 * raises 22023 naming the problem.
 */
static char *
check_url_syntax(const char *url)
{
	char	   *host = NULL;
	const char *detail = NULL;
	int			nchars = pg_mbstrlen(url);

	if (nchars > CC_URL_MAX_CHARS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("url is too long"),
				 errdetail("The url has %d characters; at most %d are allowed.",
						   nchars, CC_URL_MAX_CHARS)));
	switch (cc_http_check_url(url, &host, &detail))
	{
		case CC_URL_OK:
			return host;
		case CC_URL_BAD_CHARS:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("url must not contain whitespace or control characters")));
			break;
		case CC_URL_BAD_SCHEME:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("url \"%s\" must start with http:// or https://", url)));
			break;
		case CC_URL_CREDENTIALS:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("url must not contain credentials"),
					 errhint("Receivers authenticate deliveries by their signature.")));
			break;
		case CC_URL_BAD_HOST:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("url \"%s\" has no valid host", url),
					 detail ? errdetail("libcurl's URL parser says: %s.", detail) : 0));
			break;
	}
	return NULL;				/* not reached */
}

/*
 * Raises CB041 unless host (as libcurl parsed it from a URL) may be
 * delivered to under list (NULL: the setting in force), judged with this
 * host's addresses.
 */
static void
check_destination(const char *host, const CcAllowList *list)
{
	CcIpAddr   *own = NULL;
	int			nown = cc_own_addresses(&own);
	const char *range = NULL;
	int			verdict;

	if (list == NULL)
		list = cc_allowlist_current();
	verdict = cc_allowlist_check_host(list, host, own, Max(nown, 0), &range);
	free(own);
	if (verdict == CC_ALLOW_RESERVED)
		ereport(ERROR,
				(errcode(CC_ERRCODE_DESTINATION_NOT_ALLOWED),
				 errmsg("destination \"%s\" is not allowed", host),
				 errdetail("The address is %s; such addresses are refused unless a network of callback_center.allowed_destinations inside their range lists them.",
						   strcmp(range, "this host") == 0 ? "one of this host's own" :
						   psprintf("in the %s range", range)),
				 errhint("Add the address or its network to callback_center.allowed_destinations and reload.")));
	if (verdict == CC_ALLOW_BAD_IP)
		ereport(ERROR,
				(errcode(CC_ERRCODE_DESTINATION_NOT_ALLOWED),
				 errmsg("destination \"%s\" is not allowed", host),
				 errdetail("The address is in none of the networks of callback_center.allowed_destinations."),
				 errhint("Add the address or its network to callback_center.allowed_destinations and reload.")));
	if (verdict == CC_ALLOW_BAD_NAME)
		ereport(ERROR,
				(errcode(CC_ERRCODE_DESTINATION_NOT_ALLOWED),
				 errmsg("destination \"%s\" is not allowed", host),
				 errdetail("The setting callback_center.allowed_destinations names no such host and lists no networks its addresses could be in."),
				 errhint("Add the host name or its network to callback_center.allowed_destinations and reload.")));
}

/*
 * callback_center._check_url(url text) returns url when it is a URL
 * deliveries may use (an absolute http or https URL with a host and no
 * credentials, at most 2048 characters, as libcurl parses it) whose host
 * callback_center.allowed_destinations allows; raises 22004 for NULL,
 * 22023 naming the problem, or CB041 for a destination not allowed.
 */
Datum
cc_check_url(PG_FUNCTION_ARGS)
{
	text	   *url_t;
	char	   *host;

	cc_require_arg(fcinfo, 0, "url");
	url_t = PG_GETARG_TEXT_PP(0);
	host = check_url_syntax(text_to_cstring(url_t));
	check_destination(host, NULL);
	PG_RETURN_TEXT_P(url_t);
}

/*
 * callback_center._check_destination(url text, allowed text DEFAULT NULL)
 * returns url when its host may be delivered to under the list allowed
 * (NULL: the setting in force), else raises CB041 (22023 for a URL
 * _check_url refuses).  Names are not resolved here: a name that the list
 * does not name is accepted when the list is empty or has networks,
 * because its addresses are judged at every connection.
 */
Datum
cc_check_destination(PG_FUNCTION_ARGS)
{
	text	   *url_t;
	char	   *host;
	CcAllowList *own_list = NULL;

	cc_require_arg(fcinfo, 0, "url");
	url_t = PG_GETARG_TEXT_PP(0);
	host = check_url_syntax(text_to_cstring(url_t));
	if (PG_NARGS() > 1 && !PG_ARGISNULL(1))
	{
		char		err[512];
		char	   *spec = text_to_cstring(PG_GETARG_TEXT_PP(1));

		own_list = cc_allowlist_parse(spec, err, sizeof(err));
		if (own_list == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid destination list \"%s\"", spec),
					 errdetail("%s", err)));
	}
	PG_TRY();
	{
		check_destination(host, own_list ? own_list : cc_allowlist_current());
	}
	PG_FINALLY();
	{
		free(own_list);
	}
	PG_END_TRY();
	PG_RETURN_TEXT_P(url_t);
}
