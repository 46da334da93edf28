//! raft-kv: the replicated key-value store. Not implemented yet; see the README.
