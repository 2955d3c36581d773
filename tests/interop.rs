//! The real binary against clients nobody on the project wrote: curl,
//! python-requests, httpx (HTTP/1.1 and HTTP/2), nghttp and h2load. Each
//! run asserts exact outcomes: every status and body as expected, zero
//! errors.
//!
//! `scripts/test` installs every tool; a missing one fails the test,
//! naming it and what installs it, unless `ZDR_TEST_SKIP_MISSING` is set
//! (then the test is skipped and listed).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn big_file(dir: &TempDir, bytes: usize) -> String {
    let path = dir.path(&format!("body-{bytes}"));
    std::fs::write(&path, vec![b'z'; bytes]).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn curl_over_http1_and_http2() {
    if !have("curl", &["--version"]) {
        return;
    }
    let dir = TempDir::new("curl");
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    let base = format!("http://{}", server.addr());
    let body = big_file(&dir, 256 * 1024);
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let get = run("curl", &["-sS", "--fail", proto, &format!("{base}/")]);
        assert!(text(&get).starts_with("pid="), "{proto}: {}", text(&get));
        // HEAD: the length of the GET, no content (curl exits 0 only then).
        let head = run("curl", &["-sS", "-I", "--fail", proto, &format!("{base}/")]);
        let head = text(&head).to_ascii_lowercase();
        assert!(head.contains("content-length: "), "{proto}: {head}");
        let post = run(
            "curl",
            &[
                "-sS",
                "--fail",
                proto,
                "--data-binary",
                &format!("@{body}"),
                &format!("{base}/upload"),
            ],
        );
        assert!(
            text(&post).contains(" received=262144"),
            "{proto}: {}",
            text(&post)
        );
        // A POST answered before its body is read, then a GET: both
        // answered. (curl itself closes a connection on which an error came
        // before its upload ended; python-requests and httpx reuse it,
        // below. curl 7.88 cannot reuse an h2c prior-knowledge connection
        // at all, with any server: a fresh curl per request there.)
        let (data, refused_url, get_url) = (
            format!("@{body}"),
            format!("{base}/refused"),
            format!("{base}/"),
        );
        let refused = [
            "-sS",
            proto,
            "--data-binary",
            &data,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &refused_url,
        ];
        let get = [
            proto,
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &get_url,
        ];
        let out = if proto == "--http1.1" {
            run("curl", &[&refused[..], &["--next"], &get[..]].concat())
        } else {
            let mut first = run("curl", &refused);
            first.stdout.extend(run("curl", &get).stdout);
            first
        };
        assert_eq!(text(&out), "405\n200\n", "{proto}");
    }
}

#[test]
fn curl_over_tls() {
    if !have("curl", &["--version"]) {
        return;
    }
    let dir = TempDir::new("curltls");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path("cert.pem"), dir.path("key.pem"));
    write_file(&cert_path, &cert.pem());
    write_file(&key_path, &key.serialize_pem());
    let server = Launch::serve(&[
        "--certfile",
        cert_path.to_str().unwrap(),
        "--keyfile",
        key_path.to_str().unwrap(),
    ])
    .start();
    server.wait_ready();
    let url = format!("https://localhost:{}/", server.port());
    let resolve = format!("localhost:{}:127.0.0.1", server.port());
    for proto in ["--http1.1", "--http2"] {
        let out = run(
            "curl",
            &[
                "-sS",
                "--fail",
                proto,
                "--cacert",
                cert_path.to_str().unwrap(),
                "--resolve",
                &resolve,
                "-w",
                "\n%{http_version}",
                &url,
            ],
        );
        let text = text(&out);
        assert!(text.contains("scheme=https"), "{proto}: {text}");
        let version = if proto == "--http2" { "2" } else { "1.1" };
        assert!(text.ends_with(&format!("\n{version}")), "{proto}: {text}");
        run(
            "curl",
            &[
                "-sS",
                "-I",
                "--fail",
                proto,
                "--cacert",
                cert_path.to_str().unwrap(),
                "--resolve",
                &resolve,
                &url,
            ],
        );
    }
}

/// What `tests/interop/clients.py` printed.
fn python_clients(base: &str, client: &str, count: usize) -> serde_json::Value {
    python_clients_with(base, client, count, "mixed")
}

/// What `tests/interop/clients.py` printed for a plan of requests.
fn python_clients_with(base: &str, client: &str, count: usize, plan: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/clients.py");
    let out = run(
        "python3",
        &[
            script.to_str().unwrap(),
            base,
            client,
            &count.to_string(),
            plan,
        ],
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// Recycling hands idle keep-alive connections over: python-requests and
/// httpx, each on one connection, are answered by worker after worker as
/// they reach their request limit, and open no second connection (by their
/// own debug logs).
#[test]
fn python_clients_keep_their_connection_across_recycling() {
    if !have_python(&["requests", "httpx", "h2"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "2", "--max-requests", "20"]).start();
    server.wait_ready();
    let base = format!("http://{}", server.addr());
    for client in ["requests", "httpx-h1"] {
        let report = python_clients_with(&base, client, 200_000, "gets-until-4-workers");
        eprintln!("{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["workers"], 4, "{report}");
        assert_eq!(report["connections"], 1, "{report}");
    }
    // The mixed plan (uploads, HEAD, a body answered before it is read)
    // across recycling: nothing fails, whatever becomes of the connection.
    let report = python_clients(&base, "requests", 2000);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["ok"], 2000, "{report}");
}

/// curl, asked for many URLs, keeps one connection while the workers
/// answering it are recycled.
#[test]
fn curl_keeps_its_connection_across_recycling() {
    if !have("curl", &["--version"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "2", "--max-requests", "10"]).start();
    server.wait_ready();
    let url = format!("http://{}/", server.addr());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // Batches of 50 requests, each batch one curl and one connection, until
    // one batch was answered by more than one worker.
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.log_text()
        );
        let mut args = vec![
            "-sS",
            "--max-time",
            "60",
            "-w",
            "\nconnects=%{num_connects} status=%{http_code}\n",
        ];
        args.extend(std::iter::repeat_n(url.as_str(), 50));
        let out = run("curl", &args);
        let out = text(&out);
        let connects: u32 = out
            .lines()
            .filter_map(|l| l.strip_prefix("connects="))
            .map(|l| l.split(' ').next().unwrap_or("").parse::<u32>().unwrap())
            .sum();
        let statuses: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_once(" status=").map(|(_, s)| s))
            .collect();
        assert_eq!(statuses, vec!["200"; 50], "{out}");
        assert_eq!(connects, 1, "{out}");
        let pids: BTreeSet<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("pid="))
            .filter_map(|l| l.split(' ').next())
            .collect();
        if pids.len() > 1 {
            break;
        }
    }
}

/// curl, on one connection (`--next` keeps it), sends requests with and
/// without a trusted proxy's forwarding headers: each answer names its own
/// request's client, never the one before.
#[test]
fn curl_requests_on_one_connection_each_have_their_own_client() {
    if !have("curl", &["--version"]) {
        return;
    }
    let server = Launch::serve(&[]).start();
    server.wait_ready();
    let url = format!("http://{}/", server.addr());
    let format = "connects=%{num_connects}\n";
    let forwarded = [
        "-H",
        "X-Forwarded-For: 203.0.113.7",
        "-H",
        "X-Forwarded-Proto: https",
    ];
    let mut args: Vec<&str> = Vec::new();
    for (i, with_headers) in [false, true, false, true].into_iter().enumerate() {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-sS", "--max-time", "60", "-w", format]);
        if with_headers {
            args.extend(forwarded);
        }
        args.push(&url);
    }
    let out = run("curl", &args);
    let out = text(&out);
    let connects: u32 = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects="))
        .map(|n| n.trim().parse::<u32>().unwrap())
        .sum();
    assert_eq!(connects, 1, "{out}");
    let clients: Vec<(&str, &str)> = out
        .lines()
        .filter(|l| l.starts_with("pid="))
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k))
                    .unwrap_or("")
            };
            (field("client="), field("scheme="))
        })
        .collect();
    let direct = ("127.0.0.1", "http");
    let proxied = ("203.0.113.7", "https");
    assert_eq!(clients, vec![direct, proxied, direct, proxied], "{out}");
}

#[test]
fn python_requests_and_httpx_over_keep_alive() {
    if !have_python(&["requests", "httpx", "h2"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    let base = format!("http://{}", server.addr());
    for (client, version) in [
        ("requests", "HTTP/1.1"),
        ("httpx-h1", "HTTP/1.1"),
        ("httpx-h2", "HTTP/2"),
    ] {
        let report = python_clients(&base, client, 2000);
        eprintln!("{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["ok"], 2000, "{report}");
        assert_eq!(report["versions"], serde_json::json!([version]), "{report}");
    }
}

/// Across reloads, python-requests and httpx over HTTP/1.1 and HTTP/2.
/// (httpx's HTTP/2 is the `h2` library, which takes any frame after a
/// GOAWAY but another GOAWAY as a protocol error, python-hyper/h2 issue
/// 1199: hyper's graceful close, GOAWAY then PING, failed its next request.
/// zdr closes an idle HTTP/2 connection with a single GOAWAY of its own.)
#[test]
fn python_clients_across_reloads() {
    if !have_python(&["requests", "httpx", "h2"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    let base = format!("http://{}", server.addr());
    let clients: Vec<_> = ["requests", "httpx-h1", "httpx-h2"]
        .into_iter()
        .map(|client| {
            let base = base.clone();
            std::thread::spawn(move || python_clients(&base, client, 3000))
        })
        .collect();
    // Reload until the clients are done, each reload complete before the
    // next.
    let mut reloads = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        server.signal(Signal::SIGHUP);
        reloads += 1;
        server.wait_for_log(
            &format!("Reload to generation {} complete", reloads + 1),
            Duration::from_secs(60),
        );
    }
    for c in clients {
        let report = c.join().unwrap();
        eprintln!("{report} across {reloads} reloads");
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["ok"], 3000, "{report}");
    }
    assert!(reloads >= 1);
}

/// An httpx client over HTTP/2 that idles past the keep-alive timeout
/// (until the server's close is readable): zdr closes the idle connection
/// with a single GOAWAY, and httpx's next request goes out on a new
/// connection, none failed.
#[test]
fn httpx_over_http2_outlives_the_keep_alive_timeout() {
    if !have_python(&["httpx", "h2"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "1", "--keep-alive", "1"]).start();
    server.wait_ready();
    let script = r#"
import sys, time, httpx
ok = failed = 0
ports = set()
with httpx.Client(http1=False, http2=True, timeout=30) as client:
    for i in range(4):
        try:
            r = client.get(sys.argv[1])
            assert r.status_code == 200 and r.http_version == "HTTP/2", r
            stream = r.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
            ok += 1
        except Exception as e:
            print("failed:", repr(e), file=sys.stderr)
            failed += 1
            continue
        # Idle until the server has closed the connection past its
        # keep-alive timeout (what it sent is readable), however long
        # a busy machine makes that take.
        deadline = time.time() + 60
        while not stream.get_extra_info("is_readable") and time.time() < deadline:
            time.sleep(0.05)
print(ok, failed, len(ports))
"#;
    let out = run(
        "python3",
        &["-c", script, &format!("http://{}/", server.addr())],
    );
    // Each pause outlived the keep-alive timeout: the server closed the
    // connection, and httpx opened another for the next request.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "4 0 4",
        "{}",
        text(&out)
    );
}

#[test]
fn nghttp_sees_no_content_for_head() {
    if !have("nghttp", &["--version"]) {
        return;
    }
    let server = Launch::serve(&[]).start();
    server.wait_ready();
    for path in ["/", "/_zdr/ready"] {
        let url = format!("http://{}{path}", server.addr());
        let out = run("nghttp", &["-v", "-H", ":method: HEAD", &url]);
        let trace = text(&out);
        assert!(trace.contains(":status: 200"), "{path}: {trace}");
        assert!(!trace.contains("recv DATA frame"), "{path}: {trace}");
        assert!(!trace.contains("PROTOCOL_ERROR"), "{path}: {trace}");
    }
}

#[test]
fn nghttp_streams_in_flight_finish_across_a_reload() {
    if !have("nghttp", &["--version"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    server.wait_generation_ready(1, 2);
    let url = format!("http://{}/slow?ms=1000", server.addr());
    // A hundred streams on one connection, all sent at once, each taking a
    // second: the reload comes while they are in flight.
    let client = std::thread::spawn(move || {
        Command::new("nghttp")
            .args(["-n", "-s", "-m", "100", &url])
            .output()
            .unwrap()
    });
    // Its connection is open on a worker (or, on a very slow machine, it
    // is already done: then the reload finds nothing in flight).
    let connected = wait_until(Duration::from_secs(60), || {
        client.is_finished() || server.status().workers.iter().any(|w| w.connections > 0)
    });
    assert!(connected, "nghttp never connected");
    server.signal(Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    let out = client.join().unwrap();
    let stats = text(&out);
    assert!(
        out.status.success(),
        "{stats}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answered = stats
        .lines()
        .filter(|l| l.contains(" 200 ") && l.ends_with("/slow?ms=1000"))
        .count();
    assert_eq!(answered, 100, "{stats}");
}

#[test]
fn h2load_across_reloads_gets_no_error_status() {
    if !have("h2load", &["--version"]) {
        return;
    }
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    let url = format!("http://{}/", server.addr());
    let load = std::thread::spawn(move || {
        Command::new("h2load")
            // One stream at a time per connection: with several, nghttp2
            // may send its PING answer ahead of requests it had queued, and
            // the final GOAWAY then refuses them (safe to retry, but h2load
            // counts them as failed).
            .args(["-n", "30000", "-c", "8", "-m", "1", &url])
            .output()
            .unwrap()
    });
    let mut reloads = 0;
    while !load.is_finished() {
        server.signal(Signal::SIGHUP);
        reloads += 1;
        server.wait_for_log(
            &format!("Reload to generation {} complete", reloads + 1),
            Duration::from_secs(60),
        );
    }
    let out = load.join().unwrap();
    let report = text(&out);
    eprintln!("{report}");
    assert!(out.status.success(), "{report}");
    // h2load does not reconnect after a GOAWAY: the requests it had yet to
    // send on a closed connection count as failed without being sent. And
    // nghttp2 may answer the closing PING ahead of a request it queued while
    // reading the same packet (the response before it in the packet made
    // h2load submit it), so the final GOAWAY refuses that request: a few
    // started requests are refused, unprocessed and safe to retry (RFC 9113
    // §6.8), which h2load counts as failed too: at most one per connection
    // with one stream at a time. What must hold: no request got an error
    // status or timed out, and no more than that one per connection
    // failed.
    let line = report
        .lines()
        .find(|l| l.starts_with("requests: "))
        .expect("h2load's summary");
    let figure = |name: &str| -> u64 {
        line.split(", ")
            .find_map(|part| part.trim_start_matches("requests: ").strip_suffix(name))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in {line:?}"))
    };
    let (started, succeeded) = (figure(" started"), figure(" succeeded"));
    assert!(started > 0 && started - succeeded <= 8, "{report}");
    assert_eq!(figure(" timeout"), 0, "{report}");
    assert!(
        report.contains(&format!(
            "status codes: {succeeded} 2xx, 0 3xx, 0 4xx, 0 5xx"
        )),
        "across {reloads} reloads:\n{report}"
    );
}

#[test]
fn bodies_over_the_limit_are_refused_however_they_are_sent() {
    if !have("curl", &["--version"]) {
        return;
    }
    let dir = TempDir::new("bodylimit");
    let server = Launch::serve(&["--limit-request-body", "64K"]).start();
    server.wait_ready();
    let base = format!("http://{}", server.addr());
    let under = big_file(&dir, 64 * 1024);
    let over = big_file(&dir, 64 * 1024 + 1);
    // (protocol, extra header): declared lengths, chunked HTTP/1.1, and
    // HTTP/2 without a length.
    let ways: [(&str, &[&str]); 3] = [
        ("--http1.1", &[]),
        ("--http1.1", &["-H", "Transfer-Encoding: chunked"]),
        ("--http2-prior-knowledge", &["-H", "Content-Length:"]),
    ];
    for (proto, extra) in ways {
        for (file, expected) in [(&under, "200"), (&over, "413")] {
            let mut args = vec![
                "-sS",
                proto,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--data-binary",
            ];
            let data = format!("@{file}");
            args.push(&data);
            args.extend_from_slice(extra);
            let url = format!("{base}/upload");
            args.push(&url);
            let out = run("curl", &args);
            assert_eq!(text(&out), expected, "{proto} {extra:?} {file}");
        }
    }
}

/// The Gunicorn release whose request corpus the test runs.
const GUNICORN: &str = "27.0.1";

/// Gunicorn's `tests/requests`, from its source distribution on PyPI
/// (fetched once into cargo's test scratch directory, never committed).
fn gunicorn_corpus() -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("gunicorn-{GUNICORN}"));
    let corpus = root.join(format!("gunicorn-{GUNICORN}/tests/requests"));
    if corpus.join("valid").is_dir() {
        return Some(corpus);
    }
    std::fs::create_dir_all(&root).unwrap();
    let script = format!(
        "import glob, subprocess, sys, tarfile\n\
         subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', \
         '--no-binary', ':all:', '--disable-pip-version-check', '-d', '{dir}', \
         'gunicorn=={GUNICORN}'], check=True)\n\
         tarfile.open(glob.glob('{dir}/gunicorn-*.tar.gz')[0]).extractall('{dir}', filter='data')\n",
        dir = root.display()
    );
    let ok = Command::new("python3")
        .args(["-c", &script])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail(
            &format!("cannot fetch gunicorn {GUNICORN}'s sources from PyPI"),
            "a network that reaches pypi.org",
        );
        return None;
    }
    Some(corpus)
}

/// Valid in Gunicorn's corpus, refused by zdr on purpose.
const VALID_BUT_REFUSED: &[(&str, &str)] = &[
    // A transfer coding zdr does not decode before chunked: RFC 9112 §6.1
    // asks for 501 (gunicorn decodes gzip itself; zdr would hand the app
    // the coded bytes as the body).
    (
        "valid/rfc9112_smuggle_gzip_chunked_01.http",
        "gzip, chunked: 501",
    ),
    (
        "valid/rfc9112_smuggle_te_identity_chunked_01.http",
        "identity, chunked: 501",
    ),
    // HTTP/1.1 without Host: RFC 9112 §3.2 requires a 400 (so does nginx).
    ("valid/004.http", "no Host"),
    ("valid/005.http", "no Host"),
    ("valid/006.http", "no Host"),
    ("valid/007.http", "no Host"),
    ("valid/010.http", "no Host"),
    ("valid/011.http", "no Host"),
    ("valid/012.http", "no Host"),
    ("valid/013.http", "no Host"),
    ("valid/014.http", "no Host"),
    ("valid/018.http", "no Host"),
    ("valid/021.http", "no Host"),
    ("valid/022.http", "no Host in the second request"),
    ("valid/023.http", "no Host"),
    ("valid/025.http", "no Host"),
    ("valid/025_line.http", "no Host"),
    ("valid/028.http", "no Host"),
    ("valid/029.http", "no Host"),
    ("valid/030.http", "no Host"),
    ("valid/031.http", "no Host"),
    ("valid/031compat.http", "no Host"),
    ("valid/031compat2.http", "no Host"),
    ("valid/100.http", "no Host"),
    (
        "valid/compat_obs_fold_huge.http",
        "no Host, and obsolete line folding",
    ),
    // Past the default limits; Gunicorn's own test raises them.
    ("valid/024.http", "request line over --limit-request-line"),
    (
        "valid/026.http",
        "header field over --limit-request-field_size",
    ),
    // Obsolete line folding: RFC 9112 §5.2 lets a server refuse it.
    ("valid/compat_obs_fold.http", "obsolete line folding"),
    // The PROXY protocol is not supported.
    ("valid/pp_01.http", "PROXY protocol"),
    ("valid/pp_02.http", "PROXY protocol"),
    ("valid/pp_04.http", "PROXY protocol"),
    ("valid/pp_05.http", "PROXY protocol"),
];

/// Invalid to Gunicorn, accepted by zdr on purpose (each within the RFCs).
const INVALID_BUT_ACCEPTED: &[(&str, &str)] = &[
    (
        "invalid/011.http",
        "Host `0.0.0.0=5000` is a valid reg-name (RFC 3986)",
    ),
    (
        "invalid/012.http",
        "Host `0.0.0.0=5000` is a valid reg-name (RFC 3986)",
    ),
    ("invalid/040.http", "underscores are valid in field names"),
    (
        "invalid/041.http",
        "a repeated Content-Type is left to the app",
    ),
    (
        "invalid/rfc9112_bare_lf_01.http",
        "a bare LF ends a line (RFC 9112 §2.2)",
    ),
    (
        "invalid/rfc9112_leading_crlf_02.http",
        "empty lines before a request are skipped (RFC 9112 §2.2)",
    ),
    // Found in the body, after the app has the head: the connection closes.
    (
        "invalid/rfc9110_trailer_forbidden_cl_01.http",
        "trailer, after the head",
    ),
    (
        "invalid/rfc9110_trailer_forbidden_host_01.http",
        "trailer, after the head",
    ),
    (
        "invalid/rfc9110_trailer_forbidden_te_01.http",
        "trailer, after the head",
    ),
    (
        "invalid/rfc9112_chunked_missing_final_crlf_01.http",
        "body framing, after the head",
    ),
    // Read as chunked, Content-Length ignored (RFC 9112 §6.3).
    (
        "invalid/rfc9112_smuggle_cl_te_chunked_01.http",
        "chunked wins over Content-Length",
    ),
];

#[test]
fn gunicorns_request_corpus() {
    if !have("python3", &["--version"]) {
        return;
    }
    let Some(corpus) = gunicorn_corpus() else {
        return;
    };
    let server = Launch::serve(&["--workers", "2"]).start();
    server.wait_ready();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/gunicorn_corpus.py");
    let out = run(
        "python3",
        &[
            script.to_str().unwrap(),
            "127.0.0.1",
            &server.port().to_string(),
            corpus.to_str().unwrap(),
        ],
    );
    let (mut valid, mut invalid) = ((0, 0), (0, 0));
    let mut wrong = Vec::new();
    for line in text(&out).lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let file = row["file"].as_str().unwrap();
        let statuses: Vec<u64> = row["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        let reached_app = row["app"].as_array().unwrap().iter().any(|a| a == true);
        if file.starts_with("valid/") {
            // Answered, and not refused by zdr (the demo answers 404 or
            // 405 to most of these paths and methods).
            let refused = statuses.is_empty()
                || statuses
                    .iter()
                    .any(|s| matches!(s, 400 | 408 | 411 | 413 | 414 | 431 | 501 | 505));
            let expected = VALID_BUT_REFUSED.iter().any(|(f, _)| *f == file);
            if refused != expected {
                wrong.push(format!(
                    "{file}: {statuses:?} (refused expected: {expected})"
                ));
            }
            if refused {
                valid.1 += 1
            } else {
                valid.0 += 1
            }
        } else {
            let expected = INVALID_BUT_ACCEPTED.iter().any(|(f, _)| *f == file);
            if reached_app != expected {
                wrong.push(format!(
                    "{file}: {statuses:?} (reached the app: {reached_app})"
                ));
            }
            if reached_app {
                invalid.0 += 1
            } else {
                invalid.1 += 1
            }
            assert!(row["closed"] == true, "{file}: the connection stayed open");
        }
    }
    eprintln!(
        "gunicorn {GUNICORN} corpus: valid {} answered / {} refused; invalid {} reached the app / {} refused",
        valid.0, valid.1, invalid.0, invalid.1
    );
    assert!(
        valid.0 + valid.1 > 50 && invalid.0 + invalid.1 > 50,
        "the corpus is missing"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `--max-connection-age` over HTTP/2, with Node's client (nghttp2): one
/// connection pinned to the only worker moves, at its age, to a worker
/// added later (GOAWAY, then the next request on a new connection); every
/// request answers 200. (curl 7.88 cannot reuse an h2c connection at all,
/// against zdr or bare hyper, so it is not the client here.)
#[test]
fn an_http2_client_moves_to_a_new_worker_at_the_connections_age() {
    use std::io::BufRead;
    if !have("node", &["--version"]) {
        return;
    }
    let server = Launch::serve(&[
        "--workers",
        "1",
        "--max-connection-age",
        "1",
        "--max-connection-age-grace",
        "1",
    ])
    .start();
    server.wait_ready();
    let first = server.wait_workers(1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/h2_pinned.js");
    let mut client = Command::new("node")
        .arg(&script)
        .arg(format!("http://{}", server.addr()))
        .arg("/slow?ms=20")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(client.stdout.take().unwrap()).lines();
    let (mut answered, mut newcomer, mut reached) = (0, None::<u32>, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for line in lines {
        let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        assert_eq!(line["status"], 200, "{line}");
        answered += 1;
        if newcomer.is_none() && answered >= 5 {
            assert!(server.control(&["scale", "2"]).status.success());
            let both = server.wait_workers(2);
            newcomer = both.difference(&first).next().copied();
        }
        if newcomer.is_some() && line["pid"].as_u64() == newcomer.map(u64::from) {
            reached = Some(line["sessions"].clone());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pinned connection never reached the new worker"
        );
    }
    let _ = client.kill();
    let _ = client.wait();
    let sessions = reached.expect("the client's output ended");
    assert!(sessions.as_u64() >= Some(2), "{sessions}");
}
