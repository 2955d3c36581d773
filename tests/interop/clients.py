"""Drives a zdr server with HTTP clients nobody on the project wrote.

Usage: clients.py BASE_URL CLIENT COUNT [PLAN]
  CLIENT: requests | httpx-h1 | httpx-h2
  PLAN: mixed (the default) | gets-until-N-workers
Sends COUNT requests over one keep-alive client and prints one JSON line:
{"client": ..., "ok": N, "errors": N, "first_errors": [...], "versions": [...],
 "connections": N, "workers": N}
"connections" is how many connections the client opened (from its own
debug log), "workers" how many worker pids answered.
The mixed plan cycles through GET, HEAD, a 256 KiB POST the demo reads
(/upload) and a 256 KiB POST it answers before reading (405 from /refused);
gets-until-N-workers sends GETs until N distinct workers have answered (or
COUNT requests). A request is ok only if its status and body are exactly
what the demo answers.
"""

import json
import logging
import re
import sys

BIG = b"z" * (256 * 1024)


class Connections(logging.Handler):
    """Counts the connections the clients' own debug logs say they open."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.opened = 0

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Starting new HTTP connection") or message.startswith(
            "connect_tcp.started"
        ):
            self.opened += 1


CONNECTIONS = Connections()
for logger in ("urllib3.connectionpool", "httpcore.connection"):
    logging.getLogger(logger).addHandler(CONNECTIONS)
    logging.getLogger(logger).setLevel(logging.DEBUG)
    logging.getLogger(logger).propagate = False
PLAN = sys.argv[4] if len(sys.argv) > 4 else "mixed"
WORKERS = set()


def plan(count):
    until = re.fullmatch(r"gets-until-(\d+)-workers", PLAN)
    if until:
        for _ in range(count):
            if len(WORKERS) >= int(until.group(1)):
                return
            yield "get"
        return
    kinds = ["get", "head", "upload", "refused"]
    for i in range(count):
        yield kinds[i % len(kinds)]


def check(kind, status, body):
    if kind == "get":
        pid = re.match(rb"pid=(\d+) ", body)
        if pid:
            WORKERS.add(pid.group(1))
        return status == 200 and pid is not None
    if kind == "head":
        return status == 200 and body == b""
    if kind == "upload":
        return status == 200 and b" received=262144" in body
    if kind == "refused":
        return status == 405 and body == b"method not allowed\n"
    return False


def run_requests(base, count):
    import requests

    session = requests.Session()
    versions = set()
    for kind in plan(count):
        if kind == "get":
            r = session.get(base + "/", timeout=60)
        elif kind == "head":
            r = session.head(base + "/", timeout=60)
        elif kind == "upload":
            r = session.post(base + "/upload", data=BIG, timeout=60)
        else:
            r = session.post(base + "/refused", data=BIG, timeout=60)
        versions.add("HTTP/1.1" if r.raw.version == 11 else str(r.raw.version))
        yield kind, r.status_code, r.content, versions


def run_httpx(base, count, http2):
    import httpx

    versions = set()
    with httpx.Client(http1=not http2, http2=http2, timeout=60) as client:
        for kind in plan(count):
            if kind == "get":
                r = client.get(base + "/")
            elif kind == "head":
                r = client.head(base + "/")
            elif kind == "upload":
                r = client.post(base + "/upload", content=BIG)
            else:
                r = client.post(base + "/refused", content=BIG)
            versions.add(r.http_version)
            yield kind, r.status_code, r.content, versions


def main():
    base, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if name == "requests":
        runs = run_requests(base, count)
    elif name == "httpx-h1":
        runs = run_httpx(base, count, http2=False)
    elif name == "httpx-h2":
        runs = run_httpx(base, count, http2=True)
    else:
        raise SystemExit(f"unknown client {name}")
    ok, errors, first, versions = 0, 0, [], set()
    while True:
        try:
            kind, status, body, versions = next(runs)
        except StopIteration:
            break
        except Exception as e:  # a failed request: counted, and the run goes on
            errors += 1
            if len(first) < 5:
                first.append(f"{type(e).__name__}: {e}")
            runs = {"requests": lambda: run_requests(base, count - ok - errors),
                    "httpx-h1": lambda: run_httpx(base, count - ok - errors, False),
                    "httpx-h2": lambda: run_httpx(base, count - ok - errors, True)}[name]()
            continue
        if check(kind, status, body):
            ok += 1
        else:
            errors += 1
            if len(first) < 5:
                first.append(f"{kind}: {status} {body[:80]!r}")
    print(json.dumps({"client": name, "ok": ok, "errors": errors,
                      "first_errors": first, "versions": sorted(versions),
                      "connections": CONNECTIONS.opened, "workers": len(WORKERS)}))


if __name__ == "__main__":
    main()
