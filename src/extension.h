/*-------------------------------------------------------------------------
 *
 * extension.h
 *		The extension's name and version, and whether the schema installed
 *		in the database is the one this library was built for.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CC_EXTENSION_H
#define CC_EXTENSION_H

#define CC_EXTENSION_NAME	"callback_center"
#ifndef CC_VERSION
#error "CC_VERSION comes from the Makefile (the control file's default_version)"
#endif

/* Whether the extension is installed, and at the library's version. */
typedef enum CcExtensionState
{
	CC_EXT_ABSENT,
	CC_EXT_CURRENT,
	CC_EXT_OTHER_VERSION
} CcExtensionState;

extern CcExtensionState cc_extension_state(void);
/* PostgreSQL 18 spells noreturn first (pg_noreturn) and 19 drops the old macro. */
#if PG_VERSION_NUM >= 180000
pg_noreturn extern void cc_refuse_old_schema(const char *function);
#else
extern void cc_refuse_old_schema(const char *function) pg_attribute_noreturn();
#endif

#endif							/* CC_EXTENSION_H */
