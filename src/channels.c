/*-------------------------------------------------------------------------
 *
 * channels.c
 *		The SQL face of the payment channels' cryptography: key inspection,
 *		RSA SHA256 verification, AES-256-GCM decryption, form decoding and
 *		escaping, certificate chains and Alipay's certificate SNs, for the
 *		schemes of src/sql/45_channels.sql (wechatpay_v3, alipay, unionpay).
 *
 * Thin wrappers over crypto.c.  They never put key material, plaintext or
 * a signature in an error: a bad key is 22023 with crypto.c's reason as the
 * detail.  Checks that a provider may fail (a signature that does not
 * match, a tag that does not authenticate) return a value, not an error,
 * so that the channel answers the provider in its own format.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "crypto.h"
#include "errcodes.h"
#include "signature.h"

PG_FUNCTION_INFO_V1(cc_key_info);
PG_FUNCTION_INFO_V1(cc_rsa_sha256_check);
PG_FUNCTION_INFO_V1(cc_aes256gcm_decrypt_sql);
PG_FUNCTION_INFO_V1(cc_form_decode);
PG_FUNCTION_INFO_V1(cc_form_escape);
PG_FUNCTION_INFO_V1(cc_hmac_sha256_sql);
PG_FUNCTION_INFO_V1(cc_x509_chain_check_sql);
PG_FUNCTION_INFO_V1(cc_alipay_cert_sn_sql);
PG_FUNCTION_INFO_V1(cc_alipay_root_cert_sn_sql);

/*
 * callback_center._key_info(pem text): one row (kind, bits, serial,
 * not_before, not_after) describing an RSA public key or certificate that
 * may be used now; 22023 with the reason otherwise (malformed PEM, a
 * private key, not RSA, fewer than 2048 bits, a certificate expired or not
 * yet valid).
 */
Datum
cc_key_info(PG_FUNCTION_ARGS)
{
	char	   *pem;
	CcKeyInfo	info;
	const char *why;
	TupleDesc	desc;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};

	cc_require_arg(fcinfo, 0, "key");
	pem = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!cc_key_inspect(pem, strlen(pem), true, &info, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid provider key"),
				 errdetail_internal("%s", why),
				 errhint("Give the RSA public key (PEM or base64) or the certificate the provider publishes, of 2048 bits or more.")));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = CStringGetTextDatum(info.kind == CC_KEY_CERTIFICATE ?
									"certificate" : "public_key");
	values[1] = Int32GetDatum(info.bits);
	if (info.kind == CC_KEY_CERTIFICATE)
	{
		values[2] = CStringGetTextDatum(info.serial);
		values[3] = TimestampTzGetDatum(time_t_to_timestamptz(info.not_before));
		values[4] = TimestampTzGetDatum(time_t_to_timestamptz(info.not_after));
	}
	else
		nulls[2] = nulls[3] = nulls[4] = true;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

/*
 * callback_center._rsa_sha256_check(pem text, data bytea, sig bytea): NULL
 * when sig is a SHA256withRSA (PKCS#1 v1.5) signature of data by the key or
 * certificate pem, else why not ("signature does not match", or why the key
 * cannot be used now, e.g. an expired certificate).
 */
Datum
cc_rsa_sha256_check(PG_FUNCTION_ARGS)
{
	char	   *pem;
	bytea	   *data;
	bytea	   *sig;
	const char *why = NULL;
	CcVerifyResult r;

	cc_require_arg(fcinfo, 0, "key");
	cc_require_arg(fcinfo, 1, "data");
	cc_require_arg(fcinfo, 2, "signature");
	pem = text_to_cstring(PG_GETARG_TEXT_PP(0));
	data = PG_GETARG_BYTEA_PP(1);
	sig = PG_GETARG_BYTEA_PP(2);
	r = cc_rsa_sha256_verify(pem, strlen(pem),
							 (unsigned char *) VARDATA_ANY(data),
							 VARSIZE_ANY_EXHDR(data),
							 (unsigned char *) VARDATA_ANY(sig),
							 VARSIZE_ANY_EXHDR(sig), &why);
	if (r == CC_VERIFY_OK)
		PG_RETURN_NULL();
	if (r == CC_VERIFY_BAD_SIGNATURE)
		PG_RETURN_TEXT_P(cstring_to_text("signature does not match"));
	PG_RETURN_TEXT_P(cstring_to_text(why));
}

/*
 * callback_center._aes256gcm_decrypt(key bytea, nonce bytea, aad bytea,
 * ct bytea): the plaintext of ct (ciphertext then 16-byte tag), or NULL
 * when it does not authenticate.  22023 for a key that is not 32 bytes.
 */
Datum
cc_aes256gcm_decrypt_sql(PG_FUNCTION_ARGS)
{
	bytea	   *key;
	bytea	   *nonce;
	bytea	   *aad;
	bytea	   *ct;
	bytea	   *out;
	size_t		ctlen;
	size_t		outlen;

	cc_require_arg(fcinfo, 0, "key");
	cc_require_arg(fcinfo, 1, "nonce");
	cc_require_arg(fcinfo, 2, "associated_data");
	cc_require_arg(fcinfo, 3, "ciphertext");
	key = PG_GETARG_BYTEA_PP(0);
	nonce = PG_GETARG_BYTEA_PP(1);
	aad = PG_GETARG_BYTEA_PP(2);
	ct = PG_GETARG_BYTEA_PP(3);
	if (VARSIZE_ANY_EXHDR(key) != CC_AES256_KEY_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid AES-256 key"),
				 errdetail("The key is %d bytes; AES-256 takes %d.",
						   (int) VARSIZE_ANY_EXHDR(key), CC_AES256_KEY_LEN)));
	ctlen = VARSIZE_ANY_EXHDR(ct);
	if (ctlen < CC_GCM_TAG_LEN)
		PG_RETURN_NULL();
	out = (bytea *) palloc(VARHDRSZ + ctlen - CC_GCM_TAG_LEN + 1);
	if (!cc_aes256gcm_decrypt((unsigned char *) VARDATA_ANY(key),
							  (unsigned char *) VARDATA_ANY(nonce),
							  VARSIZE_ANY_EXHDR(nonce),
							  (unsigned char *) VARDATA_ANY(aad),
							  VARSIZE_ANY_EXHDR(aad),
							  (unsigned char *) VARDATA_ANY(ct), ctlen,
							  (unsigned char *) VARDATA(out), &outlen))
		PG_RETURN_NULL();
	SET_VARSIZE(out, VARHDRSZ + outlen);
	PG_RETURN_BYTEA_P(out);
}

/*
 * callback_center._form_decode(s text): the bytes of one
 * application/x-www-form-urlencoded name or value, "+" read as a space and
 * %XX as that byte, in whatever charset the sender used; NULL when a "%" is
 * not followed by two hex digits.
 */
Datum
cc_form_decode(PG_FUNCTION_ARGS)
{
	text	   *s;
	const char *p;
	size_t		len;
	bytea	   *out;
	char	   *o;
	size_t		i;

	cc_require_arg(fcinfo, 0, "text");
	s = PG_GETARG_TEXT_PP(0);
	p = VARDATA_ANY(s);
	len = VARSIZE_ANY_EXHDR(s);
	out = (bytea *) palloc(VARHDRSZ + len);
	o = VARDATA(out);
	for (i = 0; i < len; i++)
	{
		if (p[i] == '+')
			*o++ = ' ';
		else if (p[i] == '%')
		{
			int			hi,
						lo;

			if (i + 2 >= len)
				PG_RETURN_NULL();
			hi = cc_hex_digit(p[i + 1]);
			lo = cc_hex_digit(p[i + 2]);
			if (hi < 0 || lo < 0)
				PG_RETURN_NULL();
			*o++ = (char) (hi << 4 | lo);
			i += 2;
		}
		else
			*o++ = p[i];
	}
	SET_VARSIZE(out, VARHDRSZ + (o - VARDATA(out)));
	PG_RETURN_BYTEA_P(out);
}

/*
 * callback_center._form_escape(b bytea): a form body given as bytes
 * (payment_callback's bytea overload: a GBK body need not be valid text) as
 * text that _form_decode reads back to the same bytes: every byte outside
 * printable ASCII becomes %XX, the rest ("&", "=", "+" and "%" escapes
 * included) is kept as it is.
 */
Datum
cc_form_escape(PG_FUNCTION_ARGS)
{
	static const char hex[] = "0123456789ABCDEF";
	bytea	   *b;
	const unsigned char *p;
	size_t		len;
	text	   *out;
	char	   *o;
	size_t		i;

	cc_require_arg(fcinfo, 0, "b");
	b = PG_GETARG_BYTEA_PP(0);
	p = (const unsigned char *) VARDATA_ANY(b);
	len = VARSIZE_ANY_EXHDR(b);
	if (len > (MaxAllocSize - VARHDRSZ) / 3)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("form body too long")));
	out = (text *) palloc(VARHDRSZ + 3 * len);
	o = VARDATA(out);
	for (i = 0; i < len; i++)
	{
		if (p[i] > 0x20 && p[i] < 0x7f)
			*o++ = (char) p[i];
		else
		{
			*o++ = '%';
			*o++ = hex[p[i] >> 4];
			*o++ = hex[p[i] & 0x0f];
		}
	}
	SET_VARSIZE(out, VARHDRSZ + (o - VARDATA(out)));
	PG_RETURN_TEXT_P(out);
}

/*
 * callback_center._hmac_sha256(key bytea, data bytea): HMAC-SHA256 of data
 * under key (WeChat Pay v2's HMAC-SHA256 sign), computed by signature.c.
 */
Datum
cc_hmac_sha256_sql(PG_FUNCTION_ARGS)
{
	bytea	   *key;
	bytea	   *data;
	bytea	   *out;
	const char *parts[1];
	size_t		lens[1];

	cc_require_arg(fcinfo, 0, "key");
	cc_require_arg(fcinfo, 1, "data");
	key = PG_GETARG_BYTEA_PP(0);
	data = PG_GETARG_BYTEA_PP(1);
	parts[0] = VARDATA_ANY(data);
	lens[0] = VARSIZE_ANY_EXHDR(data);
	out = (bytea *) palloc(VARHDRSZ + CC_SHA256_LEN);
	SET_VARSIZE(out, VARHDRSZ + CC_SHA256_LEN);
	cc_hmac_sha256((const uint8 *) VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key),
				   parts, lens, 1, (uint8 *) VARDATA(out));
	PG_RETURN_BYTEA_P(out);
}

/*
 * The non-NULL elements of a text[] as C strings; *n their count.
 */
static const char **
text_array_cstrings(ArrayType *arr, int *n)
{
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	const char **out;
	int			i;

	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &nelems);
	out = palloc(sizeof(char *) * (nelems + 1));
	*n = 0;
	for (i = 0; i < nelems; i++)
		if (!nulls[i])
			out[(*n)++] = TextDatumGetCString(elems[i]);
	return out;
}

/*
 * callback_center._x509_chain_check(cert text, cas text[], names text[]):
 * one row (verdict, detail).  verdict is 'ok' when cert (PEM) is an RSA
 * certificate that chains through the intermediates of cas to one of its
 * self-signed roots, every certificate valid now, and whose subject names
 * one of names (UnionPay's rule, see crypto.c; names NULL or empty skips
 * it); else 'malformed', 'untrusted', 'expired' or 'wrong_name', with
 * crypto.c's reason as detail.
 */
Datum
cc_x509_chain_check_sql(PG_FUNCTION_ARGS)
{
	char	   *pem;
	const char **cas;
	const char **names = NULL;
	int			ncas;
	int			nnames = 0;
	const char *why = NULL;
	CcChainResult r;
	TupleDesc	desc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	static const char *const verdicts[] = {
		[CC_CHAIN_OK] = "ok",
		[CC_CHAIN_MALFORMED] = "malformed",
		[CC_CHAIN_UNTRUSTED] = "untrusted",
		[CC_CHAIN_EXPIRED] = "expired",
		[CC_CHAIN_WRONG_NAME] = "wrong_name",
	};

	cc_require_arg(fcinfo, 0, "certificate");
	cc_require_arg(fcinfo, 1, "cas");
	pem = text_to_cstring(PG_GETARG_TEXT_PP(0));
	cas = text_array_cstrings(PG_GETARG_ARRAYTYPE_P(1), &ncas);
	if (!PG_ARGISNULL(2))
		names = text_array_cstrings(PG_GETARG_ARRAYTYPE_P(2), &nnames);
	r = cc_x509_chain_check(pem, strlen(pem), cas, ncas, names, nnames, &why);
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = CStringGetTextDatum(verdicts[r]);
	if (why != NULL)
		values[1] = CStringGetTextDatum(why);
	else
		nulls[1] = true;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}

/*
 * Alipay's SN of one certificate or of a bundle (see cc_alipay_cert_sn);
 * 22023 with the reason when it cannot be computed.
 */
static Datum
alipay_sn_datum(FunctionCallInfo fcinfo, bool bundle)
{
	text	   *pem;
	char		out[32 * (CC_ALIPAY_SN_LEN + 1)];
	const char *why;

	cc_require_arg(fcinfo, 0, bundle ? "certificates" : "certificate");
	pem = PG_GETARG_TEXT_PP(0);
	if (!cc_alipay_cert_sn(VARDATA_ANY(pem), VARSIZE_ANY_EXHDR(pem), bundle,
						   out, sizeof(out), &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid Alipay certificate"),
				 errdetail_internal("%s", why),
				 errhint(bundle ? "Give Alipay's root certificate file (alipayRootCert.crt) as PEM." :
						 "Give one PEM certificate (appCertPublicKey_<app id>.crt or alipayCertPublicKey_RSA2.crt).")));
	PG_RETURN_TEXT_P(cstring_to_text(out));
}

/*
 * callback_center.alipay_cert_sn(certificate text): app_cert_sn or
 * alipay_cert_sn, the SN Alipay computes for a certificate.
 */
Datum
cc_alipay_cert_sn_sql(PG_FUNCTION_ARGS)
{
	return alipay_sn_datum(fcinfo, false);
}

/*
 * callback_center.alipay_root_cert_sn(certificates text): alipay_root_cert_sn
 * of Alipay's root certificate file.
 */
Datum
cc_alipay_root_cert_sn_sql(PG_FUNCTION_ARGS)
{
	return alipay_sn_datum(fcinfo, true);
}
