//! How a node talks to its peers: [`QuicConfig`].

use raft_core::NodeId;
use std::collections::BTreeMap;
use std::net::SocketAddr;

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
