//! `raft-kv bench`: a closed-loop load generator speaking RESP, for the
//! cluster benchmarks in the README.

use crate::resp::reply_len;
use anyhow::{anyhow, bail, Context};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of `raft-kv bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Server addresses, comma separated; connections are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<String>,
    /// Concurrent clients (requests in flight), spread over the connections.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// TCP connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Duration in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Operation: set, get, or fill (SET every key 0..keys once, as fast
    /// as the window allows; --secs is ignored).
    #[arg(long, default_value = "set")]
    op: String,
    /// Password, if the servers require AUTH.
    #[arg(long)]
    password: Option<String>,
}

fn request(op: &str, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(value.len() + 64);
    let parts: &[&[u8]] = if op == "get" {
        &[b"GET", key]
    } else {
        &[b"SET", key, value]
    };
    r.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        r.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        r.extend_from_slice(p);
        r.extend_from_slice(b"\r\n");
    }
    r
}

struct ConnStats {
    latencies_us: Vec<u32>,
    /// When each acknowledged (non-error) reply arrived, in µs since the start.
    acked_at_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

async fn bench_conn(
    addr: String,
    window: usize,
    a: Arc<BenchArgs>,
    seed: u64,
    until: Instant,
    fill: Arc<std::sync::atomic::AtomicU64>,
    start: Instant,
) -> anyhow::Result<ConnStats> {
    let mut sock = tokio::net::TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    sock.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    if let Some(pw) = &a.password {
        sock.write_all(format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{pw}\r\n", pw.len()).as_bytes())
            .await?;
        loop {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                bail!("{addr} closed the connection during AUTH");
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(l) = reply_len(&buf) {
                if buf[0] == b'-' {
                    bail!("AUTH failed: {}", String::from_utf8_lossy(&buf[..l]).trim());
                }
                buf.drain(..l);
                break;
            }
        }
    }
    let value = vec![b'x'; a.value_size];
    let mut rng = fastrand::Rng::with_seed(seed);
    let keys = a.keys.max(1);
    let filling = a.op == "fill";
    // The next key, or None once a fill has handed out every key.
    let mut next_key = move || {
        let k = if filling {
            let k = fill.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k >= keys {
                return None;
            }
            k
        } else {
            rng.u64(0..keys)
        };
        Some(format!("key:{k}").into_bytes())
    };
    let op = if filling { "set" } else { a.op.as_str() };
    let mut inflight: VecDeque<Instant> = VecDeque::new();
    let mut stats = ConnStats {
        latencies_us: Vec::new(),
        acked_at_us: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut out = Vec::new();
    for _ in 0..window {
        let Some(k) = next_key() else { break };
        out.extend(request(op, &k, &value));
        inflight.push_back(Instant::now());
    }
    sock.write_all(&out).await?;
    while !inflight.is_empty() {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            bail!("{addr} closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let mut consumed = 0;
        while let Some(l) = reply_len(&buf[consumed..]) {
            let sent = inflight
                .pop_front()
                .ok_or_else(|| anyhow!("more replies than requests"))?;
            stats
                .latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if buf[consumed] != b'-' {
                let at = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
                stats.acked_at_us.push(at);
            } else {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(
                        String::from_utf8_lossy(&buf[consumed..consumed + l])
                            .trim()
                            .to_string(),
                    );
                }
            }
            consumed += l;
            if filling || Instant::now() < until {
                if let Some(k) = next_key() {
                    out.extend(request(op, &k, &value));
                    inflight.push_back(Instant::now());
                }
            }
        }
        buf.drain(..consumed);
        if !out.is_empty() {
            sock.write_all(&out).await?;
        }
    }
    Ok(stats)
}

/// Runs the load generator and prints its result line.
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    if !["set", "get", "fill"].contains(&a.op.as_str()) {
        bail!("--op must be set, get or fill");
    }
    if a.conns == 0 || a.clients < a.conns {
        bail!("need --conns >= 1 and --clients >= --conns");
    }
    let a = Arc::new(a);
    let start = Instant::now();
    let until = start + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    let fill = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for c in 0..a.conns {
        let window = a.clients / a.conns + usize::from(c < a.clients % a.conns);
        let addr = a.addr[c % a.addr.len()].clone();
        tasks.push(tokio::spawn(bench_conn(
            addr,
            window,
            a.clone(),
            0x9E37_79B9 + c as u64 * 7919,
            until,
            fill.clone(),
            start,
        )));
    }
    let mut lat: Vec<u32> = Vec::new();
    let mut acked: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let s = t.await??;
        lat.extend(s.latencies_us);
        acked.extend(s.acked_at_us);
        errors += s.errors;
        first_error = first_error.or(s.first_error);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    // Printed with errors ignored: a reader that stops early (`| head -1`)
    // closes the pipe, and the numbers are already out.
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} {} ops in {:.1}s: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, errors {} ({} clients, {} conns, {} B values)",
        lat.len(),
        a.op.to_uppercase(),
        elapsed,
        lat.len() as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        errors,
        a.clients,
        a.conns,
        a.value_size
    );
    // The longest time no request was acknowledged (from the start, between
    // acknowledgements, and until the end): a failover's write pause.
    acked.sort_unstable();
    let end = (elapsed * 1e6) as u32;
    let stall = std::iter::once(0)
        .chain(acked.iter().copied())
        .chain(std::iter::once(end))
        .collect::<Vec<u32>>()
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "max latency {:.2} ms, longest stall without an acknowledgement {:.2} ms",
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        stall as f64 / 1000.0
    );
    if let Some(e) = first_error {
        let _ = writeln!(out, "first error: {e}");
    }
    Ok(())
}
