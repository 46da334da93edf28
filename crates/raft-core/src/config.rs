//! The one configuration of a Raft node: who it is, who its peers are, and
//! every protocol setting, with the seed's defaults and one validation that
//! names what is wrong. The engine and the node read the same value.

use crate::types::NodeId;
use std::collections::BTreeSet;
use std::time::Duration;

/// How one node runs. Start from [`Config::new`] (or `Default`, node 1 alone),
/// which fills in the defaults below, then change what you need and call
/// [`Config::validate`] (the engine also validates on construction, so an
/// invalid configuration never runs).
///
/// | field | default | advice |
/// |---|---|---|
/// | `heartbeat_interval` | 100 ms | well below the election timeout (about a tenth of it) |
/// | `election_timeout_min` | 150 ms | 150-300 ms on a LAN; 1-3 s across a WAN |
/// | `election_timeout_max` | 300 ms | larger than the minimum; the spread avoids split votes |
/// | `pre_vote` | true | stops a partitioned node from disrupting the cluster when it returns |
/// | `check_quorum` | true | a leader cut off from a majority steps down within an election timeout |
/// | `max_entries_per_msg` | 512 | entries in one AppendEntries |
/// | `max_bytes_per_msg` | 1 MiB | approximate payload bytes in one AppendEntries |
/// | `max_inflight` | 64 | unanswered AppendEntries per follower (pipelining depth) |
/// | `compact_threshold` | 8192 | log entries dropped at a time once released (see `Raft::release_applied`) |
/// | `max_entry_bytes` | 8 MiB | largest command `submit` accepts; with the message overhead it must fit the transport's frame limit |
/// | `max_write_stall` | 5 s | a log write taking longer stops the node (a hung disk must not keep a leader that cannot apply) |
/// | `max_unapplied_bytes` | 64 MiB | back-pressure: entry bytes held but not yet taken by the application; over it `submit` answers `Error::Busy` |
/// | `max_committed_per_ready` | 4096 | committed entries handed to the application in one step |
/// | `read_policy` | `ReadIndex` | how a leader confirms a linearizable read: a heartbeat round each time, or a lease |
/// | `commit_notice_delay` | 2 ms | how long a leader waits for an append that carries a new commit index before telling followers in a message of its own; zero: at once |
/// | `lease_drift_margin` | 30 ms | with `Lease`: the lease is `election_timeout_min` minus this; safe while clock rates differ by less than `margin / (2 * election_timeout_min)` (10% with the defaults) |
///
/// `peers` holds ids only: how to reach a peer is the transport's business
/// (`raft-net-quic` takes addresses in its own config, and learns those of
/// members added later from the configuration entries). The peers only
/// bootstrap a new cluster; once the log holds a membership, that counts
/// (a node started with `join` waits to be added instead).
///
/// ```
/// use raft_core::Config;
/// use std::time::Duration;
///
/// let mut cfg = Config::new(1);
/// cfg.add_peer(2).unwrap().add_peer(3).unwrap();
/// // A WAN deployment: slower timeouts.
/// cfg.heartbeat_interval = Duration::from_millis(200);
/// cfg.election_timeout_min = Duration::from_secs(1);
/// cfg.election_timeout_max = Duration::from_secs(3);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This node's id; unique in the cluster.
    pub id: NodeId,
    /// The other members of a new cluster.
    pub peers: BTreeSet<NodeId>,
    /// Interval between leader heartbeats.
    pub heartbeat_interval: Duration,
    /// Lower bound (inclusive) of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound (exclusive) of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Ask for pre-votes before an election (Raft thesis §9.6).
    pub pre_vote: bool,
    /// Leaders step down when they cannot reach a majority.
    pub check_quorum: bool,
    /// Most entries in one AppendEntries message.
    pub max_entries_per_msg: usize,
    /// Approximate bound on the bytes of entries in one AppendEntries message.
    pub max_bytes_per_msg: usize,
    /// Most unanswered AppendEntries per follower.
    pub max_inflight: usize,
    /// Released log entries are dropped in steps of at least this many.
    pub compact_threshold: u64,
    /// Largest command `submit` accepts, in bytes.
    pub max_entry_bytes: usize,
    /// Most bytes of entries a node holds that its application has not taken
    /// from the apply channel yet (uncommitted ones included); a leader over
    /// it refuses proposals with `Error::Busy`.
    pub max_unapplied_bytes: u64,
    /// A log write that has not returned after this long stops the node with
    /// an error: a node whose disk hangs must not stay leader (it could never
    /// apply) nor look healthy.
    pub max_write_stall: Duration,
    /// Most committed entries handed to the application in one step.
    pub max_committed_per_ready: usize,
    /// How a leader confirms that it still leads before it answers a read.
    pub read_policy: ReadPolicy,
    /// How long after its commit index moves a leader waits before it sends
    /// followers an append that carries only the new index. Appends that
    /// carry entries, and heartbeats, carry it anyway: under load the index
    /// rides on them and costs no message; when writes pause, followers
    /// learn it this much later. Zero sends it at once (two appends per
    /// follower for a lone write).
    pub commit_notice_delay: Duration,
    /// With [`ReadPolicy::Lease`]: how much shorter than
    /// `election_timeout_min` the lease is, to absorb clock drift.
    pub lease_drift_margin: Duration,
    /// Entries kept in the log below the latest snapshot, so that a
    /// follower a little behind catches up from the log rather than by a
    /// whole snapshot.
    pub trailing_entries: u64,
    /// Bytes per snapshot chunk on the wire.
    pub snapshot_chunk_bytes: usize,
    /// Snapshot chunks sent ahead of the follower's acknowledgements: with
    /// the chunk size, this bounds the memory a transfer takes on either side.
    pub snapshot_chunks_in_flight: usize,
    /// A snapshot transfer that makes no progress for this long is dropped
    /// (and started again, resuming where the follower stopped).
    pub snapshot_timeout: Duration,
    /// Start outside any cluster: a node with empty storage stores no
    /// membership and waits until a leader adds it
    /// (`Raft::change_membership`). `peers` is then not used. Ignored once
    /// the node's log holds a membership.
    pub join: bool,
}

/// Room for a snapshot chunk's own fields (the snapshot's metadata with a
/// membership of a few hundred voters) beyond its bytes.
pub(crate) const SNAPSHOT_CHUNK_OVERHEAD: usize = 4096;

/// How a leader confirms, for a linearizable read, that no other leader
/// can have committed anything it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// A heartbeat round acknowledged by a majority per batch of reads
    /// (thesis §6.4). Safe whatever the clocks do.
    #[default]
    ReadIndex,
    /// A lease (thesis §6.4.1): after a majority acknowledged a heartbeat
    /// sent at time T, no other leader can be elected before
    /// T + `election_timeout_min` (those members ignore vote requests until
    /// then), so until T + `election_timeout_min` - `lease_drift_margin`
    /// the leader answers reads without a round. Safe while the members'
    /// clocks run at rates that differ by less than
    /// `lease_drift_margin / (2 * election_timeout_min)`; needs
    /// `check_quorum`. A lapsed lease falls back to a heartbeat round.
    Lease,
}

/// What is wrong with a [`Config`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A duration is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// A limit is zero.
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// The election timeout range is empty.
    #[error("election_timeout_min ({min:?}) must be less than election_timeout_max ({max:?})")]
    ElectionRange {
        /// The configured minimum.
        min: Duration,
        /// The configured maximum.
        max: Duration,
    },
    /// Heartbeats would not arrive before followers time out.
    #[error("heartbeat_interval ({heartbeat:?}) must be less than election_timeout_min ({min:?}); about a tenth of it is best")]
    HeartbeatTooSlow {
        /// The configured heartbeat interval.
        heartbeat: Duration,
        /// The configured minimum election timeout.
        min: Duration,
    },
    /// The node lists itself as a peer.
    #[error("node {0} lists itself among its peers")]
    SelfInPeers(NodeId),
    /// A peer id was added twice.
    #[error("peer id {0} appears more than once")]
    DuplicateId(NodeId),
    /// Lease reads need check-quorum (members in a lease ignore candidates)
    /// and a margin below the minimum election timeout.
    #[error("read_policy Lease needs check_quorum and lease_drift_margin ({margin:?}) below election_timeout_min ({min:?})")]
    LeaseUnsafe {
        /// The configured margin.
        margin: Duration,
        /// The configured minimum election timeout.
        min: Duration,
    },
    /// The back-pressure limit cannot hold even one entry of the largest size.
    #[error("max_unapplied_bytes ({unapplied}) must be at least max_entry_bytes ({entry}) plus {overhead} bytes")]
    UnappliedBelowEntry {
        /// The configured `max_unapplied_bytes`.
        unapplied: u64,
        /// The configured `max_entry_bytes`.
        entry: usize,
        /// Per-entry overhead.
        overhead: usize,
    },
    /// The largest message the settings allow does not fit the transport.
    #[error("messages of up to {needed} bytes (max_bytes_per_msg or max_entry_bytes plus overheads) exceed the transport's limit of {limit} bytes; lower max_entry_bytes / max_bytes_per_msg or raise the transport's frame limit")]
    MessageTooLarge {
        /// The largest message the settings allow.
        needed: usize,
        /// The transport's limit.
        limit: usize,
    },
}

/// The seed's defaults (heartbeat 100 ms, elections 150-300 ms) for node 1
/// alone: the one place every default is written.
impl Default for Config {
    fn default() -> Self {
        Config {
            id: 1,
            peers: BTreeSet::new(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            pre_vote: true,
            check_quorum: true,
            max_entries_per_msg: 512,
            max_bytes_per_msg: 1 << 20,
            max_inflight: 64,
            compact_threshold: 8192,
            max_entry_bytes: 8 << 20,
            max_unapplied_bytes: 64 << 20,
            max_write_stall: Duration::from_secs(5),
            max_committed_per_ready: 4096,
            read_policy: ReadPolicy::ReadIndex,
            commit_notice_delay: Duration::from_millis(2),
            lease_drift_margin: Duration::from_millis(30),
            trailing_entries: 1024,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_chunks_in_flight: 4,
            snapshot_timeout: Duration::from_secs(10),
            join: false,
        }
    }
}

impl Config {
    /// A configuration with the seed's defaults and no peers (a single-node cluster).
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            ..Config::default()
        }
    }

    /// Adds a peer; an id that is already present is an error.
    pub fn add_peer(&mut self, id: NodeId) -> Result<&mut Self, ConfigError> {
        if !self.peers.insert(id) {
            return Err(ConfigError::DuplicateId(id));
        }
        Ok(self)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("election_timeout_min", self.election_timeout_min),
            ("election_timeout_max", self.election_timeout_max),
            ("max_write_stall", self.max_write_stall),
            ("snapshot_timeout", self.snapshot_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        for (name, v) in [
            ("max_entries_per_msg", self.max_entries_per_msg),
            ("max_bytes_per_msg", self.max_bytes_per_msg),
            ("max_inflight", self.max_inflight),
            ("max_entry_bytes", self.max_entry_bytes),
            ("max_committed_per_ready", self.max_committed_per_ready),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
            ("snapshot_chunks_in_flight", self.snapshot_chunks_in_flight),
            (
                "compact_threshold",
                usize::try_from(self.compact_threshold).unwrap_or(usize::MAX),
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroLimit(name));
            }
        }
        if self.election_timeout_min >= self.election_timeout_max {
            return Err(ConfigError::ElectionRange {
                min: self.election_timeout_min,
                max: self.election_timeout_max,
            });
        }
        if self.heartbeat_interval >= self.election_timeout_min {
            return Err(ConfigError::HeartbeatTooSlow {
                heartbeat: self.heartbeat_interval,
                min: self.election_timeout_min,
            });
        }
        let overhead = crate::types::ENTRY_OVERHEAD;
        if self.max_unapplied_bytes < self.max_entry_bytes.saturating_add(overhead) as u64 {
            return Err(ConfigError::UnappliedBelowEntry {
                unapplied: self.max_unapplied_bytes,
                entry: self.max_entry_bytes,
                overhead,
            });
        }
        if self.peers.contains(&self.id) {
            return Err(ConfigError::SelfInPeers(self.id));
        }
        if self.read_policy == ReadPolicy::Lease
            && (!self.check_quorum || self.lease_drift_margin >= self.election_timeout_min)
        {
            return Err(ConfigError::LeaseUnsafe {
                margin: self.lease_drift_margin,
                min: self.election_timeout_min,
            });
        }
        Ok(())
    }

    /// The largest encoded message these settings can produce: an
    /// AppendEntries of `max_bytes_per_msg` of entries, or of one entry of
    /// `max_entry_bytes`, plus the message's own fields; or a snapshot chunk.
    pub fn max_message_bytes(&self) -> usize {
        self.max_bytes_per_msg
            .max(
                self.max_entry_bytes
                    .saturating_add(crate::types::ENTRY_OVERHEAD),
            )
            .saturating_add(crate::message::MESSAGE_OVERHEAD)
            .max(
                self.snapshot_chunk_bytes
                    .saturating_add(SNAPSHOT_CHUNK_OVERHEAD),
            )
    }

    /// Checks that every message fits a transport whose frames hold at most
    /// `limit` bytes.
    pub fn validate_for_transport(&self, limit: Option<usize>) -> Result<(), ConfigError> {
        match limit {
            Some(limit) if self.max_message_bytes() > limit => Err(ConfigError::MessageTooLarge {
                needed: self.max_message_bytes(),
                limit,
            }),
            _ => Ok(()),
        }
    }

    /// Every voter: this node and its peers.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.peers.iter().copied().chain([self.id]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Config {
        let mut c = Config::new(1);
        c.add_peer(2).unwrap().add_peer(3).unwrap();
        c
    }

    #[test]
    fn defaults_are_the_seeds_and_valid() {
        let c = good();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.election_timeout_min, Duration::from_millis(150));
        assert_eq!(c.election_timeout_max, Duration::from_millis(300));
        assert!(c.pre_vote && c.check_quorum);
        c.validate().unwrap();
        assert_eq!(c.members().into_iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn each_bad_setting_gets_its_own_error() {
        let mut c = good();
        c.election_timeout_min = Duration::from_millis(300);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ElectionRange { .. })
        ));
        let mut c = good();
        c.heartbeat_interval = Duration::from_millis(150);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HeartbeatTooSlow { .. })
        ));
        let mut c = good();
        c.peers.insert(1);
        assert_eq!(c.validate(), Err(ConfigError::SelfInPeers(1)));
        let mut c = good();
        assert_eq!(c.add_peer(2).unwrap_err(), ConfigError::DuplicateId(2));
        let mut c = good();
        c.heartbeat_interval = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(ConfigError::ZeroDuration("heartbeat_interval"))
        );
        let mut c = good();
        c.max_inflight = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroLimit("max_inflight")));
        let mut c = good();
        c.max_unapplied_bytes = c.max_entry_bytes as u64;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::UnappliedBelowEntry { .. })
        ));
        // The defaults fit a 16 MiB frame, and not a 4 MiB one.
        let c = good();
        c.validate_for_transport(Some(16 << 20)).unwrap();
        c.validate_for_transport(None).unwrap();
        assert!(matches!(
            c.validate_for_transport(Some(4 << 20)),
            Err(ConfigError::MessageTooLarge { limit, .. }) if limit == 4 << 20
        ));
        let mut c = good();
        c.read_policy = ReadPolicy::Lease;
        c.validate().unwrap();
        c.check_quorum = false;
        assert!(matches!(c.validate(), Err(ConfigError::LeaseUnsafe { .. })));
        let mut c = good();
        c.read_policy = ReadPolicy::Lease;
        c.lease_drift_margin = c.election_timeout_min;
        assert!(matches!(c.validate(), Err(ConfigError::LeaseUnsafe { .. })));
        let err = good_with_wrong_range().validate().unwrap_err().to_string();
        assert!(err.contains("election_timeout_min"), "{err}");
    }

    fn good_with_wrong_range() -> Config {
        let mut c = good();
        c.election_timeout_max = Duration::from_millis(100);
        c
    }
}
