/*-------------------------------------------------------------------------
 *
 * inbound.c
 *		Inbound callbacks: idempotent recording (record_callback) and the SQL
 *		face of webhook signatures (verify_signature, sign_webhook,
 *		sign_stripe) and secrets (new_webhook_secret, _new_endpoint_secret).
 *
 * record_callback is the hot path: one prepared INSERT ... ON CONFLICT DO
 * NOTHING for a first delivery, and a second statement, with a fresh
 * READ COMMITTED snapshot, to read what an earlier delivery left.  The
 * unique index on (biz_id, callback_type) does the serialising: a second
 * concurrent first call waits on it until the first commits or aborts.
 *
 * Signature verification computes the HMAC with pgcrypto's hmac(), found in
 * whatever schema pgcrypto was installed into and called through fmgr; the
 * plain-C HMAC of signature.c signs (sign_webhook, sign_stripe) and serves
 * the delivery worker, and the tests check that the two agree.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "inbound.h"
#include "errcodes.h"
#include "signature.h"
#include "spi.h"

int			cc_signature_tolerance_s = 300;
int			cc_callback_max_retries = 5;

/* Status values of callback_center.callback_record. */
#define CB_PENDING		0
#define CB_PROCESSING	1
#define CB_SUCCEEDED	2
#define CB_FAILED		3

/* Rounds of insert-then-read before giving up (rows deleted under us). */
#define RECORD_ATTEMPTS 5

/*
 * Longest biz_id or callback_type, and provider name, in bytes: the same
 * limits as callback_center._require_key (src/sql/00_schema.sql).  Longer
 * keys were a 54000 from the unique index.
 */
#define CC_MAX_KEY_BYTES 200
#define CC_MAX_PROVIDER_BYTES 63

/* The statements, prepared once per backend (spi.h). */
typedef enum CallbackPlanId
{
	CB_PLAN_INSERT,
	CB_PLAN_READ,
	CB_PLAN_CLAIM,
	CB_PLAN_CONFLICT,
	CB_PLAN_PROVIDER,
	CB_PLAN_HMAC,
	NUM_CB_PLANS
} CallbackPlanId;

static CcPlan plans[NUM_CB_PLANS] = {
	[CB_PLAN_INSERT] = {
		"INSERT INTO callback_center.callback_record"
		" (biz_id, callback_type, status, payload, payload_hash)"
		" VALUES ($1, $2, 1, $3, $4)"
		" ON CONFLICT (biz_id, callback_type) DO NOTHING"
		" RETURNING id",
		4, {TEXTOID, TEXTOID, TEXTOID, BYTEAOID}, 1
	},
	[CB_PLAN_READ] = {
		"SELECT id, status, retry_count, payload_hash, result"
		" FROM callback_center.callback_record"
		" WHERE biz_id OPERATOR(pg_catalog.=) $1"
		" AND callback_type OPERATOR(pg_catalog.=) $2",
		2, {TEXTOID, TEXTOID}, 1
	},
	[CB_PLAN_CLAIM] = {
		"UPDATE callback_center.callback_record"
		" SET status = 1,"
		" retry_count = retry_count OPERATOR(pg_catalog.+)"
		" CASE WHEN status OPERATOR(pg_catalog.=) 3 THEN 1 ELSE 0 END,"
		" result = NULL, completed_at = NULL,"
		" updated_at = pg_catalog.now()"
		" WHERE id OPERATOR(pg_catalog.=) $1"
		" AND (status OPERATOR(pg_catalog.=) 0"
		" OR (status OPERATOR(pg_catalog.=) 3"
		" AND retry_count OPERATOR(pg_catalog.<) $2))"
		" RETURNING id",
		2, {INT8OID, INT4OID}, 1
	},
	[CB_PLAN_CONFLICT] = {
		"INSERT INTO callback_center.callback_conflicts"
		" (biz_id, callback_type, payload, payload_hash)"
		" VALUES ($1, $2, $3, $4)",
		4, {TEXTOID, TEXTOID, TEXTOID, BYTEAOID}, 1
	},
	[CB_PLAN_PROVIDER] = {
		"SELECT scheme, secrets,"
		" pg_catalog.date_part('epoch', tolerance)::bigint"
		" FROM callback_center.providers WHERE name OPERATOR(pg_catalog.=) $1",
		1, {TEXTOID}, 1
	},
	/* pgcrypto's hmac(bytea, bytea, text), in whichever schema it lives */
	[CB_PLAN_HMAC] = {
		"SELECT p.oid FROM pg_catalog.pg_proc p"
		" JOIN pg_catalog.pg_extension e"
		" ON e.extnamespace OPERATOR(pg_catalog.=) p.pronamespace"
		" WHERE e.extname OPERATOR(pg_catalog.=) 'pgcrypto'"
		" AND p.proname OPERATOR(pg_catalog.=) 'hmac'"
		" AND p.proargtypes OPERATOR(pg_catalog.=) '17 17 25'::pg_catalog.oidvector",
		0, {InvalidOid}
	},
};

PG_FUNCTION_INFO_V1(cc_record_callback);
PG_FUNCTION_INFO_V1(cc_verify_signature);
PG_FUNCTION_INFO_V1(cc_sign_webhook_sql);
PG_FUNCTION_INFO_V1(cc_sign_stripe_sql);
PG_FUNCTION_INFO_V1(cc_new_webhook_secret);
PG_FUNCTION_INFO_V1(cc_new_endpoint_secret);

/*
 * Defines the settings of inbound callbacks and signatures.  Called from
 * _PG_init in every process that loads the library.
 */
void
cc_inbound_define_gucs(void)
{
	DefineCustomIntVariable("callback_center.signature_tolerance",
							"Largest difference between a webhook's signed timestamp and the server clock.",
							"A provider's own tolerance, when set, takes precedence.",
							&cc_signature_tolerance_s,
							300,
							1,
							INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("callback_center.callback_max_retries",
							"Times a failed callback may be processed again when its provider repeats it.",
							"Past this many retries a repeat of a failed callback is answered with the failure.",
							&cc_callback_max_retries,
							5,
							0,
							INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);
}

/*
 * Raises invalid_parameter_value when a key is longer than max_bytes; the
 * message gives its length, never the key itself.
 */
static void
require_key_length(text *key, const char *name, int max_bytes)
{
	if (VARSIZE_ANY_EXHDR(key) > max_bytes)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is too long: %zu bytes, at most %d",
						name, (size_t) VARSIZE_ANY_EXHDR(key), max_bytes)));
}

/*
 * callback_center.record_callback(biz_id, callback_type, payload): one row
 * (callback_id, is_first, status, result, payload_mismatch).
 *
 * Guarantees: at most one caller at a time gets is_first = true for a key,
 * and only when the key is new, was left pending (0), or failed (3) with
 * retries left; a repeat whose payload hash differs from the stored one is
 * never processed, is written to callback_conflicts and comes back with
 * payload_mismatch = true; any other repeat returns the stored outcome.
 */
Datum
cc_record_callback(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	text	   *biz_id;
	text	   *callback_type;
	text	   *payload;
	uint8		hash[CC_SHA256_LEN];
	bytea	   *hash_bytea;
	Datum		args[4];
	Datum		out[5];
	bool		outnulls[5] = {0};
	int			attempt;
	bool		done = false;

	cc_require_arg(fcinfo, 0, "biz_id");
	cc_require_arg(fcinfo, 1, "callback_type");
	cc_require_arg(fcinfo, 2, "payload");
	biz_id = PG_GETARG_TEXT_PP(0);
	callback_type = PG_GETARG_TEXT_PP(1);
	payload = PG_GETARG_TEXT_PP(2);
	if (VARSIZE_ANY_EXHDR(biz_id) == 0 || VARSIZE_ANY_EXHDR(callback_type) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("biz_id and callback_type must not be empty")));
	require_key_length(biz_id, "biz_id", CC_MAX_KEY_BYTES);
	require_key_length(callback_type, "callback_type", CC_MAX_KEY_BYTES);

	cc_sha256(VARDATA_ANY(payload), VARSIZE_ANY_EXHDR(payload), hash);
	hash_bytea = (bytea *) palloc(VARHDRSZ + CC_SHA256_LEN);
	SET_VARSIZE(hash_bytea, VARHDRSZ + CC_SHA256_LEN);
	memcpy(VARDATA(hash_bytea), hash, CC_SHA256_LEN);

	InitMaterializedSRF(fcinfo, 0);

	args[0] = PointerGetDatum(biz_id);
	args[1] = PointerGetDatum(callback_type);
	args[2] = PointerGetDatum(payload);
	args[3] = PointerGetDatum(hash_bytea);

	SPI_connect();

	for (attempt = 0; attempt < RECORD_ATTEMPTS && !done; attempt++)
	{
		HeapTuple	tup;
		TupleDesc	desc;
		bool		isnull;
		int16		status;
		int32		retries;
		bytea	   *stored_hash;
		Datum		value;
		Datum		claim_args[2];

		if (cc_plan_exec(&plans[CB_PLAN_INSERT], args, NULL, false, 1,
						 SPI_OK_INSERT_RETURNING) == 1)
		{
			out[0] = SPI_getbinval(SPI_tuptable->vals[0],
								   SPI_tuptable->tupdesc, 1, &isnull);
			out[1] = BoolGetDatum(true);
			out[2] = Int16GetDatum(CB_PROCESSING);
			outnulls[3] = true;
			out[4] = BoolGetDatum(false);
			done = true;
			break;
		}

		/*
		 * The key exists and its inserter has committed (ON CONFLICT waited
		 * for it).  A new statement takes a new snapshot, which sees it.
		 */
		if (cc_plan_exec(&plans[CB_PLAN_READ], args, NULL, false, 1,
						 SPI_OK_SELECT) == 0)
			continue;			/* deleted meanwhile: insert again */

		tup = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		out[0] = SPI_getbinval(tup, desc, 1, &isnull);
		status = DatumGetInt16(SPI_getbinval(tup, desc, 2, &isnull));
		retries = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
		value = SPI_getbinval(tup, desc, 4, &isnull);
		stored_hash = isnull ? NULL : DatumGetByteaPP(value);
		out[3] = SPI_getbinval(tup, desc, 5, &outnulls[3]);
		out[1] = BoolGetDatum(false);
		out[2] = Int16GetDatum(status);
		out[4] = BoolGetDatum(false);

		if (stored_hash == NULL ||
			VARSIZE_ANY_EXHDR(stored_hash) != CC_SHA256_LEN ||
			!cc_equal_consttime((uint8 *) VARDATA_ANY(stored_hash), hash,
								CC_SHA256_LEN))
		{
			/* A different body under a known key: flag it, never process. */
			(void) cc_plan_exec(&plans[CB_PLAN_CONFLICT], args, NULL, false, 0,
								SPI_OK_INSERT);
			out[4] = BoolGetDatum(true);
			done = true;
			break;
		}

		if (status != CB_PENDING &&
			!(status == CB_FAILED && retries < cc_callback_max_retries))
		{
			done = true;		/* processing, succeeded, or out of retries */
			break;
		}

		/*
		 * Claim a pending row or a failed one with retries left.  The UPDATE
		 * rechecks the condition after any concurrent claimer commits, so
		 * only one caller wins; a loser reads the row again.
		 */
		claim_args[0] = out[0];
		claim_args[1] = Int32GetDatum(cc_callback_max_retries);
		if (cc_plan_exec(&plans[CB_PLAN_CLAIM], claim_args, NULL, false, 1,
						 SPI_OK_UPDATE_RETURNING) == 1)
		{
			out[1] = BoolGetDatum(true);
			out[2] = Int16GetDatum(CB_PROCESSING);
			outnulls[3] = true;
			done = true;
			break;
		}
	}
	if (!done)
		ereport(ERROR,
				(errcode(CC_ERRCODE_CONTENTION),
				 errmsg("could not record callback after %d attempts",
						RECORD_ATTEMPTS),
				 errdetail("The callback row kept changing under concurrent deletes or claims."),
				 errhint("Retry the call.")));

	/* tuplestore_putvalues copies, so SPI memory may go after this */
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, out, outnulls);
	SPI_finish();
	return (Datum) 0;
}

/*
 * The value of header name (ASCII case-insensitive) in the headers object,
 * or NULL when absent.  Raises malformed signature when the header is not a
 * string or appears twice under different spellings.
 */
static char *
find_header(Jsonb *headers, const char *name)
{
	JsonbIterator *it = JsonbIteratorInit(&headers->root);
	JsonbValue	v;
	JsonbIteratorToken tok;
	size_t		namelen = strlen(name);
	char	   *found = NULL;
	bool		match = false;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			match = (v.val.string.len == namelen &&
					 pg_strncasecmp(v.val.string.val, name, namelen) == 0);
		else if (tok == WJB_VALUE && match)
		{
			if (v.type != jbvString)
				ereport(ERROR,
						(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
						 errmsg("malformed signature"),
						 errdetail("Header \"%s\" is not a string.", name)));
			if (found != NULL)
				ereport(ERROR,
						(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
						 errmsg("malformed signature"),
						 errdetail("Header \"%s\" appears more than once.",
								   name)));
			found = pnstrdup(v.val.string.val, v.val.string.len);
			match = false;
		}
	}
	return found;
}

/*
 * find_header, raising malformed signature when the header is absent.
 */
static char *
require_header(Jsonb *headers, const char *name)
{
	char	   *value = find_header(headers, name);

	if (value == NULL)
		ereport(ERROR,
				(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
				 errmsg("malformed signature"),
				 errdetail("Header \"%s\" is missing.", name)));
	return value;
}

/*
 * Raises signature expired when ts is further than tolerance seconds from
 * the server clock, in either direction.
 */
static void
check_tolerance(int64 ts, int64 tolerance)
{
	int64		now;

	now = GetCurrentTimestamp() / USECS_PER_SEC +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY;
	if (ts < now - tolerance || ts > now + tolerance)
		ereport(ERROR,
				(errcode(CC_ERRCODE_SIGNATURE_EXPIRED),
				 errmsg("signature expired"),
				 errdetail("The signed timestamp is %s the server clock by more than the tolerance of " INT64_FORMAT " seconds.",
						   ts < now ? "behind" : "ahead of", tolerance)));
}

/*
 * OID of pgcrypto's hmac(bytea, bytea, text), in whichever schema pgcrypto
 * lives.  Must be called while connected to SPI.
 */
static Oid
pgcrypto_hmac_oid(void)
{
	bool		isnull;

	if (cc_plan_exec(&plans[CB_PLAN_HMAC], NULL, NULL, true, 1,
					 SPI_OK_SELECT) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pgcrypto function hmac(bytea, bytea, text) not found"),
				 errhint("Install pgcrypto in this database: CREATE EXTENSION pgcrypto.")));
	return DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * bytea holding the concatenation of n parts.
 */
static bytea *
concat_bytea(const char *const *parts, const size_t *lens, int n)
{
	size_t		total = 0;
	bytea	   *b;
	char	   *p;
	int			i;

	for (i = 0; i < n; i++)
		total += lens[i];
	b = (bytea *) palloc(VARHDRSZ + total);
	SET_VARSIZE(b, VARHDRSZ + total);
	p = VARDATA(b);
	for (i = 0; i < n; i++)
	{
		memcpy(p, parts[i], lens[i]);
		p += lens[i];
	}
	return b;
}

/*
 * True when pgcrypto's HMAC-SHA256 of content under key equals any of the
 * header's signatures.  Compares against every signature, never stopping
 * at the first match or mismatch.
 */
static bool
hmac_matches(Oid hmacfn, bytea *content, const uint8 *key, size_t keylen,
			 const CcSignatureHeader *hdr)
{
	bytea	   *keyb;
	bytea	   *mac;
	bool		matched = false;
	int			i;

	keyb = concat_bytea((const char *const *) &key, &keylen, 1);
	mac = DatumGetByteaPP(OidFunctionCall3Coll(hmacfn, InvalidOid,
											   PointerGetDatum(content),
											   PointerGetDatum(keyb),
											   CStringGetTextDatum("sha256")));
	if (VARSIZE_ANY_EXHDR(mac) != CC_SHA256_LEN)
		elog(ERROR, "pgcrypto hmac returned %d bytes",
			 (int) VARSIZE_ANY_EXHDR(mac));
	for (i = 0; i < hdr->nsigs; i++)
		matched |= cc_equal_consttime((const uint8 *) VARDATA_ANY(mac),
									  hdr->sigs[i], CC_SHA256_LEN);
	return matched;
}

/*
 * callback_center.verify_signature(provider, headers, body): true when one
 * of the provider's secrets signed body as the headers claim, within the
 * time tolerance.  Raises otherwise (see doc/inbound.md); never puts a
 * secret or an expected signature in an error.
 */
Datum
cc_verify_signature(PG_FUNCTION_ARGS)
{
	text	   *provider;
	Jsonb	   *headers;
	text	   *body;
	char	   *provider_name;
	Datum		args[1];
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	char	   *scheme;
	Datum	   *secrets;
	bool	   *secret_nulls;
	int			nsecrets;
	int64		tolerance;
	Oid			hmacfn;
	CcSignatureHeader hdr;
	const char *why = NULL;
	bool		matched = false;
	int			i;

	cc_require_arg(fcinfo, 0, "provider");
	cc_require_arg(fcinfo, 1, "headers");
	cc_require_arg(fcinfo, 2, "body");
	provider = PG_GETARG_TEXT_PP(0);
	headers = PG_GETARG_JSONB_P(1);
	body = PG_GETARG_TEXT_PP(2);
	require_key_length(provider, "provider", CC_MAX_PROVIDER_BYTES);
	provider_name = text_to_cstring(provider);

	SPI_connect();
	args[0] = PointerGetDatum(provider);
	if (cc_plan_exec(&plans[CB_PLAN_PROVIDER], args, NULL, true, 1,
					 SPI_OK_SELECT) == 0)
		ereport(ERROR,
				(errcode(CC_ERRCODE_UNKNOWN_PROVIDER),
				 errmsg("unknown provider \"%s\"", provider_name),
				 errhint("An administrator registers providers with callback_center.set_provider().")));
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	scheme = SPI_getvalue(tup, desc, 1);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, 2, &isnull)),
					  TEXTOID, -1, false, TYPALIGN_INT,
					  &secrets, &secret_nulls, &nsecrets);
	tolerance = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	if (isnull)
		tolerance = cc_signature_tolerance_s;
	hmacfn = pgcrypto_hmac_oid();

	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
		ereport(ERROR,
				(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
				 errmsg("malformed signature"),
				 errdetail("The headers must be a JSON object of header names to strings.")));

	if (strcmp(scheme, "standard_webhooks") == 0)
	{
		char	   *msg_id = require_header(headers, "webhook-id");
		char	   *ts_text = require_header(headers, "webhook-timestamp");
		char	   *sig = require_header(headers, "webhook-signature");
		const char *parts[CC_WEBHOOK_PARTS];
		size_t		lens[CC_WEBHOOK_PARTS];
		bytea	   *content;

		if (!cc_parse_int64(ts_text, strlen(ts_text), &hdr.timestamp))
			ereport(ERROR,
					(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
					 errmsg("malformed signature"),
					 errdetail("Header \"webhook-timestamp\" is not a unix timestamp.")));
		if (!cc_parse_webhook_signature(sig, &hdr, &why))
			ereport(ERROR,
					(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
					 errmsg("malformed signature"),
					 errdetail_internal("%s", why)));
		check_tolerance(hdr.timestamp, tolerance);

		cc_webhook_signed_content(msg_id, ts_text, strlen(ts_text),
								  VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
								  parts, lens);
		content = concat_bytea(parts, lens, CC_WEBHOOK_PARTS);

		for (i = 0; i < nsecrets; i++)
		{
			uint8	   *key;
			size_t		keylen;

			if (secret_nulls[i] ||
				!cc_webhook_secret_key(TextDatumGetCString(secrets[i]),
									   &key, &keylen))
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("provider \"%s\" has a malformed secret",
								provider_name),
						 errhint("Set the provider's secrets again with callback_center.set_provider().")));
			matched |= hmac_matches(hmacfn, content, key, keylen, &hdr);
		}
	}
	else if (strcmp(scheme, "stripe") == 0)
	{
		char	   *sig = require_header(headers, "stripe-signature");
		const char *parts[CC_STRIPE_PARTS];
		size_t		lens[CC_STRIPE_PARTS];
		bytea	   *content;

		if (!cc_parse_stripe_signature(sig, &hdr, &why))
			ereport(ERROR,
					(errcode(CC_ERRCODE_MALFORMED_SIGNATURE),
					 errmsg("malformed signature"),
					 errdetail_internal("%s", why)));
		check_tolerance(hdr.timestamp, tolerance);

		cc_stripe_signed_content(hdr.timestamp_text, hdr.timestamp_len,
								 VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
								 parts, lens);
		content = concat_bytea(parts, lens, CC_STRIPE_PARTS);

		for (i = 0; i < nsecrets; i++)
		{
			char	   *secret;

			if (secret_nulls[i])
				continue;
			secret = TextDatumGetCString(secrets[i]);
			matched |= hmac_matches(hmacfn, content, (uint8 *) secret,
									strlen(secret), &hdr);
		}
	}
	else if (strcmp(scheme, "wechatpay_v3") == 0 ||
			 strcmp(scheme, "wechatpay_v2") == 0 || strcmp(scheme, "alipay") == 0 ||
			 strcmp(scheme, "unionpay") == 0)
		/* Payment channels: verified by payment_callback (45_channels.sql). */
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("verify_signature does not verify scheme %s", scheme),
				 errhint("Pass the notification to callback_center.payment_callback(), which verifies, decodes and answers it.")));
	else
		elog(ERROR, "unknown signature scheme \"%s\"", scheme);

	if (!matched)
		ereport(ERROR,
				(errcode(CC_ERRCODE_INVALID_SIGNATURE),
				 errmsg("invalid signature"),
				 errdetail("No secret of provider \"%s\" produces a v1 signature the headers carry.",
						   provider_name)));
	SPI_finish();
	PG_RETURN_BOOL(true);
}

/*
 * callback_center.sign_webhook(secret, msg_id, ts, body): the Standard
 * Webhooks "v1,<base64>" signature, computed in C without pgcrypto.  Not
 * STRICT: a NULL argument raises, as everywhere in the API, rather than
 * yielding a NULL header that would fail later as "malformed".
 */
Datum
cc_sign_webhook_sql(PG_FUNCTION_ARGS)
{
	char	   *secret;
	char	   *msg_id;
	int64		ts;
	text	   *body;
	uint8	   *key;
	size_t		keylen;

	cc_require_arg(fcinfo, 0, "secret");
	cc_require_arg(fcinfo, 1, "msg_id");
	cc_require_arg(fcinfo, 2, "ts");
	cc_require_arg(fcinfo, 3, "body");
	secret = text_to_cstring(PG_GETARG_TEXT_PP(0));
	msg_id = text_to_cstring(PG_GETARG_TEXT_PP(1));
	ts = PG_GETARG_INT64(2);
	body = PG_GETARG_TEXT_PP(3);
	if (!cc_webhook_secret_key(secret, &key, &keylen))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("secret is not a Standard Webhooks secret"),
				 errhint("A Standard Webhooks secret is \"whsec_\" followed by standard base64; callback_center.new_webhook_secret() makes one.")));
	PG_RETURN_TEXT_P(cstring_to_text(cc_sign_webhook(key, keylen, msg_id, ts,
													 VARDATA_ANY(body),
													 VARSIZE_ANY_EXHDR(body))));
}

/*
 * callback_center.sign_stripe(secret, ts, body): the Stripe-Signature
 * header value "t=<ts>,v1=<hex>", computed in C without pgcrypto.
 */
Datum
cc_sign_stripe_sql(PG_FUNCTION_ARGS)
{
	char	   *secret;
	int64		ts;
	text	   *body;

	cc_require_arg(fcinfo, 0, "secret");
	cc_require_arg(fcinfo, 1, "ts");
	cc_require_arg(fcinfo, 2, "body");
	secret = text_to_cstring(PG_GETARG_TEXT_PP(0));
	ts = PG_GETARG_INT64(1);
	body = PG_GETARG_TEXT_PP(2);
	if (secret[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("secret must not be empty")));
	PG_RETURN_TEXT_P(cstring_to_text(cc_sign_stripe(secret, ts,
													VARDATA_ANY(body),
													VARSIZE_ANY_EXHDR(body))));
}

/*
 * callback_center.new_webhook_secret(): a fresh "whsec_" secret of
 * CC_PROVIDER_SECRET_BYTES random bytes (cc_new_webhook_secret_text).
 */
Datum
cc_new_webhook_secret(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(cc_new_webhook_secret_text(CC_PROVIDER_SECRET_BYTES)));
}

/*
 * callback_center._new_endpoint_secret(): the secret an endpoint gets when
 * none is given, CC_ENDPOINT_SECRET_BYTES random bytes from the same
 * generator.
 */
Datum
cc_new_endpoint_secret(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(cc_new_webhook_secret_text(CC_ENDPOINT_SECRET_BYTES)));
}
