//! Log compaction: what may be purged, and restarts above the purge point.

use super::*;

#[test]
fn log_may_start_above_index_one() {
    let voters = [1, 2, 3];
    let mk = |id| {
        let init = InitialState {
            hard_state: HardState {
                term: 3,
                vote: None,
            },
            purged: LogId::new(3, 100),
            entries: vec![ent(3, 101)],
            membership: Membership::new(voters),
            applied: 100,
            snapshot: None,
            await_snapshot: false,
            incarnation: 0,
        };
        Engine::new(cfg(id), init, id, Duration::ZERO).unwrap()
    };
    let mut c = Cluster::new(3, |c| c);
    c.nodes = voters.iter().map(|&id| (id, mk(id))).collect();
    c.elect(1);
    c.node(1).propose(b"after".to_vec()).unwrap();
    c.settle();
    assert_eq!(c.node(2).last_log_id(), LogId::new(4, 103));
    assert_eq!(c.node(3).commit_index(), 103);
    let idx: Vec<LogIndex> = c.applied[&2].iter().map(|e| e.index).collect();
    assert_eq!(idx, vec![101, 102, 103]);
}

#[test]
fn compaction_waits_for_every_member_and_for_the_application() {
    let mut c = Cluster::new(3, |mut c| {
        c.compact_threshold = 4;
        c
    });
    c.elect(1);
    c.cut = vec![(1, 3), (3, 1)];
    for i in 0..10u8 {
        c.node(1).propose(vec![i]).unwrap();
    }
    c.settle();
    assert_eq!(c.node(1).commit_index(), 11);
    // Stored by the application on 1 and 2, but node 3 lacks the entries.
    c.node(1).release(11);
    c.node(2).release(11);
    heartbeat_round(&mut c, 1);
    assert_eq!(c.node(1).purged().index, 0, "node 3 still needs them");
    assert_eq!(c.node(2).purged().index, 0);
    // Node 3 catches up: now every member holds them.
    c.cut.clear();
    heartbeat_round(&mut c, 1);
    heartbeat_round(&mut c, 1);
    assert_eq!(c.node(3).last_log_id().index, 11);
    assert_eq!(c.node(1).purged(), LogId::new(1, 11));
    assert_eq!(c.node(2).purged(), LogId::new(1, 11), "told by the leader");
    assert_eq!(c.node(3).purged().index, 0, "node 3 has released nothing");
    c.node(3).release(11);
    assert_eq!(c.node(3).purged(), LogId::new(1, 11));
    let rd = c.node(3).take_ready();
    assert_eq!(
        rd.purge_to,
        Some(LogId::new(1, 11)),
        "the store is told once"
    );
    assert!(c.node(3).take_ready().purge_to.is_none());
    // Below the threshold nothing moves; replication goes on above the point.
    c.node(1).propose(b"after".to_vec()).unwrap();
    c.settle();
    c.node(1).release(12);
    heartbeat_round(&mut c, 1);
    assert_eq!(c.node(1).purged().index, 11, "1 entry < threshold 4");
    for id in [1, 2, 3] {
        assert_eq!(c.node(id).commit_index(), 12, "node {id}");
        assert!(c.applied_payloads(id).contains(&cmd("after")), "node {id}");
    }
}

#[test]
fn compaction_never_drops_unapplied_entries_and_a_restart_resumes_after_the_point() {
    let mut c = Cluster::new(1, |mut c| {
        c.compact_threshold = 2;
        c
    });
    c.elect(1);
    for i in 0..5u8 {
        c.node(1).propose(vec![i]).unwrap();
    }
    c.settle();
    assert_eq!(c.node(1).applied_index(), 6);
    // The application claims more than was handed to it: capped at what it took.
    c.node(1).release(100);
    assert_eq!(c.node(1).purged(), LogId::new(1, 6));
    // A restart from the compacted store: the point plus nothing after it.
    let init = InitialState {
        hard_state: HardState {
            term: 1,
            vote: Some(1),
        },
        purged: LogId::new(1, 6),
        entries: vec![],
        membership: Membership::new([1]),
        applied: 6,
        snapshot: None,
        await_snapshot: false,
        incarnation: 0,
    };
    let mut e = Engine::new(cfg(1), init, 7, Duration::ZERO).unwrap();
    assert_eq!(e.last_log_id(), LogId::new(1, 6));
    let d = e.next_deadline();
    e.tick(d);
    let _ = e.take_ready();
    assert_eq!(e.role(), Role::Leader);
    let id = e.propose(b"x".to_vec()).unwrap();
    assert_eq!(id, LogId::new(2, 8), "after the new leader's no-op at 7");
}

// ----- thesis §4.1: the latest configuration in the log counts --------------
