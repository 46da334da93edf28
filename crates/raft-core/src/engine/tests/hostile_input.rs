//! Input from a confused or hostile peer or disk: dropped or refused, never a panic; and the engine stays free of I/O.

use super::*;

#[test]
fn vote_requests_from_non_voters_and_misaddressed_messages_are_dropped() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 1, vec![]);
    // Thesis §4.2.3: a removed member that keeps running must not raise
    // the cluster's term.
    for pre_vote in [true, false] {
        e.handle_message(
            Duration::ZERO,
            msg(
                99,
                1,
                50,
                MessageBody::VoteRequest {
                    pre_vote,
                    last_log_index: 100,
                    last_log_term: 49,
                    transfer: false,
                },
            ),
        );
    }
    e.handle_message(
        Duration::ZERO,
        msg(
            2,
            7,
            50,
            MessageBody::Heartbeat {
                leader_commit: 0,
                round: 0,
                purge_to_index: 0,
            },
        ),
    );
    e.handle_message(
        Duration::ZERO,
        msg(
            1,
            1,
            50,
            MessageBody::Heartbeat {
                leader_commit: 0,
                round: 0,
                purge_to_index: 0,
            },
        ),
    );
    assert_eq!(e.term(), 1);
    assert!(!e.has_ready());
}

#[test]
fn malformed_appends_are_dropped_without_panic() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 2]));
    // Gap in entry indexes; entry term above the leader's; index overflow; huge commit.
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 2, append(2, 2, vec![ent(2, 3), ent(2, 5)], 0)),
    );
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 2, append(2, 2, vec![ent(9, 3)], 0)),
    );
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 2, append(u64::MAX, 2, vec![ent(2, 0)], 0)),
    );
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 2, append(u64::MAX - 1, 2, vec![], u64::MAX)),
    );
    assert_eq!(e.last_log_id(), LogId::new(2, 2));
    e.handle_message(Duration::ZERO, msg(2, 1, 2, append(2, 2, vec![], u64::MAX)));
    assert_eq!(e.commit_index(), 2, "commit never passes verified entries");
}

#[test]
fn bogus_responses_to_a_leader_are_ignored() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let t = c.node(1).term();
    let l = c.node(1);
    l.handle_message(
        Duration::ZERO,
        msg(
            2,
            1,
            t,
            MessageBody::AppendResponse {
                success: true,
                index: u64::MAX,
                hint: None,
            },
        ),
    );
    l.handle_message(
        Duration::ZERO,
        msg(
            2,
            1,
            t,
            MessageBody::AppendResponse {
                success: false,
                index: 0,
                hint: None,
            },
        ),
    );
    l.handle_message(
        Duration::ZERO,
        msg(
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
        ),
    );
    l.handle_message(
        Duration::ZERO,
        msg(3, 1, t, MessageBody::HeartbeatResponse { round: u64::MAX }),
    );
    l.handle_message(
        Duration::ZERO,
        msg(
            2,
            1,
            t,
            MessageBody::Heartbeat {
                leader_commit: 5,
                round: 1,
                purge_to_index: 0,
            },
        ),
    );
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
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, u64::MAX, MessageBody::HeartbeatResponse { round: 0 }),
    );
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
        if name == "tests.rs" || path.is_dir() {
            continue; // the tests name the patterns
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
