//! raft-net-quic: a QUIC `Transport` with mutual TLS. Not implemented yet; see the README.
