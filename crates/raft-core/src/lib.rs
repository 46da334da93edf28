//! # raft-core
//!
//! The Raft consensus protocol in two layers:
//!
//! * [`engine`]: the whole protocol as a deterministic state machine with no I/O,
//!   no clock and no thread RNG. Time and randomness are inputs; storage writes and
//!   messages are outputs. This is where correctness lives, and what the seeded
//!   cluster simulator in this crate's tests drives through faults.
//! * `node` (coming with the async driver): owns an engine, a [`LogStore`-like]
//!   storage and a transport, and exposes the `Raft` handle.
#![deny(missing_docs)]

pub mod engine;
pub mod message;
pub mod types;

#[cfg(test)]
mod sim;

pub use engine::{Engine, EngineConfig, EngineError, InitialState, NotLeader, ReadResult, Ready};
pub use message::{Message, MessageBody, RejectHint};
pub use types::{Entry, EntryPayload, HardState, LogId, LogIndex, Membership, NodeId, Role, Term};
