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
//! Layout, bottom up (ARCHITECTURE.md has the whole map): [`config`]
//! (settings and their sources), [`listener`] (binding and inheriting
//! sockets), [`scoreboard`] (the shared memory between master and
//! workers), [`http`] (serving a connection), `worker` (a worker process),
//! `master` (the arbiter: an I/O-free decider and the loop that carries out
//! its decisions), `cli`, and [`Server`] on top; [`logging`], [`metrics`],
//! [`control`] beside them, and [`demo`], the built-in demo app.

#![warn(missing_docs)]

mod app;
mod body;
mod cli;
mod client;
pub mod config;
pub mod control;
pub mod demo;
mod forwarded;
pub mod http;
pub mod listener;
pub mod logging;
mod master;
pub mod metrics;
mod recycle;
pub mod scoreboard;
mod server;
mod stall;
mod sys;
mod tls;
mod worker;

pub use app::{Body, BoxError, Request, Response, WorkerInfo};
pub use body::{BodyTooLarge, RequestBody};
pub use forwarded::ClientInfo;
pub use server::Server;
