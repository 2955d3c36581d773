//! What each generation holds that the decider need not see (its preloaded
//! app, its pinned executable), loading the configuration of a new one,
//! and the listening sockets they bind.

use std::sync::Arc;

use tracing::{info, warn};

use super::spawn::Executable;
use super::Master;
use crate::app::LoadedApp;
use crate::config::Settings;
use crate::listener::{BindAddr, Listener};

/// One generation's resources.
pub(crate) struct Resources {
    pub(crate) settings: Arc<Settings>,
    /// The app loaded in the master, with `--preload`.
    pub(crate) app: Option<Arc<LoadedApp>>,
    /// The executable its workers run, without `--preload`.
    pub(crate) exe: Option<Arc<Executable>>,
    /// The process that imported its Python app and forks its workers,
    /// with `--preload`.
    #[cfg(feature = "python")]
    pub(crate) python: Option<super::loader::PyLoader>,
}

/// The generations the master may still start workers of.
#[derive(Default)]
pub(crate) struct Generations(Vec<(u64, Resources)>);

impl Generations {
    /// Records generation `id`'s resources.
    pub(crate) fn insert(&mut self, id: u64, resources: Resources) {
        self.remove(id);
        self.0.push((id, resources));
    }

    /// Replaces generation `id`'s loader.
    #[cfg(feature = "python")]
    fn set_loader(&mut self, id: u64, loader: super::loader::PyLoader) {
        if let Some((_, r)) = self.0.iter_mut().find(|(g, _)| *g == id) {
            r.python = Some(loader);
        }
    }

    /// The master's ends of the loaders' sockets.
    pub(crate) fn loader_fds(&self) -> Vec<std::os::fd::RawFd> {
        #[cfg(feature = "python")]
        return self
            .0
            .iter()
            .filter_map(|(_, r)| r.python.as_ref().map(super::loader::PyLoader::fd))
            .collect();
        #[cfg(not(feature = "python"))]
        Vec::new()
    }

    /// The loaders' pids.
    pub(crate) fn loader_pids(&self) -> Vec<nix::unistd::Pid> {
        #[cfg(feature = "python")]
        return self
            .0
            .iter()
            .filter_map(|(_, r)| r.python.as_ref().map(super::loader::PyLoader::pid))
            .collect();
        #[cfg(not(feature = "python"))]
        Vec::new()
    }

    /// Drops generation `id`'s resources.
    pub(crate) fn remove(&mut self, id: u64) {
        self.0.retain(|(g, _)| *g != id);
    }

    /// Generation `id`'s resources.
    pub(crate) fn get(&self, id: u64) -> Option<&Resources> {
        self.0.iter().find(|(g, _)| *g == id).map(|(_, r)| r)
    }

    /// Whether any generation binds `addr`.
    fn binds(&self, addr: &BindAddr) -> bool {
        self.0.iter().any(|(_, r)| r.settings.bind.contains(addr))
    }
}

impl Master {
    /// Loads the configuration for a new generation: checks its
    /// certificate, binds the listeners it adds and, with `--preload`,
    /// loads the app. On success the generation's resources are kept under
    /// `id`; on failure nothing changes and the reason is returned.
    pub(super) fn prepare(&mut self, id: u64) -> Result<Arc<Settings>, String> {
        let settings = match self.sources.load() {
            Ok(s) => Arc::new(s),
            Err(e) => return Err(format!("Reload aborted, configuration unchanged: {e}")),
        };
        if let Err(e) = crate::tls::acceptor(&settings) {
            return Err(format!("Reload aborted, the old certificate stays: {e:#}"));
        }
        for addr in &settings.bind {
            if !self.listeners.iter().any(|l| &l.addr == addr) {
                match Listener::bind(addr, settings.backlog) {
                    Ok(l) => {
                        let tls = settings.certfile.is_some();
                        info!(
                            event = crate::logging::LogEvent::Listening.name(),
                            "Listening at: {} ({})",
                            l.url(tls),
                            self.pid
                        );
                        self.listeners.push(l);
                    }
                    Err(e) => {
                        self.prune_listeners();
                        return Err(format!("Reload aborted: {e}"));
                    }
                }
            }
        }
        if let Err(e) = self.follow_metrics_bind(&settings) {
            self.prune_listeners();
            return Err(format!("Reload aborted: {e}"));
        }
        if let Err(e) = self.add_generation(id, Arc::clone(&settings)) {
            self.prune_listeners();
            return Err(format!("Reload aborted: {e:#}"));
        }
        Ok(settings)
    }

    /// Moves the metrics endpoint to the new configuration's
    /// `metrics_bind`, if it changed.
    fn follow_metrics_bind(&mut self, settings: &Settings) -> Result<(), String> {
        if settings.metrics_bind == self.metrics_bind {
            return Ok(());
        }
        self.scrape = match &settings.metrics_bind {
            Some(addr) => {
                let scrape = super::scrape::ScrapeServer::bind(addr)
                    .map_err(|e| format!("cannot serve metrics at {addr}: {e}"))?;
                info!(
                    event = crate::logging::LogEvent::MasterEndpoint.name(),
                    "Metrics at: http://{}/metrics",
                    scrape.local_addr()
                );
                Some(scrape)
            }
            None => {
                info!(
                    event = crate::logging::LogEvent::MasterEndpoint.name(),
                    "Metrics endpoint closed"
                );
                None
            }
        };
        self.metrics_bind = settings.metrics_bind.clone();
        Ok(())
    }

    /// Keeps generation `id`'s resources: its app, loaded here with
    /// `--preload` (a Python app: by a loader of its own), or else its
    /// executable, pinned now.
    pub(super) fn add_generation(
        &mut self,
        id: u64,
        settings: Arc<Settings>,
    ) -> anyhow::Result<()> {
        let mut resources = Resources {
            settings: Arc::clone(&settings),
            app: None,
            exe: None,
            #[cfg(feature = "python")]
            python: None,
        };
        if settings.preload && !settings.app.is_empty() {
            #[cfg(feature = "python")]
            {
                resources.python = Some(self.start_loader(id, &settings, &[])?);
            }
        } else if settings.preload {
            let app = (self.loader)().map_err(|e| e.context("the app failed to load"))?;
            if let Some(n) = super::spawn::thread_count().filter(|n| *n > 1) {
                warn!(event = crate::logging::LogEvent::PreloadThreads.name(), "The app's load step left {n} threads running in the master; forked workers get only the calling thread");
            }
            resources.app = Some(Arc::new(app));
        } else {
            resources.exe = Some(Arc::new(Executable::pin(&self.exe)));
        }
        self.generations.insert(id, resources);
        Ok(())
    }

    /// Starts the loader of a generation that preloads a Python app: it
    /// keeps the generation's listeners and the handoff queue, and none of
    /// the master's other descriptors (nor `also_close`).
    #[cfg(feature = "python")]
    fn start_loader(
        &self,
        id: u64,
        settings: &Arc<Settings>,
        also_close: &[std::os::fd::RawFd],
    ) -> anyhow::Result<super::loader::PyLoader> {
        use std::os::fd::AsRawFd;
        let mut keep: Vec<std::os::fd::RawFd> = self
            .listeners
            .iter()
            .filter(|l| settings.bind.contains(&l.addr))
            .map(|l| l.fd.as_raw_fd())
            .collect();
        keep.extend(self.handoff.iter().flat_map(crate::handoff::Pair::raw_fds));
        let mut close = self.own_fds();
        close.retain(|fd| !keep.contains(fd));
        close.extend_from_slice(also_close);
        super::loader::PyLoader::start(super::loader::LoaderParts {
            settings: Arc::clone(settings),
            board: Arc::clone(&self.board),
            bell_fd: self.bell.raw_fd(),
            signals: &self.signals,
            close,
            app_loader: &self.loader,
            master_pid: self.pid,
            generation: id,
        })
        .map_err(|why| anyhow::anyhow!("{why}"))
    }

    /// Starts a worker of generation `id` through its loader, when it has
    /// one; gives `stderr` back when it has none. A loader found gone (the
    /// kernel's OOM killer picks large processes) is started again, which
    /// imports the app again, as a worker that is not preloaded would;
    /// `output` (the master's end of the worker's stderr) is not its to
    /// keep.
    pub(super) fn spawn_by_loader(
        &mut self,
        id: u64,
        spec: &crate::boot::WorkerSpec,
        stderr: std::os::fd::OwnedFd,
        output: std::os::fd::RawFd,
    ) -> Result<std::io::Result<nix::unistd::Pid>, std::os::fd::OwnedFd> {
        #[cfg(feature = "python")]
        if let Some(resources) = self.generations.get(id) {
            if let Some(loader) = &resources.python {
                let e = match loader.spawn(spec, &stderr) {
                    Err(e) if super::loader::PyLoader::is_gone(&e) => e,
                    spawned => return Ok(spawned),
                };
                warn!(
                    event = crate::logging::LogEvent::WorkerTrouble.name(),
                    "The loader of generation {id} (pid: {}) is gone ({e}); starting another, \
                     which imports {} again",
                    loader.pid(),
                    resources.settings.app
                );
                let settings = Arc::clone(&resources.settings);
                use std::os::fd::AsRawFd;
                return Ok(
                    match self.start_loader(id, &settings, &[output, stderr.as_raw_fd()]) {
                        Ok(loader) => {
                            let spawned = loader.spawn(spec, &stderr);
                            self.generations.set_loader(id, loader);
                            spawned
                        }
                        Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
                    },
                );
            }
        }
        let _ = (id, spec, output);
        Err(stderr)
    }

    /// Closes listeners that no generation binds any more.
    pub(super) fn prune_listeners(&mut self) {
        let (keep, close): (Vec<_>, Vec<_>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| self.generations.binds(&l.addr));
        for l in close {
            info!(
                event = crate::logging::LogEvent::Listening.name(),
                "Closing listener {}",
                l.display_addr()
            );
            l.remove_socket_file();
        }
        self.listeners = keep;
    }
}
