//! `raft-kv backup` and `raft-kv restore`.
//!
//! A backup asks any node of a running cluster for `RAFTKV.BACKUP`: the
//! node makes a linearizable read barrier (so the backup holds every write
//! acknowledged before it began) and streams a point-in-time snapshot
//! file. The file is checked (magic, version, checksum) before it is kept.
//!
//! A restore seeds one node of a new cluster from such a file: its state
//! machine is built from it, its log starts right after it (with the new
//! cluster's members), and the file becomes the node's first snapshot, so
//! members that join later are sent it. Every member of the new cluster is
//! restored from the same file before any of them starts.

use crate::node::NodeConfig;
use crate::sm::StateMachine;
use crate::snapfile::{self, Header};
use crate::snapshots::Snapshots;
use anyhow::{anyhow, bail, Context};
use raft_core::{HardState, LogBatch, LogId, LogStore, Membership, SnapshotMeta};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> anyhow::Result<String> {
    let mut l = String::new();
    r.read_line(&mut l).await?;
    if l.is_empty() {
        bail!("the node closed the connection");
    }
    Ok(l.trim_end().to_string())
}

/// Saves a consistent snapshot of the cluster that `addr` belongs to into
/// `out`; returns what it covers.
pub async fn backup(addr: &str, out: &Path, password: Option<&str>) -> anyhow::Result<Header> {
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(1 << 20, rd);
    if let Some(pw) = password {
        wr.write_all(&command(&[b"AUTH", pw.as_bytes()])).await?;
        let l = line(&mut rd).await?;
        if l != "+OK" {
            bail!("AUTH refused: {l}");
        }
    }
    wr.write_all(&command(&[b"RAFTKV.BACKUP"])).await?;
    let head = line(&mut rd).await?;
    let len: u64 = match head.strip_prefix('$') {
        Some(n) => n.parse().with_context(|| format!("bad reply {head:?}"))?,
        None => bail!(
            "the node refused the backup: {}",
            head.trim_start_matches('-')
        ),
    };
    let tmp = out.with_extension("partial");
    {
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let copied = tokio::io::copy(&mut (&mut rd).take(len), &mut f).await?;
        if copied != len {
            bail!("the connection broke after {copied} of {len} bytes");
        }
        f.sync_all().await?;
    }
    let mut crlf = [0u8; 2];
    rd.read_exact(&mut crlf).await?;
    let t2 = tmp.clone();
    let header = tokio::task::spawn_blocking(move || snapfile::verify(&t2)).await??;
    tokio::fs::rename(&tmp, out).await?;
    Ok(header)
}

/// Seeds node `cfg` of a new cluster from the backup `from`. Refuses a
/// data directory that already holds a log or a state.
pub async fn restore(from: &Path, cfg: &NodeConfig) -> anyhow::Result<Header> {
    let f2 = from.to_path_buf();
    let header = tokio::task::spawn_blocking(move || snapfile::verify(&f2))
        .await?
        .with_context(|| format!("{} cannot be restored", from.display()))?;
    let rc = cfg.raft_config()?;
    let dir = &cfg.data_dir;
    for part in ["log", "sm", "snapshots"] {
        let p = dir.join(part);
        if p.exists()
            && std::fs::read_dir(&p)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "{} already holds data: restore seeds a new node into an empty data directory",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The log starts after the snapshot, with the new cluster's members.
    let term = header.term.max(1);
    let meta = SnapshotMeta {
        last: LogId::new(term, header.index),
        membership: Membership::new(rc.members()),
    };
    // The snapshot file first (a restore cut short leaves no log that
    // names a missing snapshot), then the state machine, then the log.
    let snaps = Snapshots::open(&dir.join("snapshots")).map_err(|e| anyhow!("{e}"))?;
    let tmp = snaps.temp_path();
    std::fs::copy(from, &tmp).with_context(|| format!("cannot copy {}", from.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    let snap_path = snaps.publish(&tmp, header.index, term)?;
    let sm_dir = dir.join("sm");
    let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<Header> {
        let sm = StateMachine::open(&sm_dir)?;
        let h = sm.load_snapshot(&snap_path)?;
        sm.flush()?;
        Ok(h)
    })
    .await??;
    if loaded != header {
        bail!("the restored state does not match the file: {loaded:?} vs {header:?}");
    }
    let mut log = raft_log::SledLogStore::open_async(dir.join("log")).await?;
    log.save(LogBatch {
        hard_state: Some(HardState { term, vote: None }),
        install: Some(meta),
        ..LogBatch::default()
    })
    .await?;
    drop(log);
    Ok(header)
}
