//! Entries stored before `EntryPayload::Command` held shared bytes (it held
//! a `Vec<u8>` encoded with `serde_bytes`) read back the same, and new ones
//! encode exactly as before: logs and peers of either version agree.

use raft_core::{EntryPayload, Membership};
use serde::{Deserialize, Serialize};

/// The payload as it was declared before.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Before {
    Blank,
    Command(#[serde(with = "serde_bytes")] Vec<u8>),
    Membership(Membership),
}

#[test]
fn command_payloads_encode_as_they_did() {
    let cfg = bincode::config::standard();
    for cmd in [Vec::new(), b"SET k v".to_vec(), vec![0xa5; 70_000]] {
        let old = bincode::serde::encode_to_vec(Before::Command(cmd.clone()), cfg).unwrap();
        let new =
            bincode::serde::encode_to_vec(EntryPayload::Command(cmd.clone().into()), cfg).unwrap();
        assert_eq!(old, new, "{} bytes", cmd.len());
        let (back, used): (EntryPayload, usize) =
            bincode::serde::decode_from_slice(&old, cfg).unwrap();
        assert_eq!(used, old.len());
        assert_eq!(back, EntryPayload::Command(cmd.into()));
    }
    let blank = bincode::serde::encode_to_vec(Before::Blank, cfg).unwrap();
    assert_eq!(
        blank,
        bincode::serde::encode_to_vec(EntryPayload::Blank, cfg).unwrap()
    );
}
