//! The user-facing configuration of a Raft node, with the seed's defaults and
//! validation that names what is wrong.

use crate::engine::EngineConfig;
use crate::types::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How one node runs. Start from [`Config::new`], which fills in the defaults
/// below, then change what you need and call [`Config::validate`] (the node
/// also validates on construction).
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
///
/// ```
/// use raft_core::node::Config;
/// use std::time::Duration;
///
/// let mut cfg = Config::new(1);
/// cfg.add_peer(2, "10.0.0.2:7101").unwrap();
/// cfg.add_peer(3, "10.0.0.3:7101").unwrap();
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
    /// The other members: id -> network address (the transport interprets it).
    pub peers: BTreeMap<NodeId, String>,
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
    /// Two peers share an address.
    #[error("peers {0} and {1} share the address {2:?}")]
    DuplicateAddress(NodeId, NodeId, String),
    /// A peer address is empty.
    #[error("peer {0} has an empty address")]
    EmptyAddress(NodeId),
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

impl Config {
    /// A configuration with the seed's defaults and no peers (a single-node cluster).
    pub fn new(id: NodeId) -> Self {
        // The engine's defaults are the one source of these values.
        let e = EngineConfig::new(id);
        Config {
            id,
            peers: BTreeMap::new(),
            heartbeat_interval: e.heartbeat_interval,
            election_timeout_min: e.election_timeout_min,
            election_timeout_max: e.election_timeout_max,
            pre_vote: e.pre_vote,
            check_quorum: e.check_quorum,
            max_entries_per_msg: e.max_entries_per_msg,
            max_bytes_per_msg: e.max_bytes_per_msg,
            max_inflight: e.max_inflight,
            compact_threshold: e.compact_threshold,
            max_entry_bytes: e.max_entry_bytes,
            max_unapplied_bytes: e.max_unapplied_bytes,
            max_write_stall: Duration::from_secs(5),
        }
    }

    /// Adds a peer; an id that is already present is an error.
    pub fn add_peer(
        &mut self,
        id: NodeId,
        addr: impl Into<String>,
    ) -> Result<&mut Self, ConfigError> {
        if self.peers.contains_key(&id) {
            return Err(ConfigError::DuplicateId(id));
        }
        self.peers.insert(id, addr.into());
        Ok(self)
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("election_timeout_min", self.election_timeout_min),
            ("election_timeout_max", self.election_timeout_max),
            ("max_write_stall", self.max_write_stall),
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
        if self.peers.contains_key(&self.id) {
            return Err(ConfigError::SelfInPeers(self.id));
        }
        let mut seen: BTreeMap<&str, NodeId> = BTreeMap::new();
        for (&id, addr) in &self.peers {
            if addr.trim().is_empty() {
                return Err(ConfigError::EmptyAddress(id));
            }
            if let Some(&other) = seen.get(addr.as_str()) {
                return Err(ConfigError::DuplicateAddress(other, id, addr.clone()));
            }
            seen.insert(addr, id);
        }
        Ok(())
    }

    /// The largest encoded message these settings can produce: an
    /// AppendEntries of `max_bytes_per_msg` of entries, or of one entry of
    /// `max_entry_bytes`, plus the message's own fields.
    pub fn max_message_bytes(&self) -> usize {
        self.max_bytes_per_msg
            .max(
                self.max_entry_bytes
                    .saturating_add(crate::types::ENTRY_OVERHEAD),
            )
            .saturating_add(crate::message::MESSAGE_OVERHEAD)
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
        self.peers.keys().copied().chain([self.id]).collect()
    }

    /// The engine's view of this configuration.
    pub fn engine_config(&self) -> EngineConfig {
        let mut c = EngineConfig::new(self.id);
        c.heartbeat_interval = self.heartbeat_interval;
        c.election_timeout_min = self.election_timeout_min;
        c.election_timeout_max = self.election_timeout_max;
        c.pre_vote = self.pre_vote;
        c.check_quorum = self.check_quorum;
        c.max_entries_per_msg = self.max_entries_per_msg;
        c.max_bytes_per_msg = self.max_bytes_per_msg;
        c.max_inflight = self.max_inflight;
        c.compact_threshold = self.compact_threshold;
        c.max_entry_bytes = self.max_entry_bytes;
        c.max_unapplied_bytes = self.max_unapplied_bytes;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Config {
        let mut c = Config::new(1);
        c.add_peer(2, "a:1").unwrap().add_peer(3, "b:1").unwrap();
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
        c.peers.insert(1, "self:1".into());
        assert_eq!(c.validate(), Err(ConfigError::SelfInPeers(1)));
        let mut c = good();
        assert_eq!(
            c.add_peer(2, "z:9").unwrap_err(),
            ConfigError::DuplicateId(2)
        );
        c.add_peer(4, "a:1").unwrap();
        assert_eq!(
            c.validate(),
            Err(ConfigError::DuplicateAddress(2, 4, "a:1".into()))
        );
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
        c.peers.insert(5, " ".into());
        assert_eq!(c.validate(), Err(ConfigError::EmptyAddress(5)));
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
        let err = good_with_wrong_range().validate().unwrap_err().to_string();
        assert!(err.contains("election_timeout_min"), "{err}");
    }

    fn good_with_wrong_range() -> Config {
        let mut c = good();
        c.election_timeout_max = Duration::from_millis(100);
        c
    }
}
