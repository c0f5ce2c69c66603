/*-------------------------------------------------------------------------
 *
 * adapter.c
 *		Reads the provider requests the claim built (see adapter.h).
 *
 * The text is "METHOD URL\n", one "Name: value\n" per header, an empty
 * line, then the body, byte for byte (the body is what was signed).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "adapter.h"

/*
 * Splits text (len bytes, NUL-terminated at len) into req in place: the
 * method, URL and header lines are NUL-terminated where their newlines
 * were, the body points at the rest.  False with *why when the text is not
 * such a request.
 */
bool
cc_adapter_read_request(char *text, size_t len, CcAdapterRequest *req,
						const char **why)
{
	char	   *p = text;
	char	   *end = text + len;
	char	   *nl;
	char	   *sp;

	memset(req, 0, sizeof(*req));
	nl = memchr(p, '\n', end - p);
	sp = nl ? memchr(p, ' ', nl - p) : NULL;
	if (sp == NULL)
	{
		*why = "the provider request has no request line";
		return false;
	}
	*sp = '\0';
	*nl = '\0';
	if (strcmp(p, "GET") != 0 && strcmp(p, "POST") != 0)
	{
		*why = "the provider request's method is neither GET nor POST";
		return false;
	}
	req->method = p;
	req->url = sp + 1;
	p = nl + 1;
	for (;;)
	{
		nl = memchr(p, '\n', end - p);
		if (nl == NULL)
		{
			*why = "the provider request's headers do not end";
			return false;
		}
		if (nl == p)
			break;
		if (req->nheaders >= CC_ADAPTER_MAX_HEADERS)
		{
			*why = "the provider request has too many headers";
			return false;
		}
		*nl = '\0';
		req->headers[req->nheaders++] = p;
		p = nl + 1;
	}
	req->body = nl + 1;
	req->body_len = end - (nl + 1);
	return true;
}

/*
 * The prefix of the response headers a format's answers are verified with
 * (WeChat Pay's Wechatpay-Timestamp, -Nonce, -Signature, -Serial), or NULL
 * when the signature is in the body (Alipay, UnionPay).
 */
const char *
cc_adapter_capture(const char *format)
{
	if (format != NULL && strcmp(format, "wechatpay_v3") == 0)
		return "Wechatpay-";
	return NULL;
}
