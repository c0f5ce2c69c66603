/*-------------------------------------------------------------------------
 *
 * http.c
 *		Concurrent HTTP POST delivery with libcurl's multi interface.
 *
 * The worker claims a batch of outbox events, commits, and hands the batch
 * to cc_http_run(), which POSTs all of it concurrently with no transaction
 * open and no SPI, then returns one result per request.  Nothing here knows
 * of SQL.
 *
 * Why handles are pooled: one CURLM handle and a pool of easy handles live
 * for the life of the process.  The multi handle owns the connection cache,
 * so HTTP/1.1 keep-alive connections opened by one batch are reused by the
 * next one; an easy handle is curl_easy_reset() and reused rather than
 * created per request.  Re-creating them per batch would pay a TCP (and TLS)
 * handshake per request, which on loopback costs about half the throughput.
 *
 * What the caller can rely on:
 *	- every request gets a result; a failed transfer (refused, DNS failure,
 *	  timeout, reset, no file descriptor left) is an error string and a
 *	  CURLcode in its result, never an ERROR;
 *	- at most max_concurrent transfers (and max_per_group per group) run at
 *	  once, and never more than the open-file budget allows;
 *	- should_stop is called at least every CC_HTTP_POLL_MS, so a shutdown or
 *	  a cancel never waits for the slowest request;
 *	- redirects are not followed, only http and https are spoken, no proxy
 *	  is used, TLS peers are verified, request headers are never logged;
 *	- every socket is opened only after callback_center.allowed_destinations
 *	  has judged the very address it connects to (allowlist.c);
 *	- the URL is parsed once, by the parser of the transfer itself (the
 *	  CURLU handle the transfer is given), and cc_http_check_url is that
 *	  parse: what endpoint creation accepts is what is connected to;
 *	- the body and error of every result are valid text of the database
 *	  encoding (sanitize.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "portability/instr_time.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "allowlist.h"
#include "http.h"
#include "sanitize.h"

/* How long one wait for socket activity may last. */
#define CC_HTTP_POLL_MS 100

/* File descriptors left to the rest of the process below the soft limit. */
#define CC_HTTP_FD_MARGIN 64

#define CC_HTTP_USER_AGENT "callback_center/" CC_VERSION

#if LIBCURL_VERSION_NUM < 0x073e00
#error "callback_center needs libcurl 7.62 or later"
#endif

/* One pooled easy handle and the state of the transfer it runs. */
typedef struct HttpSlot
{
	CURL	   *easy;
	int			slotno;			/* its index in http_slots */
	int			req;			/* index of its request, -1 when idle */
	struct curl_slist *headers; /* this transfer's header list */
	char	   *buf;			/* malloc'd response buffer, bufcap + 1 */
	size_t		bufcap;
	size_t		len;			/* bytes kept in buf */
	size_t		cap;			/* body_cap of the current run */
	bool		truncated;
	int			retry_after_s;
	const char *capture;		/* header name prefix to keep, or NULL */
	size_t		capture_len;
	char		hdrbuf[CC_HTTP_CAPTURE_CAP];	/* captured headers */
	size_t		hdrlen;
	instr_time	started;
	char		errbuf[CURL_ERROR_SIZE];
	const char *body;			/* the current request's body */
	size_t		body_len;
	size_t		body_off;		/* bytes of it handed to libcurl */
	bool		resend_refused; /* libcurl wanted to send it again */
	CcHttpResult *result;		/* stream mode: where its outcome goes */
	CURLU	   *curlu;			/* the current transfer's parsed URL */
	char	   *host;			/* its host (libcurl's string) */
	char		blocked[INET6_ADDRSTRLEN + 32]; /* address refused by the
												 * allowlist and its range,
												 * or "" */
} HttpSlot;

/* State of one cc_http_run() call. */
typedef struct HttpRun
{
	const CcHttpRequest *reqs;
	CcHttpResult *results;
	bool	   *done;			/* result filled in */
	int			n;
	int			limit;			/* transfers at once */
	int			per_group;		/* transfers at once per group */
	int			ngroups;
	int		   *group_of;		/* request -> dense group index */
	int		   *next_in_group;	/* request -> next request of its group */
	int		   *group_head;		/* group -> first pending request, or -1 */
	int		   *group_active;	/* group -> transfers running */
	bool	   *in_ring;		/* group is in the ring */
	int		   *ring;			/* groups that may start a transfer now */
	int			ring_head;
	int			ring_len;
	int		   *free_slots;		/* stack of idle slot numbers */
	int			nfree;
	int			active;
	int			completed;
} HttpRun;

static bool http_initialized = false;
static CURLM *http_multi = NULL;
static HttpSlot **http_slots = NULL;
static int	http_nslots = 0;
static int	http_maxconnects = 0;
static uint64 http_allow_generation = 0;
static CcIpAddr *http_own = NULL;	/* this host's addresses (malloc'd) */
static int	http_nown = 0;

static sigset_t http_perform_mask;

static void cc_http_cleanup(int code, Datum arg);

/*
 * Initialises libcurl in the calling process (a backend or the worker, never
 * the postmaster) once, and registers its cleanup at process exit.  Calling
 * it again is a no-op.  Raises an ERROR only when libcurl cannot start.
 */
void
cc_http_init(void)
{
	CURLcode	rc;

	if (http_initialized)
		return;
	if (IsPostmasterEnvironment && !IsUnderPostmaster)
		elog(ERROR, "cc_http_init called in the postmaster");

	rc = curl_global_init(CURL_GLOBAL_DEFAULT);
	if (rc != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_SYSTEM_ERROR),
				 errmsg("could not initialize libcurl: %s",
						curl_easy_strerror(rc))));
	http_multi = curl_multi_init();
	if (http_multi == NULL)
	{
		curl_global_cleanup();
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
	}
	/*
	 * libcurl's threaded resolver starts threads inside curl_multi_perform;
	 * they inherit the signal mask, and blocking the asynchronous signals
	 * there keeps PostgreSQL's handlers from ever running on those threads.
	 */
	sigfillset(&http_perform_mask);
	sigdelset(&http_perform_mask, SIGSEGV);
	sigdelset(&http_perform_mask, SIGBUS);
	sigdelset(&http_perform_mask, SIGFPE);
	sigdelset(&http_perform_mask, SIGILL);
	sigdelset(&http_perform_mask, SIGABRT);

	http_initialized = true;
	on_proc_exit(cc_http_cleanup, (Datum) 0);
}

/*
 * Releases every handle and connection at process exit.
 */
static void
cc_http_cleanup(int code, Datum arg)
{
	int			i;

	if (!http_initialized)
		return;
	for (i = 0; i < http_nslots; i++)
	{
		HttpSlot   *slot = http_slots[i];

		if (slot->req >= 0)
			curl_multi_remove_handle(http_multi, slot->easy);
		curl_slist_free_all(slot->headers);
		slot->headers = NULL;
		curl_url_cleanup(slot->curlu);
		slot->curlu = NULL;
		curl_free(slot->host);
		slot->host = NULL;
	}
	curl_multi_cleanup(http_multi);
	for (i = 0; i < http_nslots; i++)
	{
		curl_easy_cleanup(http_slots[i]->easy);
		free(http_slots[i]->buf);
	}
	http_multi = NULL;
	http_nslots = 0;
	curl_global_cleanup();
	http_initialized = false;
}

/*
 * The number of transfers cc_http_run() will actually run at once for a
 * requested max_concurrent: never more than the open-file soft limit minus a
 * margin, nor more than the share of descriptors PostgreSQL lets a process
 * hold outside its own file cache (max_safe_fds / 3, AcquireExternalFD), and
 * at least 1.
 */
int
cc_http_concurrency_limit(int max_concurrent)
{
	struct rlimit rl;
	int			limit = max_concurrent;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
		(rlim_t) limit > rl.rlim_cur - Min(rl.rlim_cur, CC_HTTP_FD_MARGIN))
		limit = (int) (rl.rlim_cur - Min(rl.rlim_cur, CC_HTTP_FD_MARGIN));
	if (max_safe_fds > 0 && limit > max_safe_fds / 3 - 8)
		limit = max_safe_fds / 3 - 8;
	return Max(limit, 1);
}

/*
 * Parses url with libcurl's URL parser, the one the transfer uses, and
 * returns the handle (to be given to the transfer) when the URL is one
 * deliveries may use: no space or control character, "http://" or
 * "https://" (any case) and an authority, no user name or password, a
 * host, a port (when given) of 1 to 65535.  Else NULL with *problem set,
 * and libcurl's reason (a static string) in *detail when it refused.
 * malloc only: runs from a backend or inside the worker's HTTP loop.
 */
static CURLU *
http_parse_url(const char *url, CcUrlProblem *problem, const char **detail)
{
	CURLU	   *h;
	CURLUcode	rc;
	char	   *part = NULL;
	const char *p;
	size_t		skip;

	*detail = NULL;
	for (p = url; *p; p++)
		if ((unsigned char) *p <= ' ' || (unsigned char) *p == 0x7f)
		{
			*problem = CC_URL_BAD_CHARS;
			return NULL;
		}
	if (pg_strncasecmp(url, "http://", 7) == 0)
		skip = 7;
	else if (pg_strncasecmp(url, "https://", 8) == 0)
		skip = 8;
	else
	{
		*problem = CC_URL_BAD_SCHEME;
		return NULL;
	}
	/* "https:///x" is host "x" to libcurl: refuse an empty authority. */
	if (url[skip] == '/' || url[skip] == '\\' || url[skip] == '\0')
	{
		*problem = CC_URL_BAD_HOST;
		return NULL;
	}
	h = curl_url();
	if (h == NULL)
	{
		*problem = CC_URL_BAD_HOST;
		*detail = "out of memory";
		return NULL;
	}
	*problem = CC_URL_BAD_HOST;
	rc = curl_url_set(h, CURLUPART_URL, url, 0);
	if (rc != CURLUE_OK)
	{
#if LIBCURL_VERSION_NUM >= 0x075000
		*detail = curl_url_strerror(rc);
#endif
		goto refuse;
	}
	if (curl_url_get(h, CURLUPART_USER, &part, 0) == CURLUE_OK ||
		curl_url_get(h, CURLUPART_PASSWORD, &part, 0) == CURLUE_OK)
	{
		*problem = CC_URL_CREDENTIALS;
		goto refuse;
	}
	if (curl_url_get(h, CURLUPART_HOST, &part, 0) != CURLUE_OK ||
		part[0] == '\0')
		goto refuse;
	curl_free(part);
	part = NULL;
	if (curl_url_get(h, CURLUPART_PORT, &part, 0) == CURLUE_OK)
	{
		long		port = strtol(part, NULL, 10);

		if (port < 1 || port > 65535)
			goto refuse;
	}
	curl_free(part);
	*problem = CC_URL_OK;
	return h;

refuse:
	curl_free(part);
	curl_url_cleanup(h);
	return NULL;
}

/*
 * Whether url is one cc_http_run() may be given, by the very parse the
 * transfer makes (http_parse_url): CC_URL_OK, with the host as libcurl
 * connects to it (IPv4 forms normalised, IPv6 in brackets) palloc'd in
 * *host when host is not NULL; else the problem, and libcurl's reason in
 * *detail when it gave one (NULL otherwise).
 */
CcUrlProblem
cc_http_check_url(const char *url, char **host, const char **detail)
{
	CcUrlProblem problem;
	const char *why;
	CURLU	   *h = http_parse_url(url, &problem, &why);

	if (detail != NULL)
		*detail = why;
	if (h != NULL && host != NULL)
	{
		char	   *part = NULL;

		if (curl_url_get(h, CURLUPART_HOST, &part, 0) == CURLUE_OK)
		{
			/* copy after libcurl's string is freed: pstrdup may ERROR */
			char	   *copy = strdup(part);

			curl_free(part);
			curl_url_cleanup(h);
			if (copy == NULL)
				elog(ERROR, "out of memory");
			*host = pstrdup(copy);
			free(copy);
			return problem;
		}
		problem = CC_URL_BAD_HOST;
	}
	curl_url_cleanup(h);
	return problem;
}

/* A short reason for a CcUrlProblem. */
const char *
cc_http_url_problem(CcUrlProblem problem)
{
	switch (problem)
	{
		case CC_URL_OK:
			return "valid";
		case CC_URL_BAD_CHARS:
			return "whitespace or control characters";
		case CC_URL_BAD_SCHEME:
			return "scheme is not http or https";
		case CC_URL_CREDENTIALS:
			return "credentials in the URL";
		case CC_URL_BAD_HOST:
			return "no valid host";
	}
	return "invalid";
}

/*
 * Returns "scheme://host:port" of an URL cc_http_check_url accepts (the
 * port made explicit), palloc'd, or NULL for any other URL.  Requests to one
 * origin share connections; callers group by it.
 */
char *
cc_http_url_origin(const char *url)
{
	CURLU	   *h;
	char	   *scheme = NULL;
	char	   *host = NULL;
	char	   *port = NULL;
	char	   *origin = NULL;

	h = curl_url();
	if (h == NULL)
		return NULL;
	if (curl_url_set(h, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK &&
		curl_url_get(h, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		curl_url_get(h, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
		curl_url_get(h, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK)
	{
		/* copy into palloc'd memory only after libcurl's is freed below */
		origin = malloc(strlen(scheme) + strlen(host) + strlen(port) + 5);
		if (origin != NULL)
			sprintf(origin, "%s://%s:%s", scheme, host, port);
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(h);
	if (origin != NULL)
	{
		char	   *result = pstrdup(origin);

		free(origin);
		return result;
	}
	return NULL;
}

/*
 * Whether callback_center.allowed_destinations lets slot's transfer connect
 * to address (cc_allowlist_decide: the address, its range, the URL's
 * host); when not, says which address and range in slot->blocked.  Runs
 * inside libcurl: no palloc, no ERROR.
 */
static bool
http_destination_allowed(HttpSlot *slot, struct curl_sockaddr *address)
{
	CcIpAddr	ip;
	const char *range = NULL;
	const void *a;
	size_t		len;

	if (cc_ip_from_sockaddr(&address->addr, &ip) &&
		cc_allowlist_decide(cc_allowlist_current(), slot->host, &ip,
							http_own, http_nown, &range) == CC_ALLOW_OK)
		return true;

	if (address->family == AF_INET6)
		a = &((struct sockaddr_in6 *) &address->addr)->sin6_addr;
	else
		a = &((struct sockaddr_in *) &address->addr)->sin_addr;
	if (inet_ntop(address->family, a, slot->blocked,
				  INET6_ADDRSTRLEN) == NULL)
		strlcpy(slot->blocked, "address", sizeof(slot->blocked));
	len = strlen(slot->blocked);
	if (range != NULL)
		snprintf(slot->blocked + len, sizeof(slot->blocked) - len,
				 " (%s)", range);
	return false;
}

/*
 * Opens a socket for libcurl only when callback_center.allowed_destinations
 * allows the address (checked here, after DNS, so that no name can lead
 * elsewhere) and PostgreSQL's descriptor budget allows it, so that curl
 * never starves the backend of files; a refusal fails that one transfer
 * (errno EACCES or EMFILE) and nothing else.
 */
static curl_socket_t
http_open_socket(void *clientp, curlsocktype purpose,
				 struct curl_sockaddr *address)
{
	curl_socket_t s;
	int			save_errno;

	if (clientp != NULL && !http_destination_allowed((HttpSlot *) clientp, address))
	{
		errno = EACCES;
		return CURL_SOCKET_BAD;
	}
	if (!AcquireExternalFD())
	{
		errno = EMFILE;
		return CURL_SOCKET_BAD;
	}
	s = socket(address->family, address->socktype, address->protocol);
	if (s == CURL_SOCKET_BAD)
	{
		save_errno = errno;
		ReleaseExternalFD();
		errno = save_errno;
	}
	return s;
}

/* Closes a socket opened by http_open_socket and returns its budget. */
static int
http_close_socket(void *clientp, curl_socket_t item)
{
	int			rc = close(item);

	ReleaseExternalFD();
	return rc;
}

/*
 * Keeps at most slot->cap bytes of the response body and discards the rest,
 * noting the truncation.  Never fails the transfer; never allocates through
 * palloc (no ERROR may escape into libcurl).
 */
static size_t
http_write_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
	HttpSlot   *slot = (HttpSlot *) userdata;
	size_t		len = size * nmemb;
	size_t		take = Min(len, slot->cap - slot->len);

	if (take < len)
		slot->truncated = true;
	if (take == 0)
		return len;
	if (slot->len + take > slot->bufcap)
	{
		size_t		newcap = Max(slot->bufcap * 2, 1024);
		char	   *nb;

		while (newcap < slot->len + take)
			newcap *= 2;
		newcap = Min(newcap, slot->cap);
		nb = realloc(slot->buf, newcap + 1);
		if (nb == NULL)
		{
			slot->truncated = true;
			take = slot->bufcap - slot->len;
		}
		else
		{
			slot->buf = nb;
			slot->bufcap = newcap;
		}
	}
	if (take > 0)
	{
		memcpy(slot->buf + slot->len, data, take);
		slot->len += take;
	}
	return len;
}

/*
 * Hands libcurl the request body.  The body goes through this callback
 * rather than CURLOPT_POSTFIELDS so that libcurl has to ask
 * http_seek_cb before it sends it a second time (below).
 */
static size_t
http_read_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	HttpSlot   *slot = (HttpSlot *) userdata;
	size_t		take = Min(size * nitems, slot->body_len - slot->body_off);

	if (take > 0)
	{
		memcpy(buffer, slot->body + slot->body_off, take);
		slot->body_off += take;
	}
	return take;
}

/*
 * libcurl re-sends a request on a fresh connection, without telling its
 * caller, when a reused connection closes before any byte of the response
 * arrived ("Connection died, retrying a fresh connect").  The receiver may
 * have read and acted on the first copy (a reset after reading, a crash),
 * so a body that was sent is never sent again within one transfer: libcurl
 * must rewind the body first, and this refuses, which fails the transfer
 * (CURLE_SEND_FAIL_REWIND).  The worker records that as the attempt it
 * was and retries on the endpoint's schedule.  A connection that died
 * before any of the body was sent is still retried by libcurl: the
 * receiver cannot have acted on a request it did not get whole.
 */
static int
http_seek_cb(void *userdata, curl_off_t offset, int origin)
{
	HttpSlot   *slot = (HttpSlot *) userdata;

	if (origin == SEEK_SET && offset == 0 && slot->body_off == 0)
		return CURL_SEEKFUNC_OK;
	slot->resend_refused = true;
	return CURL_SEEKFUNC_FAIL;
}

/*
 * Parses a Retry-After value: delta-seconds or an HTTP-date (seconds from
 * now, at least 0).  Returns -1 when unparsable.
 */
static int
http_parse_retry_after(const char *value, size_t len)
{
	char		copy[128];
	char	   *p;
	char	   *end;

	while (len > 0 && (*value == ' ' || *value == '\t'))
		value++, len--;
	while (len > 0 && (value[len - 1] == '\r' || value[len - 1] == '\n' ||
					   value[len - 1] == ' ' || value[len - 1] == '\t'))
		len--;
	if (len == 0 || len >= sizeof(copy))
		return -1;
	memcpy(copy, value, len);
	copy[len] = '\0';

	if (copy[0] >= '0' && copy[0] <= '9')
	{
		long		v;

		for (p = copy; *p; p++)
			if (*p < '0' || *p > '9')
				return -1;
		errno = 0;
		v = strtol(copy, &end, 10);
		if (errno == ERANGE || v > PG_INT32_MAX)
			return PG_INT32_MAX;
		return (int) v;
	}
	else
	{
		time_t		when = curl_getdate(copy, NULL);
		time_t		now = time(NULL);

		if (when == -1)
			return -1;
		if (when <= now)
			return 0;
		if (when - now > PG_INT32_MAX)
			return PG_INT32_MAX;
		return (int) (when - now);
	}
}

/*
 * Notes Retry-After of the final response (a new status line forgets what
 * an interim response said).  Never fails the transfer.
 */
static size_t
http_header_cb(char *data, size_t size, size_t nitems, void *userdata)
{
	HttpSlot   *slot = (HttpSlot *) userdata;
	size_t		len = size * nitems;

	if (len >= 5 && strncmp(data, "HTTP/", 5) == 0)
	{
		slot->retry_after_s = -1;
		slot->hdrlen = 0;
	}
	else if (len > 12 && pg_strncasecmp(data, "retry-after:", 12) == 0)
		slot->retry_after_s = http_parse_retry_after(data + 12, len - 12);
	else if (slot->capture != NULL && len > slot->capture_len &&
			 pg_strncasecmp(data, slot->capture, slot->capture_len) == 0)
	{
		size_t		keep = len;

		/* One line each, without its CR LF; what does not fit is dropped. */
		while (keep > 0 && (data[keep - 1] == '\r' || data[keep - 1] == '\n'))
			keep--;
		if (slot->hdrlen + keep + 1 <= sizeof(slot->hdrbuf))
		{
			memcpy(slot->hdrbuf + slot->hdrlen, data, keep);
			slot->hdrlen += keep;
			slot->hdrbuf[slot->hdrlen++] = '\n';
		}
	}
	return len;
}

/*
 * Makes sure the pool holds at least want easy handles; returns how many it
 * holds (fewer when libcurl runs out of memory).
 */
static int
http_grow_pool(int want)
{
	if (want <= http_nslots)
		return http_nslots;
	if (http_slots == NULL)
		http_slots = MemoryContextAllocZero(TopMemoryContext,
											sizeof(HttpSlot *) * want);
	else
		http_slots = repalloc(http_slots, sizeof(HttpSlot *) * want);
	while (http_nslots < want)
	{
		HttpSlot   *slot;
		CURL	   *easy = curl_easy_init();

		if (easy == NULL)
			break;
		slot = MemoryContextAllocZero(TopMemoryContext, sizeof(HttpSlot));
		slot->easy = easy;
		slot->slotno = http_nslots;
		slot->req = -1;
		http_slots[http_nslots++] = slot;
	}
	return http_nslots;
}

/* cc_sanitize_text's check for a database encoding other than UTF8. */
static int
http_encoding_char(const unsigned char *s, size_t len, void *arg)
{
	int			encoding = *(int *) arg;
	int			l = pg_encoding_mblen(encoding, (const char *) s);

	if ((size_t) l > len)
		return 0;
	l = pg_encoding_verifymbchar(encoding, (const char *) s, (int) len);
	return l > 0 ? l : -1;
}

/*
 * Returns the len bytes at s as valid text of the database encoding (see
 * sanitize.c), palloc'd, at most cap bytes; cut says s was already cut
 * short.  Sets *shortened when anything was left out.
 */
static char *
http_text(const char *s, size_t len, size_t cap, bool cut, bool *shortened)
{
	int			encoding = GetDatabaseEncoding();
	char	   *out;
	int			flags = 0;

	/* no more than the output can need: every byte a 3-byte U+FFFD */
	cap = Min(cap, len * 3);
	out = palloc(cap + 1);

	if (encoding == PG_UTF8)
		cc_sanitize_text(s, len, cut, out, cap, cc_utf8_char, NULL,
						 CC_UTF8_REPLACEMENT, &flags);
	else
		cc_sanitize_text(s, len, cut, out, cap, http_encoding_char,
						 &encoding, "?", &flags);
	if (shortened != NULL)
		*shortened = (flags & CC_TEXT_SHORTENED) != 0;
	return out;
}

/* An error message (libcurl's, or ours around a peer's) as valid text. */
static char *
http_error_text(const char *msg)
{
	size_t		len = strlen(msg);

	return http_text(msg, len, len * 3, false, NULL);
}

/* Fills a result for a request that failed before or without a transfer. */
static void
http_fail(HttpRun *run, int r, int code, const char *msg)
{
	CcHttpResult *res = &run->results[r];

	res->status = 0;
	res->error = http_error_text(msg);
	res->curl_code = code;
	run->done[r] = true;
	run->completed++;
}

/* Appends a group to the ring of groups that may start a transfer. */
static void
http_ring_push(HttpRun *run, int g)
{
	run->ring[(run->ring_head + run->ring_len) % run->ngroups] = g;
	run->ring_len++;
	run->in_ring[g] = true;
}

/* Whether group g has pending requests and room for one more transfer. */
static inline bool
http_group_ready(HttpRun *run, int g)
{
	return run->group_head[g] >= 0 && run->group_active[g] < run->per_group;
}

/* Frees the parsed URL of slot's transfer. */
static void
http_drop_url(HttpSlot *slot)
{
	curl_url_cleanup(slot->curlu);
	slot->curlu = NULL;
	curl_free(slot->host);
	slot->host = NULL;
}

#define SETOPT(opt, val) \
	do { \
		if ((rc = curl_easy_setopt(easy, (opt), (val))) != CURLE_OK) \
			goto setopt_failed; \
	} while (0)

/*
 * Sets up req on the idle slot and attaches it to the multi handle; with
 * fresh, on a new connection.  Returns CURLE_OK, or the reason it could not
 * start with a message in msg (msglen bytes): the slot is idle again then.
 */
static CURLcode
http_setup(HttpSlot *slot, const CcHttpRequest *req, bool fresh,
		   char *msg, size_t msglen)
{
	CURL	   *easy = slot->easy;
	CURLcode	rc;
	CURLMcode	mrc;
	struct curl_slist *list = NULL;
	bool		has_type = false;
	int			i;

	if (req->url == NULL)
	{
		strlcpy(msg, "no URL", msglen);
		return CURLE_URL_MALFORMAT;
	}

	/* The one parse of the URL: the transfer is given this handle. */
	{
		CcUrlProblem problem;
		const char *detail;
		CURLU	   *h = http_parse_url(req->url, &problem, &detail);
		char	   *host = NULL;

		if (h == NULL || curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK)
		{
			curl_url_cleanup(h);
			snprintf(msg, msglen, "invalid URL: %s%s%s",
					 cc_http_url_problem(h ? CC_URL_BAD_HOST : problem),
					 detail ? ": " : "", detail ? detail : "");
			return CURLE_URL_MALFORMAT;
		}
		slot->curlu = h;
		slot->host = host;
	}

	/* Caller's headers, then the ones every delivery carries. */
	for (i = 0; i < req->nheaders; i++)
	{
		const char *h = req->headers[i];
		struct curl_slist *nl;

		if (h == NULL || strpbrk(h, "\r\n") != NULL || strchr(h, ':') == NULL)
		{
			curl_slist_free_all(list);
			http_drop_url(slot);
			strlcpy(msg, "invalid request header", msglen);
			return CURLE_BAD_FUNCTION_ARGUMENT;
		}
		if (pg_strncasecmp(h, "content-type:", 13) == 0)
			has_type = true;
		nl = curl_slist_append(list, h);
		if (nl == NULL)
			goto oom;
		list = nl;
	}
	if (!has_type)
	{
		struct curl_slist *nl = curl_slist_append(list,
												  "Content-Type: application/json");

		if (nl == NULL)
			goto oom;
		list = nl;
	}
	{
		/* An empty "Expect:" stops curl from waiting for 100-continue. */
		struct curl_slist *nl = curl_slist_append(list, "Expect:");

		if (nl == NULL)
			goto oom;
		list = nl;
	}

	curl_easy_reset(easy);
	slot->errbuf[0] = '\0';
	slot->len = 0;
	slot->truncated = false;
	slot->retry_after_s = -1;
	slot->blocked[0] = '\0';
	slot->capture = req->capture;
	slot->capture_len = req->capture ? strlen(req->capture) : 0;
	slot->hdrlen = 0;

	SETOPT(CURLOPT_CURLU, slot->curlu);
	if (req->method != NULL && strcmp(req->method, "GET") == 0)
		SETOPT(CURLOPT_HTTPGET, 1L);
	else
		SETOPT(CURLOPT_POST, 1L);
	slot->body = req->body ? req->body : "";
	slot->body_len = req->body ? req->body_len : 0;
	slot->body_off = 0;
	slot->resend_refused = false;
	SETOPT(CURLOPT_READFUNCTION, http_read_cb);
	SETOPT(CURLOPT_READDATA, slot);
	SETOPT(CURLOPT_SEEKFUNCTION, http_seek_cb);
	SETOPT(CURLOPT_SEEKDATA, slot);
	SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) slot->body_len);
	SETOPT(CURLOPT_HTTPHEADER, list);
	SETOPT(CURLOPT_USERAGENT, CC_HTTP_USER_AGENT);
	SETOPT(CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_1_1);
#if LIBCURL_VERSION_NUM >= 0x075500
	SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
	SETOPT(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
	SETOPT(CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
	SETOPT(CURLOPT_REDIR_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	SETOPT(CURLOPT_FOLLOWLOCATION, 0L);

	/*
	 * No proxy, not even from http_proxy and the like in the environment:
	 * the allowlist must judge the destination's address, not a proxy's.
	 */
	SETOPT(CURLOPT_PROXY, "");
	SETOPT(CURLOPT_NOSIGNAL, 1L);
	SETOPT(CURLOPT_TCP_KEEPALIVE, 1L);
	SETOPT(CURLOPT_TIMEOUT_MS, (long) Max(req->timeout_ms, 1));
	SETOPT(CURLOPT_CONNECTTIMEOUT_MS,
		   (long) Min(Max(req->timeout_ms, 1), CC_HTTP_MAX_CONNECT_TIMEOUT_MS));
	SETOPT(CURLOPT_WRITEFUNCTION, http_write_cb);
	SETOPT(CURLOPT_WRITEDATA, slot);
	SETOPT(CURLOPT_HEADERFUNCTION, http_header_cb);
	SETOPT(CURLOPT_HEADERDATA, slot);
	SETOPT(CURLOPT_ERRORBUFFER, slot->errbuf);
	SETOPT(CURLOPT_OPENSOCKETFUNCTION, http_open_socket);
	SETOPT(CURLOPT_OPENSOCKETDATA, slot);
	SETOPT(CURLOPT_CLOSESOCKETFUNCTION, http_close_socket);
	SETOPT(CURLOPT_PRIVATE, slot);
	if (fresh)
		SETOPT(CURLOPT_FRESH_CONNECT, 1L);

	mrc = curl_multi_add_handle(http_multi, easy);
	if (mrc != CURLM_OK)
	{
		curl_slist_free_all(list);
		http_drop_url(slot);
		strlcpy(msg, curl_multi_strerror(mrc), msglen);
		return CURLE_FAILED_INIT;
	}
	slot->headers = list;
	INSTR_TIME_SET_CURRENT(slot->started);
	return CURLE_OK;

setopt_failed:
	curl_slist_free_all(list);
	http_drop_url(slot);
	strlcpy(msg, curl_easy_strerror(rc), msglen);
	return rc;

oom:
	curl_slist_free_all(list);
	http_drop_url(slot);
	strlcpy(msg, "out of memory", msglen);
	return CURLE_OUT_OF_MEMORY;
}

/*
 * Starts request r on an idle slot, or fills in its result with the reason
 * it could not start.
 */
static void
http_start(HttpRun *run, int r)
{
	HttpSlot   *slot;
	CURLcode	rc;
	char		msg[256];

	Assert(run->nfree > 0);
	slot = http_slots[run->free_slots[run->nfree - 1]];
	rc = http_setup(slot, &run->reqs[r], false, msg, sizeof(msg));
	if (rc != CURLE_OK)
	{
		http_fail(run, r, rc, msg);
		return;
	}
	slot->req = r;
	run->nfree--;
	run->active++;
	run->group_active[run->group_of[r]]++;
}

/*
 * Starts transfers while the global and per-group caps allow, taking groups
 * round robin and each group's requests in order.
 */
static void
http_start_more(HttpRun *run)
{
	while (run->active < run->limit && run->ring_len > 0)
	{
		int			g = run->ring[run->ring_head];
		int			r = run->group_head[g];

		run->ring_head = (run->ring_head + 1) % run->ngroups;
		run->ring_len--;
		run->in_ring[g] = false;

		run->group_head[g] = run->next_in_group[r];
		http_start(run, r);
		if (http_group_ready(run, g))
			http_ring_push(run, g);
	}
}

/*
 * Detaches a slot from its transfer: removes the handle from the multi
 * handle, frees the header list, returns the slot to the idle stack and
 * updates the caps.  Returns the request index it ran.
 */
static int
http_release(HttpRun *run, HttpSlot *slot)
{
	int			r = slot->req;
	int			g = run->group_of[r];

	curl_multi_remove_handle(http_multi, slot->easy);
	curl_slist_free_all(slot->headers);
	slot->headers = NULL;
	http_drop_url(slot);
	slot->req = -1;
	run->free_slots[run->nfree++] = slot->slotno;
	run->active--;
	run->group_active[g]--;
	if (!run->in_ring[g] && http_group_ready(run, g))
		http_ring_push(run, g);
	return r;
}

/*
 * Fills res with the outcome of slot's finished transfer (status, latency,
 * body, error), palloc'd in the current memory context.  The slot must
 * still hold its transfer's state (call before the slot is reused).
 */
static void
http_fill_result(HttpSlot *slot, CcHttpResult *res, CURLcode code,
				 long status, curl_off_t total_us)
{
	res->status = (int) status;
	res->latency_ms = total_us / 1000.0;
	res->curl_code = code;
	if (status > 0)
	{
		bool		shortened;

		res->body = http_text(slot->buf ? slot->buf : "", slot->len,
							  slot->cap, slot->truncated, &shortened);
		res->truncated = slot->truncated || shortened;
		res->retry_after_s = slot->retry_after_s;
		if (slot->hdrlen > 0)
			res->headers = http_text(slot->hdrbuf, slot->hdrlen,
									 slot->hdrlen, false, NULL);
	}
	if (code != CURLE_OK && slot->resend_refused)
		res->error = http_error_text(CC_HTTP_NOT_RESENT);
	else if (code != CURLE_OK && slot->blocked[0] != '\0')
	{
		char		msg[256];

		snprintf(msg, sizeof(msg),
				 "destination not allowed: %s is not in callback_center.allowed_destinations",
				 slot->blocked);
		res->error = http_error_text(msg);
	}
	else if (code != CURLE_OK)
		res->error = http_error_text(slot->errbuf[0] ? slot->errbuf :
									 curl_easy_strerror(code));
}

/* Records the outcome of a finished transfer and frees its slot. */
static void
http_finish(HttpRun *run, CURL *easy, CURLcode code)
{
	HttpSlot   *slot = NULL;
	long		status = 0;
	curl_off_t	total_us = 0;
	int			r;

	curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &slot);
	if (slot == NULL || slot->req < 0)
		elog(ERROR, "libcurl reported a transfer callback_center did not start");
	curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_getinfo(easy, CURLINFO_TOTAL_TIME_T, &total_us);

	r = http_release(run, slot);
	http_fill_result(slot, &run->results[r], code, status, total_us);
	run->done[r] = true;
	run->completed++;
}

/*
 * Abandons every running transfer: their results say msg (status 0) unless
 * msg is NULL (error cleanup: the results are not touched).
 */
static void
http_abort_all(HttpRun *run, int code, const char *msg)
{
	int			i;

	for (i = 0; i < http_nslots; i++)
	{
		HttpSlot   *slot = http_slots[i];
		instr_time	now;
		int			r;

		if (slot->req < 0)
			continue;
		r = http_release(run, slot);
		if (msg == NULL)
			continue;
		INSTR_TIME_SET_CURRENT(now);
		INSTR_TIME_SUBTRACT(now, slot->started);
		run->results[r].latency_ms = INSTR_TIME_GET_MILLISEC(now);
		run->results[r].error = http_error_text(msg);
		run->results[r].curl_code = code;
		if (code != CURLE_ABORTED_BY_CALLBACK)
		{
			run->done[r] = true;
			run->completed++;
		}
	}
}

/* qsort comparator: requests by group, then by position. */
static const CcHttpRequest *http_sort_reqs;

static int
http_cmp_group(const void *a, const void *b)
{
	int			ia = *(const int *) a;
	int			ib = *(const int *) b;
	int			ga = http_sort_reqs[ia].group;
	int			gb = http_sort_reqs[ib].group;

	if (ga != gb)
		return ga < gb ? -1 : 1;
	return ia < ib ? -1 : (ia > ib ? 1 : 0);
}

/*
 * Sets up the groups: a dense index per distinct group, each group's
 * requests linked in order, and every group in the ring.
 */
static void
http_plan_groups(HttpRun *run)
{
	int			n = run->n;
	int		   *order = palloc(sizeof(int) * n);
	int			i;
	int			g = -1;
	int			prev = -1;

	for (i = 0; i < n; i++)
		order[i] = i;
	http_sort_reqs = run->reqs;
	qsort(order, n, sizeof(int), http_cmp_group);

	run->group_of = palloc(sizeof(int) * n);
	run->next_in_group = palloc(sizeof(int) * n);
	run->group_head = palloc(sizeof(int) * n);
	for (i = 0; i < n; i++)
	{
		int			r = order[i];

		if (i == 0 || run->reqs[r].group != run->reqs[order[i - 1]].group)
		{
			g++;
			run->group_head[g] = r;
		}
		else
			run->next_in_group[prev] = r;
		run->group_of[r] = g;
		run->next_in_group[r] = -1;
		prev = r;
	}
	run->ngroups = g + 1;
	run->group_active = palloc0(sizeof(int) * run->ngroups);
	run->in_ring = palloc0(sizeof(bool) * run->ngroups);
	run->ring = palloc(sizeof(int) * run->ngroups);
	run->ring_head = 0;
	run->ring_len = 0;
	for (g = 0; g < run->ngroups; g++)
		http_ring_push(run, g);
	pfree(order);
}

/* Frees what cc_http_run allocated for itself. */
static void
http_free_run(HttpRun *run)
{
	pfree(run->done);
	pfree(run->group_of);
	pfree(run->next_in_group);
	pfree(run->group_head);
	pfree(run->group_active);
	pfree(run->in_ring);
	pfree(run->ring);
	pfree(run->free_slots);
}

/*
 * POSTs the n requests concurrently and fills results[i] for reqs[i].
 *
 * Runs at most max_concurrent transfers at once (see
 * cc_http_concurrency_limit) and at most max_per_group of one group
 * (max_per_group <= 0: no group cap).  Keeps at most body_cap bytes of each
 * response body.  Calls should_stop (when not NULL) between waits of at most
 * CC_HTTP_POLL_MS; when it returns true, abandons the transfers in flight and
 * those not started, whose results say error "interrupted" and status 0.
 * Returns the number of requests that ran to an outcome (any status or
 * transfer error), that is n unless stopped.
 *
 * Strings in results are palloc'd in the caller's memory context.  A failed
 * transfer is never an ERROR; an ERROR (out of memory, or raised by
 * should_stop) leaves libcurl clean before it propagates.
 */
int
cc_http_run(const CcHttpRequest *reqs, int n, CcHttpResult *results,
			int max_concurrent, int max_per_group, int body_cap,
			CcHttpStopFn should_stop, void *arg)
{
	HttpRun    *run;
	int			completed;
	int			i;

	if (!http_initialized)
		elog(ERROR, "cc_http_run called before cc_http_init");
	if (n < 0 || (n > 0 && (reqs == NULL || results == NULL)) ||
		max_concurrent < 1 || body_cap < 0)
		elog(ERROR, "invalid arguments to cc_http_run");

	for (i = 0; i < n; i++)
	{
		results[i].tag = reqs[i].tag;
		results[i].status = 0;
		results[i].latency_ms = 0;
		results[i].body = NULL;
		results[i].truncated = false;
		results[i].retry_after_s = -1;
		results[i].error = NULL;
		results[i].curl_code = CURLE_OK;
	}
	if (n == 0)
		return 0;

	run = palloc0(sizeof(HttpRun));
	run->reqs = reqs;
	run->results = results;
	run->n = n;
	run->done = palloc0(sizeof(bool) * n);
	run->limit = Min(cc_http_concurrency_limit(max_concurrent), n);
	run->limit = Min(http_grow_pool(run->limit), run->limit);
	run->per_group = max_per_group > 0 ? max_per_group : run->limit;
	run->free_slots = palloc(sizeof(int) * Max(http_nslots, 1));
	for (i = http_nslots - 1; i >= 0; i--)
	{
		http_slots[i]->cap = (size_t) body_cap;
		run->free_slots[run->nfree++] = i;
	}
	http_plan_groups(run);

	if (run->limit < 1)
	{
		/* Not even one easy handle: every request fails alike. */
		for (i = 0; i < n; i++)
			http_fail(run, i, CURLE_OUT_OF_MEMORY,
					  "could not create a libcurl handle");
		completed = run->completed;
		http_free_run(run);
		pfree(run);
		return completed;
	}
	{
		/* This host's addresses now (kept when they cannot be read). */
		CcIpAddr   *own;
		int			nown = cc_own_addresses(&own);

		if (nown >= 0)
		{
			free(http_own);
			http_own = own;
			http_nown = nown;
		}
	}
	if (http_allow_generation != cc_allowlist_generation())
	{
		/*
		 * The allowlist changed: close every kept-alive connection (a new
		 * multi handle) so none opened under the old list is reused.  No
		 * transfer is attached between runs.
		 */
		CURLM	   *m = curl_multi_init();

		if (m != NULL)
		{
			curl_multi_cleanup(http_multi);
			http_multi = m;
			http_maxconnects = 0;
			http_allow_generation = cc_allowlist_generation();
		}
	}
	if (http_maxconnects != run->limit)
	{
		curl_multi_setopt(http_multi, CURLMOPT_MAXCONNECTS, (long) run->limit);
		http_maxconnects = run->limit;
	}

	PG_TRY();
	{
		bool		stopped = false;

		while (run->completed < n)
		{
			int			running;
			int			msgs;
			CURLMsg    *msg;
			CURLMcode	mrc;
			sigset_t	saved;

			http_start_more(run);
			if (run->active == 0)
				break;
			/* signals wait (not lost) while perform may start threads */
			pthread_sigmask(SIG_BLOCK, &http_perform_mask, &saved);
			mrc = curl_multi_perform(http_multi, &running);
			pthread_sigmask(SIG_SETMASK, &saved, NULL);
			if (mrc == CURLM_OK)
			{
				while ((msg = curl_multi_info_read(http_multi, &msgs)) != NULL)
					if (msg->msg == CURLMSG_DONE)
						http_finish(run, msg->easy_handle, msg->data.result);
			}
			if (run->completed >= n)
				break;
			if (should_stop != NULL && should_stop(arg))
			{
				stopped = true;
				break;
			}
			if (mrc == CURLM_OK &&
				!(run->active < run->limit && run->ring_len > 0))
			{
				/* pg_stat_activity shows Extension while waiting on peers */
				pgstat_report_wait_start(PG_WAIT_EXTENSION);
				mrc = curl_multi_poll(http_multi, NULL, 0, CC_HTTP_POLL_MS,
									  NULL);
				pgstat_report_wait_end();
			}
			if (mrc != CURLM_OK)
			{
				/* The multi handle itself failed: fail what runs, go on. */
				http_abort_all(run, CURLE_FAILED_INIT,
							   curl_multi_strerror(mrc));
			}
		}

		if (stopped)
			http_abort_all(run, CURLE_ABORTED_BY_CALLBACK,
						   CC_HTTP_INTERRUPTED);
		for (i = 0; i < n; i++)
		{
			if (run->done[i] || results[i].error != NULL)
				continue;
			results[i].error = pstrdup(CC_HTTP_INTERRUPTED);
			results[i].curl_code = CURLE_ABORTED_BY_CALLBACK;
		}
	}
	PG_CATCH();
	{
		http_abort_all(run, 0, NULL);
		PG_RE_THROW();
	}
	PG_END_TRY();

	completed = run->completed;
	http_free_run(run);
	pfree(run);
	return completed;
}


/*
 * Stream mode: the delivery pipeline starts each request when it has a
 * slot for it and collects each as soon as it finishes, instead of giving
 * cc_http_run a batch that returns when its slowest request does.  The
 * caller keeps the caps (it only starts what max_concurrent and its
 * per-endpoint limits allow); a process uses one mode or the other.
 */
static int	stream_active = 0;
static int	stream_body_cap = 0;
static bool stream_fresh = false;	/* allowlist changed under live transfers */
static instr_time stream_own_at;
static bool stream_own_read = false;

/* Reads this host's addresses (kept when they cannot be read). */
static void
http_refresh_own(void)
{
	CcIpAddr   *own;
	int			nown = cc_own_addresses(&own);

	if (nown >= 0)
	{
		free(http_own);
		http_own = own;
		http_nown = nown;
	}
	INSTR_TIME_SET_CURRENT(stream_own_at);
	stream_own_read = true;
}

/*
 * Makes the stream ready for up to max_concurrent transfers (within the
 * open-file budget, as cc_http_run) keeping body_cap bytes of each body,
 * and returns how many may run at once (0: no handle could be made).
 * Cheap: call it before starting transfers.  A changed allowlist closes
 * every kept connection once no transfer is attached; until then new
 * transfers open fresh connections.  This host's addresses are read again
 * when nothing runs or at most every second.
 */
int
cc_http_stream_limit(int max_concurrent, int body_cap)
{
	int			limit;

	if (!http_initialized)
		elog(ERROR, "cc_http_stream_limit called before cc_http_init");
	limit = cc_http_concurrency_limit(max_concurrent);
	limit = Min(http_grow_pool(limit), limit);
	stream_body_cap = Max(body_cap, 0);
	if (http_allow_generation != cc_allowlist_generation())
	{
		if (stream_active == 0)
		{
			CURLM	   *m = curl_multi_init();

			if (m != NULL)
			{
				curl_multi_cleanup(http_multi);
				http_multi = m;
				http_maxconnects = 0;
				http_allow_generation = cc_allowlist_generation();
				stream_fresh = false;
			}
		}
		else
			stream_fresh = true;
	}
	if (stream_active == 0 || !stream_own_read)
		http_refresh_own();
	else
	{
		instr_time	now;

		INSTR_TIME_SET_CURRENT(now);
		INSTR_TIME_SUBTRACT(now, stream_own_at);
		if (INSTR_TIME_GET_MILLISEC(now) >= 1000)
			http_refresh_own();
	}
	if (limit > 0 && http_maxconnects != limit)
	{
		curl_multi_setopt(http_multi, CURLMOPT_MAXCONNECTS, (long) limit);
		http_maxconnects = limit;
	}
	return limit;
}

/* Transfers the stream has running. */
int
cc_http_stream_active(void)
{
	return stream_active;
}

/*
 * Starts req; its outcome goes to *res when cc_http_stream_wait reports
 * it (req's strings must stay valid until then).  Returns false when it
 * could not start (no idle handle, a bad URL or header): *res says why and
 * is complete already.
 */
bool
cc_http_stream_start(const CcHttpRequest *req, CcHttpResult *res)
{
	HttpSlot   *slot = NULL;
	CURLcode	rc;
	char		msg[256];
	int			i;

	memset(res, 0, sizeof(*res));
	res->tag = req->tag;
	res->retry_after_s = -1;
	for (i = 0; i < http_nslots; i++)
		if (http_slots[i]->req < 0)
		{
			slot = http_slots[i];
			break;
		}
	if (slot == NULL)
	{
		res->error = http_error_text("could not create a libcurl handle");
		res->curl_code = CURLE_OUT_OF_MEMORY;
		return false;
	}
	slot->cap = (size_t) stream_body_cap;
	rc = http_setup(slot, req, stream_fresh, msg, sizeof(msg));
	if (rc != CURLE_OK)
	{
		res->error = http_error_text(msg);
		res->curl_code = rc;
		return false;
	}
	slot->req = 0;
	slot->result = res;
	stream_active++;
	return true;
}

/* Detaches a finished or abandoned stream transfer from its slot. */
static void
http_stream_release(HttpSlot *slot)
{
	curl_multi_remove_handle(http_multi, slot->easy);
	curl_slist_free_all(slot->headers);
	slot->headers = NULL;
	http_drop_url(slot);
	slot->req = -1;
	slot->result = NULL;
	stream_active--;
}

/* Collects the transfers libcurl says are done into done[]. */
static int
http_stream_collect(CcHttpResult **done, int max, int ndone)
{
	CURLMsg    *msg;
	int			msgs;

	while (ndone < max &&
		   (msg = curl_multi_info_read(http_multi, &msgs)) != NULL)
	{
		HttpSlot   *slot = NULL;
		long		status = 0;
		curl_off_t	total_us = 0;
		CcHttpResult *res;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &slot);
		if (slot == NULL || slot->req < 0 || slot->result == NULL)
			elog(ERROR, "libcurl reported a transfer callback_center did not start");
		curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
		curl_easy_getinfo(msg->easy_handle, CURLINFO_TOTAL_TIME_T, &total_us);
		res = slot->result;
		http_stream_release(slot);
		http_fill_result(slot, res, msg->data.result, status, total_us);
		done[ndone++] = res;
	}
	return ndone;
}

/* Drives the transfers once; false when the multi handle failed. */
static bool
http_stream_perform(void)
{
	int			running;
	CURLMcode	mrc;
	sigset_t	saved;

	pthread_sigmask(SIG_BLOCK, &http_perform_mask, &saved);
	mrc = curl_multi_perform(http_multi, &running);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);
	if (mrc != CURLM_OK)
	{
		cc_http_stream_abandon();
		elog(ERROR, "callback_center: libcurl failed: %s",
			 curl_multi_strerror(mrc));
	}
	return true;
}

/*
 * Lets the transfers run, waiting up to timeout_ms (at most
 * CC_HTTP_POLL_MS) for one to finish, and puts the results of those that
 * finished (as given to cc_http_stream_start) in done[], at most max.
 * Returns how many.  Strings in the results are palloc'd in the current
 * memory context.  With nothing running it returns 0 at once.
 */
int
cc_http_stream_wait(int timeout_ms, CcHttpResult **done, int max)
{
	int			ndone = 0;

	if (stream_active == 0 || max <= 0)
		return 0;
	if (!http_stream_perform())
		return 0;
	ndone = http_stream_collect(done, max, 0);
	if (ndone == 0 && stream_active > 0 && timeout_ms > 0)
	{
		CURLMcode	mrc;

		pgstat_report_wait_start(PG_WAIT_EXTENSION);
		mrc = curl_multi_poll(http_multi, NULL, 0,
							  Min(timeout_ms, CC_HTTP_POLL_MS), NULL);
		pgstat_report_wait_end();
		if (mrc != CURLM_OK)
		{
			cc_http_stream_abandon();
			elog(ERROR, "callback_center: libcurl failed: %s",
				 curl_multi_strerror(mrc));
		}
		if (!http_stream_perform())
			return 0;
		ndone = http_stream_collect(done, max, ndone);
	}
	return ndone;
}

/*
 * Abandons every running stream transfer (shutdown, error cleanup): their
 * results are not touched and will never be reported.
 */
void
cc_http_stream_abandon(void)
{
	int			i;

	for (i = 0; i < http_nslots; i++)
	{
		HttpSlot   *slot = http_slots[i];

		if (slot->req < 0 || slot->result == NULL)
			continue;
		http_stream_release(slot);
	}
}
