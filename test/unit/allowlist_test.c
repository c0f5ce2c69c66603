/*
 * Unit tests of src/allowlist.c, printing TAP.  Built and run by
 * test/t/063_allowlist_unit.pl; links allowlist.c alone (it calls nothing
 * of the server).
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "allowlist.h"

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

/* Whether address text a (IPv4 or IPv6) matches the list spec. */
static bool
addr_in(const char *spec, const char *a)
{
	char		err[256];
	CcAllowList *l = cc_allowlist_parse(spec, err, sizeof(err));
	struct sockaddr_in sin;
	struct sockaddr_in6 sin6;
	bool		r;

	if (l == NULL)
		return false;
	memset(&sin, 0, sizeof(sin));
	memset(&sin6, 0, sizeof(sin6));
	if (inet_pton(AF_INET, a, &sin.sin_addr) == 1)
	{
		sin.sin_family = AF_INET;
		r = cc_allowlist_match_addr(l, (struct sockaddr *) &sin);
	}
	else
	{
		if (inet_pton(AF_INET6, a, &sin6.sin6_addr) != 1)
			abort();
		sin6.sin6_family = AF_INET6;
		r = cc_allowlist_match_addr(l, (struct sockaddr *) &sin6);
	}
	free(l);
	return r;
}

/* Whether spec parses; when it does not, whether err equals want. */
static void
parse_case(const char *spec, const char *want_err, const char *name)
{
	char		err[256];
	CcAllowList *l = cc_allowlist_parse(spec, err, sizeof(err));

	if (want_err == NULL)
		ok(l != NULL, name);
	else
	{
		ok(l == NULL && strcmp(err, want_err) == 0, name);
		if (l != NULL || strcmp(err, want_err) != 0)
			printf("# got \"%s\"\n", l ? "(parsed)" : err);
	}
	free(l);
}

static bool
name_in(const char *spec, const char *host)
{
	char		err[256];
	CcAllowList *l = cc_allowlist_parse(spec, err, sizeof(err));
	bool		r = l != NULL && cc_allowlist_match_name(l, host);

	free(l);
	return r;
}

static int
check_host(const char *spec, const char *host)
{
	char		err[256];
	CcAllowList *l = cc_allowlist_parse(spec, err, sizeof(err));
	int			r = cc_allowlist_check_host(l, host);

	free(l);
	return r;
}

static void
test_parse(void)
{
	char		err[256];
	CcAllowList *l;

	l = cc_allowlist_parse("", err, sizeof(err));
	ok(l != NULL && l->n == 0, "empty list parses to no entries");
	free(l);
	l = cc_allowlist_parse(" hooks.example.com, *.example.org 10.0.0.0/8,[::1] fd00::/8 ,",
						   err, sizeof(err));
	ok(l != NULL && l->n == 5 && l->nnames == 2 && l->nnets == 3,
	   "commas and spaces separate five entries: 2 names, 3 networks");
	free(l);
	parse_case("127.0.0.1", NULL, "an IPv4 address");
	parse_case("0.0.0.0/0", NULL, "the whole IPv4 space");
	parse_case("::/0", NULL, "the whole IPv6 space");
	parse_case("[fd00::]/8", NULL, "a bracketed IPv6 network");
	parse_case("my_host-1.internal", NULL, "underscores and hyphens in names");
	parse_case("10.0.0.0/33", "Entry \"10.0.0.0/33\" has a prefix length outside 0 to 32.",
			   "IPv4 prefix over 32");
	parse_case("fd00::/129", "Entry \"fd00::/129\" has a prefix length outside 0 to 128.",
			   "IPv6 prefix over 128");
	parse_case("10.0.0.1/8", "Entry \"10.0.0.1/8\" has bits set to the right of its prefix length.",
			   "host bits set");
	parse_case("10.0.0.0/", "Entry \"10.0.0.0/\" has no prefix length after \"/\".",
			   "slash without a length");
	parse_case("10.0.0.0/8x", "Entry \"10.0.0.0/8x\" has a prefix length outside 0 to 32.",
			   "junk after the length");
	parse_case("10.0.0.300", "Entry \"10.0.0.300\" is not a valid IPv4 address.",
			   "IPv4 octet over 255");
	parse_case("10.1", "Entry \"10.1\" is not a valid IPv4 address.",
			   "short IPv4 forms are refused");
	parse_case("fd00:::1", "Entry \"fd00:::1\" is not a valid IPv6 address (ports are not part of entries).",
			   "malformed IPv6");
	parse_case("[::1", "Entry \"[::1\" is not a valid bracketed IPv6 address.",
			   "unclosed bracket");
	parse_case("http://x.example.com", "Entry \"http://x.example.com\" is a URL: list its host alone.",
			   "a URL is not an entry");
	parse_case("x.example.com:443", "Entry \"x.example.com:443\" is not a valid IPv6 address (ports are not part of entries).",
			   "a port is not part of an entry");
	parse_case("-bad.example.com", "Entry \"-bad.example.com\" is not a host name, IP address or network.",
			   "label starting with a hyphen");
	parse_case("a..b", "Entry \"a..b\" is not a host name, IP address or network.",
			   "empty label");
	parse_case("*", "Entry \"*\" is not a host name, IP address or network.",
			   "a bare star");
	parse_case("*.", "Entry \"*.\" is not \"*.\" followed by a valid host name.",
			   "star-dot without a domain");
	parse_case("example.com/24", "Entry \"example.com/24\" is not a host name, IP address or network.",
			   "a name with a prefix length");
	parse_case("10.0.0.0/8,bad!name", "Entry \"bad!name\" is not a host name, IP address or network.",
			   "the first bad entry is named");
}

static void
test_match(void)
{
	ok(addr_in("127.0.0.0/8", "127.1.2.3"), "127.1.2.3 in 127.0.0.0/8");
	ok(!addr_in("127.0.0.2/32", "127.0.0.1"), "127.0.0.1 not in 127.0.0.2/32");
	ok(addr_in("127.0.0.2", "127.0.0.2"), "a bare address is a /32");
	ok(addr_in("10.0.0.0/9", "10.127.255.255"), "10.127.255.255 in 10.0.0.0/9");
	ok(!addr_in("10.0.0.0/9", "10.128.0.0"), "10.128.0.0 not in 10.0.0.0/9");
	ok(addr_in("0.0.0.0/0", "203.0.113.9"), "/0 matches every IPv4 address");
	ok(!addr_in("0.0.0.0/0", "::1"), "an IPv4 network does not match ::1");
	ok(addr_in("::1", "::1"), "::1 matches ::1");
	ok(addr_in("fd00::/8", "fdab::17"), "fdab::17 in fd00::/8");
	ok(!addr_in("fd00::/8", "fe80::1"), "fe80::1 not in fd00::/8");
	ok(addr_in("127.0.0.0/8", "::ffff:127.0.0.1"),
	   "an IPv4-mapped IPv6 address matches the IPv4 network");
	ok(!addr_in("127.0.0.2/32", "::ffff:127.0.0.1"),
	   "an IPv4-mapped address outside the network does not");
	ok(!addr_in("hooks.example.com", "127.0.0.1"), "names never match an address");

	ok(name_in("hooks.example.com", "hooks.example.com"), "exact name");
	ok(name_in("hooks.example.com", "HOOKS.Example.COM"), "names match in any case");
	ok(name_in("hooks.example.com", "hooks.example.com."), "a trailing dot is the same name");
	ok(!name_in("hooks.example.com", "evil-hooks.example.com"), "no suffix match for exact names");
	ok(!name_in("hooks.example.com", "hooks.example.com.evil.net"), "no prefix match");
	ok(name_in("*.example.com", "a.b.example.com"), "*.example.com matches names below it");
	ok(!name_in("*.example.com", "example.com"), "*.example.com does not match the domain itself");
	ok(!name_in("*.example.com", "badexample.com"), "*.example.com does not match badexample.com");
	ok(!name_in("10.0.0.0/8", "10.0.0.1"), "networks never match a name");
}

static void
test_check_host(void)
{
	ok(check_host("", "anything.example") == CC_ALLOW_OK, "empty list allows every host");
	ok(check_host("127.0.0.0/8", "127.0.0.1") == CC_ALLOW_OK, "IP literal in a network");
	ok(check_host("127.0.0.2/32", "127.0.0.1") == CC_ALLOW_BAD_IP, "IP literal outside");
	ok(check_host("::1", "[::1]") == CC_ALLOW_OK, "bracketed IPv6 literal in a network");
	ok(check_host("fd00::/8", "[::1]") == CC_ALLOW_BAD_IP, "bracketed IPv6 literal outside");
	ok(check_host("hooks.example.com", "hooks.example.com") == CC_ALLOW_OK, "a listed name");
	ok(check_host("hooks.example.com", "other.example.com") == CC_ALLOW_BAD_NAME,
	   "an unlisted name with no networks listed");
	ok(check_host("hooks.example.com,10.0.0.0/8", "other.example.com") == CC_ALLOW_OK,
	   "an unlisted name is left to the connect-time check when networks are listed");
	ok(check_host("hooks.example.com", "127.0.0.1") == CC_ALLOW_BAD_IP,
	   "an IP literal is judged by the networks only");
}

int
main(void)
{
	test_parse();
	test_match();
	test_check_host();
	printf("1..%d\n", ntests);
	return nfailed == 0 ? 0 : 1;
}
