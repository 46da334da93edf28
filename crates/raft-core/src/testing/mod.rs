//! Test helpers for users of raft-core (feature `testing`): conformance
//! suites that any [`LogStore`](crate::LogStore) and any
//! [`Transport`](crate::Transport) must pass. The in-memory implementations
//! run them in this crate's tests; raft-log and raft-net-quic run them on
//! theirs.

mod log_store;
mod transport;

pub use log_store::{log_store_conformance, MemStoreFactory, StoreFactory};
pub use transport::{transport_conformance, NetworkFactory};
