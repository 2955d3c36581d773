//! A worker's stderr, piped through the master: forwarded line by line to
//! the error log, with the last few lines kept to explain a failure.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

const TAIL_LINES: usize = 5;
const MAX_LINE: usize = 4096;

/// The read end of one worker's stderr.
pub(crate) struct Output {
    fd: OwnedFd,
    partial: Vec<u8>,
    tail: VecDeque<String>,
}

impl Output {
    /// Makes the pipe: `(master's end, worker's stderr)`.
    pub(crate) fn pipe() -> io::Result<(Output, OwnedFd)> {
        use nix::fcntl::OFlag;
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        )?;
        Ok((
            Output {
                fd: r,
                partial: Vec::new(),
                tail: VecDeque::new(),
            },
            w,
        ))
    }

    /// The descriptor to poll.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads what is there, forwarding whole lines to the error log.
    pub(crate) fn pump(&mut self) {
        let mut buf = [0u8; 8192];
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
            }
            while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                self.line(&line);
            }
            if self.partial.len() > MAX_LINE {
                let line = std::mem::take(&mut self.partial);
                self.line(&line);
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        crate::logging::write_raw(line);
        let text = String::from_utf8_lossy(line).trim_end().to_owned();
        if !text.is_empty() {
            if self.tail.len() == TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(text);
        }
    }

    /// Reads the rest (the worker has exited) and returns its last lines.
    pub(crate) fn finish(mut self) -> Vec<String> {
        self.pump();
        if !self.partial.is_empty() {
            let mut line = std::mem::take(&mut self.partial);
            line.push(b'\n');
            self.line(&line);
        }
        self.tail.into()
    }
}

impl Output {
    /// Rebuilds the master's end from a descriptor handed over across exec.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that this process owns and that
    /// nothing else closes or adopts.
    pub(crate) unsafe fn adopt(fd: std::os::fd::RawFd) -> io::Result<Output> {
        use std::os::fd::FromRawFd;
        // SAFETY: the previous image of this master owned the descriptor
        // and handed it over across exec; nothing else here uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        crate::sys::set_cloexec(fd.as_raw_fd(), true)?;
        Ok(Output {
            fd,
            partial: Vec::new(),
            tail: VecDeque::new(),
        })
    }
}
