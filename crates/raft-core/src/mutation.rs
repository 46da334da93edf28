//! Deliberate protocol bugs, one per safety rule, so tests can show that the
//! simulator and the node tests catch each of them (the mutation matrix).
//!
//! Production code asks [`broken`] at the one place where a rule is applied.
//! Outside `cfg(test)` it is a constant `false` that the compiler removes; in
//! tests a mutation is switched on for the current thread only, so tests
//! running in parallel do not see each other's bugs. The simulator runs on
//! one thread, and node tests use tokio's current-thread runtime.

/// One rule broken on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Mutation {
    /// A vote (and a candidate's request) leaves before the term and vote are durable.
    VoteBeforeDurable,
    /// A leader counts its own entries toward a commit before they are durable.
    LeaderCountsUnsynced,
    /// Any heartbeat answer confirms the latest read round, whatever round it answers.
    AnyHeartbeatConfirmsRead,
    /// Compaction ignores what the application has released (stored durably).
    CompactIgnoringReleased,
    /// A read index is answered without a quorum round.
    ReadWithoutQuorum,
    /// A follower acknowledges entries before they are durable.
    AckBeforeDurable,
    /// A node grants a second vote in one term.
    DoubleVote,
    /// A vote ignores the up-to-date check (§5.4.1).
    VoteIgnoresUpToDate,
    /// A leader's heartbeat carries its commit index uncapped by the follower's match index.
    HeartbeatCommitUncapped,
    /// A leader commits an old-term entry by counting replicas (§5.4.2, Figure 8)
    /// and appends no no-op on election.
    CommitOldTerm,
    /// A leader compacts what it holds itself, whether or not its followers have it.
    CompactIgnoringPeers,
    /// A follower drops every entry after an AppendEntries' last entry, even
    /// ones that did not conflict (a late, shorter AppendEntries then removes
    /// committed entries).
    TruncateAfterAppend,
    /// After a restart, entries the application already applied are delivered again.
    ReapplyAfterRestart,
    /// A follower adopts the leader's commit index past the entries the
    /// AppendEntries verified (here: uncapped, even past its own log).
    CommitPastVerified,
    /// The node driver sends acknowledgements and votes before `save` returns.
    DriverSendsBeforeSave,
    /// A lease read trusts the whole election timeout: no drift margin.
    LeaseWithoutDriftMargin,
    /// The lease runs from when a majority's answers arrived, not from when
    /// the heartbeat they answer was sent.
    LeaseFromAnswer,
    /// A follower installs a snapshot older than its commit index (its
    /// state goes back).
    InstallOlderThanCommit,
    /// A follower whose log holds a snapshot's last entry still replaces
    /// the whole log with the snapshot, dropping entries after it that
    /// it had acknowledged.
    DiscardMatchingSuffix,
    /// During joint consensus a commit or an election needs only the
    /// incoming voters' majority.
    JointCommitNewOnly,
    /// During joint consensus a commit or an election needs only the
    /// outgoing voters' majority.
    JointCommitOldOnly,
    /// A leader accepts a membership change while another is still in
    /// flight (a joint configuration, or one not yet committed).
    TwoChangesInFlight,
    /// Learners count toward commits and elections as if they were voters.
    LearnerCountsInQuorum,
}

impl Mutation {
    /// Every mutation the simulator must catch (the driver's is caught by node tests).
    #[cfg(test)]
    pub(crate) const ENGINE: [Mutation; 22] = [
        Mutation::VoteBeforeDurable,
        Mutation::LeaderCountsUnsynced,
        Mutation::AnyHeartbeatConfirmsRead,
        Mutation::CompactIgnoringReleased,
        Mutation::ReadWithoutQuorum,
        Mutation::AckBeforeDurable,
        Mutation::DoubleVote,
        Mutation::VoteIgnoresUpToDate,
        Mutation::HeartbeatCommitUncapped,
        Mutation::CommitOldTerm,
        Mutation::CompactIgnoringPeers,
        Mutation::TruncateAfterAppend,
        Mutation::ReapplyAfterRestart,
        Mutation::CommitPastVerified,
        Mutation::LeaseWithoutDriftMargin,
        Mutation::LeaseFromAnswer,
        Mutation::InstallOlderThanCommit,
        Mutation::DiscardMatchingSuffix,
        Mutation::JointCommitNewOnly,
        Mutation::JointCommitOldOnly,
        Mutation::TwoChangesInFlight,
        Mutation::LearnerCountsInQuorum,
    ];

    #[cfg(test)]
    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

#[cfg(test)]
thread_local! {
    static ACTIVE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// True when the rule `m` is broken on purpose (tests only).
#[cfg(test)]
pub(crate) fn broken(m: Mutation) -> bool {
    ACTIVE.with(|a| a.get() & m.bit() != 0)
}

/// True when the rule `m` is broken on purpose: never, outside tests.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn broken(_m: Mutation) -> bool {
    false
}

/// Breaks `m` on this thread until the guard is dropped.
#[cfg(test)]
pub(crate) fn inject(m: Mutation) -> Injected {
    ACTIVE.with(|a| a.set(a.get() | m.bit()));
    Injected(m)
}

/// Restores the rule when dropped.
#[cfg(test)]
#[must_use]
pub(crate) struct Injected(Mutation);

#[cfg(test)]
impl Drop for Injected {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(a.get() & !self.0.bit()));
    }
}
