#!/usr/bin/env python3
"""Python apps served four ways, under load, with a reload every 2 s: the
same ASGI hello app under Granian (Rust HTTP, the app in-process), uvicorn,
zdr's proxy mode in front of uvicorn (`zdr serve -- uvicorn ...`) and zdr
native (`zdr serve hello:app`, the app in-process), 2 workers each; and
the same WSGI hello app under Granian, Gunicorn (gthread), zdr's proxy mode
in front of Gunicorn and zdr native.

    python3 benches/python_apps.py [--rounds 3] [--seconds 20] [--venv DIR]
        [--interface asgi|wsgi|both]
    python3 benches/python_apps.py --pss

zdr native runs twice: each worker importing the app, and `--preload` (a
loader per generation imports it once and forks the workers).

Each run is `wrk -t1 -c16` for --seconds with a SIGHUP to the server's
master every 2 s (9 in 20 s); each round runs every system back to back; the
table gives medians over the rounds of the requests served and of the
failed ones (wrk's socket errors plus non-2xx answers) per run.

`--pss` measures memory instead: an ASGI app whose module holds about
200 MB (100 MB of bytes, a million small strings) under zdr native, with
one worker and with three, with and without `--preload`, after a short
load; it prints the proportional set size (PSS, each shared page split
among the processes that map it) of the workers together, of the loader,
and of the master, from /proc/PID/smaps_rollup.

Needs: wrk; zdr built with Python hosting against the same CPython as the
virtualenv (`PYO3_PYTHON=/usr/bin/python3 cargo build --release --features
python`); a virtualenv of that CPython with granian, uvicorn and uvloop
(`--venv`, made with them if it does not exist).
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZDR = os.path.join(ROOT, "target", "release", "zdr")

ASGI = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"6")]})
    await send({"type": "http.response.body", "body": b"hello\\n"})
"""


BIG = """
import os
# About 200 MB at import: 100 MB of bytes (written, so resident) and a
# million small strings in a dict.
BLOB = bytes(range(256)) * (100 * 1024 * 1024 // 256)
TABLE = {i: ("row %d " % i) * 8 for i in range(1_000_000)}

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b"%d rows %d\\n" % (len(TABLE), BLOB[12345])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


WSGI = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\\n"]
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not come up")


def command(system, interface, venv, port, workdir):
    bin_ = os.path.join(venv, "bin")
    app = f"{interface}_hello:app"
    uvicorn = [os.path.join(bin_, "uvicorn"), "--log-level", "warning", app]
    gunicorn = [os.path.join(bin_, "gunicorn"), "--worker-class", "gthread", "--threads", "4",
                "--log-level", "warning", app]
    if system == "granian":
        return [os.path.join(bin_, "granian"), "--interface", interface, "--workers", "2",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", app]
    if system == "uvicorn":
        return uvicorn + ["--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
    if system == "gunicorn":
        return gunicorn + ["--workers", "2", "--bind", f"127.0.0.1:{port}"]
    zdr = [ZDR, "serve", "--workers", "2", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
           "--control-socket", os.path.join(workdir, f"{system}.ctl")]
    if system == "zdr proxy" and interface == "asgi":
        return zdr + ["--", *uvicorn, "--port", "$PORT"]
    if system == "zdr proxy":
        return zdr + ["--", *gunicorn, "--workers", "1", "--bind", "127.0.0.1:$PORT"]
    if system == "zdr native --preload":
        return zdr + ["--preload", app]
    return zdr + [app]


def run(system, interface, venv, seconds, workdir):
    port = free_port()
    env = dict(os.environ, VIRTUAL_ENV=venv, PATH=f"{venv}/bin:{os.environ['PATH']}")
    proc = subprocess.Popen(command(system, interface, venv, port, workdir), cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_up(port, proc)
        url = f"http://127.0.0.1:{port}/"
        subprocess.run(["wrk", "-t1", "-c16", "-d2s", url], capture_output=True, check=True)
        stop = threading.Event()

        def hups():
            while not stop.wait(2.0):
                proc.send_signal(signal.SIGHUP)

        hupper = threading.Thread(target=hups)
        hupper.start()
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", url],
                             capture_output=True, text=True, check=True).stdout
        stop.set()
        hupper.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = errors + (int(non2xx.group(1)) if non2xx else 0)
    return requests, failed


def pss_kb(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1))


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(pid)],
                         capture_output=True, text=True).stdout
    return [(int(p), c) for p, c in (line.split(None, 1) for line in out.splitlines())]


def pss():
    print("| zdr native, a 200 MB module | workers' PSS | loader's PSS | master's PSS "
          "| workers + loader, / one worker without --preload |")
    print("|---|---|---|---|---|")
    one = None
    with tempfile.TemporaryDirectory() as workdir:
        with open(os.path.join(workdir, "big.py"), "w") as f:
            f.write(BIG)
        for workers, preload in ((1, False), (3, False), (1, True), (3, True)):
            port = free_port()
            cmd = [ZDR, "serve", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                   "--log-level", "warning", "--control-socket",
                   os.path.join(workdir, "pss.ctl")] + (["--preload"] if preload else []) + [
                   "big:app"]
            proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                wait_up(port, proc, timeout=120)
                subprocess.run(["wrk", "-t1", "-c8", "-d3s", f"http://127.0.0.1:{port}/"],
                               capture_output=True, check=True)
                time.sleep(1)
                kids = children(proc.pid)
                serving = sum(pss_kb(p) for p, c in kids if c.strip() != "zdr-loader")
                loader = sum(pss_kb(p) for p, c in kids if c.strip() == "zdr-loader")
                master = pss_kb(proc.pid)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
            if one is None:
                one = serving
            label = f"{workers} worker{'s' if workers > 1 else ''}" + (
                ", --preload" if preload else "")
            print(f"| {label} | {serving / 1024:,.0f} MB | {loader / 1024:,.0f} MB "
                  f"| {master / 1024:,.0f} MB | {(serving + loader) / one:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "zdr-bench-venv"))
    ap.add_argument("--interface", choices=["asgi", "wsgi", "both"], default="both")
    ap.add_argument("--pss", action="store_true", help="measure memory, not speed")
    args = ap.parse_args()
    if args.pss:
        return pss()
    if not os.path.exists(os.path.join(args.venv, "bin", "gunicorn")):
        subprocess.run(["/usr/bin/python3", "-m", "venv", args.venv], check=True)
        subprocess.run([os.path.join(args.venv, "bin", "pip"), "install", "-q",
                        "granian", "uvicorn", "uvloop", "gunicorn"], check=True)
    interfaces = ["asgi", "wsgi"] if args.interface == "both" else [args.interface]
    systems = {
        "asgi": ["granian", "uvicorn", "zdr proxy", "zdr native", "zdr native --preload"],
        "wsgi": ["granian", "gunicorn", "zdr proxy", "zdr native", "zdr native --preload"],
    }
    results = {(i, s): [] for i in interfaces for s in systems[i]}
    with tempfile.TemporaryDirectory() as workdir:
        for name, text in (("asgi_hello.py", ASGI), ("wsgi_hello.py", WSGI)):
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        for r in range(args.rounds):
            for interface in interfaces:
                for system in systems[interface]:
                    requests, failed = run(system, interface, args.venv, args.seconds, workdir)
                    results[(interface, system)].append((requests, failed))
                    print(f"round {r + 1}: {interface} {system}: {requests} requests, "
                          f"{failed} failed", file=sys.stderr, flush=True)
    hups = int((args.seconds - 0.01) // 2)
    for interface in interfaces:
        print(f"\n| {interface.upper()} server (2 workers, `wrk -t1 -c16 -d{args.seconds}s`, "
              f"a HUP every 2 s) | requests in {args.seconds} s (median of {args.rounds}) "
              f"| failed across {hups} HUPs (median) | / Granian |")
        print("|---|---|---|---|")
        granian = statistics.median(r for r, _ in results[(interface, "granian")])
        for system in systems[interface]:
            runs = results[(interface, system)]
            requests = statistics.median(r for r, _ in runs)
            failed = statistics.median(f for _, f in runs)
            print(f"| {system} | {requests:,.0f} | {failed:g} | {requests / granian:.2f} |")


if __name__ == "__main__":
    main()
