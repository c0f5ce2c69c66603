# Unit tests of the text sanitizer (src/sanitize.c): builds the C test
# program and hands its TAP output to prove.
use strict;
use warnings;

system('make', '-s', 'test/unit/sanitize_test') == 0
  or die "could not build test/unit/sanitize_test";
exec('./test/unit/sanitize_test') or die "could not run test/unit/sanitize_test: $!";
