#!/usr/bin/env python3
"""A payment-notification web tier for callback_center, standard library only.

Every provider POSTs its notifications to /pay/<provider>; this server passes
the raw body and the headers to callback_center.payment_callback() and copies
the answer (HTTP status and body) back.  Verification, decoding, recording
once and moving the order happen in the database; nothing here knows a
provider's format.

    PGHOST=/var/run/postgresql PGDATABASE=shop PGUSER=shop_app \\
        python3 examples/payment_gateway.py --port 8080

How the request reaches SQL without being interpolated into it: psql reads
a fixed script on its standard input; the provider name, the headers (as a
JSON object) and the body (in hex, so that any bytes travel: an Alipay form
in GBK need not be valid text) travel in environment variables, which the
script loads with \\getenv (psql 15) and passes as :'provider', :'headers'
and decode(:'body', 'hex'), the bytea overload of payment_callback.  psql
quotes a :'variable' as a literal itself (the rules of PQescapeLiteral),
so no byte of the request is ever SQL text we built, and nothing of it
appears on a command line (ps).  The answer comes back as one
line, "status|hex of body", so that no body can be mistaken for the
separator.  With psycopg 3 or any driver that binds parameters, the same is
one call: cursor.execute(SQL, (provider, headers, body)).

Connection settings are libpq's environment variables (PGHOST, PGPORT,
PGDATABASE, PGUSER, PGPASSFILE...); the role needs callback_center_app and
USAGE on schema callback_center in that database.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Providers' notifications are small; anything larger is refused unread.
MAX_BODY = 256 * 1024
PROVIDER = re.compile(r"^/pay/([A-Za-z0-9_.-]{1,63})/?$")

SCRIPT = r"""\set ON_ERROR_STOP on
\getenv provider CC_PROVIDER
\getenv headers CC_HEADERS
\getenv body CC_BODY
SELECT http_status || '|' || encode(convert_to(response_body, 'UTF8'), 'hex')
  FROM callback_center.payment_callback(:'provider', :'headers'::jsonb, decode(:'body', 'hex'));
"""


def payment_callback(psql, provider, headers, body):
    """(status, body text) of callback_center.payment_callback for the body
    bytes, or None."""
    env = dict(os.environ, CC_PROVIDER=provider,
               CC_HEADERS=json.dumps(headers), CC_BODY=body.hex())
    done = subprocess.run([psql, "-X", "-q", "-A", "-t", "-f", "-"],
                          input=SCRIPT, env=env, capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        sys.stderr.write("payment_callback failed: %s\n" % done.stderr.strip())
        return None
    status, _, hexbody = done.stdout.strip().partition("|")
    return int(status), bytes.fromhex(hexbody).decode("utf-8")


def content_type(body):
    if body.startswith("{"):
        return "application/json"
    if body.startswith("<"):
        return "text/xml; charset=utf-8"
    return "text/plain; charset=utf-8"


class Handler(BaseHTTPRequestHandler):
    psql = "psql"

    def answer(self, status, body):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type(body))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        m = PROVIDER.match(self.path)
        if not m:
            return self.answer(404, "no such endpoint")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self.answer(411, "length required")
        if length < 0 or length > MAX_BODY:
            return self.answer(413, "body too large")
        # The bytes as posted: the database decodes them per the provider's
        # format and answers what it cannot read.
        body = self.rfile.read(length)
        # One value per header name, repeats joined as HTTP allows; the
        # database refuses what it cannot read.
        headers = {}
        for name in self.headers.keys():
            if name not in headers:
                headers[name] = ", ".join(self.headers.get_all(name))
        result = payment_callback(self.psql, m.group(1), headers, body)
        if result is None:
            # Misuse (unknown provider, no key loaded): not the provider's
            # fault; 500 makes it deliver again once fixed.
            return self.answer(500, "internal error")
        self.answer(*result)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    ap.add_argument("--psql", default=os.environ.get("PSQL", "psql"))
    args = ap.parse_args()
    Handler.psql = args.psql
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print("listening on %s:%d" % server.server_address[:2], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
