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
#undef snprintf

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

/* This host's addresses as the tests pretend them. */
static CcIpAddr test_own[2];

static int
check_host(const char *spec, const char *host)
{
	char		err[256];
	CcAllowList *l = cc_allowlist_parse(spec, err, sizeof(err));
	int			r = cc_allowlist_check_host(l, host, test_own, 2, NULL);

	free(l);
	return r;
}

/*
 * The connect-time verdict for address a reached through a URL with host
 * host (NULL: a literal) under spec; *range gets the reserved range.
 */
static int
decide(const char *spec, const char *host, const char *a, const char **range)
{
	char		err[256];
	CcAllowList *l = cc_allowlist_parse(spec, err, sizeof(err));
	CcIpAddr	ip;
	int			r;

	if (l == NULL || !cc_ip_parse(a, &ip))
		abort();
	r = cc_allowlist_decide(l, host, &ip, test_own, 2, range);
	free(l);
	return r;
}

/* Whether a connection to a is allowed under spec. */
static bool
allowed(const char *spec, const char *a)
{
	return decide(spec, NULL, a, NULL) == CC_ALLOW_OK;
}

/* The reserved range a is in ("public" for none). */
static const char *
range_of(const char *a)
{
	const char *r = NULL;

	decide("", NULL, a, &r);
	return r ? r : "public";
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
test_reserved(void)
{
	struct
	{
		const char *addr;
		const char *range;
	}			cases[] = {
		{"127.0.0.1", "loopback"},
		{"127.255.0.9", "loopback"},
		{"::1", "loopback"},
		{"::ffff:127.0.0.1", "loopback"},
		{"169.254.169.254", "link-local"},
		{"fe80::1", "link-local"},
		{"::ffff:169.254.169.254", "link-local"},
		{"0.0.0.0", "unspecified"},
		{"0.1.2.3", "unspecified"},
		{"::", "unspecified"},
		{"::ffff:0.0.0.0", "unspecified"},
		{"224.0.0.1", "multicast"},
		{"239.255.255.250", "multicast"},
		{"ff02::1", "multicast"},
		{"255.255.255.255", "broadcast or reserved"},
		{"240.0.0.1", "broadcast or reserved"},
		{"fec0::1", "site-local"},
		{"10.1.2.3", "private"},
		{"172.16.0.1", "private"},
		{"172.31.255.255", "private"},
		{"192.168.1.1", "private"},
		{"100.64.0.1", "private"},
		{"fd12::5", "private"},
		{"fc00::1", "private"},
		{"::ffff:10.0.0.1", "private"},
		{"192.0.2.2", "this host"},
		{"2001:db8::7", "this host"},
		{"172.32.0.1", "public"},
		{"100.128.0.1", "public"},
		{"203.0.113.7", "public"},
		{"8.8.8.8", "public"},
		{"2606:4700::1111", "public"},
		{"::ffff:8.8.8.8", "public"},
	};
	int			i;

	for (i = 0; i < (int) lengthof(cases); i++)
	{
		char		name[128];
		const char *got = range_of(cases[i].addr);

		snprintf(name, sizeof(name), "%s is %s", cases[i].addr, cases[i].range);
		ok(strcmp(got, cases[i].range) == 0, name);
		if (strcmp(got, cases[i].range) != 0)
			printf("# got \"%s\"\n", got);
	}
}

static void
test_decide(void)
{
	const char *r = NULL;

	/* The default (empty list): public yes, reserved no. */
	ok(allowed("", "203.0.113.7"), "default: a public address is allowed");
	ok(allowed("", "2606:4700::1111"), "default: a public IPv6 address is allowed");
	ok(!allowed("", "127.0.0.1"), "default: 127.0.0.1 is refused");
	ok(!allowed("", "::1"), "default: ::1 is refused");
	ok(!allowed("", "::ffff:127.0.0.1"), "default: IPv4-mapped loopback is refused");
	ok(!allowed("", "169.254.169.254"), "default: the metadata address is refused");
	ok(!allowed("", "0.0.0.0"), "default: 0.0.0.0 is refused");
	ok(!allowed("", "::"), "default: :: is refused");
	ok(!allowed("", "224.0.0.1"), "default: multicast is refused");
	ok(!allowed("", "255.255.255.255"), "default: broadcast is refused");
	ok(!allowed("", "10.0.0.1"), "default: 10/8 is refused");
	ok(!allowed("", "172.16.5.5"), "default: 172.16/12 is refused");
	ok(!allowed("", "192.168.0.10"), "default: 192.168/16 is refused");
	ok(!allowed("", "100.64.1.1"), "default: 100.64/10 is refused");
	ok(!allowed("", "fd00::2"), "default: fc00::/7 is refused");
	ok(!allowed("", "192.0.2.2"), "default: this host's own public address is refused");
	ok(decide("", NULL, "127.0.0.1", &r) == CC_ALLOW_RESERVED && strcmp(r, "loopback") == 0,
	   "the verdict names the range");

	/* Listing opens a reserved range, only from inside it. */
	ok(allowed("127.0.0.1", "127.0.0.1"), "127.0.0.1 listed opens it");
	ok(!allowed("127.0.0.1", "127.0.0.2"), "but not 127.0.0.2");
	ok(allowed("127.0.0.0/8", "127.0.0.2"), "127.0.0.0/8 opens loopback");
	ok(allowed("127.0.0.1", "::ffff:127.0.0.1"), "its IPv4-mapped form too");
	ok(allowed("::ffff:127.0.0.1", "127.0.0.1"), "a mapped entry is its IPv4 address");
	ok(allowed("::1", "::1"), "::1 listed opens it");
	ok(!allowed("0.0.0.0/0, ::/0", "127.0.0.1"), "0.0.0.0/0 does not open loopback");
	ok(!allowed("0.0.0.0/0, ::/0", "::1"), "::/0 does not open ::1");
	ok(!allowed("0.0.0.0/0", "10.0.0.1"), "0.0.0.0/0 does not open private ranges");
	ok(!allowed("0.0.0.0/0", "169.254.169.254"), "nor link-local");
	ok(!allowed("0.0.0.0/0", "0.0.0.0"), "nor 0.0.0.0");
	ok(allowed("0.0.0.0/0", "203.0.113.7"), "0.0.0.0/0 opens public addresses");
	ok(allowed("10.0.0.0/8", "10.20.30.40"), "10.0.0.0/8 listed opens 10/8");
	ok(allowed("10.20.0.0/16", "10.20.30.40"), "a network inside 10/8 opens its part");
	ok(!allowed("10.20.0.0/16", "10.21.0.1"), "and nothing else of 10/8");
	ok(!allowed("8.0.0.0/7", "10.0.0.1") && !allowed("8.0.0.0/6", "10.0.0.1"),
	   "a network wider than 10/8 does not open it");
	ok(allowed("fc00::/7", "fd00::9"), "fc00::/7 listed opens unique local addresses");
	ok(allowed("100.64.0.0/10", "100.64.1.1"), "100.64.0.0/10 listed opens it");
	ok(allowed("169.254.169.254", "169.254.169.254"), "the metadata address only if listed exactly");
	ok(!allowed("10.0.0.0/8", "192.0.2.2"), "a network does not open this host's public address");
	ok(!allowed("192.0.2.0/24", "192.0.2.2"), "not even its own network");
	ok(allowed("192.0.2.2", "192.0.2.2"), "the address itself does");
	ok(!allowed("10.0.0.0/8", "203.0.113.7"), "a non-empty list refuses public addresses it does not list");

	/* A listed name never opens a reserved address. */
	ok(decide("localhost", "localhost", "127.0.0.1", NULL) == CC_ALLOW_RESERVED,
	   "\"localhost\" listed does not open 127.0.0.1");
	ok(decide("localhost", "localhost", "::1", NULL) == CC_ALLOW_RESERVED,
	   "nor ::1");
	ok(decide("hooks.example.com", "hooks.example.com", "10.0.0.1", NULL) == CC_ALLOW_RESERVED,
	   "a listed name resolving to a private address is refused");
	ok(decide("hooks.example.com", "hooks.example.com", "203.0.113.7", NULL) == CC_ALLOW_OK,
	   "a listed name resolving to a public address is allowed");
	ok(decide("hooks.example.com", "other.example.com", "203.0.113.7", NULL) == CC_ALLOW_BAD_IP,
	   "an unlisted name is judged by its address");
	ok(decide("localhost, 127.0.0.1", "localhost", "127.0.0.1", NULL) == CC_ALLOW_OK,
	   "the address listed too opens it");
}

static void
test_check_host(void)
{
	ok(check_host("", "anything.example") == CC_ALLOW_OK, "empty list allows every host name");
	ok(check_host("", "203.0.113.7") == CC_ALLOW_OK, "empty list allows a public IP literal");
	ok(check_host("", "127.0.0.1") == CC_ALLOW_RESERVED, "empty list refuses 127.0.0.1");
	ok(check_host("", "[::1]") == CC_ALLOW_RESERVED, "empty list refuses [::1]");
	ok(check_host("", "192.0.2.2") == CC_ALLOW_RESERVED, "empty list refuses this host's address");
	ok(check_host("localhost", "127.0.0.1") == CC_ALLOW_RESERVED,
	   "a listed name does not open an IP literal");
	ok(check_host("127.0.0.0/8", "127.0.0.1") == CC_ALLOW_OK, "IP literal in a network");
	ok(check_host("127.0.0.2/32", "127.0.0.1") == CC_ALLOW_RESERVED, "reserved IP literal outside");
	ok(check_host("10.0.0.0/8", "203.0.113.7") == CC_ALLOW_BAD_IP, "public IP literal outside");
	ok(check_host("::1", "[::1]") == CC_ALLOW_OK, "bracketed IPv6 literal in a network");
	ok(check_host("fd00::/8", "[::1]") == CC_ALLOW_RESERVED, "bracketed IPv6 literal outside");
	ok(check_host("hooks.example.com", "hooks.example.com") == CC_ALLOW_OK, "a listed name");
	ok(check_host("hooks.example.com", "other.example.com") == CC_ALLOW_BAD_NAME,
	   "an unlisted name with no networks listed");
	ok(check_host("hooks.example.com,10.0.0.0/8", "other.example.com") == CC_ALLOW_OK,
	   "an unlisted name is left to the connect-time check when networks are listed");
	ok(check_host("hooks.example.com", "203.0.113.7") == CC_ALLOW_BAD_IP,
	   "an IP literal is judged by the networks only");
}

/* The host's own addresses are read (loopback is always among them). */
static void
test_own_addresses(void)
{
	CcIpAddr   *own;
	CcIpAddr	lo;
	int			n = cc_own_addresses(&own);
	int			i;
	bool		found = false;

	cc_ip_parse("127.0.0.1", &lo);
	for (i = 0; i < n; i++)
		if (own[i].family == AF_INET && memcmp(own[i].addr, lo.addr, 4) == 0)
			found = true;
	ok(n > 0 && found, "getifaddrs gives this host's addresses, 127.0.0.1 among them");
	free(own);
}

int
main(void)
{
	cc_ip_parse("192.0.2.2", &test_own[0]);
	cc_ip_parse("2001:db8::7", &test_own[1]);
	test_parse();
	test_match();
	test_reserved();
	test_decide();
	test_check_host();
	test_own_addresses();
	printf("1..%d\n", ntests);
	return nfailed == 0 ? 0 : 1;
}
