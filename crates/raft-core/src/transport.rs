//! Moving messages between nodes: the [`Transport`] trait, and an in-process
//! [`ChannelNetwork`] with fault injection (drop, delay, partition) for tests
//! and examples.

use crate::engine::rng::SplitMix64;
use crate::message::Message;
use crate::types::NodeId;
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Carries Raft messages to peers and brings theirs in.
///
/// Contract:
/// * `send` never blocks and never fails loudly: Raft tolerates lost, delayed,
///   duplicated and reordered messages, so a transport may drop a message it
///   cannot deliver (a dead peer, a full queue). It should bound the memory it
///   spends on a peer that does not answer.
/// * `recv` yields messages addressed to this node; a transport that
///   authenticates peers must only yield messages whose `from` is the
///   authenticated sender. `None` means the transport is closed for good.
#[async_trait]
pub trait Transport: Send + 'static {
    /// Queues a message for `msg.to`.
    fn send(&self, msg: Message);

    /// Waits for the next inbound message.
    async fn recv(&mut self) -> Option<Message>;

    /// The largest encoded message this transport carries, if it has a
    /// limit. The node refuses settings that could produce a larger one
    /// (`Config::validate_for_transport`), so no message is ever dropped for
    /// its size.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }
}

#[derive(Debug)]
struct NetState {
    inboxes: HashMap<NodeId, mpsc::UnboundedSender<Message>>,
    blocked: BTreeSet<(NodeId, NodeId)>,
    drop_per_mille: u64,
    delay: (Duration, Duration),
    rng: SplitMix64,
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
                blocked: BTreeSet::new(),
                drop_per_mille: 0,
                delay: (Duration::ZERO, Duration::ZERO),
                rng: SplitMix64::new(0x5eed),
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
        self.lock().inboxes.insert(id, tx);
        ChannelTransport {
            id,
            net: self.clone(),
            rx,
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
            if p > 0 && s.rng.range(0, 1000) < p {
                return;
            }
            let Some(tx) = s.inboxes.get(&msg.to).cloned() else {
                return;
            };
            let (lo, hi) = s.delay;
            let d = if hi.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(
                    s.rng
                        .range(lo.as_micros() as u64, hi.as_micros() as u64 + 1),
                )
            };
            (tx, d)
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
}
