//! Moving messages between nodes: the [`Transport`] trait Raft messages
//! travel through, the transport-neutral [`PeerRpc`] contract applications
//! use to talk to other members (a write forwarded to the leader), and the
//! in-process [`ChannelNetwork`] that implements both for tests and examples.

mod channel;

pub use channel::{ChannelNetwork, ChannelTransport};

use crate::message::Message;
use crate::types::{Membership, NodeId};
use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

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

    /// The application's request channel to the other members, over the
    /// same authenticated links. Take it once, before the transport moves
    /// into a node; `None` when this transport carries no requests (or it
    /// was taken already).
    fn rpc_endpoint(&mut self) -> Option<RpcEndpoint> {
        None
    }

    /// The configuration in force changed (a member added or removed, an
    /// address recorded): a transport that needs addresses takes them from
    /// `Membership::nodes` and drops links to nodes that are no longer
    /// members. Called once at start and after every change.
    fn update_members(&self, _members: &Membership) {}
}

/// Sends application requests to other members and waits for their replies.
///
/// Contract: a request is delivered at most once. `Unreachable` and
/// `UnknownPeer` mean it was not delivered; `Broken` means it may or may not
/// have been handled. Replies come from the member asked, authenticated as
/// strongly as the transport's Raft messages. Callers add their own timeout.
#[async_trait]
pub trait PeerRpc: Send + Sync + 'static {
    /// Sends `request` to `to` and waits for its reply.
    async fn call(&self, to: NodeId, request: Vec<u8>) -> Result<Vec<u8>, RpcError>;

    /// The largest request or reply this transport carries, if it has a limit.
    fn max_request_bytes(&self) -> Option<usize> {
        None
    }
}

/// Why a request to another member failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// No such peer.
    #[error("node {0} is not a peer")]
    UnknownPeer(NodeId),
    /// The peer could not be reached; the request was not delivered.
    #[error("node {0} is unreachable")]
    Unreachable(NodeId),
    /// The exchange broke off; the request may or may not have been handled.
    #[error("exchange with node {0} failed: {1}")]
    Broken(NodeId, String),
}

/// One request from another member. Answer it with [`InboundRpc::reply`];
/// dropping it unanswered breaks the exchange (the caller sees `Broken`).
#[derive(Debug)]
pub struct InboundRpc {
    /// The authenticated sender.
    pub from: NodeId,
    /// The request bytes.
    pub request: Vec<u8>,
    reply: oneshot::Sender<Vec<u8>>,
}

impl InboundRpc {
    /// A request as a transport hands it over, with the channel its reply goes back on.
    pub fn new(from: NodeId, request: Vec<u8>, reply: oneshot::Sender<Vec<u8>>) -> Self {
        InboundRpc {
            from,
            request,
            reply,
        }
    }

    /// Sends the reply back to the member that asked.
    pub fn reply(self, bytes: Vec<u8>) {
        let _ = self.reply.send(bytes);
    }
}

/// Both ends of the application's request channel: a client for outgoing
/// requests, and the stream of requests from other members.
pub struct RpcEndpoint {
    /// Sends requests to other members.
    pub client: Arc<dyn PeerRpc>,
    /// Requests from other members, in arrival order.
    pub inbound: mpsc::Receiver<InboundRpc>,
}

impl std::fmt::Debug for RpcEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcEndpoint").finish_non_exhaustive()
    }
}
