//! Serving any HTTP app: `zdr serve -- CMD`. Each worker runs the command
//! as its child, with a private loopback port in `$PORT`, and forwards
//! every request to it ([`proxy`]). The worker keeps everything zdr does at
//! the front (limits, timeouts, probes, access log, TLS, HTTP/2, the drain
//! without races, request counts), so a reload, a recycle or a stop is as
//! safe for the command's app as for a linked one, whatever its own server
//! does when it is told to stop.
//!
//! The pair is one unit: the worker is ready once the child accepts
//! connections on its port (or answers `--worker-ready-path` with a 2xx);
//! it drains its clients first and only then gives the child its stop
//! signal, with SIGKILL to the child's process group at the graceful
//! timeout; a child that exits on its own takes its worker out of service
//! (the worker drains and exits 1, and the master replaces it).
//!
//! The child writes to the worker's standard error, which the master logs
//! and keeps the last lines of: a child that fails to boot is reported with
//! its own words.

mod proxy;
pub(crate) mod socket;
mod translate;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::app::{BoxFuture, LoadedApp};
use crate::boot::WorkerSpec;

/// The command's process, as its worker holds it.
struct Child {
    pid: Pid,
    port: u16,
    /// The exit status once it has exited ("exited with status 1").
    exited: watch::Receiver<Option<String>>,
    /// The worker is stopping it: its exit is expected.
    stopping: AtomicBool,
    /// Its last lines of output, and whether its output has ended.
    output: Arc<Output>,
    /// Its cgroup, where zdr may make one.
    group: Option<Arc<crate::cgroup::Group>>,
}

/// What the command wrote last.
#[derive(Default)]
struct Output {
    tail: Mutex<std::collections::VecDeque<String>>,
    ended: watch::Sender<bool>,
}

/// Lines of the command's output kept for a boot error.
const TAIL_LINES: usize = 5;

impl Child {
    /// "; its last output: ..." once its output has ended (or after a
    /// moment), when it wrote something: a boot error's reason is usually
    /// there.
    async fn last_words(&self) -> String {
        let mut ended = self.output.ended.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), ended.wait_for(|e| *e)).await;
        let tail: Vec<String> = self
            .output
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its last output: {}", tail.join(" | "))
        }
    }

    /// Kills its whole process group.
    fn kill_group(&self) {
        let _ = killpg(self.pid, Signal::SIGKILL);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // However the worker ends, the command and all it started do not
        // outlive it.
        if self.exited.borrow().is_none() {
            self.kill_group();
        }
        crate::process_tree::end(Signal::SIGKILL, Duration::ZERO);
    }
}

/// The command as the worker's app: its "service" starts the command and
/// forwards to it once it listens; its readiness is the command being
/// alive; its stop stops the command.
pub(crate) fn load(spec: &WorkerSpec) -> LoadedApp {
    let settings = Arc::new(spec.settings.clone());
    let env = vec![
        ("ZDR_WORKER_ID".to_owned(), spec.slot.to_string()),
        ("ZDR_GENERATION".to_owned(), spec.generation.to_string()),
        ("ZDR_MASTER_PID".to_owned(), spec.master_pid.to_string()),
    ];
    let child: Arc<Mutex<Option<Arc<Child>>>> = Arc::new(Mutex::new(None));
    let (started, alive, stopped) = (Arc::clone(&child), Arc::clone(&child), child);
    let pool: Arc<Mutex<Option<Arc<proxy::Pool>>>> = Arc::new(Mutex::new(None));
    let (pooled, unpooled) = (Arc::clone(&pool), pool);
    let stop_signal = spec.settings.worker_stop_signal;
    let master = spec.master_pid;
    LoadedApp {
        silence: None,
        // The proxy forwards each request's client to the command.
        client_info: true,
        make_service: Box::new(move || {
            let (settings, env, started, pooled) = (
                Arc::clone(&settings),
                env.clone(),
                Arc::clone(&started),
                Arc::clone(&pooled),
            );
            Box::pin(async move {
                let child = Arc::new(start(&settings.command, &env, master)?);
                if let Ok(mut slot) = started.lock() {
                    *slot = Some(Arc::clone(&child));
                }
                wait_until_listening(&child, &settings.worker_ready_path).await?;
                watch_for_exit(Arc::clone(&child));
                let (service, pool) = proxy::service(
                    child.port,
                    settings.request_timeout().or_else(|| settings.timeout()),
                    settings.proxy_upgrades.clone(),
                );
                if let Ok(mut slot) = pooled.lock() {
                    *slot = Some(pool);
                }
                Ok(service)
            }) as BoxFuture<_>
        }),
        ready: Arc::new(move || {
            let child = alive.lock().ok().and_then(|c| c.clone());
            Box::pin(async move {
                match child.map(|c| c.exited.borrow().clone()) {
                    Some(None) => Ok(()),
                    Some(Some(status)) => Err(anyhow::anyhow!("the command {status}")),
                    None => Err(anyhow::anyhow!("the command has not started")),
                }
            }) as BoxFuture<_>
        }),
        stop: Some(Arc::new(move |grace: Duration| {
            let child = stopped.lock().ok().and_then(|c| c.clone());
            // The worker has drained: its idle connections to the command
            // close first, so that the command's own graceful stop has
            // nothing of zdr's to wait for.
            if let Some(pool) = unpooled.lock().ok().and_then(|mut p| p.take()) {
                pool.close();
            }
            Box::pin(async move {
                match child {
                    Some(child) => stop(&child, stop_signal, grace).await,
                    None => 0,
                }
            }) as BoxFuture<_>
        })),
    }
}

/// A free loopback port for the command (the kernel's pick; the command
/// binds it a moment later).
fn free_port() -> std::io::Result<u16> {
    let probe = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(probe.local_addr()?.port())
}

/// Starts the command in a process group of its own, with `$PORT` and the
/// worker's identity in its environment.
fn start(command: &[String], env: &[(String, String)], master: u32) -> anyhow::Result<Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no command to run"))?;
    let port = free_port()?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(crate::port_arg::expand(args, port))
        .env("PORT", port.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    // SAFETY: the closure runs in the forked child before exec and makes
    // one async-signal-safe call (prctl).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            // The command dies with its worker, however the worker ends.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    spawn(cmd, port, master)
}

/// Spawns `cmd` as the worker's command: in a process group of its own
/// (and a cgroup, where zdr may make one), with its output (both streams)
/// relayed to the worker's log and its exit watched.
fn spawn(mut cmd: std::process::Command, port: u16, master: u32) -> anyhow::Result<Child> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (output, output_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let stderr = output_tx.try_clone()?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(output_tx)
        .stderr(stderr);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // Whatever the command starts stays below this worker, to be ended
    // with it (see `crate::process_tree`).
    if let Err(e) = crate::process_tree::become_subreaper() {
        tracing::warn!(
            event = crate::logging::LogEvent::WorkerTrouble.name(),
            "worker {}: cannot become the subreaper of its command ({e}); what the command \
             leaves running when it exits may outlive the worker",
            std::process::id()
        );
    }
    let group = crate::cgroup::Group::create(master).map(Arc::new);
    if let Some(group) = group.clone() {
        // SAFETY: the closure runs in the forked child before exec and
        // makes only async-signal-safe calls (open, write, close).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                group.join_from_child();
                Ok(())
            });
        }
    }
    let process = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run the command {program:?}: {e}"))?;
    drop(cmd);
    let pid = Pid::from_raw(process.id() as i32);
    match port {
        0 => tracing::info!(
            event = crate::logging::LogEvent::CommandStarted.name(),
            "Started the command (pid: {pid}) with the listening sockets"
        ),
        port => tracing::info!(
            event = crate::logging::LogEvent::CommandStarted.name(),
            "Started the command (pid: {pid}) on port {port}"
        ),
    }
    let kept = Arc::new(Output::default());
    relay_output(output, pid, Arc::clone(&kept))?;
    let (tx, rx) = watch::channel(None);
    // Reaped by a thread of its own (waiting blocks, and the runtime's
    // threads must not), with the orphans it leaves to this worker.
    drop(process);
    crate::process_tree::reap(pid, move |status| {
        let _ = tx.send(Some(describe(status)));
    })?;
    Ok(Child {
        pid,
        port,
        exited: rx,
        stopping: AtomicBool::new(false),
        output: kept,
        group,
    })
}

/// Logs the command's output (both streams) line by line through the
/// worker's log, from a thread of its own, so that each line carries the
/// worker's pid and reaches the master, which keeps the last lines of a
/// worker that fails.
fn relay_output(output: std::os::fd::OwnedFd, pid: Pid, kept: Arc<Output>) -> std::io::Result<()> {
    use std::io::BufRead;
    std::thread::Builder::new()
        .name("zdr-command-output".into())
        .spawn(move || {
            for line in std::io::BufReader::new(std::fs::File::from(output)).lines() {
                let Ok(line) = line else { break };
                let command_pid = pid.as_raw();
                match stated_level(&line) {
                    tracing::Level::ERROR => {
                        tracing::error!(
                            event = crate::logging::LogEvent::CommandOutput.name(),
                            command_pid,
                            "[command {pid}] {line}"
                        )
                    }
                    tracing::Level::WARN => tracing::warn!(
                        event = crate::logging::LogEvent::CommandOutput.name(),
                        command_pid,
                        "[command {pid}] {line}"
                    ),
                    tracing::Level::DEBUG => {
                        tracing::debug!(command_pid, "[command {pid}] {line}")
                    }
                    _ => tracing::info!(
                        event = crate::logging::LogEvent::CommandOutput.name(),
                        command_pid,
                        "[command {pid}] {line}"
                    ),
                }
                if let Ok(mut tail) = kept.tail.lock() {
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
            kept.ended.send_replace(true);
        })?;
    Ok(())
}

/// The level a line of the command's output states, as the common
/// formats put it near its start (uvicorn's `ERROR:    …`, Gunicorn's
/// `[…] [ERROR] …`, Python logging's `ERROR:root:…`, `level=warn`): its
/// line is logged at that level. Info for a line that states none.
fn stated_level(line: &str) -> tracing::Level {
    let mut end = line.len().min(80);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let head = &line[..end];
    let mut words = head
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty());
    let level = |word: &str| match word {
        "ERROR" | "CRITICAL" | "FATAL" | "PANIC" | "error" | "critical" | "fatal" => {
            Some(tracing::Level::ERROR)
        }
        "WARNING" | "WARN" | "warning" | "warn" => Some(tracing::Level::WARN),
        "INFO" | "NOTICE" | "info" => Some(tracing::Level::INFO),
        "DEBUG" | "TRACE" | "debug" | "trace" => Some(tracing::Level::DEBUG),
        _ => None,
    };
    while let Some(word) = words.next() {
        // Level words in capitals anywhere near the start; in lower case
        // only as a `level=` value (an access log's path may say "error").
        if word == "level" {
            if let Some(l) = words.next().and_then(level) {
                return l;
            }
        } else if word.bytes().all(|b| b.is_ascii_uppercase()) {
            if let Some(l) = level(word) {
                return l;
            }
        }
    }
    tracing::Level::INFO
}

/// "exited with status N" or "was killed by SIGX".
fn describe(status: nix::sys::wait::WaitStatus) -> String {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        _ => "ended".to_owned(),
    }
}

/// Waits until the command accepts connections on its port (and, with a
/// ready path, answers it with a 2xx), or fails if it exits first. The
/// master's boot timeout bounds the wait.
async fn wait_until_listening(child: &Child, ready_path: &str) -> anyhow::Result<()> {
    let mut exited = child.exited.clone();
    let mut attempts = 0u32;
    loop {
        let status = exited.borrow().clone();
        if let Some(status) = status {
            let said = child.last_words().await;
            // Status 0 before serving: it most likely went to the
            // background, which a supervised command must not.
            let hint = if status.ends_with("status 0") {
                "; a command must serve in the foreground (no `&`, no daemon mode): zdr is its \
                 supervisor, and ends whatever it left running"
            } else {
                ""
            };
            anyhow::bail!(
                "the command {status} before it answered on port {}{said}{hint}",
                child.port
            );
        }
        let answered = if ready_path.is_empty() {
            tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, child.port))
                .await
                .is_ok()
        } else {
            proxy::probe(child.port, ready_path).await
        };
        if answered {
            return Ok(());
        }
        attempts += 1;
        if attempts % 50 == 0 {
            tracing::info!(
                event = crate::logging::LogEvent::CommandStarted.name(),
                "worker {}: waiting for the command to answer on port {}",
                std::process::id(),
                child.port
            );
        }
        let pause = tokio::time::sleep(Duration::from_millis(100));
        tokio::select! {
            _ = pause => {}
            _ = exited.changed() => {}
        }
    }
}

/// Takes the worker out of service if its command exits on its own: the
/// worker drains (SIGTERM to itself) and exits 1, and the master starts a
/// new pair.
fn watch_for_exit(child: Arc<Child>) {
    tokio::spawn(async move {
        let mut exited = child.exited.clone();
        let status = loop {
            if let Some(status) = exited.borrow().clone() {
                break status;
            }
            if exited.changed().await.is_err() {
                return;
            }
        };
        if !child.stopping.load(Ordering::Acquire) {
            tracing::error!(
                event = crate::logging::LogEvent::CommandExited.name(),
                "worker {}: the command (pid: {}) {status}; the worker leaves service",
                std::process::id(),
                child.pid
            );
            DIED.store(true, Ordering::Release);
            let _ = kill(Pid::this(), Signal::SIGTERM);
        }
    });
}

/// The command exited without being asked to.
static DIED: AtomicBool = AtomicBool::new(false);

/// Stops the command once its worker has drained: its stop signal, then
/// SIGKILL to its process group after `grace`. Returns the worker's exit
/// code: 1 if the command had exited on its own.
async fn stop(child: &Child, signal: i32, grace: Duration) -> i32 {
    let began = tokio::time::Instant::now();
    child.stopping.store(true, Ordering::Release);
    let mut exited = child.exited.clone();
    if exited.borrow().is_none() {
        match Signal::try_from(signal) {
            Ok(sig) if !grace.is_zero() => {
                let _ = kill(child.pid, sig);
            }
            _ => child.kill_group(),
        }
        let gone = tokio::time::timeout(grace, exited.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        if !gone {
            tracing::warn!(event = crate::logging::LogEvent::CommandExited.name(),
                "worker {}: the command (pid: {}) still runs at the graceful timeout; killing its process group",
                std::process::id(),
                child.pid
            );
            child.kill_group();
            let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|s| s.is_some()))
                .await;
        }
    }
    // Whatever it left behind goes too: its group, then every descendant
    // (in the background, double-forked, in a session of its own), which
    // gets the stop signal and, after what is left of the grace (at most
    // two seconds), SIGKILL.
    child.kill_group();
    end_tree(child, signal, grace.saturating_sub(began.elapsed())).await;
    i32::from(DIED.load(Ordering::Acquire))
}

/// Ends every descendant the command left (in the background,
/// double-forked, in a session of its own): `signal`, then SIGKILL after
/// `grace` (at most two seconds); then whatever is left in its cgroup.
async fn end_tree(child: &Child, signal: i32, grace: Duration) {
    let signal = Signal::try_from(signal).unwrap_or(Signal::SIGTERM);
    let grace = grace.min(Duration::from_secs(2));
    let group = child.group.clone();
    let _ = tokio::task::spawn_blocking(move || {
        crate::process_tree::end(signal, grace);
        if let Some(group) = group {
            group.end();
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::stated_level;
    use tracing::Level;

    #[test]
    fn a_line_keeps_the_level_it_states() {
        for (line, level) in [
            ("ERROR:    Exception in ASGI application", Level::ERROR),
            ("WARNING:  Invalid HTTP request received.", Level::WARN),
            (
                "INFO:     127.0.0.1:5000 - \"GET /error HTTP/1.1\" 500",
                Level::INFO,
            ),
            (
                "[2026-12-05 07:00:00 +0000] [12] [ERROR] Worker timeout",
                Level::ERROR,
            ),
            (
                "[2026-12-05 07:00:00 +0000] [12] [CRITICAL] WORKER TIMEOUT",
                Level::ERROR,
            ),
            ("ERROR:root:cannot reach the database", Level::ERROR),
            ("time=2026-12-05 level=warn msg=slow", Level::WARN),
            ("127.0.0.1 - - \"GET /error HTTP/1.1\" 500 12", Level::INFO),
            ("listening on port 5000", Level::INFO),
            ("", Level::INFO),
        ] {
            assert_eq!(stated_level(line), level, "{line:?}");
        }
    }
}
