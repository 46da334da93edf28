//! The outbound side: one [`PeerLink`] per peer (its connection, reconnect
//! back-off and rate-limited warnings) and the writer tasks that drain its
//! control, bulk and snapshot queues.

use crate::{tls, wire};
use raft_core::{Message, NodeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Logs at most one warning per interval for one subject, counting the rest.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        WarnLimiter {
            last: None,
            suppressed: 0,
        }
    }

    /// Some(number suppressed since the last warning) when a warning may be logged now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Self::EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    fn reset(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    failed: bool,
    rng: fastrand::Rng,
    /// When the current connection was made, until it proved usable.
    connected_at: Option<Instant>,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);
    const MAX_REFUSED: Duration = Duration::from_secs(10);
    /// A connection still open this long after it was made was accepted.
    const PROVEN: Duration = Duration::from_secs(1);

    pub(crate) fn new(seed: u64) -> Self {
        Backoff {
            next: Self::MIN,
            failed: false,
            rng: fastrand::Rng::with_seed(seed),
            connected_at: None,
        }
    }

    /// How long to wait before the next attempt: nothing after a success,
    /// else the current step with ±50% jitter.
    fn delay(&mut self) -> Duration {
        if !self.failed {
            return Duration::ZERO;
        }
        let jitter = 0.5 + self.rng.f64();
        self.next.mul_f64(jitter)
    }

    fn failure(&mut self) {
        if self.failed {
            self.next = (self.next * 2).min(Self::MAX);
        }
        self.failed = true;
    }

    fn success(&mut self) {
        self.failed = false;
        self.next = Self::MIN;
        self.connected_at = None;
    }

    /// The current connection is in use again: once it has been open for
    /// [`Backoff::PROVEN`], the back-off starts over. True at that moment.
    fn proven_now(&mut self) -> bool {
        if self
            .connected_at
            .is_some_and(|t| t.elapsed() >= Self::PROVEN)
        {
            self.success();
            return true;
        }
        false
    }

    /// The peer refused us (a configuration error, not a network one):
    /// back off further, up to `MAX_REFUSED`.
    fn refused(&mut self) {
        self.next = (self.next * 2).min(Self::MAX_REFUSED);
        self.failed = true;
    }

    /// A handshake succeeded: the next attempt (if this connection is
    /// refused) waits the current step, and a first one is no longer free.
    fn connected(&mut self) {
        self.failed = true;
        self.connected_at = Some(Instant::now());
    }
}

/// The connection to one peer, shared by its two writer tasks.
pub(crate) struct PeerLink {
    pub(crate) id: NodeId,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) addrs: Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>,
    pub(crate) conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    pub(crate) backoff: Mutex<Backoff>,
    pub(crate) warn: Mutex<WarnLimiter>,
    pub(crate) header: [u8; wire::HEADER_LEN],
    pub(crate) local: NodeId,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerLink {
    fn warn(&self, what: &str, err: &dyn std::fmt::Display) {
        if let Some(suppressed) = lock(&self.warn).allow() {
            tracing::warn!(node = self.local, peer = self.id, suppressed, error = %err, "{what}");
        }
    }

    pub(crate) async fn connection(&self) -> Option<quinn::Connection> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            match c.close_reason() {
                None => {
                    // Still open a while after it was made: the peer took
                    // our stream headers. Only then does the back-off start
                    // over, so a peer that accepts the handshake and then
                    // refuses us (another cluster, a wrong id) is retried at
                    // the back-off's pace, not at once, however many writers
                    // use the connection before the refusal arrives.
                    let proven = lock(&self.backoff).proven_now();
                    if proven {
                        lock(&self.warn).reset();
                    }
                    return Some(c.clone());
                }
                Some(quinn::ConnectionError::ApplicationClosed(close))
                    if close.error_code == wire::ERR_REFUSED =>
                {
                    lock(&self.backoff).refused();
                    self.warn(
                        "peer refused this node",
                        &String::from_utf8_lossy(&close.reason),
                    );
                }
                Some(_) => {}
            }
        }
        *g = None;
        let delay = lock(&self.backoff).delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let addr = self
            .addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.id)
            .copied();
        let Some(addr) = addr else {
            lock(&self.backoff).failure();
            return None;
        };
        let res = match self.endpoint.connect(addr, &tls::node_name(self.id)) {
            Ok(connecting) => connecting.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match res {
            Ok(c) => {
                // The back-off (and the warning limiter) are left as they
                // are until the connection proves usable (see above).
                lock(&self.backoff).connected();
                tracing::debug!(node = self.local, peer = self.id, %addr, "connected");
                *g = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                lock(&self.backoff).failure();
                self.warn("cannot connect to peer", &e);
                None
            }
        }
    }

    async fn open_stream(&self, class: Class) -> Option<quinn::SendStream> {
        let conn = self.connection().await?;
        let mut s = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                self.warn("cannot open stream to peer", &e);
                return None;
            }
        };
        let _ = s.set_priority(class.priority());
        if let Err(e) = s.write_all(&self.header).await {
            self.warn("cannot write to peer", &e);
            return None;
        }
        Some(s)
    }
}

/// The three streams to a peer, each with its own queue: one busy class
/// never holds another up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Votes, heartbeats, acknowledgements.
    Control,
    /// Appends with entries.
    Bulk,
    /// Snapshot chunks, below everything else.
    Snapshot,
}

impl Class {
    fn priority(self) -> i32 {
        match self {
            Class::Control => 1,
            Class::Bulk => 0,
            Class::Snapshot => -1,
        }
    }
}

pub(crate) async fn writer(link: Arc<PeerLink>, class: Class, mut rx: mpsc::Receiver<Message>) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(msg) = rx.recv().await {
        let frame = match wire::encode_frame(&msg) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(node = link.local, peer = link.id, error = %e, "cannot encode message");
                continue;
            }
        };
        // A stream kept from before can belong to a connection that died
        // meanwhile (the peer restarted; nothing went to it for a while):
        // the first write finds out. That message is written once more on a
        // new stream, reconnecting if need be, rather than lost (a vote
        // answer lost this way costs an election timeout). A message that
        // cannot be written then is dropped: Raft sends again.
        for attempt in 0..2 {
            if stream.is_none() {
                stream = link.open_stream(class).await;
            }
            tracing::trace!(
                node = link.local,
                peer = link.id,
                kind = msg.body.kind(),
                connected = stream.is_some(),
                attempt,
                "sending"
            );
            let Some(s) = stream.as_mut() else {
                break;
            };
            match s.write_all(&frame).await {
                Ok(()) => break,
                Err(e) => {
                    if attempt > 0 {
                        link.warn("write to peer failed", &e);
                    }
                    stream = None;
                }
            }
        }
    }
}

pub(crate) struct PeerQueues {
    pub(crate) control: mpsc::Sender<Message>,
    pub(crate) bulk: mpsc::Sender<Message>,
    pub(crate) snapshot: mpsc::Sender<Message>,
    pub(crate) warn: Mutex<WarnLimiter>,
    /// Its writer tasks, stopped when the peer is removed.
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}
