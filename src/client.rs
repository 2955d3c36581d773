//! The operator's commands against a running server: `zdr status`,
//! `zdr reload`, `zdr stop`, `zdr scale`. They speak to the master's
//! control socket and, where that makes sense, fall back to a signal to the
//! pid in the pidfile.

use std::time::Duration;

use crate::config::Settings;
use crate::control::{self, Request, Response, Status};

/// What the operator asked for.
pub(crate) enum Command {
    Status {
        json: bool,
    },
    Reload {
        wait: bool,
        timeout: Duration,
        canary: Option<usize>,
        /// Print the rollout's progress while waiting (on a terminal).
        progress: bool,
    },
    Stop {
        graceful: bool,
        /// Wait this long for the master to exit.
        wait: Option<Duration>,
    },
    Scale {
        workers: usize,
    },
}

/// Runs one command against the server that `settings` describe.
pub(crate) fn run(settings: &Settings, command: Command) -> u8 {
    let Some(path) = control::socket_path(settings) else {
        eprintln!("zdr: error: the server binds an ephemeral port (:0); name it with --pid or --control-socket");
        return 1;
    };
    let (request, timeout) = match &command {
        Command::Status { .. } => (Request::Status, Duration::from_secs(10)),
        Command::Reload {
            wait,
            timeout,
            canary,
            ..
        } => (
            Request::Reload {
                wait: *wait,
                canary: *canary,
            },
            *timeout,
        ),
        Command::Stop { graceful, wait } => (
            Request::Stop {
                graceful: *graceful,
                wait: wait.is_some(),
            },
            wait.unwrap_or(Duration::from_secs(10)),
        ),
        Command::Scale { workers } => (
            Request::Scale { workers: *workers },
            Duration::from_secs(10),
        ),
    };
    let started = std::time::Instant::now();
    let progress = matches!(command, Command::Reload { progress: true, .. })
        .then(|| Progress::start(path.clone()));
    let sent = control::send_to_master(&path, &request, timeout);
    drop(progress);
    let response = match sent {
        Ok((r, master)) => {
            // `stop --wait` returns once the master is gone, not merely
            // once it has said it will go: a script that checks the pid or
            // starts a new server next must not find the old one.
            if let (Command::Stop { wait: Some(_), .. }, true, Some(pid)) = (&command, r.ok, master)
            {
                let left = timeout.saturating_sub(started.elapsed());
                if !gone_within(pid, left) {
                    eprintln!(
                        "zdr: error: the master (pid {pid}) said it stopped but is still running after {timeout:?}"
                    );
                    return 1;
                }
            }
            r
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            eprintln!("zdr: error: no answer from the server within {timeout:?}");
            return 1;
        }
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => format!(
                    "cannot reach the server at {}: no master listens there (one that was killed left it behind?)",
                    path.display()
                ),
                std::io::ErrorKind::NotFound => format!(
                    "cannot reach the server at {}: no such socket (is the server running?)",
                    path.display()
                ),
                _ => format!("cannot reach the server at {}: {e}", path.display()),
            };
            return fallback(settings, &command, &why);
        }
    };
    report(&command, &response)
}

/// A reload's progress while `reload --wait` waits for its outcome: the
/// master's status, asked twice a second on a second connection, printed
/// to stderr whenever it changes (the workers of each generation booting,
/// ready and draining, and the rollout's own summary: canary window,
/// batches). Stops when dropped.
struct Progress {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(path: std::path::PathBuf) -> Progress {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut last = String::new();
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((
                    Response {
                        status: Some(s), ..
                    },
                    _,
                )) = control::send_to_master(&path, &Request::Status, Duration::from_secs(2))
                {
                    let line = progress_line(&s);
                    if line != last && !stopped.load(Ordering::Relaxed) {
                        eprintln!("{line}");
                        last = line;
                    }
                }
                for _ in 0..10 {
                    if stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line of a reload's progress: each generation's workers by state,
/// then the rollout's summary (`generation 2: 1 booting, 1 ready;
/// generation 1: 2 ready; canary of 1 worker watched for 3s of 30s`).
fn progress_line(s: &Status) -> String {
    let mut generations: Vec<u64> = s.workers.iter().map(|w| w.generation).collect();
    generations.sort_unstable_by(|a, b| b.cmp(a));
    generations.dedup();
    let mut parts: Vec<String> = generations
        .iter()
        .map(|g| {
            let mut states: Vec<(String, usize)> = Vec::new();
            for w in s.workers.iter().filter(|w| w.generation == *g) {
                match states.iter_mut().find(|(st, _)| *st == w.state) {
                    Some((_, n)) => *n += 1,
                    None => states.push((w.state.clone(), 1)),
                }
            }
            let states: Vec<String> = states.iter().map(|(st, n)| format!("{n} {st}")).collect();
            format!("generation {g}: {}", states.join(", "))
        })
        .collect();
    if let Some(rollout) = &s.rollout {
        parts.push(rollout.clone());
    }
    parts.join("; ")
}

/// Waits (up to `left`, and a second at least) until process `pid` has
/// exited: no longer in the process table, or a zombie its parent has yet
/// to reap.
fn gone_within(pid: u32, left: Duration) -> bool {
    let deadline = std::time::Instant::now() + left.max(Duration::from_secs(1));
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the command name, which is in parentheses
                // and may hold any character.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            });
        match state.as_deref() {
            None | Some("Z") | Some("X") => return true,
            Some(_) if std::time::Instant::now() >= deadline => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn report(command: &Command, response: &Response) -> u8 {
    match (command, &response.status) {
        (Command::Status { json: true }, Some(status)) => {
            match serde_json::to_string_pretty(status) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("zdr: error: {e}"),
            }
        }
        (Command::Status { json: false }, Some(status)) => print!("{}", render(status)),
        _ if response.ok => println!("{}", response.message),
        _ => eprintln!("zdr: error: {}", response.message),
    }
    if response.ok {
        0
    } else {
        1
    }
}

/// Without a control socket: signals via the pidfile, for the commands a
/// signal can carry.
fn fallback(settings: &Settings, command: &Command, why: &str) -> u8 {
    use nix::sys::signal::Signal;
    let signal = match command {
        Command::Reload {
            wait: false,
            canary: None,
            ..
        } => Signal::SIGHUP,
        Command::Stop {
            graceful: true,
            wait: None,
        } => Signal::SIGTERM,
        Command::Stop {
            graceful: false,
            wait: None,
        } => Signal::SIGQUIT,
        _ => {
            eprintln!("zdr: error: {why}");
            return 1;
        }
    };
    let pid = settings
        .pidfile
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.trim().parse::<i32>().ok());
    let Some(pid) = pid else {
        eprintln!("zdr: error: {why}, and no pidfile to signal");
        return 1;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
        Ok(()) => {
            println!(
                "sent {signal} to {pid} (from the pidfile; the control socket did not answer)"
            );
            0
        }
        Err(e) => {
            eprintln!("zdr: error: {why}; signalling pid {pid} failed: {e}");
            1
        }
    }
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The human-readable status.
pub(crate) fn render(s: &Status) -> String {
    let mut out = format!(
        "master {} ({}), up {}, generation {}{}, {} wanted\n",
        s.master_pid,
        s.state,
        duration(s.uptime_secs),
        s.generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into()),
        s.booting_generation
            .map(|g| format!(" (generation {g} booting)"))
            .unwrap_or_default(),
        crate::logging::count(s.target_workers as u64, "worker")
    );
    out.push_str(&format!("listening: {}\n", s.bind.join(", ")));
    if let Some(rollout) = &s.rollout {
        out.push_str(&format!("reloading: {rollout}\n"));
    }
    if let Some(r) = &s.last_reload {
        match &r.error {
            None => out.push_str(&format!(
                "last reload: generation {} completed in {} ms\n",
                r.generation, r.duration_ms
            )),
            Some(e) => out.push_str(&format!(
                "last reload: generation {} rolled back: {e}\n",
                r.generation
            )),
        }
    }
    out.push_str(&format!(
        "{:<8} {:>4}  {:<9} {:>8} {:>10} {:>6} {:>6} {:>10}\n",
        "PID", "GEN", "STATE", "AGE", "REQUESTS", "CONNS", "PARKED", "RSS"
    ));
    for w in &s.workers {
        out.push_str(&format!(
            "{:<8} {:>4}  {:<9} {:>8} {:>10} {:>6} {:>6} {:>8.1}Mi\n",
            w.pid,
            w.generation,
            w.state,
            duration(w.age_secs),
            w.requests,
            w.connections,
            w.parked,
            w.rss_bytes as f64 / 1048576.0
        ));
    }
    out
}
