# The HTTP layer stays inside the backend's file-descriptor budget: with
# max_files_per_process at 100, a call asking for 200 concurrent
# transfers runs fewer at once and still completes every request, and the
# backend keeps opening files afterwards.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use CallbackCenterTest;
use CallbackCenterReceiver;

my $node = cc_node('http_fds', conf => "max_files_per_process = 100\n");
my $rcv = CallbackCenterReceiver->start;

$rcv->control('/fd', '200', delay_ms => 20);
my $urls = join(',', map { "'" . $rcv->url("/fd/$_") . "'" } 1 .. 200);
is($node->safe_psql('postgres', qq{
	SELECT count(*) || '/' || count(*) FILTER (WHERE status = 200 AND error IS NULL)
	FROM callback_center.http_probe(ARRAY[$urls], max_concurrent => 200)}),
	'200/200', 'all 200 requests answered within the descriptor budget');
my $stats = $rcv->stats;
cmp_ok($stats->{max_in_flight}, "<=", 34,
	'concurrency capped at a third of the descriptors (AcquireExternalFD budget)');
cmp_ok($stats->{max_in_flight}, '>=', 1, 'requests ran');

# The backend still opens relation files normally in the same session.
is($node->safe_psql('postgres', qq{
	SELECT count(*) FROM callback_center.http_probe(ARRAY[$urls], max_concurrent => 200);
	CREATE TABLE fd_check AS SELECT g FROM generate_series(1, 1000) g;
	SELECT count(*) FROM fd_check;}), "200\n1000",
	'files open normally after a large concurrent call');

$rcv->stop;
$node->stop;
done_testing();
