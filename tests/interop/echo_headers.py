"""A raw HTTP/1.1 backend for `zdr serve -- python3 echo_headers.py`: it
answers every request with JSON naming exactly what reached it: the
method, the target, every header field as a [name, value] pair in the
order and number received (repeated fields stay repeated), and the body's
length. `Upgrade` requests are answered 101 only if the app is started
with ECHO_UPGRADES set (then the connection echoes), else as plain ones.
"""

import json
import os
import http.server


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = self.read_chunked()
        if os.environ.get("ECHO_UPGRADES") and self.headers.get("upgrade"):
            self.send_response(101)
            self.send_header("connection", "upgrade")
            self.send_header("upgrade", self.headers["upgrade"])
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    return
                self.connection.sendall(data)
        seen = {
            "method": self.command,
            "target": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": len(body),
        }
        out = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def read_chunked(self):
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = do_HEAD = answer

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(
    ("127.0.0.1", int(os.environ["PORT"])), Handler
).serve_forever()
