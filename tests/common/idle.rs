//! Idle keep-alive connections held open by a test, as a load balancer's
//! pool or idle browsers hold them: each asked `GET /` once in a while,
//! with every answer (or its absence) accounted for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::parse_reply;

/// One idle keep-alive connection and what it was last answered.
pub struct Idle {
    stream: TcpStream,
}

/// What a connection's request came to.
#[derive(Debug)]
pub enum Answer {
    /// Answered: the status, and the demo app's pid and generation.
    Ok {
        status: u16,
        pid: u32,
        generation: u64,
    },
    /// Closed or failed without an answer.
    Lost(String),
}

impl Idle {
    pub async fn open(addr: SocketAddr) -> Idle {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Idle { stream }
    }

    /// `GET /` on the connection, kept alive; reads its whole answer.
    pub async fn ask(&mut self) -> Answer {
        let request = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";
        if let Err(e) = self.stream.write_all(request).await {
            return Answer::Lost(format!("write: {e}"));
        }
        let mut raw = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        let read = async {
            loop {
                if let Some(reply) = parse_reply(&raw) {
                    return Ok(reply);
                }
                match self.stream.read(&mut buf).await {
                    Ok(0) => return Err("closed without an answer".to_owned()),
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(120), read).await {
            Ok(Ok(reply)) => Answer::Ok {
                status: reply.status,
                pid: reply.pid(),
                generation: reply.generation(),
            },
            Ok(Err(e)) => Answer::Lost(e),
            Err(_) => Answer::Lost("no answer in 120 s".to_owned()),
        }
    }
}

/// A pool of idle connections, each answered once when opened.
pub struct Pool {
    pub conns: Vec<Idle>,
}

/// What one round of requests (one on each connection) saw.
#[derive(Debug, Default)]
pub struct Round {
    pub answered: usize,
    pub lost: Vec<String>,
    pub by_generation: BTreeMap<u64, usize>,
    pub by_pid: BTreeMap<u32, usize>,
    pub not_ok: usize,
}

impl Round {
    /// Asserts that every one of the `n` connections was answered, 200.
    pub fn assert_all_answered(&self, what: &str, n: usize) {
        assert_eq!(
            self.lost.len(),
            0,
            "{what}: {} of {n} idle connections closed without an answer (first: {:?})",
            self.lost.len(),
            self.lost.first()
        );
        assert_eq!(self.answered, n, "{what}: {self:?}");
        assert_eq!(self.not_ok, 0, "{what}: {self:?}");
    }
}

impl Pool {
    pub async fn open(addr: SocketAddr, n: usize) -> Pool {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(Idle::open(addr).await);
        }
        let mut pool = Pool { conns };
        let first = pool.round().await;
        assert!(first.lost.is_empty(), "opening the pool: {first:?}");
        pool
    }

    /// One request on every connection at once; the connections that were
    /// closed are dropped from the pool.
    pub async fn round(&mut self) -> Round {
        let mut set = tokio::task::JoinSet::new();
        for mut conn in self.conns.drain(..) {
            set.spawn(async move {
                let answer = conn.ask().await;
                (conn, answer)
            });
        }
        let mut round = Round::default();
        while let Some(done) = set.join_next().await {
            let (conn, answer) = done.expect("a client task panicked");
            match answer {
                Answer::Ok {
                    status,
                    pid,
                    generation,
                } => {
                    round.answered += 1;
                    round.not_ok += usize::from(status != 200);
                    *round.by_generation.entry(generation).or_default() += 1;
                    *round.by_pid.entry(pid).or_default() += 1;
                    self.conns.push(conn);
                }
                Answer::Lost(why) => round.lost.push(why),
            }
        }
        round
    }
}
