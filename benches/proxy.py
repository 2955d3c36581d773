#!/usr/bin/env python3
"""The proxy hop's cost: the same app behind zdr's proxy mode and behind
nginx `proxy_pass` with upstream keep-alive, and served directly, with the
same process counts, under the same wrk load, interleaved round by round.

    python3 benches/proxy.py [--rounds 5] [--seconds 10] [--connections 32]

Apps: a hello WSGI app under gunicorn gthread (2 processes x 4 threads)
and a hello ASGI app under uvicorn (2 processes). zdr runs 2 workers, each
with a 1-process copy of the app (`zdr serve -w 2 -- gunicorn ... --workers
1`); nginx runs 2 worker processes in front of the app's own 2 processes
(`keepalive 64` upstream, HTTP/1.1, `Connection: ""`); direct is the app
alone. Each round runs every system back to back (A B C A B C ...), a 2 s
warm-up before each measured run; the table gives medians over the rounds,
and zdr's ratio to nginx round by round (the machine's drift between rounds
cancels out). With every core busy, throughput is decided by the CPU time
each request costs everyone, so the table also gives, per request, the CPU
time of the front's own processes (not the app's) and of wrk: a front that
writes one answer as several packets costs the client more reads. Needs: zdr built (`cargo build --release`), wrk, nginx,
gunicorn, uvicorn.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZDR = os.path.join(ROOT, "target", "release", "zdr")

WSGI = """
def app(environ, start_response):
    body = b"hello\\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""

ASGI = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"6")]})
    await send({"type": "http.response.body", "body": b"hello\\n"})
"""

NGINX = """
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing answers on {port}")


def app_command(app, port, processes):
    """The app's command line; `port` may be the text `$PORT` (zdr's)."""
    if app == "gunicorn":
        return ["gunicorn", "wsgi_app:app", "--bind", f"127.0.0.1:{port}", "--workers",
                str(processes), "--worker-class", "gthread", "--threads", "4",
                "--log-level", "warning"]
    return ["uvicorn", "asgi_app:app", "--host", "127.0.0.1", "--port", str(port), "--workers",
            str(processes), "--lifespan", "off", "--no-access-log", "--log-level", "warning"]


def start_systems(app, work):
    systems, procs = {}, []

    def spawn(args, **kw):
        p = subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, **kw)
        procs.append(p)
        return p

    direct = free_port()
    spawn(app_command(app, direct, 2))
    systems["direct"] = direct
    backend = free_port()
    spawn(app_command(app, backend, 2))
    port = free_port()
    conf = os.path.join(work, f"nginx-{app}.conf")
    ndir = os.path.join(work, f"nginx-{app}")
    os.makedirs(ndir, exist_ok=True)
    with open(conf, "w") as f:
        f.write(NGINX.format(dir=ndir, backend=backend, port=port))
    spawn(["nginx", "-p", ndir, "-c", conf, "-g", "daemon off;"])
    systems["nginx"] = port
    nginx_root = procs[-1].pid
    port = free_port()
    cmd = app_command(app, "$PORT", 1)
    spawn([ZDR, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--log-level",
           "warning", "--control-socket", os.path.join(work, f"zdr-{app}.ctl"), "--"] + cmd)
    systems["zdr"] = port
    zdr_root = procs[-1].pid
    for p in systems.values():
        wait_ok(p)
    # The front's own processes: nginx's master and workers; zdr's master
    # and workers, not the app processes they run.
    fronts = {
        "direct": [],
        "nginx": [p for p, c in tree(nginx_root) if c == "nginx"],
        "zdr": [p for p, c in tree(zdr_root) if c == "zdr"],
    }
    return systems, procs, fronts


def tree(root):
    """`root` and its descendants, with their command names."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True,
                         text=True).stdout
    kids, comm = {}, {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3:
            kids.setdefault(int(f[1]), []).append(int(f[0]))
            comm[int(f[0])] = f[2]
    found, stack = [], [root]
    while stack:
        p = stack.pop()
        found.append(p)
        stack += kids.get(p, [])
    return [(p, comm.get(p, "")) for p in found]


def cpu_seconds(pids):
    """User + system CPU time so far of `pids` (all their threads)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def wrk(port, seconds, connections, front=()):
    """wrk's figures, and the CPU time per request (µs) spent by `front`'s
    processes and by wrk itself: on a machine whose cores are all busy,
    what each side costs per request decides the throughput."""
    before = cpu_seconds(front)
    p = subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, _, usage = os.wait4(p.pid, 0)
    p.returncode = 0
    front_cpu = cpu_seconds(front) - before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = float(re.search(r"(\d+) requests in", out).group(1))

    def ms(label):
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    per_request = 1e6 / max(total, 1)
    return (rps, ms("50%"), ms("99%"), int(errors.group(1)) if errors else 0,
            front_cpu * per_request, (usage.ru_utime + usage.ru_stime) * per_request)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--apps", default="gunicorn,uvicorn")
    a = ap.parse_args()
    for tool in ("wrk", "nginx", "gunicorn", "uvicorn"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    if not os.path.exists(ZDR):
        raise SystemExit("build zdr first: cargo build --release")
    work = tempfile.mkdtemp(prefix="zdr-proxy-bench-")
    with open(os.path.join(work, "wsgi_app.py"), "w") as f:
        f.write(WSGI)
    with open(os.path.join(work, "asgi_app.py"), "w") as f:
        f.write(ASGI)
    print(f"wrk -t2 -c{a.connections} -d{a.seconds}s, {a.rounds} rounds, interleaved\n")
    print("| app | system | req/s median (min-max) | p50 ms | p99 ms | non-2xx "
          "| front CPU µs/req | wrk CPU µs/req | zdr / nginx by round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for app in a.apps.split(","):
        systems, procs, fronts = start_systems(app, work)
        runs = {name: [] for name in systems}
        try:
            for _ in range(a.rounds):
                for name, port in systems.items():
                    wrk(port, 2, a.connections)
                    runs[name].append(wrk(port, a.seconds, a.connections, fronts[name]))
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        ratios = [z[0] / n[0] for z, n in zip(runs["zdr"], runs["nginx"])]
        for name, rs in runs.items():
            rps = [r[0] for r in rs]
            ratio = (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                     if name == "zdr" else "")
            print(f"| {app} | {name} | {statistics.median(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) "
                  f"| {statistics.median(r[1] for r in rs):.2f} | {statistics.median(r[2] for r in rs):.2f} "
                  f"| {sum(r[3] for r in rs)} | {statistics.median(r[4] for r in rs):.1f} "
                  f"| {statistics.median(r[5] for r in rs):.1f} | {ratio} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
