//! Engine unit tests, each named after the rule of the Raft paper (§5.1-§5.4)
//! or the thesis section it checks.

use super::*;
use crate::message::{Message, MessageBody};
use std::collections::BTreeMap;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.pre_vote = false;
    c.check_quorum = false;
    c
}

fn cmd(s: &str) -> EntryPayload {
    EntryPayload::Command(s.as_bytes().to_vec())
}

fn ent(term: Term, index: LogIndex) -> Entry {
    Entry {
        term,
        index,
        payload: cmd(&format!("{term}/{index}")),
    }
}

/// A log with the given terms at indexes 1, 2, ...
fn log_of(terms: &[Term]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| ent(t, i as LogIndex + 1))
        .collect()
}

fn engine_with(c: Config, voters: &[NodeId], term: Term, entries: Vec<Entry>) -> Engine {
    let init = InitialState {
        hard_state: HardState { term, vote: None },
        entries,
        membership: Membership::new(voters.iter().copied()),
        ..Default::default()
    };
    Engine::new(c, init, 7, Duration::ZERO).expect("valid state")
}

/// Several engines wired by hand: messages move only when a test says so.
struct Cluster {
    nodes: BTreeMap<NodeId, Engine>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    reads: BTreeMap<NodeId, Vec<ReadResult>>,
    now: Duration,
    /// Directed links that drop messages.
    cut: Vec<(NodeId, NodeId)>,
}

impl Cluster {
    fn new(n: u64, f: impl Fn(Config) -> Config) -> Self {
        let voters: Vec<NodeId> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|&id| (id, engine_with(f(cfg(id)), &voters, 0, vec![])))
            .collect();
        Cluster {
            nodes,
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            now: Duration::ZERO,
            cut: vec![],
        }
    }

    fn from_logs(logs: &[(NodeId, Term, Vec<Entry>)]) -> Self {
        let voters: Vec<NodeId> = logs.iter().map(|(id, _, _)| *id).collect();
        let nodes = logs
            .iter()
            .map(|(id, term, log)| (*id, engine_with(cfg(*id), &voters, *term, log.clone())))
            .collect();
        Cluster {
            nodes,
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            now: Duration::ZERO,
            cut: vec![],
        }
    }

    fn node(&mut self, id: NodeId) -> &mut Engine {
        self.nodes.get_mut(&id).expect("node exists")
    }

    /// Processes one node's readies as a driver would (disk is instant).
    fn drain(&mut self, id: NodeId) -> Vec<Message> {
        let mut out = vec![];
        loop {
            let e = self.nodes.get_mut(&id).expect("node exists");
            if !e.has_ready() {
                return out;
            }
            let rd = e.take_ready();
            if let Some(last) = rd.last_entry() {
                e.persisted(last);
            }
            out.extend(rd.messages);
            out.extend(rd.persisted_messages);
            // The application takes committed entries at once.
            if let Some(last) = rd.committed.last() {
                e.delivered(last.index);
            }
            self.applied.entry(id).or_default().extend(rd.committed);
            self.reads.entry(id).or_default().extend(rd.reads);
        }
    }

    /// Moves messages until the network is quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            let mut msgs = vec![];
            for id in ids {
                msgs.extend(self.drain(id));
            }
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if self.cut.contains(&(m.from, m.to)) {
                    continue;
                }
                if let Some(e) = self.nodes.get_mut(&m.to) {
                    e.handle_message(m);
                }
            }
        }
        panic!("network never settled");
    }

    fn tick_node(&mut self, id: NodeId, to: Duration) {
        self.now = self.now.max(to);
        let now = self.now;
        self.node(id).tick(now);
    }

    /// Makes `id` time out and wins it the election.
    fn elect(&mut self, id: NodeId) {
        let deadline = self.node(id).next_deadline();
        self.tick_node(id, deadline);
        self.settle();
        assert_eq!(
            self.node(id).role(),
            Role::Leader,
            "node {id} should have won"
        );
    }

    fn applied_payloads(&self, id: NodeId) -> Vec<EntryPayload> {
        self.applied
            .get(&id)
            .map_or(vec![], |v| v.iter().map(|e| e.payload.clone()).collect())
    }
}

fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

fn append(
    prev_index: LogIndex,
    prev_term: Term,
    entries: Vec<Entry>,
    leader_commit: LogIndex,
) -> MessageBody {
    MessageBody::AppendEntries {
        prev_log_index: prev_index,
        prev_log_term: prev_term,
        entries,
        leader_commit,
    }
}

fn take_all(e: &mut Engine) -> (Vec<Message>, Vec<Message>) {
    let rd = e.take_ready();
    if let Some(l) = rd.last_entry() {
        e.persisted(l);
    }
    (rd.messages, rd.persisted_messages)
}

// ----- §5.1 terms ------------------------------------------------------------

#[test]
fn s5_1_higher_term_in_any_message_updates_term_and_reverts_to_follower() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let leader = c.node(1);
    leader.handle_message(msg(2, 1, 9, MessageBody::HeartbeatResponse { round: 0 }));
    assert_eq!(leader.term(), 9);
    assert_eq!(leader.role(), Role::Follower);
    assert_eq!(leader.vote(), None);
    let rd = leader.take_ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 9,
            vote: None
        }),
        "the new term must be persisted"
    );
}

#[test]
fn s5_1_stale_term_request_is_rejected_with_current_term() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 5, log_of(&[1, 2]));
    e.handle_message(msg(2, 1, 3, append(2, 2, vec![ent(3, 3)], 0)));
    assert_eq!(
        e.last_log_id(),
        LogId::new(2, 2),
        "stale leader's entries must not be accepted"
    );
    let (now, _) = take_all(&mut e);
    assert_eq!(now.len(), 1);
    assert_eq!(
        now[0].term, 5,
        "reply carries the newer term so the stale leader steps down"
    );
    assert!(matches!(
        now[0].body,
        MessageBody::AppendResponse { success: false, .. }
    ));
}

// ----- §5.2 leader election ----------------------------------------------------

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
    e.handle_message(msg(
        2,
        1,
        term,
        MessageBody::VoteResponse {
            pre_vote: false,
            granted: false,
        },
    ));
    assert_eq!(e.role(), Role::Candidate);
    e.handle_message(msg(
        3,
        1,
        term,
        MessageBody::VoteResponse {
            pre_vote: false,
            granted: false,
        },
    ));
    assert_eq!(e.role(), Role::Follower);
}

#[test]
fn s5_2_candidate_steps_down_for_leader_of_same_term() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    let d = e.next_deadline();
    e.tick(d);
    let term = e.term();
    e.handle_message(msg(
        2,
        1,
        term,
        MessageBody::Heartbeat {
            leader_commit: 0,
            round: 1,
            purge_to_index: 0,
        },
    ));
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
            },
        )
    };
    e.handle_message(req(2));
    e.handle_message(req(3));
    e.handle_message(req(2));
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
    e.handle_message(msg(
        2,
        1,
        2,
        MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 0,
            last_log_term: 0,
        },
    ));
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
fn s5_4_1_vote_denied_to_candidate_with_less_up_to_date_log() {
    // Our log: terms [1, 1, 3]. Candidates: lower last term; same term but shorter; equal; more up to date.
    let cases = [
        ((2, 5), false),
        ((3, 2), false),
        ((3, 3), true),
        ((3, 4), true),
        ((4, 1), true),
    ];
    for ((last_term, last_index), want) in cases {
        let mut e = engine_with(cfg(1), &[1, 2, 3], 3, log_of(&[1, 1, 3]));
        e.handle_message(msg(
            2,
            1,
            4,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: last_index,
                last_log_term: last_term,
            },
        ));
        let (_, after) = take_all(&mut e);
        let granted = after
            .iter()
            .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. }));
        assert_eq!(
            granted, want,
            "candidate last log ({last_term}, {last_index})"
        );
    }
}

// ----- §5.3 log replication --------------------------------------------------------

#[test]
fn s5_3_follower_rejects_when_prev_entry_does_not_match() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 3, log_of(&[1, 1, 2, 2, 2]));
    // prev (index 4, term 3) does not match our term 2 there.
    e.handle_message(msg(2, 1, 3, append(4, 3, vec![ent(3, 5)], 0)));
    let (_, after) = take_all(&mut e);
    match after[0].body {
        MessageBody::AppendResponse {
            success: false,
            index: 4,
            hint: Some(h),
        } => {
            assert_eq!(h.conflict_term, Some(2));
            assert_eq!(h.first_index, 3, "first index of the conflicting term");
        }
        ref b => panic!("unexpected {b:?}"),
    }
    // prev far past the end: hint says where our log ends.
    e.handle_message(msg(2, 1, 3, append(1_000_000, 3, vec![], 0)));
    let (_, after) = take_all(&mut e);
    match after[0].body {
        MessageBody::AppendResponse {
            success: false,
            hint: Some(h),
            ..
        } => {
            assert_eq!(h.conflict_term, None);
            assert_eq!(h.first_index, 6);
        }
        ref b => panic!("unexpected {b:?}"),
    }
    assert_eq!(e.last_log_id(), LogId::new(2, 5));
}

#[test]
fn s5_3_conflicting_entries_are_replaced_by_the_leaders() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 3, log_of(&[1, 1, 2, 2]));
    e.handle_message(msg(2, 1, 3, append(2, 1, vec![ent(3, 3)], 0)));
    let rd = e.take_ready();
    assert_eq!(rd.truncate_from, Some(3));
    assert_eq!(rd.entries, vec![ent(3, 3)]);
    assert_eq!(e.last_log_id(), LogId::new(3, 3));
    assert!(rd.messages.is_empty(), "the ack waits for durability");
    assert!(matches!(
        rd.persisted_messages[0].body,
        MessageBody::AppendResponse {
            success: true,
            index: 3,
            ..
        }
    ));
}

#[test]
fn s5_3_duplicate_append_does_not_truncate() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 2, 2]));
    e.handle_message(msg(2, 1, 2, append(1, 1, vec![ent(2, 2)], 0)));
    let rd = e.take_ready();
    assert_eq!(
        rd.truncate_from, None,
        "a matching prefix must never be cut (stale, reordered message)"
    );
    assert_eq!(e.last_log_id(), LogId::new(2, 3));
}

#[test]
fn s5_3_follower_never_truncates_committed_entries() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 2, 2]));
    e.handle_message(msg(2, 1, 2, append(3, 2, vec![], 3)));
    assert_eq!(e.commit_index(), 3);
    // A (malicious or buggy) leader of a later term sends a conflicting entry below commit.
    e.handle_message(msg(3, 1, 4, append(3, 2, vec![], 0)));
    e.handle_message(msg(3, 1, 4, append(1, 1, vec![ent(4, 2)], 0)));
    assert_eq!(
        e.last_log_id(),
        LogId::new(2, 3),
        "committed entries survive"
    );
    assert_eq!(e.log_term(2), Some(2));
}

#[test]
fn s5_3_follower_commit_follows_leader_but_not_past_verified_entries() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 1, 1, 1]));
    // The leader says commit 10, but only verified entries up to 2 in this message.
    e.handle_message(msg(2, 1, 2, append(1, 1, vec![ent(1, 2)], 10)));
    assert_eq!(e.commit_index(), 2);
}

#[test]
fn s5_3_leader_replicates_and_commits_on_majority() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let id = c.node(1).propose(b"x".to_vec()).unwrap();
    assert_eq!(id, LogId::new(1, 2));
    c.cut = vec![(1, 3), (3, 1)];
    c.settle();
    assert_eq!(
        c.node(1).commit_index(),
        2,
        "leader + node 2 are a majority"
    );
    assert_eq!(c.node(3).last_log_id().index, 1);
    assert!(c.applied_payloads(1).contains(&cmd("x")));
}

#[test]
fn s5_3_leader_counts_itself_only_for_durable_entries() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).propose(b"x".to_vec()).unwrap();
    // Take the leader's ready but do not report its disk write done.
    let rd = c.node(1).take_ready();
    assert_eq!(rd.entries.len(), 1);
    for m in rd.messages.into_iter().filter(|m| m.to == 2) {
        c.node(2).handle_message(m);
    }
    let acks = c.drain(2);
    for m in acks {
        c.node(1).handle_message(m);
    }
    // Node 2 alone holds index 2 durably; the leader's copy is not yet durable.
    assert_eq!(c.node(1).commit_index(), 1);
    c.node(1).persisted(LogId::new(1, 2));
    assert_eq!(c.node(1).commit_index(), 2);
}

#[test]
fn s5_3_fast_backoff_skips_a_term_per_round_trip() {
    // Figure 7-like: leader log terms differ from a follower's long divergent suffix.
    let leader_log = log_of(&[1, 1, 1, 4, 4, 5, 5, 6, 6, 6]);
    let follower_log = log_of(&[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]);
    let mut c = Cluster::from_logs(&[
        (1, 6, leader_log),
        (2, 3, follower_log),
        (3, 6, log_of(&[1, 1, 1, 4, 4, 5, 5, 6, 6, 6])),
    ]);
    c.cut = vec![(1, 3), (3, 1)];
    let d = c.node(1).next_deadline();
    c.tick_node(1, d);
    // Node 2 votes (its log is behind); count AppendEntries round trips to node 2.
    let mut rounds = 0;
    for _ in 0..50 {
        let msgs = c.drain(1);
        let mut any = false;
        for m in msgs {
            if m.to == 2 {
                if matches!(m.body, MessageBody::AppendEntries { .. }) {
                    rounds += 1;
                }
                any = true;
                c.node(2).handle_message(m);
            }
        }
        for m in c.drain(2) {
            c.node(1).handle_message(m);
        }
        if !any {
            break;
        }
    }
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(c.node(2).last_log_id(), c.node(1).last_log_id());
    assert!(
        rounds <= 4,
        "took {rounds} AppendEntries to converge; one per term expected"
    );
}

#[test]
fn s5_3_committed_entries_are_delivered_in_order_exactly_once() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(2);
    for i in 0..50 {
        c.node(2).propose(format!("c{i}").into_bytes()).unwrap();
        if i % 7 == 0 {
            c.settle();
        }
    }
    c.settle();
    let hb = c.node(2).next_deadline();
    c.tick_node(2, hb);
    c.settle();
    for id in 1..=3 {
        let idx: Vec<LogIndex> = c.applied[&id].iter().map(|e| e.index).collect();
        assert_eq!(idx, (1..=51).collect::<Vec<_>>(), "node {id}");
    }
}

#[test]
fn s5_3_pipeline_is_bounded_by_max_inflight() {
    let mut c = Cluster::new(3, |mut c| {
        c.max_inflight = 2;
        c.max_entries_per_msg = 1;
        c
    });
    c.elect(1);
    for i in 0..10 {
        c.node(1).propose(vec![i]).unwrap();
    }
    let out = c.drain(1);
    let appends = out
        .iter()
        .filter(|m| m.to == 2 && matches!(m.body, MessageBody::AppendEntries { .. }))
        .count();
    assert_eq!(appends, 2, "at most max_inflight unanswered appends");
    for m in out {
        let to = m.to;
        c.node(to).handle_message(m);
    }
    c.settle();
    assert_eq!(c.node(2).last_log_id(), c.node(1).last_log_id());
}

#[test]
fn s5_3_batches_respect_max_entries_and_bytes() {
    let mut c = Cluster::new(3, |mut c| {
        c.max_entries_per_msg = 4;
        c.max_bytes_per_msg = 1000;
        c
    });
    c.elect(1);
    for _ in 0..20 {
        c.node(1).propose(vec![0u8; 300]).unwrap();
    }
    for m in c.drain(1) {
        if let MessageBody::AppendEntries { entries, .. } = &m.body {
            assert!(entries.len() <= 4);
            let bytes: usize = entries.iter().map(|e| e.payload.size_hint()).sum();
            assert!(
                entries.len() <= 1 || bytes <= 1000,
                "{bytes} bytes in one message"
            );
        }
    }
}

// ----- §5.4.2 committing entries from previous terms (Figure 8) ------------------------

#[test]
fn s5_4_2_figure8_old_term_entry_is_not_committed_by_counting_replicas() {
    // (c) of Figure 8: S1 is leader of term 4 with entry (2, 2) replicated to a majority (S1, S2, S3);
    // S5 holds (3, 2). S1 must not commit index 2 until an entry of term 4 is replicated.
    let s1 = log_of(&[1, 2]);
    let mut c = Cluster::from_logs(&[
        (1, 3, s1.clone()),
        (2, 3, s1.clone()),
        (3, 3, log_of(&[1])),
        (4, 3, log_of(&[1])),
        (5, 3, log_of(&[1, 3])),
    ]);
    // S1 wins term 4 with votes from S2, S3, S4; S5 is cut off.
    c.cut = vec![
        (1, 5),
        (5, 1),
        (2, 5),
        (5, 2),
        (3, 5),
        (5, 3),
        (4, 5),
        (5, 4),
    ];
    // Only let S3 receive (2,2) and not the leader's own term-4 entry: drop S1's first appends to others.
    let d = c.node(1).next_deadline();
    c.tick_node(1, d);
    for _ in 0..3 {
        let out = c.drain(1);
        for m in out {
            if m.to == 5 {
                continue;
            }
            let m = match m.body {
                // Strip the term-4 no-op so only the old entry reaches the followers.
                MessageBody::AppendEntries {
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                } => msg(
                    m.from,
                    m.to,
                    m.term,
                    append(
                        prev_log_index,
                        prev_log_term,
                        entries.into_iter().filter(|e| e.term < 4).collect(),
                        leader_commit,
                    ),
                ),
                _ => m,
            };
            c.node(m.to).handle_message(m);
        }
        for f in 2..=4 {
            for m in c.drain(f) {
                c.node(1).handle_message(m);
            }
        }
    }
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(
        c.node(3).log_term(2),
        Some(2),
        "old entry now on a majority"
    );
    assert_eq!(
        c.node(1).commit_index(),
        0,
        "an old-term entry is never committed by counting replicas"
    );
    // Once the term-4 no-op reaches a majority (resent at the next
    // heartbeat: the stripped appends looked like partial acceptance), both
    // commit together.
    heartbeat_round(&mut c, 1);
    c.settle();
    assert_eq!(c.node(1).commit_index(), 3);
}

// ----- thesis §9.6 pre-vote, §6.2 check-quorum -------------------------------------------

#[test]
fn prevote_partitioned_node_does_not_inflate_its_term() {
    let mut c = Cluster::new(3, |mut c| {
        c.pre_vote = true;
        c.check_quorum = true;
        c
    });
    c.elect(1);
    let term = c.node(1).term();
    c.cut = vec![(3, 1), (3, 2), (1, 3), (2, 3)];
    for round in 1..=20u64 {
        let t = c.now + ms(300) * round as u32;
        c.tick_node(3, t);
        c.settle();
    }
    assert_eq!(
        c.node(3).term(),
        term,
        "pre-vote keeps an isolated node's term"
    );
    c.cut.clear();
    let t = c.now + ms(100);
    c.tick_node(1, t);
    c.settle();
    assert_eq!(
        c.node(1).role(),
        Role::Leader,
        "rejoining node does not disrupt the leader"
    );
    assert_eq!(c.node(3).leader(), Some(1));
}

#[test]
fn check_quorum_leader_steps_down_without_a_majority() {
    let mut c = Cluster::new(3, |mut c| {
        c.check_quorum = true;
        c
    });
    c.elect(1);
    c.cut = vec![(2, 1), (3, 1)];
    let start = c.now;
    for i in 1..=4u32 {
        c.tick_node(1, start + ms(100) * i);
        c.settle();
    }
    assert_eq!(c.node(1).role(), Role::Follower);
}

#[test]
fn check_quorum_followers_in_lease_ignore_disruptive_candidates() {
    let mut c = Cluster::new(3, |mut c| {
        c.check_quorum = true;
        c
    });
    c.elect(1);
    let term = c.node(1).term();
    c.node(2).handle_message(msg(
        3,
        2,
        term + 1,
        MessageBody::VoteRequest {
            pre_vote: false,
            last_log_index: 99,
            last_log_term: term,
        },
    ));
    assert_eq!(
        c.node(2).term(),
        term,
        "a follower that recently heard its leader ignores the request"
    );
}

// ----- heartbeats and reads --------------------------------------------------------------

#[test]
fn leader_sends_heartbeats_every_interval() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let start = c.now;
    c.tick_node(1, start + ms(99));
    assert!(c.drain(1).is_empty());
    c.tick_node(1, start + ms(100));
    let hb: Vec<NodeId> = c
        .drain(1)
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .map(|m| m.to)
        .collect();
    assert_eq!(hb, vec![2, 3]);
}

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
        c.node(to).handle_message(m);
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
        c.node(to).handle_message(m);
    }
    for f in [2, 3] {
        for m in c.drain(f) {
            c.node(1).handle_message(m);
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
    c.node(1).handle_message(msg(
        2,
        1,
        t + 1,
        MessageBody::HeartbeatResponse { round: 0 },
    ));
    c.drain(1);
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 9,
            result: Err(NotLeader { leader: None })
        }]
    );
}

#[test]
fn single_node_cluster_elects_itself_commits_and_reads() {
    let mut c = Cluster::new(1, |c| c);
    c.elect(1);
    c.settle();
    c.node(1).propose(b"solo".to_vec()).unwrap();
    c.settle();
    c.node(1).read_index(3).unwrap();
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
fn messages_from_unknown_or_misaddressed_nodes_are_dropped() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    e.handle_message(msg(
        99,
        1,
        50,
        MessageBody::Heartbeat {
            leader_commit: 0,
            round: 0,
            purge_to_index: 0,
        },
    ));
    e.handle_message(msg(
        2,
        7,
        50,
        MessageBody::Heartbeat {
            leader_commit: 0,
            round: 0,
            purge_to_index: 0,
        },
    ));
    e.handle_message(msg(
        1,
        1,
        50,
        MessageBody::Heartbeat {
            leader_commit: 0,
            round: 0,
            purge_to_index: 0,
        },
    ));
    assert_eq!(e.term(), 1);
    assert!(!e.has_ready());
}

#[test]
fn malformed_appends_are_dropped_without_panic() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 2]));
    // Gap in entry indexes; entry term above the leader's; index overflow; huge commit.
    e.handle_message(msg(2, 1, 2, append(2, 2, vec![ent(2, 3), ent(2, 5)], 0)));
    e.handle_message(msg(2, 1, 2, append(2, 2, vec![ent(9, 3)], 0)));
    e.handle_message(msg(2, 1, 2, append(u64::MAX, 2, vec![ent(2, 0)], 0)));
    e.handle_message(msg(2, 1, 2, append(u64::MAX - 1, 2, vec![], u64::MAX)));
    assert_eq!(e.last_log_id(), LogId::new(2, 2));
    e.handle_message(msg(2, 1, 2, append(2, 2, vec![], u64::MAX)));
    assert_eq!(e.commit_index(), 2, "commit never passes verified entries");
}

#[test]
fn bogus_responses_to_a_leader_are_ignored() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let t = c.node(1).term();
    let l = c.node(1);
    l.handle_message(msg(
        2,
        1,
        t,
        MessageBody::AppendResponse {
            success: true,
            index: u64::MAX,
            hint: None,
        },
    ));
    l.handle_message(msg(
        2,
        1,
        t,
        MessageBody::AppendResponse {
            success: false,
            index: 0,
            hint: None,
        },
    ));
    l.handle_message(msg(
        2,
        1,
        t,
        MessageBody::AppendResponse {
            success: false,
            index: 1,
            hint: Some(RejectHint {
                conflict_term: Some(u64::MAX),
                first_index: u64::MAX,
            }),
        },
    ));
    l.handle_message(msg(
        3,
        1,
        t,
        MessageBody::HeartbeatResponse { round: u64::MAX },
    ));
    l.handle_message(msg(
        2,
        1,
        t,
        MessageBody::Heartbeat {
            leader_commit: 5,
            round: 1,
            purge_to_index: 0,
        },
    ));
    assert!(l.is_leader());
    assert_eq!(l.commit_index(), 1);
    c.node(1).propose(b"still works".to_vec()).unwrap();
    c.settle();
    assert_eq!(c.node(2).last_log_id(), c.node(1).last_log_id());
    assert_eq!(c.node(1).commit_index(), 2);
}

#[test]
fn term_overflow_is_handled() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    e.handle_message(msg(
        2,
        1,
        u64::MAX,
        MessageBody::HeartbeatResponse { round: 0 },
    ));
    assert_eq!(e.term(), u64::MAX);
    let d = e.next_deadline();
    e.tick(d);
    assert_eq!(
        e.term(),
        u64::MAX,
        "cannot campaign past the last term, and does not panic"
    );
    assert_ne!(e.role(), Role::Leader);
}

#[test]
fn inconsistent_durable_state_is_rejected_at_restore() {
    let bad = [
        InitialState {
            entries: vec![ent(1, 2)],
            ..Default::default()
        },
        InitialState {
            hard_state: HardState {
                term: 1,
                vote: None,
            },
            entries: log_of(&[1, 2]),
            ..Default::default()
        },
        InitialState {
            hard_state: HardState {
                term: 1,
                vote: None,
            },
            entries: log_of(&[1]),
            applied: 5,
            ..Default::default()
        },
    ];
    for init in bad {
        assert!(matches!(
            Engine::new(cfg(1), init, 0, Duration::ZERO),
            Err(EngineError::InvalidState(_))
        ));
    }
    let mut c = cfg(1);
    c.election_timeout_max = c.election_timeout_min;
    assert!(matches!(
        Engine::new(c, InitialState::default(), 0, Duration::ZERO),
        Err(EngineError::Config(_))
    ));
}

// ----- sans-IO ------------------------------------------------------------------------------

#[test]
fn engine_source_has_no_io_clock_or_thread_rng() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let forbidden = [
        "tokio",
        "Instant::now",
        "SystemTime",
        "thread_rng",
        "rand::",
        "std::fs",
        "std::net",
        "std::thread",
        "std::io",
    ];
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "tests.rs" {
            continue; // this file names the patterns
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for f in forbidden {
            assert!(
                !text.contains(f),
                "{name} mentions {f}: the engine must stay free of I/O, clocks and thread RNG"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected the engine's source files, found {checked}"
    );
}

/// Heartbeat round: the leader's timer fires and everything is delivered.
fn heartbeat_round(c: &mut Cluster, leader: NodeId) {
    let d = c.node(leader).next_deadline();
    c.tick_node(leader, d);
    c.settle();
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

fn members_entry(term: Term, index: LogIndex, voters: &[NodeId]) -> Entry {
    Entry {
        term,
        index,
        payload: EntryPayload::Membership(Membership::new(voters.iter().copied())),
    }
}

#[test]
fn thesis_4_1_follower_uses_the_latest_membership_in_its_log_and_reverts_on_truncation() {
    let mut e = engine_with(cfg(2), &[1, 2, 3], 1, log_of(&[1]));
    // Appended, not committed: in force at once.
    e.handle_message(msg(
        1,
        2,
        1,
        append(1, 1, vec![members_entry(1, 2, &[1, 2, 3, 4])], 1),
    ));
    assert_eq!(e.membership(), &Membership::new([1, 2, 3, 4]));
    assert_eq!(e.commit_index(), 1, "not committed");
    let _ = take_all(&mut e);
    // A new leader's entry replaces it: the earlier membership is back.
    e.handle_message(msg(3, 2, 2, append(1, 1, vec![ent(2, 2)], 1)));
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

#[test]
fn oversized_proposals_are_refused_and_every_message_fits_the_bound() {
    let mut c = Cluster::new(3, |mut c| {
        c.max_entry_bytes = 4096;
        c.max_bytes_per_msg = 1024;
        c
    });
    c.elect(1);
    assert_eq!(
        c.node(1).propose(vec![0; 4097]),
        Err(ProposeError::TooLarge {
            size: 4097,
            max: 4096
        })
    );
    for n in [4096, 4095, 10, 1000, 4096] {
        c.node(1).propose(vec![1; n]).unwrap();
    }
    let bound = 4096 + crate::types::ENTRY_OVERHEAD;
    for m in c.drain(1) {
        if let MessageBody::AppendEntries { entries, .. } = &m.body {
            let bytes: usize = entries.iter().map(Entry::size_bound).sum();
            assert!(bytes <= bound.max(1024), "{bytes} bytes in one message");
        }
    }
}

#[test]
fn a_follower_whose_application_is_behind_accepts_only_what_fits() {
    let mut c = cfg(2);
    c.max_entry_bytes = 100;
    c.max_unapplied_bytes = 1000;
    let mut e = engine_with(c, &[1, 2, 3], 1, vec![]);
    let entries: Vec<Entry> = (1..=40)
        .map(|i| Entry {
            term: 1,
            index: i,
            payload: EntryPayload::Command(vec![0; 100]),
        })
        .collect();
    // Uncommitted entries are always taken: only commit progress frees them.
    e.handle_message(msg(1, 2, 1, append(0, 0, entries[..20].to_vec(), 0)));
    assert_eq!(e.last_log_id().index, 20);
    let _ = take_all(&mut e);
    // Once they commit and the application does not take them, the
    // follower takes nothing more.
    e.handle_message(msg(1, 2, 1, append(20, 1, vec![], 20)));
    let _ = take_all(&mut e);
    e.handle_message(msg(1, 2, 1, append(20, 1, entries[20..].to_vec(), 20)));
    assert_eq!(
        e.last_log_id().index,
        20,
        "took nothing while 20 entries wait"
    );
    let (_, acks) = take_all(&mut e);
    assert!(
        acks.iter().any(|m| matches!(
            m.body,
            MessageBody::AppendResponse {
                success: true,
                index: 20,
                ..
            }
        )),
        "acknowledges exactly what it holds: {acks:?}"
    );
    // Once the application has taken them, the rest fits.
    e.delivered(20);
    e.handle_message(msg(1, 2, 1, append(20, 1, entries[20..].to_vec(), 20)));
    assert_eq!(e.last_log_id().index, 40);
}

#[test]
fn after_a_leader_change_a_full_follower_still_takes_the_new_leaders_entries() {
    // The old leader filled the limit with uncommitted entries; the new
    // leader's no-op must still be taken, or nothing ever commits again.
    let mut c = cfg(2);
    c.max_entry_bytes = 100;
    c.max_unapplied_bytes = 900;
    let mut e = engine_with(c, &[1, 2, 3], 1, vec![]);
    let old: Vec<Entry> = (1..=6)
        .map(|i| Entry {
            term: 1,
            index: i,
            payload: EntryPayload::Command(vec![0; 100]),
        })
        .collect();
    e.handle_message(msg(1, 2, 1, append(0, 0, old, 0)));
    // 6 x 148 = 888 bytes: the no-op (48 more) would not fit under 900.
    assert_eq!(e.unapplied_bytes(), 888);
    let _ = take_all(&mut e);
    let noop = Entry {
        term: 2,
        index: 7,
        payload: EntryPayload::Blank,
    };
    e.handle_message(msg(3, 2, 2, append(6, 1, vec![noop], 0)));
    assert_eq!(e.last_log_id(), LogId::new(2, 7));
}
