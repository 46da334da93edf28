//! Any bytes as a committed log entry, a forwarded request or its reply:
//! decoding never panics, and what decodes re-encodes to something that
//! decodes the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use raft_kv::command::WriteCmd;
use raft_kv::forward::{Forward, ForwardReply};

fuzz_target!(|data: &[u8]| {
    if let Some(cmd) = WriteCmd::decode(data) {
        assert_eq!(WriteCmd::decode(&cmd.encode()), Some(cmd));
    }
    if let Some(f) = Forward::decode(data) {
        assert_eq!(Forward::decode(&f.encode()), Some(f));
    }
    if let Some(r) = ForwardReply::decode(data) {
        assert_eq!(ForwardReply::decode(&r.encode()), Some(r));
    }
});
