//! # raft-net-quic
//!
//! [`QuicTransport`]: raft-core's [`Transport`] over QUIC (quinn + rustls with
//! the ring provider), with mutual TLS between cluster members.
//!
//! * Every node has a certificate from the cluster CA naming `node-<id>.raft`
//!   ([`tls::generate_cluster_certs`] writes a CA and node certificates). A
//!   connection is accepted only with a certificate of that CA, and a peer may
//!   only speak for the id its certificate names.
//! * Each stream opens with a header (magic, protocol version, cluster id,
//!   sender, receiver) that is checked before anything else is read; then come
//!   length-prefixed bincode frames, each bounded by `max_frame_bytes`. A bad
//!   frame closes that stream with a logged error; everything else carries on.
//! * Per peer there are two streams on one connection: a control stream (votes,
//!   heartbeats, acknowledgements) at higher priority and a bulk stream for
//!   AppendEntries carrying entries, so votes and heartbeats never wait behind a
//!   large append. Outbound queues are bounded per peer: a dead peer costs
//!   bounded memory, and its messages are dropped (Raft retransmits).
//! * Reconnects back off exponentially with jitter; repeated warnings about one
//!   peer are rate-limited.
#![deny(missing_docs)]

pub mod tls;
pub mod wire;

use async_trait::async_trait;
use raft_core::{Message, MessageBody, NodeId, Transport};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use tls::{generate_cluster_certs, ClusterCa, TlsMaterial};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Certificates or keys could not be loaded, generated or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The endpoint could not be created.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid transport configuration: {0}")]
    Config(String),
}

/// How a node talks to its peers.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// This node's id (its certificate must name it).
    pub id: NodeId,
    /// Nodes of different clusters refuse each other.
    pub cluster_id: u64,
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// Peer id -> UDP address. Every id here is a member that may connect.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Largest frame accepted from a peer; larger ones close the stream (at
    /// most `wire::MAX_FRAME_LIMIT`).
    pub max_frame_bytes: usize,
    /// Messages queued per peer and stream class before new ones are dropped.
    pub queue_len: usize,
}

impl QuicConfig {
    /// Defaults: cluster id 0, 16 MiB frames, 4096 queued messages per peer and class.
    pub fn new(id: NodeId, listen: SocketAddr) -> Self {
        QuicConfig {
            id,
            cluster_id: 0,
            listen,
            peers: BTreeMap::new(),
            max_frame_bytes: 16 << 20,
            queue_len: 4096,
        }
    }
}

/// Logs at most one warning per interval for one subject, counting the rest.
#[derive(Debug)]
struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    const EVERY: Duration = Duration::from_secs(10);

    fn new() -> Self {
        WarnLimiter {
            last: None,
            suppressed: 0,
        }
    }

    /// Some(number suppressed since the last warning) when a warning may be logged now.
    fn allow(&mut self) -> Option<u64> {
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
struct Backoff {
    next: Duration,
    failed: bool,
    rng: u64,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    fn new(seed: u64) -> Self {
        Backoff {
            next: Self::MIN,
            failed: false,
            rng: seed | 1,
        }
    }

    /// How long to wait before the next attempt: nothing after a success,
    /// else the current step with ±50% jitter.
    fn delay(&mut self) -> Duration {
        if !self.failed {
            return Duration::ZERO;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.5 + (self.rng % 1000) as f64 / 1000.0;
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
    }
}

/// The connection to one peer, shared by its two writer tasks.
struct PeerLink {
    id: NodeId,
    endpoint: quinn::Endpoint,
    addrs: Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    backoff: Mutex<Backoff>,
    warn: Mutex<WarnLimiter>,
    header: [u8; wire::HEADER_LEN],
    local: NodeId,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerLink {
    fn warn(&self, what: &str, err: &dyn std::fmt::Display) {
        if let Some(suppressed) = lock(&self.warn).allow() {
            tracing::warn!(node = self.local, peer = self.id, suppressed, error = %err, "{what}");
        }
    }

    async fn connection(&self) -> Option<quinn::Connection> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if c.close_reason().is_none() {
                return Some(c.clone());
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
                lock(&self.backoff).success();
                lock(&self.warn).reset();
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

    async fn open_stream(&self, control: bool) -> Option<quinn::SendStream> {
        let conn = self.connection().await?;
        let mut s = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                self.warn("cannot open stream to peer", &e);
                return None;
            }
        };
        let _ = s.set_priority(if control { 1 } else { 0 });
        if let Err(e) = s.write_all(&self.header).await {
            self.warn("cannot write to peer", &e);
            return None;
        }
        Some(s)
    }
}

async fn writer(link: Arc<PeerLink>, control: bool, mut rx: mpsc::Receiver<Message>) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(msg) = rx.recv().await {
        let frame = match wire::encode_frame(&msg) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(node = link.local, peer = link.id, error = %e, "cannot encode message");
                continue;
            }
        };
        if stream.is_none() {
            stream = link.open_stream(control).await;
        }
        // A message that cannot be written now is dropped: Raft sends again.
        tracing::trace!(
            node = link.local,
            peer = link.id,
            kind = msg.body.kind(),
            connected = stream.is_some(),
            "sending"
        );
        if let Some(s) = stream.as_mut() {
            if let Err(e) = s.write_all(&frame).await {
                link.warn("write to peer failed", &e);
                stream = None;
            }
        }
    }
}

struct PeerQueues {
    control: mpsc::Sender<Message>,
    bulk: mpsc::Sender<Message>,
    warn: Mutex<WarnLimiter>,
}

/// Answers an application request from an authenticated peer (for example a
/// client command forwarded to the leader). Gets the sender's id and the
/// request bytes; returns the reply bytes.
pub type RpcHandler =
    Arc<dyn Fn(NodeId, Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> + Send + Sync>;

/// What inbound tasks need to check and deliver messages.
struct Inbound {
    id: NodeId,
    cluster_id: u64,
    members: BTreeSet<NodeId>,
    max_frame: usize,
    tx: mpsc::Sender<Message>,
    rpc: RwLock<Option<RpcHandler>>,
}

/// Sends application requests to peers over the cluster's authenticated
/// connections. Cheap to clone; usable after the transport moved into a node.
#[derive(Clone)]
pub struct RpcClient {
    links: Arc<BTreeMap<NodeId, Arc<PeerLink>>>,
    max_frame: usize,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient").finish_non_exhaustive()
    }
}

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No such peer.
    #[error("node {0} is not a peer")]
    UnknownPeer(NodeId),
    /// The peer could not be reached.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),
    /// The exchange broke off; the request may or may not have been handled.
    #[error("exchange with node {0} failed: {1}")]
    Broken(NodeId, String),
}

impl RpcClient {
    /// Sends `request` to `to` and waits for its reply. Add your own timeout.
    pub async fn call(&self, to: NodeId, request: &[u8]) -> Result<Vec<u8>, RpcError> {
        let link = self.links.get(&to).ok_or(RpcError::UnknownPeer(to))?;
        let conn = link.connection().await.ok_or(RpcError::Unreachable(to))?;
        let broken = |e: &dyn std::fmt::Display| RpcError::Broken(to, e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(&e))?;
        send.write_all(&link.header).await.map_err(|e| broken(&e))?;
        let len = u32::try_from(request.len()).map_err(|e| broken(&e))?;
        send.write_all(&len.to_le_bytes())
            .await
            .map_err(|e| broken(&e))?;
        send.write_all(request).await.map_err(|e| broken(&e))?;
        let _ = send.finish();
        wire::read_raw_frame(&mut recv, self.max_frame)
            .await
            .map_err(|e| broken(&e))?
            .ok_or_else(|| RpcError::Broken(to, "no reply".into()))
    }
}

/// A QUIC [`Transport`]. Create it inside a tokio runtime; dropping it closes
/// the endpoint and stops its tasks.
pub struct QuicTransport {
    id: NodeId,
    endpoint: quinn::Endpoint,
    rpc: RpcClient,
    handler_slot: Arc<Inbound>,
    addrs: Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>,
    peers: BTreeMap<NodeId, PeerQueues>,
    inbound: mpsc::Receiver<Message>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// The largest frame a peer accepts (`QuicConfig::max_frame_bytes`): no
    /// message or RPC request may be larger.
    pub fn max_frame_bytes(&self) -> usize {
        self.handler_slot.max_frame
    }

    /// Binds the endpoint and starts connecting to peers as messages arrive for them.
    pub fn bind(cfg: QuicConfig, tls: &TlsMaterial) -> Result<Self, NetError> {
        if cfg.peers.contains_key(&cfg.id) {
            return Err(NetError::Config(format!(
                "node {} lists itself as a peer",
                cfg.id
            )));
        }
        if cfg.max_frame_bytes < 64
            || cfg.max_frame_bytes > wire::MAX_FRAME_LIMIT
            || cfg.queue_len == 0
        {
            return Err(NetError::Config(format!(
                "max_frame_bytes must be between 64 and {} and queue_len >= 1",
                wire::MAX_FRAME_LIMIT
            )));
        }
        let server = tls::server_config(tls)?;
        let client = tls::client_config(tls)?;
        let mut endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|source| NetError::Bind {
                addr: cfg.listen,
                source,
            })?;
        endpoint.set_default_client_config(client);
        let addrs = Arc::new(RwLock::new(cfg.peers.clone()));
        let (in_tx, in_rx) = mpsc::channel(cfg.queue_len);
        let inbound = Arc::new(Inbound {
            id: cfg.id,
            cluster_id: cfg.cluster_id,
            members: cfg.peers.keys().copied().collect(),
            max_frame: cfg.max_frame_bytes,
            tx: in_tx,
            rpc: RwLock::new(None),
        });
        let mut tasks = vec![tokio::spawn(accept_loop(endpoint.clone(), inbound.clone()))];
        let mut peers = BTreeMap::new();
        let mut links = BTreeMap::new();
        for &peer in cfg.peers.keys() {
            let link = Arc::new(PeerLink {
                id: peer,
                endpoint: endpoint.clone(),
                addrs: addrs.clone(),
                conn: tokio::sync::Mutex::new(None),
                backoff: Mutex::new(Backoff::new(cfg.id.wrapping_mul(31).wrapping_add(peer))),
                warn: Mutex::new(WarnLimiter::new()),
                header: wire::header(cfg.cluster_id, cfg.id, peer),
                local: cfg.id,
            });
            let (ctx, crx) = mpsc::channel(cfg.queue_len);
            let (btx, brx) = mpsc::channel(cfg.queue_len);
            links.insert(peer, link.clone());
            tasks.push(tokio::spawn(writer(link.clone(), true, crx)));
            tasks.push(tokio::spawn(writer(link, false, brx)));
            peers.insert(
                peer,
                PeerQueues {
                    control: ctx,
                    bulk: btx,
                    warn: Mutex::new(WarnLimiter::new()),
                },
            );
        }
        Ok(QuicTransport {
            id: cfg.id,
            endpoint,
            rpc: RpcClient {
                links: Arc::new(links),
                max_frame: cfg.max_frame_bytes,
            },
            handler_slot: inbound,
            addrs,
            peers,
            inbound: in_rx,
            tasks,
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint.local_addr().map_err(|source| NetError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// A client for application requests to peers.
    pub fn rpc_client(&self) -> RpcClient {
        self.rpc.clone()
    }

    /// Installs the handler for application requests from peers. Requests
    /// arriving without a handler get an empty reply.
    pub fn set_rpc_handler(&self, handler: RpcHandler) {
        *self
            .handler_slot
            .rpc
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// Sets or changes a peer's address (for example once it is known after
    /// binding to port 0). The id must be one of the configured peers.
    pub fn set_peer_addr(&self, id: NodeId, addr: SocketAddr) -> Result<(), NetError> {
        if !self.peers.contains_key(&id) {
            return Err(NetError::Config(format!(
                "node {id} is not a configured peer"
            )));
        }
        self.addrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, addr);
        Ok(())
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
    }
}

/// Votes, heartbeats and answers go on the control stream; appends with entries on the bulk stream.
fn is_control(m: &Message) -> bool {
    !matches!(&m.body, MessageBody::AppendEntries { entries, .. } if !entries.is_empty())
}

#[async_trait]
impl Transport for QuicTransport {
    fn send(&self, msg: Message) {
        if msg.from != self.id {
            tracing::warn!(
                node = self.id,
                from = msg.from,
                "refusing to send a message under another id"
            );
            return;
        }
        let Some(q) = self.peers.get(&msg.to) else {
            tracing::debug!(node = self.id, to = msg.to, "no such peer");
            return;
        };
        let to = msg.to;
        let tx = if is_control(&msg) {
            &q.control
        } else {
            &q.bulk
        };
        if tx.try_send(msg).is_err() {
            if let Some(suppressed) = lock(&q.warn).allow() {
                tracing::warn!(
                    node = self.id,
                    peer = to,
                    suppressed,
                    "queue to peer full; dropping messages"
                );
            }
        }
    }

    async fn recv(&mut self) -> Option<Message> {
        self.inbound.recv().await
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.handler_slot.max_frame)
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, inbound: Arc<Inbound>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(handle_connection(incoming, inbound.clone()));
    }
}

async fn handle_connection(incoming: quinn::Incoming, inbound: Arc<Inbound>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(node = inbound.id, %remote, error = %e, "refused connection (TLS handshake failed)");
            return;
        }
    };
    let bi = {
        let (conn, inbound) = (conn.clone(), inbound.clone());
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle_rpc(conn.clone(), send, recv, inbound.clone()));
            }
        })
    };
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(handle_stream(conn.clone(), recv, inbound.clone()));
    }
    bi.abort();
}

/// Checks a stream header against the connection's certificate; on failure
/// closes the connection and returns None.
fn admit(conn: &quinn::Connection, header: &wire::Header, inbound: &Inbound) -> Option<NodeId> {
    let why = if header.cluster_id != inbound.cluster_id {
        format!("cluster id {} is not ours", header.cluster_id)
    } else if header.to != inbound.id {
        format!("stream is addressed to node {}", header.to)
    } else if !inbound.members.contains(&header.from) {
        format!("node {} is not a member", header.from)
    } else if !tls::peer_is(conn, header.from) {
        format!("certificate does not name node {}", header.from)
    } else {
        return Some(header.from);
    };
    tracing::warn!(node = inbound.id, remote = %conn.remote_address(), claimed = header.from, "refused peer: {why}");
    conn.close(wire::ERR_REFUSED, why.as_bytes());
    None
}

async fn handle_rpc(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    inbound: Arc<Inbound>,
) {
    let Ok(Ok(header)) =
        tokio::time::timeout(Duration::from_secs(5), wire::read_header(&mut recv)).await
    else {
        let _ = recv.stop(wire::ERR_PROTOCOL);
        return;
    };
    let Some(from) = admit(&conn, &header, &inbound) else {
        return;
    };
    let request = match wire::read_raw_frame(&mut recv, inbound.max_frame).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(node = inbound.id, peer = from, error = %e, "bad request frame; closing stream");
            let _ = recv.stop(wire::ERR_PROTOCOL);
            return;
        }
    };
    let handler = inbound
        .rpc
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let reply = match handler {
        Some(h) => h(from, request).await,
        None => Vec::new(),
    };
    let Ok(len) = u32::try_from(reply.len()) else {
        return;
    };
    if send.write_all(&len.to_le_bytes()).await.is_ok() && send.write_all(&reply).await.is_ok() {
        let _ = send.finish();
    }
}

async fn handle_stream(
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    inbound: Arc<Inbound>,
) {
    let remote = conn.remote_address();
    let header = match tokio::time::timeout(Duration::from_secs(5), wire::read_header(&mut recv))
        .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!(node = inbound.id, %remote, error = %e, "bad stream header; closing stream");
            let _ = recv.stop(wire::ERR_PROTOCOL);
            return;
        }
        Err(_) => {
            let _ = recv.stop(wire::ERR_PROTOCOL);
            return;
        }
    };
    let Some(from) = admit(&conn, &header, &inbound) else {
        return;
    };
    loop {
        match wire::read_frame(&mut recv, inbound.max_frame).await {
            Ok(Some(msg)) => {
                tracing::trace!(
                    node = inbound.id,
                    peer = from,
                    kind = msg.body.kind(),
                    "received"
                );
                if msg.from != from || msg.to != inbound.id {
                    tracing::warn!(
                        node = inbound.id,
                        peer = from,
                        "message under a foreign id; closing stream"
                    );
                    let _ = recv.stop(wire::ERR_PROTOCOL);
                    return;
                }
                if inbound.tx.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            // The peer went away (restart, shutdown, network): not its fault.
            Err(e @ wire::FrameError::Read(_)) => {
                tracing::debug!(node = inbound.id, peer = from, error = %e, "stream from peer ended");
                return;
            }
            Err(e) => {
                tracing::warn!(node = inbound.id, peer = from, error = %e, "bad frame; closing stream");
                let _ = recv.stop(wire::ERR_PROTOCOL);
                return;
            }
        }
    }
}
