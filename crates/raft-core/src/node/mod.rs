//! The async Raft node: one tokio task that owns an [`Engine`], a [`LogStore`]
//! and a [`Transport`], and the [`Raft`] handle applications talk to.
//!
//! Each turn of the driver waits for anything (a request, a peer message, a
//! timer, a finished disk write), then takes everything else already waiting,
//! feeds it all to the engine, and carries out the engine's output. Log writes
//! run one after another as a future the driver polls alongside everything
//! else; the ones that queue up meanwhile go into the next durable `save`
//! together (group commit). The driver keeps turning while a write runs, so heartbeats, votes refused and a leader's appends
//! travel while the disk works. What promises durable state (acknowledgements,
//! votes, and while a term or vote is being written, every message) goes out
//! only once the writes before it have returned.
//! Committed entries flow to the application's apply channel through a
//! separate task, so a slow application never delays heartbeats.

mod apply;
mod driver;
mod error;
mod handle;
mod transfer;

pub use apply::{ApplyMsg, Proposal, Responder};
pub use error::Error;
pub use handle::{Raft, Status};

#[cfg(test)]
mod tests;
