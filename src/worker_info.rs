//! The facts about the worker process the code runs in ([`WorkerInfo`]):
//! its pid, generation and master, and the signals an app holding a
//! connection past its upgrade waits for (the worker draining, the
//! connection's age). Read by the app and by the log alike, so it depends
//! on neither.

use std::future::Future;
use std::sync::OnceLock;

/// Facts about the worker process the code is running in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The worker's pid.
    pub pid: u32,
    /// The generation the worker belongs to; each reload starts a new one.
    pub generation: u64,
    /// The pid of the master that started it.
    pub master_pid: u32,
}

static WORKER_INFO: OnceLock<WorkerInfo> = OnceLock::new();

/// Becomes `true` when the worker starts draining.
static DRAINING: OnceLock<tokio::sync::watch::Receiver<bool>> = OnceLock::new();

impl WorkerInfo {
    /// Resolves when this worker starts draining (a reload, a stop, its
    /// request limit): zdr stops accepting and closes its idle connections,
    /// but cannot close one the app took over by an upgrade (a WebSocket)
    /// without breaking it, so the app closes it then, with its own
    /// protocol. Outside a zdr worker, never resolves.
    pub fn draining() -> impl Future<Output = ()> + Send + 'static {
        let rx = DRAINING.get().cloned();
        async move {
            match rx {
                // A dropped sender means the worker is leaving too.
                Some(mut rx) => drop(rx.wait_for(|d| *d).await),
                None => std::future::pending().await,
            }
        }
    }

    /// As [`WorkerInfo::draining`], or when `client`'s connection passes
    /// its maximum age (`--max-connection-age`), whichever comes first:
    /// what an app holding an upgraded connection waits for to close it.
    pub fn draining_or_aged(
        client: &crate::forwarded::ClientInfo,
    ) -> impl Future<Output = ()> + Send + 'static {
        let expires = client.connection_expires;
        let draining = WorkerInfo::draining();
        async move {
            match expires {
                Some(at) => {
                    tokio::select! {
                        () = draining => {}
                        () = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => draining.await,
            }
        }
    }

    /// Gives [`WorkerInfo::draining`] the worker's drain signal.
    pub(crate) fn set_draining(rx: tokio::sync::watch::Receiver<bool>) {
        let _ = DRAINING.set(rx);
    }

    /// The current worker's facts, or `None` outside a zdr worker.
    pub fn current() -> Option<WorkerInfo> {
        WORKER_INFO.get().copied()
    }

    pub(crate) fn set(info: WorkerInfo) {
        let _ = WORKER_INFO.set(info);
    }
}
