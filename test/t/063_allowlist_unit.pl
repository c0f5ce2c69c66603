# Unit tests of the destination allowlist (src/allowlist.c): builds the C
# test program and hands its TAP output to prove.
use strict;
use warnings;

system('make', '-s', 'test/unit/allowlist_test') == 0
  or die "could not build test/unit/allowlist_test";
exec('./test/unit/allowlist_test') or die "could not run test/unit/allowlist_test: $!";
