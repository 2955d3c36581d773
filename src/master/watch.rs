//! `--reload`, for development: watches the server's executable, its
//! config file and any `--reload-extra-file`, and asks for a reload when
//! one of them changes and has settled, so that `cargo build` in another
//! terminal deploys with zdr's readiness gate and no refused connection.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// What a file looked like: enough to see a rebuild or an edit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn look(path: &PathBuf) -> Option<Seen> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Seen {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// The files watched, as last seen.
pub(crate) struct Watch {
    files: Vec<(PathBuf, Option<Seen>)>,
    /// A change seen, waiting to settle: the file and when.
    pending: Option<(usize, Instant)>,
    next_look: Instant,
}

/// How long a changed file must stay unchanged before the reload (a build
/// may write it in several steps).
const SETTLE: Duration = Duration::from_millis(300);

impl Watch {
    /// Watches `files` from now on.
    pub(crate) fn new(files: Vec<PathBuf>) -> Watch {
        Watch {
            files: files
                .into_iter()
                .map(|f| {
                    let seen = look(&f);
                    (f, seen)
                })
                .collect(),
            pending: None,
            next_look: Instant::now(),
        }
    }

    /// The file that changed and settled since the last call, if any.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<PathBuf> {
        if now < self.next_look {
            return None;
        }
        self.next_look = now + Duration::from_millis(100);
        let mut changed = None;
        for (i, (path, seen)) in self.files.iter_mut().enumerate() {
            let current = look(path);
            if current != *seen {
                *seen = current;
                changed = Some(i);
            }
        }
        match (changed, self.pending) {
            (Some(i), _) => {
                // Changed (again): wait for it to settle.
                self.pending = Some((i, now));
                None
            }
            (None, Some((i, since))) if now >= since + SETTLE => {
                self.pending = None;
                Some(self.files[i].0.clone())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once_it_has_settled() {
        let dir = std::env::temp_dir().join(format!("zdr-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app");
        std::fs::write(&file, "one").unwrap();
        let t0 = Instant::now();
        let mut w = Watch::new(vec![file.clone()]);
        assert_eq!(w.poll(t0), None);
        std::fs::write(&file, "two, longer").unwrap();
        assert_eq!(w.poll(t0 + Duration::from_millis(200)), None, "not settled");
        assert_eq!(w.poll(t0 + Duration::from_millis(400)), None, "not settled");
        assert_eq!(w.poll(t0 + Duration::from_millis(600)), Some(file.clone()));
        assert_eq!(
            w.poll(t0 + Duration::from_millis(800)),
            None,
            "reported once"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
