/*-------------------------------------------------------------------------
 *
 * merchant.c
 *		The SQL face of the merchant's side of the payment channels: checks
 *		a merchant private key, signs outbound requests with it, and makes
 *		the nonces those requests carry (src/sql/46_adapters.sql).
 *
 * The private key never crosses SQL: _merchant_sign reads it from
 * callback_center.merchant_settings itself (SPI, as the function's owner
 * runs it) and returns only the signature, so no statement text, argument
 * or error ever carries it.  Errors name the provider, never the key.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "port.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "crypto.h"
#include "errcodes.h"
#include "signature.h"
#include "spi.h"

typedef enum MerchantPlanId
{
	MERCHANT_KEY,
	NUM_MERCHANT_PLANS
} MerchantPlanId;

static CcPlan plans[NUM_MERCHANT_PLANS] = {
	[MERCHANT_KEY] = {"SELECT m.private_key FROM callback_center.merchant_settings m"
					  " WHERE m.provider OPERATOR(pg_catalog.=) $1",
					  1, {TEXTOID}, 1},
};

PG_FUNCTION_INFO_V1(cc_merchant_key_bits);
PG_FUNCTION_INFO_V1(cc_merchant_sign);
PG_FUNCTION_INFO_V1(cc_adapter_nonce);

/*
 * callback_center._merchant_key_bits(private_key text): the size in bits
 * of a usable RSA private key (PEM, unencrypted, RSA, 2048 bits or more);
 * 22023 with the reason as the detail otherwise, never quoting the key.
 */
Datum
cc_merchant_key_bits(PG_FUNCTION_ARGS)
{
	char	   *pem;
	int			bits;
	const char *why;

	cc_require_arg(fcinfo, 0, "private_key");
	pem = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!cc_private_key_inspect(pem, strlen(pem), &bits, &why))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid merchant private key"),
				 errdetail_internal("%s", why),
				 errhint("Give the merchant's RSA private key of 2048 bits or more as an unencrypted PEM block (apiclient_key.pem, the RSA2 application private key, or the key of the UnionPay signing certificate).")));
	explicit_bzero(pem, strlen(pem));
	PG_RETURN_INT32(bits);
}

/*
 * callback_center._merchant_sign(provider text, data bytea): base64 of the
 * SHA256withRSA signature of data by the provider's merchant private key.
 * CB070 when the provider has no merchant settings.
 */
Datum
cc_merchant_sign(PG_FUNCTION_ARGS)
{
	text	   *provider;
	bytea	   *data;
	Datum		args[1];
	char	   *pem = NULL;
	unsigned char sig[CC_RSA_MAX_SIG_LEN];
	size_t		siglen = 0;
	const char *why = NULL;
	bool		ok;

	cc_require_arg(fcinfo, 0, "provider");
	cc_require_arg(fcinfo, 1, "data");
	provider = PG_GETARG_TEXT_PP(0);
	data = PG_GETARG_BYTEA_PP(1);

	args[0] = PointerGetDatum(provider);
	SPI_connect();
	if (cc_plan_exec(&plans[MERCHANT_KEY], args, NULL, true, 1,
					 SPI_OK_SELECT) == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0],
									 SPI_tuptable->tupdesc, 1);

		if (v != NULL)
		{
			pem = MemoryContextStrdup(TopTransactionContext, v);
			explicit_bzero(v, strlen(v));
		}
	}
	SPI_finish();
	if (pem == NULL)
		ereport(ERROR,
				(errcode(CC_ERRCODE_NO_MERCHANT_SETTINGS),
				 errmsg("provider \"%s\" has no merchant settings",
						text_to_cstring(provider)),
				 errhint("An administrator loads them with callback_center.set_merchant().")));

	ok = cc_rsa_sha256_sign(pem, strlen(pem),
							(unsigned char *) VARDATA_ANY(data),
							VARSIZE_ANY_EXHDR(data),
							sig, sizeof(sig), &siglen, &why);
	explicit_bzero(pem, strlen(pem));
	pfree(pem);
	if (!ok)
		ereport(ERROR,
				(errcode(CC_ERRCODE_NO_MERCHANT_SETTINGS),
				 errmsg("the merchant key of provider \"%s\" cannot sign",
						text_to_cstring(provider)),
				 errdetail_internal("%s", why)));
	PG_RETURN_TEXT_P(cstring_to_text(cc_base64_encode(sig, siglen)));
}

/*
 * callback_center._adapter_nonce(): 32 random hexadecimal characters from
 * the strong random source, for the nonce_str / nonce of a request.
 */
Datum
cc_adapter_nonce(PG_FUNCTION_ARGS)
{
	uint8		raw[16];

	if (!pg_strong_random(raw, sizeof(raw)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate a random nonce")));
	PG_RETURN_TEXT_P(cstring_to_text(cc_hex_encode(raw, sizeof(raw))));
}
