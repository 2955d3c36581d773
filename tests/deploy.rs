//! The deploy kit in `deploy/`, each file checked by the tool its platform
//! trusts and run the way the platform runs it where that fits on one
//! machine. `.ci/run` installs the tools; in CI (`CI` set) a missing one
//! fails the test, elsewhere it is skipped with a reason.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    // The unit as installed: ExecStart names the real binary.
    let dir = TempDir::new("systemd");
    let unit = dir.path("zdr.service");
    let text = std::fs::read_to_string(deploy("zdr.service")).unwrap();
    assert!(text.contains("TimeoutStopSec=") && text.contains("KillMode=mixed"));
    write_file(
        &unit,
        &text.replace("/usr/local/bin/zdr", zdr_bin().to_str().unwrap()),
    );
    let out = Command::new("systemd-analyze")
        .args(["verify", unit.to_str().unwrap()])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("zdr.service"), "{said}");
}

#[test]
fn the_dockerfile_passes_hadolint() {
    if !have("hadolint", &["--version"]) {
        return;
    }
    let out = Command::new("hadolint")
        .arg(deploy("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    assert!(text.contains("STOPSIGNAL SIGTERM") && text.contains("USER "));
}

#[test]
fn the_kubernetes_manifests_validate_and_give_zdr_time_to_drain() {
    if !have("kubernetes-validate", &["--version"]) {
        return;
    }
    let out = Command::new("kubernetes-validate")
        .arg(deploy("kubernetes.yaml"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches("passed").count(), 3, "{said}");
    let text = std::fs::read_to_string(deploy("kubernetes.yaml")).unwrap();
    let number = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                let l = l.trim().trim_start_matches("- ");
                l.strip_prefix(key)?
                    .trim_start_matches([':', '='])
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {key}"))
    };
    assert!(
        number("terminationGracePeriodSeconds")
            > number("--shutdown-delay") + number("--graceful-timeout"),
        "the grace period must outlast the delay and the drain"
    );
}

/// The Procfile as a Procfile platform runs it (honcho, a Foreman clone):
/// the server comes up on the platform's `$PORT`, a HUP under load fails
/// no request, and the platform's stop (TERM) drains it gracefully.
#[test]
fn the_procfile_runs_under_honcho() {
    if !have("honcho", &["--version"]) {
        return;
    }
    let dir = TempDir::new("honcho");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let control = dir.path("zdr.ctl");
    let path = format!(
        "{}:{}",
        zdr_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut honcho = Command::new("honcho")
        .args(["start", "-f"])
        .arg(deploy("Procfile"))
        .args(["-d"])
        .arg(&dir.0)
        .args(["-p", &port.to_string()])
        .env("PATH", path)
        .env("WEB_CONCURRENCY", "2")
        .env("ZDR_CONTROL_SOCKET", &control)
        .env("TMPDIR", &dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let status = || {
        zdr::control::send(
            &control,
            &zdr::control::Request::Status,
            Duration::from_secs(5),
        )
        .ok()
        .and_then(|r| r.status)
    };
    assert!(
        wait_until(Duration::from_secs(60), || status().is_some_and(|s| s
            .workers
            .iter()
            .filter(|w| w.state == "ready")
            .count()
            == 2)),
        "the Procfile's server never came up on honcho's port"
    );
    let master = status().unwrap().master_pid;
    let rt = runtime();
    let load = rt.block_on(async { load::start(addr, "/", 4, 2) });
    load.wait_for_more(50);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(master as i32), Signal::SIGHUP).unwrap();
    assert!(wait_until(Duration::from_secs(60), || status()
        .is_some_and(
            |s| s.generation == Some(2) && s.workers.iter().all(|w| w.generation == 2)
        )));
    load.wait_for_generation(2, 50);
    let report = rt.block_on(load.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    // The platform stops the formation: TERM, then a graceful drain.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(honcho.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || honcho
            .try_wait()
            .ok()
            .flatten()
            .is_some()),
        "honcho did not stop"
    );
    let gone = || {
        std::fs::read_to_string(format!("/proc/{master}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    assert!(
        wait_until(Duration::from_secs(30), gone),
        "the master outlived the formation"
    );
}
