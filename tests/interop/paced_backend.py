"""A raw HTTP/1.1 backend for `zdr serve -- python3 paced_backend.py` that
writes its answers the ways real apps do, byte for byte:

- `/split`: the head, then (200 ms later) a 5-byte body, as two writes,
  the way an ASGI server writes `http.response.start` and the body.
- `/stream`: a chunked answer: the head and a first chunk, then the rest
  only once the file named by `STREAM_GATE` exists (an event stream whose
  next event waits on something else).
- `/abrupt`: an answer that says nothing of closing, then the connection
  closed at once (an app whose keep-alive timeout just ran out).
"""

import os
import socket
import socketserver
import time


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ")[1].decode()
            if path == "/split":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n")
                time.sleep(0.2)
                conn.sendall(b"hello")
            elif path == "/stream":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                             b"transfer-encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
                gate = os.environ["STREAM_GATE"]
                deadline = time.time() + 120
                while not os.path.exists(gate) and time.time() < deadline:
                    time.sleep(0.01)
                conn.sendall(b"5\r\nrest\n\r\n0\r\n\r\n")
            elif path == "/abrupt":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
                return
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
