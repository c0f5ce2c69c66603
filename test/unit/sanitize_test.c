/*
 * Unit tests of src/sanitize.c, printing TAP.  Built and run by
 * test/t/072_sanitize_unit.pl; links sanitize.c alone.
 */
#include "postgres.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sanitize.h"

/* port.h maps printf to pg_printf, which lives in the server binary. */
#undef printf

static int	ntests = 0;
static int	nfailed = 0;

static void
ok(bool cond, const char *name)
{
	ntests++;
	if (!cond)
		nfailed++;
	printf("%sok %d - %s\n", cond ? "" : "not ", ntests, name);
}

#define R CC_UTF8_REPLACEMENT

/*
 * Sanitizes inlen bytes of in (UTF-8 rules, cap bytes, cut) and checks the
 * output equals want and the flags equal want_flags.
 */
static void
utf8_case(const char *in, size_t inlen, size_t cap, bool cut,
		  const char *want, int want_flags, const char *name)
{
	char	   *out = malloc(cap + 1);
	int			flags = 0;
	size_t		n = cc_sanitize_text(in, inlen, cut, out, cap, cc_utf8_char,
									 NULL, R, &flags);
	bool		good = n == strlen(want) && strcmp(out, want) == 0 &&
		flags == want_flags && n <= cap;

	ok(good, name);
	if (!good)
	{
		size_t		i;

		printf("# got (flags %d):", flags);
		for (i = 0; i < n; i++)
			printf(" %02x", (unsigned char) out[i]);
		printf("\n");
	}
	free(out);
}

/* A check that replaces every byte above 0x7f, as "?" (a non-UTF8 stand-in). */
static int
ascii_char(const unsigned char *s, size_t len, void *arg)
{
	return s[0] < 0x80 ? 1 : -1;
}

static void
test_utf8(void)
{
	utf8_case("plain", 5, 100, false, "plain", 0, "ASCII is kept");
	utf8_case("", 0, 100, false, "", 0, "empty input");
	utf8_case("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 14, 100, false,
			  "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80", 0,
			  "two-, three- and four-byte characters are kept");
	utf8_case("a\xFFz", 3, 100, false, "a" R "z", CC_TEXT_REPLACED,
			  "an invalid byte becomes U+FFFD");
	utf8_case("a\x80\x80z", 4, 100, false, "a" R R "z", CC_TEXT_REPLACED,
			  "each lone continuation byte is one U+FFFD");
	utf8_case("a\xE2\x82z", 4, 100, false, "a" R "z", CC_TEXT_REPLACED,
			  "a truncated sequence inside the text is one U+FFFD (maximal subpart)");
	utf8_case("a\0b", 3, 100, false, "a" R "b", CC_TEXT_REPLACED,
			  "NUL becomes U+FFFD and the rest is kept");
	utf8_case("\xC0\xAF", 2, 100, false, R R, CC_TEXT_REPLACED,
			  "an overlong form is refused");
	utf8_case("\xE0\x80\xAF", 3, 100, false, R R R, CC_TEXT_REPLACED,
			  "an overlong three-byte form is refused");
	utf8_case("\xED\xA0\x80", 3, 100, false, R R R, CC_TEXT_REPLACED,
			  "a surrogate is refused");
	utf8_case("\xF4\x90\x80\x80", 4, 100, false, R R R R, CC_TEXT_REPLACED,
			  "above U+10FFFF is refused");
	utf8_case("\xF5\x80", 2, 100, false, R R, CC_TEXT_REPLACED,
			  "F5 never starts a character");
	utf8_case("\xF0\x9F\x98", 3, 100, false, R, CC_TEXT_REPLACED,
			  "an incomplete character at the end of a whole body is invalid");
	utf8_case("ab\xF0\x9F\x98", 5, 100, true, "ab", CC_TEXT_SHORTENED,
			  "an incomplete character at the end of a cut body is dropped");
	utf8_case("ab\xE2\x82\xAC", 5, 4, false, "ab", CC_TEXT_SHORTENED,
			  "the cap never splits a character");
	utf8_case("ab\xE2\x82\xAC", 5, 5, false, "ab\xE2\x82\xAC", 0,
			  "a character ending at the cap is kept");
	utf8_case("ab\xFF", 3, 4, false, "ab", CC_TEXT_SHORTENED,
			  "a replacement that does not fit is left out");
	utf8_case("abc", 3, 0, false, "", CC_TEXT_SHORTENED, "cap 0 keeps nothing");
}

static void
test_other_check(void)
{
	char		out[16];
	int			flags = 0;

	cc_sanitize_text("a\xE9\0z", 4, false, out, 15, ascii_char, NULL, "?", &flags);
	ok(strcmp(out, "a??z") == 0 && flags == CC_TEXT_REPLACED,
	   "another encoding's check and replacement are used as given");
}

int
main(void)
{
	test_utf8();
	test_other_check();
	printf("1..%d\n", ntests);
	return nfailed == 0 ? 0 : 1;
}
