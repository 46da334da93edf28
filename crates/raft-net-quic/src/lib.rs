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
pub use tls::{generate_cluster_certs, ClusterCa, TlsMaterial};

use async_trait::async_trait;
use inbound::{accept_loop, Inbound};
use peer::{lock, writer, Backoff, Class, PeerLink, PeerQueues, WarnLimiter};
use raft_core::{Message, MessageBody, NodeId, RpcEndpoint, Transport};
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
            // A snapshot sender keeps a few chunks in flight; a short queue
            // bounds the memory a stuck peer can hold.
            let (stx, srx) = mpsc::channel(SNAPSHOT_QUEUE);
            links.insert(peer, link.clone());
            tasks.push(tokio::spawn(writer(link.clone(), Class::Control, crx)));
            tasks.push(tokio::spawn(writer(link.clone(), Class::Bulk, brx)));
            tasks.push(tokio::spawn(writer(link, Class::Snapshot, srx)));
            peers.insert(
                peer,
                PeerQueues {
                    control: ctx,
                    bulk: btx,
                    snapshot: stx,
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
            rpc_taken: false,
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
        let tx = if matches!(msg.body, MessageBody::SnapshotChunk { .. }) {
            &q.snapshot
        } else if is_control(&msg) {
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
