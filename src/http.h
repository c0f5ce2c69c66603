/*-------------------------------------------------------------------------
 *
 * http.h
 *		Concurrent HTTP delivery (POST, or GET for the providers' query
 *		APIs) with libcurl's multi interface.
 *
 * http.c knows nothing of SQL: it runs no transaction, uses no SPI and never
 * raises an ERROR for a failed transfer.  Every outcome of a request (status,
 * connection refused, timeout, reset, out of file descriptors) is reported in
 * its CcHttpResult, whose strings are valid text of the database encoding
 * (see sanitize.h).  See doc/http.md.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_HTTP_H
#define CC_HTTP_H

#include "postgres.h"

/* One POST to perform. */
typedef struct CcHttpRequest
{
	int64		tag;			/* caller's id, copied to the result */
	const char *url;			/* http:// or https:// */
	const char *body;			/* request body (need not be NUL-terminated) */
	size_t		body_len;
	const char *const *headers; /* "Name: value" lines, no CR or LF */
	int			nheaders;
	int			timeout_ms;		/* whole transfer; connect gets min(this, 5 s) */
	int			group;			/* endpoint id: per-group concurrency cap */
	const char *method;			/* NULL or "POST": a POST; "GET": a GET
								 * (body ignored) */
	const char *capture;		/* response headers whose name starts with
								 * this (ASCII case-insensitive) are kept in
								 * the result; NULL keeps none */
} CcHttpRequest;

/* The outcome of one request, in the same position as its request. */
typedef struct CcHttpResult
{
	int64		tag;
	int			status;			/* HTTP status; 0 when no response arrived */
	double		latency_ms;		/* from start of the transfer to its end */
	char	   *body;			/* response body as valid text of the database
								 * encoding, at most body_cap bytes, NUL
								 * terminated; NULL when no response */
	bool		truncated;		/* the body was longer than body_cap */
	int			retry_after_s;	/* Retry-After in seconds, -1 if absent */
	char	   *error;			/* NULL when the transfer completed; else a
								 * short message (valid text) */
	int			curl_code;		/* CURLcode, 0 on success */
	char	   *headers;		/* the captured headers of the final
								 * response, "Name: value\n" each, at most
								 * CC_HTTP_CAPTURE_CAP bytes; NULL when none */
} CcHttpResult;

/* Bytes of captured response headers kept at most. */
#define CC_HTTP_CAPTURE_CAP 2048

/* Why a request did not run to completion when should_stop said so. */
#define CC_HTTP_INTERRUPTED "interrupted"

/*
 * The error of a request whose reused connection closed after the request
 * was sent and before any response: libcurl would have sent it again on a
 * fresh connection, silently; it is not (see http_seek_cb).
 */
#define CC_HTTP_NOT_RESENT "connection closed after the request was sent, before any response (not sent again)"

/* The connect timeout never exceeds this. */
#define CC_HTTP_MAX_CONNECT_TIMEOUT_MS 5000

typedef bool (*CcHttpStopFn) (void *arg);

/* Why cc_http_check_url refuses a URL. */
typedef enum CcUrlProblem
{
	CC_URL_OK = 0,
	CC_URL_BAD_CHARS,			/* whitespace or control characters */
	CC_URL_BAD_SCHEME,			/* not http:// or https:// */
	CC_URL_CREDENTIALS,			/* a user name or password */
	CC_URL_BAD_HOST				/* no valid host or port for libcurl */
} CcUrlProblem;

extern void cc_http_init(void);
extern int	cc_http_run(const CcHttpRequest *reqs, int n, CcHttpResult *results,
						int max_concurrent, int max_per_group, int body_cap,
						CcHttpStopFn should_stop, void *arg);
extern int	cc_http_concurrency_limit(int max_concurrent);

/* Stream mode (the delivery pipeline): start each, collect each. */
extern int	cc_http_stream_limit(int max_concurrent, int body_cap);
extern int	cc_http_stream_active(void);
extern bool cc_http_stream_start(const CcHttpRequest *req, CcHttpResult *res);
extern int	cc_http_stream_wait(int timeout_ms, CcHttpResult **done, int max);
extern void cc_http_stream_abandon(void);
extern CcUrlProblem cc_http_check_url(const char *url, char **host,
									  const char **detail);
extern const char *cc_http_url_problem(CcUrlProblem problem);
extern char *cc_http_url_origin(const char *url);

#endif							/* CC_HTTP_H */
