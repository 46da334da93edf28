//! Crash-test child: opens a log store (`sled`: SledLogStore, `wal`:
//! WalLogStore, `wal-small`: WalLogStore with 4 KiB segments), performs the deterministic operation stream from a given
//! position, and prints `ack N` after operation N is durable. The test
//! kills it with SIGKILL at random moments.
//!
//! Usage: log_crash_child DIR SEED FIRST_OP ENGINE

use integration_tests::log_ops::{apply, op, Op};
use raft_core::LogStore;
use raft_log::SledLogStore;
use raft_log_wal::WalLogStore;
use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: log_crash_child DIR SEED FIRST_OP sled|wal|wal-small"
    );
    let seed: u64 = args[2].parse()?;
    let first: u64 = args[3].parse()?;
    match args[4].as_str() {
        "sled" => run(SledLogStore::open(&args[1])?, seed, first).await,
        "wal" => run(WalLogStore::open(&args[1])?, seed, first).await,
        "wal-small" => {
            let opts = raft_log_wal::WalOptions {
                segment_bytes: 4096,
            };
            run(WalLogStore::open_with(&args[1], opts)?, seed, first).await
        }
        other => anyhow::bail!("unknown engine {other}"),
    }
}

async fn run(mut store: impl LogStore, seed: u64, first: u64) -> anyhow::Result<()> {
    let mut state = store.load().await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for n in first..first + 100_000 {
        let o = op(seed, n, &state);
        match &o {
            Op::Save(b) => store.save(b.clone()).await?,
            Op::Purge(id) => store.purge(*id).await?,
        }
        apply(&mut state, &o)?;
        writeln!(out, "ack {n}")?;
        out.flush()?;
    }
    Ok(())
}
