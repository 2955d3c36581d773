"""Drives a zdr server with HTTP clients nobody on the project wrote.

Usage: clients.py BASE_URL CLIENT COUNT
  CLIENT: requests | httpx-h1 | httpx-h2
Sends COUNT requests over one keep-alive client, cycling through GET, HEAD,
a 256 KiB POST the demo reads (/upload) and a 256 KiB POST it answers
before reading (405 from /refused), and prints one JSON line:
{"client": ..., "ok": N, "errors": N, "first_errors": [...], "versions": [...]}
A request is ok only if its status and body are exactly what the demo
answers.
"""

import json
import sys

BIG = b"z" * (256 * 1024)


def plan(count):
    kinds = ["get", "head", "upload", "refused"]
    return [kinds[i % len(kinds)] for i in range(count)]


def check(kind, status, body):
    if kind == "get":
        return status == 200 and body.startswith(b"pid=")
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
                      "first_errors": first, "versions": sorted(versions)}))


if __name__ == "__main__":
    main()
