//! Size and back-pressure limits: oversized proposals, followers whose application is behind.

use super::*;

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
            payload: EntryPayload::Command(vec![0; 100].into()),
        })
        .collect();
    // Uncommitted entries are always taken: only commit progress frees them.
    e.handle_message(
        Duration::ZERO,
        msg(1, 2, 1, append(0, 0, entries[..20].to_vec(), 0)),
    );
    assert_eq!(e.last_log_id().index, 20);
    let _ = take_all(&mut e);
    // Once they commit and the application does not take them, the
    // follower takes nothing more.
    e.handle_message(Duration::ZERO, msg(1, 2, 1, append(20, 1, vec![], 20)));
    let _ = take_all(&mut e);
    e.handle_message(
        Duration::ZERO,
        msg(1, 2, 1, append(20, 1, entries[20..].to_vec(), 20)),
    );
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
    e.handle_message(
        Duration::ZERO,
        msg(1, 2, 1, append(20, 1, entries[20..].to_vec(), 20)),
    );
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
            payload: EntryPayload::Command(vec![0; 100].into()),
        })
        .collect();
    e.handle_message(Duration::ZERO, msg(1, 2, 1, append(0, 0, old, 0)));
    // 6 x 148 = 888 bytes: the no-op (48 more) would not fit under 900.
    assert_eq!(e.unapplied_bytes(), 888);
    let _ = take_all(&mut e);
    let noop = Entry {
        term: 2,
        index: 7,
        payload: EntryPayload::Blank,
    };
    e.handle_message(Duration::ZERO, msg(3, 2, 2, append(6, 1, vec![noop], 0)));
    assert_eq!(e.last_log_id(), LogId::new(2, 7));
}
