//! The requests a worker has begun and not ended, named in shared memory,
//! so that the master can say what a worker it kills at `--timeout` was
//! doing — even a worker that cannot run (stopped, or stuck in a handler).
//!
//! Each worker has [`RECENT`] entries. A request takes the entry its
//! number picks (number mod [`RECENT`]) and leaves it when it ends, so the
//! table names the most recently begun requests still in flight: with more
//! than [`RECENT`] in flight, older ones give way to newer. That is the
//! right choice for a worker that stopped making progress: whatever hangs
//! it began last, since nothing begins after.
//!
//! Writing is lock-free and cheap (a compare-and-swap and eight stores per
//! request): the entry's number is its guard. A writer claims an entry by
//! swapping its number for a marker, writes, then publishes its own
//! number; a reader keeps an entry only if its number was the same, and a
//! request's, before and after reading it. A request that finds its entry claimed by
//! another thread (only with `--threads` above 1 and more than [`RECENT`]
//! in flight) goes unnamed rather than wait.

use std::sync::atomic::{AtomicU64, Ordering};

/// How many in-flight requests a worker's entry names at most.
pub const RECENT: usize = 8;
/// The words of text an entry keeps: the method, a space and the path,
/// cut at [`TEXT_LEN`] bytes.
const WORDS: usize = 6;
/// The longest text an entry keeps.
const TEXT_LEN: usize = WORDS * 8;
/// An entry's number while a writer fills it.
const WRITING: u64 = u64::MAX;

/// One request's record.
#[repr(C, align(64))]
struct Entry {
    /// The request's number in its worker (from 1); 0 while the entry is
    /// free, [`WRITING`] while it is being written.
    number: AtomicU64,
    /// When it began, in milliseconds of the monotonic clock, shifted
    /// left 8 bits, with the text's length in the low 8.
    began_len: AtomicU64,
    text: [AtomicU64; WORDS],
}

/// A worker's in-flight requests, as it names them.
#[repr(C)]
pub struct Begun {
    entries: [Entry; RECENT],
}

/// A request in flight, as its worker named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// When it began, in milliseconds of the monotonic clock.
    pub began_ms: u64,
    /// Its method and path (`GET /report`), cut to 48 bytes.
    pub what: String,
}

impl Begun {
    /// Names request `number` (from 1), begun at `began_ms`, as `method`
    /// and `path`, until [`Begun::end`] with the same number.
    pub fn begin(&self, number: u64, began_ms: u64, method: &str, path: &str) {
        let entry = &self.entries[(number % RECENT as u64) as usize];
        let held = entry.number.load(Ordering::Relaxed);
        if held == WRITING
            || entry
                .number
                .compare_exchange(held, WRITING, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // `METHOD /path`, the path cut on a character boundary to fit.
        let mut text = [0u8; TEXT_LEN];
        let method = &method.as_bytes()[..method.len().min(TEXT_LEN - 1)];
        text[..method.len()].copy_from_slice(method);
        text[method.len()] = b' ';
        let start = method.len() + 1;
        let mut take = path.len().min(TEXT_LEN - start);
        if take < path.len() {
            while !path.is_char_boundary(take) {
                take -= 1;
            }
        }
        text[start..start + take].copy_from_slice(&path.as_bytes()[..take]);
        let len = start + take;
        // Only the words the text reaches: the reader stops at its length.
        for (word, bytes) in entry
            .text
            .iter()
            .zip(text.chunks_exact(8))
            .take(len.div_ceil(8))
        {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            word.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        entry
            .began_len
            .store((began_ms << 8) | len as u64, Ordering::Relaxed);
        entry.number.store(number.max(1), Ordering::Release);
    }

    /// Request `number` ended: its entry is free, unless a newer request
    /// took it meanwhile.
    pub fn end(&self, number: u64) {
        let entry = &self.entries[(number % RECENT as u64) as usize];
        let _ =
            entry
                .number
                .compare_exchange(number.max(1), 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Frees every entry (for a slot about to serve a new worker).
    pub fn clear(&self) {
        for entry in &self.entries {
            entry.number.store(0, Ordering::Relaxed);
        }
    }

    /// The requests named now, oldest first.
    pub fn named(&self) -> Vec<Named> {
        let mut named: Vec<Named> = self
            .entries
            .iter()
            .filter_map(|entry| {
                let before = entry.number.load(Ordering::Acquire);
                if before == 0 || before == WRITING {
                    return None;
                }
                let began_len = entry.began_len.load(Ordering::Relaxed);
                let mut text = [0u8; TEXT_LEN];
                for (bytes, word) in text.chunks_exact_mut(8).zip(&entry.text) {
                    bytes.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
                }
                std::sync::atomic::fence(Ordering::Acquire);
                if entry.number.load(Ordering::Relaxed) != before {
                    return None;
                }
                let len = ((began_len & 0xff) as usize).min(TEXT_LEN);
                Some(Named {
                    began_ms: began_len >> 8,
                    what: String::from_utf8_lossy(&text[..len]).into_owned(),
                })
            })
            .collect();
        named.sort_by_key(|n| n.began_ms);
        named
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Box<Begun> {
        Box::new(Begun {
            entries: std::array::from_fn(|_| Entry {
                number: AtomicU64::new(0),
                began_len: AtomicU64::new(0),
                text: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        })
    }

    #[test]
    fn a_request_is_named_until_it_ends() {
        let t = table();
        t.begin(1, 5_000, "GET", "/report");
        t.begin(2, 4_000, "POST", "/upload");
        assert_eq!(
            t.named(),
            vec![
                Named {
                    began_ms: 4_000,
                    what: "POST /upload".into()
                },
                Named {
                    began_ms: 5_000,
                    what: "GET /report".into()
                },
            ]
        );
        t.end(2);
        assert_eq!(t.named().len(), 1);
        t.end(1);
        assert!(t.named().is_empty());
    }

    #[test]
    fn a_newer_request_takes_the_entry_and_the_older_end_leaves_it() {
        let t = table();
        t.begin(3, 1, "GET", "/old");
        t.begin(3 + RECENT as u64, 2, "GET", "/new");
        t.end(3);
        let named = t.named();
        assert_eq!(named.len(), 1);
        assert_eq!(named[0].what, "GET /new");
        t.end(3 + RECENT as u64);
        assert!(t.named().is_empty());
    }

    #[test]
    fn a_long_path_is_cut_on_a_character_boundary() {
        let t = table();
        let path = format!("/{}", "é".repeat(40));
        t.begin(1, 7, "GET", &path);
        let what = &t.named()[0].what;
        assert!(what.len() <= TEXT_LEN, "{what}");
        assert!(what.starts_with("GET /é"), "{what}");
        assert!(!what.contains('\u{fffd}'), "{what}");
    }

    #[test]
    fn clear_frees_every_entry() {
        let t = table();
        for n in 1..=RECENT as u64 {
            t.begin(n, n, "GET", "/");
        }
        assert_eq!(t.named().len(), RECENT);
        t.clear();
        assert!(t.named().is_empty());
    }
}
