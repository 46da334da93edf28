//! An in-process network of [`ChannelTransport`]s with faults on demand
//! (drop, delay, partition), for tests and examples. It carries Raft
//! messages and application requests ([`PeerRpc`]) alike, and the same
//! partitions cut both.

use super::{InboundRpc, PeerRpc, RpcEndpoint, RpcError, Transport};
use crate::message::Message;
use crate::types::NodeId;
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests one node may have waiting for its application.
const RPC_QUEUE: usize = 1024;

#[derive(Debug)]
struct NetState {
    inboxes: HashMap<NodeId, mpsc::UnboundedSender<Message>>,
    rpc_inboxes: HashMap<NodeId, mpsc::Sender<InboundRpc>>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    drop_per_mille: u64,
    delay: (Duration, Duration),
    rng: fastrand::Rng,
}

impl NetState {
    fn pick_delay(&mut self) -> Duration {
        let (lo, hi) = self.delay;
        if hi.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_micros(self.rng.u64(lo.as_micros() as u64..=hi.as_micros() as u64))
    }
}

/// An in-process network joining [`ChannelTransport`]s, with faults on demand.
/// Clones share the same network.
#[derive(Debug, Clone)]
pub struct ChannelNetwork {
    state: Arc<Mutex<NetState>>,
}

impl Default for ChannelNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl ChannelNetwork {
    /// A network with no faults.
    pub fn new() -> Self {
        ChannelNetwork {
            state: Arc::new(Mutex::new(NetState {
                inboxes: HashMap::new(),
                rpc_inboxes: HashMap::new(),
                blocked: BTreeSet::new(),
                drop_per_mille: 0,
                delay: (Duration::ZERO, Duration::ZERO),
                rng: fastrand::Rng::with_seed(0x5eed),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches node `id`, replacing an earlier attachment of the same id
    /// (as a restarted process would).
    pub fn join(&self, id: NodeId) -> ChannelTransport {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.lock();
        s.inboxes.insert(id, tx);
        // A restarted node's old requests go nowhere until it asks anew.
        s.rpc_inboxes.remove(&id);
        drop(s);
        ChannelTransport {
            id,
            net: self.clone(),
            rx,
            rpc_taken: false,
        }
    }

    /// Splits the nodes into groups that cannot reach each other. Nodes not
    /// named in any group are cut off from everyone.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let mut s = self.lock();
        let mut all: BTreeSet<NodeId> = s.inboxes.keys().copied().collect();
        all.extend(groups.iter().flat_map(|g| g.iter().copied()));
        let group_of = |id: NodeId| groups.iter().position(|g| g.contains(&id));
        s.blocked.clear();
        for &a in &all {
            for &b in &all {
                if a != b && (group_of(a).is_none() || group_of(a) != group_of(b)) {
                    s.blocked.insert((a, b));
                }
            }
        }
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: NodeId) {
        let mut s = self.lock();
        let others: Vec<NodeId> = s.inboxes.keys().copied().filter(|&o| o != id).collect();
        for o in others {
            s.blocked.insert((id, o));
            s.blocked.insert((o, id));
        }
    }

    /// Cuts only the direction `from -> to`.
    pub fn block(&self, from: NodeId, to: NodeId) {
        self.lock().blocked.insert((from, to));
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().blocked.clear();
    }

    /// Drops each message with this probability (per mille, 0..=1000).
    pub fn set_drop_per_mille(&self, p: u64) {
        self.lock().drop_per_mille = p.min(1000);
    }

    /// Delays each message by a random time in `[min, max]`.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.lock().delay = (min, max.max(min));
    }

    fn route(&self, msg: Message) {
        let (tx, delay) = {
            let mut s = self.lock();
            if s.blocked.contains(&(msg.from, msg.to)) {
                return;
            }
            let p = s.drop_per_mille;
            if p > 0 && s.rng.u64(0..1000) < p {
                return;
            }
            let Some(tx) = s.inboxes.get(&msg.to).cloned() else {
                return;
            };
            (tx, s.pick_delay())
        };
        if delay.is_zero() {
            let _ = tx.send(msg);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(msg);
            });
        }
    }
}

/// One node's attachment to a [`ChannelNetwork`].
#[derive(Debug)]
pub struct ChannelTransport {
    id: NodeId,
    net: ChannelNetwork,
    rx: mpsc::UnboundedReceiver<Message>,
    rpc_taken: bool,
}

#[async_trait]
impl Transport for ChannelTransport {
    fn send(&self, msg: Message) {
        if msg.from != self.id {
            tracing::warn!(
                node = self.id,
                from = msg.from,
                "refusing to send a message under another id"
            );
            return;
        }
        self.net.route(msg);
    }

    async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    fn rpc_endpoint(&mut self) -> Option<RpcEndpoint> {
        if self.rpc_taken {
            return None;
        }
        self.rpc_taken = true;
        let (tx, rx) = mpsc::channel(RPC_QUEUE);
        self.net.lock().rpc_inboxes.insert(self.id, tx);
        Some(RpcEndpoint {
            client: Arc::new(ChannelRpc {
                id: self.id,
                net: self.net.clone(),
            }),
            inbound: rx,
        })
    }
}

/// Application requests over a [`ChannelNetwork`]: cut by the same
/// partitions, slowed by the same delays as Raft messages.
#[derive(Debug)]
struct ChannelRpc {
    id: NodeId,
    net: ChannelNetwork,
}

#[async_trait]
impl PeerRpc for ChannelRpc {
    async fn call(&self, to: NodeId, request: Vec<u8>) -> Result<Vec<u8>, RpcError> {
        let (inbox, delay) = {
            let mut s = self.net.lock();
            if s.blocked.contains(&(self.id, to)) {
                return Err(RpcError::Unreachable(to));
            }
            let inbox = s
                .rpc_inboxes
                .get(&to)
                .cloned()
                .ok_or(RpcError::Unreachable(to))?;
            (inbox, s.pick_delay())
        };
        tokio::time::sleep(delay).await;
        let (reply, rx) = oneshot::channel();
        inbox
            .send(InboundRpc {
                from: self.id,
                request,
                reply,
            })
            .await
            .map_err(|_| RpcError::Unreachable(to))?;
        let answer = rx
            .await
            .map_err(|_| RpcError::Broken(to, "no reply".into()))?;
        if self.net.lock().blocked.contains(&(to, self.id)) {
            return Err(RpcError::Broken(
                to,
                "the link was cut before the reply".into(),
            ));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{transport_conformance, NetworkFactory};

    struct Channels;

    #[async_trait]
    impl NetworkFactory for Channels {
        type Transport = ChannelTransport;
        async fn cluster(&mut self, ids: &[NodeId]) -> Vec<ChannelTransport> {
            let net = ChannelNetwork::new();
            ids.iter().map(|&id| net.join(id)).collect()
        }
    }

    #[tokio::test]
    async fn channel_transport_conforms() {
        transport_conformance(Channels).await;
    }
}
