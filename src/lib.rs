//! zdr: a pre-fork HTTP application server for Rust, in the manner of
//! Gunicorn, whose reloads never drop a request.
//!
//! A master process binds every listening socket once and starts worker
//! processes that inherit them; each worker serves HTTP/1.1 and HTTP/2 with
//! hyper on its own tokio runtime. SIGHUP rolls out a new generation of
//! workers and drains the old one only when every new worker is ready.
//!
//! An app hands zdr its service with [`Server`] and its `main` becomes a
//! complete zdr server with the whole command line:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     zdr::Server::new("my-app")
//!         .service(|_: std::sync::Arc<()>| async {
//!             Ok(axum::Router::new().route("/", axum::routing::get(|| async { "hello" })))
//!         })
//!         .run()
//! }
//! ```
//!
//! The public API is what an app's `main` needs: [`Server`] and the types
//! its service sees ([`Request`], [`RequestBody`], [`Response`], [`Body`],
//! [`WorkerInfo`], [`ClientInfo`], and [`BoxError`] for every step's
//! errors); and [`control`], the control-socket protocol, for tools that
//! command a running server. The `zdr` binary is this library serving a
//! built-in demo app. ARCHITECTURE.md maps the rest.

#![warn(missing_docs, missing_debug_implementations)]

mod app;
mod balance;
mod body;
mod boot;
mod cgroup;
mod cli;
mod client;
mod command;
mod config;
pub mod control;
mod forwarded;
mod handoff;
mod http;
mod listener;
mod logging;
mod master;
mod metrics;
mod port_arg;
mod process_tree;
#[cfg(feature = "python")]
mod python;
mod recycle;
mod response_body;
mod scoreboard;
mod server;
mod stall;
mod sys;
#[cfg(test)]
mod test_rng;
mod tls;
mod worker;
mod worker_info;

pub use app::{Body, BoxError, Request, Response, WorkerInfo};
pub use body::{BodyTooLarge, RequestBody};
pub use forwarded::ClientInfo;
pub use server::Server;
