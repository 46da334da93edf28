//! # raft-core
//!
//! The Raft consensus protocol in two layers:
//!
//! * [`engine`]: the whole protocol as a deterministic state machine with no I/O,
//!   no clock and no thread RNG. Time and randomness are inputs; storage writes and
//!   messages are outputs. This is where correctness lives, and what the seeded
//!   cluster simulator in this crate's tests drives through faults.
//! * [`node`]: the tokio driver that owns one engine, one [`LogStore`] and one
//!   [`Transport`], and exposes the [`Raft`] handle: `new`, `start`,
//!   `is_leader`, `submit`, `leader`, `read_index`, `shutdown`, and the apply
//!   channel of [`ApplyMsg`].
//!
//! Storage and network are traits: [`MemLogStore`] and [`ChannelNetwork`] ship
//! here for tests and examples; `raft-log` and `raft-net-quic` provide the
//! durable and networked ones.
#![deny(missing_docs)]

mod config;
pub mod engine;
pub mod message;
pub(crate) mod mutation;
pub mod node;
mod rng;
pub mod snapshot;
pub mod storage;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod types;

#[cfg(test)]
mod sim;

pub use config::{Config, ConfigError, ReadPolicy};
pub use engine::{
    ChangeError, ChangeStep, Engine, EngineError, InitialState, NotLeader, ProposeError,
    ReadResult, Ready, TransferError,
};
pub use message::{Message, MessageBody, RejectHint, MESSAGE_OVERHEAD};
pub use node::{ApplyMsg, Error, Proposal, Raft, Responder, Status};
pub use snapshot::{MemSnapshotStore, SnapshotReader, SnapshotStore, SnapshotWriter};
pub use storage::{LogBatch, LogState, LogStore, MemLogStore, StorageError};
pub use transport::{
    ChannelNetwork, ChannelTransport, InboundRpc, PeerRpc, RpcEndpoint, RpcError, Transport,
};
pub use types::{
    Entry, EntryPayload, HardState, LogId, LogIndex, Member, Membership, NodeId, Role,
    SnapshotMeta, Term, ENTRY_OVERHEAD,
};
