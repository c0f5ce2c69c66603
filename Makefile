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
SHLIB_LINK += -lcurl -lcrypto
# The library's version string is the control file's default_version.
PG_CPPFLAGS += -I$(srcdir)/src -DCC_VERSION='"$(EXTVERSION)"'
# Extra defines for a test build, e.g. the PostgreSQL 17 code path on 15:
#   make clean && make CC_EXTRA_CPPFLAGS=-DCC_NO_OVERRIDE_SEARCH_PATH
PG_CPPFLAGS += $(CC_EXTRA_CPPFLAGS)

SQL_PIECES = $(sort $(wildcard src/sql/*.sql))

# pg_regress and pg_isolation_regress start their own preloaded instance.
#
# Then the stock tests run again under forced plans: each stock_plan_<p>
# entry (stock_plan_<p>_iso for the specs) sets the database up (hash joins, merge joins or nested loops off
# with ALTER DATABASE; or the planner's own choice after ANALYZE with a
# 256-slot SKU present), the same tests follow with the same expected
# output, and stock_plan_reset undoes it.  No stock statement's effect may
# depend on the plan (doc/stock.md).
STOCK_PLANS = hash_off merge_off nestloop_off analyzed
STOCK_PLAN_REGRESS = stock stock_hot stock_hot_plan
STOCK_PLAN_ISOLATION = stock_cas stock_hot_order stock_hot_race stock_hot_stray \
	stock_order stock_race stock_restore stock_rr
stock_plan_runs = $(foreach p,$(STOCK_PLANS),stock_plan_$(p)$(2) $(1)) stock_plan_reset$(2)

REGRESS = $(filter-out stock_plan_%,$(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))) \
	$(call stock_plan_runs,$(STOCK_PLAN_REGRESS))
REGRESS_OPTS = --temp-instance=tmp_check_regress --temp-config=$(srcdir)/test/regress.conf
ISOLATION = $(filter-out stock_plan_%,$(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))) \
	$(call stock_plan_runs,$(STOCK_PLAN_ISOLATION),_iso)
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
.PHONY: regresscheck isolationcheck tapcheck test demo bench bench-short
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

# One table, CSV and chart of every workload (bench/all.sh); bench-short
# measures the same workloads small.
bench:
	bash bench/all.sh

bench-short:
	bash bench/all.sh --short

# C unit tests of the pure policy functions (run by test/t/060_policy_unit.pl).
test/unit/policy_test: test/unit/policy_test.c src/policy.c src/policy.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/policy_test.c src/policy.c -lm

# C unit tests of the destination allowlist (run by test/t/063_allowlist_unit.pl).
test/unit/allowlist_test: test/unit/allowlist_test.c src/allowlist.c src/allowlist.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/allowlist_test.c src/allowlist.c

# AES-256-GCM encryption of WeChat Pay v3 test notifications (run by
# test/t/075_channels.pl; openssl enc cannot do GCM).
test/unit/gcm_seal: test/unit/gcm_seal.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/gcm_seal.c -lcrypto

# C unit tests of the text sanitizer (run by test/t/072_sanitize_unit.pl).
test/unit/sanitize_test: test/unit/sanitize_test.c src/sanitize.c src/sanitize.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ test/unit/sanitize_test.c src/sanitize.c
