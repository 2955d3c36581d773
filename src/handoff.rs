//! Handing an idle HTTP/1.1 connection from a leaving worker to one that
//! stays, so that recycling (`--max-requests`), scaling down and reloads
//! close no keep-alive connection: the client keeps its connection and its
//! next request is answered by another process (on a reload, by the new
//! generation).
//!
//! The server has one queue: a datagram socket pair the master makes once
//! and every worker inherits, as it inherits the listening sockets. A
//! leaving worker sends a connection's socket (`SCM_RIGHTS`) with the bytes
//! already read past its last request; any ready worker takes it, as any
//! takes the next connection from the shared accept queue, and serves it
//! with its own generation's settings (plain, as it was accepted, even by
//! a worker that serves TLS: a TLS connection is never handed over).
//!
//! No connection is left in the queue with nobody to read it. A sender
//! first counts itself on the scoreboard ([`Scoreboard::begin_handoff`])
//! and then sends only if another worker is ready; a worker that starts
//! draining first says so on its slot, then waits until no sender is
//! counted, then takes what is still queued and serves it as a draining
//! worker does (handing it on if another worker is still ready). Each side
//! writes before it reads the other's mark (with a full fence between), so
//! at least one of them sees the other. When the whole server stops, nobody
//! is ready and nothing is sent.
//!
//! The queue holds as many connections as its send buffer does (the master
//! asks for [`SEND_BUFFER`]; the kernel caps it at `net.core.wmem_max`).
//! When thousands of idle connections leave at once (a reload of a server
//! holding a load balancer's pool, or thousands of idle browsers) the
//! buffer can fill faster than the ready workers take from it: a sender
//! then waits for room ([`Queue::send`]'s patience) rather than failing,
//! and only a queue that stays full past it, or a send that truly fails,
//! leaves the connection with its worker, which then serves its next
//! request itself with `Connection: close`. Nothing is closed unanswered
//! because a queue was full.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

#[cfg(doc)]
use crate::scoreboard::Scoreboard;

/// The most request bytes read ahead that a connection may carry with it;
/// a connection with more is not handed over (it drains as before).
pub(crate) const MAX_CARRIED: usize = 16 * 1024;

/// What precedes the carried bytes in a message: a version, the socket's
/// kind, and the connection's age in milliseconds.
const HEAD: usize = 10;

/// The send buffer the master asks for the queue. Each queued connection
/// costs about a kilobyte of it (a small message and its descriptor), so
/// the kernel's default (about 200 KiB) holds a few hundred: 4 MiB holds
/// thousands, and a sender that finds it full waits for room.
pub(crate) const SEND_BUFFER: usize = 4 << 20;

/// The message format's version.
const VERSION: u8 = 1;

/// The kind of socket handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketKind {
    /// A TCP connection.
    Tcp,
    /// A Unix-domain stream connection.
    Unix,
}

/// The server's queue, as the master keeps it: both ends of the pair.
#[derive(Debug)]
pub(crate) struct Pair {
    send: OwnedFd,
    recv: OwnedFd,
}

impl Pair {
    /// Makes a new queue (close-on-exec, non-blocking).
    pub(crate) fn new() -> io::Result<Pair> {
        let (send, recv) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        // Best effort: a smaller buffer only makes senders wait sooner.
        let _ =
            nix::sys::socket::setsockopt(&send, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER);
        Ok(Pair { send, recv })
    }

    /// Its descriptors, sending end first, for a worker to inherit.
    pub(crate) fn raw_fds(&self) -> [RawFd; 2] {
        [self.send.as_raw_fd(), self.recv.as_raw_fd()]
    }

    /// Adopts descriptors inherited across `exec` (a binary upgrade).
    ///
    /// # Safety
    ///
    /// Both must be open descriptors this process owns, made by
    /// [`Pair::new`].
    pub(crate) unsafe fn adopt(fds: [RawFd; 2]) -> Pair {
        Pair {
            // SAFETY: as the caller promises.
            send: unsafe { OwnedFd::from_raw_fd(fds[0]) },
            // SAFETY: as the caller promises.
            recv: unsafe { OwnedFd::from_raw_fd(fds[1]) },
        }
    }
}

/// A connection taken from the queue.
#[derive(Debug)]
pub(crate) struct Handed {
    /// Its socket.
    pub(crate) socket: OwnedFd,
    /// What kind of socket it is.
    pub(crate) kind: SocketKind,
    /// How long it has been open.
    pub(crate) age: Duration,
    /// Bytes of its next request already read by the worker that sent it.
    pub(crate) carried: Bytes,
}

/// Why a connection could not be queued.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The queue stayed full for the whole patience, or the caller's
    /// condition for sending stopped holding while it waited.
    Full,
    /// The send failed (or the message could not be made).
    Failed(io::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Full => f.write_str("the handoff queue stayed full"),
            SendError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// How often a sender waiting for room looks again at its condition.
const RECHECK: Duration = Duration::from_millis(20);

/// A worker's end of its generation's queue.
pub(crate) struct Queue {
    send: tokio::io::unix::AsyncFd<OwnedFd>,
    recv: tokio::net::UnixDatagram,
}

impl Queue {
    /// Opens the queue from the inherited descriptors (in the worker's
    /// runtime).
    ///
    /// # Safety
    ///
    /// Both must be open descriptors this process owns, as a worker's spec
    /// names them.
    pub(crate) unsafe fn from_inherited(fds: [RawFd; 2]) -> io::Result<Queue> {
        // SAFETY: as the caller promises.
        let pair = unsafe { Pair::adopt(fds) };
        crate::sys::set_cloexec(pair.send.as_raw_fd(), true)?;
        crate::sys::set_cloexec(pair.recv.as_raw_fd(), true)?;
        // A datagram socket to tokio: its readiness is what is used; the
        // messages are taken with `recvmsg` for the descriptors they carry.
        let recv = std::os::unix::net::UnixDatagram::from(pair.recv);
        Ok(Queue {
            // SAFETY: the descriptor is owned by the `AsyncFd` it is
            // registered in, which closes it only after deregistering it.
            send: unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    pair.send,
                    tokio::io::Interest::WRITABLE,
                )?
            },
            recv: tokio::net::UnixDatagram::from_std(recv)?,
        })
    }

    /// Sends `socket` with the bytes read past its last request. A full
    /// queue is waited on for up to `patience`, while `still` holds (it is
    /// asked again every few milliseconds: whether a worker is still ready
    /// to take the connection). Returns whether it had to wait. The caller
    /// still owns `socket` and closes its own descriptor after.
    pub(crate) async fn send(
        &self,
        socket: RawFd,
        kind: SocketKind,
        age: Duration,
        carried: &[u8],
        patience: Duration,
        still: impl Fn() -> bool,
    ) -> Result<bool, SendError> {
        if carried.len() > MAX_CARRIED {
            return Err(SendError::Failed(io::Error::other(
                "too many bytes read ahead",
            )));
        }
        let head = encode_head(kind, age);
        let deadline = tokio::time::Instant::now() + patience;
        let mut waited = false;
        loop {
            match self.try_send(socket, &head, carried) {
                Ok(()) => return Ok(waited),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(SendError::Failed(e)),
            }
            waited = true;
            let now = tokio::time::Instant::now();
            if now >= deadline || !still() {
                return Err(SendError::Full);
            }
            // Room is made as a ready worker takes a message; a sender
            // that missed the wake-up (another took the room first) looks
            // again after a moment anyway.
            let wait = (deadline - now).min(RECHECK);
            if let Ok(Ok(mut guard)) = tokio::time::timeout(wait, self.send.writable()).await {
                guard.clear_ready();
            }
        }
    }

    fn try_send(&self, socket: RawFd, head: &[u8; HEAD], carried: &[u8]) -> io::Result<()> {
        let iov = [IoSlice::new(head), IoSlice::new(carried)];
        let fds = [socket];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = sendmsg::<UnixAddr>(
            self.send.get_ref().as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        if sent != HEAD + carried.len() {
            return Err(io::Error::other("the handoff message was cut short"));
        }
        Ok(())
    }

    /// Waits until a connection may be queued (taking none).
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.recv.readable().await
    }

    /// The next connection, if [`Queue::readable`] saw one and no other
    /// worker took it first; when there is none, waits for the queue's
    /// next readiness.
    pub(crate) fn take(&self) -> io::Result<Option<Handed>> {
        let fd = self.recv.as_raw_fd();
        let taken = self.recv.try_io(tokio::io::Interest::READABLE, || loop {
            // A message without a socket (none is ever sent) is skipped.
            if let Some(handed) = receive(fd)? {
                return Ok(handed);
            }
        });
        match taken {
            Ok(handed) => Ok(Some(handed)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets the queue's readiness if it is empty now, so that the next
    /// [`Queue::readable`] waits for a new connection (a worker that left
    /// one to a sibling for a moment and found it taken).
    pub(crate) fn settle(&self) {
        let _ = self.recv.try_io(tokio::io::Interest::READABLE, || {
            if self.is_empty() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
    }

    /// Whether a connection is queued now (taking none).
    pub(crate) fn is_empty(&self) -> bool {
        let mut byte = [0u8; 1];
        nix::sys::socket::recv(
            self.recv.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .is_err()
    }

    /// Which connection is first in the queue now (its socket's device and
    /// inode), taking none: two looks that see the same one say that no
    /// worker took anything in between.
    pub(crate) fn head(&self) -> Option<(u64, u64)> {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut byte)];
        // A peek hands this process a copy of the message's descriptor,
        // closed here after its identity is read.
        let msg = recvmsg::<UnixAddr>(
            self.recv.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let mut head = None;
        for cmsg in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(rights) = cmsg {
                for raw in rights {
                    // SAFETY: the kernel just installed this descriptor in
                    // this process for the peek; nothing else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    if head.is_none() {
                        head = nix::sys::stat::fstat(fd.as_raw_fd())
                            .ok()
                            .map(|st| (st.st_dev, st.st_ino));
                    }
                }
            }
        }
        head
    }

    /// The next connection if one is queued now, whatever the runtime last
    /// saw of the queue.
    pub(crate) fn try_recv(&self) -> io::Result<Option<Handed>> {
        loop {
            match receive(self.recv.as_raw_fd()) {
                Ok(Some(handed)) => return Ok(Some(handed)),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

fn encode_head(kind: SocketKind, age: Duration) -> [u8; HEAD] {
    let mut head = [0u8; HEAD];
    head[0] = VERSION;
    head[1] = match kind {
        SocketKind::Tcp => 0,
        SocketKind::Unix => 1,
    };
    let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
    head[2..].copy_from_slice(&ms.to_le_bytes());
    head
}

fn decode_head(head: &[u8]) -> Option<(SocketKind, Duration)> {
    if head.len() < HEAD || head[0] != VERSION {
        return None;
    }
    let kind = match head[1] {
        0 => SocketKind::Tcp,
        1 => SocketKind::Unix,
        _ => return None,
    };
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&head[2..HEAD]);
    Some((kind, Duration::from_millis(u64::from_le_bytes(ms))))
}

/// Takes one message: `Ok(None)` for one that carried no usable socket
/// (whatever it carried is closed).
fn receive(fd: RawFd) -> io::Result<Option<Handed>> {
    let mut buf = vec![0u8; HEAD + MAX_CARRIED];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fds, cut) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            fd,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(rights) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process for this message; nothing else owns them.
                fds.extend(
                    rights
                        .into_iter()
                        .map(|r| unsafe { OwnedFd::from_raw_fd(r) }),
                );
            }
        }
        let cut = msg
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (msg.bytes, fds, cut)
    };
    let mut fds = fds.into_iter();
    let (Some(socket), None, false) = (fds.next(), fds.next(), cut) else {
        return Ok(None);
    };
    let Some((kind, age)) = decode_head(&buf[..len]) else {
        return Ok(None);
    };
    buf.truncate(len);
    let carried = Bytes::from(buf).slice(HEAD..);
    Ok(Some(Handed {
        socket,
        kind,
        age,
        carried,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A new queue, as a worker opens it (in the test's runtime).
    fn new_queue() -> Queue {
        let pair = Pair::new().expect("pair");
        let fds = pair.raw_fds();
        std::mem::forget(pair);
        // SAFETY: the pair's descriptors were just made and forgotten, so
        // the queue alone owns them.
        unsafe { Queue::from_inherited(fds) }.expect("queue")
    }

    #[test]
    fn the_head_says_kind_and_age() {
        let head = encode_head(SocketKind::Unix, Duration::from_millis(1234));
        assert_eq!(
            decode_head(&head),
            Some((SocketKind::Unix, Duration::from_millis(1234)))
        );
        let mut bad = head;
        bad[0] = 9;
        assert_eq!(decode_head(&bad), None);
        assert_eq!(decode_head(&head[..4]), None);
    }

    #[tokio::test]
    async fn a_socket_and_its_read_ahead_bytes_cross_the_queue() {
        let queue = new_queue();
        assert!(queue.try_recv().expect("try_recv").is_none());
        assert!(queue.is_empty());

        let (mut ours, theirs) = UnixStream::pair().expect("stream pair");
        let waited = queue
            .send(
                theirs.as_raw_fd(),
                SocketKind::Unix,
                Duration::from_millis(7),
                b"GET / HT",
                Duration::ZERO,
                || true,
            )
            .await
            .expect("send");
        assert!(!waited);
        // The sender closes its own descriptor; the socket lives on in the
        // message.
        drop(theirs);
        assert!(!queue.is_empty());
        queue.readable().await.expect("readable");
        let handed = queue.take().expect("take").expect("a connection");
        assert_eq!(handed.kind, SocketKind::Unix);
        assert_eq!(handed.age, Duration::from_millis(7));
        assert_eq!(&handed.carried[..], b"GET / HT");
        let mut received = UnixStream::from(handed.socket);
        ours.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        received.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        assert!(queue.try_recv().expect("try_recv").is_none());
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn the_head_names_the_first_connection_queued_and_takes_none() {
        let queue = new_queue();
        assert_eq!(queue.head(), None);
        let ident = |s: &UnixStream| {
            let st = nix::sys::stat::fstat(s.as_raw_fd()).expect("fstat");
            (st.st_dev, st.st_ino)
        };
        let (first, second) = (
            UnixStream::pair().expect("pair"),
            UnixStream::pair().expect("pair"),
        );
        for s in [&first.1, &second.1] {
            queue
                .send(
                    s.as_raw_fd(),
                    SocketKind::Unix,
                    Duration::ZERO,
                    b"",
                    Duration::ZERO,
                    || true,
                )
                .await
                .expect("send");
        }
        // Looking twice takes nothing and leaves no descriptor behind.
        let open = std::fs::read_dir("/proc/self/fd").expect("fds").count();
        assert_eq!(queue.head(), Some(ident(&first.1)));
        assert_eq!(queue.head(), Some(ident(&first.1)));
        assert_eq!(
            std::fs::read_dir("/proc/self/fd").expect("fds").count(),
            open
        );
        let taken = queue.try_recv().expect("try_recv").expect("the first");
        assert_eq!(ident(&UnixStream::from(taken.socket)), ident(&first.1));
        assert_eq!(queue.head(), Some(ident(&second.1)));
        assert!(queue.try_recv().expect("try_recv").is_some());
        assert_eq!(queue.head(), None);
    }

    #[tokio::test]
    async fn a_full_queue_is_waited_on_until_a_reader_makes_room() {
        let queue = std::sync::Arc::new(new_queue());
        let (_ours, theirs) = UnixStream::pair().expect("stream pair");
        let send = |patience, still: bool| {
            let queue = std::sync::Arc::clone(&queue);
            let fd = theirs.as_raw_fd();
            async move {
                queue
                    .send(fd, SocketKind::Unix, Duration::ZERO, b"", patience, || {
                        still
                    })
                    .await
            }
        };
        // Fill it: thousands fit, then a sender with no patience is told
        // the queue is full.
        let mut queued = 0usize;
        loop {
            match send(Duration::ZERO, true).await {
                Ok(waited) => {
                    assert!(!waited);
                    queued += 1;
                }
                Err(SendError::Full) => break,
                Err(SendError::Failed(e)) => panic!("send failed after {queued}: {e}"),
            }
            assert!(queued < 1_000_000, "the queue never filled");
        }
        assert!(queued >= 1000, "only {queued} connections fit in the queue");
        // A sender whose condition stops holding gives up at once.
        assert!(matches!(
            send(Duration::from_secs(60), false).await,
            Err(SendError::Full)
        ));
        // A patient sender waits until a reader takes some.
        let waiting = send(Duration::from_secs(60), true);
        tokio::pin!(waiting);
        // Nothing can end its wait but room (or the minute's patience).
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut waiting)
                .await
                .is_err(),
            "the sender did not wait"
        );
        let mut taken = 0;
        while taken < 64 {
            if queue.try_recv().expect("try_recv").is_some() {
                taken += 1;
            }
        }
        assert!(matches!(waiting.await, Ok(true)));
        let mut left = 0;
        while queue.try_recv().expect("try_recv").is_some() {
            left += 1;
        }
        assert_eq!(left, queued - taken + 1);
    }

    #[tokio::test]
    async fn settling_an_emptied_queue_makes_readable_wait_for_the_next() {
        let queue = new_queue();
        let (_ours, theirs) = UnixStream::pair().expect("stream pair");
        let send = || {
            queue.send(
                theirs.as_raw_fd(),
                SocketKind::Unix,
                Duration::ZERO,
                b"",
                Duration::ZERO,
                || true,
            )
        };
        send().await.expect("send");
        queue.readable().await.expect("readable");
        // Taken behind the runtime's back (as a sibling would): the
        // readiness is stale until settled.
        assert!(queue.try_recv().expect("try_recv").is_some());
        queue.settle();
        let wait = tokio::time::timeout(Duration::from_millis(20), queue.readable()).await;
        assert!(wait.is_err(), "readable resolved on an empty queue");
        send().await.expect("send");
        tokio::time::timeout(Duration::from_secs(10), queue.readable())
            .await
            .expect("readable again")
            .expect("readable");
        // Settling a queue that holds one forgets nothing.
        queue.settle();
        tokio::time::timeout(Duration::from_secs(10), queue.readable())
            .await
            .expect("still readable")
            .expect("readable");
        assert!(queue.take().expect("take").is_some());
    }
}
