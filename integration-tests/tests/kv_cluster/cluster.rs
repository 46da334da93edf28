//! The test cluster: real `raft-kv node` processes on loopback with their
//! ports, certificates and data directories; kills, pauses, restarts, and
//! UDP relays between the nodes that a test can cut.

use redis::{Commands, Connection, RedisResult};
use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_kv_node");

pub(crate) fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub(crate) fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub(crate) struct Cluster {
    pub(crate) dir: PathBuf,
    pub(crate) extra: Vec<String>,
    pub(crate) raft: BTreeMap<u64, SocketAddr>,
    pub(crate) client: BTreeMap<u64, SocketAddr>,
    pub(crate) procs: BTreeMap<u64, Child>,
    /// With `with_links`: node a reaches node b through a UDP relay that the
    /// test can cut, keyed (a, b).
    pub(crate) links: BTreeMap<(u64, u64), Link>,
}

/// A one-way UDP relay standing between two nodes: everything node `a`
/// sends to node `b` (and `b`'s answers on that connection) passes through
/// it, and `cut` drops it all, in both directions.
pub(crate) struct Link {
    pub(crate) addr: SocketAddr,
    pub(crate) cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    pub(crate) fn start(target: SocketAddr) -> Link {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut peer: Option<SocketAddr> = None;
            while !s2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if c2.load(Ordering::Relaxed) {
                    continue;
                }
                let to = if from == target {
                    match peer {
                        Some(p) => p,
                        None => continue,
                    }
                } else {
                    peer = Some(from);
                    target
                };
                let _ = sock.send_to(&buf[..n], to);
            }
        });
        Link { addr, cut, stop }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Cluster {
    pub(crate) fn new(dir: &Path, ids: &[u64]) -> Self {
        let out = Command::new(BIN)
            .args(["certs", "--dir"])
            .arg(dir.join("certs"))
            .args([
                "--nodes",
                &ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir: dir.to_path_buf(),
            extra: Vec::new(),
            raft: ids.iter().map(|&i| (i, free_udp())).collect(),
            client: ids.iter().map(|&i| (i, free_tcp())).collect(),
            procs: BTreeMap::new(),
            links: BTreeMap::new(),
        }
    }

    /// Puts a cuttable relay between every ordered pair of nodes (call
    /// before starting them).
    pub(crate) fn with_links(mut self) -> Self {
        for &a in self.raft.keys() {
            for (&b, &target) in &self.raft {
                if a != b {
                    self.links.insert((a, b), Link::start(target));
                }
            }
        }
        self
    }

    /// Cuts (or heals) all traffic between `a` and `b`.
    pub(crate) fn set_cut(&self, a: u64, b: u64, cut: bool) {
        for k in [(a, b), (b, a)] {
            self.links[&k]
                .cut
                .store(cut, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Cuts (or heals) `id` off from every other node.
    pub(crate) fn isolate(&self, id: u64, cut: bool) {
        for &other in self.raft.keys().filter(|&&o| o != id) {
            self.set_cut(id, other, cut);
        }
    }

    pub(crate) fn start(&mut self, id: u64) {
        let peers: Vec<(u64, SocketAddr)> = self
            .raft
            .iter()
            .filter(|(&p, _)| p != id)
            .map(|(&p, &a)| (p, self.links.get(&(id, p)).map_or(a, |l| l.addr)))
            .collect();
        let mut cmd = self.node_command(id, &peers);
        let log = std::fs::File::create(self.dir.join(format!("node-{id}.log"))).unwrap();
        cmd.stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info");
        self.procs.insert(id, cmd.spawn().unwrap());
    }

    /// Starts node `id` knowing only `peers` (a cluster smaller than the
    /// certificates made for it), with `args` added to its command line.
    pub(crate) fn start_among(&mut self, id: u64, peers: &[u64], args: &[String]) {
        let peers: Vec<(u64, SocketAddr)> = peers
            .iter()
            .filter(|&&p| p != id)
            .map(|&p| (p, self.raft[&p]))
            .collect();
        let mut cmd = self.node_command(id, &peers);
        cmd.args(args);
        let log = std::fs::File::create(self.dir.join(format!("node-{id}.log"))).unwrap();
        cmd.stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info");
        self.procs.insert(id, cmd.spawn().unwrap());
    }

    /// The command line of node `id` with the given peers.
    pub(crate) fn node_command(&self, id: u64, peers: &[(u64, SocketAddr)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("node")
            .args(["--id", &id.to_string()])
            .args(["--raft-addr", &self.raft[&id].to_string()])
            .args(["--client-addr", &self.client[&id].to_string()])
            .arg("--data-dir")
            .arg(self.dir.join(format!("node-{id}")))
            .arg("--tls-dir")
            .arg(self.dir.join("certs"));
        for (p, a) in peers {
            cmd.args(["--peer", &format!("{p}={a}")]);
        }
        cmd.args(&self.extra);
        cmd
    }

    pub(crate) fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    pub(crate) fn conn(&self, id: u64) -> Connection {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let client = redis::Client::open(format!("redis://{}/", self.client[&id])).unwrap();
            match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => {
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    return c;
                }
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("node {id} does not accept clients: {e}"),
            }
        }
    }

    pub(crate) fn info(&self, id: u64) -> BTreeMap<String, String> {
        let text: String = redis::cmd("INFO").query(&mut self.conn(id)).unwrap();
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }

    /// Waits (up to 20 s) until one of `among` leads; returns it.
    pub(crate) fn wait_leader(&self, among: &[u64]) -> u64 {
        let mut leader = None;
        eventually("a leader", Duration::from_secs(20), || {
            leader = self.leader(among);
            leader.is_some()
        });
        leader.expect("checked above")
    }

    pub(crate) fn leader(&self, among: &[u64]) -> Option<u64> {
        among
            .iter()
            .copied()
            .find(|&id| self.info(id).get("role").map(String::as_str) == Some("leader"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

/// Retries a write on the given nodes until one acknowledges it; errors are
/// retried only when they say the outcome is known not to have happened.
pub(crate) fn write_until_ok(
    c: &Cluster,
    on: &[u64],
    key: &str,
    value: &str,
    within: Duration,
) -> u64 {
    let end = Instant::now() + within;
    let mut i = 0;
    loop {
        let id = on[i % on.len()];
        i += 1;
        let res: RedisResult<String> = c.conn(id).set(key, value);
        match res {
            Ok(ok) => {
                assert_eq!(ok, "OK");
                return id;
            }
            Err(e) if Instant::now() < end => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("write of {key} never succeeded: {e}"),
        }
    }
}

pub(crate) fn info_num(c: &Cluster, id: u64, field: &str) -> u64 {
    c.info(id)
        .get(field)
        .unwrap_or_else(|| panic!("INFO of node {id} has no {field}"))
        .parse()
        .unwrap()
}

/// Waits until `cond` holds, or fails with `what`.
pub(crate) fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` SETs pipelined through one connection to `id`; keys `prefix0..`.
pub(crate) fn pipelined_sets(c: &Cluster, id: u64, prefix: &str, n: usize) {
    let mut p = redis::pipe();
    for i in 0..n {
        p.set(format!("{prefix}{i}"), format!("{prefix}-value-{i}"));
    }
    let _: Vec<String> = p.query(&mut c.conn(id)).unwrap();
}

/// Reads one whole RESP reply (a line, or a bulk string with its body).
pub(crate) fn read_one_reply(sock: &mut std::net::TcpStream) -> String {
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        if let Some(end) = reply.windows(2).position(|w| w == b"\r\n") {
            let head = String::from_utf8_lossy(&reply[..end]).to_string();
            let need = match head.strip_prefix('$').map(str::parse::<i64>) {
                Some(Ok(len)) if len >= 0 => end + 2 + len as usize + 2,
                _ => end + 2,
            };
            if reply.len() >= need {
                return String::from_utf8_lossy(&reply[..need]).to_string();
            }
        }
        let n = sock.read(&mut buf).expect("a reply");
        assert!(n > 0, "the node closed the connection");
        reply.extend_from_slice(&buf[..n]);
    }
}

pub(crate) fn signal(c: &Cluster, id: u64, sig: &str) {
    let pid = c.procs[&id].id().to_string();
    let st = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// The largest value a `SET key value` may carry under a node's
/// `max_entry_bytes` (the limit applies to the log entry: the encoded
/// command and the leader's time).
pub(crate) fn value_limit(key: &str, max_entry: usize) -> usize {
    let probe = 1 << 20;
    let cmd = raft_kv::command::WriteCmd::Set {
        key: key.as_bytes().to_vec(),
        value: vec![0; probe],
        cond: raft_kv::command::SetCond::Always,
    };
    max_entry - (cmd.entry_len() - probe)
}

/// A SET retried while the answer says it was not applied (TRYAGAIN) or
/// cannot say (UNKNOWN, a dropped connection): an 8 MiB write can cost a
/// leader change on a loaded machine. Setting the same value again is
/// harmless either way.
pub(crate) fn set_retrying(c: &Cluster, via: u64, key: &str, value: &[u8]) -> RedisResult<String> {
    let mut res: RedisResult<String> = c.conn(via).set(key, value);
    for _ in 0..20 {
        let retry = match &res {
            Err(e) => {
                e.kind() == redis::ErrorKind::TryAgain
                    || e.code() == Some("UNKNOWN")
                    || e.is_io_error()
                    || e.is_timeout()
            }
            Ok(_) => false,
        };
        if !retry {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        res = c.conn(via).set(key, value);
    }
    res
}

pub(crate) fn strlen(c: &Cluster, id: u64, key: &str) -> Option<usize> {
    redis::cmd("STRLEN").arg(key).query(&mut c.conn(id)).ok()
}
