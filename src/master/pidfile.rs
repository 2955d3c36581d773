//! The pidfile: written when the master is up, removed when it exits.

use std::io;
use std::path::{Path, PathBuf};

/// A pidfile this process wrote.
pub(crate) struct Pidfile {
    path: PathBuf,
}

impl Pidfile {
    /// Writes this process's pid to `path`. Fails if the file names another
    /// live process (a server already running).
    pub(crate) fn create(path: &Path) -> io::Result<Pidfile> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let me = std::process::id() as i32;
                let alive = pid > 0
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if pid != me && !alive {
                    tracing::warn!(
                        event = crate::logging::LogEvent::MasterFiles.name(),
                        "pidfile {} named pid {pid}, which is gone: taking it over",
                        path.display()
                    );
                }
                if pid != me && alive {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "pidfile {} names running process {pid}: already running?",
                            path.display()
                        ),
                    ));
                }
            }
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot write pidfile {}: {e}", path.display()),
                )
            })?;
        Ok(Pidfile {
            path: path.to_owned(),
        })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it still names this process.
    pub(crate) fn remove(&self) {
        let ours = std::fs::read_to_string(&self.path)
            .map(|t| t.trim() == std::process::id().to_string())
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
