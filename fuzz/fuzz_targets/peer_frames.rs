//! Any frame body from a peer: decoding never panics, and whatever decodes is
//! fed to Raft engines (a follower and a candidate), which must not panic
//! either, whatever the message claims.
#![no_main]
use libfuzzer_sys::fuzz_target;
use raft_core::{Config, Engine, InitialState, Membership};
use std::time::Duration;

fn engine(id: u64) -> Engine {
    let init = InitialState {
        membership: Membership::new([1, 2, 3]),
        ..Default::default()
    };
    Engine::new(Config::new(id), init, 7, Duration::ZERO).expect("valid")
}

fuzz_target!(|data: &[u8]| {
    // Several frames: a length byte, then that many bytes.
    let mut rest = data;
    // One engine as a fresh follower, one that has started campaigning (so
    // vote answers from the input can make it leader).
    let mut follower = engine(1);
    let mut campaigner = engine(1);
    let t = campaigner.next_deadline();
    campaigner.tick(t);
    let _ = campaigner.take_ready();
    let mut now = t;
    while let Some((&n, tail)) = rest.split_first() {
        let n = (n as usize).min(tail.len());
        let (body, tail) = tail.split_at(n);
        rest = tail;
        if let Ok(msg) = raft_net_quic::wire::decode_body(body) {
            now += Duration::from_millis(1);
            for e in [&mut follower, &mut campaigner] {
                e.tick(now);
                e.handle_message(now, msg.clone());
                if let Some(last) = e.take_ready().last_entry() {
                    e.persisted(last);
                }
            }
        }
    }
});
