//! `pip install zdr`: the wheel maturin builds from `packaging/python`,
//! installed in a fresh virtualenv with FastAPI and uvicorn, serves a
//! FastAPI app through the venv's own `zdr`, in front of uvicorn and in
//! process (`zdr serve --preload main:app`, with the venv's packages),
//! reloads new code under load without a failed request, and stops
//! leaving no process behind.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Runs `cmd` to success, or fails the test with what it said.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{said}");
    said
}

/// `zdr reload --wait` through the venv's `zdr` (with `path` as PATH),
/// which must succeed.
fn reload(zdr: &std::path::Path, path: &str, server: &Server) {
    let out = Command::new(zdr)
        .args(["reload", "--wait", "--timeout", "120", "--control-socket"])
        .arg(server.control_socket())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reload: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
}

/// A graceful stop that ends well and leaves no process naming `venv`.
fn stop_leaving_nothing(mut server: Server, venv: &str) {
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", server.log_text());
    let gone = wait_until(Duration::from_secs(30), || {
        processes_naming(venv).is_empty()
    });
    assert!(gone, "left behind: {:?}", processes_naming(venv));
}

/// The processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            found.push((pid, line));
        }
    }
    found
}

#[test]
fn the_wheel_serves_and_reloads_a_fastapi_app_from_a_fresh_virtualenv() {
    if !have("maturin", &["--version"]) || !have_python(&["venv", "ensurepip"]) {
        return;
    }
    let dir = TempDir::new("wheel");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    // The wheel, as a release would build it.
    let wheels = dir.path("wheels");
    run(
        "maturin build",
        Command::new("maturin")
            .args(["build", "--release", "--out"])
            .arg(&wheels)
            .current_dir(root.join("packaging/python")),
    );
    let wheel = std::fs::read_dir(&wheels)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel");
    let name = wheel.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        // One wheel for every CPython 3.9 and later (the stable ABI).
        name.starts_with(&format!("zdr-{}-cp39-abi3-", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );

    // A fresh virtualenv with the wheel, FastAPI and uvicorn in it.
    let venv = dir.path("venv");
    run(
        "python3 -m venv",
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
    );
    let bin = venv.join("bin");
    run(
        "pip install",
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(&wheel)
            .args(["fastapi", "uvicorn"]),
    );
    // What the venv runs is what the wheel installed: a file of its own,
    // not the build's binary.
    let zdr = bin.join("zdr");
    let meta = std::fs::symlink_metadata(&zdr).expect("zdr in the venv's bin");
    assert!(meta.file_type().is_file(), "{meta:?}");
    // The venv's PATH alone, before the system's: no `target/` on it.
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    assert!(!path.contains("/target/"), "{path}");
    let version = run(
        "zdr --version",
        Command::new("zdr").arg("--version").env("PATH", &path),
    );
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "zdr --version said {version}"
    );
    // The package's metadata, as PyPI would show it.
    let metadata = run(
        "the wheel's METADATA",
        Command::new(bin.join("python")).args([
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
             print(z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode())",
            wheel.to_str().unwrap(),
        ]),
    );
    for field in [
        "Name: zdr\n",
        "Summary: A pre-fork HTTP server",
        "License-Expression: MIT OR Apache-2.0",
        "Requires-Python: >=",
        "Classifier: Topic :: Internet :: WWW/HTTP :: HTTP Servers",
        "Description-Content-Type: text/markdown",
    ] {
        assert!(metadata.contains(field), "no {field:?} in\n{metadata}");
    }

    // The app, and the venv's zdr in front of it, as the README says.
    let app = dir.path("app");
    std::fs::create_dir_all(&app).unwrap();
    let source = std::fs::read_to_string(root.join("tests/python/fastapi_app.py")).unwrap();
    write_file(&app.join("main.py"), &source);
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--chdir",
        app.to_str().unwrap(),
        "--",
        "uvicorn",
        "main:app",
        "--port",
        "$PORT",
        "--no-access-log",
    ])
    .exe(&zdr)
    .env("PATH", &path)
    .start();
    server.wait_generation_ready(1, 2);
    // The master is the venv's interpreter running the venv's zdr.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(&zdr.display().to_string()),
        "the master runs the venv's zdr: {cmdline}"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/exe", server.pid)).unwrap(),
        std::fs::canonicalize(bin.join("python")).unwrap(),
        "the master runs the venv's interpreter"
    );
    let reply = server.get("/");
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("version=one"), "{}", reply.body);
    assert!(
        !server.worker_pids().contains(&reply.pid()),
        "uvicorn answers"
    );

    // New code, and a reload under load: nothing fails, the new code
    // answers.
    let rt = runtime();
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(50);
    write_file(&app.join("main.py"), &source.replace("\"one\"", "\"two\""));
    reload(&zdr, &path, &server);
    load.wait_for_generation(2, 50);
    let report = rt.block_on(load.stop());
    eprintln!("{} requests ok, {} failed", report.ok, report.failed);
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let reply = server.get("/");
    assert!(reply.body.contains("version=two"), "{}", reply.body);
    assert_eq!(reply.generation(), 2);

    // Stopped, nothing it started is left.
    let venv_text = venv.display().to_string();
    assert!(
        !processes_naming(&venv_text).is_empty(),
        "uvicorn runs from the venv"
    );
    stop_leaving_nothing(server, &venv_text);

    // The same app in-process, preloaded, with the venv's packages (no
    // VIRTUAL_ENV: the venv's own interpreter runs it).
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--preload",
        "--chdir",
        app.to_str().unwrap(),
        "main:app",
    ])
    .exe(&zdr)
    .env("PATH", &path)
    .start();
    let workers = server.wait_generation_ready(1, 2);
    let reply = server.get("/");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("version=two"), "{}", reply.body);
    assert!(
        reply.body.contains("generation=1"),
        "the generation, read at import: {}",
        reply.body
    );
    assert!(workers.contains(&reply.pid()), "a worker answers itself");
    let load = rt.block_on(async { load::start(server.addr(), "/", 4, 2) });
    load.wait_for_more(50);
    write_file(
        &app.join("main.py"),
        &source.replace("\"one\"", "\"three\""),
    );
    reload(&zdr, &path, &server);
    load.wait_for_generation(2, 50);
    let report = rt.block_on(load.stop());
    eprintln!(
        "in-process: {} requests ok, {} failed",
        report.ok, report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let reply = server.get("/");
    assert!(reply.body.contains("version=three"), "{}", reply.body);
    assert!(reply.body.contains("generation=2"), "{}", reply.body);
    stop_leaving_nothing(server, &venv_text);
}
