//! Crash safety of the log stores (SledLogStore and WalLogStore): a child
//! process performs a known stream of writes and reports each acknowledged
//! one; it is killed with SIGKILL at random moments; after each kill the
//! store must hold exactly the state after the last acknowledged operation,
//! or after the one in flight (written whole, not yet acknowledged) — never
//! a half-written batch, never less.

use integration_tests::log_ops::{apply, op};
use raft_core::storage::LogState;
use raft_core::LogStore;
use raft_log::SledLogStore;
use raft_log_wal::WalLogStore;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const KILLS: usize = 30;

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    survives_sigkill("sled").await;
}

#[tokio::test]
async fn acknowledged_writes_survive_sigkill_on_the_segment_log() {
    survives_sigkill("wal").await;
}

/// With 4 KiB segments a new segment starts, and an old one is deleted,
/// every few operations: kills land in those too.
#[tokio::test]
async fn acknowledged_writes_survive_sigkill_on_small_segments() {
    survives_sigkill("wal-small").await;
}

async fn load(engine: &str, path: &std::path::Path) -> Result<LogState, String> {
    match engine {
        "sled" => SledLogStore::open(path)
            .map_err(|e| e.to_string())?
            .load()
            .await
            .map_err(|e| e.to_string()),
        "wal" => WalLogStore::open(path)
            .map_err(|e| e.to_string())?
            .load()
            .await
            .map_err(|e| e.to_string()),
        _ => WalLogStore::open_with(
            path,
            raft_log_wal::WalOptions {
                segment_bytes: 4096,
            },
        )
        .map_err(|e| e.to_string())?
        .load()
        .await
        .map_err(|e| e.to_string()),
    }
}

async fn survives_sigkill(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let seed = 0xC0FFEE;
    let mut expected = LogState::default();
    let mut next_op = 0u64;
    let mut total_acked = 0u64;
    for kill in 0..KILLS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_log_crash_child"))
            .arg(&path)
            .arg(seed.to_string())
            .arg(next_op.to_string())
            .arg(engine)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(
            lines.next().and_then(|l| l.ok()).as_deref(),
            Some("ready"),
            "child failed to open the store"
        );
        // Let it acknowledge a varying number of operations, then kill it mid-stream.
        let wait_acks = 1 + (kill * 7) % 23;
        let mut last_ack: Option<u64> = None;
        for _ in 0..wait_acks {
            match lines.next() {
                Some(Ok(l)) => last_ack = Some(l.trim_start_matches("ack ").parse().unwrap()),
                other => panic!("child stopped early: {other:?}"),
            }
        }
        std::thread::sleep(Duration::from_micros(((kill * 977) % 3000) as u64));
        child.kill().expect("SIGKILL");
        for l in lines.map_while(Result::ok) {
            last_ack = Some(l.trim_start_matches("ack ").parse().unwrap());
        }
        child.wait().unwrap();
        let last_ack = last_ack.expect("at least one ack");
        total_acked += last_ack + 1 - next_op;

        // Model: the state after every acknowledged op, and after one more.
        let mut at_ack = expected.clone();
        for n in next_op..=last_ack {
            let o = op(seed, n, &at_ack);
            apply(&mut at_ack, &o).unwrap();
        }
        let mut one_more = at_ack.clone();
        let o = op(seed, last_ack + 1, &one_more);
        apply(&mut one_more, &o).unwrap();

        let actual = load(engine, &path)
            .await
            .unwrap_or_else(|e| panic!("{engine}, kill {kill}: reopen failed: {e}"));
        if actual == at_ack {
            expected = at_ack;
            next_op = last_ack + 1;
        } else if actual == one_more {
            expected = one_more;
            next_op = last_ack + 2;
        } else {
            panic!(
                "kill {kill}: store after SIGKILL matches neither op {last_ack} (acked) nor op {}: \
                 {} entries (last {:?}), hard state {:?}, expected {} entries (last {:?}), hard state {:?}",
                last_ack + 1,
                actual.entries.len(),
                actual.entries.last().map(|e| e.log_id()),
                actual.hard_state,
                at_ack.entries.len(),
                at_ack.entries.last().map(|e| e.log_id()),
                at_ack.hard_state,
            );
        }
    }
    println!(
        "{engine}: {KILLS} SIGKILLs, {total_acked} acknowledged operations, all present after every restart"
    );
    assert!(total_acked >= KILLS as u64);
}
