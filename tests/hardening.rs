//! Hostile clients and faults: request limits, slowloris, malformed input,
//! panics in handlers, and a bounded fuzz run over request heads.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Sends raw bytes and reads until the server closes (or 10 s pass).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> (Option<u16>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let closed = match s.read_to_end(&mut raw) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let status = String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok());
    (status, closed)
}

#[test]
fn each_limit_answers_its_status_and_the_server_goes_on() {
    let server = Launch::serve(&["--workers", "2", "--limit-request-body", "1M"]).start();
    server.wait_ready();
    let workers = server.wait_workers(2);
    let addr = server.addr();
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(5000));
    let many_fields: String = (0..101).map(|i| format!("X-F{i}: v\r\n")).collect();
    let long_field = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let cases: Vec<(String, Vec<u8>, u16)> = vec![
        (
            "request line over 4094 bytes".into(),
            long_target.into_bytes(),
            414,
        ),
        (
            "101 header fields".into(),
            format!("GET / HTTP/1.1\r\nHost: t\r\n{many_fields}\r\n").into_bytes(),
            431,
        ),
        (
            "a 9000-byte header field".into(),
            long_field.into_bytes(),
            431,
        ),
        (
            "a body over 1M".into(),
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\nabc".to_vec(),
            413,
        ),
        (
            "garbage".into(),
            b"NONSENSE\x01\x02 / HTTP/9\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a bad header line".into(),
            b"GET / HTTP/1.1\r\nHost t\r\n\r\n".to_vec(),
            400,
        ),
    ];
    let mut cases = cases;
    // Control characters in a field value (RFC 9110 §5.5): hyper's parser
    // refuses them, so zdr need not look for them itself.
    for control in [0x00u8, 0x01, 0x0b, 0x1b, 0x7f, b'\r'] {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: t\r\nX-Value: a".to_vec();
        bytes.extend([control, b'b']);
        bytes.extend(b"\r\n\r\n");
        cases.push((format!("byte {control:#04x} in a field value"), bytes, 400));
    }
    for (what, bytes, expected) in cases {
        let (status, closed) = exchange(addr, &bytes);
        assert_eq!(status, Some(expected), "{what}");
        assert!(closed, "{what}: the connection should close");
        assert_eq!(
            server.get("/").status,
            200,
            "the server goes on after {what}"
        );
    }
    assert_eq!(server.worker_pids(), workers, "no worker died");
}

#[test]
fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let server = Launch::serve(&["--workers", "1", "--header-timeout", "2"]).start();
    server.wait_ready();
    let addr = server.addr();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
    let started = Instant::now();
    let mut cut_off = None;
    for byte in head.iter() {
        // Others are served meanwhile.
        assert_eq!(server.get("/").status, 200);
        if slow.write_all(&[*byte]).is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(_) => {
                cut_off = Some(started.elapsed());
                break;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                cut_off = Some(started.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    let cut_off = cut_off.expect("the slow client was never disconnected");
    assert!(
        cut_off >= Duration::from_millis(1900),
        "cut off after {cut_off:?}, before the 2 s header timeout"
    );
    assert!(
        cut_off < Duration::from_secs(60),
        "cut off only after {cut_off:?}"
    );
}

#[test]
fn a_panicking_handler_costs_one_request() {
    let server = Launch::serve(&["--workers", "1"]).start();
    server.wait_ready();
    let pid = *server.wait_workers(1).iter().next().unwrap();
    let r = server.get("/panic");
    assert_eq!(
        (r.status, r.body.as_str()),
        (500, "Internal Server Error\n")
    );
    assert_eq!(
        server.get("/").pid(),
        pid,
        "the same worker goes on serving"
    );
    server.wait_for_log(
        "handler panicked: the demo app was asked to panic",
        Duration::from_secs(60),
    );
}

#[test]
fn a_service_error_is_a_500_and_the_worker_goes_on() {
    let server = Launch::serve(&["--workers", "1"]).start();
    server.wait_ready();
    let pid = *server.wait_workers(1).iter().next().unwrap();
    let r = server.get("/error");
    assert_eq!(
        (r.status, r.body.as_str()),
        (500, "Internal Server Error\n")
    );
    assert_eq!(server.get("/").pid(), pid);
    server.wait_for_log(
        "app error: the demo app was asked to fail",
        Duration::from_secs(60),
    );
}

#[test]
fn limits_of_zero_mean_none() {
    let server = Launch::serve(&[
        "--limit-request-line",
        "0",
        "--limit-request-field_size",
        "0",
    ])
    .start();
    server.wait_ready();
    // Far past the defaults (4094 and 8190 bytes): answered by the app.
    let long_target = format!("/{}", "a".repeat(20_000));
    assert_eq!(server.get(&long_target).status, 404);
    let r = get_with(server.addr(), &format!("X-Big: {}\r\n", "b".repeat(20_000)));
    assert_eq!(r.status, 200);
}

/// A small deterministic generator, so that a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Request heads made by mutating valid ones: bytes flipped, inserted,
/// deleted, lines repeated. Run longer with ZDR_FUZZ_ITERATIONS=100000.
#[test]
fn fuzzed_request_heads_never_crash_a_worker() {
    let iterations: usize = std::env::var("ZDR_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let server = Launch::serve(&["--workers", "2", "--header-timeout", "1"]).start();
    server.wait_ready();
    let workers = server.wait_workers(2);
    let addr = server.addr();
    let seeds: [&[u8]; 4] = [
        b"GET /slow?ms=0 HTTP/1.1\r\nHost: t\r\nUser-Agent: x\r\nConnection: close\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..iterations {
        let mut head = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..1 + rng.below(6) {
            let i = rng.below(head.len());
            match rng.below(4) {
                0 => head[i] = rng.next() as u8,
                1 => head.insert(i, rng.next() as u8),
                2 => {
                    head.remove(i);
                }
                _ => {
                    let chunk: Vec<u8> = head[i..head.len().min(i + 16)].to_vec();
                    head.splice(i..i, chunk);
                }
            }
            if head.is_empty() {
                head.push(b'G');
            }
        }
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&head);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        if let Some(status) = String::from_utf8_lossy(&sink)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
        {
            assert!(
                status < 500 || status == 505,
                "a fuzzed head got {status}: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
    }
    assert_eq!(
        server.worker_pids(),
        workers,
        "a worker died under fuzzing; log:\n{}",
        server.log_text()
    );
    assert_eq!(server.get("/").status, 200);
}

fn get_with(addr: SocketAddr, headers: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw).unwrap()
}

#[test]
fn forwarded_headers_from_trusted_peers_only() {
    let dir = TempDir::new("fwd");
    let log = dir.path("access.log");
    // The test connects from 127.0.0.1: trusted by default.
    let server = Launch::serve(&["--access-logfile", log.to_str().unwrap()]).start();
    server.wait_ready();
    let r = get_with(
        server.addr(),
        "X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\nX-Forwarded-Proto: https\r\n",
    );
    assert_eq!(
        (r.field("client").as_deref(), r.field("scheme").as_deref()),
        (Some("203.0.113.7"), Some("https"))
    );
    let r = get_with(
        server.addr(),
        "Forwarded: for=\"[2001:db8::7]:4711\";proto=https\r\n",
    );
    assert_eq!(r.field("client").as_deref(), Some("2001:db8::7"));
    assert!(wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() == 2)
    }));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .starts_with("203.0.113.7 - - ["),
        "{text}"
    );

    // From a peer not in the list, the headers are ignored.
    let server = Launch::serve(&["--forwarded-allow-ips", "10.1.2.3"]).start();
    server.wait_ready();
    let r = get_with(
        server.addr(),
        "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n",
    );
    assert_eq!(
        (r.field("client").as_deref(), r.field("scheme").as_deref()),
        (Some("127.0.0.1"), Some("http"))
    );
}

/// On one keep-alive connection from a trusted proxy, each request has its
/// own client: the forwarded one when it carries forwarding headers, the
/// peer when it does not (the connection's own client, which zdr prepares
/// once per connection), and never the previous request's.
#[test]
fn each_request_on_a_connection_has_its_own_client() {
    let server = Launch::serve(&[]).start();
    server.wait_ready();
    let mut conn = KeepAlive::open(server.addr());
    let ask = |conn: &mut KeepAlive, headers: &str| {
        assert!(conn.send(format!("GET / HTTP/1.1\r\nHost: t\r\n{headers}\r\n").as_bytes()));
        let r = conn.read().expect("an answer on the same connection");
        assert_eq!(r.status, 200, "{}", r.body);
        (r.field("client"), r.field("scheme"))
    };
    let forwarded = "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n";
    let direct = (Some("127.0.0.1".to_owned()), Some("http".to_owned()));
    let proxied = (Some("203.0.113.7".to_owned()), Some("https".to_owned()));
    assert_eq!(ask(&mut conn, ""), direct);
    assert_eq!(ask(&mut conn, forwarded), proxied);
    assert_eq!(ask(&mut conn, ""), direct);
    assert_eq!(ask(&mut conn, forwarded), proxied);
    assert_eq!(
        ask(&mut conn, "X-Forwarded-For: 198.51.100.9\r\n"),
        (Some("198.51.100.9".to_owned()), Some("http".to_owned()))
    );
}

/// The real uid and gid of a process, from /proc.
fn ids(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

#[test]
fn workers_run_as_the_given_user() {
    if !as_root("dropping privileges") {
        return;
    }
    for preload in [false, true] {
        let dir = TempDir::new("privs");
        let pidfile = dir.path("zdr.pid");
        let mut args = vec![
            "--workers",
            "2",
            "--user",
            "65534",
            "--group",
            "65534",
            "--pid",
            pidfile.to_str().unwrap(),
        ];
        if preload {
            args.push("--preload");
        }
        let server = Launch::serve(&args).start();
        server.wait_ready();
        let workers = server.wait_workers(2);
        for pid in &workers {
            assert_eq!(
                ids(*pid),
                (65534, 65534),
                "worker {pid} (preload={preload})"
            );
        }
        assert_eq!(ids(server.pid), (0, 0), "the master keeps its user");
        assert_eq!(server.get("/").status, 200);
        // The pidfile is the workers' user's; the control socket stays the
        // master's (only root and its user may command the server).
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&pidfile).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        let control = std::fs::metadata(format!("{}.ctl", pidfile.display())).unwrap();
        assert_eq!((control.uid(), control.gid()), (0, 0));
        // A worker that dies is replaced under the same user.
        let victim = *workers.iter().next().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert!(wait_until(Duration::from_secs(60), || {
            let now = server.worker_pids();
            now.len() == 2 && !now.contains(&victim)
        }));
        for pid in server.wait_workers(2) {
            assert_eq!(ids(pid).0, 65534);
        }
    }
}

/// CPU time a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ")".
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

#[test]
fn out_of_descriptors_backs_off_and_recovers() {
    let script = format!(
        "ulimit -n 48; exec {} serve --bind 127.0.0.1:0 --workers 1",
        zdr_bin().display()
    );
    let server = Launch::raw(&["-c", &script])
        .exe(std::path::Path::new("/bin/sh"))
        .start();
    server.wait_ready();
    let worker = *server.wait_workers(1).iter().next().unwrap();
    let addr = server.addr();
    // Idle connections until the worker runs out of descriptors.
    let idle: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    server.wait_for_log("accept failed", Duration::from_secs(60));
    // A worker that retried at once would burn a core; one that backs off
    // sleeps nearly all the time, however busy the machine is.
    let before = cpu_ticks(worker);
    let from = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(worker) - before;
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    let share = used as f64 / ticks_per_second / from.elapsed().as_secs_f64();
    assert!(
        share < 0.25,
        "the worker spun: {used} ticks of CPU in {:?}",
        from.elapsed()
    );
    assert_eq!(
        server.log_count("accept failed"),
        1,
        "the error is not repeated every 100 ms"
    );
    drop(idle);
    // Once connections close, it serves again.
    let ok = wait_until(Duration::from_secs(60), || {
        try_get(addr, "/").is_ok_and(|r| r.status == 200)
    });
    assert!(
        ok,
        "the worker did not recover; log:\n{}",
        server.log_text()
    );
    assert!(alive(worker), "the worker should have survived");
}

#[test]
fn a_refused_upload_is_read_to_its_end_so_the_client_sees_the_answer() {
    let server = Launch::serve(&["--limit-request-body", "64K"]).start();
    server.wait_ready();
    // The client sends its whole 4 MiB body before it reads: a server that
    // closed with the body unread would reset the connection, and the 413
    // would be lost on the way.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let size = 4 << 20;
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n"
    )
    .unwrap();
    s.write_all(&vec![b'z'; size])
        .expect("the whole body is taken");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("the answer, not a reset");
    let reply = parse_reply(&raw).expect("a whole response");
    assert_eq!(reply.status, 413);
    assert_eq!(reply.header("connection"), Some("close"));
}

#[test]
fn an_unread_body_does_not_cost_the_connection() {
    let server = Launch::serve(&[]).start();
    server.wait_ready();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = vec![b'z'; 256 * 1024];
    let mut statuses = Vec::new();
    for path in ["/refused", "/", "/refused", "/upload", "/"] {
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        // One response: its head, then its Content-Length of body.
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed after {statuses:?}");
            raw.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert!(!head.contains("connection: close"), "{head}");
        let len: usize = head
            .split("content-length: ")
            .nth(1)
            .and_then(|v| v.split("\r\n").next()?.parse().ok())
            .unwrap();
        let mut content = vec![0u8; len];
        s.read_exact(&mut content).unwrap();
        statuses.push(head.split_whitespace().nth(1).unwrap().to_owned());
    }
    assert_eq!(statuses, ["405", "200", "405", "200", "200"]);
}

#[test]
fn malformed_heads_get_400_and_never_reach_the_app() {
    let dir = TempDir::new("malformed");
    let log = dir.path("access.log");
    let server = Launch::serve(&["--access-logfile", log.to_str().unwrap()]).start();
    server.wait_ready();
    let addr = server.addr();
    let cases: [(&str, &[u8]); 6] = [
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        ("an invalid Host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        (
            "a Host with userinfo",
            b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        ),
        ("* with GET", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
        (
            "an authority target with GET",
            b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let (status, closed) = exchange(addr, bytes);
        assert_eq!(status, Some(400), "{what}");
        assert!(closed, "{what}: the connection should close");
    }
    // HTTP/1.0 without Host is fine; OPTIONS * reaches the app (a 405).
    assert_eq!(exchange(addr, b"GET / HTTP/1.0\r\n\r\n").0, Some(200));
    assert_eq!(
        exchange(addr, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").0,
        Some(405)
    );
    // A field of exactly the limit passes; one byte more does not (the
    // limit counts the line with its CRLF, as Gunicorn does).
    let field = |len: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\nConnection: close\r\n\r\n",
            "v".repeat(len - "X: \r\n".len())
        )
    };
    assert_eq!(exchange(addr, field(8190).as_bytes()).0, Some(200));
    assert_eq!(exchange(addr, field(8191).as_bytes()).0, Some(431));
}

#[test]
fn a_body_that_stops_coming_gets_408_after_the_body_timeout() {
    let server = Launch::serve(&["--body-timeout", "1", "--metrics-bind", "127.0.0.1:0"]).start();
    server.wait_ready();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let sent = Instant::now();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("an answer, then the close");
    let reply = parse_reply(&raw).expect("a whole response");
    assert_eq!(reply.status, 408);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "before the timeout"
    );
    assert_eq!(
        metric(&server.scrape(), "zdr_client_timeouts_total{kind=\"body\"}"),
        1.0
    );
}

#[test]
fn a_client_that_reads_nothing_is_cut_off_after_the_send_timeout() {
    let server = Launch::serve(&["--send-timeout", "1", "--metrics-bind", "127.0.0.1:0"]).start();
    server.wait_ready();
    let mut s = upgrade_to_echo(server.addr());
    // Echoed bytes pile up unread until the server's writes stall; then the
    // server gives up on the client and closes.
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let error = loop {
        if let Err(e) = s.write_all(&chunk) {
            break e;
        }
    };
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "the server never closed: {error}"
    );
    let counted = wait_until(Duration::from_secs(60), || {
        metric(&server.scrape(), "zdr_client_timeouts_total{kind=\"send\"}") == 1.0
    });
    assert!(counted, "{}", server.scrape());
}

/// `--request-timeout`: a request the app does not answer in time (a
/// minute, against 3 s) gets a 504 from zdr and the app's work on it is
/// dropped; the worker serves on (the same process answers next), a
/// request within the limit is answered as usual, and the metric and the
/// log say it.
#[test]
fn a_request_past_the_request_timeout_is_answered_504_and_the_worker_serves_on() {
    let server = Launch::serve(&[
        "--workers",
        "1",
        "--request-timeout",
        "3",
        "--metrics-bind",
        "127.0.0.1:0",
    ])
    .start();
    server.wait_ready();
    let first = server.get("/");
    assert_eq!(first.status, 200);
    let slow = server.get("/slow?ms=600000");
    assert_eq!(slow.status, 504, "{slow:?}");
    let within = server.get("/slow?ms=10");
    assert_eq!(within.status, 200, "{within:?}");
    assert_eq!(within.pid(), first.pid(), "the worker serves on");
    let counted = wait_until(Duration::from_secs(60), || {
        metric(&server.scrape(), "zdr_request_timeouts_total") == 1.0
    });
    assert!(counted, "{}", server.scrape());
    server.wait_for_log(
        "GET /slow was not answered within --request-timeout 3.0s; answered 504",
        Duration::from_secs(60),
    );
}

/// Sends `n` requests for `path` at once, each on a connection of its
/// own, and returns their answers.
fn burst(addr: SocketAddr, path: &'static str, n: usize) -> Vec<Reply> {
    let clients: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || get(addr, path)))
        .collect();
    clients
        .into_iter()
        .map(|c| c.join().expect("a client"))
        .collect()
}

/// `--max-queue-time` (overload shedding): six requests arrive at once at
/// a worker whose one thread each of them holds for a second. Those that
/// queued behind another are answered 503 with `Retry-After` at once
/// instead of waiting their turn, at least one is served, every shed
/// request is counted and said, health probes are answered, and the worker
/// serves on. Without the setting nothing is shed: the same burst is
/// served in full, one after another.
#[test]
fn requests_queued_past_the_max_queue_time_are_shed_with_retry_after() {
    for shedding in [true, false] {
        let mut args = vec![
            "--workers",
            "1",
            "--threads",
            "1",
            "--metrics-bind",
            "127.0.0.1:0",
        ];
        if shedding {
            args.extend(["--max-queue-time", "0.01"]);
        }
        let server = Launch::serve(&args).start();
        server.wait_ready();
        // The app's recent response time, from fast requests: a request
        // that waits a second behind another is well past two of them.
        let first = server.get("/");
        for _ in 0..16 {
            assert_eq!(server.get("/").status, 200);
        }
        let answers = burst(server.addr(), "/block?ms=1000", 6);
        let served = answers.iter().filter(|r| r.status == 200).count();
        let shed: Vec<&Reply> = answers.iter().filter(|r| r.status == 503).collect();
        assert_eq!(served + shed.len(), 6, "{answers:?}");
        if !shedding {
            assert_eq!(served, 6, "nothing is shed by default: {answers:?}");
            assert_eq!(server.log_count("overloaded"), 0, "{}", server.log_text());
            continue;
        }
        assert!(served >= 1, "{answers:?}");
        assert!(!shed.is_empty(), "{answers:?}");
        for r in &shed {
            assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
        }
        // Probes are never shed; the worker serves on.
        assert_eq!(server.get("/_zdr/live").status, 200);
        let after = server.get("/");
        assert_eq!(after.status, 200, "{after:?}");
        assert_eq!(after.pid(), first.pid(), "the worker serves on");
        let counted = wait_until(Duration::from_secs(60), || {
            metric(&server.scrape(), "zdr_requests_shed_total") == shed.len() as f64
        });
        assert!(counted, "{} shed: {}", shed.len(), server.scrape());
        server.wait_for_log("overloaded: a request waited", Duration::from_secs(60));
    }
}
