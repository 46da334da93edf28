//! # raft-kv
//!
//! A replicated key-value store on raft-core, with the log on sled
//! (raft-log), the state machine on redb,
//! peers talking QUIC with mutual TLS (raft-net-quic), and clients
//! talking the Redis protocol (RESP2, and RESP3 after `HELLO 3`), so `redis-cli`, `redis-benchmark` and
//! every Redis client library work with it.
//!
//! * Any node accepts any command. Writes go to the leader (forwarded over the
//!   cluster's authenticated QUIC connections); reads are linearizable: the
//!   leader confirms its leadership with a heartbeat round (read index) and the
//!   serving node waits until it has applied that far.
//! * No leader within a bounded wait: `-TRYAGAIN`. A write whose outcome cannot
//!   be known (it was proposed, then timed out or the connection to the leader
//!   broke): `-UNKNOWN`, never a plain failure.
#![deny(missing_docs)]

// The domain: commands, their results and errors, the state machine.
pub mod command;
pub mod error;
mod overlay;
pub mod sm;
pub mod snapfile;
// The Raft adapter: proposing, forwarding, read barriers.
pub mod forward;
pub mod node;
pub mod snapshots;
// The Redis edge: RESP frames and client connections.
pub mod metrics;
pub mod resp;
pub mod server;
// The binary: command line and load generator.
pub mod backup;
pub mod bench;
pub mod cli;
