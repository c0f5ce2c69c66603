/*-------------------------------------------------------------------------
 *
 * allowlist.c
 *		Parsing and matching of callback_center.allowed_destinations.
 *
 * The list names host names ("hooks.example.com", "*.example.com" for any
 * name below example.com) and IPv4/IPv6 addresses or networks
 * ("10.0.0.0/8", "fd00::/8", "[::1]").  A connection is allowed when the
 * URL's host is a listed name, or when the address actually connected to
 * (after DNS) lies in a listed network; http.c asks at every new socket,
 * so a name that resolves somewhere else later (DNS rebinding) cannot
 * escape the networks.
 *
 * Everything here is pure: no palloc, no ereport, no server state, so that
 * test/unit/allowlist_test.c links this file alone.  The GUC and the SQL
 * function live in allowlist_guc.c.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <ctype.h>
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
 * Whether the address sa (AF_INET or AF_INET6) lies in a listed network.
 * An IPv4-mapped IPv6 address (::ffff:a.b.c.d) also matches the IPv4
 * networks, so it cannot slip past them.  Other families never match.
 */
bool
cc_allowlist_match_addr(const CcAllowList *list, const struct sockaddr *sa)
{
	const unsigned char *v4 = NULL;
	const unsigned char *v6 = NULL;
	int			i;

	if (list == NULL || sa == NULL)
		return false;
	if (sa->sa_family == AF_INET)
		v4 = (const unsigned char *) &((const struct sockaddr_in *) sa)->sin_addr;
	else if (sa->sa_family == AF_INET6)
	{
		static const unsigned char mapped[12] =
		{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

		v6 = (const unsigned char *) &((const struct sockaddr_in6 *) sa)->sin6_addr;
		if (memcmp(v6, mapped, sizeof(mapped)) == 0)
			v4 = v6 + 12;
	}
	else
		return false;

	for (i = 0; i < list->n; i++)
	{
		const CcAllowEntry *e = &list->entries[i];

		if (e->kind == CC_ALLOW_NET4 && v4 != NULL &&
			prefix_equal(v4, e->addr, e->bits))
			return true;
		if (e->kind == CC_ALLOW_NET6 && v6 != NULL &&
			prefix_equal(v6, e->addr, e->bits))
			return true;
	}
	return false;
}

/*
 * The verdict on a URL's host before anything is resolved (create time):
 * CC_ALLOW_OK when the list is empty, when host is a listed name, when
 * host is an IP literal (IPv6 with or without brackets) in a listed
 * network, or when host is any other name and the list has networks (its
 * addresses are then checked at each connection).  CC_ALLOW_BAD_IP for an
 * IP literal outside every network, CC_ALLOW_BAD_NAME for a name the list
 * cannot allow.
 */
int
cc_allowlist_check_host(const CcAllowList *list, const char *host)
{
	char		buf[300];
	size_t		len;
	struct sockaddr_in sin;
	struct sockaddr_in6 sin6;

	if (list == NULL || list->n == 0)
		return CC_ALLOW_OK;
	if (host == NULL)
		return CC_ALLOW_BAD_NAME;
	len = strlen(host);
	if (len >= sizeof(buf))
		return CC_ALLOW_BAD_NAME;
	if (host[0] == '[' && len > 2 && host[len - 1] == ']')
	{
		memcpy(buf, host + 1, len - 2);
		buf[len - 2] = '\0';
	}
	else
		strcpy(buf, host);

	memset(&sin, 0, sizeof(sin));
	memset(&sin6, 0, sizeof(sin6));
	if (inet_pton(AF_INET, buf, &sin.sin_addr) == 1)
	{
		sin.sin_family = AF_INET;
		return cc_allowlist_match_addr(list, (struct sockaddr *) &sin) ?
			CC_ALLOW_OK : CC_ALLOW_BAD_IP;
	}
	if (inet_pton(AF_INET6, buf, &sin6.sin6_addr) == 1)
	{
		sin6.sin6_family = AF_INET6;
		return cc_allowlist_match_addr(list, (struct sockaddr *) &sin6) ?
			CC_ALLOW_OK : CC_ALLOW_BAD_IP;
	}
	if (cc_allowlist_match_name(list, buf))
		return CC_ALLOW_OK;
	return list->nnets > 0 ? CC_ALLOW_OK : CC_ALLOW_BAD_NAME;
}
