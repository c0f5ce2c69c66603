/*-------------------------------------------------------------------------
 *
 * sanitize.h
 *		Bytes from outside (response bodies, libcurl's messages) made into
 *		valid text.
 *
 * Pure functions (no palloc, no server calls) so test/unit/sanitize_test.c
 * links sanitize.c alone; http.c supplies the database encoding's check.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_SANITIZE_H
#define CC_SANITIZE_H

#include "postgres.h"

/*
 * What a character check says of the bytes at s (len > 0 of them): > 0,
 * the length of the valid character there; 0, they are the valid start of
 * a character that needs more bytes than len; < 0, the first -n bytes are
 * no valid text and are replaced as one.
 */
typedef int (*CcCharCheck) (const unsigned char *s, size_t len, void *arg);

/* Flags cc_sanitize_text sets. */
#define CC_TEXT_REPLACED	1	/* invalid bytes or NULs were replaced */
#define CC_TEXT_SHORTENED	2	/* input was left out to stay within outcap,
								 * or a character cut at the end dropped */

/* U+FFFD REPLACEMENT CHARACTER in UTF-8. */
#define CC_UTF8_REPLACEMENT "\xEF\xBF\xBD"

extern int	cc_utf8_char(const unsigned char *s, size_t len, void *arg);
extern size_t cc_sanitize_text(const char *in, size_t inlen, bool cut,
							   char *out, size_t outcap,
							   CcCharCheck check, void *arg,
							   const char *repl, int *flags);

#endif							/* CC_SANITIZE_H */
