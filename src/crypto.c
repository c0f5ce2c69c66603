/*-------------------------------------------------------------------------
 *
 * crypto.c
 *		RSA SHA256 signature verification (PKCS#1 v1.5), AES-256-GCM
 *		decryption and PEM key inspection through OpenSSL's EVP and X509
 *		interfaces.
 *
 * The leaf the payment channels stand on (WeChat Pay v3 signs with RSA and
 * encrypts with AES-256-GCM; Alipay signs with RSA; UnionPay signs with
 * RSA under a certificate that must chain to its root).  No SQL, no SPI, no
 * fmgr, and no ereport: every function returns normally after freeing what
 * OpenSSL allocated and clearing OpenSSL's error queue (which the server's
 * own TLS code shares), and explains a failure with a static string that
 * never quotes the input.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <string.h>
#include <time.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "crypto.h"

#define PEM_BEGIN	"-----BEGIN "

/*
 * Seconds since the epoch of an ASN1_TIME, or 0 when it cannot be read.
 */
static time_t
asn1_time_to_time_t(const ASN1_TIME *t)
{
	struct tm	tm;

	memset(&tm, 0, sizeof(tm));
	if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1)
		return 0;
	return timegm(&tm);
}

/*
 * A PEM "PUBLIC KEY" wrapping of the bare base64 text src (Alipay hands its
 * public key out this way), with whitespace dropped and lines of 64
 * characters; NULL when src holds anything but base64 and whitespace.
 * Free with OPENSSL_free.
 */
static char *
wrap_bare_base64(const char *src, size_t len)
{
	static const char head[] = "-----BEGIN PUBLIC KEY-----\n";
	static const char tail[] = "-----END PUBLIC KEY-----\n";
	char	   *out;
	size_t		o = 0;
	size_t		col = 0;
	size_t		i;

	out = OPENSSL_malloc(sizeof(head) + len + len / 64 + 2 + sizeof(tail));
	if (out == NULL)
		return NULL;
	memcpy(out, head, sizeof(head) - 1);
	o = sizeof(head) - 1;
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) src[i];

		if (isspace(c))
			continue;
		if (!isalnum(c) && c != '+' && c != '/' && c != '=')
		{
			OPENSSL_free(out);
			return NULL;
		}
		out[o++] = c;
		if (++col == 64)
		{
			out[o++] = '\n';
			col = 0;
		}
	}
	if (col != 0)
		out[o++] = '\n';
	memcpy(out + o, tail, sizeof(tail));	/* with its NUL */
	return out;
}

/*
 * Reads the RSA public key of pem (a "PUBLIC KEY" or "CERTIFICATE" PEM
 * block, or bare base64 of a DER public key) and checks it: RSA, at least
 * CC_RSA_MIN_BITS, and for a certificate, when check_validity, valid now.
 * Returns the key (free with EVP_PKEY_free) and fills info, or NULL with
 * *why set.
 */
static EVP_PKEY *
load_public_key(const char *pem, size_t len, bool check_validity,
				CcKeyInfo *info, const char **why)
{
	EVP_PKEY   *pkey = NULL;
	X509	   *cert = NULL;
	BIO		   *bio = NULL;
	char	   *wrapped = NULL;
	const char *begin;
	size_t		skip = 0;

	memset(info, 0, sizeof(*info));
	*why = NULL;
	while (skip < len && isspace((unsigned char) pem[skip]))
		skip++;
	pem += skip;
	len -= skip;
	if (len == 0)
	{
		*why = "The key is empty.";
		return NULL;
	}
	if (len > 64 * 1024)
	{
		*why = "The key is longer than 64 kB.";
		return NULL;
	}

	begin = (len >= strlen(PEM_BEGIN) &&
			 strncmp(pem, PEM_BEGIN, strlen(PEM_BEGIN)) == 0) ? pem : NULL;
	if (begin == NULL)
	{
		wrapped = wrap_bare_base64(pem, len);
		if (wrapped == NULL)
		{
			*why = "The key is neither a PEM block nor base64 text.";
			return NULL;
		}
		bio = BIO_new_mem_buf(wrapped, -1);
	}
	else
		bio = BIO_new_mem_buf(pem, (int) len);
	if (bio == NULL)
	{
		*why = "Out of memory reading the key.";
		goto done;
	}

	if (begin != NULL && strncmp(begin, "-----BEGIN CERTIFICATE-----", 27) == 0)
	{
		info->kind = CC_KEY_CERTIFICATE;
		cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
		if (cert == NULL)
		{
			*why = "The PEM certificate is malformed.";
			goto done;
		}
		info->not_before = asn1_time_to_time_t(X509_get0_notBefore(cert));
		info->not_after = asn1_time_to_time_t(X509_get0_notAfter(cert));
		{
			const ASN1_INTEGER *sn = X509_get0_serialNumber(cert);
			BIGNUM	   *bn = ASN1_INTEGER_to_BN(sn, NULL);
			char	   *hex = bn ? BN_bn2hex(bn) : NULL;

			if (hex != NULL && strlen(hex) < sizeof(info->serial))
				strcpy(info->serial, hex);
			OPENSSL_free(hex);
			BN_free(bn);
		}
		if (check_validity &&
			X509_cmp_current_time(X509_get0_notBefore(cert)) >= 0)
		{
			*why = "The certificate is not valid yet.";
			goto done;
		}
		if (check_validity &&
			X509_cmp_current_time(X509_get0_notAfter(cert)) <= 0)
		{
			*why = "The certificate has expired.";
			goto done;
		}
		pkey = X509_get_pubkey(cert);
		if (pkey == NULL)
		{
			*why = "The certificate's public key cannot be read.";
			goto done;
		}
	}
	else if (begin == NULL ||
			 strncmp(begin, "-----BEGIN PUBLIC KEY-----", 26) == 0)
	{
		info->kind = CC_KEY_PUBLIC_KEY;
		pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
		if (pkey == NULL)
		{
			*why = begin ? "The PEM public key is malformed." :
				"The base64 text is not a DER public key.";
			goto done;
		}
	}
	else if (strstr(begin, "PRIVATE KEY-----") != NULL &&
			 strstr(begin, "PRIVATE KEY-----") < begin + 64)
	{
		*why = "The PEM block is a private key: give the public key or certificate.";
		goto done;
	}
	else
	{
		*why = "The PEM block is neither a PUBLIC KEY nor a CERTIFICATE.";
		goto done;
	}

	if (EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA)
	{
		*why = "The key is not an RSA key.";
		EVP_PKEY_free(pkey);
		pkey = NULL;
		goto done;
	}
	info->bits = EVP_PKEY_get_bits(pkey);
	if (info->bits < CC_RSA_MIN_BITS)
	{
		*why = "The RSA key is smaller than 2048 bits.";
		EVP_PKEY_free(pkey);
		pkey = NULL;
		goto done;
	}

done:
	X509_free(cert);
	BIO_free(bio);
	OPENSSL_free(wrapped);
	ERR_clear_error();
	return pkey;
}

/*
 * Per-backend caches of what reading a certificate costs (UnionPay sends
 * its signing certificate with every notification; Alipay's certificate
 * mode checks its loaded certificates at every notification): the parsed
 * public keys of cc_rsa_sha256_verify and the verdicts of
 * cc_x509_chain_check, each keyed by the SHA-256 of the bytes it was
 * computed from, CC_CACHE_SIZE entries each, the least recently used
 * replaced.  A key or an "ok" verdict is used only within the validity of
 * its certificates (the chain's latest notBefore to its earliest
 * notAfter), so that an expiry is never missed; an "expired" verdict is
 * not kept, the others do not depend on the time.  Only the bytes decide:
 * a configuration with other certificates is another entry.
 */
#define CC_CACHE_SIZE	64
#define CC_SHA256_BYTES	32
#define CC_TIME_MAX		((time_t) PG_INT64_MAX)

typedef struct CcCacheEntry
{
	unsigned char key[2 * CC_SHA256_BYTES]; /* the input's SHA-256, and
											 * the trust configuration's */
	bool		used;
	uint64		last_use;		/* for replacing the least recently used */
	time_t		valid_from;		/* used only from ... */
	time_t		valid_until;	/* ... until */
	EVP_PKEY   *pkey;			/* key cache: the key, owned */
	CcChainResult verdict;		/* chain cache: the verdict ... */
	const char *why;			/* ... and its reason */
} CcCacheEntry;

static CcCacheEntry key_cache[CC_CACHE_SIZE];
static CcCacheEntry chain_cache[CC_CACHE_SIZE];
static uint64 cache_clock;

/*
 * Adds len bytes of data, preceded by their length, to the digest (so that
 * a list of inputs hashes differently from their concatenation).
 */
static bool
digest_part(EVP_MD_CTX *ctx, const void *data, size_t len)
{
	uint64		n = len;

	return EVP_DigestUpdate(ctx, &n, sizeof(n)) == 1 &&
		EVP_DigestUpdate(ctx, data, len) == 1;
}

/*
 * The entry of cache whose key is key and that may be used at now, or
 * NULL.
 */
static CcCacheEntry *
cache_lookup(CcCacheEntry *cache, const unsigned char *key, time_t now)
{
	int			i;

	for (i = 0; i < CC_CACHE_SIZE; i++)
	{
		CcCacheEntry *e = &cache[i];

		if (e->used && memcmp(e->key, key, sizeof(e->key)) == 0 &&
			now >= e->valid_from && now <= e->valid_until)
		{
			e->last_use = ++cache_clock;
			return e;
		}
	}
	return NULL;
}

/*
 * A free entry of cache, or the least recently used one emptied, filled
 * with key and its validity; the caller sets the rest.
 */
static CcCacheEntry *
cache_insert(CcCacheEntry *cache, const unsigned char *key,
			 time_t valid_from, time_t valid_until)
{
	CcCacheEntry *victim = &cache[0];
	int			i;

	for (i = 0; i < CC_CACHE_SIZE; i++)
	{
		CcCacheEntry *e = &cache[i];

		/* an entry for the same key (no longer valid) is replaced */
		if (!e->used || memcmp(e->key, key, sizeof(e->key)) == 0)
		{
			victim = e;
			break;
		}
		if (e->last_use < victim->last_use)
			victim = e;
	}
	EVP_PKEY_free(victim->pkey);
	memset(victim, 0, sizeof(*victim));
	memcpy(victim->key, key, sizeof(victim->key));
	victim->used = true;
	victim->last_use = ++cache_clock;
	victim->valid_from = valid_from;
	victim->valid_until = valid_until;
	return victim;
}

/*
 * True when pem holds a usable RSA public key (see load_public_key), with
 * what it is in *info; false with *why set otherwise.
 */
bool
cc_key_inspect(const char *pem, size_t len, bool check_validity,
			   CcKeyInfo *info, const char **why)
{
	EVP_PKEY   *pkey = load_public_key(pem, len, check_validity, info, why);

	if (pkey == NULL)
		return false;
	EVP_PKEY_free(pkey);
	return true;
}

/*
 * Whether sig is an RSASSA-PKCS1-v1_5 SHA-256 signature of data by the key
 * of pem (a public key, or a certificate valid now), read through the key
 * cache.  CC_VERIFY_BAD_KEY, with *why, when the key cannot be used at all.
 */
CcVerifyResult
cc_rsa_sha256_verify(const char *pem, size_t pemlen,
					 const unsigned char *data, size_t datalen,
					 const unsigned char *sig, size_t siglen,
					 const char **why)
{
	CcKeyInfo	info;
	EVP_PKEY   *pkey;
	EVP_MD_CTX *ctx;
	unsigned char key[2 * CC_SHA256_BYTES] = {0};
	bool		keyed;
	bool		owned = false;
	CcCacheEntry *e = NULL;
	int			rc = 0;

	*why = NULL;
	keyed = EVP_Digest(pem, pemlen, key, NULL, EVP_sha256(), NULL) == 1;
	if (keyed)
		e = cache_lookup(key_cache, key, time(NULL));
	if (e != NULL)
		pkey = e->pkey;
	else
	{
		pkey = load_public_key(pem, pemlen, true, &info, why);
		if (pkey == NULL)
			return CC_VERIFY_BAD_KEY;
		if (keyed)
		{
			/* a certificate's key only while the certificate is valid */
			e = cache_insert(key_cache, key,
							 info.kind == CC_KEY_CERTIFICATE ? info.not_before : 0,
							 info.kind == CC_KEY_CERTIFICATE ? info.not_after : CC_TIME_MAX);
			e->pkey = pkey;
		}
		else
			owned = true;
	}
	ctx = EVP_MD_CTX_new();
	if (ctx != NULL &&
		EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pkey) == 1)
		rc = EVP_DigestVerify(ctx, sig, siglen, data, datalen);
	EVP_MD_CTX_free(ctx);
	if (owned)
		EVP_PKEY_free(pkey);
	ERR_clear_error();
	return rc == 1 ? CC_VERIFY_OK : CC_VERIFY_BAD_SIGNATURE;
}

/*
 * The X.509 certificate of a PEM "CERTIFICATE" block (leading whitespace
 * allowed), or NULL.  Free with X509_free.
 */
static X509 *
read_certificate(const char *pem, size_t len)
{
	static const char head[] = "-----BEGIN CERTIFICATE-----";
	BIO		   *bio;
	X509	   *cert;

	while (len > 0 && isspace((unsigned char) *pem))
	{
		pem++;
		len--;
	}
	if (len < sizeof(head) - 1 || len > 64 * 1024 ||
		strncmp(pem, head, sizeof(head) - 1) != 0)
		return NULL;
	bio = BIO_new_mem_buf(pem, (int) len);
	if (bio == NULL)
		return NULL;
	cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
	BIO_free(bio);
	return cert;
}

/*
 * Whether the subject of cert names one of names the way UnionPay's acp SDK
 * reads it: the subject's (last) common name split at "@", whose third
 * field must equal the name exactly (production certificates carry
 * "...@...@中国银联股份有限公司@...", the test environment's
 * "...@...@00040000:SIGN@...").
 */
static bool
subject_names(X509 *cert, const char *const *names, int nnames)
{
	X509_NAME  *subject = X509_get_subject_name(cert);
	int			idx = -1;
	int			last = -1;
	unsigned char *cn = NULL;
	int			cnlen;
	const char *field;
	const char *end;
	int			at = 0;
	bool		found = false;
	int			i;

	while ((idx = X509_NAME_get_index_by_NID(subject, NID_commonName, idx)) >= 0)
		last = idx;
	if (last < 0)
		return false;
	cnlen = ASN1_STRING_to_UTF8(&cn,
								X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject,
																			 last)));
	if (cnlen < 0)
		return false;
	if (memchr(cn, '\0', cnlen) != NULL)
	{
		OPENSSL_free(cn);
		return false;
	}
	field = (const char *) cn;
	end = field + cnlen;
	while (at < 2 && field < end)
	{
		if (*field++ == '@')
			at++;
	}
	if (at == 2)
	{
		const char *stop = memchr(field, '@', end - field);
		size_t		flen = (stop ? stop : end) - field;

		for (i = 0; i < nnames && !found; i++)
			found = (strlen(names[i]) == flen &&
					 memcmp(names[i], field, flen) == 0);
	}
	OPENSSL_free(cn);
	return found;
}

/*
 * Checks the certificate of pem against a trust configuration: cas holds
 * PEM certificates, the self-signed ones being trusted roots and the others
 * intermediates.  CC_CHAIN_OK when pem is an RSA certificate of at least
 * CC_RSA_MIN_BITS that chains through the intermediates to a root, every
 * certificate of the chain valid now, and (when nnames > 0) whose subject
 * names one of names (see subject_names).  Otherwise the failure, with *why.
 * Revocation is not checked (the acp SDK does not either).  For CC_CHAIN_OK,
 * narrows [*valid_from, *valid_until] to the validity of the chain.
 */
static CcChainResult
chain_check_uncached(const char *pem, size_t len,
					 const char *const *cas, int ncas,
					 const char *const *names, int nnames,
					 time_t *valid_from, time_t *valid_until,
					 const char **why)
{
	X509	   *leaf;
	X509_STORE *store = NULL;
	STACK_OF(X509) *untrusted = NULL;
	X509_STORE_CTX *ctx = NULL;
	EVP_PKEY   *pkey;
	CcChainResult result = CC_CHAIN_UNTRUSTED;
	int			i;

	*why = NULL;
	leaf = read_certificate(pem, len);
	if (leaf == NULL)
	{
		*why = "The certificate is not a readable PEM certificate.";
		ERR_clear_error();
		return CC_CHAIN_MALFORMED;
	}
	pkey = X509_get0_pubkey(leaf);
	if (pkey == NULL || EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA ||
		EVP_PKEY_get_bits(pkey) < CC_RSA_MIN_BITS)
	{
		*why = "The certificate's key is not an RSA key of 2048 bits or more.";
		result = CC_CHAIN_MALFORMED;
		goto done;
	}

	store = X509_STORE_new();
	untrusted = sk_X509_new_null();
	ctx = X509_STORE_CTX_new();
	if (store == NULL || untrusted == NULL || ctx == NULL)
	{
		*why = "Out of memory checking the certificate.";
		result = CC_CHAIN_MALFORMED;
		goto done;
	}
	for (i = 0; i < ncas; i++)
	{
		X509	   *ca = read_certificate(cas[i], strlen(cas[i]));

		if (ca == NULL)
			continue;			/* checked when loaded: cannot happen */
		if (X509_check_issued(ca, ca) == X509_V_OK)
		{
			X509_STORE_add_cert(store, ca);
			X509_free(ca);
		}
		else if (!sk_X509_push(untrusted, ca))
			X509_free(ca);
	}
	if (X509_STORE_CTX_init(ctx, store, leaf, untrusted) != 1)
	{
		*why = "Out of memory checking the certificate.";
		result = CC_CHAIN_MALFORMED;
		goto done;
	}
	if (X509_verify_cert(ctx) != 1)
	{
		int			err = X509_STORE_CTX_get_error(ctx);

		if (err == X509_V_ERR_CERT_HAS_EXPIRED ||
			err == X509_V_ERR_CERT_NOT_YET_VALID)
		{
			*why = X509_STORE_CTX_get_error_depth(ctx) == 0 ?
				"The certificate has expired or is not valid yet." :
				"A certificate of its chain has expired or is not valid yet.";
			result = CC_CHAIN_EXPIRED;
		}
		else
		{
			*why = "The certificate does not chain to a configured root.";
			result = CC_CHAIN_UNTRUSTED;
		}
		goto done;
	}
	if (nnames > 0 && !subject_names(leaf, names, nnames))
	{
		*why = "The certificate's subject does not name the expected organisation.";
		result = CC_CHAIN_WRONG_NAME;
		goto done;
	}
	result = CC_CHAIN_OK;
	/* the chain holds while every certificate of it is valid */
	{
		STACK_OF(X509) *chain = X509_STORE_CTX_get0_chain(ctx);

		for (i = 0; i < sk_X509_num(chain); i++)
		{
			X509	   *c = sk_X509_value(chain, i);
			time_t		nb = asn1_time_to_time_t(X509_get0_notBefore(c));
			time_t		na = asn1_time_to_time_t(X509_get0_notAfter(c));

			if (nb > *valid_from)
				*valid_from = nb;
			if (na < *valid_until)
				*valid_until = na;
		}
	}

done:
	X509_STORE_CTX_free(ctx);
	sk_X509_pop_free(untrusted, X509_free);
	X509_STORE_free(store);
	X509_free(leaf);
	ERR_clear_error();
	return result;
}

/*
 * Checks the certificate of pem against a trust configuration (see
 * chain_check_uncached), through the chain cache: the same certificate
 * under the same certificates and names gets the verdict it got, while it
 * holds.
 */
CcChainResult
cc_x509_chain_check(const char *pem, size_t len,
					const char *const *cas, int ncas,
					const char *const *names, int nnames,
					const char **why)
{
	unsigned char key[2 * CC_SHA256_BYTES];
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	bool		keyed;
	time_t		now = time(NULL);
	time_t		valid_from = 0;
	time_t		valid_until = CC_TIME_MAX;
	CcCacheEntry *e;
	CcChainResult result;
	int			i;

	keyed = ctx != NULL &&
		EVP_Digest(pem, len, key, NULL, EVP_sha256(), NULL) == 1 &&
		EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;
	for (i = 0; keyed && i < ncas; i++)
		keyed = digest_part(ctx, cas[i], strlen(cas[i]));
	/* then an empty part (no certificate is empty), then the names */
	keyed = keyed && digest_part(ctx, "", 0);
	for (i = 0; keyed && i < nnames; i++)
		keyed = digest_part(ctx, names[i], strlen(names[i]));
	keyed = keyed && EVP_DigestFinal_ex(ctx, key + CC_SHA256_BYTES, NULL) == 1;
	EVP_MD_CTX_free(ctx);
	ERR_clear_error();

	if (keyed && (e = cache_lookup(chain_cache, key, now)) != NULL)
	{
		*why = e->why;
		return e->verdict;
	}
	result = chain_check_uncached(pem, len, cas, ncas, names, nnames,
								  &valid_from, &valid_until, why);
	if (keyed && result != CC_CHAIN_EXPIRED)
	{
		if (result != CC_CHAIN_OK)
		{
			valid_from = 0;
			valid_until = CC_TIME_MAX;
		}
		e = cache_insert(chain_cache, key, valid_from, valid_until);
		e->verdict = result;
		e->why = *why;
	}
	return result;
}

/*
 * Appends v (len bytes of UTF-8) to out as Java's X500Principal.getName()
 * writes a string attribute value (RFC 2253, OpenJDK's AVA): ,=+<>#;"\
 * after a backslash, NUL as \00, a leading or trailing space or CR after a
 * backslash.
 */
static void
java_rfc2253_value(BIO *out, const unsigned char *v, int len)
{
	static const char escapees[] = ",=+<>#;\"\\";
	int			lead = 0;
	int			trail = len - 1;
	int			i;

	while (lead < len && (v[lead] == ' ' || v[lead] == '\r'))
		lead++;
	while (trail >= 0 && (v[trail] == ' ' || v[trail] == '\r'))
		trail--;
	for (i = 0; i < len; i++)
	{
		if (v[i] == '\0')
			BIO_write(out, "\\00", 3);
		else
		{
			if (strchr(escapees, v[i]) != NULL || i < lead || i > trail)
				BIO_write(out, "\\", 1);
			BIO_write(out, &v[i], 1);
		}
	}
}

/*
 * Writes name to out as Java's X500Principal.getName() does (RFC 2253, the
 * form Alipay's SDK hashes): the RDNs last first, separated by ",", the
 * values of one RDN by "+"; the attribute types RFC 2253 names (CN, C, L,
 * ST, O, OU, STREET, DC, UID) by keyword with their string value, any other
 * type, or a value that is not a string, as the dotted OID and "#" with the
 * upper-case hex of the value's DER encoding.  False when it cannot.
 */
static bool
java_rfc2253_name(X509_NAME *name, BIO *out)
{
	static const struct
	{
		int			nid;
		const char *keyword;
	}			keywords[] = {
		{NID_commonName, "CN"}, {NID_countryName, "C"}, {NID_localityName, "L"},
		{NID_stateOrProvinceName, "ST"}, {NID_organizationName, "O"},
		{NID_organizationalUnitName, "OU"}, {NID_streetAddress, "STREET"},
		{NID_domainComponent, "DC"}, {NID_userId, "UID"},
	};
	int			n = X509_NAME_entry_count(name);
	int			prev_set = -1;
	int			i;

	for (i = n - 1; i >= 0; i--)
	{
		X509_NAME_ENTRY *e = X509_NAME_get_entry(name, i);
		ASN1_OBJECT *obj = X509_NAME_ENTRY_get_object(e);
		ASN1_STRING *val = X509_NAME_ENTRY_get_data(e);
		int			set = X509_NAME_ENTRY_set(e);
		int			nid = OBJ_obj2nid(obj);
		const char *keyword = NULL;
		int			type = ASN1_STRING_type(val);
		size_t		k;

		if (i < n - 1)
			BIO_write(out, set == prev_set ? "+" : ",", 1);
		prev_set = set;
		for (k = 0; k < lengthof(keywords); k++)
			if (keywords[k].nid == nid)
				keyword = keywords[k].keyword;
		if (keyword != NULL &&
			(type == V_ASN1_PRINTABLESTRING || type == V_ASN1_T61STRING ||
			 type == V_ASN1_IA5STRING || type == V_ASN1_GENERALSTRING ||
			 type == V_ASN1_BMPSTRING || type == V_ASN1_UTF8STRING))
		{
			unsigned char *utf8 = NULL;
			int			len = ASN1_STRING_to_UTF8(&utf8, val);

			if (len < 0)
				return false;
			BIO_puts(out, keyword);
			BIO_write(out, "=", 1);
			java_rfc2253_value(out, utf8, len);
			OPENSSL_free(utf8);
		}
		else
		{
			char		oid[128];
			unsigned char *der = NULL;
			int			len;
			int			j;

			if (OBJ_obj2txt(oid, sizeof(oid), obj, 1) <= 0)
				return false;
			len = i2d_ASN1_TYPE(&(ASN1_TYPE) {.type = type, .value.asn1_string = val}, &der);
			if (len < 0)
				return false;
			BIO_puts(out, oid);
			BIO_write(out, "=#", 2);
			for (j = 0; j < len; j++)
				BIO_printf(out, "%02X", der[j]);
			OPENSSL_free(der);
		}
	}
	return true;
}

/*
 * Alipay's SN of cert: the lower-case hex MD5 of its issuer's name as
 * Java's X500Principal.getName() writes it followed by its serial number
 * in decimal, as AlipaySignature.getCertSN computes it.  out holds
 * CC_ALIPAY_SN_LEN + 1 bytes.  False when it cannot be computed.
 */
static bool
alipay_sn(X509 *cert, char *out)
{
	BIO		   *bio = BIO_new(BIO_s_mem());
	BIGNUM	   *bn = NULL;
	char	   *dec = NULL;
	char	   *data;
	long		len;
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	bool		ok = false;
	unsigned int i;

	if (bio == NULL || !java_rfc2253_name(X509_get_issuer_name(cert), bio))
		goto done;
	bn = ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), NULL);
	dec = bn ? BN_bn2dec(bn) : NULL;
	if (dec == NULL)
		goto done;
	BIO_puts(bio, dec);
	len = BIO_get_mem_data(bio, &data);
	if (EVP_Digest(data, len, md, &mdlen, EVP_md5(), NULL) != 1 || mdlen != 16)
		goto done;
	for (i = 0; i < mdlen; i++)
		snprintf(out + 2 * i, 3, "%02x", md[i]);
	ok = true;

done:
	OPENSSL_free(dec);
	BN_free(bn);
	BIO_free(bio);
	return ok;
}

/*
 * Alipay's certificate SNs (app_cert_sn, alipay_cert_sn, alipay_root_cert_sn).
 * bundle false: pem is one certificate and out gets its SN.  bundle true:
 * pem holds one or more certificates (Alipay's alipayRootCert.crt) and out
 * gets the SNs of those signed with an RSA algorithm (OID 1.2.840.113549.1.1.*,
 * as AlipaySignature.getRootCertSN picks them), in file order, joined by
 * "_".  out holds outlen bytes; false with *why when pem cannot be read,
 * holds no such certificate, or out is too small.
 */
bool
cc_alipay_cert_sn(const char *pem, size_t len, bool bundle, char *out, size_t outlen,
				  const char **why)
{
	BIO		   *bio;
	X509	   *cert;
	size_t		used = 0;
	int			count = 0;
	bool		ok = true;

	*why = NULL;
	if (outlen == 0)
	{
		*why = "No room for the SN.";
		return false;
	}
	out[0] = '\0';
	if (!bundle)
	{
		cert = read_certificate(pem, len);
		if (cert == NULL)
			*why = "The certificate is not a readable PEM certificate.";
		else if (outlen < CC_ALIPAY_SN_LEN + 1 || !alipay_sn(cert, out))
			*why = "The certificate's SN cannot be computed.";
		X509_free(cert);
		ERR_clear_error();
		return *why == NULL;
	}
	if (len > 256 * 1024)
	{
		*why = "The certificates are longer than 256 kB.";
		return false;
	}
	bio = BIO_new_mem_buf(pem, (int) len);
	if (bio == NULL)
	{
		*why = "Out of memory reading the certificates.";
		return false;
	}
	while (ok && (cert = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL)
	{
		char		oid[64];

		count++;
		if (OBJ_obj2txt(oid, sizeof(oid),
						OBJ_nid2obj(X509_get_signature_nid(cert)), 1) > 0 &&
			strncmp(oid, "1.2.840.113549.1.1.", 19) == 0)
		{
			if (used + (used > 0) + CC_ALIPAY_SN_LEN + 1 > outlen)
			{
				*why = "Too many certificates.";
				ok = false;
			}
			else
			{
				if (used > 0)
					out[used++] = '_';
				if (!alipay_sn(cert, out + used))
				{
					*why = "A certificate's SN cannot be computed.";
					ok = false;
				}
				used += CC_ALIPAY_SN_LEN;
			}
		}
		X509_free(cert);
	}
	BIO_free(bio);
	ERR_clear_error();
	if (ok && count == 0)
	{
		*why = "The text holds no readable PEM certificate.";
		ok = false;
	}
	else if (ok && used == 0)
	{
		*why = "None of the certificates is signed with an RSA algorithm.";
		ok = false;
	}
	return ok;
}

/*
 * AEAD_AES_256_GCM decryption as WeChat Pay uses it: ct is the ciphertext
 * followed by the 16-byte tag.  On success writes ctlen - 16 bytes to out
 * (which must hold that many) and returns true; false when the tag does not
 * authenticate ciphertext, nonce and aad under key, or ct is too short.
 */
bool
cc_aes256gcm_decrypt(const unsigned char *key,
					 const unsigned char *nonce, size_t noncelen,
					 const unsigned char *aad, size_t aadlen,
					 const unsigned char *ct, size_t ctlen,
					 unsigned char *out, size_t *outlen)
{
	EVP_CIPHER_CTX *ctx;
	size_t		bodylen;
	int			len = 0;
	int			fin = 0;
	bool		ok = false;

	*outlen = 0;
	if (ctlen < CC_GCM_TAG_LEN || noncelen == 0 || noncelen > 128 ||
		ctlen - CC_GCM_TAG_LEN > INT_MAX || aadlen > INT_MAX)
		return false;
	bodylen = ctlen - CC_GCM_TAG_LEN;
	ctx = EVP_CIPHER_CTX_new();
	if (ctx == NULL)
		return false;
	if (EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, (int) noncelen,
							NULL) == 1 &&
		EVP_DecryptInit_ex(ctx, NULL, NULL, key, nonce) == 1 &&
		(aadlen == 0 ||
		 EVP_DecryptUpdate(ctx, NULL, &len, aad, (int) aadlen) == 1) &&
		EVP_DecryptUpdate(ctx, out, &len, ct, (int) bodylen) == 1 &&
		EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, CC_GCM_TAG_LEN,
							(void *) (ct + bodylen)) == 1 &&
		EVP_DecryptFinal_ex(ctx, out + len, &fin) == 1)
	{
		*outlen = (size_t) len + fin;
		ok = true;
	}
	EVP_CIPHER_CTX_free(ctx);
	ERR_clear_error();
	if (!ok)
		memset(out, 0, bodylen);	/* never hand out unauthenticated text */
	return ok;
}

/*
 * Reads an RSA private key (PEM "PRIVATE KEY" or "RSA PRIVATE KEY", not
 * encrypted) and checks it: RSA, at least CC_RSA_MIN_BITS.  Returns the key
 * (free with EVP_PKEY_free) with its size in *bits, or NULL with *why set.
 */
static EVP_PKEY *
load_private_key(const char *pem, size_t len, int *bits, const char **why)
{
	EVP_PKEY   *pkey = NULL;
	BIO		   *bio;

	*why = NULL;
	*bits = 0;
	while (len > 0 && isspace((unsigned char) *pem))
	{
		pem++;
		len--;
	}
	if (len == 0)
	{
		*why = "The key is empty.";
		return NULL;
	}
	if (len > 64 * 1024)
	{
		*why = "The key is longer than 64 kB.";
		return NULL;
	}
	if (len < strlen(PEM_BEGIN) || strncmp(pem, PEM_BEGIN, strlen(PEM_BEGIN)) != 0)
	{
		*why = "The key is not a PEM block.";
		return NULL;
	}
	if (strstr(pem, "ENCRYPTED") != NULL)
	{
		*why = "The private key is encrypted: give it without a passphrase.";
		return NULL;
	}
	if (strncmp(pem, "-----BEGIN PRIVATE KEY-----", 27) != 0 &&
		strncmp(pem, "-----BEGIN RSA PRIVATE KEY-----", 31) != 0)
	{
		*why = "The PEM block is not a PRIVATE KEY or RSA PRIVATE KEY.";
		return NULL;
	}
	bio = BIO_new_mem_buf(pem, (int) len);
	if (bio == NULL)
	{
		*why = "Out of memory reading the key.";
		return NULL;
	}
	/* No passphrase callback: an empty one, so OpenSSL never prompts. */
	pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, (void *) "");
	BIO_free(bio);
	if (pkey == NULL)
		*why = "The PEM private key is malformed.";
	else if (EVP_PKEY_base_id(pkey) != EVP_PKEY_RSA)
	{
		*why = "The key is not an RSA key.";
		EVP_PKEY_free(pkey);
		pkey = NULL;
	}
	else if ((*bits = EVP_PKEY_get_bits(pkey)) < CC_RSA_MIN_BITS)
	{
		*why = "The RSA key is smaller than 2048 bits.";
		EVP_PKEY_free(pkey);
		pkey = NULL;
	}
	ERR_clear_error();
	return pkey;
}

/*
 * True when pem holds a usable RSA private key (see load_private_key), with
 * its size in *bits; false with *why set otherwise.
 */
bool
cc_private_key_inspect(const char *pem, size_t len, int *bits,
					   const char **why)
{
	EVP_PKEY   *pkey = load_private_key(pem, len, bits, why);

	if (pkey == NULL)
		return false;
	EVP_PKEY_free(pkey);
	return true;
}

/*
 * Signs data with the RSA private key of pem, RSASSA-PKCS1-v1_5 over
 * SHA-256 (SHA256withRSA, what WeChat Pay v3, Alipay RSA2 and UnionPay
 * signMethod 01 ask of merchants).  The signature goes into sig (room for
 * sigcap bytes), its length into *siglen.  False with *why set when the
 * key cannot be used or the signature does not fit.
 */
bool
cc_rsa_sha256_sign(const char *pem, size_t pemlen,
				   const unsigned char *data, size_t datalen,
				   unsigned char *sig, size_t sigcap, size_t *siglen,
				   const char **why)
{
	EVP_PKEY   *pkey;
	EVP_MD_CTX *ctx;
	int			bits;
	size_t		len = 0;
	bool		ok = false;

	pkey = load_private_key(pem, pemlen, &bits, why);
	if (pkey == NULL)
		return false;
	ctx = EVP_MD_CTX_new();
	if (ctx != NULL &&
		EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, pkey) == 1 &&
		EVP_DigestSign(ctx, NULL, &len, data, datalen) == 1)
	{
		if (len > sigcap)
			*why = "The signature is larger than expected.";
		else if (EVP_DigestSign(ctx, sig, &len, data, datalen) == 1)
		{
			*siglen = len;
			ok = true;
		}
		else
			*why = "The key could not sign.";
	}
	else
		*why = "The key could not sign.";
	EVP_MD_CTX_free(ctx);
	EVP_PKEY_free(pkey);
	ERR_clear_error();
	return ok;
}
