/*-------------------------------------------------------------------------
 *
 * signature.c
 *		HMAC-SHA256 webhook signatures (Standard Webhooks and Stripe), base64,
 *		hex and constant-time comparison.
 *
 * Plain C over PostgreSQL's own crypto (common/hmac.h, common/cryptohash.h):
 * no SPI, no catalog access, no transaction needed.  Parsers report what is
 * wrong through a static string and never quote the input back, so callers
 * can put it in an error detail without leaking a signature.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/base64.h"
#include "common/cryptohash.h"
#include "common/hmac.h"

#include "signature.h"

#define WEBHOOK_SECRET_PREFIX	"whsec_"

/*
 * Stores the SHA-256 digest of data in out (CC_SHA256_LEN bytes).
 */
void
cc_sha256(const char *data, size_t len, uint8 *out)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);

	if (ctx == NULL ||
		pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
		pg_cryptohash_final(ctx, out, CC_SHA256_LEN) < 0)
		elog(ERROR, "could not compute SHA-256 digest: %s",
			 pg_cryptohash_error(ctx));
	pg_cryptohash_free(ctx);
}

/*
 * Stores HMAC-SHA256(key, concatenation of parts) in out (CC_SHA256_LEN
 * bytes).  The parts avoid building the signed content in one buffer.
 */
void
cc_hmac_sha256(const uint8 *key, size_t keylen,
			   const char *const *parts, const size_t *lens, int nparts,
			   uint8 *out)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);
	int			i;

	if (ctx == NULL || pg_hmac_init(ctx, key, keylen) < 0)
		elog(ERROR, "could not compute HMAC-SHA256: %s", pg_hmac_error(ctx));
	for (i = 0; i < nparts; i++)
		if (pg_hmac_update(ctx, (const uint8 *) parts[i], lens[i]) < 0)
			elog(ERROR, "could not compute HMAC-SHA256: %s",
				 pg_hmac_error(ctx));
	if (pg_hmac_final(ctx, out, CC_SHA256_LEN) < 0)
		elog(ERROR, "could not compute HMAC-SHA256: %s", pg_hmac_error(ctx));
	pg_hmac_free(ctx);
}

/*
 * True when a and b hold the same len bytes.  Looks at every byte whatever
 * the data, so the time taken says nothing about where they differ.
 */
bool
cc_equal_consttime(const uint8 *a, const uint8 *b, size_t len)
{
	volatile uint8 diff = 0;
	size_t		i;

	for (i = 0; i < len; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/* PostgreSQL 18 made the binary side of its base64 functions uint8. */
#if PG_VERSION_NUM >= 180000
typedef uint8 cc_b64_bin;
#else
typedef char cc_b64_bin;
#endif

/*
 * Standard base64 (RFC 4648, with padding) of src, NUL-terminated.
 */
char *
cc_base64_encode(const uint8 *src, size_t len)
{
	int			enclen = pg_b64_enc_len((int) len);
	char	   *dst = palloc(enclen + 1);
	int			n;

	n = pg_b64_encode((const cc_b64_bin *) src, (int) len, dst, enclen);
	if (n < 0)
		elog(ERROR, "could not encode base64");
	dst[n] = '\0';
	return dst;
}

/*
 * Decodes standard base64 with padding.  Returns false (and leaves *dst
 * unset) on any character outside the alphabet, bad padding or a length
 * that is not a multiple of four.
 */
bool
cc_base64_decode(const char *src, size_t len, uint8 **dst, size_t *dstlen)
{
	int			declen;
	char	   *buf;
	int			n;
	size_t		i;

	if (len == 0 || len % 4 != 0)
		return false;
	for (i = 0; i < len; i++)
	{
		char		c = src[i];

		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			  (c >= '0' && c <= '9') || c == '+' || c == '/' || c == '='))
			return false;
		/* padding only in the last two places */
		if (c == '=' && i < len - 2)
			return false;
	}
	if (src[len - 2] == '=' && src[len - 1] != '=')
		return false;

	declen = pg_b64_dec_len((int) len);
	buf = palloc(declen + 1);
	n = pg_b64_decode(src, (int) len, (cc_b64_bin *) buf, declen);
	if (n < 0)
	{
		pfree(buf);
		return false;
	}
	*dst = (uint8 *) buf;
	*dstlen = (size_t) n;
	return true;
}

/*
 * Lower-case hex of src, NUL-terminated.
 */
char *
cc_hex_encode(const uint8 *src, size_t len)
{
	static const char digits[] = "0123456789abcdef";
	char	   *dst = palloc(len * 2 + 1);
	size_t		i;

	for (i = 0; i < len; i++)
	{
		dst[i * 2] = digits[src[i] >> 4];
		dst[i * 2 + 1] = digits[src[i] & 0x0f];
	}
	dst[len * 2] = '\0';
	return dst;
}

/* Value of hex digit c (either case), or -1. */
int
cc_hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * Decodes exactly dstlen bytes of hex (either case) into dst.  False when
 * src is not 2 * dstlen hex digits.
 */
bool
cc_hex_decode(const char *src, size_t len, uint8 *dst, size_t dstlen)
{
	size_t		i;

	if (len != dstlen * 2)
		return false;
	for (i = 0; i < dstlen; i++)
	{
		int			hi = cc_hex_digit(src[i * 2]);
		int			lo = cc_hex_digit(src[i * 2 + 1]);

		if (hi < 0 || lo < 0)
			return false;
		dst[i] = (uint8) ((hi << 4) | lo);
	}
	return true;
}

/*
 * Parses len characters of s as a non-negative decimal integer of at most
 * 15 digits (unix seconds for a long while yet).  False otherwise.
 */
bool
cc_parse_int64(const char *s, size_t len, int64 *result)
{
	int64		v = 0;
	size_t		i;

	if (len == 0 || len > 15)
		return false;
	for (i = 0; i < len; i++)
	{
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	*result = v;
	return true;
}

/*
 * The HMAC key of a Standard Webhooks secret: the base64 after "whsec_".
 * False when the prefix is missing or the rest is not base64.
 */
bool
cc_webhook_secret_key(const char *secret, uint8 **key, size_t *keylen)
{
	size_t		plen = strlen(WEBHOOK_SECRET_PREFIX);

	if (strncmp(secret, WEBHOOK_SECRET_PREFIX, plen) != 0)
		return false;
	return cc_base64_decode(secret + plen, strlen(secret + plen), key, keylen);
}

/*
 * Parses a webhook-signature header: space-separated "<version>,<base64>"
 * entries.  Keeps the v1 digests, ignores other versions.  False, with *why
 * set, when an entry has no comma, a v1 entry is not base64 of 32 bytes, or
 * no v1 entry is present.
 */
bool
cc_parse_webhook_signature(const char *header, CcSignatureHeader *out,
						   const char **why)
{
	const char *p = header;

	out->nsigs = 0;
	while (*p)
	{
		const char *start;
		const char *comma;
		size_t		len;

		while (*p == ' ')
			p++;
		if (*p == '\0')
			break;
		start = p;
		while (*p && *p != ' ')
			p++;
		len = p - start;
		comma = memchr(start, ',', len);
		if (comma == NULL)
		{
			*why = "A webhook-signature entry has no version prefix.";
			return false;
		}
		if (comma - start == 2 && strncmp(start, "v1", 2) == 0)
		{
			uint8	   *sig;
			size_t		siglen;

			if (!cc_base64_decode(comma + 1, len - 3, &sig, &siglen) ||
				siglen != CC_SHA256_LEN)
			{
				*why = "A v1 signature is not the base64 of a SHA-256 HMAC.";
				return false;
			}
			if (out->nsigs >= CC_MAX_SIGNATURES)
			{
				*why = "The header carries too many v1 signatures.";
				return false;
			}
			memcpy(out->sigs[out->nsigs++], sig, CC_SHA256_LEN);
			pfree(sig);
		}
	}
	if (out->nsigs == 0)
	{
		*why = "The webhook-signature header has no v1 signature.";
		return false;
	}
	return true;
}

/*
 * Parses a Stripe-Signature header: comma-separated "key=value" items with
 * one t=<unix seconds> and one or more v1=<64 hex digits>; other keys (v0)
 * are ignored.  False, with *why set, on anything else.
 */
bool
cc_parse_stripe_signature(const char *header, CcSignatureHeader *out,
						  const char **why)
{
	const char *p = header;
	bool		have_t = false;

	out->nsigs = 0;
	while (*p)
	{
		const char *start = p;
		const char *eq;
		size_t		len;

		while (*p && *p != ',')
			p++;
		len = p - start;
		if (*p == ',')
			p++;
		eq = memchr(start, '=', len);
		if (eq == NULL)
		{
			*why = "A Stripe-Signature item is not of the form key=value.";
			return false;
		}
		if (eq - start == 1 && start[0] == 't')
		{
			if (have_t ||
				!cc_parse_int64(eq + 1, len - 2, &out->timestamp))
			{
				*why = "The t= item of Stripe-Signature is not one unix timestamp.";
				return false;
			}
			out->timestamp_text = eq + 1;
			out->timestamp_len = (int) (len - 2);
			have_t = true;
		}
		else if (eq - start == 2 && strncmp(start, "v1", 2) == 0)
		{
			if (out->nsigs >= CC_MAX_SIGNATURES)
			{
				*why = "The header carries too many v1 signatures.";
				return false;
			}
			if (!cc_hex_decode(eq + 1, len - 3, out->sigs[out->nsigs],
							   CC_SHA256_LEN))
			{
				*why = "A v1 signature is not 64 hex digits.";
				return false;
			}
			out->nsigs++;
		}
	}
	if (!have_t)
	{
		*why = "The Stripe-Signature header has no t= timestamp.";
		return false;
	}
	if (out->nsigs == 0)
	{
		*why = "The Stripe-Signature header has no v1 signature.";
		return false;
	}
	return true;
}

/*
 * The content a Standard Webhooks signature signs, "msg_id.ts.body", as
 * CC_WEBHOOK_PARTS parts for cc_hmac_sha256 (or to concatenate).  ts is the
 * timestamp's text: as printed by the signer, as sent to the verifier.
 * The signer and the verifier both build it here.
 */
void
cc_webhook_signed_content(const char *msg_id, const char *ts, size_t tslen,
						  const char *body, size_t bodylen,
						  const char **parts, size_t *lens)
{
	parts[0] = msg_id;
	lens[0] = strlen(msg_id);
	parts[1] = ".";
	lens[1] = 1;
	parts[2] = ts;
	lens[2] = tslen;
	parts[3] = ".";
	lens[3] = 1;
	parts[4] = body;
	lens[4] = bodylen;
}

/*
 * The content a Stripe signature signs, "ts.body", as CC_STRIPE_PARTS
 * parts; ts as for cc_webhook_signed_content.
 */
void
cc_stripe_signed_content(const char *ts, size_t tslen,
						 const char *body, size_t bodylen,
						 const char **parts, size_t *lens)
{
	parts[0] = ts;
	lens[0] = tslen;
	parts[1] = ".";
	lens[1] = 1;
	parts[2] = body;
	lens[2] = bodylen;
}

/*
 * The Standard Webhooks signature header value "v1,<base64>" for body sent
 * as message msg_id at unix time ts, with the decoded secret key.
 */
char *
cc_sign_webhook(const uint8 *key, size_t keylen, const char *msg_id,
				int64 ts, const char *body, size_t bodylen)
{
	char		tsbuf[32];
	const char *parts[CC_WEBHOOK_PARTS];
	size_t		lens[CC_WEBHOOK_PARTS];
	uint8		mac[CC_SHA256_LEN];

	snprintf(tsbuf, sizeof(tsbuf), INT64_FORMAT, ts);
	cc_webhook_signed_content(msg_id, tsbuf, strlen(tsbuf), body, bodylen,
							  parts, lens);
	cc_hmac_sha256(key, keylen, parts, lens, CC_WEBHOOK_PARTS, mac);
	return psprintf("v1,%s", cc_base64_encode(mac, CC_SHA256_LEN));
}

/*
 * The Stripe-Signature header value "t=<ts>,v1=<hex>" for body at unix
 * time ts; the key is the secret string's bytes as given.
 */
char *
cc_sign_stripe(const char *secret, int64 ts, const char *body, size_t bodylen)
{
	char		tsbuf[32];
	const char *parts[CC_STRIPE_PARTS];
	size_t		lens[CC_STRIPE_PARTS];
	uint8		mac[CC_SHA256_LEN];

	snprintf(tsbuf, sizeof(tsbuf), INT64_FORMAT, ts);
	cc_stripe_signed_content(tsbuf, strlen(tsbuf), body, bodylen, parts, lens);
	cc_hmac_sha256((const uint8 *) secret, strlen(secret), parts, lens,
				   CC_STRIPE_PARTS, mac);
	return psprintf("t=%s,v1=%s", tsbuf, cc_hex_encode(mac, CC_SHA256_LEN));
}

/*
 * A new Standard Webhooks secret: "whsec_" and the base64 of nbytes bytes
 * from the server's strong random source (the one pgcrypto's
 * gen_random_bytes uses).  Every secret the extension generates, for
 * endpoints and providers, comes from here.
 */
char *
cc_new_webhook_secret_text(int nbytes)
{
	uint8		buf[CC_MAX_SECRET_BYTES];

	Assert(nbytes > 0 && nbytes <= CC_MAX_SECRET_BYTES);
	if (!pg_strong_random(buf, nbytes))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes")));
	return psprintf(WEBHOOK_SECRET_PREFIX "%s", cc_base64_encode(buf, nbytes));
}
