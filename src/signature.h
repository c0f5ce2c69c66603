/*-------------------------------------------------------------------------
 *
 * signature.h
 *		HMAC-SHA256 webhook signatures, base64 and hex, in plain C.
 *
 * Nothing here runs SQL or SPI, so the delivery worker can sign outbound
 * requests with it outside a transaction.  Functions allocate with palloc
 * in the current memory context.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_SIGNATURE_H
#define CC_SIGNATURE_H

#define CC_SHA256_LEN		32

/* Parts of the content a Standard Webhooks / Stripe signature signs. */
#define CC_WEBHOOK_PARTS	5
#define CC_STRIPE_PARTS		3

/* The bytes of a generated secret: endpoints' and providers'. */
#define CC_ENDPOINT_SECRET_BYTES	32
#define CC_PROVIDER_SECRET_BYTES	24
#define CC_MAX_SECRET_BYTES			64

/* Most v1 signatures one header may carry; more is called malformed. */
#define CC_MAX_SIGNATURES	16

/* A parsed signature header: timestamp and the v1 digests it carries. */
typedef struct CcSignatureHeader
{
	int64		timestamp;		/* unix seconds (Stripe t=) */
	const char *timestamp_text; /* t= value as sent (Stripe signed payload) */
	int			timestamp_len;
	int			nsigs;			/* v1 entries found, each CC_SHA256_LEN bytes */
	uint8		sigs[CC_MAX_SIGNATURES][CC_SHA256_LEN];
} CcSignatureHeader;

extern void cc_sha256(const char *data, size_t len, uint8 *out);
extern void cc_hmac_sha256(const uint8 *key, size_t keylen,
						   const char *const *parts, const size_t *lens,
						   int nparts, uint8 *out);
extern bool cc_equal_consttime(const uint8 *a, const uint8 *b, size_t len);

extern char *cc_base64_encode(const uint8 *src, size_t len);
extern bool cc_base64_decode(const char *src, size_t len,
							 uint8 **dst, size_t *dstlen);
extern int	cc_hex_digit(char c);
extern char *cc_hex_encode(const uint8 *src, size_t len);
extern bool cc_hex_decode(const char *src, size_t len, uint8 *dst,
						  size_t dstlen);

extern bool cc_parse_int64(const char *s, size_t len, int64 *result);
extern bool cc_webhook_secret_key(const char *secret, uint8 **key,
								  size_t *keylen);
extern bool cc_parse_webhook_signature(const char *header,
									   CcSignatureHeader *out,
									   const char **why);
extern bool cc_parse_stripe_signature(const char *header,
									  CcSignatureHeader *out,
									  const char **why);

extern void cc_webhook_signed_content(const char *msg_id,
									  const char *ts, size_t tslen,
									  const char *body, size_t bodylen,
									  const char **parts, size_t *lens);
extern void cc_stripe_signed_content(const char *ts, size_t tslen,
									 const char *body, size_t bodylen,
									 const char **parts, size_t *lens);
extern char *cc_sign_webhook(const uint8 *key, size_t keylen,
							 const char *msg_id, int64 ts,
							 const char *body, size_t bodylen);
extern char *cc_sign_stripe(const char *secret, int64 ts,
							const char *body, size_t bodylen);
extern char *cc_new_webhook_secret_text(int nbytes);

#endif							/* CC_SIGNATURE_H */
