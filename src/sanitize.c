/*-------------------------------------------------------------------------
 *
 * sanitize.c
 *		Bytes from outside made into valid text.
 *
 * What receivers answer, and what libcurl says about them, is stored as
 * text (delivery_attempts.response and error, http_probe's body and
 * error).  Text that is not valid in the database encoding breaks
 * string functions on it and makes a dump of the table fail to restore,
 * and a NUL byte would cut it short.  cc_sanitize_text copies bytes
 * character by character: valid characters are kept, each maximal invalid
 * sequence and each NUL becomes one replacement (U+FFFD in a UTF8
 * database, "?" in others), the output never exceeds its byte cap and
 * ends on a character boundary, and a character cut by an earlier cap
 * (the response body's) is dropped rather than replaced.
 *
 * Pure (no palloc, no ereport) so that test/unit/sanitize_test.c links
 * this file alone.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <string.h>

#include "sanitize.h"

/*
 * The UTF-8 check (Unicode 15, table 3-7: no overlong forms, no
 * surrogates, nothing above U+10FFFF), as PostgreSQL's UTF8 encoding
 * accepts it.  An invalid sequence is reported as its maximal subpart (the
 * longest start of a valid sequence, at least one byte), which is replaced
 * as one character: the Unicode recommendation.  NUL is invalid.
 */
int
cc_utf8_char(const unsigned char *s, size_t len, void *arg)
{
	unsigned char c = s[0];
	unsigned char lo = 0x80;
	unsigned char hi = 0xBF;
	int			need;
	int			k;

	if (c == 0)
		return -1;
	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		need = 2;
	else if (c >= 0xE0 && c <= 0xEF)
	{
		need = 3;
		if (c == 0xE0)
			lo = 0xA0;
		else if (c == 0xED)
			hi = 0x9F;
	}
	else if (c >= 0xF0 && c <= 0xF4)
	{
		need = 4;
		if (c == 0xF0)
			lo = 0x90;
		else if (c == 0xF4)
			hi = 0x8F;
	}
	else
		return -1;
	for (k = 1; k < need; k++)
	{
		unsigned char b;

		if ((size_t) k >= len)
			return 0;
		b = s[k];
		if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF))
			return -k;
	}
	return need;
}

/*
 * Copies the inlen bytes at in into out as valid text, as the file header
 * says: at most outcap bytes and a NUL (out holds outcap + 1), characters
 * judged by check (with arg), invalid ones and NULs replaced by repl.  cut
 * says in was already cut short, so that a character incomplete at its
 * end is dropped; otherwise such a tail is invalid and replaced.  Returns
 * the length written and ORs CC_TEXT_* into *flags.
 */
size_t
cc_sanitize_text(const char *in, size_t inlen, bool cut,
				 char *out, size_t outcap,
				 CcCharCheck check, void *arg,
				 const char *repl, int *flags)
{
	size_t		rlen = strlen(repl);
	size_t		i = 0;
	size_t		o = 0;

	while (i < inlen)
	{
		const unsigned char *s = (const unsigned char *) in + i;
		size_t		rest = inlen - i;
		int			n = (s[0] == '\0') ? -1 : check(s, rest, arg);

		if (n == 0)
		{
			if (cut)
			{
				*flags |= CC_TEXT_SHORTENED;
				break;
			}
			n = -(int) Min(rest, 4);
		}
		if (n > 0 && (size_t) n > rest)
			n = -1;				/* a check that overreads: not text */
		if (n > 0)
		{
			if (o + n > outcap)
			{
				*flags |= CC_TEXT_SHORTENED;
				break;
			}
			memcpy(out + o, s, n);
			o += n;
			i += n;
		}
		else
		{
			if (o + rlen > outcap)
			{
				*flags |= CC_TEXT_SHORTENED;
				break;
			}
			memcpy(out + o, repl, rlen);
			o += rlen;
			i += Min((size_t) -n, rest);
			*flags |= CC_TEXT_REPLACED;
		}
	}
	out[o] = '\0';
	return o;
}
