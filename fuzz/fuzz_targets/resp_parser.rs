//! Any bytes from a client: the RESP parser returns commands, "need more" or
//! an error, never panics, never claims more bytes than it was given, and
//! respects its limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use raft_kv::resp::{parse_command, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_bulk: 64,
        max_args: 16,
        ..Limits::default()
    };
    let mut at = 0;
    while at < data.len() {
        match parse_command(&data[at..], &limits) {
            Ok(Some((args, used))) => {
                assert!(used > 0 && at + used <= data.len());
                assert!(args.len() <= limits.max_args);
                assert!(args.iter().all(|a| a.len() <= limits.max_bulk));
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
