/*-------------------------------------------------------------------------
 *
 * errcodes.h
 *		The SQLSTATEs callback_center raises of its own.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_ERRCODES_H
#define CC_ERRCODES_H

#include "fmgr.h"
#include "utils/elog.h"

/*
 * SQLSTATEs of the business errors, class CB ("callback_center").  Input
 * errors use the standard codes (22023 invalid_parameter_value, 22004
 * null_value_not_allowed, 22P02 invalid_text_representation, 42704
 * undefined_object, 42501 insufficient_privilege).  README lists them all.
 */
#define CC_ERRCODE_INSUFFICIENT_STOCK		MAKE_SQLSTATE('C','B','0','0','1')
#define CC_ERRCODE_VERSION_CONFLICT			MAKE_SQLSTATE('C','B','0','0','2')
#define CC_ERRCODE_CONTENTION				MAKE_SQLSTATE('C','B','0','0','3')
#define CC_ERRCODE_UNKNOWN_SKU				MAKE_SQLSTATE('C','B','0','0','4')
#define CC_ERRCODE_ORDER_HOLDS_STOCK		MAKE_SQLSTATE('C','B','0','0','5')
#define CC_ERRCODE_ILLEGAL_TRANSITION		MAKE_SQLSTATE('C','B','0','1','0')
#define CC_ERRCODE_UNKNOWN_STATE			MAKE_SQLSTATE('C','B','0','1','1')
#define CC_ERRCODE_UNKNOWN_CALLBACK			MAKE_SQLSTATE('C','B','0','2','1')
#define CC_ERRCODE_INVALID_SIGNATURE		MAKE_SQLSTATE('C','B','0','3','0')
#define CC_ERRCODE_SIGNATURE_EXPIRED		MAKE_SQLSTATE('C','B','0','3','1')
#define CC_ERRCODE_MALFORMED_SIGNATURE		MAKE_SQLSTATE('C','B','0','3','2')
#define CC_ERRCODE_UNKNOWN_PROVIDER			MAKE_SQLSTATE('C','B','0','3','3')
#define CC_ERRCODE_UNKNOWN_ENDPOINT			MAKE_SQLSTATE('C','B','0','4','0')
#define CC_ERRCODE_DESTINATION_NOT_ALLOWED	MAKE_SQLSTATE('C','B','0','4','1')
#define CC_ERRCODE_UNKNOWN_ORDER			MAKE_SQLSTATE('C','B','0','5','0')
#define CC_ERRCODE_COUPON_UNAVAILABLE		MAKE_SQLSTATE('C','B','0','5','1')
#define CC_ERRCODE_NO_MERCHANT_SETTINGS		MAKE_SQLSTATE('C','B','0','7','0')

/* The error of a C entry point given NULL for argument argno. */
static inline void
cc_require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", name)));
}

#endif							/* CC_ERRCODES_H */
