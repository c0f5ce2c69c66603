# Unit tests of the delivery policy (src/policy.c): builds the C test
# program and hands its TAP output to prove.
use strict;
use warnings;

system('make', '-s', 'test/unit/policy_test') == 0
  or die "could not build test/unit/policy_test";
exec('./test/unit/policy_test') or die "could not run test/unit/policy_test: $!";
