# The loopback receiver (test/receiver.py) for TAP tests: start, control,
# read its log, stop.
#
#   my $rcv = CallbackCenterReceiver->start(secrets => ['whsec_...']);
#   my $url = $rcv->url('/erp');          # http://127.0.0.1:PORT/erp
#   $rcv->control('/erp', '500', times => 2);
#   my @lines = $rcv->log_lines;          # decoded JSON, one per request
#   my $stats = $rcv->stats;              # GET /__stats, decoded
#   $rcv->stop;                           # also done when the object goes
package CallbackCenterReceiver;

use strict;
use warnings;
use File::Basename qw(dirname);
use File::Spec;
use HTTP::Tiny;
use JSON::PP;
use PostgreSQL::Test::Utils;
use POSIX qw(WNOHANG);
use Time::HiRes qw(usleep);

my $receiver_py =
  File::Spec->rel2abs(File::Spec->catfile(dirname(__FILE__), '..', 'receiver.py'));

# Starts a receiver as a child process and waits until it listens.
# %opts: secrets (array ref), path_secrets (hash ref prefix => secret),
# max_seconds (default 600), tls_cert and tls_key (PEM files: serve HTTPS;
# url() then says https, and control/stats need IO::Socket::SSL, which the
# test machines may lack: read the log instead).
sub start
{
	my ($class, %opts) = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir('receiver');
	my $self = bless {
		portfile => "$dir/port",
		log => "$dir/requests.jsonl",
		http => HTTP::Tiny->new(timeout => 30, keep_alive => 0),
	}, $class;
	my @cmd = ('python3', $receiver_py, '--port', '0',
		'--portfile', $self->{portfile}, '--log', $self->{log},
		'--max-seconds', $opts{max_seconds} // 600);
	push @cmd, '--secret', $_ for @{ $opts{secrets} // [] };
	my %ps = %{ $opts{path_secrets} // {} };
	push @cmd, '--path-secret', "$_=$ps{$_}" for sort keys %ps;
	if ($opts{tls_cert})
	{
		push @cmd, '--tls-cert', $opts{tls_cert}, '--tls-key', $opts{tls_key};
		$self->{scheme} = 'https';
		$self->{http} = HTTP::Tiny->new(timeout => 30, keep_alive => 0,
			verify_SSL => 0);
	}

	my $pid = fork();
	die "fork failed: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDOUT, '>>', "$dir/receiver.out");
		open(STDERR, '>&', \*STDOUT);
		exec(@cmd) or die "could not run receiver: $!";
	}
	$self->{pid} = $pid;

	# Wait (up to the test timeout) for the port file.
	my $waited = 0;
	while (!-s $self->{portfile})
	{
		die "receiver exited early" if waitpid($pid, WNOHANG) == $pid;
		die "receiver did not start"
		  if $waited++ > $PostgreSQL::Test::Utils::timeout_default * 20;
		usleep(50_000);
	}
	open(my $fh, '<', $self->{portfile}) or die "open portfile: $!";
	my $port = <$fh>;
	close $fh;
	chomp $port;
	$self->{port} = $port;
	return $self;
}

sub port { return $_[0]->{port}; }
sub logfile { return $_[0]->{log}; }

# http://127.0.0.1:PORT followed by $path.
sub url
{
	my ($self, $path) = @_;
	my $scheme = $self->{scheme} // 'http';
	return "$scheme://127.0.0.1:$self->{port}" . ($path // '/');
}

# Sets the rule for a path prefix: mode ("200", "500", "429", "stall",
# "reset", "redirect", ...; undef drops the rule) and options retry_after,
# stall_s, times, status_body, body_size, delay_ms, cycle (array ref of
# modes answered in turn).
sub control
{
	my ($self, $path, $mode, %opts) = @_;
	my $res = $self->{http}->post($self->url('/__control'),
		{ content => encode_json({ path => $path, mode => $mode, %opts }) });
	die "control failed: $res->{status} $res->{content}" unless $res->{success};
	return;
}

# Drops every rule and zeroes the counters.
sub reset
{
	my ($self) = @_;
	my $res = $self->{http}->post($self->url('/__reset'));
	die "reset failed: $res->{status}" unless $res->{success};
	return;
}

# Counters: requests, connections, max_in_flight, paths => {path => {mode => n}}.
sub stats
{
	my ($self) = @_;
	my $res = $self->{http}->get($self->url('/__stats'));
	die "stats failed: $res->{status}" unless $res->{success};
	return decode_json($res->{content});
}

# Every logged request so far, decoded, optionally only those whose path
# starts with $prefix.
sub log_lines
{
	my ($self, $prefix) = @_;
	my @out;
	open(my $fh, '<', $self->{log}) or return ();
	while (my $line = <$fh>)
	{
		next unless $line =~ /\n\z/;    # a line being written
		my $e = decode_json($line);
		push @out, $e if !defined $prefix || index($e->{path}, $prefix) == 0;
	}
	close $fh;
	return @out;
}

# Waits until at least $n requests under $prefix are logged (up to the
# test timeout); returns whether they were.
sub wait_for_requests
{
	my ($self, $prefix, $n) = @_;
	my $deadline = time() + $PostgreSQL::Test::Utils::timeout_default;
	while (time() < $deadline)
	{
		return 1 if scalar($self->log_lines($prefix)) >= $n;
		usleep(50_000);
	}
	return 0;
}

# Stops the receiver (SIGTERM) and reaps it.
sub stop
{
	my ($self) = @_;
	return unless $self->{pid};
	kill 'TERM', $self->{pid};
	waitpid($self->{pid}, 0);
	delete $self->{pid};
	return;
}

sub DESTROY
{
	my ($self) = @_;
	$self->stop if $self->{pid};
}

1;
