#!/usr/bin/env python3
"""Loopback HTTP receiver for the callback_center tests and demo.

    python3 test/receiver.py --port 0 --portfile F --log F.jsonl \
        [--secret whsec_...]... [--path-secret /erp=whsec_...]... \
        [--max-seconds 600] [--tls-cert CERT.pem --tls-key KEY.pem]

Binds 127.0.0.1 only (HTTP/1.1, keep-alive), writes the chosen port to the
portfile once it listens, and appends one JSON line per request to the log
(flushed per line): method, path, headers (lower-case names), body,
received_at, client_port, connection (a number per TCP connection), mode,
and signature_ok when secrets are given (Standard Webhooks, verified here).

Every path answers 200 {"ok":true} unless a rule says otherwise:
    POST /__control {"path": "/erp", "mode": "500", "retry_after": 2,
                     "stall_s": 10, "times": 3, "status_body": "...",
                     "body_size": 100000, "delay_ms": 20}
mode is an HTTP status ("200", "429", "500", "503", "410", ...), "stall"
(sleep stall_s, past the client's timeout, then 200), "reset" (close the
socket with an RST, no answer) or "redirect" (302 to /redirected).  A rule
applies to paths starting with its path (longest prefix wins), "times"
times when given (then it is dropped), else until changed; "mode": null
drops it.  "cycle": ["500", "500", "200"] answers with each mode of the
list in turn, request after request (mode must still be given; it is
ignored).  retry_after is sent verbatim as Retry-After (seconds or an
HTTP-date); body_size pads the body to that many bytes; delay_ms sleeps
before answering (to make requests overlap).  Mode "bytes" answers
"status" (default 200) with the raw bytes of "body_hex" (hex digits), to
send bodies that are no valid text.
    GET /__stats   counts per path and mode, requests, connections,
                   max_in_flight (concurrency high-water mark)
    POST /__reset  drops every rule and zeroes the stats
Exits cleanly on SIGTERM or SIGINT, and by itself after --max-seconds.
With --tls-cert and --tls-key it speaks HTTPS instead (for TLS checks).
"""

import argparse
import base64
import hashlib
import hmac
import itertools
import json
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STOP = threading.Event()
LOCK = threading.Lock()
RULES = {}
STATS = {}
COUNTERS = {"requests": 0, "connections": 0, "in_flight": 0,
            "max_in_flight": 0}
CONN_IDS = itertools.count(1)
ARGS = None
LOG = None


def decode_secret(secret):
    """Key bytes of a whsec_ secret (base64 after the prefix)."""
    s = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    return base64.b64decode(s)


def signature_ok(path, headers, body):
    """Standard Webhooks: any v1 signature of id.timestamp.body under any
    secret valid for this path matches (constant-time compare)."""
    msg_id = headers.get("webhook-id")
    ts = headers.get("webhook-timestamp")
    sigs = headers.get("webhook-signature")
    if not msg_id or not ts or not sigs:
        return False
    secrets = list(ARGS.secret)
    for prefix, sec in ARGS.path_secret:
        if path.startswith(prefix):
            secrets.append(sec)
    signed = msg_id.encode() + b"." + ts.encode() + b"." + body
    ok = False
    for sec in secrets:
        try:
            key = decode_secret(sec)
        except ValueError:
            continue
        expected = base64.b64encode(
            hmac.new(key, signed, hashlib.sha256).digest())
        for part in sigs.split(" "):
            version, _, value = part.partition(",")
            if version == "v1" and hmac.compare_digest(
                    expected, value.encode()):
                ok = True
    return ok


def take_rule(path):
    """The rule for path (longest prefix), consuming one of its 'times'."""
    with LOCK:
        best = None
        for prefix in RULES:
            if path.startswith(prefix) and (best is None
                                            or len(prefix) > len(best)):
                best = prefix
        if best is None:
            return {"mode": "200"}
        rule = dict(RULES[best])
        cycle = RULES[best].get("cycle")
        if cycle:
            n = RULES[best].get("served", 0)
            rule["mode"] = str(cycle[n % len(cycle)])
            RULES[best]["served"] = n + 1
        if "times" in RULES[best] and RULES[best]["times"] is not None:
            RULES[best]["times"] -= 1
            if RULES[best]["times"] <= 0:
                del RULES[best]
        return rule


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cc-receiver/1"

    def setup(self):
        super().setup()
        with LOCK:
            COUNTERS["connections"] += 1
        self.conn_id = next(CONN_IDS)

    def log_message(self, fmt, *args):  # quiet
        pass

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def reply(self, status, body, extra=()):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def control(self, body):
        if self.path == "/__control":
            req = json.loads(body or b"{}")
            with LOCK:
                if req.get("mode") is None:
                    RULES.pop(req["path"], None)
                else:
                    rule = {k: req[k] for k in req if k != "path"}
                    rule["mode"] = str(rule["mode"])
                    RULES[req["path"]] = rule
            self.reply(200, '{"ok":true}')
        elif self.path == "/__reset":
            with LOCK:
                RULES.clear()
                STATS.clear()
                COUNTERS.update(requests=0, connections=0, max_in_flight=0)
            self.reply(200, '{"ok":true}')
        elif self.path == "/__stats":
            with LOCK:
                out = dict(COUNTERS, paths=STATS)
                self.reply(200, json.dumps(out))
        else:
            self.reply(404, '{"error":"unknown control path"}')

    def handle_any(self):
        body = self.read_body()
        path = self.path
        if path.startswith("/__"):
            self.control(body)
            return
        received_at = time.time()
        with LOCK:
            COUNTERS["requests"] += 1
            COUNTERS["in_flight"] += 1
            COUNTERS["max_in_flight"] = max(COUNTERS["max_in_flight"],
                                            COUNTERS["in_flight"])
        try:
            rule = take_rule(path)
            mode = rule["mode"]
            headers = {}
            for k, v in self.headers.items():
                k = k.lower()
                headers[k] = headers[k] + ", " + v if k in headers else v
            entry = {"method": self.command, "path": path,
                     "headers": headers,
                     "body": body.decode("utf-8", "replace"),
                     "received_at": received_at,
                     "client_port": self.client_address[1],
                     "connection": self.conn_id, "mode": mode}
            if ARGS.secret or ARGS.path_secret:
                entry["signature_ok"] = signature_ok(path, headers, body)
            line = json.dumps(entry) + "\n"
            with LOCK:
                STATS.setdefault(path, {}).setdefault(mode, 0)
                STATS[path][mode] += 1
                LOG.write(line)
                LOG.flush()
            self.respond(rule, mode)
        finally:
            with LOCK:
                COUNTERS["in_flight"] -= 1

    def respond(self, rule, mode):
        if rule.get("delay_ms"):
            STOP.wait(float(rule["delay_ms"]) / 1000.0)
        if mode == "stall":
            STOP.wait(float(rule.get("stall_s", 10)))
            mode = "200"
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
            return
        extra = []
        if mode == "bytes":
            try:
                self.reply(int(rule.get("status", 200)),
                           bytes.fromhex(rule.get("body_hex", "")))
            except OSError:
                self.close_connection = True
            return
        if mode == "redirect":
            status = 302
            extra.append(("Location", rule.get("location", "/redirected")))
        else:
            status = int(mode)
        if rule.get("retry_after") is not None:
            extra.append(("Retry-After", str(rule["retry_after"])))
        body = rule.get("status_body")
        if body is None:
            body = '{"ok":true}' if status < 300 else '{"ok":false}'
        if rule.get("body_size"):
            size = int(rule["body_size"])
            body = (body + "x" * size)[:size]
        try:
            self.reply(status, body, extra)
        except OSError:
            self.close_connection = True

    do_POST = handle_any
    do_GET = handle_any
    do_PUT = handle_any
    do_DELETE = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # A client that hangs up mid-answer is normal here (timeouts).
        pass


def main():
    global ARGS, LOG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--portfile", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--secret", action="append", default=[])
    ap.add_argument("--path-secret", action="append", default=[],
                    type=lambda s: tuple(s.split("=", 1)),
                    help="PREFIX=whsec_... valid for paths under PREFIX")
    ap.add_argument("--max-seconds", type=float, default=600)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ARGS = ap.parse_args()

    LOG = open(ARGS.log, "a", encoding="utf-8")
    server = Server(("127.0.0.1", ARGS.port), Handler)
    if ARGS.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ARGS.tls_cert, ARGS.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)

    def stop(*_):
        STOP.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(ARGS.max_seconds, stop)
    timer.daemon = True
    timer.start()

    tmp = ARGS.portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % server.server_address[1])
    os.rename(tmp, ARGS.portfile)

    server.serve_forever(poll_interval=0.1)
    server.server_close()
    LOG.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
