//! Runnable examples of embedding the crates of this workspace; see the
//! `[[example]]` targets in this package's Cargo.toml.
