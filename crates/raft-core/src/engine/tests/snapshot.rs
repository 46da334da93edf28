//! Snapshots (§7, Figure 13): compaction past a member that is down, the
//! leader sending a snapshot instead of entries it no longer holds, and
//! what a follower does with one.

use super::*;

/// Delivers every snapshot the leaders asked to send (as the drivers
/// would, once the last chunk is stored), then settles.
fn deliver_snapshots(c: &mut Cluster) {
    for (from, to, meta) in std::mem::take(&mut c.snapshot_sends) {
        let term = c.node(from).term();
        let m = msg(
            from,
            to,
            term,
            MessageBody::InstallSnapshot { meta: meta.clone() },
        );
        c.node(to).handle_message(Duration::ZERO, m);
        c.node(from).snapshot_sent(to, meta.last.index);
    }
    c.settle();
}

fn leader_with_down_follower() -> Cluster {
    let mut c = Cluster::new(3, |mut c| {
        c.compact_threshold = 2;
        c.trailing_entries = 2;
        c
    });
    c.elect(1);
    c.cut = vec![(1, 3), (3, 1)];
    for i in 0..10u8 {
        c.node(1).propose(vec![i]).unwrap();
    }
    c.settle();
    assert_eq!(c.node(1).commit_index(), 11);
    c
}

#[test]
fn a_snapshot_compacts_the_log_past_a_member_that_is_down() {
    let mut c = leader_with_down_follower();
    let meta = c.node(1).snapshot_taken(11).expect("a new snapshot");
    assert_eq!(meta.last, LogId::new(1, 11));
    assert_eq!(meta.membership, Membership::new([1, 2, 3]));
    c.settle();
    assert_eq!(
        c.node(1).purged().index,
        9,
        "compacted up to the snapshot less the trailing entries, though node 3 holds nothing"
    );
    assert!(c.node(1).snapshot_taken(11).is_none(), "not newer");
    assert!(c.node(1).snapshot_taken(12).is_none(), "not applied");
}

#[test]
fn a_follower_behind_the_compaction_point_gets_the_snapshot_and_then_entries() {
    let mut c = leader_with_down_follower();
    c.node(1).snapshot_taken(11).unwrap();
    c.settle();
    c.node(1).propose(b"after".to_vec()).unwrap();
    c.settle();
    c.cut.clear();
    heartbeat_round(&mut c, 1);
    heartbeat_round(&mut c, 1);
    assert_eq!(c.snapshot_sends.len(), 1, "{:?}", c.snapshot_sends);
    assert_eq!(c.snapshot_sends[0].1, 3);
    deliver_snapshots(&mut c);
    heartbeat_round(&mut c, 1);
    assert_eq!(c.installs[&3].len(), 1);
    assert_eq!(c.loaded[&3][0].last, LogId::new(1, 11));
    assert_eq!(c.node(3).purged(), LogId::new(1, 11));
    assert_eq!(c.node(3).last_log_id(), LogId::new(1, 12));
    assert_eq!(c.node(3).commit_index(), 12);
    let after: Vec<LogIndex> = c.applied[&3].iter().map(|e| e.index).collect();
    assert_eq!(
        after,
        vec![1, 12],
        "after the no-op it had before the cut, only what follows the snapshot is applied"
    );
}

#[test]
fn figure_13_a_snapshot_the_commit_index_covers_changes_nothing() {
    let mut f = engine_with(cfg(2), &[1, 2, 3], 2, log_of(&[1, 1, 2, 2]));
    f.handle_message(ms(0), msg(1, 2, 2, append(4, 2, vec![], 4)));
    take_all(&mut f);
    let meta = SnapshotMeta {
        last: LogId::new(1, 2),
        membership: Membership::new([1, 2, 3]),
    };
    f.handle_message(ms(0), msg(1, 2, 2, MessageBody::InstallSnapshot { meta }));
    let rd = f.take_ready();
    assert!(rd.install.is_none() && rd.apply_snapshot.is_none());
    assert_eq!(f.last_log_id(), LogId::new(2, 4), "the log is untouched");
    assert!(rd.persisted_messages.iter().any(|m| matches!(
        m.body,
        MessageBody::AppendResponse {
            success: true,
            index: 4,
            ..
        }
    )));
}

#[test]
fn figure_13_step_6_a_log_holding_the_snapshots_last_entry_keeps_what_follows() {
    // Entries 1-5, nothing known committed; the snapshot ends at 3 (term 1).
    let mut f = engine_with(cfg(2), &[1, 2, 3], 2, log_of(&[1, 1, 1, 2, 2]));
    let meta = SnapshotMeta {
        last: LogId::new(1, 3),
        membership: Membership::new([1, 2, 3]),
    };
    f.handle_message(ms(0), msg(1, 2, 2, MessageBody::InstallSnapshot { meta }));
    let rd = f.take_ready();
    assert!(rd.install.is_none(), "nothing is replaced");
    assert_eq!(f.last_log_id(), LogId::new(2, 5), "entries 4 and 5 stay");
    assert_eq!(f.commit_index(), 3);
    let idx: Vec<LogIndex> = rd.committed.iter().map(|e| e.index).collect();
    assert_eq!(idx, vec![1, 2, 3], "the log applies as usual");
}

#[test]
fn figure_13_steps_7_8_a_conflicting_log_is_replaced_by_the_snapshot() {
    let mut f = engine_with(cfg(2), &[1, 2, 3], 3, log_of(&[1, 2, 2, 2]));
    let meta = SnapshotMeta {
        last: LogId::new(3, 3),
        membership: Membership::new([1, 2, 3]),
    };
    f.handle_message(
        ms(0),
        msg(1, 2, 3, MessageBody::InstallSnapshot { meta: meta.clone() }),
    );
    let rd = f.take_ready();
    assert_eq!(rd.install.as_ref(), Some(&meta));
    assert_eq!(rd.apply_snapshot.as_ref(), Some(&meta));
    assert!(rd.committed.is_empty(), "the snapshot holds those entries");
    assert_eq!(f.last_log_id(), LogId::new(3, 3));
    assert_eq!(f.purged(), LogId::new(3, 3));
    assert_eq!(f.commit_index(), 3);
    assert_eq!(f.applied_index(), 3);
    assert!(
        rd.persisted_messages.iter().any(|m| matches!(
            m.body,
            MessageBody::AppendResponse {
                success: true,
                index: 3,
                ..
            }
        )),
        "acknowledged only once durable"
    );
    // A stale leader's snapshot is refused and the sender told the newer term.
    let old = SnapshotMeta {
        last: LogId::new(1, 9),
        membership: Membership::new([1, 2, 3]),
    };
    f.handle_message(
        ms(0),
        msg(3, 2, 2, MessageBody::InstallSnapshot { meta: old }),
    );
    let rd = f.take_ready();
    assert!(rd.install.is_none());
    assert!(rd.messages.iter().any(|m| m.to == 3 && m.term == 3));
}

#[test]
fn a_restart_between_storing_and_loading_a_snapshot_loads_it_first() {
    let meta = SnapshotMeta {
        last: LogId::new(2, 8),
        membership: Membership::new([1, 2, 3]),
    };
    let init = InitialState {
        hard_state: HardState {
            term: 2,
            vote: None,
        },
        purged: LogId::new(2, 8),
        entries: vec![ent(2, 9)],
        membership: Membership::new([1, 2, 3]),
        applied: 3,
        snapshot: Some(meta.clone()),
        await_snapshot: false,
        incarnation: 0,
    };
    let mut e = Engine::new(cfg(2), init, 1, Duration::ZERO).expect("restorable");
    let rd = e.take_ready();
    assert_eq!(rd.apply_snapshot, Some(meta));
    assert_eq!(e.applied_index(), 8);
    // Without a snapshot the gap cannot be closed: a clear refusal.
    let init = InitialState {
        hard_state: HardState {
            term: 2,
            vote: None,
        },
        purged: LogId::new(2, 8),
        entries: vec![ent(2, 9)],
        membership: Membership::new([1, 2, 3]),
        applied: 3,
        snapshot: None,
        await_snapshot: false,
        incarnation: 0,
    };
    let err = Engine::new(cfg(2), init, 1, Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("no snapshot covers it"), "{err}");
}

#[test]
fn a_lost_transfer_is_started_again() {
    let mut c = leader_with_down_follower();
    c.node(1).snapshot_taken(11).unwrap();
    c.settle();
    c.cut.clear();
    let rounds_until_sent = |c: &mut Cluster| {
        (1..=5)
            .find(|_| {
                heartbeat_round(c, 1);
                !c.snapshot_sends.is_empty()
            })
            .is_some()
    };
    assert!(rounds_until_sent(&mut c), "the follower needs the snapshot");
    assert_eq!(c.snapshot_sends.len(), 1);
    c.snapshot_sends.clear();
    heartbeat_round(&mut c, 1);
    heartbeat_round(&mut c, 1);
    assert!(c.snapshot_sends.is_empty(), "one transfer at a time");
    c.node(1).snapshot_failed(3, 11);
    assert!(rounds_until_sent(&mut c), "sent again after the failure");
    assert_eq!(c.snapshot_sends.len(), 1);
    deliver_snapshots(&mut c);
    assert_eq!(c.node(3).commit_index(), 11);
    assert_eq!(c.loaded[&3].len(), 1);
}

#[test]
fn a_malformed_snapshot_changes_nothing() {
    let mut f = engine_with(cfg(2), &[1, 2, 3], 2, log_of(&[1, 2]));
    for (last, voters) in [
        (LogId::new(1, LogIndex::MAX), vec![1, 2, 3]),
        (LogId::new(9, 5), vec![1, 2, 3]),
        (LogId::new(2, 5), vec![]),
    ] {
        let meta = SnapshotMeta {
            last,
            membership: Membership::new(voters),
        };
        f.handle_message(ms(0), msg(1, 2, 2, MessageBody::InstallSnapshot { meta }));
        let rd = f.take_ready();
        assert!(rd.install.is_none() && rd.apply_snapshot.is_none());
        assert_eq!(f.last_log_id(), LogId::new(2, 2));
    }
}
