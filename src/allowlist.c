/*-------------------------------------------------------------------------
 *
 * allowlist.c
 *		Parsing and matching of callback_center.allowed_destinations.
 *
 * The list names host names ("hooks.example.com", "*.example.com" for any
 * name below example.com) and IPv4/IPv6 addresses or networks
 * ("10.0.0.0/8", "fd00::/8", "[::1]").  Every address a delivery is about
 * to connect to (after DNS) is judged by cc_allowlist_decide; http.c asks
 * at every new socket, on the very sockaddr it then connects to, so a name
 * that resolves somewhere else later (DNS rebinding) cannot escape the
 * rules:
 *
 *	- a reserved address (loopback, link-local, unspecified, multicast,
 *	  broadcast and the rest of 240/4, IPv6 site-local, one of this host's
 *	  own addresses, and the private ranges 10/8, 172.16/12, 192.168/16,
 *	  100.64/10, fc00::/7) is allowed only by a listed network that lies
 *	  inside its range ("127.0.0.1", "10.0.0.0/8"; not "0.0.0.0/0", and for
 *	  this host's own addresses only the address itself).  A listed host
 *	  name never allows one: "localhost" listed does not open 127.0.0.1;
 *	- any other (public) address is allowed when the list is empty, when it
 *	  lies in a listed network, or when the URL's host is a listed name.
 *
 * An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as a.b.c.d, and a
 * listed network inside ::ffff:0:0/96 as the IPv4 network it maps.
 *
 * Everything here is pure (no palloc, no ereport, no server state; libc
 * only, getifaddrs for the host's own addresses), so that
 * test/unit/allowlist_test.c links this file alone.  The GUC lives in
 * allowlist_guc.c, the SQL check of endpoint URLs in url_check.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "allowlist.h"

#define CC_ALLOW_SEPARATORS ", \t\r\n"

/* Appends s to err (size errlen), truncating. */
static void
err_append(char *err, size_t errlen, const char *s)
{
	size_t		have = strlen(err);
	size_t		add = strlen(s);

	if (have + 1 >= errlen)
		return;
	if (add > errlen - have - 1)
		add = errlen - have - 1;
	memcpy(err + have, s, add);
	err[have + add] = '\0';
}

/*
 * Writes the sentence 'Entry "<entry>" <why>.' into err and returns false.
 * (No printf: the server's snprintf is not linked into the unit test.)
 */
static bool
entry_error(char *err, size_t errlen, const char *entry, const char *why)
{
	if (err == NULL || errlen == 0)
		return false;
	err[0] = '\0';
	err_append(err, errlen, "Entry \"");
	err_append(err, errlen, entry);
	err_append(err, errlen, "\" ");
	err_append(err, errlen, why);
	err_append(err, errlen, ".");
	return false;
}

/* Whether s (len bytes) is digits and dots only: it means an IPv4 address. */
static bool
looks_ipv4(const char *s, size_t len)
{
	size_t		i;

	for (i = 0; i < len; i++)
		if (!isdigit((unsigned char) s[i]) && s[i] != '.')
			return false;
	return len > 0;
}

/*
 * Parses a host name (lower-cased into out, at most 253 bytes): labels of
 * 1 to 63 letters, digits, '-' or '_', not starting or ending with '-',
 * joined by single dots, the last one not all digits.
 */
static bool
parse_name(const char *s, char *out, size_t outlen)
{
	size_t		len = strlen(s);
	size_t		i;
	size_t		label = 0;
	bool		label_digits = true;

	if (len == 0 || len > 253 || len >= outlen)
		return false;
	for (i = 0; i <= len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '.' || c == '\0')
		{
			if (label == 0 || label > 63 || s[i - 1] == '-')
				return false;
			if (c == '\0' && label_digits)
				return false;
			label = 0;
			label_digits = true;
			out[i] = (char) c;
			continue;
		}
		if (!(isalnum(c) || c == '-' || c == '_'))
			return false;
		if (label == 0 && c == '-')
			return false;
		if (!isdigit(c))
			label_digits = false;
		label++;
		out[i] = (char) tolower(c);
	}
	return true;
}

/* Whether the 16 bytes a are an IPv4-mapped IPv6 address (::ffff:0:0/96). */
static bool
is_mapped(const unsigned char *a)
{
	static const unsigned char mapped[12] =
	{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

	return memcmp(a, mapped, sizeof(mapped)) == 0;
}

/* Parses one entry (NUL-terminated) into e; on error fills err. */
static bool
parse_entry(const char *entry, CcAllowEntry *e, char *err, size_t errlen)
{
	char		buf[300];
	char	   *addr = buf;
	char	   *slash;
	int			maxbits;
	int			i;

	if (strlen(entry) >= sizeof(buf))
		return entry_error(err, errlen, entry, "is too long");
	strcpy(buf, entry);
	memset(e, 0, sizeof(*e));
	if (strstr(buf, "://") != NULL)
		return entry_error(err, errlen, entry,
						   "is a URL: list its host alone");

	/* An address, possibly bracketed, possibly with a prefix length. */
	if (buf[0] == '[')
	{
		char	   *close = strchr(buf, ']');

		if (close == NULL || (close[1] != '\0' && close[1] != '/'))
			return entry_error(err, errlen, entry,
							   "is not a valid bracketed IPv6 address");
		memmove(close, close + 1, strlen(close + 1) + 1);
		addr = buf + 1;
	}
	slash = strchr(addr, '/');
	if (slash != NULL)
		*slash = '\0';
	if (buf[0] == '[' || strchr(addr, ':') != NULL ||
		looks_ipv4(addr, strlen(addr)))
	{
		bool		v6 = (buf[0] == '[' || strchr(addr, ':') != NULL);

		e->kind = v6 ? CC_ALLOW_NET6 : CC_ALLOW_NET4;
		maxbits = v6 ? 128 : 32;
		if (inet_pton(v6 ? AF_INET6 : AF_INET, addr, e->addr) != 1)
			return entry_error(err, errlen, entry,
							   v6 ? "is not a valid IPv6 address (ports are not part of entries)" :
							   "is not a valid IPv4 address");
		e->bits = maxbits;
		if (slash != NULL)
		{
			char	   *end;
			long		bits;
			const char *p = slash + 1;

			if (!isdigit((unsigned char) *p))
				return entry_error(err, errlen, entry,
								   "has no prefix length after \"/\"");
			bits = strtol(p, &end, 10);
			if (*end != '\0' || bits < 0 || bits > maxbits)
				return entry_error(err, errlen, entry,
								   v6 ? "has a prefix length outside 0 to 128" :
								   "has a prefix length outside 0 to 32");
			e->bits = (int) bits;
		}
		/* Like the cidr type: no bits set right of the mask. */
		for (i = 0; i < maxbits / 8; i++)
		{
			int			keep = e->bits - i * 8;
			unsigned char mask = keep >= 8 ? 0xff :
			keep <= 0 ? 0 : (unsigned char) (0xff << (8 - keep));

			if (e->addr[i] & ~mask)
				return entry_error(err, errlen, entry,
								   "has bits set to the right of its prefix length");
		}
		/* "::ffff:10.0.0.0/104" is the IPv4 network 10.0.0.0/8. */
		if (v6 && e->bits >= 96 && is_mapped(e->addr))
		{
			memmove(e->addr, e->addr + 12, 4);
			memset(e->addr + 4, 0, 12);
			e->kind = CC_ALLOW_NET4;
			e->bits -= 96;
		}
		return true;
	}

	/* A host name, or "*." and a domain. */
	if (slash != NULL)
		return entry_error(err, errlen, entry,
						   "is not a host name, IP address or network");
	if (buf[0] == '*' && buf[1] == '.')
	{
		e->kind = CC_ALLOW_SUFFIX;
		e->name[0] = '.';
		if (!parse_name(buf + 2, e->name + 1, sizeof(e->name) - 1))
			return entry_error(err, errlen, entry,
							   "is not \"*.\" followed by a valid host name");
		return true;
	}
	e->kind = CC_ALLOW_HOST;
	if (!parse_name(buf, e->name, sizeof(e->name)))
		return entry_error(err, errlen, entry,
						   "is not a host name, IP address or network");
	return true;
}

/*
 * Parses spec, entries separated by commas or white space, and returns the
 * list (malloc'd, one block; an empty spec gives an empty list), or NULL
 * with a sentence saying what is wrong in err (or "out of memory").
 */
CcAllowList *
cc_allowlist_parse(const char *spec, char *err, size_t errlen)
{
	CcAllowList *list;
	const char *p;
	int			max = 0;
	int			n = 0;

	if (err != NULL && errlen > 0)
		err[0] = '\0';
	if (spec == NULL)
		spec = "";
	/* Count words for the allocation. */
	for (p = spec; *p;)
	{
		p += strspn(p, CC_ALLOW_SEPARATORS);
		if (*p == '\0')
			break;
		max++;
		p += strcspn(p, CC_ALLOW_SEPARATORS);
	}
	list = malloc(offsetof(CcAllowList, entries) +
				  sizeof(CcAllowEntry) * Max(max, 1));
	if (list == NULL)
	{
		if (err != NULL && errlen > 0)
		{
			err[0] = '\0';
			err_append(err, errlen, "Out of memory.");
		}
		return NULL;
	}
	list->nnames = 0;
	list->nnets = 0;
	for (p = spec; *p;)
	{
		size_t		len;
		char		word[300];

		p += strspn(p, CC_ALLOW_SEPARATORS);
		if (*p == '\0')
			break;
		len = strcspn(p, CC_ALLOW_SEPARATORS);
		memcpy(word, p, Min(len, sizeof(word) - 1));
		word[Min(len, sizeof(word) - 1)] = '\0';
		p += len;
		if (len >= sizeof(word) - 1)
		{
			entry_error(err, errlen, word, "is too long");
			free(list);
			return NULL;
		}
		if (!parse_entry(word, &list->entries[n], err, errlen))
		{
			free(list);
			return NULL;
		}
		if (list->entries[n].kind == CC_ALLOW_HOST ||
			list->entries[n].kind == CC_ALLOW_SUFFIX)
			list->nnames++;
		else
			list->nnets++;
		n++;
	}
	list->n = n;
	return list;
}

/*
 * Whether host (as in a URL; any case, without brackets or port) is a
 * listed name or lies below a listed "*." domain.
 */
bool
cc_allowlist_match_name(const CcAllowList *list, const char *host)
{
	size_t		hlen;
	int			i;

	if (list == NULL || host == NULL)
		return false;
	hlen = strlen(host);
	/* "example.com." is "example.com" */
	if (hlen > 0 && host[hlen - 1] == '.')
		hlen--;
	for (i = 0; i < list->n; i++)
	{
		const CcAllowEntry *e = &list->entries[i];
		size_t		elen = strlen(e->name);

		if (e->kind == CC_ALLOW_HOST && hlen == elen &&
			strncasecmp(host, e->name, elen) == 0)
			return true;
		if (e->kind == CC_ALLOW_SUFFIX && hlen > elen &&
			strncasecmp(host + hlen - elen, e->name, elen) == 0)
			return true;
	}
	return false;
}

/* Whether the first bits of a and b agree. */
static bool
prefix_equal(const unsigned char *a, const unsigned char *b, int bits)
{
	int			full = bits / 8;
	int			rest = bits % 8;

	if (full > 0 && memcmp(a, b, full) != 0)
		return false;
	if (rest == 0)
		return true;
	return ((a[full] ^ b[full]) & (0xff << (8 - rest)) & 0xff) == 0;
}

/*
 * Converts sa (AF_INET or AF_INET6) into ip, an IPv4-mapped IPv6 address
 * into its IPv4 address.  False for any other family.
 */
bool
cc_ip_from_sockaddr(const struct sockaddr *sa, CcIpAddr *ip)
{
	memset(ip, 0, sizeof(*ip));
	if (sa == NULL)
		return false;
	if (sa->sa_family == AF_INET)
	{
		ip->family = AF_INET;
		memcpy(ip->addr, &((const struct sockaddr_in *) sa)->sin_addr, 4);
		return true;
	}
	if (sa->sa_family == AF_INET6)
	{
		const unsigned char *a = (const unsigned char *)
		&((const struct sockaddr_in6 *) sa)->sin6_addr;

		if (is_mapped(a))
		{
			ip->family = AF_INET;
			memcpy(ip->addr, a + 12, 4);
		}
		else
		{
			ip->family = AF_INET6;
			memcpy(ip->addr, a, 16);
		}
		return true;
	}
	return false;
}

/*
 * Parses an IP literal (IPv6 with or without brackets) into ip, as
 * cc_ip_from_sockaddr would see it.  False when text is not one.
 */
bool
cc_ip_parse(const char *text, CcIpAddr *ip)
{
	char		buf[INET6_ADDRSTRLEN + 2];
	size_t		len = text ? strlen(text) : 0;
	struct sockaddr_in sin;
	struct sockaddr_in6 sin6;

	if (len == 0 || len >= sizeof(buf))
		return false;
	if (text[0] == '[' && len > 2 && text[len - 1] == ']')
	{
		memcpy(buf, text + 1, len - 2);
		buf[len - 2] = '\0';
	}
	else
		strcpy(buf, text);
	memset(&sin, 0, sizeof(sin));
	memset(&sin6, 0, sizeof(sin6));
	if (inet_pton(AF_INET, buf, &sin.sin_addr) == 1)
	{
		sin.sin_family = AF_INET;
		return cc_ip_from_sockaddr((struct sockaddr *) &sin, ip);
	}
	if (inet_pton(AF_INET6, buf, &sin6.sin6_addr) == 1)
	{
		sin6.sin6_family = AF_INET6;
		return cc_ip_from_sockaddr((struct sockaddr *) &sin6, ip);
	}
	return false;
}

/* Whether listed network e contains ip. */
static bool
entry_contains(const CcAllowEntry *e, const CcIpAddr *ip)
{
	if (e->kind == CC_ALLOW_NET4 && ip->family == AF_INET)
		return prefix_equal(ip->addr, e->addr, e->bits);
	if (e->kind == CC_ALLOW_NET6 && ip->family == AF_INET6)
		return prefix_equal(ip->addr, e->addr, e->bits);
	return false;
}

/*
 * Whether the address sa (AF_INET or AF_INET6) lies in a listed network.
 * An IPv4-mapped IPv6 address (::ffff:a.b.c.d) also matches the IPv4
 * networks, so it cannot slip past them.  Other families never match.
 * (Only containment: cc_allowlist_decide applies the reserved ranges.)
 */
bool
cc_allowlist_match_addr(const CcAllowList *list, const struct sockaddr *sa)
{
	CcIpAddr	ip;
	int			i;

	if (list == NULL || !cc_ip_from_sockaddr(sa, &ip))
		return false;
	for (i = 0; i < list->n; i++)
		if (entry_contains(&list->entries[i], &ip))
			return true;
	return false;
}

/* A range of addresses that only a listed network inside it may open. */
typedef struct ReservedRange
{
	int			family;
	unsigned char addr[16];
	int			bits;
	const char *name;
} ReservedRange;

/* Ranges of the host itself and its link, before this host's addresses. */
static const ReservedRange special_ranges[] = {
	{AF_INET, {0}, 8, "unspecified"},	/* 0.0.0.0/8: "this network" */
	{AF_INET, {127}, 8, "loopback"},
	{AF_INET, {169, 254}, 16, "link-local"},	/* cloud metadata */
	{AF_INET, {224}, 4, "multicast"},
	{AF_INET, {240}, 4, "broadcast or reserved"},	/* 240/4 and
													 * 255.255.255.255 */
	{AF_INET6, {0}, 128, "unspecified"},	/* :: */
	{AF_INET6, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 128,
	"loopback"},
	{AF_INET6, {0xfe, 0x80}, 10, "link-local"},
	{AF_INET6, {0xfe, 0xc0}, 10, "site-local"},
	{AF_INET6, {0xff}, 8, "multicast"},
};

/* Private networks, after this host's addresses. */
static const ReservedRange private_ranges[] = {
	{AF_INET, {10}, 8, "private"},
	{AF_INET, {172, 16}, 12, "private"},
	{AF_INET, {192, 168}, 16, "private"},
	{AF_INET, {100, 64}, 10, "private"},	/* carrier-grade NAT */
	{AF_INET6, {0xfc}, 7, "private"},	/* unique local */
};

/* The first range of ranges[n] that contains ip, or NULL. */
static const ReservedRange *
find_range(const ReservedRange *ranges, int n, const CcIpAddr *ip)
{
	int			i;

	for (i = 0; i < n; i++)
		if (ranges[i].family == ip->family &&
			prefix_equal(ip->addr, ranges[i].addr, ranges[i].bits))
			return &ranges[i];
	return NULL;
}

/*
 * The name of the reserved range ip lies in ("loopback", "link-local",
 * "unspecified", "multicast", "broadcast or reserved", "site-local", "this
 * host" for one of this host's nown addresses in own, "private"), with its
 * prefix length in *bits (32 or 128 for this host's addresses); NULL for a
 * public address.
 */
const char *
cc_ip_reserved(const CcIpAddr *ip, const CcIpAddr *own, int nown, int *bits)
{
	const ReservedRange *r;
	int			i;

	r = find_range(special_ranges, lengthof(special_ranges), ip);
	if (r == NULL)
	{
		for (i = 0; i < nown; i++)
			if (own[i].family == ip->family &&
				memcmp(own[i].addr, ip->addr,
					   ip->family == AF_INET ? 4 : 16) == 0)
			{
				*bits = ip->family == AF_INET ? 32 : 128;
				return "this host";
			}
		r = find_range(private_ranges, lengthof(private_ranges), ip);
	}
	if (r == NULL)
		return NULL;
	*bits = r->bits;
	return r->name;
}

/*
 * The verdict on connecting to ip for a URL whose host is host (NULL when
 * unknown), given this host's addresses own[nown]: CC_ALLOW_OK,
 * CC_ALLOW_RESERVED (with the range's name in *range) or CC_ALLOW_BAD_IP.
 * The rules are in the file header; list NULL is the empty list.
 */
int
cc_allowlist_decide(const CcAllowList *list, const char *host,
					const CcIpAddr *ip, const CcIpAddr *own, int nown,
					const char **range)
{
	int			bits = 0;
	const char *r = cc_ip_reserved(ip, own, nown, &bits);
	int			i;

	if (range != NULL)
		*range = r;
	if (r != NULL)
	{
		for (i = 0; list != NULL && i < list->n; i++)
		{
			const CcAllowEntry *e = &list->entries[i];

			if (e->bits >= bits && entry_contains(e, ip))
				return CC_ALLOW_OK;
		}
		return CC_ALLOW_RESERVED;
	}
	if (list == NULL || list->n == 0)
		return CC_ALLOW_OK;
	for (i = 0; i < list->n; i++)
		if (entry_contains(&list->entries[i], ip))
			return CC_ALLOW_OK;
	if (host != NULL && cc_allowlist_match_name(list, host))
		return CC_ALLOW_OK;
	return CC_ALLOW_BAD_IP;
}

/*
 * The verdict on a URL's host before anything is resolved (create time).
 * An IP literal (IPv6 with or without brackets) is judged as
 * cc_allowlist_decide judges an address.  A name is CC_ALLOW_OK when it is
 * listed, or when the list is empty or has networks (its addresses are
 * then judged at each connection), else CC_ALLOW_BAD_NAME.  list NULL is
 * the empty list.
 */
int
cc_allowlist_check_host(const CcAllowList *list, const char *host,
						const CcIpAddr *own, int nown, const char **range)
{
	CcIpAddr	ip;

	if (range != NULL)
		*range = NULL;
	if (host == NULL)
		return CC_ALLOW_BAD_NAME;
	if (cc_ip_parse(host, &ip))
		return cc_allowlist_decide(list, NULL, &ip, own, nown, range);
	if (list == NULL || list->n == 0 || list->nnets > 0 ||
		cc_allowlist_match_name(list, host))
		return CC_ALLOW_OK;
	return CC_ALLOW_BAD_NAME;
}

/*
 * Sets *out to a malloc'd array of this host's interface addresses
 * (getifaddrs, IPv4 and IPv6) and returns how many, or -1 (and *out NULL)
 * when they cannot be read.
 */
int
cc_own_addresses(CcIpAddr **out)
{
	struct ifaddrs *ifs;
	struct ifaddrs *p;
	int			n = 0;
	CcIpAddr   *a;

	*out = NULL;
	if (getifaddrs(&ifs) != 0)
		return -1;
	for (p = ifs; p != NULL; p = p->ifa_next)
		if (p->ifa_addr != NULL &&
			(p->ifa_addr->sa_family == AF_INET ||
			 p->ifa_addr->sa_family == AF_INET6))
			n++;
	a = malloc(sizeof(CcIpAddr) * Max(n, 1));
	if (a == NULL)
	{
		freeifaddrs(ifs);
		return -1;
	}
	n = 0;
	for (p = ifs; p != NULL; p = p->ifa_next)
		if (p->ifa_addr != NULL && cc_ip_from_sockaddr(p->ifa_addr, &a[n]))
			n++;
	freeifaddrs(ifs);
	*out = a;
	return n;
}
