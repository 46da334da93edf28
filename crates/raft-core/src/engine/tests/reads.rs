//! Thesis §6.4: linearizable reads through the read index and a heartbeat round.

use super::*;

#[test]
fn read_index_waits_for_a_quorum_round_and_returns_commit() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).propose(b"a".to_vec()).unwrap();
    c.settle();
    c.node(1).read_index(77).unwrap();
    let out = c.drain(1);
    assert!(
        c.reads.get(&1).is_none_or(|r| r.is_empty()),
        "not answered before a quorum confirms"
    );
    assert!(out
        .iter()
        .any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
    for m in out {
        let to = m.to;
        c.node(to).handle_message(Duration::ZERO, m);
    }
    c.settle();
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 77,
            result: Ok(2)
        }]
    );
    assert_eq!(c.node(2).read_index(1), Err(NotLeader { leader: Some(1) }));
}

#[test]
fn read_index_on_a_new_leader_waits_for_its_noop() {
    let mut c = Cluster::new(3, |c| c);
    let d = c.node(1).next_deadline();
    c.tick_node(1, d);
    // Deliver votes only, so the leader exists but has not committed its no-op.
    for m in c.drain(1) {
        let to = m.to;
        c.node(to).handle_message(Duration::ZERO, m);
    }
    for f in [2, 3] {
        for m in c.drain(f) {
            c.node(1).handle_message(Duration::ZERO, m);
        }
    }
    assert!(c.node(1).is_leader());
    assert_eq!(c.node(1).commit_index(), 0);
    c.node(1).read_index(5).unwrap();
    c.settle();
    let hb = c.now + ms(100);
    c.tick_node(1, hb);
    c.settle();
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 5,
            result: Ok(1)
        }]
    );
}

#[test]
fn pending_reads_fail_when_leadership_is_lost() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).read_index(9).unwrap();
    let t = c.node(1).term();
    c.node(1).handle_message(
        Duration::ZERO,
        msg(2, 1, t + 1, MessageBody::HeartbeatResponse { round: 0 }),
    );
    c.drain(1);
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 9,
            result: Err(NotLeader { leader: None })
        }]
    );
}
