/*-------------------------------------------------------------------------
 *
 * crypto.h
 *		RSA signatures (verifying and, with a merchant's private key,
 *		signing), AES-256-GCM and PEM keys through OpenSSL, in plain C.
 *
 * Nothing here runs SQL, SPI or fmgr: the payment channels (channels.c)
 * call it with bytes and get bytes or a verdict back.  Every failure comes
 * with a static reason string that never quotes the input, so callers may
 * put it in an error detail without leaking key material.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_CRYPTO_H
#define CC_CRYPTO_H

#include <time.h>

/* Smallest RSA modulus accepted, in bits. */
#define CC_RSA_MIN_BITS		2048

/* AES-256-GCM: key and tag sizes in bytes. */
#define CC_AES256_KEY_LEN	32
#define CC_GCM_TAG_LEN		16

/* What a PEM (or bare base64 DER public key) holds. */
typedef enum CcKeyKind
{
	CC_KEY_PUBLIC_KEY,			/* SubjectPublicKeyInfo or PKCS#1 RSA key */
	CC_KEY_CERTIFICATE			/* X.509 certificate */
} CcKeyKind;

typedef struct CcKeyInfo
{
	CcKeyKind	kind;
	int			bits;			/* RSA modulus size */
	char		serial[80];		/* certificate serial, upper-case hex */
	time_t		not_before;		/* certificates only, else 0 */
	time_t		not_after;
} CcKeyInfo;

/* Outcome of a signature check. */
typedef enum CcVerifyResult
{
	CC_VERIFY_OK,				/* the key signed the data */
	CC_VERIFY_BAD_SIGNATURE,	/* well-formed key, the signature does not match */
	CC_VERIFY_BAD_KEY			/* the key is unusable (see why) */
} CcVerifyResult;

/* Outcome of a certificate chain check (cc_x509_chain_check). */
typedef enum CcChainResult
{
	CC_CHAIN_OK,				/* chains to a trusted root, valid now, named */
	CC_CHAIN_MALFORMED,			/* the certificate cannot be read or used */
	CC_CHAIN_UNTRUSTED,			/* it does not chain to a given root */
	CC_CHAIN_EXPIRED,			/* it or a certificate of its chain is out of date */
	CC_CHAIN_WRONG_NAME			/* its subject does not name the organisation */
} CcChainResult;

/* pem is NUL-terminated at len. */
extern bool cc_key_inspect(const char *pem, size_t len, bool check_validity,
						   CcKeyInfo *info, const char **why);
extern CcVerifyResult cc_rsa_sha256_verify(const char *pem, size_t pemlen,
										   const unsigned char *data,
										   size_t datalen,
										   const unsigned char *sig,
										   size_t siglen,
										   const char **why);
extern CcChainResult cc_x509_chain_check(const char *pem, size_t len,
										 const char *const *cas, int ncas,
										 const char *const *names,
										 int nnames, const char **why);
/* Length of an Alipay certificate SN (hex MD5), without the NUL. */
#define CC_ALIPAY_SN_LEN	32

extern bool cc_alipay_cert_sn(const char *pem, size_t len, bool bundle,
							  char *out, size_t outlen, const char **why);
extern bool cc_aes256gcm_decrypt(const unsigned char *key,
								 const unsigned char *nonce, size_t noncelen,
								 const unsigned char *aad, size_t aadlen,
								 const unsigned char *ct, size_t ctlen,
								 unsigned char *out, size_t *outlen);

/* Room for a signature by any key accepted (16384-bit RSA). */
#define CC_RSA_MAX_SIG_LEN	2048

extern bool cc_private_key_inspect(const char *pem, size_t len, int *bits,
								   const char **why);
extern bool cc_rsa_sha256_sign(const char *pem, size_t pemlen,
							   const unsigned char *data, size_t datalen,
							   unsigned char *sig, size_t sigcap,
							   size_t *siglen, const char **why);

#endif							/* CC_CRYPTO_H */
