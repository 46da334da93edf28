//! Three real `raft-kv node` processes on loopback, with generated certificates
//! and temporary data directories, driven with the `redis` crate: writes
//! through every node, reads that see writes acknowledged elsewhere, SIGKILL of
//! the leader (failover time printed), restart and catch-up, and at the end
//! every acknowledged write present and the three state machines identical;
//! a leader paused with SIGSTOP never serves a stale read when it resumes;
//! log compaction waits for a node that is down; concurrent clients' histories
//! (SET, MSET, GET, MGET, INCR, CAS) stay linearizable through a leader
//! SIGKILL, restart and SIGSTOP, and
//! through real partitions (UDP relays between the nodes that the test cuts);
//! follower and one-way partitions leave the leader and its term alone.

use redis::{Commands, Connection, RedisResult};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kv_node");

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Cluster {
    dir: PathBuf,
    extra: Vec<String>,
    raft: BTreeMap<u64, SocketAddr>,
    client: BTreeMap<u64, SocketAddr>,
    procs: BTreeMap<u64, Child>,
    /// With `with_links`: node a reaches node b through a UDP relay that the
    /// test can cut, keyed (a, b).
    links: BTreeMap<(u64, u64), Link>,
}

/// A one-way UDP relay standing between two nodes: everything node `a`
/// sends to node `b` (and `b`'s answers on that connection) passes through
/// it, and `cut` drops it all, in both directions.
struct Link {
    addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    fn start(target: SocketAddr) -> Link {
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
    fn new(dir: &Path, ids: &[u64]) -> Self {
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
    fn with_links(mut self) -> Self {
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
    fn set_cut(&self, a: u64, b: u64, cut: bool) {
        for k in [(a, b), (b, a)] {
            self.links[&k]
                .cut
                .store(cut, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Cuts (or heals) `id` off from every other node.
    fn isolate(&self, id: u64, cut: bool) {
        for &other in self.raft.keys().filter(|&&o| o != id) {
            self.set_cut(id, other, cut);
        }
    }

    fn start(&mut self, id: u64) {
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

    /// The command line of node `id` with the given peers.
    fn node_command(&self, id: u64, peers: &[(u64, SocketAddr)]) -> Command {
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

    fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&id) {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn conn(&self, id: u64) -> Connection {
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

    fn info(&self, id: u64) -> BTreeMap<String, String> {
        let text: String = redis::cmd("INFO").query(&mut self.conn(id)).unwrap();
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }

    /// Waits (up to 20 s) until one of `among` leads; returns it.
    fn wait_leader(&self, among: &[u64]) -> u64 {
        let mut leader = None;
        eventually("a leader", Duration::from_secs(20), || {
            leader = self.leader(among);
            leader.is_some()
        });
        leader.expect("checked above")
    }

    fn leader(&self, among: &[u64]) -> Option<u64> {
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
fn write_until_ok(c: &Cluster, on: &[u64], key: &str, value: &str, within: Duration) -> u64 {
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

#[test]
fn three_process_cluster_survives_leader_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    for id in ids {
        c.start(id);
    }
    let end = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        if let Some(l) = c.leader(&ids) {
            break l;
        }
        assert!(Instant::now() < end, "no leader elected");
        std::thread::sleep(Duration::from_millis(50));
    };

    // Writes through every node; each read on another node sees the acknowledged write.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..30u64 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        let via = ids[(i % 3) as usize];
        let _: () = c.conn(via).set(&k, &v).unwrap();
        acked.insert(k.clone(), v.clone());
        let other = ids[((i + 1) % 3) as usize];
        let got: Option<String> = c.conn(other).get(&k).unwrap();
        assert_eq!(
            got.as_deref(),
            Some(v.as_str()),
            "node {other} missed a write acknowledged by node {via}"
        );
    }
    // A pipeline through a follower keeps its order (forwarded as one batch).
    let follower = ids.into_iter().find(|&x| x != leader).unwrap();
    let (a, b, got): (i64, i64, String) = redis::pipe()
        .set("p", 1)
        .ignore()
        .incr("p", 1)
        .incr("p", 1)
        .get("p")
        .query(&mut c.conn(follower))
        .unwrap();
    assert_eq!((a, b, got.as_str()), (2, 3, "3"));
    acked.insert("p".into(), "3".into());
    let n: i64 = c.conn(2).incr("counter", 5).unwrap();
    assert_eq!(n, 5);
    let cas: i64 = redis::cmd("CAS")
        .arg("k0")
        .arg("v0")
        .arg("v0-new")
        .query(&mut c.conn(3))
        .unwrap();
    assert_eq!(cas, 1);
    acked.insert("k0".into(), "v0-new".into());
    acked.insert("counter".into(), "5".into());

    // SIGKILL the leader; measure until the next acknowledged write.
    let rest: Vec<u64> = ids.iter().copied().filter(|&x| x != leader).collect();
    let killed = Instant::now();
    c.kill(leader);
    write_until_ok(&c, &rest, "after-failover", "yes", Duration::from_secs(20));
    let failover = killed.elapsed();
    println!("failover: leader {leader} SIGKILLed, next write acknowledged after {failover:?}");
    acked.insert("after-failover".into(), "yes".into());
    for i in 30..50u64 {
        let k = format!("k{i}");
        write_until_ok(&c, &rest, &k, &format!("v{i}"), Duration::from_secs(10));
        acked.insert(k, format!("v{i}"));
    }

    // Restart the old leader: it catches up from its own disk and the others.
    c.start(leader);
    let new_leader = c.leader(&rest).expect("a leader among the survivors");
    let target: u64 = c.info(new_leader)["commit_index"].parse().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let applied: u64 = c
            .info(leader)
            .get("applied_index")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if applied >= target {
            break;
        }
        assert!(
            Instant::now() < end,
            "restarted node stuck at {applied} < {target}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every acknowledged write is present everywhere; the state machines are identical.
    let keys: Vec<&String> = acked.keys().collect();
    let mut states = Vec::new();
    for id in ids {
        let vals: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query(&mut c.conn(id))
            .unwrap();
        let size: i64 = redis::cmd("DBSIZE").query(&mut c.conn(id)).unwrap();
        for (k, v) in keys.iter().zip(&vals) {
            assert_eq!(v.as_deref(), Some(acked[*k].as_str()), "node {id} lost {k}");
        }
        states.push((vals, size));
    }
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "state machines differ: {states:?}"
    );
    assert_eq!(states[0].1, acked.len() as i64);
}

#[test]
fn protocol_errors_and_bad_input_get_redis_style_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(tmp.path(), &[1]);
    c.start(1);
    let mut con = c.conn(1);
    let err = redis::cmd("NOPE")
        .arg("x")
        .query::<String>(&mut con)
        .unwrap_err();
    assert!(err.to_string().contains("unknown command 'NOPE'"), "{err}");
    let err = redis::cmd("GET").query::<String>(&mut con).unwrap_err();
    assert!(
        err.to_string()
            .contains("wrong number of arguments for 'get' command"),
        "{err}"
    );
    let _: () = con.set("n", "abc").unwrap();
    let err = con.incr::<_, _, i64>("n", 1).unwrap_err();
    assert!(err.to_string().contains("not an integer"), "{err}");
    let nx: Option<String> = redis::cmd("SET")
        .arg("n")
        .arg("z")
        .arg("NX")
        .query(&mut con)
        .unwrap();
    assert_eq!(nx, None);

    // Malformed RESP and an absurd bulk length: an error to that client, others unaffected.
    use std::io::{Read, Write};
    let mut raw = std::net::TcpStream::connect(c.client[&1]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"*1\r\n$999999999999\r\n").unwrap();
    let mut buf = [0u8; 256];
    let n = raw.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("-ERR Protocol error"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let pong: String = redis::cmd("PING").query(&mut c.conn(1)).unwrap();
    assert_eq!(pong, "PONG");
}

#[test]
fn password_protected_node_requires_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(tmp.path(), &[1]);
    c.extra = vec!["--password".into(), "s3cret".into()];
    c.start(1);
    let mut con = c.conn(1);
    let err = redis::cmd("GET")
        .arg("k")
        .query::<Option<String>>(&mut con)
        .unwrap_err();
    assert!(err.to_string().contains("Authentication required"), "{err}");
    let err = redis::cmd("AUTH")
        .arg("wrong")
        .query::<String>(&mut con)
        .unwrap_err();
    assert!(
        err.to_string().contains("WRONGPASS") || err.to_string().contains("invalid"),
        "{err}"
    );
    let ok: String = redis::cmd("AUTH").arg("s3cret").query(&mut con).unwrap();
    assert_eq!(ok, "OK");
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut con).unwrap();
    assert_eq!(v, "v");
    // A password URL works for any Redis client.
    let client = redis::Client::open(format!("redis://:s3cret@{}/", c.client[&1])).unwrap();
    let mut authed = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut authed).unwrap();
    assert_eq!(v, "v");
}

#[test]
fn whole_cluster_sigkilled_and_restarted_serves_every_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    for id in ids {
        c.start(id);
    }
    let mut acked = BTreeMap::new();
    for i in 0..40u64 {
        let (k, v) = (format!("r{i}"), format!("v{i}"));
        write_until_ok(&c, &ids, &k, &v, Duration::from_secs(20));
        acked.insert(k, v);
    }
    // No clean shutdown anywhere: state machines lose whatever sled had not
    // written out, and must rebuild it from the durable Raft log.
    for id in ids {
        c.kill(id);
    }
    for id in ids {
        c.start(id);
    }
    let keys: Vec<&String> = acked.keys().collect();
    for id in ids {
        // The first read after a restart must not come back empty.
        let end = Instant::now() + Duration::from_secs(20);
        let vals: Vec<Option<String>> = loop {
            match redis::cmd("MGET").arg(&keys).query(&mut c.conn(id)) {
                Ok(v) => break v,
                Err(e) => {
                    assert!(
                        Instant::now() < end,
                        "node {id} never served reads after the restart: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        for (k, v) in keys.iter().zip(&vals) {
            assert_eq!(
                v.as_deref(),
                Some(acked[*k].as_str()),
                "node {id} lost {k} across the restart"
            );
        }
    }
}

fn info_num(c: &Cluster, id: u64, field: &str) -> u64 {
    c.info(id)
        .get(field)
        .unwrap_or_else(|| panic!("INFO of node {id} has no {field}"))
        .parse()
        .unwrap()
}

/// Waits until `cond` holds, or fails with `what`.
fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` SETs pipelined through one connection to `id`; keys `prefix0..`.
fn pipelined_sets(c: &Cluster, id: u64, prefix: &str, n: usize) {
    let mut p = redis::pipe();
    for i in 0..n {
        p.set(format!("{prefix}{i}"), format!("{prefix}-value-{i}"));
    }
    let _: Vec<String> = p.query(&mut c.conn(id)).unwrap();
}

#[test]
fn log_compaction_waits_for_a_down_node_which_then_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    c.extra = vec!["--compact-threshold".into(), "50".into()];
    for id in ids {
        c.start(id);
    }
    let leader = c.wait_leader(&ids);
    pipelined_sets(&c, leader, "a", 400);
    // Every node flushes its state machine within a second and compacts.
    eventually("every node compacts", Duration::from_secs(10), || {
        ids.iter().all(|&id| info_num(&c, id, "purged_index") > 100)
    });

    // A follower goes down: nothing it lacks may be compacted away.
    let down = ids.iter().copied().find(|&id| id != leader).unwrap();
    c.kill(down);
    let held_by_down = info_num(&c, leader, "last_log_index");
    pipelined_sets(&c, leader, "b", 400);
    let commit = info_num(&c, leader, "commit_index");
    assert!(commit >= held_by_down + 400);
    std::thread::sleep(Duration::from_millis(2500));
    for id in ids.iter().copied().filter(|&id| id != down) {
        let ci = info_num(&c, id, "purged_index");
        assert!(
            ci <= held_by_down,
            "node {id} compacted to {ci}, past what the down node holds ({held_by_down})"
        );
    }

    // Back up: it catches up from the log, and compaction moves on.
    c.start(down);
    eventually(
        "the restarted node catches up",
        Duration::from_secs(20),
        || info_num(&c, down, "applied_index") >= commit,
    );
    eventually("compaction resumes", Duration::from_secs(20), || {
        ids.iter()
            .all(|&id| info_num(&c, id, "purged_index") > held_by_down)
    });
    let keys: Vec<String> = (0..400).map(|i| format!("b{i}")).collect();
    let vals: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query(&mut c.conn(down))
        .unwrap();
    for (i, v) in vals.iter().enumerate() {
        assert_eq!(
            v.as_deref(),
            Some(format!("b-value-{i}").as_str()),
            "b{i} on node {down}"
        );
    }
    let size: u64 = redis::cmd("DBSIZE").query(&mut c.conn(down)).unwrap();
    assert_eq!(size, 800);
}

/// Reads one whole RESP reply (a line, or a bulk string with its body).
fn read_one_reply(sock: &mut std::net::TcpStream) -> String {
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

fn signal(c: &Cluster, id: u64, sig: &str) {
    let pid = c.procs[&id].id().to_string();
    let st = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// A leader paused with SIGSTOP is replaced. When it resumes it still
/// believes it leads for a moment; a read on it must then see the write the
/// new leader acknowledged meanwhile, or fail with a retryable error, and
/// never return the old value (the deposed-leader stale read).
#[test]
fn paused_leader_never_serves_a_stale_read_after_it_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    for id in ids {
        c.start(id);
    }
    let old = c.wait_leader(&ids);
    let rest: Vec<u64> = ids.iter().copied().filter(|&x| x != old).collect();
    let _: () = c.conn(old).set("x", "before").unwrap();
    // A connection opened now; its GET is queued while the node is paused,
    // so the node meets it the moment it resumes, still believing it leads.
    let mut raw = std::net::TcpStream::connect(c.client[&old]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

    signal(&c, old, "-STOP");
    let paused = Instant::now();
    write_until_ok(&c, &rest, "x", "during", Duration::from_secs(20));
    println!(
        "leader {old} paused; a new leader acknowledged a write after {:?}",
        paused.elapsed()
    );
    raw.write_all(b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n").unwrap();
    signal(&c, old, "-CONT");
    let reply = read_one_reply(&mut raw);
    assert!(
        reply == "$6\r\nduring\r\n" || reply.starts_with("-TRYAGAIN"),
        "the resumed leader {old} answered {reply:?}"
    );

    // Read on the resumed node at once, and keep reading while it steps down.
    let mut conn = c.conn(old);
    let end = Instant::now() + Duration::from_secs(20);
    let mut retryable = 0;
    loop {
        let got: RedisResult<Option<String>> = conn.get("x");
        match got {
            Ok(v) => {
                assert_eq!(
                    v.as_deref(),
                    Some("during"),
                    "stale read from the deposed leader {old}"
                );
                break;
            }
            Err(e) => {
                assert!(
                    e.code() == Some("TRYAGAIN"),
                    "unexpected error from node {old}: {e}"
                );
                retryable += 1;
                assert!(Instant::now() < end, "node {old} never served the read");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    println!("resumed node answered the read after {retryable} retryable errors");
    assert_ne!(
        c.info(old).get("role").map(String::as_str),
        Some("leader"),
        "the resumed node must have stepped down"
    );
    // It serves writes again (forwarded), and everyone agrees.
    write_until_ok(&c, &[old], "y", "after", Duration::from_secs(20));
    for id in ids {
        let v: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&["x", "y"])
            .query(&mut c.conn(id))
            .unwrap();
        assert_eq!(
            v,
            vec![Some("during".to_string()), Some("after".to_string())],
            "node {id}"
        );
    }
}

/// The registers the clients write (SET, MSET, CAS) and read (GET, MGET),
/// in pairs: MSET and MGET always cover one pair.
const REGISTER_PAIRS: [[&str; 2]; 2] = [["lin-a0", "lin-b0"], ["lin-a1", "lin-b1"]];
/// The counters the clients INCR, and read alone or together (MGET).
const COUNTERS: [&str; 2] = ["lin-n0", "lin-n1"];

/// Every key the clients use.
fn client_keys() -> Vec<&'static str> {
    REGISTER_PAIRS
        .iter()
        .flatten()
        .chain(&COUNTERS)
        .copied()
        .collect()
}

/// What a client does with a reply: record the operation as acknowledged,
/// as of unknown outcome, or not at all; and whether to reconnect.
enum Verdict<T> {
    Acked(T),
    /// A write that may or may not have been applied.
    Unknown {
        reconnect: bool,
    },
    /// Known not to have happened (a read that failed, a write refused
    /// with -TRYAGAIN: the store's answer when it proposed nothing).
    Nothing {
        reconnect: bool,
    },
}

/// Classifies a reply by its Redis error code, never its text: for a write,
/// -TRYAGAIN says it was not proposed; -UNKNOWN, a broken connection or any
/// other error leave its outcome unknown. For a read any error means it did
/// not happen. A reply of the wrong type is a protocol bug and fails the test.
fn verdict<T>(res: RedisResult<T>, write: bool, what: &str) -> Verdict<T> {
    match res {
        Ok(v) => Verdict::Acked(v),
        Err(e) if e.kind() == redis::ErrorKind::TypeError => {
            panic!("{what}: a reply of the wrong type: {e}")
        }
        Err(e) if e.code() == Some("TRYAGAIN") => Verdict::Nothing { reconnect: false },
        Err(e) if write => Verdict::Unknown {
            reconnect: e.code() != Some("UNKNOWN"),
        },
        Err(_) => Verdict::Nothing { reconnect: true },
    }
}

/// A client thread, on any node, moving to another node when one fails:
/// SET, MSET over a pair, GET, MGET over a pair, CAS (expecting the value
/// this client last saw) on the registers, INCR and GET/MGET on the counters,
/// every written value unique. Records every operation's outcome.
fn client_loop(
    addrs: &BTreeMap<u64, SocketAddr>,
    me: usize,
    start: Instant,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<integration_tests::linearizable::Op> {
    use integration_tests::linearizable::{Kind, Op};
    let nodes: Vec<SocketAddr> = addrs.values().copied().collect();
    let mut out = Vec::new();
    let mut conn: Option<Connection> = None;
    let mut target = me;
    let mut seq = 0u64;
    // The value this client last saw each register hold (CAS expects it).
    let mut last_seen: BTreeMap<&str, String> = BTreeMap::new();
    let now = || start.elapsed().as_micros() as u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(cn) = conn.as_mut() else {
            target += 1;
            let addr = nodes[target % nodes.len()];
            let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
            match client.get_connection_with_timeout(Duration::from_millis(500)) {
                Ok(cn) => {
                    cn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    cn.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                    conn = Some(cn);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        seq += 1;
        // A fixed, varied sequence per client (no RNG needed).
        let pick = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize + me;
        let pair = REGISTER_PAIRS[pick % 2];
        let one = pair[(pick / 2) % 2];
        let counter = COUNTERS[(pick / 4) % 2];
        let value = format!("c{me}-{seq}");
        let call = now();
        let (kind, verdict): (Kind, Verdict<()>) = match pick % 20 {
            // SET one register.
            0..=2 => {
                let v = verdict(cn.set::<_, _, String>(one, &value), true, "SET");
                let v = map_verdict(v, |_| {
                    last_seen.insert(one, value.clone());
                });
                (Kind::set(one, &value), v)
            }
            // MSET a pair.
            3..=5 => {
                let res = redis::cmd("MSET")
                    .arg(pair[0])
                    .arg(&value)
                    .arg(pair[1])
                    .arg(&value)
                    .query::<String>(cn);
                let v = map_verdict(verdict(res, true, "MSET"), |_| {
                    for k in pair {
                        last_seen.insert(k, value.clone());
                    }
                });
                let pairs = pair.iter().map(|k| (k.to_string(), value.clone()));
                (Kind::Write(pairs.collect()), v)
            }
            // GET a register or a counter.
            6..=8 => {
                let key = if pick % 20 == 8 { counter } else { one };
                let mut got = None;
                let v = map_verdict(
                    verdict(cn.get::<_, Option<String>>(key), false, "GET"),
                    |r| {
                        if let Some(r) = &r {
                            last_seen.insert(key, r.clone());
                        }
                        got = r;
                    },
                );
                (Kind::get(key, got.as_deref()), v)
            }
            // MGET a pair of registers or the counters.
            9..=11 => {
                let keys = if pick % 20 == 11 { COUNTERS } else { pair };
                let res = redis::cmd("MGET")
                    .arg(keys[0])
                    .arg(keys[1])
                    .query::<Vec<Option<String>>>(cn);
                let mut got = vec![None, None];
                let v = map_verdict(verdict(res, false, "MGET"), |r| {
                    assert_eq!(r.len(), 2, "MGET of two keys answered {r:?}");
                    for (k, v) in keys.iter().zip(&r) {
                        if let Some(v) = v {
                            last_seen.insert(k, v.clone());
                        }
                    }
                    got = r;
                });
                let pairs = keys.iter().map(|k| k.to_string()).zip(got);
                (Kind::Read(pairs.collect()), v)
            }
            // INCR a counter.
            12..=15 => {
                let res = redis::cmd("INCR").arg(counter).query::<i64>(cn);
                let mut got = 0;
                let v = map_verdict(verdict(res, true, "INCR"), |n| got = n);
                (
                    Kind::Incr {
                        key: counter.to_string(),
                        value: got,
                    },
                    v,
                )
            }
            // CAS a register from the value this client last saw.
            _ => {
                let expected = last_seen
                    .get(one)
                    .cloned()
                    .unwrap_or_else(|| "never-seen".to_string());
                let res = redis::cmd("CAS")
                    .arg(one)
                    .arg(&expected)
                    .arg(&value)
                    .query::<i64>(cn);
                let mut swapped = false;
                let v = map_verdict(verdict(res, true, "CAS"), |n| {
                    assert!(n == 0 || n == 1, "CAS answered {n}");
                    swapped = n == 1;
                    if swapped {
                        last_seen.insert(one, value.clone());
                    }
                });
                let kind = Kind::Cas {
                    key: one.to_string(),
                    expected,
                    new: value.clone(),
                    swapped,
                };
                (kind, v)
            }
        };
        let ret = now();
        match verdict {
            Verdict::Acked(()) => out.push(Op {
                kind,
                call,
                ret: Some(ret),
            }),
            Verdict::Unknown { reconnect } => {
                out.push(Op {
                    kind,
                    call,
                    ret: None,
                });
                if reconnect {
                    conn = None;
                }
            }
            Verdict::Nothing { reconnect } => {
                if reconnect {
                    conn = None;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

/// Runs `f` on an acknowledged reply.
fn map_verdict<T>(v: Verdict<T>, f: impl FnOnce(T)) -> Verdict<()> {
    match v {
        Verdict::Acked(t) => {
            f(t);
            Verdict::Acked(())
        }
        Verdict::Unknown { reconnect } => Verdict::Unknown { reconnect },
        Verdict::Nothing { reconnect } => Verdict::Nothing { reconnect },
    }
}

/// Runs `clients` client threads (see `client_loop`) while `faults` runs on
/// this thread (given the clients' time origin); returns every operation
/// they recorded once `faults` returns.
fn with_clients(
    addrs: &BTreeMap<u64, SocketAddr>,
    clients: usize,
    faults: impl FnOnce(Instant),
) -> Vec<integration_tests::linearizable::Op> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..clients)
            .map(|me| {
                let stop = &stop;
                s.spawn(move || client_loop(addrs, me, start, stop))
            })
            .collect();
        // Stop the clients however `faults` ends, a failed assertion included,
        // or the scope would wait for them forever.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let guard = StopOnDrop(&stop);
        faults(start);
        drop(guard);
        threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Asserts that the clients got work of every kind done and that the whole
/// history (every key, multi-key operations included) is linearizable;
/// returns how many operations were acknowledged.
fn assert_linearizable(recorded: &[integration_tests::linearizable::Op]) -> usize {
    use integration_tests::linearizable::{check, Kind};
    let acked: Vec<_> = recorded.iter().filter(|o| o.ret.is_some()).collect();
    let count = |f: &dyn Fn(&Kind) -> bool| acked.iter().filter(|o| f(&o.kind)).count();
    let counts = [
        (
            "SET",
            count(&|k| matches!(k, Kind::Write(p) if p.len() == 1)),
        ),
        (
            "MSET",
            count(&|k| matches!(k, Kind::Write(p) if p.len() > 1)),
        ),
        (
            "GET",
            count(&|k| matches!(k, Kind::Read(p) if p.len() == 1)),
        ),
        (
            "MGET",
            count(&|k| matches!(k, Kind::Read(p) if p.len() > 1)),
        ),
        ("INCR", count(&|k| matches!(k, Kind::Incr { .. }))),
        ("CAS", count(&|k| matches!(k, Kind::Cas { .. }))),
        (
            "CAS that swapped",
            count(&|k| matches!(k, Kind::Cas { swapped: true, .. })),
        ),
    ];
    println!(
        "{} operations recorded on {} keys ({} acknowledged: {counts:?}; {} of unknown outcome)",
        recorded.len(),
        client_keys().len(),
        acked.len(),
        recorded.len() - acked.len()
    );
    assert!(
        acked.len() > 500,
        "the clients should get work done: {}",
        acked.len()
    );
    for (what, n) in counts {
        assert!(n >= 10, "too few acknowledged {what}: {counts:?}");
    }
    let t = Instant::now();
    if let Err(e) = check(recorded) {
        panic!("{e}");
    }
    println!("history checked in {:?}", t.elapsed());
    acked.len()
}

/// Concurrent clients on every node while the leader is SIGKILLed and
/// restarted, then the next leader is paused with SIGSTOP and resumed. They
/// SET, MSET, GET, MGET and CAS registers in pairs and INCR counters; the
/// whole history (acknowledged operations, plus writes of unknown outcome)
/// must be linearizable, multi-key operations atomic.
#[test]
fn client_histories_stay_linearizable_through_kills_and_pauses() {
    const CLIENTS: usize = 4;
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    for id in ids {
        c.start(id);
    }
    let first = c.wait_leader(&ids);
    let addrs = c.client.clone();
    let recorded = with_clients(&addrs, CLIENTS, |_| {
        std::thread::sleep(Duration::from_millis(800));
        c.kill(first);
        std::thread::sleep(Duration::from_millis(800));
        c.start(first);
        std::thread::sleep(Duration::from_millis(800));
        let second = c.wait_leader(&ids);
        signal(&c, second, "-STOP");
        std::thread::sleep(Duration::from_millis(800));
        signal(&c, second, "-CONT");
        std::thread::sleep(Duration::from_millis(800));
    });
    assert_linearizable(&recorded);
}

/// Real partitions between real processes (UDP relays the test cuts): the
/// leader cut off from both followers is replaced within a few election
/// timeouts and the majority keeps acknowledging writes, while the isolated
/// node commits nothing; then a follower is cut off and healed. Concurrent
/// clients (the mix of `client_loop`) run throughout, on every node, and the
/// whole history must be linearizable; at the end all three state machines
/// agree.
#[test]
fn partitions_majority_serves_minority_commits_nothing_histories_linearizable() {
    const CLIENTS: usize = 4;
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids).with_links();
    for id in ids {
        c.start(id);
    }
    let old = c.wait_leader(&ids);
    let rest: Vec<u64> = ids.iter().copied().filter(|&x| x != old).collect();
    let addrs = c.client.clone();
    let mut window = (0u64, 0u64);
    let recorded = with_clients(&addrs, CLIENTS, |start| {
        std::thread::sleep(Duration::from_millis(700));
        c.isolate(old, true);
        let cut = Instant::now();
        let mut new = None;
        eventually(
            "a new leader in the majority",
            Duration::from_secs(10),
            || {
                new = c.leader(&rest);
                new.is_some()
            },
        );
        println!(
            "leader {old} cut off; node {} leads after {:?}",
            new.unwrap(),
            cut.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
        let frozen = info_num(&c, old, "commit_index");
        window.0 = start.elapsed().as_micros() as u64;
        std::thread::sleep(Duration::from_millis(1200));
        window.1 = start.elapsed().as_micros() as u64;
        assert_eq!(
            info_num(&c, old, "commit_index"),
            frozen,
            "the isolated node {old} committed entries"
        );
        assert_ne!(
            c.info(old).get("role").map(String::as_str),
            Some("leader"),
            "check-quorum: the isolated node should have stepped down"
        );
        c.isolate(old, false);
        std::thread::sleep(Duration::from_millis(800));
        let follower = ids
            .iter()
            .copied()
            .find(|&x| c.info(x).get("role").map(String::as_str) != Some("leader"))
            .unwrap();
        c.isolate(follower, true);
        std::thread::sleep(Duration::from_millis(800));
        c.isolate(follower, false);
        std::thread::sleep(Duration::from_millis(800));
    });
    assert_linearizable(&recorded);
    let during = recorded
        .iter()
        .filter(|o| !matches!(o.kind, integration_tests::linearizable::Kind::Read(_)))
        .filter(|o| o.ret.is_some_and(|t| t > window.0 && t < window.1))
        .count();
    println!("{during} writes acknowledged while the old leader was cut off");
    assert!(during > 0, "the majority should keep acknowledging writes");
    // After healing every node holds the same data.
    let names = client_keys();
    let mut seen = Vec::new();
    for id in ids {
        // A node that was just healed may answer -TRYAGAIN until it has
        // found the leader again; that is the documented retryable answer.
        let end = Instant::now() + Duration::from_secs(20);
        let v: Vec<Option<String>> = loop {
            match redis::cmd("MGET").arg(&names).query(&mut c.conn(id)) {
                Ok(v) => break v,
                Err(e) => {
                    assert!(
                        e.code() == Some("TRYAGAIN") && Instant::now() < end,
                        "node {id}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        seen.push(v);
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "nodes disagree: {seen:?}"
    );
}

/// Partitions that leave the leader with a majority must not disturb it:
/// a follower cut off entirely, or one that stops hearing the leader while it
/// can still reach everyone (a one-way cut), may campaign but cannot win or
/// raise the term (pre-vote; followers in contact with the leader ignore it).
/// The leader and its term stay the same and writes keep being acknowledged.
#[test]
fn follower_and_one_way_partitions_do_not_disturb_the_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids).with_links();
    for id in ids {
        c.start(id);
    }
    let l = c.wait_leader(&ids);
    let term = info_num(&c, l, "term");
    let f = ids.iter().copied().find(|&x| x != l).unwrap();
    let check_undisturbed = |c: &Cluster, what: &str| {
        for i in 0..20 {
            write_until_ok(c, &[l], &format!("{what}{i}"), "v", Duration::from_secs(5));
        }
        let info = c.info(l);
        assert_eq!(
            info.get("role").map(String::as_str),
            Some("leader"),
            "{what}"
        );
        assert_eq!(info_num(c, l, "term"), term, "{what}: the term moved");
    };
    // The follower cut off from everyone, for several election timeouts.
    c.isolate(f, true);
    std::thread::sleep(Duration::from_millis(1500));
    check_undisturbed(&c, "isolated");
    c.isolate(f, false);
    std::thread::sleep(Duration::from_millis(500));
    check_undisturbed(&c, "healed");
    assert_eq!(
        info_num(&c, f, "term"),
        term,
        "the isolated follower raised its term"
    );
    // One way: the leader's messages to the follower are lost, the
    // follower's messages to everyone still arrive.
    c.links[&(l, f)]
        .cut
        .store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    check_undisturbed(&c, "one-way");
    c.links[&(l, f)]
        .cut
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the follower catches up", Duration::from_secs(20), || {
        info_num(&c, f, "applied_index") >= info_num(&c, l, "commit_index")
    });
    assert_eq!(info_num(&c, f, "term"), term);
}

/// A restart whose state machine is behind the log's compaction point (its
/// files were lost or replaced by an old copy) cannot be repaired from the log
/// any more: the node refuses to start with an error that says so and leaves
/// the log as it was; with the right state machine back it starts and serves
/// every write.
#[test]
fn a_state_machine_behind_the_compaction_point_is_refused_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(tmp.path(), &[1]);
    c.extra = vec!["--compact-threshold".into(), "10".into()];
    c.start(1);
    eventually("a leader", Duration::from_secs(20), || {
        c.leader(&[1]).is_some()
    });
    pipelined_sets(&c, 1, "g", 200);
    eventually("the log is compacted", Duration::from_secs(10), || {
        info_num(&c, 1, "purged_index") > 100
    });
    c.kill(1);
    let sm = tmp.path().join("node-1").join("sm");
    let aside = tmp.path().join("sm-aside");
    std::fs::rename(&sm, &aside).unwrap();
    c.start(1);
    let mut status = None;
    eventually("the node refuses to start", Duration::from_secs(20), || {
        status = c.procs.get_mut(&1).unwrap().try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    let log = std::fs::read_to_string(tmp.path().join("node-1.log")).unwrap();
    assert!(
        log.contains("below the compaction point"),
        "the error should say why: {log}"
    );
    c.procs.remove(&1);
    std::fs::remove_dir_all(&sm).unwrap();
    std::fs::rename(&aside, &sm).unwrap();
    c.start(1);
    let keys: Vec<String> = (0..200).map(|i| format!("g{i}")).collect();
    let end = Instant::now() + Duration::from_secs(20);
    let vals: Vec<Option<String>> = loop {
        match redis::cmd("MGET").arg(&keys).query(&mut c.conn(1)) {
            Ok(v) => break v,
            Err(e) => {
                assert!(Instant::now() < end, "node 1 never served: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    for (i, v) in vals.iter().enumerate() {
        assert_eq!(v.as_deref(), Some(format!("g-value-{i}").as_str()));
    }
}

/// The largest value a `SET key value` may carry under a node's
/// `max_entry_bytes` (the limit applies to the encoded command).
fn value_limit(key: &str, max_entry: usize) -> usize {
    let probe = 1 << 20;
    let cmd = raft_kv::command::WriteCmd::Set {
        key: key.as_bytes().to_vec(),
        value: vec![0; probe],
        cond: raft_kv::command::SetCond::Always,
    };
    max_entry - (cmd.encoded_len() - probe)
}

/// One large write used to stop every write in the cluster (the entry was
/// larger than the followers' frame limit and was resent forever). Values at
/// the limit - 1 and the limit commit, the limit + 1 and a 16 MiB value are
/// refused with a clear error before anything is proposed, through the
/// leader and through a follower, and the cluster keeps committing.
#[test]
fn values_at_the_entry_limit_commit_and_larger_ones_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    for id in [1, 2, 3] {
        c.start(id);
    }
    let leader = c.wait_leader(&[1, 2, 3]);
    let follower = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    let max_entry: usize = c.info(leader)["max_entry_bytes"].parse().unwrap();
    assert_eq!(max_entry, 8 << 20, "the default");
    for via in [leader, follower] {
        let key = format!("big-{via}");
        let limit = value_limit(&key, max_entry);
        for (n, fits) in [
            (limit - 1, true),
            (limit, true),
            (limit + 1, false),
            ((16 << 20) - 64, false),
        ] {
            let value = vec![b'v'; n];
            let res = set_retrying(&c, via, &key, &value);
            match res {
                Ok(ok) if fits => assert_eq!(ok, "OK"),
                Err(e) if !fits => {
                    let text = e.to_string();
                    assert!(
                        text.contains("too large"),
                        "{n} bytes via node {via}: {text}"
                    );
                }
                other => panic!("{n} bytes via node {via} (limit {limit}): {other:?}"),
            }
            // The cluster keeps committing, and the key holds the last value that fit.
            let small = format!("after-{via}-{n}");
            assert_eq!(set_retrying(&c, via, &small, b"x").unwrap(), "OK");
            let want = if fits { n } else { limit };
            eventually("STRLEN", Duration::from_secs(20), || {
                strlen(&c, via, &key) == Some(want)
            });
        }
    }
    // Every node holds the largest value (and got there over QUIC).
    for id in [1, 2, 3] {
        for via in [leader, follower] {
            let key = format!("big-{via}");
            let want = value_limit(&key, max_entry);
            eventually(
                "every node holds the value",
                Duration::from_secs(20),
                || strlen(&c, id, &key) == Some(want),
            );
        }
    }
}

/// A SET retried while the answer says it was not applied (TRYAGAIN) or
/// cannot say (UNKNOWN, a dropped connection): an 8 MiB write can cost a
/// leader change on a loaded machine. Setting the same value again is
/// harmless either way.
fn set_retrying(c: &Cluster, via: u64, key: &str, value: &[u8]) -> RedisResult<String> {
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

fn strlen(c: &Cluster, id: u64, key: &str) -> Option<usize> {
    redis::cmd("STRLEN").arg(key).query(&mut c.conn(id)).ok()
}

/// The members are stored at the first start. A member restarted without
/// its peers, or with a phantom one, refuses to start and names both sets
/// (it used to form a cluster of its own and accept conflicting writes);
/// started with the stored ones, it rejoins.
#[test]
fn a_member_restarted_with_other_peers_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    for id in [1, 2, 3] {
        c.start(id);
    }
    let leader = c.wait_leader(&[1, 2, 3]);
    let victim = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    write_until_ok(&c, &[leader], "before", "1", Duration::from_secs(10));
    c.kill(victim);
    let others: Vec<(u64, SocketAddr)> = c
        .raft
        .iter()
        .filter(|(&p, _)| p != victim)
        .map(|(&p, &a)| (p, a))
        .collect();
    let mut phantom = others.clone();
    phantom.push((4, free_udp()));
    for (what, peers) in [("no peers", Vec::new()), ("a phantom peer", phantom)] {
        let out = c
            .node_command(victim, &peers)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started anyway");
        assert!(
            stderr.contains("[1, 2, 3]") && stderr.contains("disagree"),
            "{what}: {stderr}"
        );
    }
    // Only one cluster exists: the write made meanwhile is seen by the
    // victim once it is back with the right peers.
    write_until_ok(&c, &[leader], "during", "2", Duration::from_secs(10));
    c.start(victim);
    eventually("the victim catches up", Duration::from_secs(20), || {
        let mut conn = c.conn(victim);
        redis::cmd("GET")
            .arg("during")
            .query::<Option<String>>(&mut conn)
            .ok()
            .flatten()
            .as_deref()
            == Some("2")
    });
}

/// A node whose disk fills does not stay up looking healthy: its Raft stops,
/// the process exits non-zero with the reason, and the other two keep serving.
#[test]
fn a_node_whose_disk_fills_exits_nonzero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    let _fs = integration_tests::tmpfs::Tmpfs::mount(&dir.path().join("node-3"), "24m");
    for id in [1, 2, 3] {
        c.start(id);
    }
    let leader = c.wait_leader(&[1, 2, 3]);
    let serving = if leader == 3 { 1 } else { leader };
    let value = vec![b'x'; 1 << 20];
    let end = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    let status = loop {
        i += 1;
        if let Some(st) = c.procs.get_mut(&3).and_then(|p| p.try_wait().unwrap()) {
            break st;
        }
        assert!(Instant::now() < end, "node 3 never noticed its full disk");
        let mut conn = c.conn(serving);
        let _: RedisResult<String> = conn.set(format!("fill-{}", i % 64), &value);
    };
    c.procs.remove(&3);
    assert!(!status.success(), "exit status {status:?}");
    let log = std::fs::read_to_string(dir.path().join("node-3.log")).unwrap();
    assert!(
        log.contains("the node stopped")
            && (log.to_lowercase().contains("space") || log.contains("stalled")),
        "node 3's log does not say why it stopped: {}",
        &log[log.len().saturating_sub(2000)..]
    );
    // The other two still commit.
    write_until_ok(&c, &[1, 2], "after-full", "1", Duration::from_secs(20));
}
