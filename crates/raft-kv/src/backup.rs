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

use crate::node::{LogEngine, NodeConfig};
use crate::sm::StateMachine;
use crate::snapfile::{self, Header};
use crate::snapshots::Snapshots;
use anyhow::{anyhow, bail, Context};
use raft_core::{HardState, LogBatch, LogId, LogStore, Membership, SnapshotMeta};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// How the command-line tools (`backup`, `member`, `transfer`, `node
/// --join`) reach a node's client port: its password, and TLS when the
/// port serves it.
#[derive(Debug, Clone, Default)]
pub struct Dial {
    /// Sent with `AUTH` first.
    pub password: Option<String>,
    /// TLS settings; `None` for plain TCP.
    pub tls: Option<DialTls>,
}

/// TLS for the tools.
#[derive(Debug, Clone)]
pub struct DialTls {
    config: Arc<rustls::ClientConfig>,
    /// The name the node's certificate must carry (default: the host part
    /// of the address).
    server_name: Option<String>,
}

impl DialTls {
    /// Trusts the CA certificates in `ca` (PEM); presents `cert`/`key` when
    /// given (a port that checks client certificates); expects the server's
    /// certificate to name `server_name` (else the address's host).
    pub fn new(
        ca: &Path,
        cert_key: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("cannot read {}", ca.display()))?
        {
            roots
                .add(c.with_context(|| format!("{}", ca.display()))?)
                .with_context(|| format!("{}", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("{}: no certificate in file", ca.display());
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config = match cert_key {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("{}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("cannot read {}", key.display()))?;
                b.with_client_auth_cert(chain, key)?
            }
            None => b.with_no_client_auth(),
        };
        Ok(DialTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// Both halves of a connection to a client port.
type Halves = (
    BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    Box<dyn AsyncWrite + Unpin + Send>,
);

/// Connects to `addr` and authenticates; `buffer` bytes of read buffer.
async fn dial(addr: &str, how: &Dial, buffer: usize) -> anyhow::Result<Halves> {
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (rd, wr): (
        Box<dyn AsyncRead + Unpin + Send>,
        Box<dyn AsyncWrite + Unpin + Send>,
    ) = match &how.tls {
        None => {
            let (r, w) = sock.into_split();
            (Box::new(r), Box::new(w))
        }
        Some(t) => {
            let host = match &t.server_name {
                Some(n) => n.clone(),
                None => addr
                    .rsplit_once(':')
                    .map_or(addr, |(h, _)| h)
                    .trim_matches(['[', ']'])
                    .to_string(),
            };
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .with_context(|| format!("bad TLS server name {host:?}"))?;
            let s = tokio_rustls::TlsConnector::from(t.config.clone())
                .connect(name, sock)
                .await
                .with_context(|| format!("TLS with {addr} failed"))?;
            let (r, w) = tokio::io::split(s);
            (Box::new(r), Box::new(w))
        }
    };
    let mut rd = BufReader::with_capacity(buffer, rd);
    let mut wr = wr;
    if let Some(pw) = &how.password {
        wr.write_all(&command(&[b"AUTH", pw.as_bytes()])).await?;
        let l = line(&mut rd).await?;
        if l != "+OK" {
            bail!("AUTH refused: {l}");
        }
    }
    Ok((rd, wr))
}

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
pub async fn backup(addr: &str, out: &Path, how: &Dial) -> anyhow::Result<Header> {
    let (mut rd, mut wr) = dial(addr, how, 1 << 20).await?;
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
    let batch = LogBatch {
        hard_state: Some(HardState { term, vote: None }),
        install: Some(meta),
        ..LogBatch::default()
    };
    // The engine the node will open the log with.
    let log_dir = dir.join("log");
    match cfg.log_engine.resolve(&log_dir) {
        LogEngine::Sled => {
            let mut log = raft_log::SledLogStore::open_async(&log_dir).await?;
            log.save(batch).await?;
        }
        LogEngine::Wal | LogEngine::Auto => {
            let mut log = raft_log_wal::WalLogStore::open_async(&log_dir).await?;
            log.save(batch).await?;
        }
    }
    Ok(header)
}

/// Sends one command to a node's client port and returns its reply as
/// text (an error reply becomes an error).
pub async fn call(addr: &str, how: &Dial, args: &[String]) -> anyhow::Result<String> {
    let (mut rd, mut wr) = dial(addr, how, 8192).await?;
    let parts: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    wr.write_all(&command(&parts)).await?;
    read_reply(&mut rd).await
}

async fn read_bulk<R: AsyncBufReadExt + Unpin>(rd: &mut R, len: &str) -> anyhow::Result<String> {
    let n: i64 = len.parse().with_context(|| format!("bad length {len:?}"))?;
    let Ok(n) = usize::try_from(n) else {
        return Ok("(nil)".into());
    };
    if n > 1 << 20 {
        bail!("reply of {n} bytes is too large");
    }
    let mut b = vec![0u8; n + 2];
    rd.read_exact(&mut b).await?;
    b.truncate(n);
    Ok(String::from_utf8_lossy(&b).into_owned())
}

async fn read_reply<R: AsyncBufReadExt + Unpin>(rd: &mut R) -> anyhow::Result<String> {
    let head = line(rd).await?;
    let (kind, rest) = head.split_at(head.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => bail!("{rest}"),
        "$" => read_bulk(rd, rest).await,
        "*" => {
            let n: usize = rest
                .parse()
                .with_context(|| format!("bad reply {head:?}"))?;
            let mut out = Vec::new();
            for _ in 0..n.min(10_000) {
                let h = line(rd).await?;
                match h.strip_prefix('$') {
                    Some(len) => out.push(read_bulk(rd, len).await?),
                    None => out.push(h),
                }
            }
            Ok(out.join("\n"))
        }
        _ => bail!("unexpected reply {head:?}"),
    }
}

/// Asks the cluster at `at` (any member's client address) to add this
/// node as a learner, then to promote it once it has caught up.
pub async fn join(
    at: &str,
    node: &crate::node::KvNode,
    raft_addr: std::net::SocketAddr,
    how: &Dial,
) -> anyhow::Result<()> {
    let id = node.id().to_string();
    let add = [
        "RAFT.MEMBER".to_string(),
        "ADD".into(),
        id.clone(),
        raft_addr.to_string(),
        format!("{:x}", node.identity()),
    ];
    let mut added = false;
    for attempt in 0..600u32 {
        if !added {
            match call(at, how, &add).await {
                Ok(m) => {
                    tracing::info!(membership = %m, "added to the cluster as a learner");
                    added = true;
                }
                Err(e) if e.to_string().contains("member already") => added = true,
                Err(e) => {
                    if attempt % 10 == 0 {
                        tracing::warn!(error = %format!("{e:#}"), "cannot join yet; retrying");
                    }
                }
            }
        }
        if added {
            let promote = ["RAFT.MEMBER".to_string(), "PROMOTE".into(), id.clone()];
            match call(at, how, &promote).await {
                Ok(m) => {
                    tracing::info!(membership = %m, "promoted to voter");
                    return Ok(());
                }
                Err(e) if e.to_string().contains("not a learner") => return Ok(()),
                Err(e) => {
                    if attempt % 10 == 0 {
                        tracing::info!(error = %format!("{e:#}"), "waiting to be promoted");
                    }
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    bail!("not added and promoted within 5 minutes")
}
