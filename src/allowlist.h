/*-------------------------------------------------------------------------
 *
 * allowlist.h
 *		callback_center.allowed_destinations: where deliveries may connect.
 *
 * The parsing and matching functions are pure (malloc only, no server
 * calls) so test/unit/allowlist_test.c links allowlist.c alone.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_ALLOWLIST_H
#define CC_ALLOWLIST_H

#include "postgres.h"

#include <sys/socket.h>

/* One entry of the list. */
typedef enum CcAllowKind
{
	CC_ALLOW_HOST,				/* exact host name */
	CC_ALLOW_SUFFIX,			/* "*.example.com": any name below it */
	CC_ALLOW_NET4,				/* IPv4 address or CIDR */
	CC_ALLOW_NET6				/* IPv6 address or CIDR */
} CcAllowKind;

typedef struct CcAllowEntry
{
	CcAllowKind kind;
	int			bits;			/* prefix length of a network */
	unsigned char addr[16];		/* network address, host bits zero */
	char		name[256];		/* lower-case host name, or the suffix
								 * ".example.com" */
} CcAllowEntry;

/* A parsed list: one malloc'd block, freed with free(). */
typedef struct CcAllowList
{
	int			n;
	int			nnames;			/* entries of kind HOST or SUFFIX */
	int			nnets;			/* entries of kind NET4 or NET6 */
	CcAllowEntry entries[FLEXIBLE_ARRAY_MEMBER];
} CcAllowList;

/*
 * An IP address as the rules see it: an IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d) is the IPv4 address a.b.c.d.
 */
typedef struct CcIpAddr
{
	int			family;			/* AF_INET (4 bytes used) or AF_INET6 */
	unsigned char addr[16];
} CcIpAddr;

/* Verdicts on a destination. */
#define CC_ALLOW_OK			0
#define CC_ALLOW_BAD_IP		1	/* an address outside every listed network */
#define CC_ALLOW_BAD_NAME	2	/* a name, and the list has no network */
#define CC_ALLOW_RESERVED	3	/* a loopback, link-local, private, ... address
								 * (or one of this host's) no listed network
								 * inside its range allows */

extern CcAllowList *cc_allowlist_parse(const char *spec, char *err,
									   size_t errlen);
extern bool cc_allowlist_match_name(const CcAllowList *list,
									const char *host);
extern bool cc_allowlist_match_addr(const CcAllowList *list,
									const struct sockaddr *sa);
extern bool cc_ip_from_sockaddr(const struct sockaddr *sa, CcIpAddr *ip);
extern bool cc_ip_parse(const char *text, CcIpAddr *ip);
extern const char *cc_ip_reserved(const CcIpAddr *ip, const CcIpAddr *own,
								  int nown, int *bits);
extern int	cc_allowlist_decide(const CcAllowList *list, const char *host,
								const CcIpAddr *ip, const CcIpAddr *own,
								int nown, const char **range);
extern int	cc_allowlist_check_host(const CcAllowList *list,
									const char *host, const CcIpAddr *own,
									int nown, const char **range);
extern int	cc_own_addresses(CcIpAddr **out);

/* The list in force in this process (never NULL; may have no entries). */
extern const CcAllowList *cc_allowlist_current(void);
extern uint64 cc_allowlist_generation(void);
extern void cc_allowlist_define_gucs(void);

#endif							/* CC_ALLOWLIST_H */
