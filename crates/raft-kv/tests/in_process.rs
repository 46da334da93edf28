//! raft-kv on raft-core's in-process `ChannelNetwork` and `MemLogStore`:
//! the store runs on any transport and log store. Writes through any node,
//! typed errors across forwarding, linearizable reads, a partitioned
//! leader, and the Redis edge over a real socket.

use raft_core::{ChannelNetwork, Config, MemLogStore, NodeId};
use raft_kv::command::{AdminCmd, ReadCmd, SetCond, Value, WriteCmd};
use raft_kv::error::KvError;
use raft_kv::node::KvNode;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Cluster {
    net: ChannelNetwork,
    nodes: BTreeMap<NodeId, Arc<KvNode>>,
    _dir: tempfile::TempDir,
}

async fn cluster(max_entry_bytes: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let net = ChannelNetwork::new();
    let ids = [1, 2, 3];
    let mut nodes = BTreeMap::new();
    for id in ids {
        let mut rc = Config::new(id);
        for p in ids.iter().filter(|&&p| p != id) {
            rc.add_peer(*p).unwrap();
        }
        rc.max_entry_bytes = max_entry_bytes;
        let node_dir = dir.path().join(format!("node-{id}"));
        let node = KvNode::start_with(rc, &node_dir, 0, MemLogStore::new(), net.join(id))
            .await
            .unwrap();
        nodes.insert(id, node);
    }
    Cluster {
        net,
        nodes,
        _dir: dir,
    }
}

impl Cluster {
    async fn leader(&self, among: &[NodeId]) -> NodeId {
        for _ in 0..400 {
            for &id in among {
                if self.nodes[&id].info().contains("role:leader") {
                    return id;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no leader among {among:?}");
    }

    async fn shutdown(self) {
        for n in self.nodes.values() {
            n.shutdown().await;
        }
    }
}

fn set(k: &str, v: &str) -> WriteCmd {
    WriteCmd::Set {
        key: k.into(),
        value: v.into(),
        cond: SetCond::Always,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_and_linearizable_reads_everywhere() {
    let c = cluster(1024).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let followers: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    // A follower forwards; the reply comes back typed.
    let r = c.nodes[&followers[0]]
        .write(vec![set("a", "1"), WriteCmd::IncrBy("a".into(), 41)])
        .await;
    assert_eq!(r, vec![Ok(Value::Ok), Ok(Value::Int(42))]);
    // The other follower reads it at once (read index through the leader).
    let got = c.nodes[&followers[1]]
        .read(&ReadCmd::Get(b"a".to_vec()))
        .await;
    assert_eq!(got, Ok(Value::Bulk(b"42".to_vec())));
    // Domain errors travel through forwarding as errors, not as texts.
    let r = c.nodes[&followers[1]]
        .write(vec![set("s", "x"), WriteCmd::IncrBy("s".into(), 1)])
        .await;
    assert_eq!(r, vec![Ok(Value::Ok), Err(KvError::NotAnInteger)]);
    // MSET and MGET: one batch, one view.
    let pairs = vec![
        (b"m1".to_vec(), b"x".to_vec()),
        (b"m2".to_vec(), b"x".to_vec()),
    ];
    assert_eq!(
        c.nodes[&leader].write(vec![WriteCmd::MSet(pairs)]).await,
        vec![Ok(Value::Ok)]
    );
    let got = c.nodes[&followers[0]]
        .read(&ReadCmd::MGet(vec![b"m1".to_vec(), b"m2".to_vec()]))
        .await;
    assert_eq!(
        got,
        Ok(Value::Array(vec![Some(b"x".to_vec()), Some(b"x".to_vec())]))
    );
    // Too large for the log: refused on a follower before anything is proposed.
    let big = c.nodes[&followers[0]]
        .write(vec![set("big", &"x".repeat(2000)), set("b", "2")])
        .await;
    assert!(
        matches!(big[0], Err(KvError::TooLarge { max: 1024, .. })),
        "{big:?}"
    );
    assert_eq!(big[1], Ok(Value::Ok));
    let got = c.nodes[&leader]
        .read(&ReadCmd::Exists(vec![b"big".to_vec(), b"b".to_vec()]))
        .await;
    assert_eq!(got, Ok(Value::Int(1)));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_serves_nothing_and_the_majority_goes_on() {
    let c = cluster(1 << 20).await;
    let old = c.leader(&[1, 2, 3]).await;
    assert_eq!(
        c.nodes[&old].write(vec![set("k", "before")]).await,
        vec![Ok(Value::Ok)]
    );
    c.net.isolate(old);
    let rest: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&i| i != old).collect();
    // The cut-off leader cannot confirm a read or commit a write.
    let read = c.nodes[&old].read(&ReadCmd::Get(b"k".to_vec())).await;
    assert!(
        read.is_err(),
        "a partitioned leader answered a read: {read:?}"
    );
    let new = c.leader(&rest).await;
    let w = c.nodes[&rest.iter().copied().find(|&i| i != new).unwrap()]
        .write(vec![set("k", "after")])
        .await;
    assert_eq!(w, vec![Ok(Value::Ok)]);
    let w = c.nodes[&old].write(vec![set("k", "lost")]).await;
    assert!(
        matches!(&w[0], Err(e) if e.stops_pipeline()),
        "a write on the minority side must not succeed: {w:?}"
    );
    c.net.heal();
    for id in [1, 2, 3] {
        let mut got = Err(KvError::NoLeader);
        for _ in 0..100 {
            got = c.nodes[&id].read(&ReadCmd::Get(b"k".to_vec())).await;
            if got.is_ok() {
                break;
            }
        }
        assert_eq!(got, Ok(Value::Bulk(b"after".to_vec())), "node {id}");
    }
    c.shutdown().await;
}

async fn ask(sock: &mut tokio::net::TcpStream, req: &str) -> String {
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while raft_kv::resp::reply_len(&got).is_none() {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_edge_spells_each_error_once() {
    let c = cluster(1 << 20).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let node = c.nodes[&leader].clone();
    let server = tokio::spawn(raft_kv::server::serve(
        listener,
        node.clone(),
        raft_kv::server::ClientConfig {
            password: Some("pw".into()),
            ..Default::default()
        },
        node.metrics().clone(),
        stop_rx,
    ));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        ask(&mut s, "GET a\r\n").await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert!(ask(&mut s, "AUTH nope\r\n")
        .await
        .starts_with("-WRONGPASS "));
    assert_eq!(ask(&mut s, "AUTH pw\r\n").await, "+OK\r\n");
    assert_eq!(ask(&mut s, "SET a 1\r\n").await, "+OK\r\n");
    assert_eq!(ask(&mut s, "INCR a\r\n").await, ":2\r\n");
    assert_eq!(ask(&mut s, "GET a\r\n").await, "$1\r\n2\r\n");
    assert_eq!(
        ask(&mut s, "GET\r\n").await,
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        ask(&mut s, "NOPE x\r\n").await,
        "-ERR unknown command 'NOPE', with args beginning with: 'x' \r\n"
    );
    assert_eq!(ask(&mut s, "SET a 1 XY\r\n").await, "-ERR syntax error\r\n");
    assert_eq!(ask(&mut s, "PING\r\n").await, "+PONG\r\n");
    server.abort();
    c.shutdown().await;
}

/// Starts node `id` of a three-node cluster that snapshots every 100
/// applied entries, in `dir`, on `log`.
async fn snapshotting_node(
    net: &ChannelNetwork,
    id: NodeId,
    dir: &std::path::Path,
    log: &MemLogStore,
) -> Arc<KvNode> {
    snapshotting_node_with(net, id, dir, log, false).await
}

/// With `join`: an empty node that waits to be added.
async fn snapshotting_node_with(
    net: &ChannelNetwork,
    id: NodeId,
    dir: &std::path::Path,
    log: &MemLogStore,
    join: bool,
) -> Arc<KvNode> {
    let mut rc = Config::new(id);
    rc.join = join;
    for p in [1, 2, 3].iter().filter(|&&p| p != id) {
        rc.add_peer(*p).unwrap();
    }
    rc.compact_threshold = 10;
    rc.trailing_entries = 10;
    rc.snapshot_chunk_bytes = 4096;
    KvNode::start_flushing_every(
        rc,
        dir,
        100,
        Duration::from_millis(50),
        log.reopen(),
        net.join(id),
    )
    .await
    .unwrap()
}

/// While every member keeps up, the log is compacted as the state machine
/// flushes and no periodic snapshot is taken, however many entries wait
/// between two flushes: the threshold counts only entries the log keeps
/// for a member that lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_keeps_up_compacts_without_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let net = ChannelNetwork::new();
    let mut nodes = BTreeMap::new();
    for id in [1, 2, 3] {
        let mut rc = Config::new(id);
        for p in [1, 2, 3].iter().filter(|&&p| p != id) {
            rc.add_peer(*p).unwrap();
        }
        rc.compact_threshold = 10;
        let node = KvNode::start_flushing_every(
            rc,
            &dir.path().join(format!("node-{id}")),
            200,
            // Far more entries than the threshold land between flushes.
            Duration::from_secs(2),
            MemLogStore::new(),
            net.join(id),
        )
        .await
        .unwrap();
        nodes.insert(id, node);
    }
    let c = Cluster {
        net,
        nodes,
        _dir: tempfile::tempdir().unwrap(),
    };
    let leader = c.leader(&[1, 2, 3]).await;
    let n = c.nodes[&leader].clone();
    for i in 0..1000 {
        let r = n.write(vec![set(&format!("k{i}"), "v")]).await;
        assert_eq!(r, vec![Ok(Value::Ok)]);
    }
    let last = n.state_machine().applied();
    for _ in 0..500 {
        if c.nodes
            .values()
            .all(|n| info_field(n, "purged_index") + 100 >= last)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in c.nodes.values() {
        assert!(
            info_field(n, "purged_index") + 100 >= last,
            "compacted as the state machine flushed: {}",
            n.info()
        );
        assert_eq!(
            info_field(n, "snapshot_index"),
            0,
            "no snapshot while every member keeps up: {}",
            n.info()
        );
    }
    c.shutdown().await;
}

fn info_field(n: &KvNode, name: &str) -> u64 {
    let info = n.info();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {info}"))
}

/// A follower down while the others snapshot and compact past it comes
/// back through the leader's snapshot; one whose whole directory was lost
/// is rebuilt the same way; one that lost only its state machine files
/// reloads its own snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_behind_the_compaction_point_are_caught_up_by_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let net = ChannelNetwork::new();
    let logs: BTreeMap<NodeId, MemLogStore> = [1, 2, 3].map(|i| (i, MemLogStore::new())).into();
    let node_dir = |id: NodeId| dir.path().join(format!("node-{id}"));
    let mut nodes = BTreeMap::new();
    for id in [1, 2, 3] {
        nodes.insert(
            id,
            snapshotting_node(&net, id, &node_dir(id), &logs[&id]).await,
        );
    }
    let c = Cluster {
        net: net.clone(),
        nodes,
        _dir: tempfile::tempdir().unwrap(),
    };
    let leader = c.leader(&[1, 2, 3]).await;
    let f = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    let mut nodes = c.nodes;
    nodes.remove(&f).unwrap().shutdown().await;
    let write_range = |nodes: &BTreeMap<NodeId, Arc<KvNode>>, from: usize, to: usize| {
        let n = nodes[&leader].clone();
        async move {
            for i in from..to {
                let r = n.write(vec![set(&format!("k{i}"), &format!("v{i}"))]).await;
                assert_eq!(r, vec![Ok(Value::Ok)]);
            }
        }
    };
    write_range(&nodes, 0, 400).await;
    let l = nodes[&leader].clone();
    for _ in 0..300 {
        if info_field(&l, "snapshot_index") >= 300 && info_field(&l, "purged_index") > 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(info_field(&l, "snapshot_index") >= 300, "{}", l.info());
    assert!(info_field(&l, "snapshot_bytes") > 0, "{}", l.info());
    assert!(info_field(&l, "purged_index") > 100, "{}", l.info());

    let caught_up = |n: Arc<KvNode>, l: Arc<KvNode>| async move {
        for _ in 0..500 {
            if n.state_machine().applied() >= l.state_machine().applied()
                && n.state_machine().dbsize().unwrap() == 400
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in (0..400).step_by(37).chain([399]) {
            assert_eq!(
                n.state_machine().get(format!("k{i}").as_bytes()).unwrap(),
                Some(format!("v{i}").into_bytes()),
                "key k{i} on the caught-up node: {}",
                n.info()
            );
        }
        assert_eq!(n.state_machine().dbsize().unwrap(), 400);
    };

    // 1. Back with its old log and state: the leader compacted past it.
    let back = snapshotting_node(&net, f, &node_dir(f), &logs[&f]).await;
    caught_up(back.clone(), l.clone()).await;
    assert!(
        info_field(&back, "snapshot_index") >= 300,
        "{}",
        back.info()
    );
    back.shutdown().await;

    // 2. Only its state machine files lost: its own snapshot reloads them.
    std::fs::remove_dir_all(node_dir(f).join("sm")).unwrap();
    let back = snapshotting_node(&net, f, &node_dir(f), &logs[&f]).await;
    caught_up(back.clone(), l.clone()).await;
    back.shutdown().await;

    // 2b. Its state machine file damaged (the first pages flipped): it is
    // set aside and rebuilt the same way, with no panic.
    let sm_dir = node_dir(f).join("sm");
    let gen = std::fs::read_to_string(sm_dir.join("CURRENT")).unwrap();
    let file = sm_dir.join(gen.trim()).join("state.redb");
    let mut bytes = std::fs::read(&file).unwrap();
    for b in bytes.iter_mut().take(8192) {
        *b ^= 0x5a;
    }
    std::fs::write(&file, bytes).unwrap();
    let back = snapshotting_node(&net, f, &node_dir(f), &logs[&f]).await;
    caught_up(back.clone(), l.clone()).await;
    back.shutdown().await;
    let set_aside = std::fs::read_dir(node_dir(f))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("sm.damaged-"));
    assert!(set_aside, "the damaged state machine is kept aside");

    // 3. Its whole directory and log lost: under its old id it is refused
    // (another storage identity); removed and added back as a new member,
    // it is rebuilt by the leader's snapshot.
    std::fs::remove_dir_all(node_dir(f)).unwrap();
    let back = snapshotting_node(&net, f, &node_dir(f), &MemLogStore::new()).await;
    for _ in 0..250 {
        if back.stopped().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = back.stopped().expect("the wiped node is refused");
    assert!(why.contains("refuses node"), "{why}");
    back.shutdown().await;
    l.admin(AdminCmd::Remove(f)).await.unwrap();
    std::fs::remove_dir_all(node_dir(f)).unwrap();
    let fresh = MemLogStore::new();
    let back = snapshotting_node_with(&net, f, &node_dir(f), &fresh, true).await;
    l.admin(AdminCmd::Add {
        id: f,
        addr: String::new(),
        incarnation: back.identity(),
    })
    .await
    .unwrap();
    caught_up(back.clone(), l.clone()).await;
    let mut promoted = l.admin(AdminCmd::Promote(f)).await;
    for _ in 0..100 {
        if promoted.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        promoted = l.admin(AdminCmd::Promote(f)).await;
    }
    promoted.unwrap();

    // 4. State machine and snapshots lost, log kept: the log is dropped
    // (term and vote kept) and the leader's snapshot rebuilds it.
    write_range(&nodes, 0, 200).await;
    back.shutdown().await;
    std::fs::remove_dir_all(node_dir(f).join("sm")).unwrap();
    std::fs::remove_dir_all(node_dir(f).join("snapshots")).unwrap();
    let back = snapshotting_node(&net, f, &node_dir(f), &fresh).await;
    caught_up(back.clone(), l.clone()).await;
    back.shutdown().await;
    for n in nodes.values() {
        n.shutdown().await;
    }
}

/// The longest the runtime's thread was away while `work` ran, and how
/// long `work` took: a task on the same thread wakes every millisecond
/// and notes its largest gap.
async fn longest_gap<T>(work: impl std::future::Future<Output = T>) -> (T, Duration, Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut worst = Duration::ZERO;
            let mut last = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let now = std::time::Instant::now();
                worst = worst.max(now - last);
                last = now;
            }
            worst
        }
    });
    tokio::task::yield_now().await;
    let t = std::time::Instant::now();
    let out = work.await;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    (out, took, ticker.await.unwrap())
}

/// On a single-threaded runtime (a node's default on two cores), a read
/// over every key, and the encoding of its reply of every key, run off the
/// thread that runs Raft: the thread stays free meanwhile. (A KEYS over a
/// million keys held it for half a second, and the leader lost its
/// leadership.)
#[tokio::test(flavor = "current_thread")]
async fn a_read_over_every_key_leaves_the_runtime_thread_free() {
    const KEYS: usize = 300_000;
    let c = cluster(8 << 20).await;
    let leader = c.leader(&[1, 2, 3]).await;
    let node = c.nodes[&leader].clone();
    for b in 0..KEYS / 1000 {
        let pairs = (0..1000)
            .map(|i| (format!("key:{b}:{i}").into_bytes(), b"v".to_vec()))
            .collect();
        let r = node.write(vec![WriteCmd::MSet(pairs)]).await;
        assert!(r[0].is_ok(), "{r:?}");
    }
    let (r, took, gap) = longest_gap(node.read(&ReadCmd::Keys(b"*".to_vec()))).await;
    match r {
        Ok(Value::List(keys)) => assert_eq!(keys.len(), KEYS),
        Ok(_) => panic!("KEYS: not a list"),
        Err(e) => panic!("KEYS: {e}"),
    }
    assert!(
        gap < took / 2,
        "the read took {took:?} and held the thread for {gap:?}"
    );

    // The same through the client port: the reply of every key is
    // encoded off the thread too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(raft_kv::server::serve(
        listener,
        node.clone(),
        raft_kv::server::ClientConfig::default(),
        node.metrics().clone(),
        stop_rx,
    ));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Until the reply's first bytes: the read, then the encoding.
    let mut buf = vec![0u8; 1 << 16];
    let (first, took, gap) = longest_gap(async {
        s.write_all(b"KEYS *\r\n").await.unwrap();
        s.read(&mut buf).await.unwrap()
    })
    .await;
    assert!(
        gap < took / 2,
        "KEYS over the client port answered after {took:?} and held the thread for {gap:?}"
    );
    // The array header, then one "$N\r\nkey\r\n" per key: count the
    // keys' line ends.
    let mut lines = buf[..first].iter().filter(|&&b| b == b'\n').count();
    while lines < 1 + 2 * KEYS {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the reply ended after {lines} lines");
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(lines, 1 + 2 * KEYS);
    server.abort();
    c.shutdown().await;
}
