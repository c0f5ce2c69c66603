#!/usr/bin/env python3
"""A payment provider on loopback for the adapter tests (test/t/082_adapters.pl).

One server speaks the three provider APIs the adapter layer calls
(doc/adapters.md): WeChat Pay APIv3 (/v3/...), Alipay's gateway (POST /alipay)
and UnionPay's back channel (/gateway/api/...).  Every request's signature is
verified with the merchant's public key; every answer is signed with the
provider's key, in the provider's own format.  What it says is set per order
(or refund) id, or as the default, by POST /_control:

    {"id": "o-1", "say": ["error", "paid"]}   answers in turn, the last one
                                             repeats
    {"default": "unpaid"}

{"id": "o-1", "amount": 500} sets the amount a paid answer names;
{"alipay_cert_sn": SN} the SN POST /alipay-cert answers name (Alipay's
certificate mode, signed with alipay_cert.key).
Answers: paid, unpaid, closed, notfound, error (HTTP 500), slow (sleeps
--slow seconds, then answers paid), badsig (a paid answer whose signature is
wrong), success / processing (refunds).  GET /_log returns every request
seen, in order, as JSON: format, method, path, id, verified, params.

Standard library, the python3-cryptography module Debian ships, loopback
only.  Usage: mock_provider.py --keys DIR --port-file FILE; DIR holds
merchant.pub (PEM), wechat_platform.key, alipay.key, unionpay_sign.key and
unionpay_sign.crt (PEM), and wechat_serial (the platform key's id).
"""

import argparse
import base64
import hashlib
import http.server
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.exceptions import InvalidSignature

STATE = {"default": "unpaid", "say": {}, "log": [], "lock": threading.Lock()}
# Amounts of the orders, so that paid answers match: POST /_control
# {"id": ..., "amount": cents} sets one.
AMOUNTS = {}
KEYS = {}


def load_keys(d):
    def priv(name):
        path = os.path.join(d, name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), None)

    with open(os.path.join(d, "merchant.pub"), "rb") as f:
        KEYS["merchant"] = serialization.load_pem_public_key(f.read())
    KEYS["wechat"] = priv("wechat_platform.key")
    KEYS["alipay"] = priv("alipay.key")
    KEYS["alipay_cert"] = priv("alipay_cert.key")
    KEYS["unionpay"] = priv("unionpay_sign.key")
    KEYS["wrong"] = priv("wrong.key")
    path = os.path.join(d, "unionpay_sign.crt")
    KEYS["unionpay_cert"] = open(path).read() if os.path.exists(path) else None
    path = os.path.join(d, "wechat_serial")
    KEYS["wechat_serial"] = open(path).read().strip() if os.path.exists(path) else None


def sign(key, data):
    return base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify(data, sig_b64):
    try:
        KEYS["merchant"].verify(base64.b64decode(sig_b64), data, padding.PKCS1v15(),
                                hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def answer_for(ident):
    """The next answer for an order or refund id (its list, else the default)."""
    with STATE["lock"]:
        says = STATE["say"].get(ident)
        if not says:
            return STATE["default"]
        if len(says) > 1:
            return says.pop(0)
        return says[0]


def note(entry):
    with STATE["lock"]:
        STATE["log"].append(entry)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_log":
            with STATE["lock"]:
                out = json.dumps(STATE["log"]).encode()
            return self.send(200, out, [("Content-Type", "application/json")])
        if self.path.startswith("/v3/"):
            return self.wechat("GET", b"")
        self.send(404, b"")

    def do_POST(self):
        body = self.body()
        if self.path == "/_control":
            c = json.loads(body)
            with STATE["lock"]:
                if "default" in c:
                    STATE["default"] = c["default"]
                if "alipay_cert_sn" in c:
                    STATE["alipay_cert_sn"] = c["alipay_cert_sn"]
                if "amount" in c:
                    AMOUNTS[c["id"]] = c["amount"]
                if "say" in c:
                    says = c["say"]
                    STATE["say"][c["id"]] = list(says) if isinstance(says, list) else [says]
            return self.send(200, b"ok")
        if self.path.startswith("/v3/"):
            return self.wechat("POST", body)
        if self.path.startswith("/alipay"):
            return self.alipay(body)
        if self.path.startswith("/gateway/api/"):
            return self.unionpay(body)
        self.send(404, b"")

    # -- WeChat Pay APIv3 ----------------------------------------------------

    def wechat_reply(self, status, obj, how):
        body = b"" if obj is None else json.dumps(obj, ensure_ascii=False).encode()
        ts = str(int(time.time()))
        nonce = secrets.token_hex(16)
        msg = (ts + "\n" + nonce + "\n").encode() + body + b"\n"
        key = KEYS["wrong"] if how == "badsig" else KEYS["wechat"]
        headers = [("Content-Type", "application/json"),
                   ("Wechatpay-Timestamp", ts), ("Wechatpay-Nonce", nonce),
                   ("Wechatpay-Serial", KEYS["wechat_serial"]),
                   ("Wechatpay-Signature", sign(key, msg))]
        self.send(status, body, headers)

    def wechat(self, method, body):
        auth = self.headers.get("Authorization") or ""
        fields = {}
        if auth.startswith("WECHATPAY2-SHA256-RSA2048 "):
            for part in auth[len("WECHATPAY2-SHA256-RSA2048 "):].split(","):
                k, _, v = part.partition("=")
                fields[k.strip()] = v.strip().strip('"')
        msg = (method + "\n" + self.path + "\n" + fields.get("timestamp", "") + "\n"
               + fields.get("nonce_str", "") + "\n").encode() + body + b"\n"
        ok = verify(msg, fields.get("signature", ""))
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")
        params = json.loads(body) if body else {}
        ident = None
        if url.path.startswith("/v3/pay/transactions/out-trade-no/"):
            ident = urllib.parse.unquote(parts[5])
            op = "close" if url.path.endswith("/close") else "query"
        elif url.path == "/v3/refund/domestic/refunds":
            ident = params.get("out_refund_no")
            op = "refund"
        else:
            ident = urllib.parse.unquote(parts[-1])
            op = "refund_query"
        note({"format": "wechatpay_v3", "method": method, "path": self.path, "op": op,
              "id": ident, "verified": ok, "mchid": fields.get("mchid"),
              "serial_no": fields.get("serial_no"), "nonce": fields.get("nonce_str"),
              "params": params})
        if not ok:
            return self.wechat_reply(401, {"code": "SIGN_ERROR", "message": "bad signature"}, "")
        say = answer_for(ident)
        if say == "slow":
            time.sleep(ARGS.slow)
            say = "paid"
        if say == "error":
            return self.wechat_reply(500, {"code": "SYSTEM_ERROR", "message": "try again"}, "")
        if op == "close":
            return self.wechat_reply(204, None, say)
        if op in ("refund", "refund_query"):
            amount = params.get("amount", {}).get("refund", 100)
            return self.wechat_reply(200, {
                "refund_id": "wxr-" + ident, "out_refund_no": ident,
                "status": "PROCESSING" if say == "processing" else "SUCCESS",
                "amount": {"refund": amount, "total": amount, "currency": "CNY"}}, say)
        if say == "notfound":
            return self.wechat_reply(404, {"code": "ORDER_NOT_EXIST", "message": "no such order"}, "")
        state = {"paid": "SUCCESS", "badsig": "SUCCESS", "unpaid": "NOTPAY",
                 "closed": "CLOSED"}[say]
        return self.wechat_reply(200, {
            "mchid": fields.get("mchid"), "out_trade_no": ident,
            "transaction_id": "wx-" + ident, "trade_state": state,
            "amount": {"total": AMOUNTS.get(ident, 100), "currency": "CNY"}}, say)

    # -- Alipay --------------------------------------------------------------

    def alipay(self, body):
        params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        signed = "&".join(k + "=" + params[k] for k in sorted(params)
                          if k != "sign" and params[k] != "")
        ok = verify(signed.encode(), params.get("sign", ""))
        method = params.get("method", "")
        biz = json.loads(params.get("biz_content") or "{}")
        op = {"alipay.trade.query": "query", "alipay.trade.close": "close",
              "alipay.trade.refund": "refund",
              "alipay.trade.fastpay.refund.query": "refund_query"}.get(method, method)
        ident = biz.get("out_request_no") if op.startswith("refund") else biz.get("out_trade_no")
        note({"format": "alipay", "method": "POST", "path": self.path, "op": op, "id": ident,
              "verified": ok, "params": params})
        node_name = method.replace(".", "_") + "_response"
        say = answer_for(ident) if ok else "sigerror"
        if say == "slow":
            time.sleep(ARGS.slow)
            say = "paid"
        if say == "error":
            return self.send(500, b"busy")
        if say == "sigerror":
            node = {"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-signature"}
        elif op == "close":
            node = {"code": "10000", "msg": "Success", "out_trade_no": ident}
        elif op == "refund":
            node = {"code": "10000", "msg": "Success", "out_trade_no": biz.get("out_trade_no"),
                    "trade_no": "ali-" + str(biz.get("out_trade_no")),
                    "fund_change": "N" if say == "processing" else "Y",
                    "refund_fee": biz.get("refund_amount")}
        elif op == "refund_query":
            node = {"code": "10000", "msg": "Success", "out_request_no": ident,
                    "trade_no": "ali-" + str(biz.get("out_trade_no")),
                    "refund_amount": "1.00",
                    "refund_status": "" if say == "processing" else "REFUND_SUCCESS"}
        elif say == "notfound":
            node = {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST"}
        else:
            node = {"code": "10000", "msg": "Success", "out_trade_no": ident,
                    "trade_no": "ali-" + ident,
                    "trade_status": {"paid": "TRADE_SUCCESS", "badsig": "TRADE_SUCCESS",
                                     "unpaid": "WAIT_BUYER_PAY",
                                     "closed": "TRADE_CLOSED"}[say],
                    "total_amount": "%d.%02d" % divmod(AMOUNTS.get(ident, 100), 100)}
        node_text = json.dumps(node, ensure_ascii=False, separators=(",", ":"))
        # /alipay-cert: certificate mode, signed by the certificate's key and
        # naming it by its SN, after the node as Alipay puts it.
        cert = self.path.startswith("/alipay-cert")
        key = KEYS["wrong"] if say == "badsig" else KEYS["alipay_cert" if cert else "alipay"]
        sig = sign(key, node_text.encode())
        sn = ',"alipay_cert_sn":"' + STATE.get("alipay_cert_sn", "") + '"' if cert else ""
        out = '{"' + node_name + '":' + node_text + sn + ',"sign":"' + sig + '"}'
        self.send(200, out.encode(), [("Content-Type", "text/html;charset=utf-8")])

    # -- UnionPay ------------------------------------------------------------

    def unionpay(self, body):
        params = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        signed = "&".join(k + "=" + params[k] for k in sorted(params)
                          if k != "signature" and params[k] != "")
        ok = verify(hashlib.sha256(signed.encode()).hexdigest().encode(),
                    params.get("signature", ""))
        op = "refund" if params.get("txnType") == "04" else "query"
        ident = params.get("orderId")
        note({"format": "unionpay", "method": "POST", "path": self.path, "op": op, "id": ident,
              "verified": ok, "params": params})
        say = answer_for(ident) if ok else "sigerror"
        # UnionPay knows a transaction by orderId and txnTime together: a
        # query of a refund with another txnTime than its request finds none.
        if ok and op == "refund":
            STATE.setdefault("unionpay_txn_time", {})[ident] = params.get("txnTime")
        elif ok and STATE.get("unionpay_txn_time", {}).get(ident, params.get("txnTime")) \
                != params.get("txnTime"):
            say = "notfound"
        if say == "slow":
            time.sleep(ARGS.slow)
            say = "paid"
        if say == "error":
            return self.send(500, b"busy")
        f = {"version": "5.1.0", "encoding": "UTF-8", "signMethod": "01",
             "merId": params.get("merId", ""), "orderId": ident or "",
             "txnType": params.get("txnType", ""), "txnSubType": params.get("txnSubType", ""),
             "txnTime": params.get("txnTime", ""), "accessType": "0",
             "queryId": "up-" + str(ident)}
        if say == "sigerror":
            f.update(respCode="11", respMsg="signature error")
        elif op == "refund":
            f.update(respCode="00", respMsg="success", txnAmt=params.get("txnAmt", ""))
        elif say == "notfound":
            # no transaction, no queryId
            del f["queryId"]
            f.update(respCode="34", respMsg="no such transaction")
        else:
            orig = {"paid": "00", "badsig": "00", "unpaid": "05", "closed": "12",
                    "success": "00", "processing": "05"}[say]
            f.update(respCode="00", respMsg="success", origRespCode=orig,
                     origRespMsg="ok", txnAmt=str(AMOUNTS.get(ident, 100)))
        f["signPubKeyCert"] = KEYS["unionpay_cert"]
        content = "&".join(k + "=" + f[k] for k in sorted(f) if f[k] != "")
        key = KEYS["wrong"] if say == "badsig" else KEYS["unionpay"]
        f["signature"] = sign(key, hashlib.sha256(content.encode()).hexdigest().encode())
        out = "&".join(k + "=" + urllib.parse.quote(v, safe="") for k, v in f.items())
        self.send(200, out.encode(), [("Content-Type", "text/plain;charset=UTF-8")])


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--keys", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--slow", type=float, default=3.0)
    ARGS = p.parse_args()
    load_keys(ARGS.keys)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    tmp = ARGS.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(tmp, ARGS.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
