/*-------------------------------------------------------------------------
 *
 * adapter.h
 *		Requests to payment providers' own APIs, as the delivery worker
 *		sends them (the adapter layer; doc/adapters.md).
 *
 * The claim builds each request in SQL (_adapter_request in
 * src/sql/46_adapters.sql: method, URL, headers and body, signed with the
 * merchant's key) and hands it over as one text; this file reads that
 * text.  No SQL, no libcurl.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_ADAPTER_H
#define CC_ADAPTER_H

#include "postgres.h"

/* Header lines a provider request carries at most. */
#define CC_ADAPTER_MAX_HEADERS 8

/* One request to a provider, pointing into the text it was read from. */
typedef struct CcAdapterRequest
{
	const char *method;			/* "GET" or "POST" */
	const char *url;
	const char *headers[CC_ADAPTER_MAX_HEADERS];
	int			nheaders;
	const char *body;
	size_t		body_len;
} CcAdapterRequest;

extern bool cc_adapter_read_request(char *text, size_t len,
									CcAdapterRequest *req, const char **why);
extern const char *cc_adapter_capture(const char *format);

#endif							/* CC_ADAPTER_H */
