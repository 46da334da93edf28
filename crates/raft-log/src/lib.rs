//! raft-log: a durable `LogStore` on sled. Not implemented yet; see the README.
