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
//! * Per peer there are three streams on one connection: a control stream
//!   (votes, heartbeats, acknowledgements) at the highest priority, a bulk
//!   stream for AppendEntries carrying entries, and a snapshot stream at the
//!   lowest, so votes and heartbeats never wait behind a large append and
//!   replication never waits behind a snapshot. Outbound queues are bounded per peer: a dead peer costs
//!   bounded memory, and its messages are dropped (Raft retransmits).
//! * Reconnects back off exponentially with jitter; repeated warnings about one
//!   peer are rate-limited.
#![deny(missing_docs)]

mod config;
mod error;
mod inbound;
mod peer;
mod rpc;
pub mod tls;
pub mod wire;

pub use config::QuicConfig;
pub use error::NetError;
pub use inbound::{INBOUND_QUEUE_BYTES, MAX_CONNECTIONS_PER_PEER, RPC_BODY_TIMEOUT};
pub use tls::{add_node_certs, generate_cluster_certs, ClusterCa, TlsMaterial};

use async_trait::async_trait;
use inbound::{accept_loop, Inbound};
use peer::{lock, writer, Backoff, Class, PeerLink, PeerQueues, WarnLimiter};
use raft_core::{Membership, Message, MessageBody, NodeId, RpcEndpoint, Transport};
use rpc::RpcClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Snapshot chunks queued per peer.
const SNAPSHOT_QUEUE: usize = 16;

/// Requests from peers waiting for the application.
const RPC_QUEUE: usize = 1024;

/// A QUIC [`Transport`]. Create it inside a tokio runtime; dropping it closes
/// the endpoint and stops its tasks.
pub struct QuicTransport {
    id: NodeId,
    endpoint: quinn::Endpoint,
    rpc: RpcClient,
    rpc_taken: bool,
    handler_slot: Arc<Inbound>,
    addrs: Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>,
    /// One set of queues (and writer tasks) per peer; members added at
    /// runtime get theirs from `update_members`.
    peers: RwLock<BTreeMap<NodeId, PeerQueues>>,
    links: Links,
    cluster_id: u64,
    queue_len: usize,
    inbound: mpsc::Receiver<inbound::Queued>,
    tasks: Vec<JoinHandle<()>>,
}

/// A [`QuicTransport`]'s counters since it was bound.
#[derive(Clone)]
pub struct NetStats {
    inbound: Arc<Inbound>,
}

impl std::fmt::Debug for NetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStats")
            .field("refused", &self.refused())
            .field("dropped", &self.dropped())
            .field("sent", &self.sent())
            .finish()
    }
}

impl NetStats {
    /// Streams from other nodes refused (another cluster, a certificate
    /// that does not match, too many connections).
    pub fn refused(&self) -> u64 {
        self.inbound
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Messages to peers dropped because the peer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.inbound
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Messages queued to peers (Raft's own: appends, heartbeats, votes,
    /// answers, snapshot chunks).
    pub fn sent(&self) -> u64 {
        self.inbound.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The links to peers, shared with the RPC client.
pub(crate) type Links = Arc<RwLock<BTreeMap<NodeId, Arc<PeerLink>>>>;

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
            max_frame: cfg.max_frame_bytes,
            tx: in_tx,
            budget: Arc::new(tokio::sync::Semaphore::new(inbound::INBOUND_QUEUE_BYTES)),
            connections: Default::default(),
            refusals: Default::default(),
            refused: Default::default(),
            sent: Default::default(),
            dropped: Default::default(),
            addrs: addrs.clone(),
            rpc: RwLock::new(None),
        });
        let tasks = vec![tokio::spawn(accept_loop(endpoint.clone(), inbound.clone()))];
        let links: Links = Arc::default();
        let t = QuicTransport {
            id: cfg.id,
            endpoint,
            rpc: RpcClient {
                links: links.clone(),
                max_frame: cfg.max_frame_bytes,
            },
            rpc_taken: false,
            handler_slot: inbound,
            addrs,
            peers: RwLock::default(),
            links,
            cluster_id: cfg.cluster_id,
            queue_len: cfg.queue_len,
            inbound: in_rx,
            tasks,
        };
        for &peer in cfg.peers.keys() {
            t.add_peer(peer);
        }
        Ok(t)
    }

    /// Streams from other nodes refused since the start (another cluster,
    /// a certificate that does not match, too many connections).
    pub fn refused_count(&self) -> u64 {
        self.stats().refused()
    }

    /// The transport's counters, readable after the transport has been
    /// handed to the node.
    pub fn stats(&self) -> NetStats {
        NetStats {
            inbound: self.handler_slot.clone(),
        }
    }

    /// Starts the link, queues and writer tasks for a new peer.
    fn add_peer(&self, peer: NodeId) {
        let mut peers = write_lock(&self.peers);
        if peers.contains_key(&peer) || peer == self.id {
            return;
        }
        let link = Arc::new(PeerLink {
            id: peer,
            endpoint: self.endpoint.clone(),
            addrs: self.addrs.clone(),
            conn: tokio::sync::Mutex::new(None),
            backoff: Mutex::new(Backoff::new(self.id.wrapping_mul(31).wrapping_add(peer))),
            warn: Mutex::new(WarnLimiter::new()),
            header: wire::header(self.cluster_id, self.id, peer),
            local: self.id,
        });
        let (ctx, crx) = mpsc::channel(self.queue_len);
        let (btx, brx) = mpsc::channel(self.queue_len);
        // A snapshot sender keeps a few chunks in flight; a short queue
        // bounds the memory a stuck peer can hold.
        let (stx, srx) = mpsc::channel(SNAPSHOT_QUEUE);
        write_lock(&self.links).insert(peer, link.clone());
        let tasks = vec![
            tokio::spawn(writer(link.clone(), Class::Control, crx)),
            tokio::spawn(writer(link.clone(), Class::Bulk, brx)),
            tokio::spawn(writer(link, Class::Snapshot, srx)),
        ];
        peers.insert(
            peer,
            PeerQueues {
                control: ctx,
                bulk: btx,
                snapshot: stx,
                warn: Mutex::new(WarnLimiter::new()),
                tasks,
            },
        );
    }

    /// Stops a removed peer's writers and closes its connection.
    fn remove_peer(&self, peer: NodeId) {
        let Some(q) = write_lock(&self.peers).remove(&peer) else {
            return;
        };
        for t in &q.tasks {
            t.abort();
        }
        write_lock(&self.addrs).remove(&peer);
        if let Some(link) = write_lock(&self.links).remove(&peer) {
            tokio::spawn(async move {
                if let Some(conn) = link.conn.lock().await.take() {
                    conn.close(quinn::VarInt::from_u32(0), b"removed from the cluster");
                }
            });
        }
        tracing::info!(node = self.id, peer, "peer removed; connection closed");
    }

    /// The peers this transport keeps links to.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        read_lock(&self.peers).keys().copied().collect()
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint.local_addr().map_err(|source| NetError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// Sets or changes a peer's address (for example once it is known after
    /// binding to port 0). The id must be one of the configured peers.
    pub fn set_peer_addr(&self, id: NodeId, addr: SocketAddr) -> Result<(), NetError> {
        if !read_lock(&self.peers).contains_key(&id) {
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
        for q in read_lock(&self.peers).values() {
            for t in &q.tasks {
                t.abort();
            }
        }
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// `host:port` to a socket address (an IP literal, or a name resolved now).
fn resolve(addr: &str) -> Option<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Some(a);
    }
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs().ok()?.next()
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
        // A node this one has no link to but has heard from (a member
        // whose configuration entry has not arrived here yet; a joining
        // node's leader) gets one: its address came with its connection.
        if !read_lock(&self.peers).contains_key(&msg.to)
            && read_lock(&self.addrs).contains_key(&msg.to)
        {
            self.add_peer(msg.to);
        }
        let peers = read_lock(&self.peers);
        let Some(q) = peers.get(&msg.to) else {
            tracing::debug!(node = self.id, to = msg.to, "no such peer");
            return;
        };
        let to = msg.to;
        let tx = if matches!(msg.body, MessageBody::SnapshotChunk { .. }) {
            &q.snapshot
        } else if is_control(&msg) {
            &q.control
        } else {
            &q.bulk
        };
        if tx.try_send(msg).is_ok() {
            self.handler_slot
                .sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.handler_slot
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        // The message's share of the byte budget is given back here.
        self.inbound.recv().await.map(|(m, _permit)| m)
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.handler_slot.max_frame)
    }

    fn update_members(&self, members: &Membership) {
        // Addresses recorded in the configuration (those given at start
        // stay until the configuration records others).
        for (&id, m) in &members.nodes {
            if id == self.id || m.addr.is_empty() {
                continue;
            }
            match resolve(&m.addr) {
                Some(a) => {
                    write_lock(&self.addrs).insert(id, a);
                }
                None => {
                    tracing::warn!(node = self.id, peer = id, addr = %m.addr, "cannot resolve a member's address")
                }
            }
        }
        let wanted = members.all_members();
        for &id in &wanted {
            self.add_peer(id);
        }
        // A node not yet added anywhere (no voters) keeps what it has.
        if !members.voters.is_empty() {
            let gone: Vec<NodeId> = read_lock(&self.peers)
                .keys()
                .copied()
                .filter(|id| !wanted.contains(id))
                .collect();
            for id in gone {
                self.remove_peer(id);
            }
        }
    }

    fn rpc_endpoint(&mut self) -> Option<RpcEndpoint> {
        if self.rpc_taken {
            return None;
        }
        self.rpc_taken = true;
        let (tx, rx) = mpsc::channel(RPC_QUEUE);
        *self
            .handler_slot
            .rpc
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        Some(RpcEndpoint {
            client: Arc::new(self.rpc.clone()),
            inbound: rx,
        })
    }
}
