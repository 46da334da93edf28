//! §5.2: leader election. Randomized timeouts, one vote per term, durable before it is sent.

use super::*;

#[test]
fn s5_2_follower_times_out_and_becomes_candidate() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    let deadline = e.next_deadline();
    assert!(
        deadline >= ms(150) && deadline < ms(300),
        "timeout {deadline:?} outside [150, 300)"
    );
    e.tick(deadline - ms(1));
    assert_eq!(e.role(), Role::Follower);
    e.tick(deadline);
    assert_eq!(e.role(), Role::Candidate);
    assert_eq!(e.term(), 2);
    assert_eq!(e.vote(), Some(1), "a candidate votes for itself");
    let rd = e.take_ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 2,
            vote: Some(1)
        })
    );
    assert!(
        rd.messages.is_empty(),
        "vote requests wait until term and vote are durable"
    );
    let targets: Vec<NodeId> = rd.persisted_messages.iter().map(|m| m.to).collect();
    assert_eq!(targets, vec![2, 3]);
    assert!(rd.persisted_messages.iter().all(|m| matches!(
        m.body,
        MessageBody::VoteRequest {
            pre_vote: false,
            ..
        }
    )));
}

#[test]
fn s5_2_election_timeouts_are_randomized() {
    let deadlines: BTreeSet<Duration> = (0..20)
        .map(|seed| {
            let init = InitialState {
                membership: Membership::new([1, 2, 3]),
                ..Default::default()
            };
            Engine::new(cfg(1), init, seed, Duration::ZERO)
                .unwrap()
                .next_deadline()
        })
        .collect();
    assert!(
        deadlines.len() > 10,
        "timeouts should spread: {deadlines:?}"
    );
    assert!(deadlines.iter().all(|d| *d >= ms(150) && *d < ms(300)));
}

#[test]
fn s5_2_candidate_with_majority_becomes_leader_and_appends_noop() {
    let mut c = Cluster::new(5, |c| c);
    c.elect(3);
    let l = c.node(3);
    assert_eq!(l.leader(), Some(3));
    assert_eq!(
        l.log_entry(1).map(|e| e.payload.clone()),
        Some(EntryPayload::Blank)
    );
    assert_eq!(l.commit_index(), 1, "the no-op commits once replicated");
    for id in [1, 2, 4, 5] {
        assert_eq!(c.node(id).leader(), Some(3));
        assert_eq!(c.node(id).role(), Role::Follower);
    }
}

#[test]
fn s5_2_candidate_loses_when_majority_rejects() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    let d = e.next_deadline();
    e.tick(d);
    let term = e.term();
    e.handle_message(
        Duration::ZERO,
        msg(
            2,
            1,
            term,
            MessageBody::VoteResponse {
                pre_vote: false,
                granted: false,
            },
        ),
    );
    assert_eq!(e.role(), Role::Candidate);
    e.handle_message(
        Duration::ZERO,
        msg(
            3,
            1,
            term,
            MessageBody::VoteResponse {
                pre_vote: false,
                granted: false,
            },
        ),
    );
    assert_eq!(e.role(), Role::Follower);
}

#[test]
fn s5_2_candidate_steps_down_for_leader_of_same_term() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    let d = e.next_deadline();
    e.tick(d);
    let term = e.term();
    e.handle_message(
        Duration::ZERO,
        msg(
            2,
            1,
            term,
            MessageBody::Heartbeat {
                leader_commit: 0,
                round: 1,
                purge_to_index: 0,
            },
        ),
    );
    assert_eq!(e.role(), Role::Follower);
    assert_eq!(e.leader(), Some(2));
}

#[test]
fn s5_2_at_most_one_vote_per_term() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    let req = |from| {
        msg(
            from,
            1,
            2,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 0,
                last_log_term: 0,
                transfer: false,
            },
        )
    };
    e.handle_message(Duration::ZERO, req(2));
    e.handle_message(Duration::ZERO, req(3));
    e.handle_message(Duration::ZERO, req(2));
    let (_, after) = take_all(&mut e);
    let grants: Vec<(NodeId, bool)> = after
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::VoteResponse { granted, .. } => Some((m.to, granted)),
            _ => None,
        })
        .collect();
    assert_eq!(grants, vec![(2, true), (3, false), (2, true)]);
    assert_eq!(e.vote(), Some(2));
}

#[test]
fn s5_2_vote_is_durable_before_it_is_sent() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    e.handle_message(
        Duration::ZERO,
        msg(
            2,
            1,
            2,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 0,
                last_log_term: 0,
                transfer: false,
            },
        ),
    );
    let rd = e.take_ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 2,
            vote: Some(2)
        })
    );
    assert!(rd.messages.is_empty());
    assert_eq!(rd.persisted_messages.len(), 1);
}

// ----- §5.4.1 election restriction -----------------------------------------------

#[test]
fn single_node_cluster_elects_itself_commits_and_reads() {
    let mut c = Cluster::new(1, |c| c);
    c.elect(1);
    c.settle();
    c.node(1).propose(b"solo".to_vec()).unwrap();
    c.settle();
    c.node(1).read_index(Duration::ZERO, 3).unwrap();
    c.settle();
    assert_eq!(
        c.applied_payloads(1),
        vec![EntryPayload::Blank, cmd("solo")]
    );
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 3,
            result: Ok(2)
        }]
    );
}

// ----- data model: compaction point and membership -------------------------------------

/// Figure 2: a follower converts to candidate when its election timeout
/// elapses without hearing from a leader or granting a vote. Refusing a
/// vote (even at a higher term, which it adopts) does not restart the
/// timer, so a candidate whose log cannot win does not hold back, term
/// after term, a node whose log can.
#[test]
fn figure_2_refusing_a_vote_leaves_the_election_timer_running() {
    let mut f = engine_with(cfg(2), &[1, 2, 3], 3, log_of(&[1, 3]));
    let deadline = f.next_deadline();
    f.handle_message(
        ms(10),
        msg(
            3,
            2,
            4,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 9,
                last_log_term: 1,
                transfer: false,
            },
        ),
    );
    assert_eq!(f.term(), 4, "the newer term is adopted");
    assert_eq!(f.vote(), None, "the stale log gets no vote");
    assert_eq!(f.next_deadline(), deadline, "the timer runs on");
    // Granting one restarts it.
    f.handle_message(
        ms(20),
        msg(
            1,
            2,
            5,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 2,
                last_log_term: 3,
                transfer: false,
            },
        ),
    );
    assert_eq!(f.vote(), Some(1));
    assert!(
        f.next_deadline() >= ms(20) + cfg(2).election_timeout_min,
        "restarted from the grant"
    );
}
