# callback_center: PGXS build.
#
#   make && sudo make install     build and install into the PostgreSQL found by pg_config
#   make demo                     the end-to-end demo on a throwaway cluster (see README)
#   make test                     every suite, each on clusters it starts itself
#
# The current version's install script is generated from the pieces in
# src/sql/, in name order.  Released versions are frozen files
# (callback_center--0.1.0.sql), each followed by a hand-written upgrade
# script to the next; every one is installed, so ALTER EXTENSION ... UPDATE
# reaches the current version from any of them.

EXTENSION = callback_center
EXTVERSION = $(shell sed -n "s/^default_version[[:space:]]*=[[:space:]]*'\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big = callback_center
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
DATA = $(EXTENSION)--0.1.0.sql $(wildcard $(EXTENSION)--*--*.sql)
SHLIB_LINK += -lcurl
# The library's version string is the control file's default_version.
PG_CPPFLAGS += -I$(srcdir)/src -DCC_VERSION='"$(EXTVERSION)"'

SQL_PIECES = $(sort $(wildcard src/sql/*.sql))

# pg_regress and pg_isolation_regress start their own preloaded instance.
REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --temp-instance=tmp_check_regress --temp-config=$(srcdir)/test/regress.conf
ISOLATION = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --temp-instance=tmp_check_iso --temp-config=$(srcdir)/test/regress.conf
TAP_TESTS = 1
PROVE_TESTS = $(sort $(wildcard test/t/*.pl))

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

PROVE_FLAGS += -I $(srcdir)/test/perl

# The directory is a prerequisite so that removing a piece rebuilds too.
$(EXTENSION)--$(EXTVERSION).sql: $(SQL_PIECES) src/sql
	cat $(SQL_PIECES) > $@

# One suite at a time, as a non-root user, against an installed build:
#   make regresscheck [REGRESS="stock outbox"]
#   make isolationcheck [ISOLATION=stock_race]
#   make tapcheck [PROVE_TESTS=test/t/001_worker.pl]
.PHONY: regresscheck isolationcheck tapcheck test demo bench
regresscheck:
	$(pg_regress_installcheck) $(REGRESS_OPTS) $(REGRESS)

isolationcheck:
	$(pg_isolation_regress_installcheck) $(ISOLATION_OPTS) $(ISOLATION)

tapcheck:
	$(prove_installcheck)

# The README's two commands.
test:
	bash test/run_all.sh

demo:
	bash test/demo.sh

bench:
	bash bench/run.sh

# C unit tests of the pure policy functions (run by test/t/060_policy_unit.pl).
test/unit/policy_test: test/unit/policy_test.c src/policy.c src/policy.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/policy_test.c src/policy.c -lm

# C unit tests of the destination allowlist (run by test/t/063_allowlist_unit.pl).
test/unit/allowlist_test: test/unit/allowlist_test.c src/allowlist.c src/allowlist.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/allowlist_test.c src/allowlist.c

# C unit tests of the text sanitizer (run by test/t/072_sanitize_unit.pl).
test/unit/sanitize_test: test/unit/sanitize_test.c src/sanitize.c src/sanitize.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/sanitize_test.c src/sanitize.c
