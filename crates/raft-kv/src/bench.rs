//! `raft-kv bench`: a closed-loop load generator speaking RESP, for the
//! cluster benchmarks in the README; with `--protocol etcd` it drives etcd's
//! v3 JSON gateway (`/v3/kv/put`, `/v3/kv/range`) instead, the same keys,
//! values and closed loop, for a side-by-side run.

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
    /// `resp`, or `etcd`: HTTP/1.1 to etcd's v3 JSON gateway (one request
    /// in flight per connection: give as many connections as clients).
    #[arg(long, default_value = "resp")]
    protocol: String,
}

/// An etcd v3 gateway request: a put, or a (linearizable) range read.
fn etcd_request(op: &str, key: &[u8], value: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (path, body) = if op == "get" {
        ("/v3/kv/range", format!("{{\"key\":\"{}\"}}", b64(key)))
    } else {
        (
            "/v3/kv/put",
            format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", b64(key), b64(value)),
        )
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The length of the first whole HTTP response in `buf` and whether it is
/// an error (not 200); `None` while incomplete.
fn http_reply_len(buf: &[u8]) -> anyhow::Result<Option<(usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .ok_or_else(|| anyhow!("an HTTP response without Content-Length"))?;
    Ok((buf.len() >= head + len).then_some((head + len, resp.code != Some(200))))
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
    let etcd = a.protocol == "etcd";
    let request = |op: &str, key: &[u8], value: &[u8]| {
        if etcd {
            etcd_request(op, key, value)
        } else {
            request(op, key, value)
        }
    };
    // The first whole reply's length, and whether it is an error.
    let next_reply = |buf: &[u8]| -> anyhow::Result<Option<(usize, bool)>> {
        if etcd {
            http_reply_len(buf)
        } else {
            Ok(reply_len(buf).map(|l| (l, buf[0] == b'-')))
        }
    };
    if let Some(pw) = a.password.as_ref().filter(|_| !etcd) {
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
        while let Some((l, failed)) = next_reply(&buf[consumed..])? {
            let sent = inflight
                .pop_front()
                .ok_or_else(|| anyhow!("more replies than requests"))?;
            stats
                .latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            if !failed {
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
    if !["resp", "etcd"].contains(&a.protocol.as_str()) {
        bail!("--protocol must be resp or etcd");
    }
    if a.protocol == "etcd" && a.clients != a.conns {
        bail!("--protocol etcd sends one request at a time per connection: give --conns equal to --clients");
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
