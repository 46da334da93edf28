//! Thesis §4.1: the membership in the log counts, committed or not, and is reverted when its entry is truncated.

use super::*;

#[test]
fn quorum_comes_from_the_membership_in_the_log() {
    // Initial config says 5 voters, but the log's latest membership entry says 3.
    let mut entries = log_of(&[1]);
    entries.push(Entry {
        term: 1,
        index: 2,
        payload: EntryPayload::Membership(Membership::new([1, 2, 3])),
    });
    let init = InitialState {
        hard_state: HardState {
            term: 1,
            vote: None,
        },
        entries,
        membership: Membership::new([1, 2, 3, 4, 5]),
        ..Default::default()
    };
    let e = Engine::new(cfg(1), init, 1, Duration::ZERO).unwrap();
    assert_eq!(e.membership().voters.len(), 3);
    assert_eq!(e.membership().quorum(), 2);
}

// ----- bad input ---------------------------------------------------------------------------

#[test]
fn thesis_4_1_follower_uses_the_latest_membership_in_its_log_and_reverts_on_truncation() {
    let mut e = engine_with(cfg(2), &[1, 2, 3], 1, log_of(&[1]));
    // Appended, not committed: in force at once.
    e.handle_message(
        Duration::ZERO,
        msg(
            1,
            2,
            1,
            append(1, 1, vec![members_entry(1, 2, &[1, 2, 3, 4])], 1),
        ),
    );
    assert_eq!(e.membership(), &Membership::new([1, 2, 3, 4]));
    assert_eq!(e.commit_index(), 1, "not committed");
    let _ = take_all(&mut e);
    // A new leader's entry replaces it: the earlier membership is back.
    e.handle_message(
        Duration::ZERO,
        msg(3, 2, 2, append(1, 1, vec![ent(2, 2)], 1)),
    );
    assert_eq!(e.log_term(2), Some(2));
    assert_eq!(e.membership(), &Membership::new([1, 2, 3]));
}

#[test]
fn thesis_4_1_restart_adopts_the_latest_membership_entry_committed_or_not() {
    let mut entries = log_of(&[1, 1]);
    entries.push(members_entry(1, 3, &[1, 2]));
    entries.push(ent(1, 4));
    let e = engine_with(cfg(2), &[1, 2, 3], 1, entries);
    assert_eq!(e.commit_index(), 0);
    assert_eq!(e.membership(), &Membership::new([1, 2]));
}

#[test]
fn compaction_past_a_membership_entry_tells_the_store_the_new_base() {
    let mut c = Cluster::new(1, |mut c| {
        c.compact_threshold = 2;
        c
    });
    c.elect(1);
    // The single node appends a membership entry naming itself again
    // (a no-change entry: enough to see it stored as the base).
    c.node(1)
        .propose_payload(EntryPayload::Membership(Membership::new([1])))
        .unwrap();
    for i in 0..4u8 {
        c.node(1).propose(vec![i]).unwrap();
    }
    c.settle();
    let applied = c.node(1).applied_index();
    c.node(1).release(applied);
    let rd = c.node(1).take_ready();
    assert!(rd.purge_to.is_some(), "compacted");
    assert_eq!(rd.membership, Some(Membership::new([1])));
}

// ----- proposal size and back-pressure ----------------------------------------

// ----- membership changes (thesis §4.3), learners, transfer (§3.10) -----------

/// A cluster of `n` voters plus `spares` empty nodes that wait to be added.
fn cluster_with_spares(n: u64, spares: u64) -> Cluster {
    let mut c = Cluster::new(n, |c| c);
    for id in n + 1..=n + spares {
        c.nodes.insert(id, engine_with(cfg(id), &[], 0, vec![]));
    }
    c
}

/// Lets the leader's timers run for `d` (heartbeats, stall detection).
fn run_for(c: &mut Cluster, leader: NodeId, d: Duration) {
    let until = c.now + d;
    while c.now < until {
        let t = c.now + Duration::from_millis(50);
        c.tick_node(leader, t);
        c.settle();
    }
}

fn learner(id: NodeId) -> ChangeStep {
    ChangeStep::AddLearner {
        id,
        member: Member {
            addr: format!("10.0.0.{id}:7000"),
            incarnation: 0,
        },
    }
}

#[test]
fn a_learner_receives_the_log_but_never_counts_toward_a_commit() {
    let mut c = cluster_with_spares(3, 1);
    c.elect(1);
    c.node(1).change_membership(&[learner(4)]).unwrap();
    c.settle();
    let m = c.node(1).membership().clone();
    assert!(m.learners.contains(&4) && !m.is_joint(), "{m}");
    assert_eq!(m.addr(4), Some("10.0.0.4:7000"));
    c.node(1).propose(b"x".to_vec()).unwrap();
    c.settle();
    assert!(
        c.applied_payloads(4).contains(&cmd("x")),
        "the learner applies"
    );
    // With both other voters cut off, the learner's acknowledgement does
    // not commit anything.
    c.cut = vec![(1, 2), (1, 3), (2, 1), (3, 1)];
    let before = c.node(1).commit_index();
    let id = c.node(1).propose(b"y".to_vec()).unwrap();
    c.settle();
    assert_eq!(c.node(4).last_log_id(), id, "the learner holds it");
    assert_eq!(c.node(1).commit_index(), before, "but it is not committed");
    // A learner never campaigns.
    let d = c.node(4).next_deadline();
    c.tick_node(4, d + Duration::from_secs(10));
    assert_eq!(c.node(4).role(), Role::Follower);
}

#[test]
fn promoting_a_learner_goes_through_a_joint_configuration_the_leader_leaves_by_itself() {
    let mut c = cluster_with_spares(3, 1);
    c.elect(1);
    c.node(1).change_membership(&[learner(4)]).unwrap();
    c.settle();
    let id = c
        .node(1)
        .change_membership(&[ChangeStep::Promote(4)])
        .unwrap();
    // In force as soon as appended, committed or not (§4.1).
    let joint = c.node(1).membership().clone();
    assert!(joint.is_joint(), "{joint}");
    assert_eq!(joint.outgoing, [1, 2, 3].into_iter().collect());
    assert_eq!(joint.voters, [1, 2, 3, 4].into_iter().collect());
    assert!(c.node(1).change_in_flight().is_some());
    // A second change while this one is in flight is refused.
    assert!(matches!(
        c.node(1).change_membership(&[ChangeStep::Remove(2)]),
        Err(ChangeError::InProgress { .. })
    ));
    c.settle();
    let m = c.node(1).membership().clone();
    assert!(!m.is_joint(), "left the joint configuration: {m}");
    assert_eq!(m.voters, [1, 2, 3, 4].into_iter().collect());
    assert!(c.node(1).commit_index() > id.index);
    assert_eq!(c.node(1).change_in_flight(), None);
    for n in 2..=4 {
        assert_eq!(c.node(n).membership(), &m, "node {n}");
    }
}

#[test]
fn during_a_joint_configuration_a_commit_needs_both_majorities() {
    // Old {1,2,3}, new {1,4,5}: 1 with 4 and 5 is a new majority only.
    let mut c = cluster_with_spares(3, 2);
    c.elect(1);
    c.node(1)
        .change_membership(&[learner(4), learner(5)])
        .unwrap();
    c.settle();
    c.cut = vec![(1, 2), (1, 3)];
    c.node(1)
        .change_membership(&[
            ChangeStep::Promote(4),
            ChangeStep::Promote(5),
            ChangeStep::Remove(2),
            ChangeStep::Remove(3),
        ])
        .unwrap();
    c.settle();
    let m = c.node(1).membership().clone();
    assert!(m.is_joint(), "stuck in joint without the old majority: {m}");
    let before = c.node(1).commit_index();
    c.node(1).propose(b"z".to_vec()).unwrap();
    c.settle();
    assert_eq!(
        c.node(1).commit_index(),
        before,
        "no old majority, no commit"
    );
    // The old voters come back: the joint entry commits, the final one follows.
    c.cut.clear();
    run_for(&mut c, 1, Duration::from_millis(500));
    let m = c.node(1).membership().clone();
    assert!(!m.is_joint(), "{m}");
    assert_eq!(m.voters, [1, 4, 5].into_iter().collect());
    assert!(c.applied_payloads(1).contains(&cmd("z")));
}

/// Three nodes; leader 1 has committed a write and proposed its own
/// removal.
fn leader_removing_itself() -> Cluster {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).propose(b"a".to_vec()).unwrap();
    c.settle();
    c.node(1)
        .change_membership(&[ChangeStep::Remove(1)])
        .unwrap();
    c
}

#[test]
fn a_leader_that_removes_itself_hands_over_and_steps_down_once_the_change_commits() {
    let mut c = leader_removing_itself();
    c.settle();
    assert_ne!(c.node(1).role(), Role::Leader, "stepped down");
    assert!(
        c.node(2).is_leader() || c.node(3).is_leader(),
        "handed over at once (TimeoutNow)"
    );
    let l = if c.node(2).is_leader() { 2 } else { 3 };
    assert_eq!(c.node(l).membership().voters, [2, 3].into_iter().collect());
    // The removed node keeps running: its timer fires, and nothing happens.
    let term = c.node(l).term();
    let d = c.node(1).next_deadline();
    c.tick_node(1, d + Duration::from_secs(5));
    c.settle();
    assert_eq!(
        c.node(l).term(),
        term,
        "the removed node never raises the term"
    );
    assert!(c.node(l).is_leader());
}

#[test]
fn a_removed_member_that_missed_its_removal_cannot_disrupt_the_cluster() {
    let mut c = Cluster::new(3, |mut c| {
        c.pre_vote = false;
        c
    });
    c.elect(1);
    // Node 3 misses the change that removes it.
    c.cut = vec![(1, 3), (3, 1), (2, 3), (3, 2)];
    c.node(1)
        .change_membership(&[ChangeStep::Remove(3)])
        .unwrap();
    c.settle();
    assert_eq!(c.node(1).membership().voters, [1, 2].into_iter().collect());
    assert_eq!(
        c.node(3).membership().voters,
        [1, 2, 3].into_iter().collect()
    );
    c.cut.clear();
    // It campaigns (without pre-vote) in a higher term; nobody listens.
    let d = c.node(3).next_deadline();
    c.tick_node(3, d);
    assert_eq!(c.node(3).role(), Role::Candidate);
    let term = c.node(1).term();
    c.settle();
    assert_eq!(c.node(1).term(), term);
    assert!(c.node(1).is_leader());
}

#[test]
fn leadership_transfer_hands_over_to_the_named_voter_and_pauses_proposals() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).propose(b"a".to_vec()).unwrap();
    // Node 3 lags: the transfer waits until it holds the whole log.
    c.cut = vec![(1, 3)];
    c.settle();
    assert_eq!(c.node(1).transfer_leadership(Some(3)), Ok(3));
    assert_eq!(
        c.node(1).propose(b"b".to_vec()),
        Err(ProposeError::Transferring { to: 3 })
    );
    assert!(matches!(
        c.node(1).change_membership(&[ChangeStep::Remove(2)]),
        Err(ChangeError::Transferring { to: 3 })
    ));
    c.cut.clear();
    run_for(&mut c, 1, Duration::from_millis(250));
    assert!(c.node(3).is_leader(), "node 3 took over");
    assert_eq!(c.node(1).role(), Role::Follower);
    assert!(c
        .node(3)
        .log_entry(2)
        .is_some_and(|e| e.payload == cmd("a")));
}

#[test]
fn a_transfer_that_cannot_complete_is_given_up_after_an_election_timeout() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.cut = vec![(1, 3), (3, 1)];
    assert_eq!(c.node(1).transfer_leadership(Some(3)), Ok(3));
    assert_eq!(c.node(1).transferring_to(), Some(3));
    let until = c.now + c.node(1).config().election_timeout_max;
    let mut t = c.now;
    while t <= until {
        t += Duration::from_millis(50);
        c.tick_node(1, t);
        c.settle();
    }
    assert!(c.node(1).is_leader(), "leads on");
    assert_eq!(c.node(1).transferring_to(), None);
    assert!(c.node(1).propose(b"c".to_vec()).is_ok(), "proposals resume");
}

#[test]
fn a_member_whose_storage_identity_changed_is_refused() {
    let mut c = Cluster::new(3, |c| c);
    // Each node has an identity; the leader records them.
    for (id, inc) in [(1, 11), (2, 22), (3, 33)] {
        c.node(id).incarnation = inc;
    }
    c.elect(1);
    for _ in 0..3 {
        let hb = c.node(1).next_deadline();
        c.tick_node(1, hb);
        c.settle();
    }
    let m = c.node(1).membership().clone();
    assert_eq!(
        [m.incarnation(1), m.incarnation(2), m.incarnation(3)],
        [11, 22, 33],
        "{m:?}"
    );
    // Node 3 comes back from a wiped disk: empty log, new identity.
    let mut fresh = engine_with(cfg(3), &[1, 2, 3], 0, vec![]);
    fresh.incarnation = 99;
    c.nodes.insert(3, fresh);
    let hb = c.node(1).next_deadline();
    c.tick_node(1, hb);
    c.settle();
    assert_eq!(c.node(3).refused(), Some(33), "told it is not member 3");
    assert_eq!(c.node(3).applied_index(), 0);
}

#[test]
fn leadership_can_be_handed_to_a_promoted_member() {
    let mut c = cluster_with_spares(3, 1);
    c.elect(1);
    c.node(1).change_membership(&[learner(4)]).unwrap();
    c.settle();
    c.node(1)
        .change_membership(&[ChangeStep::Promote(4)])
        .unwrap();
    c.settle();
    assert_eq!(c.node(1).transfer_leadership(Some(4)), Ok(4));
    c.settle();
    assert!(c.node(4).is_leader(), "node 4 took over");
}

#[test]
fn a_leader_that_steps_aside_in_its_own_term_still_tells_followers_what_it_committed() {
    let mut c = leader_removing_itself();
    for _ in 0..100 {
        if c.node(1).role() != Role::Leader {
            break;
        }
        assert!(c.step(), "the removal never committed");
    }
    assert_ne!(c.node(1).role(), Role::Leader);
    let committed = c.node(1).commit_index();
    let mut told: Vec<NodeId> = c
        .drain(1)
        .iter()
        .filter(|m| {
            matches!(m.body, MessageBody::AppendEntries { leader_commit, .. }
                if leader_commit == committed)
        })
        .map(|m| m.to)
        .collect();
    told.sort_unstable();
    assert_eq!(
        told,
        vec![2, 3],
        "the last commit index goes out on leaving"
    );
}
