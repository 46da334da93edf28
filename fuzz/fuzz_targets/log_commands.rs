//! Any bytes as a committed log entry or a forwarded request: decoding never
//! panics, and what decodes re-encodes to something that decodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use raft_kv::command::{decode, encode, Forward, WriteCmd};

fuzz_target!(|data: &[u8]| {
    if let Some(cmd) = WriteCmd::decode(data) {
        assert_eq!(WriteCmd::decode(&cmd.encode()), Some(cmd));
    }
    if let Some(f) = decode::<Forward>(data) {
        assert_eq!(decode::<Forward>(&encode(&f)), Some(f));
    }
});
