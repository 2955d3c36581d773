//! The command line: `serve` and `check`, with Gunicorn's flag names.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::app::Loader;
use crate::config::{Options, Sources};

#[derive(Debug, Parser)]
#[command(
    version,
    // `zdr serve --version` works as `zdr --version` does.
    propagate_version = true,
    // A flag given twice (in ZDR_CMD_ARGS, then on the command line) takes
    // its last value.
    args_override_self = true,

    about = "A pre-fork HTTP server for Rust apps, with zero-downtime restarts",
    long_about = "A pre-fork HTTP server for Rust apps, with zero-downtime restarts.\n\n\
        Signals to the master: HUP reloads (new workers, then the old ones drain), \
        TERM stops gracefully, INT and QUIT stop at once, USR2 upgrades to the binary on \
        disk keeping the master's pid, TTIN and TTOU add or remove a worker, USR1 \
        reopens the log files, WINCH stops the workers but keeps the master."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    // `--workers -1` is a bad number, not an unknown flag.
    #[command(allow_negative_numbers = true)]
    Serve(ServeArgs),
    /// Validate the configuration and print the effective settings, without
    /// binding anything. With --load-app, also run the app's load step (a
    /// Python app: import it).
    #[command(allow_negative_numbers = true)]
    Check {
        #[command(flatten)]
        args: ServeArgs,
        /// Also run the app's load step, to check that it succeeds.
        #[arg(long)]
        load_app: bool,
    },
    /// Print shell completions for this program (`zdr completions bash >
    /// /etc/bash_completion.d/zdr`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print this program's man page, in roff (`zdr man > zdr.1; man
    /// ./zdr.1`), or a subcommand's (`zdr man serve > zdr-serve.1`).
    Man {
        /// The subcommand (serve, check, status, reload, stop, scale, ...).
        subcommand: Option<String>,
    },
    /// Show a running server: its master, generations and workers.
    Status {
        #[command(flatten)]
        args: TargetArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reload a running server (as SIGHUP). With --wait, wait until the new
    /// generation took over (exit 0) or was rolled back (exit 1).
    Reload {
        #[command(flatten)]
        args: TargetArgs,
        /// Wait for the outcome.
        #[arg(long)]
        wait: bool,
        /// How long to wait for it, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
        timeout: f64,
        /// Start N workers of the new generation first, as a canary judged
        /// on its errors and latency against the old generation, then the
        /// rest or a rollback (see --canary-seconds and its companions).
        #[arg(long, value_name = "N")]
        canary: Option<usize>,
        /// With --wait on a terminal, print no progress (the rollout's
        /// steps as they happen), only the outcome.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Stop a running server: gracefully (as SIGTERM), or at once with --now.
    Stop {
        #[command(flatten)]
        args: TargetArgs,
        /// Let in-flight requests finish (the default).
        #[arg(long, conflicts_with = "now")]
        graceful: bool,
        /// Stop at once (as SIGQUIT).
        #[arg(long)]
        now: bool,
        /// Wait until the master has exited: exit 0 if every worker
        /// finished in time, 1 if some still had connections open at the
        /// graceful timeout.
        #[arg(long)]
        wait: bool,
        /// How long to wait, in seconds.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 120.0,
            requires = "wait"
        )]
        timeout: f64,
    },
    /// Set the number of workers of a running server.
    Scale {
        #[command(flatten)]
        args: TargetArgs,
        /// The number of workers.
        #[arg(value_name = "WORKERS")]
        count: usize,
    },
}

/// How an operator command finds its server: the same `--config`, `--pid`,
/// `--control-socket` or `--bind` that `serve` was given.
#[derive(Debug, Args)]
struct TargetArgs {
    /// The server's configuration file.
    #[arg(short = 'c', long, env = "ZDR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The server's pidfile (its control socket is beside it).
    #[arg(short = 'p', long = "pid", env = "ZDR_PIDFILE", value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// The server's control socket.
    #[arg(
        long = "control-socket",
        env = "ZDR_CONTROL_SOCKET",
        value_name = "PATH"
    )]
    control_socket: Option<PathBuf>,
    /// The server's first bind address, if neither of the above is known.
    #[arg(
        short = 'b',
        long = "bind",
        env = "ZDR_BIND",
        value_name = "ADDRESS",
        value_delimiter = ','
    )]
    bind: Option<Vec<String>>,
}

impl TargetArgs {
    fn sources(self) -> Sources {
        let flags = Options {
            pidfile: self.pidfile,
            control_socket: self.control_socket,
            bind: self.bind,
            ..Options::default()
        };
        Sources {
            config_file: self.config,
            flags,
            activated: Vec::new(),
            from_env: Vec::new(),
        }
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The configuration file (TOML), with Gunicorn's setting names.
    #[arg(short = 'c', long, env = "ZDR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    options: Options,

    /// The settings whose value came from a `ZDR_*` variable: (key,
    /// variable), for error messages.
    #[arg(skip)]
    from_env: Vec<(String, String)>,
}

impl ServeArgs {
    fn sources(self) -> Sources {
        Sources {
            config_file: self.config,
            flags: self.options,
            activated: Vec::new(),
            from_env: self.from_env,
        }
    }
}

/// The command line of the app `name`, run as `program`: its `--help` and
/// `--version` name the app and its version when it gives one, and zdr's.
/// Shell completions and the man page are made from it too.
fn clap_command(name: &str, version: Option<&str>, program: Option<&OsString>) -> clap::Command {
    use clap::CommandFactory;
    let zdr = env!("CARGO_PKG_VERSION");
    // Each setting's declared default in its help.
    let mut command = Cli::command()
        .mut_subcommand("serve", crate::config::reference::with_defaults)
        .mut_subcommand("check", crate::config::reference::with_defaults);
    let program = program
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    if let Some(version) = version {
        let about = format!("{name} {version}, served by zdr {zdr}");
        let signals = command
            .get_long_about()
            .map(|a| a.to_string())
            .unwrap_or_default();
        command = command
            .name(program.clone().unwrap_or_else(|| name.to_owned()))
            .version(format!("{version} (zdr {zdr})"))
            .long_about(format!("{about}.\n\n{signals}"))
            .about(about);
    } else if let Some(program) = program {
        command = command.name(program);
    }
    command
}

/// Parses the command line of the app `name` (see [`clap_command`]).
fn parse(name: &str, version: Option<&str>, args: Vec<OsString>) -> Result<Cli, clap::Error> {
    use clap::FromArgMatches;
    let command = clap_command(name, version, args.first());
    let matches = command.clone().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    // Which values came from the environment, to name the variable when
    // one is refused.
    if let Some((sub, sub_matches)) = matches.subcommand() {
        let from_env: Vec<(String, String)> = command
            .find_subcommand(sub)
            .into_iter()
            .flat_map(|c| c.get_arguments())
            .filter(|a| {
                sub_matches.value_source(a.get_id().as_str())
                    == Some(clap::parser::ValueSource::EnvVariable)
            })
            .filter_map(|a| {
                let var = a.get_env()?.to_string_lossy().into_owned();
                Some((a.get_id().as_str().to_owned(), var))
            })
            .collect();
        match &mut cli.command {
            Command::Serve(args) | Command::Check { args, .. } => args.from_env = from_env,
            _ => {}
        }
    }
    Ok(cli)
}

/// Puts the flags of `ZDR_CMD_ARGS` (Gunicorn's `GUNICORN_CMD_ARGS`: flags
/// in one variable, split as a shell would) right after `serve` or `check`,
/// so that the command line's own flags come later and win.
fn with_cmd_args(mut args: Vec<OsString>, cmd_args: Option<&str>) -> Vec<OsString> {
    let Some(words) = cmd_args.map(split_words).filter(|w| !w.is_empty()) else {
        return args;
    };
    if args.get(1).is_some_and(|a| a == "serve" || a == "check") {
        let tail = args.split_off(2);
        args.extend(words.into_iter().map(OsString::from));
        args.extend(tail);
    }
    args
}

/// Splits a line into words as a POSIX shell does for quotes and
/// backslashes (no expansion): `--bind 0.0.0.0:80 --name "my app"`.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.by_ref().take_while(|c| *c != '\''));
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The whole program: worker mode when the master started this process as
/// a worker, else the command line.
pub(crate) fn main(name: &str, version: Option<&str>, loader: Loader, args: Vec<OsString>) -> u8 {
    crate::sys::take_executable_env();
    if let Some(code) = crate::worker::main_if_worker(&loader) {
        return code;
    }
    // A re-executed master (titled, or upgraded) reads ZDR_CMD_ARGS again.
    let args_for_upgrade = args.clone();
    let args = with_cmd_args(args, std::env::var("ZDR_CMD_ARGS").ok().as_deref());
    let program = args.first().cloned();
    let cli = match parse(name, version, args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Completions { shell } => {
            let mut command = clap_command(name, version, program.as_ref());
            let bin = command.get_name().to_owned();
            clap_complete::generate(shell, &mut command, bin, &mut std::io::stdout());
            0
        }
        Command::Man { subcommand } => {
            let mut command = clap_command(name, version, program.as_ref());
            command.build();
            let page = match subcommand {
                None => command,
                Some(sub) => {
                    let parent = command.get_name().to_owned();
                    match command.find_subcommand(&sub) {
                        Some(c) => {
                            let name = format!("{parent}-{}", c.get_name());
                            c.clone().name(name)
                        }
                        None => {
                            return fail(&format!("no subcommand {sub:?}: see `{parent} --help`"))
                        }
                    }
                }
            };
            match clap_mangen::Man::new(page).render(&mut std::io::stdout()) {
                Ok(()) => 0,
                // Read by a pager or `head` that stopped early.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => fail(&e),
            }
        }
        Command::Serve(args) => serve(name, args, loader, args_for_upgrade),
        Command::Status { args, json } => operate(args, crate::client::Command::Status { json }),
        Command::Reload {
            args,
            wait,
            timeout,
            canary,
            quiet,
        } => {
            let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.1, 86_400.0));
            use std::io::IsTerminal;
            operate(
                args,
                crate::client::Command::Reload {
                    wait,
                    timeout,
                    canary,
                    progress: wait && !quiet && std::io::stderr().is_terminal(),
                },
            )
        }
        Command::Stop {
            args,
            now,
            wait,
            timeout,
            ..
        } => {
            let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.1, 86_400.0));
            operate(
                args,
                crate::client::Command::Stop {
                    graceful: !now,
                    wait: wait.then_some(timeout),
                },
            )
        }
        Command::Scale { args, count } => {
            operate(args, crate::client::Command::Scale { workers: count })
        }
        Command::Check { args, load_app } => {
            let settings = match args.sources().load() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            // The certificates are read as serve would read them.
            if let Err(e) = crate::tls::acceptor(&settings) {
                return fail(&format!("{e:#}"));
            }
            if let (true, Some(program)) = (load_app, settings.command.first()) {
                // A command's app is loaded by the command: its program must
                // at least be there to run.
                if !runnable(program) {
                    return fail(&format!(
                        "the command's program {program:?} is not an executable file or on PATH"
                    ));
                }
            } else if load_app && !settings.app.is_empty() {
                // A Python app is imported here, as a worker (or a
                // `--preload` loader) would import it.
                #[cfg(feature = "python")]
                {
                    if let Some(dir) = &settings.chdir {
                        if let Err(e) = std::env::set_current_dir(dir) {
                            return fail(&format!(
                                "cannot change to directory {}: {e}",
                                dir.display()
                            ));
                        }
                    }
                    if let Err(why) = crate::python::preload::import(&settings, 0, 0) {
                        return fail(&format!("the app failed to load: {why}"));
                    }
                }
            } else if load_app {
                if let Err(e) = loader() {
                    return fail(&format!("the app failed to load: {e:#}"));
                }
            }
            // Every setting as it resolved, in the config file's own form
            // (it reads back as the same configuration), then the verdict.
            match toml::to_string(&settings) {
                Ok(text) => {
                    print!("{text}");
                    eprintln!("configuration OK");
                    0
                }
                Err(e) => fail(&e),
            }
        }
    }
}

/// `zdr serve`: resolves the settings, takes the working directory and
/// the umask, starts the logs and runs the master.
fn serve(name: &str, args: ServeArgs, loader: Loader, args_for_upgrade: Vec<OsString>) -> u8 {
    let mut sources = args.sources();
    // Before anything is bound or taken from the environment: the master
    // re-executes itself once, in place, under its process title.
    if let (Ok(settings), Ok(exe)) = (sources.load(), crate::sys::current_exe()) {
        let name = settings.proc_name.as_deref().unwrap_or(name);
        crate::master::title::retitle(&exe, name, &args_for_upgrade);
    }
    sources.activated = crate::listener::activated_sockets();
    // A reload re-reads the file from wherever --chdir leads.
    if let Some(file) = &sources.config_file {
        sources.config_file = Some(std::fs::canonicalize(file).unwrap_or_else(|_| file.clone()));
    }
    let settings = match sources.load() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if let Some(dir) = &settings.chdir {
        if let Err(e) = std::env::set_current_dir(dir) {
            return fail(&format!(
                "cannot change to directory {}: {e}",
                dir.display()
            ));
        }
    }
    if let Some(mask) = settings.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    if let Err(e) = crate::logging::init(&settings) {
        return fail(&e);
    }
    crate::master::serve(name, sources, settings, loader, args_for_upgrade)
}

/// Whether `program` names an executable file, as a path or on `PATH`.
fn runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|dir| executable(&dir.join(program)))
}

/// Runs an operator command against the server these arguments describe.
fn operate(args: TargetArgs, command: crate::client::Command) -> u8 {
    match args.sources().load() {
        Ok(settings) => crate::client::run(&settings, command),
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    eprintln!("zdr: error: {e}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_args_split_as_a_shell_would() {
        assert_eq!(
            split_words(r#" --bind 0.0.0.0:80  --name "my app" -e 'A=b c' x\ y"#),
            [
                "--bind",
                "0.0.0.0:80",
                "--name",
                "my app",
                "-e",
                "A=b c",
                "x y"
            ]
        );
        assert!(split_words("  ").is_empty());
    }

    #[test]
    fn cmd_args_go_before_the_command_lines_own_flags() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            with_cmd_args(args(&["zdr", "serve", "-w", "3"]), Some("-w 2 --preload")),
            args(&["zdr", "serve", "-w", "2", "--preload", "-w", "3"])
        );
        assert_eq!(
            with_cmd_args(args(&["zdr", "status"]), Some("-w 2")),
            args(&["zdr", "status"])
        );
        let cli = Cli::try_parse_from(with_cmd_args(
            args(&["zdr", "serve", "-w", "3"]),
            Some("-w 2 --keep-alive 7"),
        ))
        .unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!()
        };
        assert_eq!(serve.options.workers, Some(3));
        assert_eq!(serve.options.keepalive, Some(7.0));
    }
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_bare_boolean_flag_leaves_the_app_that_follows_it() {
        // Gunicorn's and the issue's form: `--preload main:app`.
        for (line, preload, reload) in [
            (&["--preload", "main:app"][..], Some(true), None),
            (&["--preload=false", "main:app"], Some(false), None),
            (
                &["--reload", "--preload", "main:app"],
                Some(true),
                Some(true),
            ),
        ] {
            let mut all = vec!["zdr", "serve", "--workers", "3"];
            all.extend_from_slice(line);
            let cli = Cli::try_parse_from(&all).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!()
            };
            assert_eq!(args.options.preload, preload, "{line:?}");
            assert_eq!(args.options.reload, reload, "{line:?}");
            assert_eq!(args.options.app.as_deref(), Some("main:app"), "{line:?}");
        }
    }

    #[test]
    fn gunicorn_flag_names_parse() {
        let cli = Cli::try_parse_from([
            "zdr",
            "serve",
            "-b",
            "127.0.0.1:1",
            "--bind",
            "unix:/tmp/s",
            "-w",
            "3",
            "--threads",
            "2",
            "--worker-connections",
            "10",
            "--keep-alive",
            "5",
            "--graceful-timeout",
            "3",
            "-t",
            "9",
            "--max-requests",
            "50",
            "--max-requests-jitter",
            "10",
            "--preload",
            "-p",
            "/tmp/p",
            "--log-level",
            "warning",
            "--access-logfile",
            "-",
            "--access-logformat",
            "%(h)s",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!()
        };
        let o = args.options;
        assert_eq!(o.bind.unwrap(), ["127.0.0.1:1", "unix:/tmp/s"]);
        assert_eq!(
            (o.workers, o.threads, o.worker_connections),
            (Some(3), Some(2), Some(10))
        );
        assert_eq!(o.preload, Some(true));
        assert_eq!(o.access_log_format.as_deref(), Some("%(h)s"));
    }
}
