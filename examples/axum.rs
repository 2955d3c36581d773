//! An axum app served by zdr.
//!
//! ```sh
//! cargo run --example axum -- serve --workers 2 --bind 127.0.0.1:8000
//! curl localhost:8000/hello/world
//! curl localhost:8000/whoami
//! kill -HUP <master pid>   # rolling reload
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Extension;
use axum::Router;

/// Built once per worker (or once in the master with `--preload`).
struct Config {
    greeting: String,
}

/// Per-worker state, built inside the worker's runtime.
#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    hits: Arc<AtomicU64>,
}

async fn hello(State(state): State<AppState>, Path(name): Path<String>) -> String {
    let n = state.hits.fetch_add(1, Ordering::Relaxed) + 1;
    let worker = zdr::WorkerInfo::current().map(|w| w.pid).unwrap_or(0);
    format!(
        "{}, {name}! (request {n} of worker {worker})\n",
        state.config.greeting
    )
}

/// The request's client, which zdr hands to an app that asks for it
/// (`Server::client_info`): the peer, or what a trusted proxy's forwarding
/// headers say.
async fn whoami(Extension(client): Extension<zdr::ClientInfo>) -> String {
    let addr = client
        .addr
        .map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    format!("you are {addr} over {}\n", client.scheme)
}

fn main() -> std::process::ExitCode {
    zdr::Server::new("axum-example")
        .version(env!("CARGO_PKG_VERSION"))
        // Every request carries its zdr::ClientInfo (see `whoami`).
        .client_info()
        .load(|| {
            Ok(Config {
                greeting: std::env::var("GREETING").unwrap_or_else(|_| "Hello".into()),
            })
        })
        .service(|config: Arc<Config>| async move {
            let state = AppState {
                config,
                hits: Arc::new(AtomicU64::new(0)),
            };
            Ok(Router::new()
                .route("/", get(|| async { "axum on zdr\n" }))
                .route("/hello/{name}", get(hello))
                .route("/whoami", get(whoami))
                .with_state(state))
        })
        // A real app would check its database here; a worker only takes
        // traffic once this passes.
        .ready(|_config: Arc<Config>| async { Ok(()) })
        .run()
}
