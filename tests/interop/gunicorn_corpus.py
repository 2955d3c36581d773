"""Sends Gunicorn's HTTP request corpus to a server and reports what each
request got.

Usage: gunicorn_corpus.py HOST PORT DIR
DIR holds Gunicorn's tests/requests (valid/ and invalid/), from its source
distribution. Each .http file is decoded as Gunicorn's own test harness
does (literal \\r\\n, \\n, \\t, \\0 and \\xNN escapes; raw newlines dropped), sent
on a fresh connection, and the answers are read until the server closes
(or 10 s pass). Prints one JSON line per file:
{"file": "valid/001.http", "statuses": [200], "app": [true], "closed": true}
where "app" says whether each answer came from the demo app (its bodies)
rather than from zdr itself.
"""

import json
import os
import re
import socket
import sys

APP_BODIES = (b"pid=", b"not found\n", b"method not allowed\n")


def decode(raw):
    data = raw.replace(b"\n", b"").replace(b"\\r\\n", b"\r\n")
    data = data.replace(b"\\0", b"\000").replace(b"\\n", b"\n").replace(b"\\t", b"\t")
    return re.sub(rb"\\x([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), data)


def responses(raw):
    """Splits a byte stream into (status, body) pairs (Content-Length or
    chunked bodies; the demo and zdr use Content-Length)."""
    out = []
    while raw.startswith(b"HTTP/"):
        head_end = raw.find(b"\r\n\r\n")
        if head_end < 0:
            break
        head = raw[:head_end].decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = raw[head_end + 4:head_end + 4 + length]
        out.append((status, body))
        raw = raw[head_end + 4 + length:]
    return out


def send(host, port, data):
    s = socket.create_connection((host, port), timeout=10)
    received = b""
    closed = False
    try:
        s.sendall(data)
        # Nothing more comes: the server answers what it has, then closes.
        s.shutdown(socket.SHUT_WR)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            received += chunk
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    finally:
        s.close()
    return responses(received), closed


def main():
    host, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for kind in ("valid", "invalid"):
        folder = os.path.join(root, kind)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".http"):
                continue
            with open(os.path.join(folder, name), "rb") as f:
                data = decode(f.read())
            answers, closed = send(host, port, data)
            print(json.dumps({
                "file": f"{kind}/{name}",
                "statuses": [s for s, _ in answers],
                "app": [b.startswith(APP_BODIES) for _, b in answers],
                "closed": closed,
            }), flush=True)


if __name__ == "__main__":
    main()
