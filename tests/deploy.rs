//! The deploy kit in `deploy/`, each file checked by the tool its platform
//! trusts and run the way the platform runs it where that fits on one
//! machine. `scripts/test` installs the tools; a missing one fails the
//! test, naming it, unless `ZDR_TEST_SKIP_MISSING` is set. The test
//! command's own dependency check is tested here too.

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

/// The unit verifies as shipped, its binary installed where it says: in a
/// mount namespace where /usr/local/bin holds this build's zdr.
#[test]
fn the_systemd_unit_verifies() {
    if !as_root("installing the binary where the unit says (in a mount namespace)") {
        return;
    }
    if !have("systemd-analyze", &["--version"]) || !have("unshare", &["--version"]) {
        return;
    }
    let text = std::fs::read_to_string(deploy("zdr.service")).unwrap();
    assert!(text.contains("TimeoutStopSec=") && text.contains("KillMode=mixed"));
    assert!(
        text.contains("ExecStart=/usr/local/bin/zdr serve"),
        "{text}"
    );
    let script = "set -e\n\
                  mount -t tmpfs tmpfs /usr/local/bin\n\
                  cp \"$1\" /usr/local/bin/zdr\n\
                  exec systemd-analyze verify \"$2\"\n";
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(zdr_bin())
        .arg(deploy("zdr.service"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("zdr.service"), "{said}");
}

/// The unit's `ExecReload`, run as systemd runs it (its environment, its
/// binary), waits for the reload's outcome: it succeeds once the new
/// generation serves, and fails (so `systemctl reload` does) when the
/// reload cannot happen, while the server serves on.
#[test]
fn the_systemd_units_reload_waits_for_the_outcome() {
    let text = std::fs::read_to_string(deploy("zdr.service")).unwrap();
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .expect("the unit has an ExecReload");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/zdr", "{exec}");
    let dir = TempDir::new("unit");
    // The unit's control socket, in this test's directory instead of /run.
    assert!(text.contains("Environment=ZDR_CONTROL_SOCKET="), "{text}");
    let ctl = dir.path("zdr.ctl");
    let config = dir.path("zdr.toml");
    write_file(&config, "workers = 2\n");
    let server = Launch::serve(&["--config", config.to_str().unwrap()])
        .env("ZDR_CONTROL_SOCKET", ctl.to_str().unwrap())
        .start();
    server.wait_ready();
    server.wait_workers(2);
    let reload = || {
        Command::new(zdr_bin())
            .args(
                words[1..]
                    .iter()
                    .map(|w| w.replace("$MAINPID", &server.pid.to_string())),
            )
            .env("ZDR_CONTROL_SOCKET", &ctl)
            .output()
            .unwrap()
    };
    let out = reload();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert_eq!(server.status_at(&ctl).generation, Some(2), "{said}");
    // A broken configuration: the reload fails, and says so.
    write_file(&config, "workers = \"many\"\n");
    let out = reload();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("workers"), "{said}");
    // The generation that served serves on.
    assert_eq!(server.status_at(&ctl).generation, Some(2));
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn the_dockerfiles_pass_hadolint() {
    if !have("hadolint", &["--version"]) {
        return;
    }
    // The Rust app's image, and the Python app's that installs zdr with
    // pip.
    for name in ["Dockerfile", "Dockerfile.python"] {
        let out = Command::new("hadolint").arg(deploy(name)).output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let text = std::fs::read_to_string(deploy(name)).unwrap();
        assert!(
            text.contains("STOPSIGNAL SIGTERM") && text.contains("USER "),
            "{name}"
        );
    }
    // The Python image runs the zdr pip installed, with the command's
    // port left for zdr to fill in (no shell between them).
    let text = std::fs::read_to_string(deploy("Dockerfile.python")).unwrap();
    assert!(text.contains("pip install") && text.contains("ENTRYPOINT [\"zdr\", \"serve\"]"));
    assert!(text.contains("\"--port\", \"$PORT\""), "{text}");
}

/// Every Procfile line the docs give for `zdr serve -- CMD` leaves the
/// command's `$PORT` to zdr: quoted, so that the platform's shell does not
/// put its own port there (which zdr binds, and the command could not).
#[test]
fn procfile_lines_in_the_docs_leave_the_commands_port_to_zdr() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for doc in ["README.md", "packaging/python/README.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for line in text.lines().filter(|l| l.starts_with("web: zdr serve")) {
            let Some((_, command)) = line.split_once(" -- ") else {
                continue;
            };
            seen += 1;
            assert!(
                command.contains("'$PORT'") || command.contains(":$PORT'"),
                "{doc}: the shell would replace $PORT in: {line}"
            );
        }
    }
    assert!(seen >= 2, "no Procfile line with a command in the docs");
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

/// The test command's dependency check names a missing tool and what
/// installs it, and fails; with `ZDR_TEST_SKIP_MISSING` it says how many
/// are missing and lets the run go on. Here h2load is hidden from `PATH`
/// (every other program stays).
#[test]
fn the_test_commands_check_names_a_missing_tool() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/test");
    let check = |path: &std::ffi::OsStr, skip: bool| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("--check")
            .env("PATH", path)
            .env_remove("ZDR_TEST_SKIP_MISSING");
        if skip {
            cmd.env("ZDR_TEST_SKIP_MISSING", "1");
        }
        let out = cmd.output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), said)
    };
    let real = std::env::var_os("PATH").unwrap_or_default();
    // Whatever this machine already lacks is named either way.
    let (_, before) = check(&real, true);
    let lacking = before
        .lines()
        .filter(|l| l.starts_with("missing: "))
        .count()
        + usize::from(!before.contains("missing: h2load "));
    // A PATH with every program but h2load.
    let dir = TempDir::new("path");
    let bin = dir.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for entry in std::env::split_paths(&real)
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
    {
        let name = entry.file_name();
        if name != "h2load" && !bin.join(&name).exists() {
            let _ = std::os::unix::fs::symlink(entry.path(), bin.join(&name));
        }
    }
    let hidden = bin.as_os_str();
    let (code, said) = check(hidden, false);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("missing: h2load (install: apt-get install nghttp2-client)"),
        "{said}"
    );
    assert!(said.contains("ZDR_TEST_SKIP_MISSING=1"), "{said}");
    let (code, said) = check(hidden, true);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains(&format!(
            "{lacking} tool(s) missing: the tests that need them will be skipped"
        )),
        "{said}"
    );
}

/// What the Kubernetes manifest gives the container, read from it.
struct Pod {
    args: Vec<String>,
    uid: u32,
    read_only_root: bool,
    /// Paths where a writable emptyDir is mounted.
    writable: Vec<String>,
}

fn pod() -> Option<Pod> {
    if !have_python(&["yaml"]) {
        return None;
    }
    let script = r#"
import json, sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "Deployment":
        spec = doc["spec"]["template"]["spec"]
        c = spec["containers"][0]
        empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        print(json.dumps({
            "args": c.get("args", []),
            "uid": (c.get("securityContext", {}).get("runAsUser")
                    or spec.get("securityContext", {}).get("runAsUser")),
            "ro": c.get("securityContext", {}).get("readOnlyRootFilesystem", False),
            "writable": [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in empty],
        }))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(deploy("kubernetes.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    Some(Pod {
        args: strings("args"),
        uid: v["uid"].as_u64().expect("the manifest's runAsUser") as u32,
        read_only_root: v["ro"].as_bool().unwrap(),
        writable: strings("writable"),
    })
}

/// Runs zdr as the manifest's container would: in a mount namespace where
/// its temporary directory is read-only (the root filesystem is) unless
/// the manifest mounts a writable emptyDir at /tmp, as the manifest's uid,
/// with its arguments (bound to 127.0.0.1 on an ephemeral port here). The
/// container's /tmp is played by `tmp`, zdr's `TMPDIR` (mounting over the
/// host's /tmp would hide the binary under test when it lives there).
/// Returns the process; its output goes to `log`.
fn run_as_the_pod(
    pod: &Pod,
    emptydirs: &[String],
    tmp: &std::path::Path,
    log: &std::path::Path,
) -> std::process::Child {
    std::fs::create_dir_all(tmp).unwrap();
    let mut script = String::from("set -e\n");
    if pod.read_only_root {
        script.push_str("mount -t tmpfs -o ro tmpfs \"$TMPDIR\"\n");
    }
    for path in emptydirs {
        assert_eq!(path, "/tmp", "only /tmp is replayed");
        script.push_str("mount -t tmpfs -o mode=1777 tmpfs \"$TMPDIR\"\n");
    }
    script.push_str(&format!(
        "exec setpriv --reuid={uid} --regid={uid} --clear-groups \"$@\"\n",
        uid = pod.uid
    ));
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(zdr_bin())
    .args(&pod.args)
    .args(["--bind", "127.0.0.1:0"])
    .env("PORT", "0")
    .env("TMPDIR", tmp)
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(log).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("ZDR_") {
            cmd.env_remove(k);
        }
    }
    cmd.spawn().unwrap()
}

/// The manifest runs as shipped under its own constraints: a read-only
/// root filesystem, its uid, its arguments and its mounts. Without the
/// writable /tmp it mounts, zdr cannot make its control socket, and says
/// what to do.
#[test]
fn the_kubernetes_pod_runs_as_shipped_with_a_read_only_root() {
    if !as_root("replaying the pod (a mount namespace, another uid)") {
        return;
    }
    if !have("unshare", &["--version"]) || !have("setpriv", &["--version"]) {
        return;
    }
    let Some(pod) = pod() else {
        return;
    };
    assert!(pod.read_only_root, "the manifest's root is read-only");
    let dir = TempDir::new("pod");
    // As shipped: it serves, then stops cleanly on the kubelet's SIGTERM.
    let log = dir.path("pod.log");
    let mut child = run_as_the_pod(&pod, &pod.writable, &dir.path("tmp"), &log);
    let said = wait_for_file_text(&log, "Listening at: http://127.0.0.1:");
    let port: u16 = said
        .split("Listening at: http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .expect("the port");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(
        wait_until(Duration::from_secs(60), || try_get(addr, "/_zdr/ready")
            .is_ok_and(|r| r.status == 200)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(get(addr, "/").status, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120));
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Without its emptyDir: refused at once, saying what to do.
    let log = dir.path("no-tmp.log");
    let mut child = run_as_the_pod(&pod, &[], &dir.path("tmp-without"), &log);
    let status = wait_child(&mut child, Duration::from_secs(60));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("Read-only file system"), "{said}");
    assert!(said.contains("an emptyDir at /tmp"), "{said}");
}

/// Waits for a child to exit, killing it if it has not within `bound`.
fn wait_child(child: &mut std::process::Child, bound: Duration) -> std::process::ExitStatus {
    let mut status = None;
    let exited = wait_until(bound, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("still running after {bound:?}");
    }
    status.unwrap()
}
