//! Settings: what they are, where they come from, and how layers combine.
//!
//! Every setting is declared once, in [`Options`]. That one declaration is
//! the command line (clap, with a `ZDR_*` environment variable per flag),
//! the TOML file (serde, Gunicorn's key names), a layer in the merge and
//! the list of keys. [`Settings::resolve`] gives each its default and
//! checks it. Precedence,
//! lowest to highest: built-in defaults, the platform's `PORT` and
//! `WEB_CONCURRENCY`, the config file, `ZDR_*` variables, flags.
//! [`Settings`] is the resolved result that the master and workers run on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::listener::BindAddr;

pub mod reference;

/// Gunicorn's default access log format.
pub const DEFAULT_ACCESS_LOG_FORMAT: &str =
    r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// Declares the settings layer: every setting once, with its doc (the first
/// paragraph is `-h`'s line, the whole is `--help`'s text, the README's
/// table and `zdr.toml.example`'s comment), its flag and `ZDR_*` variable
/// (clap), its config-file key (the field's name, serde), its type, its
/// default (`= value`) and, for one with none, an example (`=> "TOML"`).
/// From that one declaration follow the layer's merge ([`Options::or`]),
/// the list of keys ([`Options::KEYS`]), the defaults ([`Defaults`]), and
/// the reference made from them ([`reference`]: `--help`'s `[default: …]`,
/// the README's settings table, `zdr.toml.example`). Validation is in
/// [`Settings::resolve`].
macro_rules! settings_layer {
    (
        $(#[$struct_meta:meta])*
        pub struct Options {
            $(
                $(#[$meta:meta])*
                pub $key:ident: Option<$ty:ty> $(= $default:expr)? $(=> $example:literal)?,
            )*
        }
    ) => {
        $(#[$struct_meta])*
        pub struct Options {
            $(
                $(#[$meta])*
                pub $key: Option<$ty>,
            )*
        }

        impl Options {
            /// Every setting's key, as the config file spells it.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];

            /// An example value (TOML) for each setting that has no default.
            pub const EXAMPLES: &'static [(&'static str, &'static str)] =
                &[$($((stringify!($key), $example),)?)*];

            /// Fills every field this layer leaves unset from `lower`.
            pub fn or(self, lower: Options) -> Options {
                Options {
                    $($key: self.$key.or(lower.$key),)*
                }
            }

            /// Each setting's default as a TOML value, `None` for one with
            /// no default.
            pub fn default_values() -> Vec<(&'static str, Option<toml::Value>)> {
                let _defaults = Defaults::default();
                vec![$((stringify!($key), declared_value!(_defaults, $key $(, $default)?)),)*]
            }
        }

        /// The built-in default of every setting that has one, as declared
        /// beside it: what [`Settings::resolve`] gives a setting no layer
        /// sets.
        #[derive(Debug, Clone)]
        pub struct Defaults {
            $($(
                #[doc = concat!("`", stringify!($key), "`'s default.")]
                pub $key: declared_type!($ty, $default),
            )?)*
        }

        impl Default for Defaults {
            fn default() -> Defaults {
                Defaults {
                    $($($key: $default,)?)*
                }
            }
        }
    };
}

/// A declared default's type: the setting's own.
macro_rules! declared_type {
    ($ty:ty, $default:expr) => {
        $ty
    };
}

/// A declared default as a TOML value, or `None` with no default.
macro_rules! declared_value {
    ($defaults:ident, $key:ident) => {
        None
    };
    ($defaults:ident, $key:ident, $default:expr) => {
        toml::Value::try_from(&$defaults.$key).ok()
    };
}

settings_layer! {
/// One layer of settings: every field is optional, and an absent field falls
/// through to the layer below.
///
/// The same struct parses flags (with their `ZDR_*` environment variables)
/// and the TOML config file, so a setting's flag, variable and key are
/// declared side by side.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The socket to bind: HOST:PORT, `[IPV6]:PORT`, unix:PATH or fd://N.
    /// Repeat (or separate with commas) to bind several. [default:
    /// 0.0.0.0:$PORT when PORT is set, else 127.0.0.1:8000]
    #[arg(
        short = 'b',
        long = "bind",
        env = "ZDR_BIND",
        value_name = "ADDRESS",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub bind: Option<Vec<String>> = vec![String::from("127.0.0.1:8000")],

    /// The maximum number of pending connections per listening socket.
    #[arg(long, env = "ZDR_BACKLOG", value_name = "INT", value_parser = whole::<u32>)]
    pub backlog: Option<u32> = 2048,

    /// The number of worker processes. [default: $WEB_CONCURRENCY, else 1]
    #[arg(short = 'w', long, env = "ZDR_WORKERS", value_name = "INT", value_parser = whole::<usize>)]
    pub workers: Option<usize> = 1,

    /// The number of runtime threads in each worker; 1 runs everything on the
    /// worker's own thread (a current-thread runtime).
    ///
    /// Tokio runtime threads per worker; 1 runs a current-thread runtime on the
    /// worker's own thread (`block_in_place` needs 2 or more; `spawn_blocking`
    /// works with any).
    #[arg(long, env = "ZDR_THREADS", value_name = "INT", value_parser = whole::<usize>)]
    pub threads: Option<usize> = 1,

    /// The maximum number of simultaneous connections per worker; a worker at
    /// the cap stops accepting until one closes.
    #[arg(
        long = "worker-connections",
        env = "ZDR_WORKER_CONNECTIONS",
        value_name = "INT",
        value_parser = whole::<usize>
    )]
    pub worker_connections: Option<usize> = 1000,

    /// Workers silent for more than this many seconds are killed and restarted;
    /// 0 disables.
    ///
    /// Seconds without progress (no heartbeat from its runtime, no request
    /// begun or ended) before a worker is killed and replaced; a busy worker is
    /// never taken for a hung one; the kill is explained: each request in
    /// flight by method and path with how long it had run (`requests in flight:
    /// GET /report (for 31.2s)`, the worker's eight most recent, read from
    /// shared memory, so a stopped worker is explained too), each thread's
    /// state and the kernel function it waits in, a command's pid; 0 off.
    #[arg(short = 't', long, env = "ZDR_TIMEOUT", value_name = "SECONDS")]
    pub timeout: Option<f64> = 30.0,

    /// How long a stopping or retiring worker may take to finish its in-flight
    /// requests before it is killed.
    #[arg(
        long = "graceful-timeout",
        env = "ZDR_GRACEFUL_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub graceful_timeout: Option<f64> = 30.0,

    /// How long a new worker may take to become ready before start-up fails or
    /// a reload is rolled back.
    #[arg(
        long = "boot-timeout",
        env = "ZDR_BOOT_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub boot_timeout: Option<f64> = 30.0,

    /// Seconds to wait for the next request on an idle keep-alive connection.
    #[arg(long = "keep-alive", env = "ZDR_KEEPALIVE", value_name = "SECONDS")]
    pub keepalive: Option<f64> = 2.0,

    /// Recycle a worker after it has served this many requests; 0 disables.
    #[arg(long = "max-requests", env = "ZDR_MAX_REQUESTS", value_name = "INT", value_parser = whole::<u64>)]
    pub max_requests: Option<u64> = 0,

    /// Recycle a worker whose own memory (private pages, not those shared with
    /// a --preload master) passes this size (e.g. 512M, 2G), replacement first.
    /// [default: none]
    ///
    /// Recycle a worker whose own memory (private pages) passes this size
    /// (`512M`, `2G`; a number without a unit below 1 MiB is refused: `512` was
    /// never meant as bytes).
    #[arg(
        long = "max-worker-memory",
        env = "ZDR_MAX_WORKER_MEMORY",
        value_name = "SIZE"
    )]
    pub max_worker_memory: Option<MemorySize> => r#""512M""#,

    /// A random 0..=N added to max-requests per worker, so that workers do not
    /// all recycle at once.
    #[arg(
        long = "max-requests-jitter",
        env = "ZDR_MAX_REQUESTS_JITTER",
        value_name = "INT",
        value_parser = whole::<u64>
    )]
    pub max_requests_jitter: Option<u64> = 0,

    /// Load the application once before forking the workers, so that they
    /// share its memory copy-on-write: in the master, or for a Python app
    /// (MODULE:APP) in a loader process per generation, so that a reload
    /// imports new code.
    #[arg(long, env = "ZDR_PRELOAD", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    #[serde(alias = "preload_app")]
    pub preload: Option<bool> = false,

    /// Write the master's pid to this file; removed on exit.
    #[arg(short = 'p', long = "pid", env = "ZDR_PIDFILE", value_name = "FILE")]
    pub pidfile: Option<PathBuf> => r#""/run/zdr.pid""#,

    /// The control socket that `zdr status`, `reload`, `stop` and `scale` use.
    /// [default: PIDFILE.ctl (beside the pidfile), else $TMPDIR/zdr-BIND.ctl]
    #[arg(
        long = "control-socket",
        env = "ZDR_CONTROL_SOCKET",
        value_name = "PATH"
    )]
    pub control_socket: Option<PathBuf> => r#""/run/zdr.ctl""#,

    /// The longest request line (method, target, version) in bytes; longer gets
    /// 414. 0 for no limit.
    #[arg(
        long = "limit-request-line",
        env = "ZDR_LIMIT_REQUEST_LINE",
        value_name = "BYTES",
        value_parser = whole::<usize>
    )]
    pub limit_request_line: Option<usize> = 4094,

    /// The most header fields in a request; more gets 431.
    #[arg(
        long = "limit-request-fields",
        env = "ZDR_LIMIT_REQUEST_FIELDS",
        value_name = "INT",
        value_parser = whole::<usize>
    )]
    pub limit_request_fields: Option<usize> = 100,

    /// The longest header field (name and value) in bytes; longer gets 431. 0
    /// for no limit.
    #[arg(
        long = "limit-request-field_size",
        alias = "limit-request-field-size",
        env = "ZDR_LIMIT_REQUEST_FIELD_SIZE",
        value_name = "BYTES",
        value_parser = whole::<usize>
    )]
    pub limit_request_field_size: Option<usize> = 8190,

    /// The largest request body (e.g. 10M); a larger Content-Length gets 413.
    /// [default: none]
    #[arg(
        long = "limit-request-body",
        env = "ZDR_LIMIT_REQUEST_BODY",
        value_name = "SIZE"
    )]
    pub limit_request_body: Option<ByteSize> => r#""10M""#,

    /// Seconds a client gets to send a request's head (and the longest a
    /// keep-alive connection waits for the next one): slow clients are cut off.
    #[arg(
        long = "header-timeout",
        env = "ZDR_HEADER_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub header_timeout: Option<f64> = 10.0,

    /// Seconds a request's body may go without a byte from the client (as
    /// nginx's client_body_timeout); past it the app's read fails and the
    /// connection closes. 0 disables.
    #[arg(
        long = "body-timeout",
        env = "ZDR_BODY_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub body_timeout: Option<f64> = 60.0,

    /// Seconds a response may wait for the client to take more of it (as
    /// nginx's send_timeout); past it the connection closes. 0 disables.
    #[arg(
        long = "send-timeout",
        env = "ZDR_SEND_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub send_timeout: Option<f64> = 60.0,

    /// Seconds a request may take to be answered (its response head) before zdr
    /// answers 504 itself and drops the app's work on it; the worker lives on.
    /// Also the proxy mode's wait for the command's answer. A handler that
    /// blocks its thread cannot be cut short (that is `--timeout`'s job). 0
    /// (the default) for none, as Gunicorn.
    #[arg(
        long = "request-timeout",
        env = "ZDR_REQUEST_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub request_timeout: Option<f64> = 0.0,

    /// Overload shedding: seconds a request may wait in a busy worker before
    /// zdr starts it; one that waited longer is answered 503 with Retry-After
    /// at once, instead of queueing until its client gives up. The limit grows
    /// with the app's measured response time (a request is shed only once it
    /// waited longer than both), so a slow app at its capacity is not shed.
    /// Health probes are never shed. 0 (the default) sheds nothing.
    #[arg(
        long = "max-queue-time",
        env = "ZDR_MAX_QUEUE_TIME",
        value_name = "SECONDS"
    )]
    pub max_queue_time: Option<f64> = 0.0,

    /// Peers whose X-Forwarded-For, X-Forwarded-Proto and Forwarded headers are
    /// trusted, comma-separated; * for every peer.
    ///
    /// Proxies whose forwarding headers are trusted, comma-separated; `*`
    /// for every peer. Gunicorn's `FORWARDED_ALLOW_IPS` variable is read
    /// too, below the config file.
    #[arg(
        long = "forwarded-allow-ips",
        env = "ZDR_FORWARDED_ALLOW_IPS",
        value_name = "IPS",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub forwarded_allow_ips: Option<Vec<String>> = vec![String::from("127.0.0.1"), String::from("::1")],

    /// Serve HTTPS with this certificate chain (PEM). [default: none]
    #[arg(long, env = "ZDR_CERTFILE", value_name = "FILE")]
    pub certfile: Option<PathBuf> => r#""/etc/app/tls/cert.pem""#,

    /// The private key (PEM) of --certfile.
    #[arg(long, env = "ZDR_KEYFILE", value_name = "FILE")]
    pub keyfile: Option<PathBuf> => r#""/etc/app/tls/key.pem""#,

    /// Require client certificates issued by these CAs (PEM).
    #[arg(long = "ca-certs", env = "ZDR_CA_CERTS", value_name = "FILE")]
    pub ca_certs: Option<PathBuf> => r#""/etc/app/tls/clients-ca.pem""#,

    /// Run the workers as this user (a name or a uid); the master binds the
    /// sockets first, as root. [default: the master's user]
    #[arg(short = 'u', long, env = "ZDR_USER", value_name = "USER")]
    pub user: Option<String> => r#""www-data""#,

    /// Run the workers in this group (a name or a gid). [default: the user's
    /// primary group]
    #[arg(short = 'g', long, env = "ZDR_GROUP", value_name = "GROUP")]
    pub group: Option<String> => r#""www-data""#,

    /// The file mode creation mask of the server's processes, in octal.
    /// [default: the inherited one]
    #[arg(short = 'm', long, env = "ZDR_UMASK", value_name = "OCTAL")]
    pub umask: Option<String> => r#""022""#,

    /// Change to this directory before loading the app.
    #[arg(long, env = "ZDR_CHDIR", value_name = "DIR")]
    pub chdir: Option<PathBuf> => r#""/srv/app""#,

    /// Serve Prometheus metrics for the whole server on this HOST:PORT (keep it
    /// private). [default: off]
    #[arg(
        long = "metrics-bind",
        env = "ZDR_METRICS_BIND",
        value_name = "ADDRESS"
    )]
    pub metrics_bind: Option<String> => r#""127.0.0.1:9100""#,

    /// On SIGTERM, answer readiness probes with 503 for this many seconds while
    /// still serving, so a load balancer can take the instance out before the
    /// listeners close.
    #[arg(
        long = "shutdown-delay",
        env = "ZDR_SHUTDOWN_DELAY",
        value_name = "SECONDS"
    )]
    pub shutdown_delay: Option<f64> = 0.0,

    /// The liveness probe's path; "" turns it off.
    #[arg(
        long = "health-live-path",
        env = "ZDR_HEALTH_LIVE_PATH",
        value_name = "PATH"
    )]
    pub health_live_path: Option<String> = String::from("/_zdr/live"),

    /// The readiness probe's path; "" turns it off.
    #[arg(
        long = "health-ready-path",
        env = "ZDR_HEALTH_READY_PATH",
        value_name = "PATH"
    )]
    pub health_ready_path: Option<String> = String::from("/_zdr/ready"),

    /// The startup probe's path; "" turns it off.
    #[arg(
        long = "health-startup-path",
        env = "ZDR_HEALTH_STARTUP_PATH",
        value_name = "PATH"
    )]
    pub health_startup_path: Option<String> = String::from("/_zdr/startup"),

    /// The error log level: debug, info, warning, error or critical.
    #[arg(
        long = "log-level",
        env = "ZDR_LOGLEVEL",
        value_name = "LEVEL",
        ignore_case = true
    )]
    pub loglevel: Option<LogLevel> = LogLevel::Info,

    /// The format of both logs: `text` (Gunicorn's lines) or `json` (one object
    /// per line, for log aggregators).
    ///
    /// `json`: both logs as one JSON object per line (error log: time, pid,
    /// level, role, worker, generation, event, message — see Log events; access
    /// log: its fields by name).
    #[arg(
        long = "log-format",
        env = "ZDR_LOG_FORMAT",
        value_name = "FORMAT",
        ignore_case = true
    )]
    pub log_format: Option<LogFormat> = LogFormat::Text,

    /// The error log file; '-' for stderr.
    #[arg(
        long = "error-logfile",
        alias = "log-file",
        env = "ZDR_ERRORLOG",
        value_name = "FILE"
    )]
    pub errorlog: Option<String> = String::from("-"),

    /// The access log file; '-' for stdout. [default: none]
    #[arg(long = "access-logfile", env = "ZDR_ACCESSLOG", value_name = "FILE")]
    pub accesslog: Option<String> => r#""-""#,

    /// The access log format, with Gunicorn's %(x)s placeholders.
    #[arg(
        long = "access-log-format",
        alias = "access-logformat",
        env = "ZDR_ACCESS_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    pub access_log_format: Option<String> = String::from(DEFAULT_ACCESS_LOG_FORMAT),

    /// When the port a `-- CMD` command must listen on ($PORT) counts as ready:
    /// a path answered with a 2xx (like a load balancer's check), or empty for
    /// "accepts connections".
    #[arg(
        long = "worker-ready-path",
        env = "ZDR_WORKER_READY_PATH",
        value_name = "PATH"
    )]
    pub worker_ready_path: Option<String> = String::new() => r#""/health""#,

    /// The upgrades (`Upgrade:` protocols) forwarded to a `-- CMD` command,
    /// comma-separated; a request asking for another is forwarded as a plain
    /// request, without its `Upgrade`. `h2c` is never forwarded (it would
    /// tunnel HTTP/2 past zdr's checks).
    #[arg(
        long = "proxy-upgrades",
        env = "ZDR_PROXY_UPGRADES",
        value_name = "PROTOCOLS",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub proxy_upgrades: Option<Vec<String>> = vec![String::from("websocket")],

    /// The signal a `-- CMD` command gets to stop, once its worker has drained
    /// its clients (SIGKILL to its process group at the graceful timeout).
    #[arg(
        long = "worker-stop-signal",
        env = "ZDR_WORKER_STOP_SIGNAL",
        value_name = "SIGNAL"
    )]
    #[serde(default, deserialize_with = "name_or_number")]
    pub worker_stop_signal: Option<String> = String::from("TERM"),

    /// For development: reload when the executable, the config file or an extra
    /// file changes (a new build rolls out by itself; with --preload, a new
    /// executable is a binary upgrade).
    #[arg(long, env = "ZDR_RELOAD", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub reload: Option<bool> = false,

    /// With --reload, also watch this file; repeat for several.
    #[arg(long = "reload-extra-file", value_name = "FILE")]
    pub reload_extra_files: Option<Vec<PathBuf>> => r#"["templates/index.html"]"#,

    /// The name in process titles (`ps`): `zdr: master [NAME]` and `zdr: worker
    /// [NAME] gen N`. [default: the app's name]
    ///
    /// Name in process titles: `zdr: master [NAME] serve …`, `zdr: worker
    /// [NAME] gen N` (a `--preload` worker keeps the master's).
    #[arg(short = 'n', long = "name", env = "ZDR_PROC_NAME", value_name = "NAME")]
    pub proc_name: Option<String> => r#""my-app""#,

    /// An environment variable for the workers (and a `-- CMD` command),
    /// KEY=VALUE; repeat for several. Re-read on every reload, so a changed
    /// value reaches the app without a restart. [default: none]
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub raw_env: Option<Vec<String>> => r#"["DATABASE_URL=postgres://localhost/app", "FEATURE_X=on"]"#,

    /// Socket mode for a `-- CMD` command: hand it the listening sockets (fds
    /// 3.. with LISTEN_FDS, systemd-style) instead of forwarding to it; for
    /// apps that drain correctly by themselves.
    #[arg(long = "pass-socket", env = "ZDR_PASS_SOCKET", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub pass_socket: Option<bool> = false,

    /// In socket mode, count a command as ready this many seconds after it
    /// starts, instead of waiting for its READY=1 on NOTIFY_SOCKET.
    #[arg(
        long = "worker-ready-delay",
        env = "ZDR_WORKER_READY_DELAY",
        value_name = "SECONDS"
    )]
    pub worker_ready_delay: Option<f64> = 0.0,

    /// Roll a reload out in batches of this many workers: each batch starts
    /// beside the old workers, and as many old ones drain once it is ready, so
    /// the server never runs more than workers + N processes (a memory-bound
    /// machine need not hold two whole generations) and never fewer than
    /// `workers` ready; 0 starts the whole new generation at once.
    #[arg(long = "max-surge", env = "ZDR_MAX_SURGE", value_name = "INT", value_parser = whole::<usize>)]
    pub max_surge: Option<usize> = 0,

    /// Let a reload drain up to this many old workers before their replacements
    /// are ready (Kubernetes' maxUnavailable): with --max-surge 0 the server
    /// never runs more than `workers` processes, for up to N fewer ready ones;
    /// at least one stays ready.
    #[arg(
        long = "max-unavailable",
        env = "ZDR_MAX_UNAVAILABLE",
        value_name = "INT",
        value_parser = whole::<usize>
    )]
    pub max_unavailable: Option<usize> = 0,

    /// Start every reload with this many workers of the new generation as a
    /// canary: they serve beside the old generation for --canary-seconds, and
    /// the rest follows only if their errors and latency pass; else the reload
    /// is rolled back. 0: no canary.
    #[arg(long = "canary", env = "ZDR_CANARY", value_name = "INT", value_parser = whole::<usize>)]
    pub canary: Option<usize> = 0,

    /// Grow the canary in steps, Flagger-style: worker counts or percentages of
    /// --workers, comma-separated (`1,50%,100%`). Each step is watched and
    /// judged as the first; the rest of the generation follows the last step
    /// that passes. Overrides --canary. [default: none]
    #[arg(
        long = "canary-steps",
        env = "ZDR_CANARY_STEPS",
        value_name = "STEPS",
        value_delimiter = ','
    )]
    pub canary_steps: Option<Vec<String>> => r#"["1", "50%", "100%"]"#,

    /// How long the canary is watched, at the least.
    #[arg(long = "canary-seconds", env = "ZDR_CANARY_SECONDS", value_name = "SECONDS")]
    pub canary_seconds: Option<f64> = 30.0,

    /// Requests the canary must answer before it is judged.
    #[arg(
        long = "canary-min-requests",
        env = "ZDR_CANARY_MIN_REQUESTS",
        value_name = "INT",
        value_parser = whole::<u64>
    )]
    pub canary_min_requests: Option<u64> = 100,

    /// The canary's largest 5xx ratio (when also above the old generation's).
    #[arg(
        long = "canary-max-error-ratio",
        env = "ZDR_CANARY_MAX_ERROR_RATIO",
        value_name = "RATIO"
    )]
    pub canary_max_error_ratio: Option<f64> = 0.01,

    /// The canary's largest p99 latency, as a multiple of the old generation's;
    /// 0 off.
    #[arg(
        long = "canary-max-p99-ratio",
        env = "ZDR_CANARY_MAX_P99_RATIO",
        value_name = "RATIO"
    )]
    pub canary_max_p99_ratio: Option<f64> = 2.0,

    /// What a canary that gets too little traffic to judge comes to, when the
    /// whole server was quiet through three windows: `rollback` (the old
    /// generation keeps serving) or `promote` (a quiet staging server deploys
    /// anyway). A canary that traffic did not reach while the old generation
    /// had plenty is always rolled back.
    #[arg(
        long = "canary-no-traffic",
        env = "ZDR_CANARY_NO_TRAFFIC",
        value_name = "POLICY",
        ignore_case = true
    )]
    pub canary_no_traffic: Option<NoTraffic> = NoTraffic::Rollback,

    /// Close a connection older than this many seconds after its current
    /// response (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY), so that
    /// long-lived clients move to new generations and new workers; 0 off.
    ///
    /// Close a connection older than this after its current response (HTTP/2:
    /// GOAWAY, then `--max-connection-age-grace`, default 10 s), with
    /// `--max-connection-age-jitter`; long-lived clients then reach new
    /// generations and added workers; 0 off.
    #[arg(
        long = "max-connection-age",
        env = "ZDR_MAX_CONNECTION_AGE",
        value_name = "SECONDS"
    )]
    pub max_connection_age: Option<f64> = 0.0,

    /// A random 0..=S seconds added to each connection's maximum age.
    #[arg(
        long = "max-connection-age-jitter",
        env = "ZDR_MAX_CONNECTION_AGE_JITTER",
        value_name = "SECONDS"
    )]
    pub max_connection_age_jitter: Option<f64> = 0.0,

    /// Seconds an aged HTTP/2 connection gets after GOAWAY to finish its
    /// streams before it is closed.
    #[arg(
        long = "max-connection-age-grace",
        env = "ZDR_MAX_CONNECTION_AGE_GRACE",
        value_name = "SECONDS"
    )]
    pub max_connection_age_grace: Option<f64> = 10.0,

    /// Serve a Python app in-process, named as uvicorn and Gunicorn name it:
    /// MODULE:APP (`main:app`: the object `app` in `main.py`, imported from the
    /// working directory); ASGI, or WSGI in `--threads` threads. Needs the
    /// wheel's zdr (`pip install zdr`) or one built with the `python` feature.
    #[arg(value_name = "MODULE:APP")]
    pub app: Option<String> => r#""main:app""#,

    /// What kind of Python app MODULE:APP is: `auto` (an ASGI app is a
    /// coroutine function, or an object whose `__call__` is one; anything
    /// else callable is WSGI, as uvicorn tells them apart), `asgi` or `wsgi`,
    /// for an app that `auto` takes for the other kind (an ASGI app behind a
    /// decorator that hides its coroutine).
    #[arg(
        long = "interface",
        env = "ZDR_INTERFACE",
        value_name = "KIND",
        ignore_case = true
    )]
    pub interface: Option<Interface> = Interface::Auto,

    /// Serve any HTTP app: each worker runs this command with a private port in
    /// $PORT and forwards its requests to it (after `--`, or `command = [...]`
    /// in the config file).
    #[arg(last = true, value_name = "CMD")]
    pub command: Option<Vec<String>> => r#"["uvicorn", "app:app", "--port", "$PORT"]"#,
}
}

/// A whole number for a flag, refused clearly when negative or not a
/// number.
fn whole<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| match value.trim().parse::<i64>() {
            Ok(n) if n < 0 => format!("must not be negative, got {n}"),
            _ => format!("must be a whole number, got {value:?}"),
        })
}

/// Accepts `bind = "a"` as well as `bind = ["a", "b"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(s)) => Some(vec![s]),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

/// A value given as a name or a number (`worker_stop_signal = "TERM"` or
/// `15`, as `zdr check` prints it), kept as text.
fn name_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrNumber {
        Name(String),
        Number(i64),
    }
    Ok(match Option::<NameOrNumber>::deserialize(d)? {
        None => None,
        Some(NameOrNumber::Name(s)) => Some(s),
        Some(NameOrNumber::Number(n)) => Some(n.to_string()),
    })
}

impl Options {
    /// The platform layer: `PORT` and `WEB_CONCURRENCY`, as set by Procfile
    /// platforms, and Gunicorn's `FORWARDED_ALLOW_IPS`. Below the config
    /// file in precedence.
    fn platform(env: &dyn Fn(&str) -> Option<String>) -> Result<Options, ConfigError> {
        let mut layer = Options::default();
        if let Some(port) = env("PORT").filter(|p| !p.is_empty()) {
            let port: u16 = port
                .trim()
                .parse()
                .map_err(|_| ConfigError::env("PORT", format!("not a port number: {port:?}")))?;
            layer.bind = Some(vec![format!("0.0.0.0:{port}")]);
        }
        if let Some(ips) = env("FORWARDED_ALLOW_IPS").filter(|v| !v.is_empty()) {
            layer.forwarded_allow_ips = Some(vec![ips]);
        }
        if let Some(n) = env("WEB_CONCURRENCY").filter(|n| !n.is_empty()) {
            let n: usize = n.trim().parse().map_err(|_| {
                ConfigError::env("WEB_CONCURRENCY", format!("not a whole number: {n:?}"))
            })?;
            layer.workers = Some(n);
        }
        Ok(layer)
    }
}

/// A size in bytes, written as a number of bytes or with a K, M or G suffix
/// (powers of 1024): `536870912`, `512M`, `2G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((i, _)) => t.split_at(i),
            None => (t, ""),
        };
        let shift = match unit
            .trim()
            .to_ascii_uppercase()
            .trim_end_matches(['B', 'I'])
        {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(format!("{s:?} is not a size (like 512M or 2G)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size (like 512M or 2G)"))?;
        n.checked_mul(1 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n > 0 && n % (1 << 30) == 0 => write!(f, "{}G", n >> 30),
            n if n > 0 && n % (1 << 20) == 0 => write!(f, "{}M", n >> 20),
            n if n > 0 && n % (1 << 10) == 0 => write!(f, "{}K", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A size as a file writes it: a number of bytes, or text with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RawSize::deserialize(d)? {
            RawSize::Bytes(n) => Ok(ByteSize(n)),
            RawSize::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A memory limit: a [`ByteSize`], but a number without a unit below 1 MiB
/// is refused (`512` would recycle every worker at once, forever: `512M`
/// was meant). 0 is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize(pub u64);

impl MemorySize {
    fn checked(text: &str, size: ByteSize) -> Result<MemorySize, String> {
        let unitless = text.trim().bytes().all(|b| b.is_ascii_digit());
        if unitless && size.0 > 0 && size.0 < 1 << 20 {
            return Err(format!(
                "{text} would be {text} bytes, less than any worker needs: give a unit, like {text}M or {text}K"
            ));
        }
        Ok(MemorySize(size.0))
    }
}

impl std::str::FromStr for MemorySize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MemorySize::checked(s, s.parse()?)
    }
}

impl Serialize for MemorySize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ByteSize(self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RawSize::deserialize(d)? {
            RawSize::Bytes(n) => MemorySize::checked(&n.to_string(), ByteSize(n)),
            RawSize::Text(t) => t.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// What a canary that a quiet server gave too little traffic to judge
/// comes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoTraffic {
    /// Rolled back: the old generation keeps serving.
    #[default]
    Rollback,
    /// Promoted: the rest of the generation follows.
    Promote,
}

/// What kind of Python app is served (`--interface`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    /// Told apart as uvicorn's `--interface auto` does.
    #[default]
    Auto,
    /// `async def app(scope, receive, send)`.
    Asgi,
    /// `def app(environ, start_response)`.
    Wsgi,
}

/// How the logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Gunicorn's lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The error log level, with Gunicorn's names, in any case (`WARNING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-connection detail.
    Debug,
    /// Lifecycle events: workers booting, reloads, stops.
    Info,
    /// Something went wrong but nothing was lost.
    #[serde(alias = "warn")]
    #[value(alias = "warn")]
    Warning,
    /// Something failed.
    Error,
    /// Only what stops the server.
    Critical,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        <LogLevel as clap::ValueEnum>::from_str(&name, true).map_err(|_| {
            serde::de::Error::custom(format!(
                "{name:?} is not a log level: debug, info, warning, error or critical"
            ))
        })
    }
}

impl LogLevel {
    /// The tracing level that corresponds.
    pub fn as_tracing(self) -> tracing::Level {
        match self {
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warning => tracing::Level::WARN,
            LogLevel::Error | LogLevel::Critical => tracing::Level::ERROR,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
        };
        f.write_str(name)
    }
}

/// The resolved settings the server runs on.
///
/// Serialized to pass a generation's settings to the workers it spawns, and
/// printed by `zdr check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Listening addresses.
    pub bind: Vec<BindAddr>,
    /// Listen backlog per socket.
    pub backlog: u32,
    /// Worker processes.
    pub workers: usize,
    /// Runtime threads per worker.
    pub threads: usize,
    /// Connection cap per worker.
    pub worker_connections: usize,
    /// Heartbeat timeout in seconds; 0 disables.
    pub timeout: f64,
    /// Seconds a draining worker gets to finish.
    pub graceful_timeout: f64,
    /// Seconds a new worker gets to become ready.
    pub boot_timeout: f64,
    /// Keep-alive idle timeout in seconds.
    pub keepalive: f64,
    /// Requests before a worker is recycled; 0 disables.
    pub max_requests: u64,
    /// Random extra requests per worker, 0..=jitter.
    pub max_requests_jitter: u64,
    /// Resident memory, in bytes, past which a worker is recycled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_worker_memory: Option<ByteSize>,
    /// Load the app in the master and fork workers from it.
    pub preload: bool,
    /// Where to write the master's pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pidfile: Option<PathBuf>,
    /// The control socket, when set explicitly (see
    /// [`crate::control::socket_path`] for the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Longest request line; 0 for no limit.
    pub limit_request_line: usize,
    /// Most header fields.
    pub limit_request_fields: usize,
    /// Longest header field; 0 for no limit.
    pub limit_request_field_size: usize,
    /// Largest request body, if limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_request_body: Option<ByteSize>,
    /// Seconds to send a request's head.
    pub header_timeout: f64,
    /// Seconds a body may go without a byte; 0 for no limit. (A default
    /// when absent: a master of an earlier build, whose settings lack it,
    /// may start workers of this one on a reload.)
    #[serde(default = "default_body_timeout")]
    pub body_timeout: f64,
    /// Seconds a response may wait for the client to read; 0 for no limit.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: f64,
    /// Seconds a request may take to its response head; 0 for no limit.
    #[serde(default)]
    pub request_timeout: f64,
    /// Seconds a request may wait before it is started, at least; 0 sheds
    /// nothing.
    #[serde(default)]
    pub max_queue_time: f64,
    /// Peers whose forwarding headers are trusted; "*" for all.
    pub forwarded_allow_ips: Vec<String>,
    /// The TLS certificate chain, when serving HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    /// The TLS private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// CAs whose client certificates are required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certs: Option<PathBuf>,
    /// The user and group workers run as (uid, gid), when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_as: Option<(u32, u32)>,
    /// The umask, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
    /// The directory to work in, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chdir: Option<PathBuf>,
    /// Where the master serves Prometheus metrics, if anywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_bind: Option<BindAddr>,
    /// Seconds readiness answers 503 on SIGTERM before draining starts.
    pub shutdown_delay: f64,
    /// Liveness probe path; empty for none.
    pub health_live_path: String,
    /// Readiness probe path; empty for none.
    pub health_ready_path: String,
    /// Startup probe path; empty for none.
    pub health_startup_path: String,
    /// Error log level.
    pub loglevel: LogLevel,
    /// The format of both logs.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Error log destination; "-" is stderr.
    pub errorlog: String,
    /// Access log destination; "-" is stdout; none disables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accesslog: Option<String>,
    /// Access log format.
    pub access_log_format: String,
    /// Reload when a watched file changes (development).
    #[serde(default)]
    pub reload: bool,
    /// Files watched besides the executable and the config file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reload_extra_files: Vec<PathBuf>,
    /// The name in process titles, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proc_name: Option<String>,
    /// Environment variables set in every worker before the app loads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_env: Vec<(String, String)>,
    /// The command each worker runs and forwards to; empty for the app
    /// linked into this binary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The Python app each worker imports and serves (`MODULE:APP`); empty
    /// for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app: String,
    /// What kind of Python app it is.
    #[serde(default)]
    pub interface: Interface,
    /// A command's readiness path; empty for "accepts connections".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker_ready_path: String,
    /// The upgrade protocols forwarded to a command (lower case).
    #[serde(default = "default_proxy_upgrades")]
    pub proxy_upgrades: Vec<String>,
    /// Canary workers per reload; 0 for none.
    #[serde(default)]
    pub canary: usize,
    /// The canary's steps, when it grows in several (`1`, `50%`, `100%`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary_steps: Vec<CanaryStep>,
    /// Seconds the canary is watched.
    #[serde(default = "default_canary_seconds")]
    pub canary_seconds: f64,
    /// Requests the canary answers before it is judged.
    #[serde(default = "default_canary_min_requests")]
    pub canary_min_requests: u64,
    /// The canary's largest 5xx ratio.
    #[serde(default = "default_canary_max_error_ratio")]
    pub canary_max_error_ratio: f64,
    /// The canary's largest p99, as a multiple of the old generation's.
    #[serde(default = "default_canary_max_p99_ratio")]
    pub canary_max_p99_ratio: f64,
    /// What a canary on a quiet server comes to.
    #[serde(default)]
    pub canary_no_traffic: NoTraffic,
    /// Reload batch size; 0 for the whole generation at once.
    #[serde(default)]
    pub max_surge: usize,
    /// Ready workers a reload may go below the target.
    #[serde(default)]
    pub max_unavailable: usize,
    /// Seconds a connection may live; 0 for no limit.
    #[serde(default)]
    pub max_connection_age: f64,
    /// Random extra seconds per connection.
    #[serde(default)]
    pub max_connection_age_jitter: f64,
    /// Seconds an aged HTTP/2 connection gets after GOAWAY.
    #[serde(default = "default_age_grace")]
    pub max_connection_age_grace: f64,
    /// Hand a command the listening sockets instead of forwarding to it.
    #[serde(default)]
    pub pass_socket: bool,
    /// In socket mode, seconds after which a command counts as ready; 0
    /// for "when it sends READY=1".
    #[serde(default)]
    pub worker_ready_delay: f64,
    /// The signal that stops a command, by number.
    #[serde(default = "default_stop_signal")]
    pub worker_stop_signal: i32,
}

fn seconds(name: &'static str, value: f64) -> Result<f64, ConfigError> {
    if (0.0..1.0e9).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            name,
            format!("must be a number of seconds >= 0, got {value}"),
        ))
    }
}

fn probe_path(name: &'static str, path: String) -> Result<String, ConfigError> {
    if path.is_empty() || path.starts_with('/') {
        Ok(path)
    } else {
        Err(ConfigError::invalid(
            name,
            format!("must start with / (or be empty to turn the probe off), got {path:?}"),
        ))
    }
}

/// `KEY=VALUE` pairs for the workers' environment.
fn raw_env(items: Vec<String>) -> Result<Vec<(String, String)>, ConfigError> {
    items
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((key, value))
                if !key.is_empty() && !key.contains('\0') && !value.contains('\0') =>
            {
                Ok((key.to_owned(), value.to_owned()))
            }
            _ => Err(ConfigError::invalid(
                "raw_env",
                format!("{item:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

/// The command to serve, if any. `--preload` has no meaning for it: the
/// app is loaded by the command, in each worker.
fn command(command: Option<Vec<String>>, preload: bool) -> Result<Vec<String>, ConfigError> {
    let command = command.unwrap_or_default();
    match command.first() {
        None => Ok(command),
        Some(program) if program.trim().is_empty() => Err(ConfigError::invalid(
            "command",
            "the command's program is empty",
        )),
        Some(_) if preload => Err(ConfigError::invalid(
            "preload",
            "has no meaning with a command: each worker's command loads its own app \
             (use the app server's own preload in the command, such as gunicorn --preload)",
        )),
        Some(_) => Ok(command),
    }
}

/// The Python app to serve, if any: `MODULE:APP`, alone (not with a
/// command), in a build that can host Python.
fn python_app(app: Option<String>, command: bool) -> Result<String, ConfigError> {
    let Some(app) = app.map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()) else {
        return Ok(String::new());
    };
    let valid = app.split_once(':').is_some_and(|(module, attr)| {
        let dotted = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|part| {
                    part.chars()
                        .next()
                        .is_some_and(|c| c.is_alphabetic() || c == '_')
                        && part.chars().all(|c| c.is_alphanumeric() || c == '_')
                })
        };
        dotted(module) && dotted(attr)
    });
    if !valid {
        return Err(ConfigError::invalid(
            "app",
            format!("`{app}` is not MODULE:APP (such as `main:app`, the object `app` in main.py)"),
        ));
    }
    if command {
        return Err(ConfigError::invalid(
            "app",
            "a Python app and a command (`-- CMD`) cannot be served together: give one",
        ));
    }
    if !cfg!(feature = "python") {
        return Err(ConfigError::invalid(
            "app",
            format!(
                "serving `{app}` needs a zdr built with Python hosting \
                 (`cargo build --release --features python`)"
            ),
        ));
    }
    Ok(app)
}

fn default_proxy_upgrades() -> Vec<String> {
    Defaults::default().proxy_upgrades
}

/// The upgrade protocols a command may be handed: protocol names (RFC 9110
/// §7.8 tokens, compared in lower case), never `h2c`.
fn proxy_upgrades(given: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut upgrades = Vec::new();
    for p in given.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let name = p.to_ascii_lowercase();
        if name == "h2c" || name.starts_with("h2c/") {
            return Err(ConfigError::invalid(
                "proxy_upgrades",
                "h2c is never forwarded: it would carry HTTP/2 past zdr's checks, and zdr \
                 already speaks HTTP/2 to clients (drop h2c from the list)",
            ));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b))
        {
            return Err(ConfigError::invalid(
                "proxy_upgrades",
                format!("{p:?} is not a protocol name, such as websocket"),
            ));
        }
        upgrades.push(name);
    }
    Ok(upgrades)
}

/// The signal numbers a command may be stopped with, by name.
const STOP_SIGNALS: [(&str, i32); 7] = [
    ("TERM", nix::libc::SIGTERM),
    ("INT", nix::libc::SIGINT),
    ("QUIT", nix::libc::SIGQUIT),
    ("HUP", nix::libc::SIGHUP),
    ("USR1", nix::libc::SIGUSR1),
    ("USR2", nix::libc::SIGUSR2),
    ("KILL", nix::libc::SIGKILL),
];

fn default_canary_seconds() -> f64 {
    Defaults::default().canary_seconds
}

fn default_canary_min_requests() -> u64 {
    Defaults::default().canary_min_requests
}

fn default_canary_max_error_ratio() -> f64 {
    Defaults::default().canary_max_error_ratio
}

fn default_canary_max_p99_ratio() -> f64 {
    Defaults::default().canary_max_p99_ratio
}

/// A ratio: a number of 0 or more.
/// One step of a canary: a number of workers, or a share of `workers`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CanaryStep {
    /// This many workers.
    Workers(usize),
    /// This percentage of `workers`, rounded up.
    Percent(u32),
}

impl CanaryStep {
    /// The number of workers this step runs, out of `workers`.
    pub fn of(self, workers: usize) -> usize {
        match self {
            CanaryStep::Workers(n) => n,
            CanaryStep::Percent(p) => (workers * p as usize).div_ceil(100).max(1),
        }
    }
}

impl TryFrom<String> for CanaryStep {
    type Error = String;

    fn try_from(text: String) -> Result<CanaryStep, String> {
        let t = text.trim();
        let bad = || format!("{t:?} is not a worker count (1) or a percentage (50%)");
        match t.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p @ 1..=100) => Ok(CanaryStep::Percent(p)),
                _ => Err(bad()),
            },
            None => match t.parse::<usize>() {
                Ok(n @ 1..) => Ok(CanaryStep::Workers(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl From<CanaryStep> for String {
    fn from(step: CanaryStep) -> String {
        match step {
            CanaryStep::Workers(n) => n.to_string(),
            CanaryStep::Percent(p) => format!("{p}%"),
        }
    }
}

fn canary_steps(items: Vec<String>) -> Result<Vec<CanaryStep>, ConfigError> {
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .map(|i| CanaryStep::try_from(i).map_err(|e| ConfigError::invalid("canary_steps", e)))
        .collect()
}

fn ratio(name: &'static str, value: f64) -> Result<f64, ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            name,
            format!("must be a number of 0 or more, got {value}"),
        ))
    }
}

/// The grace an aged HTTP/2 connection gets, in seconds.
fn default_age_grace() -> f64 {
    Defaults::default().max_connection_age_grace
}

/// The default stop signal, SIGTERM.
fn default_stop_signal() -> i32 {
    nix::libc::SIGTERM
}

/// A stop signal by name (`TERM`, `SIGTERM`, any case) or number.
fn stop_signal(value: Option<&str>, default: &str) -> Result<i32, ConfigError> {
    let value = match value.map(str::trim) {
        Some(v) if !v.is_empty() => v,
        _ => default,
    };
    let upper = value.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    STOP_SIGNALS
        .iter()
        .find(|(n, number)| *n == name || value.parse::<i32>().ok() == Some(*number))
        .map(|(_, number)| *number)
        .ok_or_else(|| {
            ConfigError::invalid(
                "worker_stop_signal",
                format!("{value:?} is not one of TERM, INT, QUIT, HUP, USR1, USR2, KILL"),
            )
        })
}

/// The listening addresses (at least one).
fn bind_addrs(bind: Vec<String>) -> Result<Vec<BindAddr>, ConfigError> {
    if bind.is_empty() {
        return Err(ConfigError::invalid("bind", "needs at least one address"));
    }
    bind.iter()
        .map(|b| {
            b.parse::<BindAddr>()
                .map_err(|e| ConfigError::invalid("bind", e))
        })
        .collect()
}

/// The peers whose forwarding headers are trusted, checked.
fn allow_list(ips: Vec<String>) -> Result<Vec<String>, ConfigError> {
    crate::forwarded::AllowList::parse(&ips)
        .map_err(|e| ConfigError::invalid("forwarded_allow_ips", e))?;
    Ok(ips)
}

/// The TLS files: a certificate and its key come together, and client
/// certificates need both.
#[allow(clippy::type_complexity)]
fn tls_files(
    certfile: Option<PathBuf>,
    keyfile: Option<PathBuf>,
    ca_certs: Option<PathBuf>,
) -> Result<(Option<PathBuf>, Option<PathBuf>, Option<PathBuf>), ConfigError> {
    match (&certfile, &keyfile, &ca_certs) {
        (Some(_), None, _) => Err(ConfigError::invalid("keyfile", "certfile needs a keyfile")),
        (None, Some(_), _) => Err(ConfigError::invalid("certfile", "keyfile needs a certfile")),
        (None, None, Some(_)) => Err(ConfigError::invalid(
            "ca_certs",
            "client certificates need certfile and keyfile",
        )),
        _ => Ok((certfile, keyfile, ca_certs)),
    }
}

/// An octal umask such as `022`.
fn umask(value: Option<&str>) -> Result<Option<u32>, ConfigError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(Some)
            .ok_or_else(|| {
                ConfigError::invalid("umask", format!("{m:?} is not an octal mask like 022"))
            }),
    }
}

/// The metrics endpoint's address: TCP only.
fn metrics_addr(value: Option<String>) -> Result<Option<BindAddr>, ConfigError> {
    match value
        .filter(|m| !m.is_empty())
        .map(|m| m.parse::<BindAddr>())
    {
        None => Ok(None),
        Some(Ok(addr @ BindAddr::Tcp { .. })) => Ok(Some(addr)),
        Some(Ok(_)) => Err(ConfigError::invalid("metrics_bind", "must be HOST:PORT")),
        Some(Err(e)) => Err(ConfigError::invalid("metrics_bind", e)),
    }
}

/// Resolves `user` and `group` (names or numbers) to a uid and gid.
fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<(u32, u32)>, ConfigError> {
    use nix::unistd::{Group, Uid, User};
    let user = user.map(str::trim).filter(|u| !u.is_empty());
    let group = group.map(str::trim).filter(|g| !g.is_empty());
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let found = |name: &'static str, what: &str| {
        ConfigError::invalid(name, format!("no such {name}: {what}"))
    };
    let (uid, primary) = match user {
        None => (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        ),
        Some(u) => match u.parse::<u32>() {
            Ok(uid) => {
                let primary = User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map_or(uid, |u| u.gid.as_raw());
                (uid, primary)
            }
            Err(_) => {
                let entry = User::from_name(u)
                    .ok()
                    .flatten()
                    .ok_or_else(|| found("user", u))?;
                (entry.uid.as_raw(), entry.gid.as_raw())
            }
        },
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| found("group", g))?
                .gid
                .as_raw(),
        },
    };
    Ok(Some((uid, gid)))
}

/// The body timeout's declared default, in seconds.
fn default_body_timeout() -> f64 {
    Defaults::default().body_timeout
}

/// The send timeout's declared default, in seconds.
fn default_send_timeout() -> f64 {
    Defaults::default().send_timeout
}

/// The most workers a server runs: during a reload two generations run side
/// by side, and each needs a scoreboard slot, so a server stays within
/// [`crate::scoreboard::CAPACITY`] with room for replacements.
pub const MAX_WORKERS: usize = (crate::scoreboard::CAPACITY - 24) / 2;

fn worker_count(value: usize) -> Result<usize, ConfigError> {
    match value {
        0 => Err(ConfigError::invalid("workers", "must be at least 1")),
        n if n > MAX_WORKERS => Err(ConfigError::invalid(
            "workers",
            format!("must be at most {MAX_WORKERS}, got {n}"),
        )),
        n => Ok(n),
    }
}

fn at_least_one(name: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value >= 1 {
        Ok(value)
    } else {
        Err(ConfigError::invalid(name, "must be at least 1"))
    }
}

impl Settings {
    /// Resolves a merged layer into settings, applying defaults and
    /// validating every value.
    pub fn resolve(o: Options) -> Result<Settings, ConfigError> {
        let d = Defaults::default();
        let (certfile, keyfile, ca_certs) = tls_files(o.certfile, o.keyfile, o.ca_certs)?;
        let settings = Settings {
            bind: bind_addrs(o.bind.unwrap_or(d.bind))?,
            backlog: o.backlog.unwrap_or(d.backlog),
            workers: worker_count(o.workers.unwrap_or(d.workers))?,
            threads: at_least_one("threads", o.threads.unwrap_or(d.threads))?,
            worker_connections: at_least_one(
                "worker_connections",
                o.worker_connections.unwrap_or(d.worker_connections),
            )?,
            timeout: seconds("timeout", o.timeout.unwrap_or(d.timeout))?,
            graceful_timeout: seconds(
                "graceful_timeout",
                o.graceful_timeout.unwrap_or(d.graceful_timeout),
            )?,
            boot_timeout: seconds("boot_timeout", o.boot_timeout.unwrap_or(d.boot_timeout))?,
            keepalive: seconds("keepalive", o.keepalive.unwrap_or(d.keepalive))?,
            max_requests: o.max_requests.unwrap_or(d.max_requests),
            max_requests_jitter: o.max_requests_jitter.unwrap_or(d.max_requests_jitter),
            max_worker_memory: o
                .max_worker_memory
                .filter(|m| m.0 > 0)
                .map(|m| ByteSize(m.0)),
            preload: o.preload.unwrap_or(d.preload),
            pidfile: o.pidfile,
            control_socket: o.control_socket,
            shutdown_delay: seconds(
                "shutdown_delay",
                o.shutdown_delay.unwrap_or(d.shutdown_delay),
            )?,
            limit_request_line: o.limit_request_line.unwrap_or(d.limit_request_line),
            limit_request_fields: match o.limit_request_fields.unwrap_or(d.limit_request_fields) {
                n @ 1..=32768 => n,
                _ => {
                    return Err(ConfigError::invalid(
                        "limit_request_fields",
                        "must be from 1 to 32768",
                    ))
                }
            },
            limit_request_field_size: o
                .limit_request_field_size
                .unwrap_or(d.limit_request_field_size),
            limit_request_body: o.limit_request_body.filter(|b| b.0 > 0),
            header_timeout: match seconds(
                "header_timeout",
                o.header_timeout.unwrap_or(d.header_timeout),
            )? {
                t if t > 0.0 => t,
                _ => {
                    return Err(ConfigError::invalid(
                        "header_timeout",
                        "must be more than 0",
                    ))
                }
            },
            body_timeout: seconds("body_timeout", o.body_timeout.unwrap_or(d.body_timeout))?,
            send_timeout: seconds("send_timeout", o.send_timeout.unwrap_or(d.send_timeout))?,
            request_timeout: seconds(
                "request_timeout",
                o.request_timeout.unwrap_or(d.request_timeout),
            )?,
            max_queue_time: seconds(
                "max_queue_time",
                o.max_queue_time.unwrap_or(d.max_queue_time),
            )?,
            forwarded_allow_ips: allow_list(
                o.forwarded_allow_ips.unwrap_or(d.forwarded_allow_ips),
            )?,
            certfile,
            keyfile,
            ca_certs,
            run_as: run_as(o.user.as_deref(), o.group.as_deref())?,
            umask: umask(o.umask.as_deref())?,
            chdir: o.chdir,
            metrics_bind: metrics_addr(o.metrics_bind)?,
            health_live_path: probe_path(
                "health_live_path",
                o.health_live_path.unwrap_or(d.health_live_path),
            )?,
            health_ready_path: probe_path(
                "health_ready_path",
                o.health_ready_path.unwrap_or(d.health_ready_path),
            )?,
            health_startup_path: probe_path(
                "health_startup_path",
                o.health_startup_path.unwrap_or(d.health_startup_path),
            )?,
            loglevel: o.loglevel.unwrap_or(d.loglevel),
            log_format: o.log_format.unwrap_or(d.log_format),
            errorlog: o.errorlog.unwrap_or(d.errorlog),
            accesslog: o.accesslog.filter(|s| !s.is_empty()),
            access_log_format: o.access_log_format.unwrap_or(d.access_log_format),
            reload: o.reload.unwrap_or(d.reload),
            reload_extra_files: o.reload_extra_files.unwrap_or_default(),
            proc_name: o
                .proc_name
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
            raw_env: raw_env(o.raw_env.unwrap_or_default())?,
            app: python_app(o.app, o.command.as_ref().is_some_and(|c| !c.is_empty()))?,
            interface: o.interface.unwrap_or(d.interface),
            command: command(o.command, o.preload.unwrap_or(d.preload))?,
            worker_ready_path: probe_path(
                "worker_ready_path",
                o.worker_ready_path.unwrap_or(d.worker_ready_path),
            )?,
            proxy_upgrades: proxy_upgrades(o.proxy_upgrades.unwrap_or(d.proxy_upgrades))?,
            max_surge: o.max_surge.unwrap_or(d.max_surge),
            max_unavailable: o.max_unavailable.unwrap_or(d.max_unavailable),
            canary: o.canary.unwrap_or(d.canary),
            canary_steps: canary_steps(o.canary_steps.unwrap_or_default())?,
            canary_seconds: seconds(
                "canary_seconds",
                o.canary_seconds.unwrap_or(d.canary_seconds),
            )?,
            canary_min_requests: o.canary_min_requests.unwrap_or(d.canary_min_requests),
            canary_max_error_ratio: ratio(
                "canary_max_error_ratio",
                o.canary_max_error_ratio.unwrap_or(d.canary_max_error_ratio),
            )?,
            canary_max_p99_ratio: ratio(
                "canary_max_p99_ratio",
                o.canary_max_p99_ratio.unwrap_or(d.canary_max_p99_ratio),
            )?,
            canary_no_traffic: o.canary_no_traffic.unwrap_or(d.canary_no_traffic),
            max_connection_age: seconds(
                "max_connection_age",
                o.max_connection_age.unwrap_or(d.max_connection_age),
            )?,
            max_connection_age_jitter: seconds(
                "max_connection_age_jitter",
                o.max_connection_age_jitter
                    .unwrap_or(d.max_connection_age_jitter),
            )?,
            max_connection_age_grace: seconds(
                "max_connection_age_grace",
                o.max_connection_age_grace
                    .unwrap_or(d.max_connection_age_grace),
            )?,
            pass_socket: o.pass_socket.unwrap_or(d.pass_socket),
            worker_ready_delay: seconds(
                "worker_ready_delay",
                o.worker_ready_delay.unwrap_or(d.worker_ready_delay),
            )?,
            worker_stop_signal: stop_signal(
                o.worker_stop_signal.as_deref(),
                &d.worker_stop_signal,
            )?,
        };
        if !settings.pass_socket {
            let own_ports: Vec<u16> = settings
                .bind
                .iter()
                .filter_map(|b| match b {
                    BindAddr::Tcp { port, .. } => Some(*port),
                    _ => None,
                })
                .collect();
            crate::port_arg::check(&settings.command, &own_ports)
                .map_err(|why| ConfigError::invalid("command", why))?;
        }
        Ok(settings)
    }

    /// The heartbeat timeout, or `None` when disabled.
    pub fn timeout(&self) -> Option<Duration> {
        (self.timeout > 0.0).then(|| Duration::from_secs_f64(self.timeout))
    }

    /// The graceful timeout.
    pub fn graceful_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.graceful_timeout)
    }

    /// The boot timeout.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.boot_timeout)
    }

    /// The header read timeout.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_timeout)
    }

    /// The idle timeout on reading a request body, if any.
    pub fn body_timeout(&self) -> Option<Duration> {
        (self.body_timeout > 0.0).then(|| Duration::from_secs_f64(self.body_timeout))
    }

    /// How long a request may take to its response head, if bounded.
    pub fn request_timeout(&self) -> Option<Duration> {
        (self.request_timeout > 0.0).then(|| Duration::from_secs_f64(self.request_timeout))
    }

    /// The least time a request waits before it may be shed, if shedding.
    pub fn max_queue_time(&self) -> Option<Duration> {
        (self.max_queue_time > 0.0).then(|| Duration::from_secs_f64(self.max_queue_time))
    }

    /// The idle timeout on sending a response, if any.
    pub fn send_timeout(&self) -> Option<Duration> {
        (self.send_timeout > 0.0).then(|| Duration::from_secs_f64(self.send_timeout))
    }

    /// The shutdown delay.
    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_delay)
    }

    /// In socket mode, the delay after which a command counts as ready, if
    /// not its own READY=1.
    pub fn worker_ready_delay(&self) -> Option<Duration> {
        (self.worker_ready_delay > 0.0).then(|| Duration::from_secs_f64(self.worker_ready_delay))
    }

    /// The keep-alive idle timeout.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs_f64(self.keepalive)
    }
}

/// Where the settings come from: the layers that a reload re-reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The config file, if any.
    pub config_file: Option<PathBuf>,
    /// Flags and `ZDR_*` variables, as parsed at start.
    pub flags: Options,
    /// Sockets from systemd socket activation; when any, they replace
    /// `bind`.
    pub activated: Vec<BindAddr>,
    /// The settings whose value came from a `ZDR_*` variable: (key,
    /// variable). An error about one names the variable.
    pub from_env: Vec<(String, String)>,
}

impl Sources {
    /// Reads every layer and resolves the settings. Called at start and on
    /// every reload, so an edited config file takes effect on SIGHUP.
    pub fn load(&self) -> Result<Settings, ConfigError> {
        self.load_with_env(&|k| std::env::var(k).ok())
    }

    /// As [`Sources::load`], with the environment given.
    pub fn load_with_env(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let file = match &self.config_file {
            Some(path) => load_file(path)?,
            None => Options::default(),
        };
        let platform = Options::platform(env)?;
        let resolved = Settings::resolve(self.flags.clone().or(file).or(platform));
        let mut settings = resolved.map_err(|e| match e {
            ConfigError::Invalid { name, message } => {
                match self.from_env.iter().find(|(key, _)| key == name) {
                    Some((_, var)) => ConfigError::Invalid {
                        name,
                        message: format!("{message} (from the environment variable {var})"),
                    },
                    None => ConfigError::Invalid { name, message },
                }
            }
            other => other,
        })?;
        if !self.activated.is_empty() {
            settings.bind = self.activated.clone();
        }
        Ok(settings)
    }
}

/// Parses a TOML config file into a layer.
pub fn load_file(path: &Path) -> Result<Options, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    parse_file(path, &text)
}

/// Parses TOML text (from `path`, for messages) into a layer.
pub fn parse_file(path: &Path, text: &str) -> Result<Options, ConfigError> {
    toml::from_str::<Options>(text).map_err(|e| {
        let (line, key) = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let key = text
                    .lines()
                    .nth(line - 1)
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim().trim_matches('"').to_owned())
                    .filter(|k| !k.is_empty() && !k.starts_with('['));
                (Some(line), key)
            }
            None => (None, None),
        };
        let message = in_plain_words(
            &with_suggestion(e.message().trim(), key.as_deref()),
            key.as_deref(),
        );
        ConfigError::File {
            path: path.to_owned(),
            line,
            key,
            message,
        }
    })
}

/// Says a type the parser expected as a person would (`expected usize`:
/// `expected a whole number, as in `workers = 4``).
fn in_plain_words(message: &str, key: Option<&str>) -> String {
    let key = key.unwrap_or("key");
    for (rust, words, example) in [
        ("usize", "a whole number", "4"),
        ("u64", "a whole number", "4"),
        ("u32", "a whole number", "4"),
        ("u16", "a whole number", "4"),
        ("u8", "a whole number", "4"),
        ("i64", "a whole number", "4"),
        ("i32", "a whole number", "4"),
        ("f64", "a number", "2.5"),
        ("f32", "a number", "2.5"),
    ] {
        let said = format!("expected {rust}");
        if let Some(at) = message.find(&said) {
            let end = at + said.len();
            if message[end..].starts_with(|c: char| c.is_alphanumeric()) {
                continue;
            }
            return format!(
                "{}expected {words}, as in `{key} = {example}` (no quotes){}",
                &message[..at],
                &message[end..]
            );
        }
    }
    message.to_owned()
}

/// Adds "did you mean" to an unknown key's message when a setting's key
/// is one or two edits away (`wrkers`, `graceful-timeout`).
fn with_suggestion(message: &str, key: Option<&str>) -> String {
    let nearest = key
        .filter(|_| message.starts_with("unknown field"))
        .and_then(|key| {
            let key = key.replace('-', "_");
            Options::KEYS
                .iter()
                .map(|k| (edit_distance(&key, k), *k))
                .filter(|(d, _)| *d <= 2)
                .min()
        });
    match nearest {
        Some((_, k)) => format!("did you mean `{k}`? {message}"),
        None => message.to_owned(),
    }
}

/// The Levenshtein distance between two short strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

/// A configuration that cannot be used; nothing starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {message}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The config file has a syntax error, an unknown key or a wrong type.
    #[error("{}{}: {}{message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    File {
        /// The file.
        path: PathBuf,
        /// The 1-based line, when known.
        line: Option<usize>,
        /// The key, when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// An environment variable has a bad value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A setting's value is out of range or malformed.
    #[error("setting `{name}`: {message}")]
    Invalid {
        /// The setting, by its config-file key.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn env(name: &'static str, message: impl fmt::Display) -> Self {
        ConfigError::Env {
            name,
            message: message.to_string(),
        }
    }

    fn invalid(name: &'static str, message: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            name,
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(flags: Options, file: Option<PathBuf>) -> Sources {
        Sources {
            from_env: Vec::new(),
            config_file: file,
            flags,
            activated: Vec::new(),
        }
    }

    /// Settings travel from the master to workers that may be of a newer
    /// build (a reload runs the binary now on disk): a field added since
    /// must have a default when absent.
    #[test]
    fn settings_from_an_earlier_master_still_parse() {
        let settings = Settings::resolve(Options::default()).unwrap();
        let mut json = serde_json::to_value(&settings).unwrap();
        let map = json.as_object_mut().unwrap();
        for added in [
            "body_timeout",
            "send_timeout",
            "request_timeout",
            "max_queue_time",
        ] {
            map.remove(added);
        }
        let back: Settings = serde_json::from_value(json).unwrap();
        assert_eq!(back, settings);
    }

    #[test]
    fn defaults_follow_gunicorn() {
        let s = sources(Options::default(), None)
            .load_with_env(&|_| None)
            .unwrap();
        assert_eq!(s.workers, 1);
        assert_eq!(s.backlog, 2048);
        assert_eq!(s.keepalive, 2.0);
        assert_eq!(s.timeout, 30.0);
        assert_eq!(s.bind, vec!["127.0.0.1:8000".parse().unwrap()]);
        assert_eq!(s.access_log_format, DEFAULT_ACCESS_LOG_FORMAT);
    }

    #[test]
    fn platform_variables_sit_below_the_file() {
        let env = |k: &str| match k {
            "PORT" => Some("5000".to_owned()),
            "WEB_CONCURRENCY" => Some("4".to_owned()),
            _ => None,
        };
        let s = sources(Options::default(), None)
            .load_with_env(&env)
            .unwrap();
        assert_eq!(s.bind, vec!["0.0.0.0:5000".parse().unwrap()]);
        assert_eq!(s.workers, 4);

        let dir = std::env::temp_dir().join(format!("zdr-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("zdr.toml");
        std::fs::write(&file, "workers = 2\n").unwrap();
        let s = sources(Options::default(), Some(file.clone()))
            .load_with_env(&env)
            .unwrap();
        assert_eq!(s.workers, 2);
        let flags = Options {
            workers: Some(7),
            ..Options::default()
        };
        let s = sources(flags, Some(file)).load_with_env(&env).unwrap();
        assert_eq!(s.workers, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let err = parse_file(Path::new("zdr.toml"), "workers = 2\n\nwrkers = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "zdr.toml:3: key `wrkers`: did you mean `workers`? unknown field `wrkers`"
            ),
            "{msg}"
        );
    }

    #[test]
    fn a_key_far_from_every_setting_gets_no_suggestion() {
        let err = parse_file(Path::new("zdr.toml"), "worker_class = \"gthread\"\n").unwrap_err();
        assert!(!err.to_string().contains("did you mean"), "{err}");
        assert_eq!(
            edit_distance(
                "graceful-timeout".replace('-', "_").as_str(),
                "graceful_timeout"
            ),
            0
        );
    }

    #[test]
    fn wrong_type_names_key_file_and_line() {
        let err = parse_file(
            Path::new("/etc/zdr.toml"),
            "bind = \"127.0.0.1:1\"\nworkers = \"three\"\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            msg,
            "/etc/zdr.toml:2: key `workers`: invalid type: string \"three\", \
             expected a whole number, as in `workers = 4` (no quotes)"
        );
        let err = parse_file(Path::new("zdr.toml"), "timeout = \"x\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("expected a number, as in `timeout = 2.5` (no quotes)"),
            "{err}"
        );
    }

    #[test]
    fn users_groups_and_umask_resolve() {
        let resolve = |user: Option<&str>, group: Option<&str>, umask: Option<&str>| {
            Settings::resolve(Options {
                user: user.map(Into::into),
                group: group.map(Into::into),
                umask: umask.map(Into::into),
                ..Options::default()
            })
        };
        let s = resolve(Some("root"), None, Some("027")).unwrap();
        assert_eq!((s.run_as, s.umask), (Some((0, 0)), Some(0o27)));
        assert_eq!(
            resolve(Some("1234"), Some("99"), Some("0o022"))
                .unwrap()
                .run_as,
            Some((1234, 99))
        );
        assert_eq!(resolve(None, None, None).unwrap().run_as, None);
        let err = resolve(Some("no-such-user-zdr"), None, None)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "setting `user`: no such user: no-such-user-zdr");
        assert!(resolve(None, None, Some("999")).is_err());
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!("512M".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("2G".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("64kb".parse(), Ok(ByteSize(64 << 10)));
        assert_eq!("1000".parse(), Ok(ByteSize(1000)));
        assert!("lots".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        let o = parse_file(Path::new("f"), "max_worker_memory = \"1G\"\n").unwrap();
        assert_eq!(o.max_worker_memory, Some(MemorySize(1 << 30)));
    }

    #[test]
    fn a_memory_limit_without_a_unit_below_a_mebibyte_is_refused_with_the_fix() {
        // A flag or variable.
        let e = "512".parse::<MemorySize>().unwrap_err();
        assert!(e.contains("give a unit, like 512M"), "{e}");
        assert_eq!("512M".parse(), Ok(MemorySize(512 << 20)));
        assert_eq!(
            "512K".parse(),
            Ok(MemorySize(512 << 10)),
            "a unit says it was meant"
        );
        assert_eq!("0".parse(), Ok(MemorySize(0)), "off");
        assert_eq!("2000000".parse(), Ok(MemorySize(2_000_000)));
        // The file, as a number or a string: the file, line and key named.
        for text in [
            "workers = 2\nmax_worker_memory = 512\n",
            "workers = 2\nmax_worker_memory = \"512\"\n",
        ] {
            let e = parse_file(Path::new("zdr.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("zdr.toml:2: key `max_worker_memory`: ") && e.contains("512M"),
                "{e}"
            );
        }
    }

    #[test]
    fn bind_accepts_a_string_or_a_list() {
        let o = parse_file(
            Path::new("f"),
            "bind = \"unix:/tmp/x.sock\"\npreload_app = true\n",
        )
        .unwrap();
        assert_eq!(o.bind, Some(vec!["unix:/tmp/x.sock".to_owned()]));
        assert_eq!(o.preload, Some(true));
        let o = parse_file(Path::new("f"), "bind = [\"[::1]:80\", \"fd://3\"]\n").unwrap();
        assert_eq!(o.bind.map(|b| b.len()), Some(2));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let o = Options {
            bind: Some(vec!["nonsense:port".to_owned()]),
            ..Options::default()
        };
        let msg = Settings::resolve(o).unwrap_err().to_string();
        assert!(msg.starts_with("setting `bind`:"), "{msg}");
        let o = Options {
            workers: Some(0),
            ..Options::default()
        };
        assert_eq!(
            Settings::resolve(o).unwrap_err().to_string(),
            "setting `workers`: must be at least 1"
        );
        let o = Options {
            graceful_timeout: Some(-1.0),
            ..Options::default()
        };
        assert!(Settings::resolve(o).is_err());
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// `zdr.toml.example` parses and states exactly the defaults.
    #[test]
    fn example_config_is_valid_and_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("zdr.toml.example");
        let example = Settings::resolve(load_file(&path).unwrap()).unwrap();
        let defaults = Settings::resolve(Options::default()).unwrap();
        assert_eq!(example, defaults);
    }

    /// Every setting has its own entry in `zdr.toml.example`, set or
    /// commented out (`key = ...` or `# key = ...`).
    #[test]
    fn example_config_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("zdr.toml.example");
        let text = std::fs::read_to_string(&path).unwrap();
        let documented: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start_matches('#').trim().split_once(" = "))
            .map(|(key, _)| key.trim())
            .collect();
        let missing: Vec<&str> = Options::KEYS
            .iter()
            .copied()
            .filter(|key| !documented.contains(key))
            .collect();
        assert!(missing.is_empty(), "zdr.toml.example lacks {missing:?}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// Mutations of `zdr.toml.example` parse or fail with an error, never
    /// panic. Run longer with ZDR_FUZZ_ITERATIONS=1000000.
    #[test]
    fn mutated_config_files_never_panic() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("zdr.toml.example");
        let seed = std::fs::read(&path).unwrap();
        let iterations: usize = std::env::var("ZDR_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"=\"'[]{},.#\n -_0123456789abcdefxyzMGK:/\\\xc3\xa9";
        for _ in 0..iterations {
            let mut text = seed.clone();
            for _ in 0..1 + next() % 8 {
                let i = (next() as usize) % text.len().max(1);
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if !text.is_empty() => text[i] = byte,
                    1 => text.insert(i.min(text.len()), byte),
                    _ if !text.is_empty() => {
                        text.remove(i);
                    }
                    _ => {}
                }
            }
            let text = String::from_utf8_lossy(&text);
            if let Ok(options) = parse_file(Path::new("fuzz.toml"), &text) {
                let _ = Settings::resolve(options);
            }
        }
    }
}
