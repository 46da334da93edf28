//! This crate's error type.

use std::net::SocketAddr;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Certificates or keys could not be loaded, generated or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The endpoint could not be created.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid transport configuration: {0}")]
    Config(String),
}
