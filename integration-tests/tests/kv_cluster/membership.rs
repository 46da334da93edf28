//! Membership changes with real processes, under the clients of
//! `client_loop` (their whole history must stay linearizable): a cluster
//! grown from 3 to 5 members with `--join`, leadership handed over, the
//! leader removed, a member whose machine is gone replaced, back to 3; the
//! removed members keep running and never raise the cluster's term.

use super::*;

fn admin(c: &Cluster, on: u64, args: &[&str]) -> RedisResult<redis::Value> {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut c.conn(on))
}

fn voters(c: &Cluster, id: u64) -> String {
    c.info(id).get("raft_voters").cloned().unwrap_or_default()
}

#[test]
fn grow_hand_over_remove_the_leader_replace_and_shrink_under_load() {
    const CLIENTS: usize = 4;
    let tmp = tempfile::tempdir().unwrap();
    let all = [1u64, 2, 3, 4, 5];
    let mut c = Cluster::new(tmp.path(), &all);
    for id in [1, 2, 3] {
        c.start_among(id, &[1, 2, 3], &[]);
    }
    c.wait_leader(&[1, 2, 3]);
    // The clients use the two members that stay throughout.
    let addrs: BTreeMap<u64, SocketAddr> = [1u64, 2].iter().map(|&i| (i, c.client[&i])).collect();
    let join_at = c.client[&1].to_string();
    let mut removed_term = 0;
    let recorded = with_clients(&addrs, CLIENTS, |_| {
        std::thread::sleep(Duration::from_millis(500));
        // Grow: 4 and 5 start empty and ask to join.
        for id in [4, 5] {
            c.start_among(id, &[], &["--join".into(), join_at.clone()]);
        }
        eventually("5 voters", Duration::from_secs(30), || {
            voters(&c, 1) == "1,2,3,4,5"
        });
        // Hand leadership to a new member.
        let r = admin(&c, 2, &["RAFT.TRANSFER", "4"]).unwrap();
        assert_eq!(r, redis::Value::Int(4));
        eventually("node 4 leads", Duration::from_secs(10), || {
            c.leader(&all) == Some(4)
        });
        std::thread::sleep(Duration::from_millis(300));
        // Remove the leader: it hands over and steps down.
        admin(&c, 1, &["RAFT.MEMBER", "REMOVE", "4"]).unwrap();
        eventually("4 voters, a new leader", Duration::from_secs(10), || {
            voters(&c, 1) == "1,2,3,5" && c.leader(&[1, 2, 3, 5]).is_some()
        });
        std::thread::sleep(Duration::from_millis(300));
        // Replace a member whose machine is gone for good.
        c.kill(3);
        admin(&c, 2, &["RAFT.MEMBER", "REMOVE", "3"]).unwrap();
        eventually("back to 3 voters", Duration::from_secs(10), || {
            voters(&c, 1) == "1,2,5"
        });
        // The removed node 4 keeps running: the cluster's term does not move.
        let l = c.wait_leader(&[1, 2, 5]);
        removed_term = info_num(&c, l, "term");
        std::thread::sleep(Duration::from_millis(2_000));
        assert_eq!(c.leader(&[1, 2, 5]), Some(l), "the leader stays");
        assert_eq!(info_num(&c, l, "term"), removed_term, "no election");
    });
    assert!(removed_term > 0);
    assert_linearizable(&recorded);
    // The new member holds what the others hold.
    let l = c.wait_leader(&[1, 2, 5]);
    write_until_ok(&c, &[l], "final", "x", Duration::from_secs(10));
    eventually("node 5 caught up", Duration::from_secs(10), || {
        let v: Option<String> = redis::cmd("GET")
            .arg("final")
            .query(&mut c.conn(5))
            .unwrap_or(None);
        v.as_deref() == Some("x")
    });
    for k in client_keys() {
        let a: Option<String> = redis::cmd("GET").arg(k).query(&mut c.conn(1)).unwrap();
        let b: Option<String> = redis::cmd("GET").arg(k).query(&mut c.conn(5)).unwrap();
        assert_eq!(a, b, "{k}");
    }
}
