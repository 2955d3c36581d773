#!/usr/bin/env python3
"""Memory per idle keep-alive connection: zdr against nginx, in one run.

For each system and protocol, the server starts (one worker), answers 200
warm-up requests, and then N clients each open a connection, make one
request, read the whole answer and keep the connection open, idle. The
figure is the growth of the PSS of all the server's processes (master and
workers, /proc/PID/smaps_rollup) over the N connections, divided by N:
what an idle connection costs in the server's memory. The kernel's socket
buffers are not in PSS (for either system).

Protocols: HTTP/1.1 over plain TCP, HTTP/1.1 over TLS, HTTP/2 with prior
knowledge (h2c), and
HTTP/2 over TLS (ALPN).

    python3 benches/conn_memory.py [--connections 10000] [--zdr PATH]
    python3 benches/conn_memory.py --first-request

The second form measures, instead, the worker's CPU time (perf stat
task-clock: user and kernel) per first request on a new connection (the
connect, the accept, the request) against a parked connection's first
request after an idle (resumed from the lot), in interleaved rounds.

Needs nginx and openssl on PATH and the python `h2` package; a system that
is missing is reported as skipped. The open-file limit must allow N
connections on each side (`ulimit -n`).
"""

import argparse
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pss_kib(root_pid):
    """PSS of a process and all its descendants, in KiB."""
    total = 0
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def read_answer(sock):
    """Reads one HTTP/1.1 answer with a Content-Length to its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("closed before the head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("closed before the body's end")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"answered {head.splitlines()[0]!r}")


def tls_context(alpn):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    return ctx


def h2_request(sock):
    """One HTTP/2 GET on a fresh connection, read to its end."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "localhost")],
        end_stream=True,
    )
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(65536)
        if not data:
            raise OSError("closed before the answer")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.StreamEnded):
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                return
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


def open_idle(port, proto):
    """A connection that made one request and is now idle."""
    sock = socket.create_connection(("127.0.0.1", port))
    if proto in ("tls", "h2-tls"):
        sock = tls_context("h2" if proto == "h2-tls" else "http/1.1").wrap_socket(
            sock, server_hostname="localhost"
        )
    if proto in ("h2c", "h2-tls"):
        h2_request(sock)
    else:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        read_answer(sock)
    return sock


def wait_serving(port, proto, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            open_idle(port, proto).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("not serving")


NGINX_CONF = """worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile {files};
events {{ worker_connections {files}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 600s;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} {listen};
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{ default_type text/plain; return 200 "hello\\n"; }}
    }}
}}
"""


def start(system, proto, port, tmp, zdr):
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    tls = proto in ("tls", "h2-tls")
    if system == "zdr":
        cmd = [zdr, "serve", "--workers", "1", "--bind", f"127.0.0.1:{port}"]
        cmd += ["--worker-connections", str(files), "--keep-alive", "600"]
        cmd += ["--log-level", "warning", "--control-socket", os.path.join(tmp, "control.sock")]
        if tls:
            cmd += ["--certfile", os.path.join(tmp, "cert.pem"), "--keyfile", os.path.join(tmp, "key.pem")]
    else:
        listen = {"plain": "", "tls": "ssl", "h2c": "http2", "h2-tls": "ssl http2"}[proto]
        conf = NGINX_CONF.format(dir=tmp, port=port, listen=listen, files=files)
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write(conf)
        cmd = ["nginx", "-p", tmp, "-c", os.path.join(tmp, "nginx.conf")]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)


def measure(system, proto, n, zdr):
    tmp = tempfile.mkdtemp(prefix="zdr-conn-memory-")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=localhost", "-days", "2",
         "-keyout", os.path.join(tmp, "key.pem"), "-out", os.path.join(tmp, "cert.pem")],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    port = free_port()
    proc = start(system, proto, port, tmp, zdr)
    held = []
    try:
        wait_serving(port, proto, proc)
        for _ in range(200):
            open_idle(port, proto).close()
        time.sleep(1.0)
        before = pss_kib(proc.pid)
        for _ in range(n):
            held.append(open_idle(port, proto))
        # Let the server settle (idle connections parked, buffers freed).
        time.sleep(2.0)
        after = pss_kib(proc.pid)
        return (after - before) * 1024 / len(held), len(held)
    finally:
        for s in held:
            s.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def cpu_during(pid, work):
    """The CPU time (user and kernel, ns) process `pid` spends while `work`
    runs, by `perf stat -e task-clock`."""
    out = os.path.join(tempfile.gettempdir(), f"zdr-perf-{os.getpid()}.txt")
    perf = subprocess.Popen(
        ["perf", "stat", "-x", ",", "-e", "task-clock", "-p", str(pid), "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    work()
    time.sleep(0.2)
    perf.send_signal(2)
    perf.wait()
    with open(out) as f:
        for line in f:
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("task-clock"):
                return float(fields[0]) * 1e6  # msec → ns
    raise RuntimeError("perf gave no task-clock")


def first_request(zdr, rounds, per_round):
    """CPU of the worker per first request: a new connection's (connect,
    accept, request, answer) against a parked connection's after a long
    idle (resumed from the lot, request, answer), interleaved rounds."""
    tmp = tempfile.mkdtemp(prefix="zdr-first-request-")
    port = free_port()
    proc = start("zdr", "plain", port, tmp, zdr)
    kept = []
    try:
        wait_serving(port, "plain", proc)
        worker = None
        for _ in range(100):
            try:
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    worker = int(kids[0])
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        # Past the parking threshold, so that idle connections are parked.
        kept = [open_idle(port, "plain") for _ in range(400)]
        new_ns, resumed_ns = [], []
        for _ in range(rounds):
            parked = [open_idle(port, "plain") for _ in range(per_round)]
            time.sleep(2.0)  # a long idle, as far as the worker knows

            def resume():
                for sock in parked:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    read_answer(sock)

            fresh = []

            def connect():
                for _ in range(per_round):
                    fresh.append(open_idle(port, "plain"))

            resumed_ns.append(cpu_during(worker, resume) / per_round)
            new_ns.append(cpu_during(worker, connect) / per_round)
            kept.extend(parked)
            kept.extend(fresh)
        med = lambda xs: sorted(xs)[len(xs) // 2]
        return med(new_ns), med(resumed_ns), new_ns, resumed_ns
    finally:
        for sock in kept:
            sock.close()
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--zdr", default=os.path.join(ROOT, "target", "release", "zdr"))
    parser.add_argument("--first-request", action="store_true",
                        help="instead: the worker's CPU per first request, new connection against resumed parked one")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.first_request:
        new, resumed, news, resumeds = first_request(args.zdr, 5, 1000)
        print("| first request on | worker CPU µs (median of 5 rounds of 1,000) | rounds |")
        print("|---|---|---|")
        print(f"| a new connection | {new / 1000:.1f} | {', '.join(f'{x / 1000:.1f}' for x in news)} |")
        print(f"| a parked connection, resumed | {resumed / 1000:.1f} | {', '.join(f'{x / 1000:.1f}' for x in resumeds)} |")
        return
    if hard < args.connections + 100:
        sys.exit(f"the open-file limit ({hard}) is below {args.connections} connections")
    print(f"| protocol | zdr bytes per idle connection | nginx bytes per idle connection | connections |")
    print("|---|---|---|---|")
    for proto, label in [("plain", "HTTP/1.1"), ("tls", "HTTP/1.1 over TLS"),
                         ("h2c", "HTTP/2 (prior knowledge)"), ("h2-tls", "HTTP/2 over TLS")]:
        cells = []
        count = 0
        for system in ("zdr", "nginx"):
            if system == "nginx" and shutil.which("nginx") is None:
                cells.append("skipped (no nginx)")
                continue
            try:
                per, count = measure(system, proto, args.connections, args.zdr)
                cells.append(f"{per:.0f}")
            except Exception as e:  # a system that cannot run is reported, not fatal
                cells.append(f"skipped ({e})")
            print(f"  {label} {system}: {cells[-1]}", file=sys.stderr, flush=True)
        print(f"| {label} | {cells[0]} | {cells[1]} | {count} |", flush=True)


if __name__ == "__main__":
    main()
