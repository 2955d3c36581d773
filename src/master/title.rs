//! Process titles, as Gunicorn (setproctitle) and nginx show them: `ps`
//! lists `zdr: master [NAME] serve …` and `zdr: worker [NAME] gen N`.
//!
//! An exec'd worker gets its title as its `argv[0]`. The master gets its
//! own by re-executing itself in place once at startup, with the title as
//! `argv[0]` and its arguments unchanged (its pid, environment and
//! inherited descriptors stay), so no process memory is rewritten. A
//! worker forked by `--preload` keeps the master's command line.

use std::ffi::OsString;
use std::path::Path;

/// What every master title starts with.
const MASTER: &str = "zdr: master";

/// The master's title.
pub(crate) fn master(name: &str) -> String {
    format!("{MASTER} [{name}]")
}

/// A worker's title.
pub(crate) fn worker(name: &str, generation: u64) -> String {
    format!("zdr: worker [{name}] gen {generation}")
}

/// Marks the image that [`retitle`] started, so that it does not start
/// another: a wrapper such as valgrind may give it a different `argv[0]`.
const RETITLED_ENV: &str = "ZDR_RETITLED";

/// Re-executes this process as `exe`, with `args[0]` replaced by the
/// master's title; returns only when it could not (then the process runs
/// on untitled). Does nothing in the image it started, nor in a binary
/// upgrade's (whose `argv[0]` is already the title).
pub(crate) fn retitle(exe: &Path, name: &str, args: &[OsString]) {
    if std::env::var_os(RETITLED_ENV).is_some() {
        // The master is single-threaded: changing its environment is safe.
        std::env::remove_var(RETITLED_ENV);
        return;
    }
    if args
        .first()
        .is_some_and(|a| a.to_string_lossy().starts_with(MASTER))
        || super::upgrade::is_handover()
    {
        return;
    }
    let mut titled = args.to_vec();
    match titled.first_mut() {
        Some(first) => *first = master(name).into(),
        None => return,
    }
    std::env::set_var(RETITLED_ENV, "1");
    let err = crate::sys::exec_in_place(exe, &titled);
    std::env::remove_var(RETITLED_ENV);
    tracing::debug!("no process title: cannot execute {}: {err}", exe.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_read_as_gunicorns() {
        assert_eq!(master("shop"), "zdr: master [shop]");
        assert_eq!(worker("shop", 3), "zdr: worker [shop] gen 3");
    }
}
