//! The command line: `serve` and `check`, with Gunicorn's flag names.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::Loader;
use crate::config::{Options, Sources};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A pre-fork HTTP server for Rust apps, with zero-downtime restarts",
    long_about = "A pre-fork HTTP server for Rust apps, with zero-downtime restarts.\n\n\
        Signals to the master: HUP reloads (new workers, then the old ones drain), \
        TERM stops gracefully, INT and QUIT stop at once, TTIN and TTOU add or remove \
        a worker, USR1 reopens the log files, WINCH stops the workers but keeps the master."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Validate the configuration and print the effective settings, without
    /// binding anything. With --load-app, also run the app's load step.
    Check {
        #[command(flatten)]
        args: ServeArgs,
        /// Also run the app's load step, to check that it succeeds.
        #[arg(long)]
        load_app: bool,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The configuration file (TOML), with Gunicorn's setting names.
    #[arg(short = 'c', long, env = "ZDR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(flatten)]
    options: Options,
}

impl ServeArgs {
    fn sources(self) -> Sources {
        Sources {
            config_file: self.config,
            flags: self.options,
        }
    }
}

/// The whole program: worker mode when the master started this process as
/// a worker, else the command line.
pub(crate) fn main(name: &str, loader: Loader, args: Vec<OsString>) -> ExitCode {
    if let Some(code) = crate::worker::main_if_worker(&loader) {
        return code;
    }
    let args_for_upgrade = args.clone();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Serve(args) => {
            let sources = args.sources();
            let settings = match sources.load() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            if let Err(e) = crate::logging::init(&settings) {
                return fail(&e);
            }
            crate::master::serve(name, sources, settings, loader, args_for_upgrade)
        }
        Command::Check { args, load_app } => {
            let settings = match args.sources().load() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            if load_app {
                if let Err(e) = loader() {
                    return fail(&format!("the app failed to load: {e:#}"));
                }
            }
            match toml::to_string(&settings) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("zdr: error: {e}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
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
