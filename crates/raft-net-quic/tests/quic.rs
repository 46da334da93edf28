//! QuicTransport over loopback: Raft nodes replicate; strangers and impostors
//! are refused; garbage on a stream closes only that stream; a restarted peer
//! reconnects and catches up.

use raft_core::node::{ApplyMsg, Error, Raft};
use raft_core::testing::{transport_conformance, NetworkFactory};
use raft_core::Config;
use raft_core::{MemLogStore, Member, Membership, Message, MessageBody, NodeId, Transport};
use raft_net_quic::{wire, ClusterCa, QuicConfig, QuicTransport, TlsMaterial};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

const PLACEHOLDER: &str = "127.0.0.1:9";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn bind(id: NodeId, listen: SocketAddr, peers: &[NodeId], tls: &TlsMaterial) -> QuicTransport {
    let mut cfg = QuicConfig::new(id, listen);
    cfg.peers = peers
        .iter()
        .filter(|&&p| p != id)
        .map(|&p| (p, PLACEHOLDER.parse().unwrap()))
        .collect();
    QuicTransport::bind(cfg, tls).expect("bind")
}

/// Binds one transport per id on ephemeral ports and tells each the others' addresses.
fn mesh(ca: &ClusterCa, ids: &[NodeId]) -> (Vec<QuicTransport>, BTreeMap<NodeId, SocketAddr>) {
    let ts: Vec<QuicTransport> = ids
        .iter()
        .map(|&id| bind(id, any_port(), ids, &ca.material(id).unwrap()))
        .collect();
    let addrs: BTreeMap<NodeId, SocketAddr> = ids
        .iter()
        .zip(&ts)
        .map(|(&id, t)| (id, t.local_addr().unwrap()))
        .collect();
    for (&id, t) in ids.iter().zip(&ts) {
        for (&p, &a) in &addrs {
            if p != id {
                t.set_peer_addr(p, a).unwrap();
            }
        }
    }
    (ts, addrs)
}

fn hb(from: NodeId, to: NodeId, term: u64) -> Message {
    Message {
        from,
        to,
        term,
        incarnation: 0,
        body: MessageBody::Heartbeat {
            leader_commit: 0,
            round: term,
            purge_to_index: 0,
        },
    }
}

async fn recv_within(t: &mut QuicTransport, d: Duration) -> Option<Message> {
    timeout(d, t.recv()).await.ok().flatten()
}

/// Sends until the receiver gets a message with this round (the connection may need a moment).
async fn deliver(from: &QuicTransport, to: &mut QuicTransport, msg: Message) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        from.send(msg.clone());
        if let Some(got) = recv_within(to, Duration::from_millis(200)).await {
            if got == msg {
                return true;
            }
        }
    }
    false
}

struct Node {
    raft: Raft,
    _apply: tokio::task::JoinHandle<()>,
}

fn start_node(id: NodeId, ids: &[NodeId], t: QuicTransport, store: MemLogStore) -> Node {
    let mut cfg = Config::new(id);
    for &p in ids.iter().filter(|&&p| p != id) {
        cfg.add_peer(p).unwrap();
    }
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(1024);
    let raft = Raft::new(cfg, store, t, tx).unwrap();
    let apply = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    Node {
        raft,
        _apply: apply,
    }
}

async fn leader_of(nodes: &BTreeMap<NodeId, Node>, within: Duration) -> Option<NodeId> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some((&id, _)) = nodes.iter().find(|(_, n)| n.raft.is_leader()) {
            return Some(id);
        }
        sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn write(nodes: &BTreeMap<NodeId, Node>, cmd: &[u8]) -> Result<u64, Error> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let l = leader_of(nodes, Duration::from_secs(5))
            .await
            .ok_or(Error::NotLeader { leader: None })?;
        match timeout(
            Duration::from_secs(2),
            nodes[&l].raft.submit_and_wait(cmd.to_vec()),
        )
        .await
        {
            Ok(Ok(i)) => return Ok(i),
            _ if Instant::now() < end => sleep(Duration::from_millis(50)).await,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Unknown(0)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_raft_nodes_over_quic_replicate_refuse_strangers_and_survive_a_restart() {
    let ca = ClusterCa::generate().unwrap();
    let ids = [1u64, 2, 3];
    let (ts, addrs) = mesh(&ca, &ids);
    let stores: BTreeMap<NodeId, MemLogStore> =
        ids.iter().map(|&id| (id, MemLogStore::new())).collect();
    let mut nodes = BTreeMap::new();
    for (id, t) in ids.iter().copied().zip(ts) {
        let n = start_node(id, &ids, t, stores[&id].reopen());
        n.raft.start().await.unwrap();
        nodes.insert(id, n);
    }
    let leader = leader_of(&nodes, Duration::from_secs(5))
        .await
        .expect("a leader over QUIC");
    for i in 0..20 {
        write(&nodes, format!("w{i}").as_bytes())
            .await
            .expect("replicated write");
    }
    let term = nodes[&leader].raft.status().term;

    // Strangers: a certificate from another CA, and a valid certificate claiming another id.
    let rogue_ca = ClusterCa::generate().unwrap();
    let real_ca_pem = ca.material(9).unwrap().cas;
    let mut foreign = rogue_ca.material(3).unwrap();
    foreign.cas = real_ca_pem.clone(); // trusts the cluster, so only the server side can refuse it
    let impostor = ca.material(3).unwrap(); // valid for node 3, will claim to be node 2
    let stranger = bind(3, any_port(), &[1, 2], &foreign);
    let liar = bind(2, any_port(), &[1, 3], &impostor);
    for (t, from) in [(&stranger, 3u64), (&liar, 2u64)] {
        for &to in &ids {
            if to != from {
                t.set_peer_addr(to, addrs[&to]).unwrap();
            }
        }
    }
    for _ in 0..20 {
        for to in [1u64, 2] {
            stranger.send(hb(3, to, term + 100));
        }
        for to in [1u64, 3] {
            liar.send(hb(2, to, term + 100));
        }
        sleep(Duration::from_millis(25)).await;
    }
    for (id, n) in &nodes {
        assert!(
            n.raft.status().term < term + 100,
            "node {id} accepted a stranger's term"
        );
    }
    write(&nodes, b"after strangers")
        .await
        .expect("cluster unaffected");

    // Kill a follower, write more, restart it on the same address: it reconnects and catches up.
    let victim = ids
        .into_iter()
        .find(|&x| {
            x != nodes
                .iter()
                .find(|(_, n)| n.raft.is_leader())
                .map(|(&i, _)| i)
                .unwrap_or(leader)
        })
        .unwrap();
    let n = nodes.remove(&victim).unwrap();
    n.raft.shutdown().await.unwrap();
    drop(n);
    let mut last = 0;
    for i in 0..10 {
        last = write(&nodes, format!("while down {i}").as_bytes())
            .await
            .expect("majority keeps writing");
    }
    let material = ca.material(victim).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let t = loop {
        // The old endpoint releases its UDP port once its tasks have wound down.
        let mut cfg = QuicConfig::new(victim, addrs[&victim]);
        cfg.peers = addrs
            .iter()
            .filter(|(&p, _)| p != victim)
            .map(|(&p, &a)| (p, a))
            .collect();
        match QuicTransport::bind(cfg, &material) {
            Ok(t) => break t,
            Err(e) if Instant::now() < end => {
                let _ = e;
                sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cannot rebind {}: {e}", addrs[&victim]),
        }
    };
    let n = start_node(victim, &ids, t, stores[&victim].reopen());
    n.raft.start().await.unwrap();
    let mut st = n.raft.watch_status();
    let caught = timeout(
        Duration::from_secs(10),
        st.wait_for(|s| s.commit_index >= last),
    )
    .await
    .is_ok_and(|r| r.is_ok()); // the guard is dropped here: it holds the status lock
    assert!(caught, "restarted node did not catch up to {last}");
    nodes.insert(victim, n);
    for n in nodes.values() {
        n.raft.shutdown().await.unwrap();
    }
}

async fn raw_stream(
    ca: &ClusterCa,
    as_id: NodeId,
    to: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let material = ca.material(as_id).unwrap();
    let mut ep = quinn::Endpoint::client(any_port()).unwrap();
    ep.set_default_client_config(raft_net_quic::tls::client_config(&material).unwrap());
    let conn = ep
        .connect(to, "node-1.raft")
        .unwrap()
        .await
        .expect("handshake with a valid certificate");
    (ep, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_oversized_frames_close_only_their_stream() {
    let ca = ClusterCa::generate().unwrap();
    let ids = [1u64, 2, 3];
    let (mut ts, addrs) = mesh(&ca, &ids);
    let t3 = ts.pop().unwrap();
    let t2 = ts.pop().unwrap();
    let mut t1 = ts.pop().unwrap();
    assert!(
        deliver(&t3, &mut t1, hb(3, 1, 1)).await,
        "baseline delivery"
    );

    let (_ep, conn) = raw_stream(&ca, 2, addrs[&1]).await;
    let mut junk = vec![0u8; 4096];
    let mut x = 7u64;
    for b in junk.iter_mut() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (x >> 33) as u8;
    }
    let valid = wire::encode_frame(&hb(2, 1, 5)).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes instead of a header", junk.clone()),
        (
            "random bytes after the header",
            [&wire::header(0, 2, 1)[..], &junk].concat(),
        ),
        (
            "a truncated frame",
            [&wire::header(0, 2, 1)[..], &valid[..valid.len() - 3]].concat(),
        ),
        (
            "an oversized frame",
            [
                &wire::header(0, 2, 1)[..],
                &u32::MAX.to_le_bytes()[..],
                &[0u8; 64][..],
            ]
            .concat(),
        ),
        (
            "a message under another id",
            [
                &wire::header(0, 2, 1)[..],
                &wire::encode_frame(&hb(3, 1, 9)).unwrap()[..],
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = conn.open_uni().await.unwrap();
        let _ = s.write_all(&bytes).await;
        let _ = s.finish();
        // Whatever the stream carried, no message from it arrives...
        if let Some(m) = recv_within(&mut t1, Duration::from_millis(300)).await {
            assert!(
                m.from == 3 || m.term == 1,
                "{what}: a message leaked through: {m:?}"
            );
        }
        // ...and the node keeps serving its peers.
        let probe = hb(3, 1, 100 + what.len() as u64);
        assert!(
            deliver(&t3, &mut t1, probe).await,
            "{what}: node stopped serving"
        );
    }
    // A well-formed stream from the same connection still works.
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[&wire::header(0, 2, 1)[..], &valid[..]].concat())
        .await
        .unwrap();
    let got = recv_within(&mut t1, Duration::from_secs(2)).await;
    assert_eq!(got, Some(hb(2, 1, 5)));
    drop(t2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cluster_id_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let (mut ts, addrs) = mesh(&ca, &[1, 2]);
    let mut t1 = ts.remove(0);
    let mut cfg = QuicConfig::new(2, any_port());
    cfg.cluster_id = 77;
    cfg.peers = [(1u64, addrs[&1])].into_iter().collect();
    let other = QuicTransport::bind(cfg, &ca.material(2).unwrap()).unwrap();
    for _ in 0..10 {
        other.send(hb(2, 1, 3));
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(recv_within(&mut t1, Duration::from_millis(500)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_reaches_the_peer_handler_with_the_authenticated_sender() {
    let ca = ClusterCa::generate().unwrap();
    let (mut ts, _addrs) = mesh(&ca, &[1, 2]);
    let mut server = ts[0].rpc_endpoint().expect("an RPC endpoint");
    tokio::spawn(async move {
        while let Some(req) = server.inbound.recv().await {
            let mut out = format!("from {}: ", req.from).into_bytes();
            out.extend(req.request.iter().rev());
            req.reply(out);
        }
    });
    let client = ts[1].rpc_endpoint().expect("an RPC endpoint").client;
    let reply = timeout(Duration::from_secs(5), client.call(1, b"olleh".to_vec()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"from 2: hello");
    assert!(client.call(7, b"x".to_vec()).await.is_err(), "unknown peer");
}

/// QUIC meshes on loopback for the transport conformance suite.
struct QuicMeshes {
    cas: Vec<ClusterCa>,
}

#[async_trait::async_trait]
impl NetworkFactory for QuicMeshes {
    type Transport = QuicTransport;
    async fn cluster(&mut self, ids: &[NodeId]) -> Vec<QuicTransport> {
        let ca = ClusterCa::generate().unwrap();
        let (ts, _) = mesh(&ca, ids);
        self.cas.push(ca);
        ts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_transport_conforms() {
    transport_conformance(QuicMeshes { cas: Vec::new() }).await;
}

/// Members added at runtime are reached at the address the configuration
/// records; a removed member's link is closed and nothing more goes to it.
#[tokio::test]
async fn peers_follow_the_membership_added_and_removed_at_runtime() {
    let ca = ClusterCa::generate().unwrap();
    let (mut ts, _) = mesh(&ca, &[1, 2]);
    let mut t2 = ts.pop().unwrap();
    let t1 = ts.pop().unwrap();
    // Node 3 joins later: nobody was started knowing it.
    let mut t3 = bind(3, any_port(), &[], &ca.material(3).unwrap());
    assert_eq!(t1.peer_ids(), vec![2]);
    let mut m = Membership::new([1, 2]);
    m.learners.insert(3);
    m.nodes.insert(
        3,
        Member {
            addr: t3.local_addr().unwrap().to_string(),
            incarnation: 7,
        },
    );
    t1.update_members(&m);
    assert_eq!(t1.peer_ids(), vec![2, 3]);
    assert!(
        deliver(&t1, &mut t3, hb(1, 3, 1)).await,
        "reached the new member"
    );
    // And node 3 answers although it started with no peers: it learns them
    // from the configuration too (here: node 1's address).
    let mut m3 = m.clone();
    m3.nodes.insert(
        1,
        Member {
            addr: t1.local_addr().unwrap().to_string(),
            incarnation: 1,
        },
    );
    t3.update_members(&m3);
    let mut t1 = t1;
    assert!(
        deliver(&t3, &mut t1, hb(3, 1, 2)).await,
        "the new member answers"
    );
    // Node 2 is removed: its link goes, and messages to it are dropped.
    let mut gone = Membership::new([1]);
    gone.learners.insert(3);
    t1.update_members(&gone);
    assert_eq!(t1.peer_ids(), vec![3]);
    t1.send(hb(1, 2, 3));
    assert_eq!(recv_within(&mut t2, Duration::from_millis(500)).await, None);
}

/// A member that knows no address for a peer (restarted without `--peer`,
/// or one whose configuration records none) answers it at the address its
/// authenticated connection came from.
#[tokio::test]
async fn a_peer_without_an_address_is_answered_where_it_connected_from() {
    let ca = ClusterCa::generate().unwrap();
    let t1 = bind(1, any_port(), &[2], &ca.material(1).unwrap());
    let mut t2 = bind(2, any_port(), &[], &ca.material(2).unwrap());
    t1.set_peer_addr(2, t2.local_addr().unwrap()).unwrap();
    // Node 2 has node 1 as a member, with no address.
    t2.update_members(&Membership::new([1, 2]));
    t2.send(hb(2, 1, 1));
    let mut t1 = t1;
    assert_eq!(
        recv_within(&mut t1, Duration::from_millis(300)).await,
        None,
        "no address yet: nothing can be sent"
    );
    assert!(deliver(&t1, &mut t2, hb(1, 2, 2)).await);
    assert!(
        deliver(&t2, &mut t1, hb(2, 1, 3)).await,
        "answered where 1 came from"
    );
}

/// A member added later gets a certificate signed by the CA kept in the
/// certificate directory, and talks to the members made before it. The CA
/// is never replaced by accident, a key that is not the CA's is refused,
/// and private keys are the owner's alone.
#[tokio::test]
async fn certificates_added_with_the_kept_ca_connect_to_the_old_members() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raft_net_quic::generate_cluster_certs(d, &[1]).unwrap();
    let again = raft_net_quic::generate_cluster_certs(d, &[1, 2]).unwrap_err();
    assert!(again.to_string().contains("holds a CA already"), "{again}");
    raft_net_quic::add_node_certs(d, &[2]).unwrap();
    let twice = raft_net_quic::add_node_certs(d, &[2]).unwrap_err();
    assert!(twice.to_string().contains("already"), "{twice}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "node-1.key", "node-2.key"] {
            let mode = std::fs::metadata(d.join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{key} is private");
        }
    }
    let m1 = TlsMaterial::load_dir(d, 1).unwrap();
    let m2 = TlsMaterial::load_dir(d, 2).unwrap();
    let mut t1 = bind(1, any_port(), &[2], &m1);
    let mut t2 = bind(2, any_port(), &[1], &m2);
    t1.set_peer_addr(2, t2.local_addr().unwrap()).unwrap();
    t2.set_peer_addr(1, t1.local_addr().unwrap()).unwrap();
    assert!(deliver(&t1, &mut t2, hb(1, 2, 1)).await);
    assert!(deliver(&t2, &mut t1, hb(2, 1, 2)).await);
    // Another CA's key next to this ca.pem signs nothing.
    let other = tempfile::tempdir().unwrap();
    raft_net_quic::generate_cluster_certs(other.path(), &[]).unwrap();
    std::fs::remove_file(d.join("ca.key")).unwrap();
    std::fs::copy(other.path().join("ca.key"), d.join("ca.key")).unwrap();
    let wrong = raft_net_quic::add_node_certs(d, &[3]).unwrap_err();
    assert!(wrong.to_string().contains("does not belong"), "{wrong}");
}

/// A peer that restarted is sent the very first message after its restart:
/// the stream kept from before fails, and the message goes again on a new
/// connection instead of being lost (a lost vote answer costs an election).
#[tokio::test]
async fn the_first_message_to_a_restarted_peer_is_not_lost() {
    let ca = ClusterCa::generate().unwrap();
    let (mut ts, addrs) = mesh(&ca, &[1, 2]);
    let mut t2 = ts.pop().unwrap();
    let t1 = ts.pop().unwrap();
    assert!(deliver(&t1, &mut t2, hb(1, 2, 1)).await);
    drop(t2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut t2 = bind(2, addrs[&2], &[1], &ca.material(2).unwrap());
    t2.set_peer_addr(1, addrs[&1]).unwrap();
    t1.send(hb(1, 2, 2));
    assert_eq!(
        recv_within(&mut t2, Duration::from_secs(3)).await,
        Some(hb(1, 2, 2)),
        "sent once, received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_peer_retries_at_the_back_off_pace_not_per_message() {
    let ca = ClusterCa::generate().unwrap();
    let (mut ts, addrs) = mesh(&ca, &[1, 2]);
    let mut t1 = ts.remove(0);
    let mut cfg = QuicConfig::new(2, any_port());
    cfg.cluster_id = 77;
    cfg.peers = [(1u64, addrs[&1])].into_iter().collect();
    let mut other = QuicTransport::bind(cfg, &ca.material(2).unwrap()).unwrap();
    let rpc = other.rpc_endpoint().unwrap().client;
    // A message every 50 ms for 6 s, as heartbeats would be, and a request
    // on the same connection at the same time (two users of one link, as
    // the control and bulk writers are): were the back-off reset by each
    // successful handshake, or by a second user finding the connection
    // still open before the refusal arrives, every message would cost a
    // handshake and a refusal (about 120).
    let end = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < end {
        other.send(hb(2, 1, 3));
        let _ = timeout(Duration::from_millis(50), rpc.call(1, vec![1, 2, 3])).await;
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recv_within(&mut t1, Duration::from_millis(200)).await, None);
    let refused = t1.refused_count();
    // Back-off steps of 50 ms doubling (with jitter of +-50%) give about 8
    // attempts in 6 s.
    assert!((1..=12).contains(&refused), "{refused} refusals in 6 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_hold_only_a_few_connections() {
    let ca = ClusterCa::generate().unwrap();
    let (mut ts, addrs) = mesh(&ca, &[1, 2]);
    let mut t1 = ts.remove(0);
    let mut held = Vec::new();
    // Each raw connection speaks for node 2 with one valid heartbeat.
    for i in 0..raft_net_quic::MAX_CONNECTIONS_PER_PEER as u64 {
        let (ep, conn) = raw_stream(&ca, 2, addrs[&1]).await;
        let mut s = conn.open_uni().await.unwrap();
        let frame = wire::encode_frame(&hb(2, 1, 10 + i)).unwrap();
        s.write_all(&[&wire::header(0, 2, 1)[..], &frame[..]].concat())
            .await
            .unwrap();
        assert_eq!(
            recv_within(&mut t1, Duration::from_secs(5)).await,
            Some(hb(2, 1, 10 + i)),
            "connection {i} refused"
        );
        held.push((ep, conn, s));
    }
    let before = t1.refused_count();
    let (_ep, extra) = raw_stream(&ca, 2, addrs[&1]).await;
    let mut s = extra.open_uni().await.unwrap();
    let frame = wire::encode_frame(&hb(2, 1, 99)).unwrap();
    let _ = s
        .write_all(&[&wire::header(0, 2, 1)[..], &frame[..]].concat())
        .await;
    assert_eq!(recv_within(&mut t1, Duration::from_millis(500)).await, None);
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.closed())
        .await
        .expect("the extra connection stays open");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == wire::ERR_REFUSED),
        "{closed:?}"
    );
    assert_eq!(t1.refused_count(), before + 1);
    // Closing one frees its place.
    let (_, conn, _) = held.remove(0);
    conn.close(0u32.into(), b"bye");
    let mut admitted = false;
    for attempt in 0..50u64 {
        sleep(Duration::from_millis(50)).await;
        let (_ep, c) = raw_stream(&ca, 2, addrs[&1]).await;
        let mut s = c.open_uni().await.unwrap();
        let frame = wire::encode_frame(&hb(2, 1, 200 + attempt)).unwrap();
        let _ = s
            .write_all(&[&wire::header(0, 2, 1)[..], &frame[..]].concat())
            .await;
        if let Some(m) = recv_within(&mut t1, Duration::from_millis(300)).await {
            assert_eq!(m, hb(2, 1, 200 + attempt));
            admitted = true;
            break;
        }
    }
    assert!(admitted, "a closed connection's place was never freed");
}

/// Material for `id` signed by `signer`, trusting the CAs `trusted`.
fn material_trusting(signer: &ClusterCa, id: NodeId, trusted: &[&ClusterCa]) -> TlsMaterial {
    use rustls::pki_types::pem::PemObject;
    let mut m = signer.material(id).unwrap();
    m.cas = trusted
        .iter()
        .map(|c| {
            rustls::pki_types::CertificateDer::from_pem_slice(c.cert_pem().as_bytes()).unwrap()
        })
        .collect();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cas_in_ca_pem_let_the_ca_be_rotated_member_by_member() {
    let (old, new) = (
        ClusterCa::generate().unwrap(),
        ClusterCa::generate().unwrap(),
    );
    // Node 1 still has its old certificate, node 2 a new one; both trust both.
    let mut t1 = bind(
        1,
        any_port(),
        &[],
        &material_trusting(&old, 1, &[&old, &new]),
    );
    let a1 = t1.local_addr().unwrap();
    let t2 = {
        let mut cfg = QuicConfig::new(2, any_port());
        cfg.peers = [(1u64, a1)].into_iter().collect();
        QuicTransport::bind(cfg, &material_trusting(&new, 2, &[&old, &new])).unwrap()
    };
    assert!(deliver(&t2, &mut t1, hb(2, 1, 1)).await, "rotation pair");
    // A node that trusts only the old CA refuses the new certificate.
    let mut t3 = bind(3, any_port(), &[], &material_trusting(&old, 3, &[&old]));
    let a3 = t3.local_addr().unwrap();
    let t4 = {
        let mut cfg = QuicConfig::new(4, any_port());
        cfg.peers = [(3u64, a3)].into_iter().collect();
        QuicTransport::bind(cfg, &material_trusting(&new, 4, &[&old, &new])).unwrap()
    };
    for _ in 0..10 {
        t4.send(hb(4, 3, 1));
        sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(recv_within(&mut t3, Duration::from_millis(500)).await, None);
    // The files: a ca.pem holding both loads both; a CA key that signs new
    // members is accepted when either certificate is its own.
    let dir = tempfile::tempdir().unwrap();
    raft_net_quic::generate_cluster_certs(dir.path(), &[1]).unwrap();
    let first = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        format!("{}{first}", old.cert_pem()),
    )
    .unwrap();
    let m = TlsMaterial::load_dir(dir.path(), 1).unwrap();
    assert_eq!(m.cas.len(), 2);
    raft_net_quic::add_node_certs(dir.path(), &[5]).unwrap();
    TlsMaterial::load_dir(dir.path(), 5).unwrap();
}

#[test]
fn generated_certificates_have_a_sane_validity_and_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("a/b");
    raft_net_quic::generate_cluster_certs(&certs, &[1]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&certs), 0o700);
        assert_eq!(mode(&certs.join("ca.key")), 0o600);
        assert_eq!(mode(&certs.join("node-1.key")), 0o600);
    }
    // The certificates' validity, read with openssl when it is there, else
    // from the DER: both dates are UTCTime (YYMMDDHHMMSSZ) before 2050.
    for (name, days) in [
        ("ca.pem", raft_net_quic::tls::CA_VALID_DAYS),
        ("node-1.pem", raft_net_quic::tls::NODE_VALID_DAYS),
    ] {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(certs.join(name)).unwrap();
        // UTCTime values: tag 0x17, length 13.
        let times: Vec<String> = der
            .as_ref()
            .windows(15)
            .filter(|w| w[0] == 0x17 && w[1] == 13 && w[14] == b'Z')
            .map(|w| String::from_utf8_lossy(&w[2..14]).into_owned())
            .collect();
        assert_eq!(times.len(), 2, "{name}: {times:?}");
        let year = |t: &str| 2000 + t[..2].parse::<i64>().unwrap();
        let span = year(&times[1]) - year(&times[0]);
        let want = days / 365;
        assert!(
            (want..=want + 1).contains(&span),
            "{name}: valid {} to {} ({span} years, want {want})",
            times[0],
            times[1]
        );
    }
}

/// A peer that cannot be reached fills its queue; what does not fit is
/// dropped (Raft sends again) and counted, for the metrics.
#[tokio::test]
async fn messages_dropped_from_a_full_queue_are_counted() {
    let ca = ClusterCa::generate().unwrap();
    let mut cfg = QuicConfig::new(1, any_port());
    // Nobody answers QUIC there: the writer waits on the connection.
    cfg.peers = [(2, PLACEHOLDER.parse().unwrap())].into_iter().collect();
    cfg.queue_len = 8;
    let t = QuicTransport::bind(cfg, &ca.material(1).unwrap()).unwrap();
    let stats = t.stats();
    assert_eq!(stats.dropped(), 0);
    for round in 0..50 {
        t.send(hb(1, 2, round));
    }
    // At most the queue and the one message its writer holds got in.
    let dropped = stats.dropped();
    assert!(
        (50 - 9..50).contains(&dropped),
        "50 sent into a queue of 8: {dropped} dropped"
    );
    assert_eq!(t.refused_count(), 0);
}
