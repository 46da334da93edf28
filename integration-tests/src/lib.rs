//! Helpers shared by the integration tests and their child processes.

pub mod log_ops;

pub mod linearizable;

pub mod tmpfs;
