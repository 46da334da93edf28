//! The state machine: committed writes applied to memory over a redb
//! table, with the applied index written in the same batch as the data it
//! covers. After a restart the store resumes exactly after the last
//! applied entry that was flushed: nothing is lost (the Raft log
//! re-delivers the rest) and nothing is applied twice.
//!
//! Layers (see `overlay`). A batch lands in an in-memory persistent map;
//! a flush (every five seconds by default, sooner past
//! `FLUSH_EARLY_BYTES`, and at
//! shutdown) writes what memory holds to redb in one durable transaction,
//! in key order, while later batches land in a fresh map beside it. A key
//! written often between flushes reaches the disk once, and no batch waits
//! for the disk. Every published state (memory maps plus one redb read
//! transaction) is immutable, which gives three things this store needs:
//! - reads of several keys (MGET, EXISTS, DBSIZE) are one state, never half
//!   a batch, and never wait for the applier;
//! - a snapshot is a scan of one state: a consistent state at one applied
//!   index, written while writes keep flowing, with no copy of anything;
//! - memory is the page cache (`CACHE_BYTES`) plus at most about two
//!   flushes' worth of writes, whatever the size of the state, including
//!   while a snapshot of any size is loaded.
//!
//! The Raft log is the durable record of what memory holds:
//! [`StateMachine::flush`] makes everything applied durable before the log
//! may drop it. A crash falls back to the last flush, whose applied index
//! says where the log resumes.
//!
//! Loading a snapshot builds a new database in a new directory and switches
//! to it with one atomic rename, so a crash leaves the old state or the new
//! one.

use crate::command::{
    format_double, CollRead, HashRead, ReadCmd, ReadTx, SetCond, Ttl, TxCmd, Value, WriteCmd, ZRead,
};
use crate::error::{KvError, Reply};
use crate::overlay::{Layers, ReadTable, Val};
use crate::snapfile;
use redb::{Durability, ReadableDatabase as _, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::sync::watch;

/// The one table: data keys (`k:`...) and metadata (`m:`...).
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const APPLIED: &[u8] = b"m:applied";
const APPLIED_TERM: &[u8] = b"m:applied_term";
const COUNT: &[u8] = b"m:count";
/// Data: `k:` + the key's scan hash (8 bytes, big-endian) + the key. Keys
/// are stored in the order SCAN walks them, so a cursor (a hash) means the
/// same on every node, and SCAN costs no index of its own.
const DATA: &[u8] = b"k:";
/// Just past every data key (`;` follows `:`).
const DATA_END: &[u8] = b"k;";
/// Bytes before the key in a data key.
const DATA_HEAD: usize = 2 + 8;
/// The expiry index: `e:` + expiry time (8 bytes, big-endian) + the data
/// key after its `k:`; empty values. The reaper walks it in time order.
const EXPIRES: &[u8] = b"e:";
/// Just past every expiry index key.
const EXPIRES_END: &[u8] = b"e;";
/// The state machine's clock: the latest time an applied entry carried
/// (milliseconds since the Unix epoch). Never goes back.
const CLOCK: &[u8] = b"m:clock";
/// The value format: absent in databases whose values were raw strings
/// (moved to the tagged format when opened), `VALUE_FORMAT` after.
const FORMAT: &[u8] = b"m:format";
const VALUE_FORMAT: u64 = 2;
/// A stored value starts with a tag: the type in the low bits,
/// `HAS_EXPIRY` when 8 bytes of expiry time (big-endian milliseconds)
/// follow, then `HAS_VERSION` when 8 bytes of version follow (the index of
/// the entry that last wrote the key, for WATCH), then the data.
const T_STRING: u8 = 0;
/// A hash: its data is the fields and values (see [`hash_decode`]).
const T_HASH: u8 = 1;
/// A list: its data is the elements in order (see [`elems_decode`]).
const T_LIST: u8 = 2;
/// A set: its data is the members, in the order they were added.
const T_SET: u8 = 3;
/// A sorted set: members and scores, kept in (score, member) order.
const T_ZSET: u8 = 4;
const KIND_MASK: u8 = 0x3f;
const HAS_EXPIRY: u8 = 0x80;
const HAS_VERSION: u8 = 0x40;
/// Deletion marks for WATCH: `t:` + bucket (2 bytes, big-endian) -> the
/// index of the last entry that removed a key of that bucket. A watched key
/// that is absent at EXEC was removed after the WATCH if its bucket's mark
/// is later (or another key of the bucket was: a needless abort, never a
/// missed one).
const TOMBS: &[u8] = b"t:";
const TOMBS_END: &[u8] = b"t;";
const TOMB_BUCKETS: u64 = 1 << 14;

/// A stored value, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored<'a> {
    /// The type (`T_STRING`, `T_HASH`).
    kind: u8,
    /// The expiry time, if the key has one.
    expires: Option<u64>,
    /// The index of the entry that last wrote it (0: before versions).
    version: u64,
    data: &'a [u8],
}

impl<'a> Stored<'a> {
    fn decode(v: &'a [u8]) -> Stored<'a> {
        let Some((&tag, mut rest)) = v.split_first() else {
            return Stored {
                kind: T_STRING,
                expires: None,
                version: 0,
                data: &[],
            };
        };
        let word = |rest: &mut &'a [u8]| -> Option<u64> {
            let (w, r) = rest.split_at_checked(8)?;
            *rest = r;
            Some(u64::from_be_bytes(w.try_into().ok()?))
        };
        let expires = if tag & HAS_EXPIRY != 0 {
            word(&mut rest)
        } else {
            None
        };
        let version = if tag & HAS_VERSION != 0 {
            word(&mut rest).unwrap_or(0)
        } else {
            0
        };
        Stored {
            kind: tag & KIND_MASK,
            expires,
            version,
            data: rest,
        }
    }

    /// Whether it is gone at time `now`.
    fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

fn encode_value(expires: Option<u64>, version: u64, data: &[u8]) -> Vec<u8> {
    encode_obj(T_STRING, expires, version, data)
}

fn encode_obj(kind: u8, expires: Option<u64>, version: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + data.len());
    let mut tag = kind & KIND_MASK;
    if expires.is_some() {
        tag |= HAS_EXPIRY;
    }
    if version != 0 {
        tag |= HAS_VERSION;
    }
    v.push(tag);
    if let Some(at) = expires {
        v.extend_from_slice(&at.to_be_bytes());
    }
    if version != 0 {
        v.extend_from_slice(&version.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// A hash's fields and values, in the order they were first set (as
/// Redis keeps a small hash): `count u32`, then `len u32, field, len u32,
/// value` per field, little-endian. What does not decode (damage) reads as
/// the fields that did.
fn hash_decode(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut d = data;
    let mut out = Vec::new();
    let Some(n) = take_u32(&mut d) else {
        return out;
    };
    for _ in 0..n {
        let (Some(f), Some(v)) = (take(&mut d), take(&mut d)) else {
            break;
        };
        out.push((f.to_vec(), v.to_vec()));
    }
    out
}

fn hash_encode(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let len: usize = pairs.iter().map(|(f, v)| 8 + f.len() + v.len()).sum();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (f, v) in pairs {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// The next little-endian u32 of `d`.
fn take_u32(d: &mut &[u8]) -> Option<u32> {
    let (n, rest) = d.split_at_checked(4)?;
    *d = rest;
    Some(u32::from_le_bytes(n.try_into().ok()?))
}

/// The next length-prefixed (u32) field of `d`.
fn take<'a>(d: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = take_u32(d)? as usize;
    let (x, rest) = d.split_at_checked(n)?;
    *d = rest;
    Some(x)
}

/// A list's elements or a set's members: `count u32`, then `len u32,
/// bytes` each, little-endian (what does not decode reads as what did).
fn elems_decode(data: &[u8]) -> Vec<Vec<u8>> {
    let mut d = data;
    let n = take_u32(&mut d).unwrap_or(0);
    (0..n)
        .map_while(|_| take(&mut d).map(<[u8]>::to_vec))
        .collect()
}

fn elems_encode(elems: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = elems.iter().map(|e| 4 + e.len()).sum();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(elems.len() as u32).to_le_bytes());
    for e in elems {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// The elements of a live list or set (`kind`), empty when absent;
/// `WrongType` for a key of another type.
fn elems_of(obj: Option<(u8, &[u8])>, kind: u8) -> Result<Vec<Vec<u8>>, KvError> {
    match obj {
        Some((k, data)) if k == kind => Ok(elems_decode(data)),
        Some(_) => Err(KvError::WrongType),
        None => Ok(Vec::new()),
    }
}

/// Redis's list range: `start` and `stop` counted from the end when
/// negative, clamped; `None` when empty.
fn list_range(len: usize, start: i64, stop: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let fix = |i: i64| if i < 0 { len + i } else { i };
    let (a, b) = (fix(start).max(0), fix(stop));
    if a > b || a >= len {
        return None;
    }
    Some((a as usize, b.min(len - 1) as usize))
}

/// Answers a read of a list or set; `fetch` looks up another key (for
/// SINTER and SUNION).
fn coll_read(
    obj: Option<(u8, &[u8])>,
    cmd: &CollRead,
    mut fetch: impl FnMut(&[u8]) -> Result<Option<(u8, Vec<u8>)>, KvError>,
) -> Result<Value, KvError> {
    let bulks = |v: Vec<Vec<u8>>| v.into_iter().map(Value::Bulk).collect::<Vec<_>>();
    Ok(match cmd {
        CollRead::LRange(a, b) => {
            let l = elems_of(obj, T_LIST)?;
            match list_range(l.len(), *a, *b) {
                Some((a, b)) => Value::List(bulks(l[a..=b].to_vec())),
                None => Value::List(Vec::new()),
            }
        }
        CollRead::LLen => Value::Int(elems_of(obj, T_LIST)?.len() as i64),
        CollRead::LIndex(i) => {
            if obj.is_none() {
                return Ok(Value::Nil);
            }
            let l = elems_of(obj, T_LIST)?;
            let i = crate::command::parse_int(i).ok_or(KvError::NotAnInteger)?;
            let i = if i < 0 { l.len() as i64 + i } else { i };
            usize::try_from(i)
                .ok()
                .and_then(|i| l.get(i).cloned())
                .map_or(Value::Nil, Value::Bulk)
        }
        CollRead::SMembers => Value::Set(bulks(elems_of(obj, T_SET)?)),
        CollRead::SIsMember(m) => Value::Int(i64::from(elems_of(obj, T_SET)?.contains(m))),
        CollRead::SCard => Value::Int(elems_of(obj, T_SET)?.len() as i64),
        CollRead::SScan(pattern) => {
            let mut out = elems_of(obj, T_SET)?;
            out.retain(|m| pattern.as_ref().is_none_or(|p| glob_match(p, m)));
            Value::List(vec![Value::text("0"), Value::List(bulks(out))])
        }
        CollRead::SInter(others) | CollRead::SUnion(others) => {
            // Every key's type is checked before anything is combined.
            let mut sets = vec![obj.is_some().then(|| elems_of(obj, T_SET)).transpose()?];
            for k in others {
                let o = fetch(k)?;
                sets.push(
                    o.is_some()
                        .then(|| elems_of(o.as_ref().map(|(k, d)| (*k, d.as_slice())), T_SET))
                        .transpose()?,
                );
            }
            let out = if matches!(cmd, CollRead::SInter(_)) {
                if sets.iter().any(Option::is_none) {
                    Vec::new()
                } else {
                    let mut it = sets.into_iter().flatten();
                    let first = it.next().unwrap_or_default();
                    let rest: Vec<Vec<Vec<u8>>> = it.collect();
                    first
                        .into_iter()
                        .filter(|m| rest.iter().all(|s| s.contains(m)))
                        .collect()
                }
            } else {
                let mut all: Vec<Vec<u8>> = Vec::new();
                for m in sets.into_iter().flatten().flatten() {
                    if !all.contains(&m) {
                        all.push(m);
                    }
                }
                all
            };
            Value::Set(bulks(out))
        }
    })
}

/// A sorted set's members and scores: `count u32`, then `len u32,
/// member, score (f64 bits, u64)` each, little-endian, in (score, member)
/// order.
fn zset_decode(data: &[u8]) -> Vec<(Vec<u8>, f64)> {
    let mut d = data;
    let n = take_u32(&mut d).unwrap_or(0);
    (0..n)
        .map_while(|_| {
            let m = take(&mut d)?;
            let (score, rest) = d.split_at_checked(8)?;
            d = rest;
            let score = f64::from_bits(u64::from_le_bytes(score.try_into().ok()?));
            Some((m.to_vec(), score))
        })
        .collect()
}

fn zset_encode(z: &[(Vec<u8>, f64)]) -> Vec<u8> {
    let len: usize = z.iter().map(|(m, _)| 12 + m.len()).sum();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(z.len() as u32).to_le_bytes());
    for (m, score) in z {
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
        out.extend_from_slice(&score.to_bits().to_le_bytes());
    }
    out
}

/// Sorts a sorted set into Redis's order: by score, then by member.
fn zset_sort(z: &mut [(Vec<u8>, f64)]) {
    z.sort_by(|a, b| {
        a.1.partial_cmp(&b.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.cmp(&b.0))
    });
}

/// Answers a read of a sorted set.
fn z_read(obj: Option<(u8, &[u8])>, cmd: &ZRead) -> Result<Value, KvError> {
    let z = match obj {
        Some((T_ZSET, data)) => zset_decode(data),
        Some(_) => return Err(KvError::WrongType),
        None => Vec::new(),
    };
    let double = |d: f64| Value::Double(format_double(d));
    Ok(match cmd {
        ZRead::Score(m) => z
            .iter()
            .find(|(k, _)| k == m)
            .map_or(Value::Nil, |(_, s)| double(*s)),
        ZRead::Card => Value::Int(z.len() as i64),
        ZRead::Rank {
            member,
            rev,
            with_score,
        } => match z.iter().position(|(k, _)| k == member) {
            None if *with_score => Value::NilArray,
            None => Value::Nil,
            Some(i) => {
                let rank = if *rev { z.len() - 1 - i } else { i } as i64;
                if *with_score {
                    Value::List(vec![Value::Int(rank), double(z[i].1)])
                } else {
                    Value::Int(rank)
                }
            }
        },
        ZRead::Range {
            by_score,
            start,
            stop,
            rev,
            limit,
            with_scores,
        } => {
            let mut picked: Vec<(Vec<u8>, f64)> = if *by_score {
                // REV takes the bounds as max, min.
                let (lo, hi) = if *rev { (stop, start) } else { (start, stop) };
                let (lo, lo_ex) = crate::command::parse_score_bound(lo)?;
                let (hi, hi_ex) = crate::command::parse_score_bound(hi)?;
                let mut in_range: Vec<_> = z
                    .into_iter()
                    .filter(|(_, s)| {
                        (if lo_ex { *s > lo } else { *s >= lo })
                            && (if hi_ex { *s < hi } else { *s <= hi })
                    })
                    .collect();
                if *rev {
                    in_range.reverse();
                }
                match limit {
                    Some((offset, _)) if *offset < 0 => Vec::new(),
                    Some((offset, count)) => {
                        let it = in_range.into_iter().skip(*offset as usize);
                        if *count < 0 {
                            it.collect()
                        } else {
                            it.take(*count as usize).collect()
                        }
                    }
                    None => in_range,
                }
            } else {
                let a = crate::command::parse_int(start).ok_or(KvError::NotAnInteger)?;
                let b = crate::command::parse_int(stop).ok_or(KvError::NotAnInteger)?;
                let mut all = z;
                if *rev {
                    all.reverse();
                }
                match list_range(all.len(), a, b) {
                    Some((a, b)) => all[a..=b].to_vec(),
                    None => Vec::new(),
                }
            };
            let mut out = Vec::with_capacity(picked.len());
            for (m, s) in picked.drain(..) {
                if *with_scores {
                    // RESP3 pairs them; RESP2 flattens (see `Value::Pairs`).
                    out.push(Value::List(vec![Value::Bulk(m), double(s)]));
                } else {
                    out.push(Value::Bulk(m));
                }
            }
            if *with_scores {
                Value::Pairs(out)
            } else {
                Value::List(out)
            }
        }
        ZRead::Scan(pattern) => {
            let mut flat = Vec::new();
            for (m, s) in z {
                if pattern.as_ref().is_none_or(|p| glob_match(p, &m)) {
                    flat.push(Value::Bulk(m));
                    flat.push(Value::Bulk(format_double(s).into_bytes()));
                }
            }
            Value::List(vec![Value::text("0"), Value::List(flat)])
        }
    })
}

/// The name TYPE gives a kind.
fn kind_name(kind: u8) -> &'static str {
    match kind {
        T_HASH => "hash",
        T_LIST => "list",
        T_SET => "set",
        T_ZSET => "zset",
        _ => "string",
    }
}

/// Answers a read of a hash from the key's live value (`None`: absent).
fn hash_read(obj: Option<(u8, &[u8])>, cmd: &HashRead) -> Result<Value, KvError> {
    let pairs = match obj {
        Some((T_HASH, data)) => hash_decode(data),
        Some(_) => return Err(KvError::WrongType),
        None => Vec::new(),
    };
    let field = |f: &[u8]| pairs.iter().find(|(k, _)| k == f).map(|(_, v)| v.clone());
    Ok(match cmd {
        HashRead::Get(f) => field(f).map_or(Value::Nil, Value::Bulk),
        HashRead::MGet(fs) => Value::Array(fs.iter().map(|f| field(f)).collect()),
        HashRead::GetAll => Value::Map(
            pairs
                .into_iter()
                .map(|(f, v)| (Value::Bulk(f), Value::Bulk(v)))
                .collect(),
        ),
        HashRead::Exists(f) => Value::Int(i64::from(field(f).is_some())),
        HashRead::Len => Value::Int(pairs.len() as i64),
        HashRead::Keys => Value::List(pairs.into_iter().map(|(f, _)| Value::Bulk(f)).collect()),
        HashRead::Vals => Value::List(pairs.into_iter().map(|(_, v)| Value::Bulk(v)).collect()),
        HashRead::StrLen(f) => Value::Int(field(f).map_or(0, |v| v.len() as i64)),
        HashRead::Scan(pattern) => {
            let mut flat = Vec::new();
            for (f, v) in pairs {
                if pattern.as_ref().is_none_or(|p| glob_match(p, &f)) {
                    flat.push(Value::Bulk(f));
                    flat.push(Value::Bulk(v));
                }
            }
            Value::List(vec![Value::text("0"), Value::List(flat)])
        }
    })
}

/// The deletion mark key of user key `key`.
fn tomb_key(key: &[u8]) -> Vec<u8> {
    let mut k = TOMBS.to_vec();
    k.extend_from_slice(&((scan_hash(key) % TOMB_BUCKETS) as u16).to_be_bytes());
    k
}

/// The expiry index key of data key `dk` expiring at `at`.
fn expiry_key(at: u64, dk: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(EXPIRES.len() + 8 + dk.len());
    k.extend_from_slice(EXPIRES);
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(&dk[DATA.len().min(dk.len())..]);
    k
}

/// The data key an expiry index key points at.
fn data_key_of_expiry(ek: &[u8]) -> Vec<u8> {
    let mut k = DATA.to_vec();
    k.extend_from_slice(&ek[(EXPIRES.len() + 8).min(ek.len())..]);
    k
}

/// The layout before SCAN, in sled databases: `d:` + the key.
const OLD_DATA: &[u8] = b"d:";
/// Bytes loaded from a snapshot (or moved from an old database) per
/// transaction.
const LOAD_TXN_BYTES: usize = 32 << 20;
/// The database's page cache: all the memory it holds, whatever the
/// state's size. Only flushes write (off the apply path), so its size
/// no longer stalls batches; each batch still reads the old value of
/// every key it writes, and a cache that holds more of a 100,000-key
/// state saves those reads: 64 MiB against 16 MiB, 3 nodes under 256
/// clients, 36-41k SET/s against 29-37k, 43-48 µs of cluster CPU per
/// SET against 48-59 (`scripts/bench-cluster.sh 5`, two rounds each,
/// interleaved). Pages it evicts stay in the kernel's page cache.
const CACHE_BYTES: usize = 64 << 20;
/// Names the database directory in use.
const CURRENT: &str = "CURRENT";
/// The database file inside a generation's directory.
const DB_FILE: &str = "state.redb";

/// Memory written since the last flush past which the applier asks for
/// an early one.
const FLUSH_EARLY_BYTES: usize = 64 << 20;
/// Memory written since the last flush past which the applier flushes
/// itself before it applies more: a slow disk holds the applier back (and
/// Raft's unapplied-bytes limit the clients), a failing one stops it with
/// the disk's error, rather than memory growing without end.
const FLUSH_HARD_BYTES: usize = 4 * FLUSH_EARLY_BYTES;

/// The key-value state machine.
#[derive(Debug)]
pub struct StateMachine {
    dir: PathBuf,
    /// The latest applied state: its layers and the database they rest
    /// on. Held for writing only to publish a new one; readers clone the
    /// `Arc` and go on.
    state: RwLock<Arc<State>>,
    /// Serializes the publishers of a new state: batches, a flush's freeze
    /// and thaw, a snapshot load's switch.
    applying: Mutex<()>,
    /// One flush at a time (and no snapshot load during one).
    flushing: Mutex<()>,
    /// Told when memory holds more than `flush_early` bytes of writes.
    flush_wanted: tokio::sync::Notify,
    /// `FLUSH_EARLY_BYTES` and `FLUSH_HARD_BYTES` (smaller in tests).
    flush_early: usize,
    flush_hard: usize,
    /// Counts loaded snapshots: a snapshot scan that saw this change wrote
    /// a state that is no longer this node's.
    loads: AtomicU64,
    /// Held while a snapshot is being written (one at a time).
    writing: Mutex<()>,
    applied_tx: watch::Sender<u64>,
    applied_term: AtomicU64,
}

/// One applied state.
#[derive(Clone)]
struct State {
    layers: Layers,
    gen: Arc<Gen>,
}

/// One generation of the database. Closed on a thread of its own when the
/// last user lets go: closing may write and sync, and on a full or hung
/// disk that never returns; it must not block an async runtime thread.
/// A generation a loaded snapshot replaced also has its directory removed
/// then.
struct Gen {
    db: Option<redb::Database>,
    retired: Mutex<Option<PathBuf>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

impl std::fmt::Debug for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gen")
    }
}

impl Gen {
    fn db(&self) -> &redb::Database {
        // Only `drop` takes it out.
        self.db
            .as_ref()
            .expect("the database is open until dropped")
    }
}

impl Drop for Gen {
    fn drop(&mut self) {
        let remove = self
            .retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(db) = self.db.take() {
            let _ = std::thread::Builder::new()
                .name("sm-close".into())
                .spawn(move || {
                    drop(db);
                    if let Some(dir) = remove {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                });
        }
    }
}

/// A view of one applied state: every read through it sees the same
/// batches, while later batches go on committing. Get one with
/// [`StateMachine::read_view`]. Keys whose expiry time the state's clock
/// has passed are invisible through it.
pub struct ReadView {
    state: Arc<State>,
    /// The state's clock, read the first time a key with an expiry time
    /// is met (most reads never need it).
    clock: std::cell::OnceCell<u64>,
}

impl std::fmt::Debug for ReadView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadView")
    }
}

impl ReadView {
    fn new(state: Arc<State>) -> ReadView {
        ReadView {
            state,
            clock: std::cell::OnceCell::new(),
        }
    }

    /// The state's clock.
    fn now(&self) -> u64 {
        *self
            .clock
            .get_or_init(|| meta(&self.state.layers, CLOCK).unwrap_or(0))
    }

    /// Whether a stored value is live (its expiry, if any, not reached).
    fn live(&self, v: &[u8]) -> bool {
        let st = Stored::decode(v);
        st.expires.is_none() || !st.expired(self.now())
    }

    fn t(&self) -> &Layers {
        &self.state.layers
    }

    /// A live key's stored value, undecoded.
    fn raw(&self, key: &[u8]) -> Result<Option<Val>, KvError> {
        Ok(self
            .t()
            .get(dkey(key).as_slice())?
            .filter(|v| self.live(v.value())))
    }

    /// A live string key's stored value (`WrongType` for another type).
    fn raw_str(&self, key: &[u8]) -> Result<Option<Val>, KvError> {
        match self.raw(key)? {
            Some(v) if Stored::decode(v.value()).kind != T_STRING => Err(KvError::WrongType),
            v => Ok(v),
        }
    }

    /// The value of a string key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self
            .raw_str(key)?
            .map(|v| Stored::decode(v.value()).data.to_vec()))
    }

    /// Whether a key exists.
    pub fn exists(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.raw(key)?.is_some())
    }

    /// The number of keys (as in Redis, expired keys not yet removed count).
    pub fn dbsize(&self) -> Result<u64, KvError> {
        meta(self.t(), COUNT)
    }

    /// The state's clock (milliseconds since the Unix epoch).
    pub fn clock(&self) -> u64 {
        self.now()
    }

    /// Answers a read from this view.
    pub fn read(&self, cmd: &ReadCmd) -> Reply {
        self.read_limited(cmd, usize::MAX)
    }

    /// Answers a read whose reply may hold at most `limit` bytes of values:
    /// past it, `ReplyTooLarge`, found before the values are gathered.
    pub fn read_limited(&self, cmd: &ReadCmd, limit: usize) -> Reply {
        let too_large = || KvError::ReplyTooLarge { limit };
        let t = self.t();
        let live = |v: &[u8]| self.live(v);
        Ok(match cmd {
            ReadCmd::Get(k) => match self.raw_str(k)? {
                Some(v) if Stored::decode(v.value()).data.len() > limit => return Err(too_large()),
                v => v.map_or(Value::Nil, |v| {
                    Value::Bulk(Stored::decode(v.value()).data.to_vec())
                }),
            },
            ReadCmd::MGet(keys) => {
                // Sizes first (the values stay in the page cache): the
                // reply's memory is never spent on a reply that would be
                // refused.
                let mut values = Vec::with_capacity(keys.len());
                let mut total = 0usize;
                for k in keys {
                    // As Redis: a key of another type reads as nil here.
                    let v = self
                        .raw(k)?
                        .filter(|v| Stored::decode(v.value()).kind == T_STRING);
                    total = total.saturating_add(v.as_ref().map_or(5, |v| v.value().len() + 16));
                    if total > limit {
                        return Err(too_large());
                    }
                    values.push(v);
                }
                Value::Array(
                    values
                        .into_iter()
                        .map(|v| v.map(|v| Stored::decode(v.value()).data.to_vec()))
                        .collect(),
                )
            }
            ReadCmd::Exists(keys) => {
                let mut n = 0;
                for k in keys {
                    if self.exists(k)? {
                        n += 1;
                    }
                }
                Value::Int(n)
            }
            ReadCmd::StrLen(k) => Value::Int(
                self.raw_str(k)?
                    .map_or(0, |v| Stored::decode(v.value()).data.len() as i64),
            ),
            ReadCmd::DbSize => Value::Int(self.dbsize()? as i64),
            ReadCmd::GetRange(k, start, end) => {
                Value::Bulk(get_range(&self.get(k)?.unwrap_or_default(), *start, *end))
            }
            ReadCmd::Type(k) => type_of(self.raw(k)?.map(|v| Stored::decode(v.value()).kind)),
            ReadCmd::Hash(k, _) | ReadCmd::Z(k, _) | ReadCmd::Coll(k, _) => {
                let v = self.raw(k)?;
                let obj = v.as_ref().map(|v| {
                    let st = Stored::decode(v.value());
                    (st.kind, st.data)
                });
                if obj.is_some_and(|(_, d)| d.len() > limit) {
                    return Err(too_large());
                }
                match cmd {
                    ReadCmd::Hash(_, h) => hash_read(obj, h)?,
                    ReadCmd::Z(_, z) => z_read(obj, z)?,
                    ReadCmd::Coll(_, c) => coll_read(obj, c, |other| {
                        Ok(self.raw(other)?.map(|v| {
                            let st = Stored::decode(v.value());
                            (st.kind, st.data.to_vec())
                        }))
                    })?,
                    _ => return Err(KvError::Internal("not a collection read".into())),
                }
            }
            ReadCmd::Ttl { key, ms, absolute } => ttl_reply(
                self.raw(key)?.map(|v| Stored::decode(v.value()).expires),
                self.now(),
                *ms,
                *absolute,
            ),
            ReadCmd::Keys(pattern) => {
                let mut out = Vec::new();
                let mut total = 0usize;
                for kv in t.range(DATA, DATA_END)? {
                    let (k, v) = kv?;
                    let key = user_key(k.value());
                    if glob_match(pattern, key) && live(v.value()) {
                        total = total.saturating_add(key.len() + 16);
                        if total > limit {
                            return Err(too_large());
                        }
                        out.push(Value::Bulk(key.to_vec()));
                    }
                }
                Value::List(out)
            }
            ReadCmd::Scan {
                cursor,
                pattern,
                count,
                kind,
            } => {
                let mut start = DATA.to_vec();
                start.extend_from_slice(&cursor.to_be_bytes());
                let mut keys = Vec::new();
                let mut last_hash = None;
                let mut next = 0u64;
                for (seen, kv) in t.range(start.as_slice(), DATA_END)?.enumerate() {
                    let (k, v) = kv?;
                    let k = k.value();
                    if k.len() < DATA_HEAD {
                        continue;
                    }
                    let mut hb = [0u8; 8];
                    hb.copy_from_slice(&k[DATA.len()..DATA_HEAD]);
                    let h = u64::from_be_bytes(hb);
                    // Keys of one hash go out together: the cursor cannot
                    // point between them.
                    if seen >= *count && last_hash != Some(h) {
                        next = h;
                        break;
                    }
                    last_hash = Some(h);
                    let key = user_key(k);
                    let st = Stored::decode(v.value());
                    if kind
                        .as_ref()
                        .is_none_or(|t| t.as_slice() == kind_name(st.kind).as_bytes())
                        && pattern.as_ref().is_none_or(|p| glob_match(p, key))
                        && live(v.value())
                    {
                        keys.push(Value::Bulk(key.to_vec()));
                    }
                }
                Value::List(vec![Value::text(next.to_string()), Value::List(keys)])
            }
            ReadCmd::RandomKey => {
                // From a random point, the first live key (expired ones not
                // yet removed are stepped over, a bounded number of them).
                let mut start = DATA.to_vec();
                start.extend_from_slice(&fastrand::u64(..).to_be_bytes());
                let from_point = t.range(start.as_slice(), DATA_END)?;
                let from_start = t.range(DATA, DATA_END)?;
                let mut pick = None;
                for kv in from_point.chain(from_start).take(10_000) {
                    let (k, v) = kv?;
                    if live(v.value()) {
                        pick = Some(user_key(k.value()).to_vec());
                        break;
                    }
                }
                pick.map_or(Value::Nil, Value::Bulk)
            }
        })
    }

    /// The index of the last entry this view covers.
    pub fn applied(&self) -> Result<u64, KvError> {
        meta(self.t(), APPLIED)
    }

    /// Up to `max` keys whose expiry time is at or before `now` (the
    /// reaper's candidates), oldest first.
    pub fn expired_keys(&self, now: u64, max: usize) -> Result<Vec<Vec<u8>>, KvError> {
        let mut end = EXPIRES.to_vec();
        end.extend_from_slice(&now.saturating_add(1).to_be_bytes());
        let mut out = Vec::new();
        for kv in self.t().range(EXPIRES, end.as_slice())?.take(max) {
            let (k, _) = kv?;
            out.push(user_key(&data_key_of_expiry(k.value())).to_vec());
        }
        Ok(out)
    }

    /// Whether any key has an expiry time.
    pub fn has_expiring_keys(&self) -> Result<bool, KvError> {
        Ok(self.t().range(EXPIRES, EXPIRES_END)?.next().is_some())
    }
}

/// TTL, PTTL, EXPIRETIME or PEXPIRETIME of a key (`None`: absent;
/// `Some(None)`: no expiry), as Redis answers them.
fn ttl_reply(expires: Option<Option<u64>>, now: u64, ms: bool, absolute: bool) -> Value {
    Value::Int(match expires {
        None => -2,
        Some(None) => -1,
        Some(Some(at)) => {
            let v = if absolute {
                at as i64
            } else {
                at.saturating_sub(now) as i64
            };
            if ms {
                v
            } else if absolute {
                v / 1000
            } else {
                (v + 500) / 1000
            }
        }
    })
}

/// The user key inside a data key.
fn user_key(dk: &[u8]) -> &[u8] {
    &dk[DATA_HEAD.min(dk.len())..]
}

fn dkey(k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DATA_HEAD + k.len());
    v.extend_from_slice(DATA);
    v.extend_from_slice(&scan_hash(k).to_be_bytes());
    v.extend_from_slice(k);
    v
}

fn u64_of(v: Option<&[u8]>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

/// A metadata number (0 when absent).
fn meta(t: &Layers, key: &[u8]) -> Result<u64, KvError> {
    Ok(u64_of(t.get(key)?.as_ref().map(|v| v.value())))
}

/// A metadata number in a table of the database itself (0 when absent).
fn table_meta(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<u64, KvError> {
    Ok(u64_of(t.get(key)?.as_ref().map(|v| v.value())))
}

fn storage(path: &Path, what: &str, e: impl std::fmt::Display) -> KvError {
    KvError::Storage(format!("{}: {what}: {e}", path.display()))
}

/// Opens (or creates) a generation's database with the state machine's
/// settings, and makes sure its table exists.
fn open_db(dir: &Path) -> Result<redb::Database, KvError> {
    std::fs::create_dir_all(dir).map_err(|e| storage(dir, "cannot create", e))?;
    let path = dir.join(DB_FILE);
    // A handle closed just before (on its own thread, see `Gen`) may still
    // hold the file's lock for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let db = loop {
        // redb may panic on a file altered behind its back rather than
        // return an error: either way the file is damaged, and the caller
        // sets it aside.
        let opened = std::panic::catch_unwind(|| {
            redb::Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
        });
        match opened {
            Ok(Ok(db)) => break db,
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen))
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(Err(e)) => return Err(storage(&path, "cannot open the state machine", e)),
            Err(_) => {
                return Err(storage(
                    &path,
                    "cannot open the state machine",
                    "the file is damaged",
                ))
            }
        }
    };
    let txn = db.begin_write()?;
    txn.open_table(KV)?;
    txn.commit()?;
    Ok(db)
}

/// The hash that orders keys for SCAN: FNV-1a (64 bits; fixed, so every
/// node and every version orders keys alike), never 0 (cursor 0 means
/// "start" and "done").
pub fn scan_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1
}

/// Writes `data` to `path` durably and atomically (temporary file, fsync,
/// rename, fsync of the directory).
pub(crate) fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What writing a snapshot produced.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotInfo {
    /// The file's header.
    pub header: snapfile::Header,
    /// The file's size in bytes.
    pub bytes: u64,
}

/// Fills a new database from `(data key, stored value)` records (adding
/// the expiry index), a transaction per `LOAD_TXN_BYTES`, none of them
/// durable (see [`finish_load`]); returns the number of keys.
fn bulk_load(
    db: &redb::Database,
    file: &Path,
    mut next: impl FnMut() -> Result<Option<(Vec<u8>, Vec<u8>)>, KvError>,
) -> Result<u64, KvError> {
    // What redb wrote out is synced as the load goes (see
    // `snapfile::SyncingFile`), not all by the last commit.
    let own = std::fs::File::open(file).map_err(|e| storage(file, "cannot open", e))?;
    let mut keys = 0u64;
    let mut done = false;
    while !done {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let mut bytes = 0usize;
        {
            let mut t = txn.open_table(KV)?;
            while bytes < LOAD_TXN_BYTES {
                let Some((k, v)) = next()? else {
                    done = true;
                    break;
                };
                bytes += k.len() + v.len();
                let old = t
                    .insert(k.as_slice(), v.as_slice())?
                    .map(|o| Stored::decode(o.value()).expires);
                match old {
                    None => keys += 1,
                    Some(Some(at)) => {
                        t.remove(expiry_key(at, &k).as_slice())?;
                    }
                    Some(None) => {}
                }
                if let Some(at) = Stored::decode(&v).expires {
                    t.insert(expiry_key(at, &k).as_slice(), [].as_slice())?;
                }
            }
        }
        txn.commit()?;
        own.sync_data()
            .map_err(|e| storage(file, "cannot sync", e))?;
    }
    Ok(keys)
}

/// Writes a loaded database's metadata in a last transaction, which makes
/// the whole load durable.
fn finish_load(db: &redb::Database, meta: &[(&[u8], u64)]) -> Result<(), KvError> {
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(KV)?;
        for (k, v) in meta {
            t.insert(*k, v.to_be_bytes().as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Moves a database whose values are plain strings (written before values
/// carried a tag) to the tagged format, a batch at a time; a new one is
/// just marked. A crash in between leaves the mark unset and the next open
/// goes on: a value already tagged is never tagged twice, because the
/// batches walk the keys in order and the last key done is recorded.
fn tag_values(db: &redb::Database) -> Result<(), KvError> {
    const PROGRESS: &[u8] = b"m:format_progress";
    loop {
        let txn = db.begin_write()?;
        let done = {
            let mut t = txn.open_table(KV)?;
            if table_meta(&t, FORMAT)? >= VALUE_FORMAT {
                return Ok(());
            }
            let from: Vec<u8> = t
                .get(PROGRESS)?
                .map_or_else(|| DATA.to_vec(), |v| v.value().to_vec());
            let mut batch = Vec::new();
            for kv in t.range(from.as_slice()..DATA_END)? {
                let (k, v) = kv?;
                if k.value() == from.as_slice() && from.as_slice() != DATA {
                    continue;
                }
                batch.push((k.value().to_vec(), encode_value(None, 0, v.value())));
                if batch.len() == 4096 {
                    break;
                }
            }
            for (k, v) in &batch {
                t.insert(k.as_slice(), v.as_slice())?;
            }
            match batch.last() {
                Some((k, _)) => {
                    t.insert(PROGRESS, k.as_slice())?;
                    false
                }
                None => {
                    t.remove(PROGRESS)?;
                    t.insert(FORMAT, VALUE_FORMAT.to_be_bytes().as_slice())?;
                    true
                }
            }
        };
        txn.commit()?;
        if done {
            return Ok(());
        }
    }
}

/// The generation number in a `gen-N` name.
fn gen_number(name: &str) -> u64 {
    name.strip_prefix("gen-")
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Moves a sled database from before the redb engine (in either key
/// layout) into a new generation, and names it in `CURRENT`. The old
/// directory is removed after the switch; a crash before it leaves the old
/// one in use, and the next open moves it again.
fn migrate_from_sled(dir: &Path, old: &str) -> Result<String, KvError> {
    let old_path = dir.join(old);
    let new = format!("gen-{}", gen_number(old) + 1);
    let new_path = dir.join(&new);
    let _ = std::fs::remove_dir_all(&new_path);
    tracing::info!(from = %old_path.display(), to = %new_path.display(), "moving the state machine from sled to redb");
    let moved = (|| -> Result<(), KvError> {
        let sled_db = sled::Config::new()
            .path(&old_path)
            .cache_capacity(64 << 20)
            .open()
            .map_err(|e| storage(&old_path, "cannot open the old state machine", e))?;
        let (mut applied, mut term) = (0u64, 0u64);
        let sled_err = |e: sled::Error| storage(&old_path, "cannot read the old state machine", e);
        let mut it = sled_db.iter();
        let db = open_db(&new_path)?;
        let keys = bulk_load(&db, &new_path.join(DB_FILE), || loop {
            let Some(kv) = it.next() else {
                return Ok(None);
            };
            let (k, v) = kv.map_err(sled_err)?;
            let num = || u64_of(Some(v.as_ref()));
            if k.as_ref() == APPLIED {
                applied = num();
            } else if k.as_ref() == APPLIED_TERM {
                term = num();
            } else if let Some(user) = k.strip_prefix(OLD_DATA) {
                return Ok(Some((dkey(user), encode_value(None, 0, &v))));
            } else if k.starts_with(DATA) {
                return Ok(Some((k.to_vec(), encode_value(None, 0, &v))));
            }
        })?;
        finish_load(
            &db,
            &[
                (COUNT, keys),
                (APPLIED, applied),
                (APPLIED_TERM, term),
                (FORMAT, VALUE_FORMAT),
            ],
        )
    })();
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&new_path);
        return Err(e);
    }
    replace_file(&dir.join(CURRENT), new.as_bytes())
        .map_err(|e| storage(dir, "cannot switch to the moved state machine", e))?;
    let _ = std::fs::remove_dir_all(&old_path);
    Ok(new)
}

impl StateMachine {
    /// Opens (or creates) the state machine in directory `dir`: the
    /// database named by `dir/CURRENT`. Leftovers of a snapshot load that
    /// did not finish are removed; a database from before the redb engine
    /// is moved to it.
    pub fn open(dir: &Path) -> Result<Self, KvError> {
        std::fs::create_dir_all(dir).map_err(|e| storage(dir, "cannot create", e))?;
        let current = dir.join(CURRENT);
        let mut gen = match std::fs::read_to_string(&current) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                replace_file(&current, b"gen-0").map_err(|e| storage(dir, "cannot write", e))?;
                "gen-0".to_string()
            }
            Err(e) => return Err(storage(&current, "cannot read", e)),
        };
        if !gen.starts_with("gen-") || gen.contains(['/', '\\']) || gen.contains("..") {
            return Err(KvError::Storage(format!(
                "{}: names {gen:?}, not a state machine database",
                current.display()
            )));
        }
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("gen-") && name != gen {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let gen_path = dir.join(&gen);
        if !gen_path.join(DB_FILE).exists() && gen_path.join("conf").exists() {
            gen = migrate_from_sled(dir, &gen)?;
        }
        let db = open_db(&dir.join(&gen))?;
        tag_values(&db)?;
        let base = Arc::new(db.begin_read()?.open_table(KV)?);
        let (applied, term) = (
            table_meta(&*base, APPLIED)?,
            table_meta(&*base, APPLIED_TERM)?,
        );
        let (applied_tx, _) = watch::channel(applied);
        Ok(StateMachine {
            dir: dir.to_path_buf(),
            state: RwLock::new(Arc::new(State {
                layers: Layers::on(base),
                gen: Arc::new(Gen {
                    db: Some(db),
                    retired: Mutex::new(None),
                }),
            })),
            applying: Mutex::new(()),
            flushing: Mutex::new(()),
            flush_wanted: tokio::sync::Notify::new(),
            flush_early: FLUSH_EARLY_BYTES,
            flush_hard: FLUSH_HARD_BYTES,
            loads: AtomicU64::new(0),
            writing: Mutex::new(()),
            applied_tx,
            applied_term: AtomicU64::new(term),
        })
    }

    /// The latest applied state.
    fn state(&self) -> Arc<State> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `next` the latest applied state (with `applying` held).
    fn publish(&self, next: State) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
    }

    /// Waits until memory holds enough writes that a flush should not wait
    /// for its usual time.
    pub async fn flush_wanted(&self) {
        self.flush_wanted.notified().await
    }

    /// The index of the last applied entry.
    pub fn applied(&self) -> u64 {
        *self.applied_tx.borrow()
    }

    /// The term of the last applied entry (0 when unknown).
    pub fn applied_term(&self) -> u64 {
        self.applied_term.load(Ordering::Acquire)
    }

    /// A receiver of the applied index (to wait for a read index).
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Applies the entry at `index`: a write, or `None` for Raft's own entries.
    pub fn apply(&self, index: u64, cmd: Option<&WriteCmd>) -> Result<Reply, KvError> {
        let mut out = self.apply_many(&[(index, cmd)])?;
        Ok(out.pop().unwrap_or(Ok(Value::Ok)))
    }

    /// [`StateMachine::apply_many`] without knowing the entries' term.
    pub fn apply_many(&self, entries: &[(u64, Option<&WriteCmd>)]) -> Result<Vec<Reply>, KvError> {
        self.apply_many_in_term(entries, None)
    }

    /// [`StateMachine::apply_entries`] for entries that carry no time.
    pub fn apply_many_in_term(
        &self,
        entries: &[(u64, Option<&WriteCmd>)],
        last_term: Option<u64>,
    ) -> Result<Vec<Reply>, KvError> {
        let timed: Vec<(u64, Option<u64>, Option<&WriteCmd>)> =
            entries.iter().map(|&(i, c)| (i, None, c)).collect();
        self.apply_entries(&timed, last_term)
    }

    /// The next [`StateMachine::apply_entries`] must first write memory
    /// to disk (the flushes have fallen far behind), so it will block for
    /// long.
    pub fn apply_must_flush(&self) -> bool {
        self.state().layers.active_bytes > self.flush_hard
    }

    /// Applies consecutive entries (index, the leader's time if the entry
    /// carries one, the write or `None` for Raft's own entries) as one
    /// transaction that also records the last index (and `last_term`, the
    /// last entry's term) and the clock. Entries at or below the applied
    /// index are skipped (never applied twice) and answered with an error
    /// outcome. There is one applier (the node's apply loop); read views
    /// see the batch entirely or not at all.
    ///
    /// The clock is the latest time any applied entry carried: each entry
    /// runs at `max(clock, its time)`, so time never goes back, whatever the
    /// clocks of successive leaders say.
    pub fn apply_entries(
        &self,
        entries: &[(u64, Option<u64>, Option<&WriteCmd>)],
        last_term: Option<u64>,
    ) -> Result<Vec<Reply>, KvError> {
        if self.apply_must_flush() {
            // The only applier: nothing adds to memory meanwhile.
            self.flush()?;
        }
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        let applied = self.applied();
        if entries.iter().all(|&(i, _, _)| i <= applied) {
            return Ok(entries
                .iter()
                .map(|_| Err(KvError::AlreadyApplied))
                .collect());
        }
        let mut next = State::clone(&self.state());
        let mut last = applied;
        let mut outcomes = Vec::with_capacity(entries.len());
        {
            let t = &mut next.layers;
            let count = meta(t, COUNT)?;
            let clock = meta(t, CLOCK)?;
            let mut st = Staged {
                t,
                count,
                now: clock,
                index: applied,
            };
            for &(index, at, cmd) in entries {
                if index <= last {
                    outcomes.push(Err(KvError::AlreadyApplied));
                    continue;
                }
                last = index;
                st.index = index;
                st.now = st.now.max(at.unwrap_or(0));
                outcomes.push(match cmd {
                    None => Ok(Value::Ok),
                    Some(cmd) => st.stage(cmd)?,
                });
            }
            let (count_now, clock_now) = (st.count, st.now);
            let t = st.t;
            if count_now != count {
                t.insert(COUNT, count_now.to_be_bytes().as_slice())?;
            }
            if clock_now != clock {
                t.insert(CLOCK, clock_now.to_be_bytes().as_slice())?;
            }
            t.insert(APPLIED, last.to_be_bytes().as_slice())?;
            if let Some(term) = last_term {
                t.insert(APPLIED_TERM, term.to_be_bytes().as_slice())?;
            }
        }
        let early = next.layers.active_bytes > self.flush_early && next.layers.frozen.is_none();
        self.publish(next);
        if early {
            self.flush_wanted.notify_one();
        }
        if let Some(t) = last_term {
            self.applied_term.store(t, Ordering::Release);
        }
        self.applied_tx.send_replace(last);
        Ok(outcomes)
    }

    /// Runs `f` on a view of one applied state: all the keys a command
    /// reads (MGET, multi-key EXISTS, DBSIZE) come from the same batches.
    /// Batches go on being applied meanwhile; a view that lives long keeps
    /// the memory and the database pages it sees, so keep it short.
    pub fn read_view<T>(&self, f: impl FnOnce(&ReadView) -> T) -> T {
        f(&ReadView::new(self.state()))
    }

    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read_view(|v| v.get(key))
    }

    /// The number of keys.
    pub fn dbsize(&self) -> Result<u64, KvError> {
        self.read_view(|v| v.dbsize())
    }

    /// Makes everything applied so far durable (every few seconds, so the log
    /// can drop what it covers; sooner when memory holds much; and on
    /// shutdown): the writes in memory go to the database in one
    /// transaction while batches go on landing in memory beside them.
    pub fn flush(&self) -> Result<(), KvError> {
        let _flushing = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        let (frozen, gen) = {
            let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
            let mut next = State::clone(&self.state());
            // A frozen layer left by a flush that panicked goes back first.
            next.layers.thaw_unwritten();
            // Every flush commits durably: with nothing in memory, nothing
            // is waiting.
            let Some(frozen) = next.layers.freeze() else {
                return Ok(());
            };
            let gen = next.gen.clone();
            self.publish(next);
            (frozen, gen)
        };
        let written = (|| -> Result<Arc<ReadTable>, KvError> {
            let mut txn = gen.db().begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.set_quick_repair(true);
            {
                let mut t = txn.open_table(KV)?;
                Layers::write_to(&frozen, &mut t)?;
            }
            txn.commit()?;
            Ok(Arc::new(gen.db().begin_read()?.open_table(KV)?))
        })();
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = State::clone(&self.state());
        match written {
            Ok(base) => {
                next.layers.settle(base);
                self.publish(next);
                Ok(())
            }
            Err(e) => {
                // The next flush tries again.
                next.layers.thaw_unwritten();
                self.publish(next);
                Err(e)
            }
        }
    }

    /// Writes a snapshot of the state as it is now (the applied index when
    /// this is called) to `out`, durably, while batches keep being applied
    /// (blocking: call it off the async threads). Only one at a time.
    pub fn write_snapshot(&self, out: &Path) -> Result<SnapshotInfo, KvError> {
        let Ok(_writing) = self.writing.try_lock() else {
            return Err(KvError::Internal(
                "a snapshot is already being written".into(),
            ));
        };
        let loads = self.loads.load(Ordering::Acquire);
        let state = self.state();
        let t = &state.layers;
        let header = snapfile::Header {
            index: meta(t, APPLIED)?,
            term: meta(t, APPLIED_TERM)?,
            keys: meta(t, COUNT)?,
            clock: meta(t, CLOCK)?,
        };
        let mut meta = Vec::new();
        for kv in t.range(TOMBS, TOMBS_END)? {
            let (k, v) = kv?;
            meta.push((k.value().to_vec(), v.value().to_vec()));
        }
        let mut res = scan_into(t, header, &meta, out);
        drop(state);
        if res.is_ok() && self.loads.load(Ordering::Acquire) != loads {
            res = Err(KvError::Internal(
                "a snapshot from the leader replaced the state while this one was written".into(),
            ));
        }
        if res.is_err() {
            let _ = std::fs::remove_file(out);
        }
        res
    }

    /// Replaces the whole state with the snapshot in `file` (blocking). The
    /// file is checked as it is read; the new database is built beside the
    /// current one and takes its place with one atomic rename of `CURRENT`.
    pub fn load_snapshot(&self, file: &Path) -> Result<snapfile::Header, KvError> {
        let bad = |e: snapfile::SnapError| storage(file, "cannot load the snapshot", e);
        let f = std::fs::File::open(file).map_err(|e| bad(e.into()))?;
        let mut r =
            snapfile::Reader::new(std::io::BufReader::with_capacity(1 << 20, f)).map_err(bad)?;
        let n = std::fs::read_to_string(self.dir.join(CURRENT))
            .map(|s| gen_number(s.trim()))
            .unwrap_or(0);
        let gen = format!("gen-{}", n + 1);
        let path = self.dir.join(&gen);
        let _ = std::fs::remove_dir_all(&path);
        let built = (|| -> Result<(redb::Database, snapfile::Header), KvError> {
            let db = open_db(&path)?;
            // Version 1 held plain strings; version 2 stored values.
            let tagged = r.version() >= 2;
            let keys = bulk_load(&db, &path.join(DB_FILE), || {
                Ok(r.next_record().map_err(bad)?.map(|(k, v)| {
                    let v = if tagged { v } else { encode_value(None, 0, &v) };
                    (dkey(&k), v)
                }))
            })?;
            let h = r.header();
            if keys != h.keys {
                return Err(storage(
                    file,
                    "cannot load the snapshot",
                    format!("it holds {keys} keys, its header says {}", h.keys),
                ));
            }
            // The deletion marks (checked: nothing else goes in this way).
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(KV)?;
                for (k, v) in r.meta() {
                    if !k.starts_with(TOMBS) || k.len() != TOMBS.len() + 2 || v.len() != 8 {
                        return Err(storage(
                            file,
                            "cannot load the snapshot",
                            "a bad meta record",
                        ));
                    }
                    t.insert(k.as_slice(), v.as_slice())?;
                }
            }
            txn.commit()?;
            finish_load(
                &db,
                &[
                    (COUNT, keys),
                    (APPLIED, h.index),
                    (APPLIED_TERM, h.term),
                    (CLOCK, h.clock),
                    (FORMAT, VALUE_FORMAT),
                ],
            )?;
            let h = r.header();
            Ok((db, h))
        })();
        let (db, h) = match built {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                return Err(e);
            }
        };
        let base = match (|| -> Result<_, KvError> { Ok(db.begin_read()?.open_table(KV)?) })() {
            Ok(t) => Arc::new(t),
            Err(e) => {
                drop(db);
                let _ = std::fs::remove_dir_all(&path);
                return Err(e);
            }
        };
        let _flushing = self.flushing.lock().unwrap_or_else(PoisonError::into_inner);
        let _applying = self.applying.lock().unwrap_or_else(PoisonError::into_inner);
        replace_file(&self.dir.join(CURRENT), gen.as_bytes())
            .map_err(|e| storage(&self.dir, "cannot switch to the loaded snapshot", e))?;
        let old = {
            let mut cur = self.state.write().unwrap_or_else(PoisonError::into_inner);
            self.loads.fetch_add(1, Ordering::AcqRel);
            let old = std::mem::replace(
                &mut *cur,
                Arc::new(State {
                    layers: Layers::on(base),
                    gen: Arc::new(Gen {
                        db: Some(db),
                        retired: Mutex::new(None),
                    }),
                }),
            );
            *old.gen
                .retired
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(self.dir.join(format!("gen-{n}")));
            self.applied_term.store(h.term, Ordering::Release);
            self.applied_tx.send_replace(h.index);
            old
        };
        drop(old);
        Ok(h)
    }
}

/// Writes the data keys of one read transaction to a snapshot file.
fn scan_into(
    t: &Layers,
    header: snapfile::Header,
    meta: &[snapfile::Record],
    out: &Path,
) -> Result<SnapshotInfo, KvError> {
    let io = |e: std::io::Error| storage(out, "cannot write the snapshot", e);
    let f = snapfile::SyncingFile::new(std::fs::File::create(out).map_err(io)?);
    let mut w =
        snapfile::Writer::with_meta(std::io::BufWriter::with_capacity(1 << 20, f), header, meta)
            .map_err(io)?;
    let mut written = 0u64;
    for kv in t.range(DATA, DATA_END)? {
        let (k, v) = kv?;
        w.record(user_key(k.value()), v.value()).map_err(io)?;
        written += 1;
    }
    if written != header.keys {
        return Err(KvError::Internal(format!(
            "snapshot at {} holds {written} keys, the state {}",
            header.index, header.keys
        )));
    }
    let (bw, bytes) = w.finish().map_err(io)?;
    let f = bw
        .into_inner()
        .map_err(|e| io(e.into_error()))?
        .into_inner();
    f.sync_all().map_err(io)?;
    Ok(SnapshotInfo { header, bytes })
}

/// INCRBYFLOAT's (and HINCRBYFLOAT's) sum, as text: `old` (absent: 0)
/// plus the increment as sent.
fn add_float(old: Option<&[u8]>, by_text: &[u8]) -> Result<String, KvError> {
    let by = crate::command::parse_float(by_text).map_err(|_| KvError::NotAFloat)?;
    let n = match old {
        None => 0.0,
        Some(v) => crate::command::parse_float(v)?,
    };
    let new = n + by;
    if !new.is_finite() {
        return Err(KvError::FloatOverflow);
    }
    // Whole numbers add exactly, as in Redis's 80-bit long doubles (f64
    // would round past 2^53).
    let int = |b: &[u8]| crate::command::parse_int(b).map(i128::from);
    let exact = match (old, int(by_text)) {
        (None, Some(b)) => Some(b),
        (Some(a), Some(b)) => int(a).map(|a| a + b),
        _ => None,
    }
    .filter(|s| s.unsigned_abs() <= 1u128 << 64);
    Ok(match exact {
        Some(s) => s.to_string(),
        None => crate::command::format_float(new),
    })
}

/// A command's result as `stage` gives it: storage failures (the batch
/// cannot go on) outside, the command's own errors inside.
fn outcome(r: Result<Value, KvError>) -> Result<Reply, KvError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e @ (KvError::Storage(_) | KvError::Internal(_))) => Err(e),
        Err(e) => Ok(Err(e)),
    }
}

/// A hash's fields and values.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// A live key of any type.
struct Obj {
    kind: u8,
    expires: Option<u64>,
    data: Vec<u8>,
}

/// A live key: its expiry time (if any) and its value.
type Live = (Option<u64>, Vec<u8>);

/// The batch being applied: reads see its earlier writes. Keys whose
/// expiry time `now` has passed count as absent (and are replaced or
/// removed by whatever writes them).
struct Staged<'a> {
    t: &'a mut Layers,
    count: u64,
    /// The clock for the entry being applied.
    now: u64,
    /// The index of the entry being applied (a written key's version).
    index: u64,
}

impl Staged<'_> {
    /// A live key of any type. An expired key met here is removed, as
    /// Redis removes one a command touches (every node applies the same
    /// entries at the same clock, so all do alike).
    fn any(&mut self, key: &[u8]) -> Result<Option<Obj>, KvError> {
        let found = self.t.get(dkey(key).as_slice())?.map(|v| {
            let st = Stored::decode(v.value());
            (
                st.expired(self.now),
                Obj {
                    kind: st.kind,
                    expires: st.expires,
                    data: st.data.to_vec(),
                },
            )
        });
        match found {
            Some((true, _)) => {
                self.delete(key)?;
                Ok(None)
            }
            Some((false, o)) => Ok(Some(o)),
            None => Ok(None),
        }
    }

    /// A live string key's expiry (`None`: none) and value; `WrongType`
    /// for a key of another type.
    fn entry(&mut self, key: &[u8]) -> Result<Option<Live>, KvError> {
        match self.any(key)? {
            Some(o) if o.kind != T_STRING => Err(KvError::WrongType),
            Some(o) => Ok(Some((o.expires, o.data))),
            None => Ok(None),
        }
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.entry(key)?.map(|(_, v)| v))
    }

    fn exists(&mut self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.any(key)?.is_some())
    }

    /// A live hash's fields and its expiry; `WrongType` for another type.
    fn hash(&mut self, key: &[u8]) -> Result<(Fields, Option<u64>), KvError> {
        match self.any(key)? {
            Some(o) if o.kind != T_HASH => Err(KvError::WrongType),
            Some(o) => Ok((hash_decode(&o.data), o.expires)),
            None => Ok((Vec::new(), None)),
        }
    }

    /// A live list's or set's elements and its expiry; `WrongType` for
    /// another type.
    fn coll(&mut self, key: &[u8], kind: u8) -> Result<(Vec<Vec<u8>>, Option<u64>), KvError> {
        let o = self.any(key)?;
        let elems = elems_of(o.as_ref().map(|o| (o.kind, o.data.as_slice())), kind)?;
        Ok((elems, o.and_then(|o| o.expires)))
    }

    /// Writes a list or set back (keeping `expires`); an empty one is
    /// removed.
    fn put_coll(
        &mut self,
        key: &[u8],
        kind: u8,
        elems: &[Vec<u8>],
        expires: Option<u64>,
    ) -> Result<(), KvError> {
        if elems.is_empty() {
            self.delete(key)?;
            Ok(())
        } else {
            self.put_obj(key, kind, &elems_encode(elems), expires)
        }
    }

    /// Writes a hash back (keeping `expires`); an empty one is removed.
    fn put_hash(
        &mut self,
        key: &[u8],
        pairs: &[(Vec<u8>, Vec<u8>)],
        expires: Option<u64>,
    ) -> Result<(), KvError> {
        if pairs.is_empty() {
            self.delete(key)?;
            Ok(())
        } else {
            self.put_obj(key, T_HASH, &hash_encode(pairs), expires)
        }
    }

    /// Writes a string key with an expiry time (`None`: none).
    fn put_with(&mut self, key: &[u8], value: &[u8], expires: Option<u64>) -> Result<(), KvError> {
        self.put_obj(key, T_STRING, value, expires)
    }

    /// Writes a key of any type with an expiry time (`None`: none),
    /// keeping the count and the expiry index right.
    fn put_obj(
        &mut self,
        key: &[u8],
        kind: u8,
        value: &[u8],
        expires: Option<u64>,
    ) -> Result<(), KvError> {
        let dk = dkey(key);
        let old = self
            .t
            .insert(
                dk.as_slice(),
                encode_obj(kind, expires, self.index, value).as_slice(),
            )?
            .map(|v| Stored::decode(v.value()).expires);
        match old {
            None => self.count += 1,
            Some(Some(at)) if Some(at) != expires => {
                self.t.remove(expiry_key(at, &dk).as_slice())?;
            }
            Some(_) => {}
        }
        if let Some(at) = expires {
            if old != Some(Some(at)) {
                self.t
                    .insert(expiry_key(at, &dk).as_slice(), [].as_slice())?;
            }
        }
        Ok(())
    }

    /// Writes a key as SET does: any expiry it had is gone.
    fn put(&mut self, key: &[u8], value: impl AsRef<[u8]>) -> Result<(), KvError> {
        self.put_with(key, value.as_ref(), None)
    }

    /// Removes a key, live or expired; true if it was live.
    fn delete(&mut self, key: &[u8]) -> Result<bool, KvError> {
        let dk = dkey(key);
        let Some(old) = self
            .t
            .remove(dk.as_slice())?
            .map(|v| Stored::decode(v.value()).expires)
        else {
            return Ok(false);
        };
        self.count = self.count.saturating_sub(1);
        if let Some(at) = old {
            self.t.remove(expiry_key(at, &dk).as_slice())?;
        }
        self.t.insert(
            tomb_key(key).as_slice(),
            self.index.to_be_bytes().as_slice(),
        )?;
        Ok(old.is_none_or(|at| at > self.now))
    }

    /// An absolute expiry time for `ttl` (`Ok(None)`: none, `Keep`: the
    /// key's own), or Redis's error when it does not fit.
    fn expiry_of(
        &self,
        ttl: Ttl,
        keep: Option<u64>,
        command: &str,
    ) -> Result<Option<u64>, KvError> {
        let at = match ttl {
            Ttl::Clear => return Ok(None),
            Ttl::Keep => return Ok(keep),
            Ttl::In(ms) => i64::try_from(self.now).ok().and_then(|n| n.checked_add(ms)),
            Ttl::At(ms) => Some(ms),
        };
        match at {
            // A time in the past (or before 1970) expires the key at once.
            Some(at) => Ok(Some(u64::try_from(at).unwrap_or(0))),
            None => Err(KvError::Other(format!(
                "invalid expire time in '{command}' command"
            ))),
        }
    }

    /// Sets a key's value with an expiry; one already past removes it.
    fn put_expiring(
        &mut self,
        key: &[u8],
        kind: u8,
        value: &[u8],
        at: Option<u64>,
    ) -> Result<(), KvError> {
        match at {
            Some(at) if at <= self.now => {
                self.delete(key)?;
                Ok(())
            }
            at => self.put_obj(key, kind, value, at),
        }
    }

    /// Runs a transaction's commands in order.
    fn exec(&mut self, cmds: &[TxCmd]) -> Result<Value, KvError> {
        let mut replies = Vec::with_capacity(cmds.len());
        for c in cmds {
            let r = match c {
                TxCmd::Write(WriteCmd::Exec(_) | WriteCmd::ExecWatched { .. }) => {
                    Err(KvError::Tx("EXEC inside a transaction".into()))
                }
                TxCmd::Write(w) => self.stage(w)?,
                TxCmd::Read(r) => outcome(self.read_tx(r))?,
                TxCmd::Ping(None) => Ok(Value::Status("PONG".into())),
                TxCmd::Ping(Some(m)) | TxCmd::Echo(m) => Ok(Value::Bulk(m.clone())),
                TxCmd::Reply(v) => Ok(v.clone()),
            };
            // Like Redis: a command that fails does not stop the others
            // (and nothing is rolled back).
            replies.push(match r {
                Ok(v) => v,
                Err(e) => Value::Error(crate::resp::error_reply(&e)),
            });
        }
        Ok(Value::List(replies))
    }

    /// Whether a watched key may have changed after entry `since`: written
    /// since (its version), removed since (its bucket's deletion mark), or
    /// expired (counted as a change even if it already was at WATCH time:
    /// a needless abort, never a missed one).
    fn touched_since(&self, key: &[u8], since: u64) -> Result<bool, KvError> {
        if let Some(v) = self.t.get(dkey(key).as_slice())? {
            let st = Stored::decode(v.value());
            return Ok(st.expired(self.now) || st.version > since);
        }
        Ok(meta(&*self.t, &tomb_key(key))? > since)
    }

    /// Stages one write; the outer error is a storage failure, the inner
    /// one the command's own result.
    fn stage(&mut self, cmd: &WriteCmd) -> Result<Reply, KvError> {
        outcome(self.run(cmd))
    }

    /// Runs one write: its reply, or its error (a storage failure among
    /// them, which [`outcome`] tells apart).
    fn run(&mut self, cmd: &WriteCmd) -> Result<Value, KvError> {
        Ok(match cmd {
            WriteCmd::Set { key, value, cond } => {
                // A plain SET replaces whatever is there (the old value's
                // expiry comes back from the insert): no lookup first.
                let go = match cond {
                    SetCond::Always => true,
                    SetCond::IfAbsent => !self.exists(key)?,
                    SetCond::IfPresent => self.exists(key)?,
                };
                if !go {
                    return Ok(Value::Nil);
                }
                self.put(key, value)?;
                Value::Ok
            }
            WriteCmd::Del(keys) => {
                let mut n = 0;
                for k in keys {
                    if self.delete(k)? {
                        n += 1;
                    }
                }
                Value::Int(n)
            }
            WriteCmd::MSet(pairs) => {
                for (k, v) in pairs {
                    self.put(k, v)?;
                }
                Value::Ok
            }
            WriteCmd::IncrBy(key, delta) => {
                let old = self.entry(key)?;
                let at = old.as_ref().and_then(|(at, _)| *at);
                let n: i64 = match old.map(|(_, v)| v) {
                    None => 0,
                    Some(v) => match crate::command::parse_int(&v) {
                        Some(n) => n,
                        None => return Err(KvError::NotAnInteger),
                    },
                };
                let Some(new) = n.checked_add(*delta) else {
                    return Err(KvError::Overflow);
                };
                self.put_with(key, new.to_string().as_bytes(), at)?;
                Value::Int(new)
            }
            WriteCmd::Cas { key, expected, new } => {
                let old = self.entry(key)?;
                if let Some((at, _)) = old.filter(|(_, v)| v == expected) {
                    self.put_with(key, new, at)?;
                    Value::Int(1)
                } else {
                    Value::Int(0)
                }
            }
            WriteCmd::GetSet(key, value) => {
                let old = self.get(key)?;
                self.put(key, value)?;
                old.map_or(Value::Nil, Value::Bulk)
            }
            WriteCmd::GetDel(key) => {
                let old = self.get(key)?;
                if old.is_some() {
                    self.delete(key)?;
                }
                old.map_or(Value::Nil, Value::Bulk)
            }
            WriteCmd::SetNx(key, value) => {
                if self.exists(key)? {
                    Value::Int(0)
                } else {
                    self.put(key, value.clone())?;
                    Value::Int(1)
                }
            }
            WriteCmd::Append(key, value) => {
                let (at, mut v) = self.entry(key)?.unwrap_or_default();
                if v.len() + value.len() > MAX_STRING {
                    return Err(KvError::StringTooLong);
                }
                v.extend_from_slice(value);
                let n = v.len() as i64;
                self.put_with(key, &v, at)?;
                Value::Int(n)
            }
            WriteCmd::IncrByFloat(key, by_text) => {
                let old = self.entry(key)?;
                let text = add_float(old.as_ref().map(|(_, v)| v.as_slice()), by_text)?;
                self.put_with(key, text.as_bytes(), old.and_then(|(at, _)| at))?;
                Value::Bulk(text.into_bytes())
            }
            WriteCmd::SetRange(key, offset, value) => {
                let (at, mut v) = self.entry(key)?.unwrap_or_default();
                if value.is_empty() {
                    return Ok(Value::Int(v.len() as i64));
                }
                let Some(end) = usize::try_from(*offset)
                    .ok()
                    .and_then(|o| o.checked_add(value.len()))
                    .filter(|&e| e <= MAX_STRING)
                else {
                    return Err(KvError::StringTooLong);
                };
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[end - value.len()..end].copy_from_slice(value);
                let n = v.len() as i64;
                self.put_with(key, &v, at)?;
                Value::Int(n)
            }
            WriteCmd::MSetNx(pairs) => {
                for (k, _) in pairs {
                    if self.exists(k)? {
                        return Ok(Value::Int(0));
                    }
                }
                for (k, v) in pairs {
                    self.put(k, v)?;
                }
                Value::Int(1)
            }
            WriteCmd::Rename { from, to, nx } => {
                let Some(o) = self.any(from)? else {
                    return Err(KvError::NoSuchKey);
                };
                if from == to {
                    return Ok(if *nx { Value::Int(0) } else { Value::Ok });
                }
                if *nx && self.exists(to)? {
                    return Ok(Value::Int(0));
                }
                self.delete(from)?;
                self.put_obj(to, o.kind, &o.data, o.expires)?;
                if *nx {
                    Value::Int(1)
                } else {
                    Value::Ok
                }
            }
            WriteCmd::Copy { from, to, replace } => {
                if from == to {
                    return Err(KvError::Other(
                        "source and destination objects are the same".into(),
                    ));
                }
                let Some(o) = self.any(from)? else {
                    return Ok(Value::Int(0));
                };
                let exists = self.exists(to)?;
                if exists && !replace {
                    return Ok(Value::Int(0));
                }
                self.put_obj(to, o.kind, &o.data, o.expires)?;
                Value::Int(1)
            }
            WriteCmd::Exec(cmds) => self.exec(cmds)?,
            WriteCmd::ExecWatched { keys, cmds } => {
                for (k, since) in keys {
                    if self.touched_since(k, *since)? {
                        // As Redis: the transaction does not run.
                        return Ok(Value::NilArray);
                    }
                }
                self.exec(cmds)?
            }
            WriteCmd::FlushAll => {
                let mut keys = Vec::new();
                for range in [(DATA, DATA_END), (EXPIRES, EXPIRES_END)] {
                    for kv in self.t.range(range.0, range.1)? {
                        keys.push(kv?.0.value().to_vec());
                    }
                }
                let mut tombs = std::collections::BTreeSet::new();
                for k in keys {
                    self.t.remove(k.as_slice())?;
                    if k.starts_with(DATA) {
                        tombs.insert(tomb_key(user_key(&k)));
                    }
                }
                for tk in tombs {
                    self.t
                        .insert(tk.as_slice(), self.index.to_be_bytes().as_slice())?;
                }
                self.count = 0;
                Value::Ok
            }
            WriteCmd::SetWith {
                key,
                value,
                cond,
                ttl,
                get,
                name,
            } => {
                let old = self.any(key)?;
                let keep = old.as_ref().and_then(|o| o.expires);
                // As Redis: the time is checked first, then GET's type.
                let at = self.expiry_of(*ttl, keep, name)?;
                if *get && old.as_ref().is_some_and(|o| o.kind != T_STRING) {
                    return Err(KvError::WrongType);
                }
                let go = match cond {
                    SetCond::Always => true,
                    SetCond::IfAbsent => old.is_none(),
                    SetCond::IfPresent => old.is_some(),
                };
                if go {
                    // As Redis: a time already past still writes the key
                    // (absent to everything, counted by DBSIZE until the
                    // reaper removes it), where EXPIRE and GETEX remove it.
                    self.put_with(key, value, at)?;
                }
                match (get, go) {
                    (true, _) => old.map_or(Value::Nil, |o| Value::Bulk(o.data)),
                    (false, true) => Value::Ok,
                    (false, false) => Value::Nil,
                }
            }
            WriteCmd::Expire {
                key,
                at,
                cond,
                name,
            } => {
                // As Redis: a time that does not fit fails before the key
                // is looked at.
                let new = match self.expiry_of(*at, None, name) {
                    Ok(Some(t)) => t,
                    Ok(None) => return Ok(Value::Int(0)),
                    Err(e) => return Err(e),
                };
                let Some(o) = self.any(key)? else {
                    return Ok(Value::Int(0));
                };
                let current = o.expires;
                let ok = !(cond.nx && current.is_some()
                    || cond.xx && current.is_none()
                    || cond.gt && current.is_none_or(|c| new <= c)
                    || cond.lt && current.is_some_and(|c| new >= c));
                if !ok {
                    return Ok(Value::Int(0));
                }
                self.put_expiring(key, o.kind, &o.data, Some(new))?;
                Value::Int(1)
            }
            WriteCmd::Persist(key) => match self.any(key)? {
                Some(o) if o.expires.is_some() => {
                    self.put_obj(key, o.kind, &o.data, None)?;
                    Value::Int(1)
                }
                _ => Value::Int(0),
            },
            WriteCmd::GetEx { key, opt, time } => {
                let Some((current, v)) = self.entry(key)? else {
                    return Ok(Value::Nil);
                };
                let ttl = crate::command::ttl_option(opt, time, "getex")?;
                let at = self.expiry_of(ttl, current, "getex")?;
                if at != current {
                    self.put_expiring(key, T_STRING, &v, at)?;
                }
                Value::Bulk(v)
            }
            WriteCmd::HSet { key, pairs, ok } => {
                let (mut fields, expires) = self.hash(key)?;
                let mut added = 0;
                for (f, v) in pairs {
                    match fields.iter_mut().find(|(k, _)| k == f) {
                        Some(slot) => slot.1 = v.clone(),
                        None => {
                            fields.push((f.clone(), v.clone()));
                            added += 1;
                        }
                    }
                }
                self.put_hash(key, &fields, expires)?;
                if *ok {
                    Value::Ok
                } else {
                    Value::Int(added)
                }
            }
            WriteCmd::HSetNx(key, f, v) => {
                let (mut fields, expires) = self.hash(key)?;
                if fields.iter().any(|(k, _)| k == f) {
                    return Ok(Value::Int(0));
                }
                fields.push((f.clone(), v.clone()));
                self.put_hash(key, &fields, expires)?;
                Value::Int(1)
            }
            WriteCmd::HDel(key, fs) => {
                let (mut fields, expires) = self.hash(key)?;
                let before = fields.len();
                fields.retain(|(k, _)| !fs.contains(k));
                let removed = before - fields.len();
                if removed > 0 {
                    self.put_hash(key, &fields, expires)?;
                }
                Value::Int(removed as i64)
            }
            WriteCmd::HIncrBy(key, f, by) => {
                let (mut fields, expires) = self.hash(key)?;
                let slot = fields.iter().position(|(k, _)| k == f);
                let n = match slot {
                    None => 0,
                    Some(i) => {
                        crate::command::parse_int(&fields[i].1).ok_or(KvError::HashNotAnInteger)?
                    }
                };
                let new = n.checked_add(*by).ok_or(KvError::Overflow)?;
                let text = new.to_string().into_bytes();
                match slot {
                    Some(i) => fields[i].1 = text,
                    None => fields.push((f.clone(), text)),
                }
                self.put_hash(key, &fields, expires)?;
                Value::Int(new)
            }
            WriteCmd::HIncrByFloat(key, f, by_text) => {
                let (mut fields, expires) = self.hash(key)?;
                let slot = fields.iter().position(|(k, _)| k == f);
                let old = slot.map(|i| fields[i].1.clone());
                let text = add_float(old.as_deref(), by_text).map_err(|e| match e {
                    KvError::NotAFloat => KvError::HashNotAFloat,
                    e => e,
                })?;
                match slot {
                    Some(i) => fields[i].1 = text.clone().into_bytes(),
                    None => fields.push((f.clone(), text.clone().into_bytes())),
                }
                self.put_hash(key, &fields, expires)?;
                Value::Bulk(text.into_bytes())
            }
            WriteCmd::Push { key, elems, left } => {
                let (mut l, expires) = self.coll(key, T_LIST)?;
                for e in elems {
                    if *left {
                        l.insert(0, e.clone());
                    } else {
                        l.push(e.clone());
                    }
                }
                self.put_coll(key, T_LIST, &l, expires)?;
                Value::Int(l.len() as i64)
            }
            WriteCmd::Pop { key, count, left } => {
                let o = self.any(key)?;
                if o.is_none() {
                    return Ok(if count.is_some() {
                        Value::NilArray
                    } else {
                        Value::Nil
                    });
                }
                let (mut l, expires) = self.coll(key, T_LIST)?;
                let n = count.unwrap_or(1).min(l.len() as u64) as usize;
                let popped: Vec<Vec<u8>> = if *left {
                    l.drain(..n).collect()
                } else {
                    let mut p: Vec<Vec<u8>> = l.drain(l.len() - n..).collect();
                    p.reverse();
                    p
                };
                if n > 0 {
                    self.put_coll(key, T_LIST, &l, expires)?;
                }
                match count {
                    None => popped.into_iter().next().map_or(Value::Nil, Value::Bulk),
                    Some(_) => Value::List(popped.into_iter().map(Value::Bulk).collect()),
                }
            }
            WriteCmd::LRem(key, count, e) => {
                let (l, expires) = self.coll(key, T_LIST)?;
                let limit = if *count == 0 {
                    usize::MAX
                } else {
                    count.unsigned_abs() as usize
                };
                let mut removed = 0;
                let mut keep: Vec<Vec<u8>> = Vec::with_capacity(l.len());
                let from_tail = *count < 0;
                let iter: Box<dyn Iterator<Item = Vec<u8>>> = if from_tail {
                    Box::new(l.into_iter().rev())
                } else {
                    Box::new(l.into_iter())
                };
                for x in iter {
                    if removed < limit && &x == e {
                        removed += 1;
                    } else {
                        keep.push(x);
                    }
                }
                if from_tail {
                    keep.reverse();
                }
                if removed > 0 {
                    self.put_coll(key, T_LIST, &keep, expires)?;
                }
                Value::Int(removed as i64)
            }
            WriteCmd::LTrim(key, a, b) => {
                let (l, expires) = self.coll(key, T_LIST)?;
                if !l.is_empty() {
                    let kept = match list_range(l.len(), *a, *b) {
                        Some((a, b)) => l[a..=b].to_vec(),
                        None => Vec::new(),
                    };
                    // Written even when nothing was trimmed: Redis counts
                    // every LTRIM of a list as a change (WATCH sees it).
                    self.put_coll(key, T_LIST, &kept, expires)?;
                }
                Value::Ok
            }
            WriteCmd::SAdd(key, members) => {
                let (mut set, expires) = self.coll(key, T_SET)?;
                let mut added = 0;
                for m in members {
                    if !set.contains(m) {
                        set.push(m.clone());
                        added += 1;
                    }
                }
                if added > 0 {
                    self.put_coll(key, T_SET, &set, expires)?;
                }
                Value::Int(added)
            }
            WriteCmd::SRem(key, members) => {
                let (mut set, expires) = self.coll(key, T_SET)?;
                let before = set.len();
                set.retain(|m| !members.contains(m));
                let removed = before - set.len();
                if removed > 0 {
                    self.put_coll(key, T_SET, &set, expires)?;
                }
                Value::Int(removed as i64)
            }
            WriteCmd::ZAdd {
                key,
                pairs,
                cond,
                cmp,
                ch,
                incr,
            } => {
                let o = self.any(key)?;
                if o.as_ref().is_some_and(|o| o.kind != T_ZSET) {
                    return Err(KvError::WrongType);
                }
                let expires = o.as_ref().and_then(|o| o.expires);
                let mut z = o.map(|o| zset_decode(&o.data)).unwrap_or_default();
                let (mut added, mut changed) = (0i64, 0i64);
                let mut incr_result = None;
                for (bits, m) in pairs {
                    let score = f64::from_bits(*bits);
                    match z.iter().position(|(k, _)| k == m) {
                        Some(i) => {
                            if *cond == SetCond::IfAbsent {
                                continue;
                            }
                            let cur = z[i].1;
                            let new = if *incr { cur + score } else { score };
                            if new.is_nan() {
                                return Err(KvError::Other(
                                    "resulting score is not a number (NaN)".into(),
                                ));
                            }
                            if (*cmp > 0 && new <= cur) || (*cmp < 0 && new >= cur) {
                                continue;
                            }
                            incr_result = Some(new);
                            if new != cur {
                                z[i].1 = new;
                                changed += 1;
                            }
                        }
                        None => {
                            if *cond == SetCond::IfPresent {
                                continue;
                            }
                            z.push((m.clone(), score));
                            added += 1;
                            incr_result = Some(score);
                        }
                    }
                }
                if added + changed > 0 {
                    zset_sort(&mut z);
                    self.put_obj(key, T_ZSET, &zset_encode(&z), expires)?;
                }
                if *incr {
                    incr_result.map_or(Value::Nil, |s| Value::Double(format_double(s)))
                } else {
                    Value::Int(added + if *ch { changed } else { 0 })
                }
            }
            WriteCmd::ZIncrBy(key, bits, m) => {
                let o = self.any(key)?;
                if o.as_ref().is_some_and(|o| o.kind != T_ZSET) {
                    return Err(KvError::WrongType);
                }
                let expires = o.as_ref().and_then(|o| o.expires);
                let mut z = o.map(|o| zset_decode(&o.data)).unwrap_or_default();
                let by = f64::from_bits(*bits);
                let new = match z.iter().position(|(k, _)| k == m) {
                    Some(i) => {
                        let new = z[i].1 + by;
                        if new.is_nan() {
                            return Err(KvError::Other(
                                "resulting score is not a number (NaN)".into(),
                            ));
                        }
                        if new == z[i].1 {
                            // Unchanged: not a change for WATCH, as in Redis.
                            return Ok(Value::Double(format_double(new)));
                        }
                        z[i].1 = new;
                        new
                    }
                    None => {
                        z.push((m.clone(), by));
                        by
                    }
                };
                zset_sort(&mut z);
                self.put_obj(key, T_ZSET, &zset_encode(&z), expires)?;
                Value::Double(format_double(new))
            }
            WriteCmd::ZRem(key, members) => {
                let o = self.any(key)?;
                if o.as_ref().is_some_and(|o| o.kind != T_ZSET) {
                    return Err(KvError::WrongType);
                }
                let Some(o) = o else {
                    return Ok(Value::Int(0));
                };
                let mut z = zset_decode(&o.data);
                let before = z.len();
                z.retain(|(m, _)| !members.contains(m));
                let removed = before - z.len();
                if z.is_empty() {
                    self.delete(key)?;
                } else if removed > 0 {
                    self.put_obj(key, T_ZSET, &zset_encode(&z), o.expires)?;
                }
                Value::Int(removed as i64)
            }
            WriteCmd::Reap(keys) => {
                let mut n = 0;
                for k in keys {
                    let expired = self
                        .t
                        .get(dkey(k).as_slice())?
                        .is_some_and(|v| Stored::decode(v.value()).expired(self.now));
                    if expired {
                        self.delete(k)?;
                        n += 1;
                    }
                }
                Value::Int(n)
            }
        })
    }
}

impl Staged<'_> {
    /// A read inside a transaction: what the commands before it left.
    fn read_tx(&mut self, r: &ReadTx) -> Result<Value, KvError> {
        Ok(match r {
            ReadTx::Get(k) => self.get(k)?.map_or(Value::Nil, Value::Bulk),
            ReadTx::MGet(keys) => {
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    // As Redis: a key of another type reads as nil here.
                    let o = self.any(k)?.filter(|o| o.kind == T_STRING);
                    out.push(o.map(|o| o.data));
                }
                Value::Array(out)
            }
            ReadTx::Exists(keys) => {
                let mut n = 0;
                for k in keys {
                    if self.exists(k)? {
                        n += 1;
                    }
                }
                Value::Int(n)
            }
            ReadTx::StrLen(k) => Value::Int(self.get(k)?.map_or(0, |v| v.len() as i64)),
            ReadTx::GetRange(k, a, b) => {
                Value::Bulk(get_range(&self.get(k)?.unwrap_or_default(), *a, *b))
            }
            ReadTx::Type(k) => type_of(self.any(k)?.map(|o| o.kind)),
            ReadTx::Hash(k, h) => {
                let o = self.any(k)?;
                hash_read(o.as_ref().map(|o| (o.kind, o.data.as_slice())), h)?
            }
            ReadTx::Z(k, z) => {
                let o = self.any(k)?;
                z_read(o.as_ref().map(|o| (o.kind, o.data.as_slice())), z)?
            }
            ReadTx::Coll(k, c) => {
                let o = self.any(k)?;
                let mut others = std::collections::HashMap::new();
                if let CollRead::SInter(ks) | CollRead::SUnion(ks) = c {
                    for other in ks {
                        let v = self.any(other)?.map(|o| (o.kind, o.data));
                        others.insert(other.clone(), v);
                    }
                }
                coll_read(
                    o.as_ref().map(|o| (o.kind, o.data.as_slice())),
                    c,
                    |other| Ok(others.get(other).cloned().flatten()),
                )?
            }
            ReadTx::DbSize => Value::Int(self.count as i64),
            ReadTx::Ttl { key, ms, absolute } => {
                ttl_reply(self.any(key)?.map(|o| o.expires), self.now, *ms, *absolute)
            }
            ReadTx::Keys(pattern) => {
                let mut keys = Vec::new();
                for kv in self.t.range(DATA, DATA_END)? {
                    let (k, v) = kv?;
                    let key = user_key(k.value());
                    if glob_match(pattern, key) && !Stored::decode(v.value()).expired(self.now) {
                        keys.push(key.to_vec());
                    }
                }
                keys.sort();
                Value::List(keys.into_iter().map(Value::Bulk).collect())
            }
        })
    }
}

/// GETRANGE's slice of `v`, with Redis's rules for negative and
/// out-of-range indexes.
fn get_range(v: &[u8], start: i64, end: i64) -> Vec<u8> {
    let len = v.len() as i64;
    let fix = |i: i64| if i < 0 { (len + i).max(0) } else { i };
    let (a, b) = (fix(start), fix(end).min(len - 1));
    if len == 0 || a > b || (start < 0 && end < 0 && start > end) {
        Vec::new()
    } else {
        v[a as usize..=b as usize].to_vec()
    }
}

fn type_of(kind: Option<u8>) -> Value {
    Value::Status(kind.map_or("none", kind_name).into())
}

/// The longest string value (Redis's `proto-max-bulk-len` default).
const MAX_STRING: usize = 512 << 20;

/// Whether `s` matches the glob `p` as Redis matches key patterns: `*`,
/// `?`, `[abc]`, `[^a-z]` and `\` escapes. (Written here because Redis's
/// rules, byte-wise on binary keys, differ from path-glob crates.)
pub fn glob_match(p: &[u8], s: &[u8]) -> bool {
    fn go(p: &[u8], s: &[u8], depth: u32) -> bool {
        if depth > 1000 {
            return false;
        }
        let (mut pi, mut si) = (0, 0);
        while pi < p.len() {
            match p[pi] {
                b'*' => {
                    while pi + 1 < p.len() && p[pi + 1] == b'*' {
                        pi += 1;
                    }
                    if pi + 1 == p.len() {
                        return true;
                    }
                    return (si..=s.len()).any(|i| go(&p[pi + 1..], &s[i..], depth + 1));
                }
                b'?' => {
                    if si >= s.len() {
                        return false;
                    }
                    si += 1;
                }
                b'[' => {
                    if si >= s.len() {
                        return false;
                    }
                    pi += 1;
                    let not = p.get(pi) == Some(&b'^');
                    if not {
                        pi += 1;
                    }
                    let mut hit = false;
                    while pi < p.len() && p[pi] != b']' {
                        if p[pi] == b'\\' && pi + 1 < p.len() {
                            pi += 1;
                            hit |= p[pi] == s[si];
                        } else if pi + 2 < p.len() && p[pi + 1] == b'-' {
                            let (mut a, mut b) = (p[pi], p[pi + 2]);
                            if a > b {
                                std::mem::swap(&mut a, &mut b);
                            }
                            hit |= (a..=b).contains(&s[si]);
                            pi += 2;
                        } else {
                            hit |= p[pi] == s[si];
                        }
                        pi += 1;
                    }
                    if hit == not {
                        return false;
                    }
                    si += 1;
                }
                b'\\' if pi + 1 < p.len() => {
                    pi += 1;
                    if si >= s.len() || p[pi] != s[si] {
                        return false;
                    }
                    si += 1;
                }
                c => {
                    if si >= s.len() || c != s[si] {
                        return false;
                    }
                    si += 1;
                }
            }
            pi += 1;
        }
        si == s.len()
    }
    go(p, s, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ExpireCond;

    /// Runs a whole SCAN (COUNT `count`), applying `between` after each
    /// call; every key it returned.
    fn full_scan(
        sm: &StateMachine,
        count: usize,
        mut between: impl FnMut(&StateMachine, usize),
    ) -> Vec<Vec<u8>> {
        let mut cursor = 0u64;
        let mut out = Vec::new();
        for call in 0.. {
            let r = sm
                .read_view(|v| {
                    v.read(&ReadCmd::Scan {
                        cursor,
                        pattern: None,
                        count,
                        kind: None,
                    })
                })
                .unwrap();
            let Value::List(parts) = r else {
                panic!("{r:?}")
            };
            let (Value::Bulk(c), Value::List(keys)) = (&parts[0], &parts[1]) else {
                panic!("{parts:?}")
            };
            for k in keys {
                let Value::Bulk(k) = k else { panic!() };
                out.push(k.clone());
            }
            cursor = String::from_utf8_lossy(c).parse().unwrap();
            if cursor == 0 {
                break;
            }
            between(sm, call);
        }
        out
    }

    #[test]
    fn scan_returns_every_key_present_throughout_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("sm")).unwrap();
        let mut index = 0;
        let mut apply = |sm: &StateMachine, cmd: WriteCmd| {
            index += 1;
            sm.apply(index, Some(&cmd)).unwrap().unwrap();
        };
        let stable: Vec<Vec<u8>> = (0..500)
            .map(|i| format!("stable-{i}").into_bytes())
            .collect();
        for k in &stable {
            apply(
                &sm,
                WriteCmd::Set {
                    key: k.clone(),
                    value: b"v".to_vec(),
                    cond: SetCond::Always,
                },
            );
        }
        for i in 0..200 {
            apply(
                &sm,
                WriteCmd::Set {
                    key: format!("gone-{i}").into_bytes(),
                    value: b"v".to_vec(),
                    cond: SetCond::Always,
                },
            );
        }
        // Between the calls: keys come and go, stable ones are rewritten.
        let mut n = 0;
        let got = full_scan(&sm, 7, |sm, call| {
            for _ in 0..5 {
                n += 1;
                let cmd = match n % 3 {
                    0 => WriteCmd::Set {
                        key: format!("new-{n}").into_bytes(),
                        value: b"x".to_vec(),
                        cond: SetCond::Always,
                    },
                    1 => WriteCmd::Del(vec![format!("gone-{}", n % 200).into_bytes()]),
                    _ => WriteCmd::Set {
                        key: stable[(call * 7 + n) % 500].clone(),
                        value: b"w".to_vec(),
                        cond: SetCond::Always,
                    },
                };
                index += 1;
                sm.apply(index, Some(&cmd)).unwrap().unwrap();
            }
        });
        let got: std::collections::HashSet<Vec<u8>> = got.into_iter().collect();
        for k in &stable {
            assert!(got.contains(k), "{} missing", String::from_utf8_lossy(k));
        }
        // A quiet full scan returns exactly the keys there are.
        let all = full_scan(&sm, 1000, |_, _| {});
        assert_eq!(all.len() as u64, sm.dbsize().unwrap());
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len(), "no key twice in a quiet scan");
        // MATCH filters what COUNT scanned.
        let r = sm
            .read_view(|v| {
                v.read(&ReadCmd::Scan {
                    cursor: 0,
                    pattern: Some(b"stable-1?".to_vec()),
                    count: 100_000,
                    kind: None,
                })
            })
            .unwrap();
        let Value::List(parts) = r else { panic!() };
        assert_eq!(parts[0], Value::text("0"));
        assert!(matches!(&parts[1], Value::List(k) if k.len() == 10));
    }

    #[test]
    fn scan_order_survives_a_snapshot_load_and_old_databases_are_moved_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("a")).unwrap();
        for i in 0..300u64 {
            sm.apply(
                i + 1,
                Some(&WriteCmd::Set {
                    key: format!("k{i}").into_bytes(),
                    value: b"v".to_vec(),
                    cond: SetCond::Always,
                }),
            )
            .unwrap()
            .unwrap();
        }
        let file = dir.path().join("snap");
        sm.write_snapshot(&file).unwrap();
        let other = StateMachine::open(&dir.path().join("b")).unwrap();
        other.load_snapshot(&file).unwrap();
        assert_eq!(full_scan(&other, 10, |_, _| {}).len(), 300);
        // A sled database from before the redb engine, half of it in the
        // layout from before SCAN (`d:` + key): opened, it is moved to a
        // new generation, values, count and applied index intact.
        let old_dir = dir.path().join("c");
        {
            let db = sled::open(old_dir.join("gen-0")).unwrap();
            for i in 0..300u64 {
                let key = format!("k{i}").into_bytes();
                let stored = if i % 2 == 0 {
                    let mut old = OLD_DATA.to_vec();
                    old.extend_from_slice(&key);
                    old
                } else {
                    dkey(&key)
                };
                db.insert(stored, format!("v{i}").as_bytes()).unwrap();
            }
            db.insert(APPLIED, &300u64.to_be_bytes()).unwrap();
            db.insert(APPLIED_TERM, &2u64.to_be_bytes()).unwrap();
            db.insert(COUNT, &300u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        std::fs::write(old_dir.join(CURRENT), "gen-0").unwrap();
        let moved = StateMachine::open(&old_dir).unwrap();
        assert_eq!(moved.dbsize().unwrap(), 300);
        assert_eq!(moved.applied(), 300);
        assert_eq!(moved.applied_term(), 2);
        assert_eq!(moved.get(b"k7").unwrap(), Some(b"v7".to_vec()));
        assert_eq!(moved.get(b"k8").unwrap(), Some(b"v8".to_vec()));
        assert_eq!(full_scan(&moved, 10, |_, _| {}).len(), 300);
        assert!(!old_dir.join("gen-0").exists(), "the sled database is gone");
        drop(moved);
        let reopened = StateMachine::open(&old_dir).unwrap();
        assert_eq!(reopened.get(b"k8").unwrap(), Some(b"v8".to_vec()));
        assert_eq!(reopened.applied(), 300);
    }

    fn set(k: &str, v: &str, cond: SetCond) -> WriteCmd {
        WriteCmd::Set {
            key: k.into(),
            value: v.into(),
            cond,
        }
    }

    #[test]
    fn commands_apply_and_survive_reopen_without_reapplying() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sm");
        {
            let sm = StateMachine::open(&p).unwrap();
            assert_eq!(sm.apply(1, None).unwrap(), Ok(Value::Ok));
            assert_eq!(
                sm.apply(2, Some(&set("a", "1", SetCond::Always))).unwrap(),
                Ok(Value::Ok)
            );
            assert_eq!(
                sm.apply(3, Some(&set("a", "2", SetCond::IfAbsent)))
                    .unwrap(),
                Ok(Value::Nil)
            );
            assert_eq!(
                sm.apply(4, Some(&set("b", "x", SetCond::IfPresent)))
                    .unwrap(),
                Ok(Value::Nil)
            );
            assert_eq!(
                sm.apply(5, Some(&WriteCmd::IncrBy("a".into(), 41)))
                    .unwrap(),
                Ok(Value::Int(42))
            );
            assert_eq!(
                sm.apply(6, Some(&WriteCmd::IncrBy("a".into(), i64::MAX)))
                    .unwrap(),
                Err(KvError::Overflow)
            );
            let cas = |e: &str, n: &str| WriteCmd::Cas {
                key: "a".into(),
                expected: e.into(),
                new: n.into(),
            };
            assert_eq!(
                sm.apply(7, Some(&cas("41", "x"))).unwrap(),
                Ok(Value::Int(0))
            );
            assert_eq!(
                sm.apply(8, Some(&cas("42", "x"))).unwrap(),
                Ok(Value::Int(1))
            );
            assert_eq!(
                sm.apply(9, Some(&WriteCmd::IncrBy("a".into(), 1))).unwrap(),
                Err(KvError::NotAnInteger)
            );
            sm.apply(
                10,
                Some(&WriteCmd::MSet(vec![
                    ("c".into(), "3".into()),
                    ("d".into(), "4".into()),
                    ("c".into(), "5".into()),
                ])),
            )
            .unwrap()
            .unwrap();
            assert_eq!(sm.dbsize().unwrap(), 3);
            assert_eq!(
                sm.apply(
                    11,
                    Some(&WriteCmd::Del(vec!["c".into(), "c".into(), "zz".into()]))
                )
                .unwrap(),
                Ok(Value::Int(1))
            );
            assert_eq!(sm.dbsize().unwrap(), 2);
            sm.flush().unwrap();
        }
        let sm = StateMachine::open(&p).unwrap();
        assert_eq!(sm.applied(), 11);
        assert_eq!(sm.get(b"a").unwrap(), Some(b"x".to_vec()));
        assert_eq!(sm.get(b"d").unwrap(), Some(b"4".to_vec()));
        // Re-delivery of an applied index changes nothing.
        assert!(matches!(
            sm.apply(11, Some(&set("a", "again", SetCond::Always)))
                .unwrap(),
            Err(KvError::AlreadyApplied)
        ));
        assert_eq!(sm.get(b"a").unwrap(), Some(b"x".to_vec()));
    }

    #[test]
    fn one_batch_sees_its_own_earlier_writes() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("sm")).unwrap();
        let cmds = [
            set("k", "1", SetCond::Always),
            WriteCmd::IncrBy("k".into(), 2),
            set("k", "x", SetCond::IfAbsent),
            WriteCmd::Del(vec!["k".into()]),
            set("k", "y", SetCond::IfPresent),
            WriteCmd::MSet(vec![("a".into(), "1".into()), ("b".into(), "2".into())]),
            WriteCmd::Cas {
                key: "a".into(),
                expected: "1".into(),
                new: "9".into(),
            },
        ];
        let items: Vec<(u64, Option<&WriteCmd>)> = std::iter::once((1, None))
            .chain(
                cmds.iter()
                    .enumerate()
                    .map(|(i, c)| (i as u64 + 2, Some(c))),
            )
            .collect();
        let out = sm.apply_many(&items).unwrap();
        assert_eq!(
            out,
            vec![
                Ok(Value::Ok),
                Ok(Value::Ok),
                Ok(Value::Int(3)),
                Ok(Value::Nil),
                Ok(Value::Int(1)),
                Ok(Value::Nil),
                Ok(Value::Ok),
                Ok(Value::Int(1))
            ]
        );
        assert_eq!(sm.applied(), 8);
        assert_eq!(sm.get(b"k").unwrap(), None);
        assert_eq!(sm.get(b"a").unwrap(), Some(b"9".to_vec()));
        assert_eq!(sm.dbsize().unwrap(), 2);
        // Replaying part of the batch changes nothing.
        let again = sm.apply_many(&items[..3]).unwrap();
        assert!(again
            .iter()
            .all(|o| matches!(o, Err(KvError::AlreadyApplied))));
        assert_eq!(sm.dbsize().unwrap(), 2);
    }

    /// The hostile review's torn MGET: one thread applies batches that write
    /// eight keys together (MSET k0=i .. k7=i, and now and then DEL of all
    /// eight) while this thread reads the keys and DBSIZE through one read
    /// view. Every read must see the keys equal, and DBSIZE must count what
    /// it sees. (A view reading through sled's live tree without a gate
    /// tore 380 to 790 reads of 5,000 to 11,000 in each of five runs; a
    /// view is now one redb read transaction.)
    #[test]
    fn a_read_view_never_sees_half_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let sm = std::sync::Arc::new(StateMachine::open(&dir.path().join("sm")).unwrap());
        const BATCHES: u64 = 4000;
        let keys: Vec<Vec<u8>> = (0..8).map(|k| format!("k{k}").into_bytes()).collect();
        let writer = {
            let (sm, keys) = (sm.clone(), keys.clone());
            std::thread::spawn(move || {
                for i in 1..=BATCHES {
                    let cmd = if i.is_multiple_of(5) {
                        WriteCmd::Del(keys.clone())
                    } else {
                        let v = i.to_string().into_bytes();
                        WriteCmd::MSet(keys.iter().map(|k| (k.clone(), v.clone())).collect())
                    };
                    sm.apply_many(&[(i, Some(&cmd))]).unwrap();
                }
            })
        };
        let (mut reads, mut torn) = (0u64, 0u64);
        let mut example = None;
        while !writer.is_finished() {
            let (vals, size) = sm
                .read_view(|v| -> Result<_, KvError> {
                    let vals: Vec<Option<Vec<u8>>> =
                        keys.iter().map(|k| v.get(k)).collect::<Result<_, _>>()?;
                    Ok((vals, v.dbsize()?))
                })
                .unwrap();
            reads += 1;
            let present = vals.iter().filter(|v| v.is_some()).count() as u64;
            if vals.windows(2).any(|w| w[0] != w[1]) || size != present {
                torn += 1;
                example.get_or_insert((vals, size));
            }
        }
        writer.join().unwrap();
        assert_eq!(sm.applied(), BATCHES);
        assert_eq!(
            torn, 0,
            "{torn} of {reads} reads saw half a batch, e.g. (values, dbsize) = {example:?}"
        );
    }

    /// With nothing flushing it, memory stays within the hard limit: the
    /// applier flushes itself (and what it flushed survives a crash).
    #[test]
    fn the_applier_flushes_itself_past_the_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        let mut sm = StateMachine::open(&path).unwrap();
        sm.flush_early = 4 << 10;
        sm.flush_hard = 16 << 10;
        let value = vec![b'v'; 200];
        let mut most = 0;
        for i in 1..=2000u64 {
            let cmd = WriteCmd::MSet(vec![(format!("k{}", i % 500).into_bytes(), value.clone())]);
            sm.apply(i, Some(&cmd)).unwrap().unwrap();
            most = most.max(sm.state().layers.active_bytes);
        }
        assert!(most <= (16 << 10) + 1024, "memory held {most} bytes");
        drop(sm);
        let sm = StateMachine::open(&path).unwrap();
        assert!(sm.applied() > 1500, "flushed up to {}", sm.applied());
        assert_eq!(sm.dbsize().unwrap(), 500);
    }

    /// A frozen layer left behind (its flush panicked half way) is written
    /// by the next flush rather than taken for one in progress.
    #[test]
    fn a_frozen_layer_left_by_a_flush_that_died_is_written_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        let sm = StateMachine::open(&path).unwrap();
        sm.apply(1, Some(&set("a", "1", SetCond::Always)))
            .unwrap()
            .unwrap();
        {
            let _applying = sm.applying.lock().unwrap();
            let mut next = State::clone(&sm.state());
            assert!(next.layers.freeze().is_some());
            sm.publish(next);
        }
        sm.apply(2, Some(&set("b", "2", SetCond::Always)))
            .unwrap()
            .unwrap();
        sm.flush().unwrap();
        drop(sm);
        let sm = StateMachine::open(&path).unwrap();
        assert_eq!(sm.applied(), 2);
        assert_eq!(sm.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(sm.get(b"b").unwrap(), Some(b"2".to_vec()));
    }

    /// Flushes run beside the applier (a thread flushing in a loop): every
    /// read view is still one applied state (a key written by every entry
    /// holds the view's applied index; the count matches the keys), and
    /// after a crash (dropped without a flush) the state resumes at the
    /// last flush exactly, the entries after it left to the log.
    #[test]
    fn flushes_beside_batches_keep_views_whole_and_a_crash_resumes_at_the_last_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        let sm = std::sync::Arc::new(StateMachine::open(&path).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flusher = {
            let (sm, stop) = (sm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sm.flush().unwrap();
                    n += 1;
                }
                n
            })
        };
        let entry = |i: u64| {
            let v = i.to_string().into_bytes();
            let k = format!("k{}", i % 97).into_bytes();
            if i.is_multiple_of(7) {
                WriteCmd::Del(vec![k])
            } else {
                WriteCmd::MSet(vec![(b"last".to_vec(), v.clone()), (k, v)])
            }
        };
        let mut model = std::collections::BTreeMap::new();
        let check = |sm: &StateMachine| {
            sm.read_view(|v| {
                let applied = v.applied().unwrap();
                let last = v
                    .get(b"last")
                    .unwrap()
                    .map(|b| String::from_utf8(b).unwrap());
                let last_set = (1..=applied).rev().find(|i| !i.is_multiple_of(7));
                assert_eq!(last, last_set.map(|i| i.to_string()), "at {applied}");
                applied
            })
        };
        let mut i = 0u64;
        let mut during = 0;
        let mut want = false;
        while i < 6000 || want {
            want |= i.is_multiple_of(500) && i > 0;
            if want {
                // Wait for the flusher to be writing: the next batch lands
                // beside a frozen layer on its way to the disk. A flush
                // that came and went while this thread was not looking (a
                // busy machine) took all there was: apply this batch and
                // wait for the flush of it.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                loop {
                    let st = sm.state();
                    if st.layers.frozen.is_some() {
                        during += 1;
                        want = false;
                        break;
                    }
                    if st.layers.active_bytes == 0 {
                        break;
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no flush froze memory"
                    );
                    std::thread::yield_now();
                }
            }
            let batch: Vec<(u64, WriteCmd)> = (i + 1..=i + 5).map(|j| (j, entry(j))).collect();
            let refs: Vec<(u64, Option<&WriteCmd>)> =
                batch.iter().map(|(j, c)| (*j, Some(c))).collect();
            sm.apply_many(&refs).unwrap();
            for (j, c) in &batch {
                match c {
                    WriteCmd::Del(k) => {
                        model.remove(&k[0]);
                    }
                    _ => {
                        model.insert(format!("k{}", j % 97).into_bytes(), j.to_string());
                    }
                }
            }
            i += 5;
            assert!(check(&sm) >= i);
        }
        stop.store(true, Ordering::Relaxed);
        assert!(flusher.join().unwrap() > 0);
        assert_eq!(during, 11);
        sm.flush().unwrap();
        let size = model.len() as u64 + 1;
        assert_eq!(sm.dbsize().unwrap(), size);
        // After the last flush: applied, never made durable.
        for j in i + 1..=i + 100 {
            sm.apply(j, Some(&entry(j))).unwrap().unwrap();
        }
        drop(sm);
        let sm = StateMachine::open(&path).unwrap();
        assert_eq!(sm.applied(), i);
        assert_eq!(check(&sm), i);
        assert_eq!(sm.dbsize().unwrap(), size);
        for (k, v) in &model {
            assert_eq!(sm.get(k).unwrap(), Some(v.clone().into_bytes()));
        }
    }

    /// A snapshot is one applied state even while batches keep landing:
    /// every batch rewrites all keys (MSET of the batch's index; every
    /// fifth deletes half of them), so a snapshot at index I must hold
    /// exactly the keys and values batch I left. Loaded into another state
    /// machine it reads back the same. (A scan of sled's live tree mixed
    /// batches: three runs of three failed in the first rounds; the scan is
    /// now one redb read transaction.)
    #[test]
    fn a_snapshot_taken_while_writes_flow_is_one_applied_state() {
        let dir = tempfile::tempdir().unwrap();
        let sm = std::sync::Arc::new(StateMachine::open(&dir.path().join("sm")).unwrap());
        let keys: Vec<Vec<u8>> = (0..200)
            .map(|k| format!("key{k:03}").into_bytes())
            .collect();
        let ks = keys.clone();
        let batch = move |i: u64| -> WriteCmd {
            if i.is_multiple_of(5) {
                WriteCmd::Del(ks[100..].to_vec())
            } else {
                let v = i.to_string().into_bytes();
                WriteCmd::MSet(ks.iter().map(|k| (k.clone(), v.clone())).collect())
            }
        };
        for i in 1..=3 {
            sm.apply_many_in_term(&[(i, Some(&batch(i)))], Some(1))
                .unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (sm, stop) = (sm.clone(), stop.clone());
            let batch = batch.clone();
            std::thread::spawn(move || {
                let mut i = 4;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sm.apply_many_in_term(&[(i, Some(&batch(i)))], Some(1))
                        .unwrap();
                    i += 1;
                }
            })
        };
        for round in 0..12 {
            let file = dir.path().join(format!("snap-{round}"));
            let info = sm.write_snapshot(&file).unwrap();
            let at = info.header.index;
            let other = StateMachine::open(&dir.path().join(format!("load-{round}"))).unwrap();
            let h = other.load_snapshot(&file).unwrap();
            assert_eq!(h.index, at);
            assert_eq!(other.applied(), at);
            // What batch `at` left (batch at-1 when `at` deleted half).
            let (live, val) = if at.is_multiple_of(5) {
                (100, (at - 1).to_string().into_bytes())
            } else {
                (200, at.to_string().into_bytes())
            };
            assert_eq!(other.dbsize().unwrap(), live, "round {round} at {at}");
            for (n, k) in keys.iter().enumerate() {
                let want = (n < live as usize).then(|| val.clone());
                assert_eq!(
                    other.get(k).unwrap(),
                    want,
                    "round {round} at {at}, key {n}"
                );
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(sm.applied() > 20, "the writes kept flowing");
    }

    /// A damaged snapshot file is refused and the state stays as it was.
    #[test]
    fn a_damaged_snapshot_never_replaces_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateMachine::open(&dir.path().join("a")).unwrap();
        a.apply(1, Some(&set("x", "1", SetCond::Always)))
            .unwrap()
            .unwrap();
        let file = dir.path().join("snap");
        a.write_snapshot(&file).unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        b.apply(1, Some(&set("y", "2", SetCond::Always)))
            .unwrap()
            .unwrap();
        assert!(b.load_snapshot(&file).is_err());
        assert_eq!(b.get(b"y").unwrap(), Some(b"2".to_vec()));
        b.flush().unwrap();
        drop(b);
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        assert_eq!(
            b.get(b"y").unwrap(),
            Some(b"2".to_vec()),
            "after a restart too"
        );
        assert_eq!(b.get(b"x").unwrap(), None);
    }

    fn at(sm: &StateMachine, index: u64, time: u64, cmd: WriteCmd) -> Reply {
        sm.apply_entries(&[(index, Some(time), Some(&cmd))], Some(1))
            .unwrap()
            .pop()
            .unwrap()
    }

    fn ttl(sm: &StateMachine, key: &str, ms: bool) -> Value {
        sm.read_view(|v| {
            v.read(&ReadCmd::Ttl {
                key: key.into(),
                ms,
                absolute: false,
            })
        })
        .unwrap()
    }

    /// Expiry runs on the entries' clock: a key is visible until an entry
    /// whose time reaches its expiry is applied, then invisible to every
    /// read (while DBSIZE, as in Redis, still counts it), and a reaping
    /// entry removes it and its index entry. The clock never goes back.
    #[test]
    fn keys_expire_on_the_entries_clock_and_reaping_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("sm")).unwrap();
        let set_px = |k: &str, ms: i64| WriteCmd::SetWith {
            key: k.into(),
            value: b"v".to_vec(),
            cond: SetCond::Always,
            ttl: Ttl::In(ms),
            get: false,
            name: "set".into(),
        };
        assert_eq!(at(&sm, 1, 10_000, set_px("k", 1000)), Ok(Value::Ok));
        at(&sm, 2, 10_000, set("plain", "p", SetCond::Always)).unwrap();
        assert_eq!(ttl(&sm, "k", true), Value::Int(1000));
        assert_eq!(ttl(&sm, "plain", false), Value::Int(-1));
        assert_eq!(ttl(&sm, "none", false), Value::Int(-2));
        // Half a second later by the clock (an empty reaping entry).
        at(&sm, 3, 10_500, WriteCmd::Reap(vec![])).unwrap();
        assert_eq!(ttl(&sm, "k", true), Value::Int(500));
        assert_eq!(ttl(&sm, "k", false), Value::Int(1));
        assert_eq!(sm.get(b"k").unwrap(), Some(b"v".to_vec()));
        // An entry from a leader whose clock is behind: time holds.
        at(&sm, 4, 9_000, WriteCmd::Reap(vec![])).unwrap();
        assert_eq!(ttl(&sm, "k", true), Value::Int(500));
        // The expiry time reached: gone for reads, still counted.
        at(&sm, 5, 11_000, WriteCmd::Reap(vec![])).unwrap();
        assert_eq!(sm.get(b"k").unwrap(), None);
        assert_eq!(ttl(&sm, "k", false), Value::Int(-2));
        let keys = sm
            .read_view(|v| v.read(&ReadCmd::Keys(b"*".to_vec())))
            .unwrap();
        assert_eq!(keys, Value::List(vec![Value::Bulk(b"plain".to_vec())]));
        assert_eq!(sm.dbsize().unwrap(), 2);
        let found = sm.read_view(|v| v.expired_keys(11_000, 10)).unwrap();
        assert_eq!(found, vec![b"k".to_vec()]);
        // Writes see it as absent: SETNX succeeds.
        assert_eq!(
            at(&sm, 6, 11_000, WriteCmd::SetNx("k".into(), "new".into())),
            Ok(Value::Int(1))
        );
        assert_eq!(ttl(&sm, "k", false), Value::Int(-1), "SETNX sets no expiry");
        assert!(!sm.read_view(|v| v.has_expiring_keys()).unwrap());
        // Reaping removes only what is still expired.
        at(&sm, 7, 11_000, set_px("r", 10)).unwrap();
        at(&sm, 8, 11_000, set_px("s", 10_000)).unwrap();
        assert_eq!(
            at(&sm, 9, 11_020, WriteCmd::Reap(vec!["r".into(), "s".into()])),
            Ok(Value::Int(1))
        );
        assert_eq!(sm.dbsize().unwrap(), 3);
        assert_eq!(sm.get(b"s").unwrap(), Some(b"v".to_vec()));
        let left = sm.read_view(|v| v.expired_keys(u64::MAX - 1, 10)).unwrap();
        assert_eq!(left, vec![b"s".to_vec()], "the index holds s alone");
    }

    /// Which writes keep, move or drop an expiry, and EXPIRE's conditions.
    #[test]
    fn writes_keep_move_or_drop_expiry_as_redis_does() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("sm")).unwrap();
        let mut i = 0;
        let mut run = |cmd: WriteCmd| {
            i += 1;
            at(&sm, i, 50_000, cmd)
        };
        let expire = |k: &str, secs: i64, cond: ExpireCond| WriteCmd::Expire {
            key: k.into(),
            at: Ttl::In(secs * 1000),
            cond,
            name: "expire".into(),
        };
        let none = ExpireCond::default();
        run(set("a", "1", SetCond::Always)).unwrap();
        assert_eq!(run(expire("a", 100, none)), Ok(Value::Int(1)));
        run(WriteCmd::Append("a".into(), "2".into())).unwrap();
        run(WriteCmd::IncrBy("a".into(), 1)).unwrap();
        assert_eq!(
            ttl(&sm, "a", false),
            Value::Int(100),
            "APPEND, INCR keep it"
        );
        run(WriteCmd::Rename {
            from: "a".into(),
            to: "b".into(),
            nx: false,
        })
        .unwrap();
        assert_eq!(ttl(&sm, "b", false), Value::Int(100), "RENAME moves it");
        let nx = ExpireCond { nx: true, ..none };
        let gt = ExpireCond { gt: true, ..none };
        let lt = ExpireCond { lt: true, ..none };
        let xx = ExpireCond { xx: true, ..none };
        assert_eq!(run(expire("b", 50, nx)), Ok(Value::Int(0)));
        assert_eq!(run(expire("b", 50, gt)), Ok(Value::Int(0)));
        assert_eq!(run(expire("b", 50, lt)), Ok(Value::Int(1)));
        assert_eq!(ttl(&sm, "b", false), Value::Int(50));
        assert_eq!(run(WriteCmd::Persist("b".into())), Ok(Value::Int(1)));
        assert_eq!(run(WriteCmd::Persist("b".into())), Ok(Value::Int(0)));
        assert_eq!(run(expire("b", 50, xx)), Ok(Value::Int(0)));
        assert_eq!(run(expire("b", 50, gt)), Ok(Value::Int(0)), "none is never");
        assert_eq!(run(expire("b", 50, lt)), Ok(Value::Int(1)), "none is never");
        run(set("b", "x", SetCond::Always)).unwrap();
        assert_eq!(ttl(&sm, "b", false), Value::Int(-1), "SET drops it");
        run(WriteCmd::SetWith {
            key: "b".into(),
            value: b"y".to_vec(),
            cond: SetCond::Always,
            ttl: Ttl::Keep,
            get: false,
            name: "set".into(),
        })
        .unwrap();
        assert_eq!(ttl(&sm, "b", false), Value::Int(-1), "KEEPTTL of none");
        // A time already past removes the key.
        assert_eq!(run(expire("b", -1, none)), Ok(Value::Int(1)));
        assert_eq!(sm.get(b"b").unwrap(), None);
        assert_eq!(sm.dbsize().unwrap(), 0);
        assert_eq!(run(expire("b", 10, none)), Ok(Value::Int(0)), "no key");
        // Overflow is Redis's error.
        let far = WriteCmd::Expire {
            key: "c".into(),
            at: Ttl::In(i64::MAX),
            cond: none,
            name: "pexpire".into(),
        };
        run(set("c", "1", SetCond::Always)).unwrap();
        assert_eq!(
            run(far),
            Err(KvError::Other(
                "invalid expire time in 'pexpire' command".into()
            ))
        );
        // SET ... GET answers the old value; GETEX changes the expiry.
        let r = run(WriteCmd::SetWith {
            key: "c".into(),
            value: b"2".to_vec(),
            cond: SetCond::Always,
            ttl: Ttl::In(5000),
            get: true,
            name: "set".into(),
        });
        assert_eq!(r, Ok(Value::Bulk(b"1".to_vec())));
        assert_eq!(ttl(&sm, "c", true), Value::Int(5000));
        let r = run(WriteCmd::GetEx {
            key: "c".into(),
            opt: "PERSIST".into(),
            time: Vec::new(),
        });
        assert_eq!(r, Ok(Value::Bulk(b"2".to_vec())));
        assert_eq!(ttl(&sm, "c", true), Value::Int(-1));
    }

    /// A snapshot carries expiry times and the clock; the loaded state
    /// expires the same keys at the same entries, and its index is rebuilt.
    /// Values stored before they carried a tag are tagged when opened.
    #[test]
    fn snapshots_carry_expiry_and_old_values_are_tagged() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateMachine::open(&dir.path().join("a")).unwrap();
        at(
            &a,
            1,
            7_000,
            WriteCmd::SetWith {
                key: "k".into(),
                value: b"v".to_vec(),
                cond: SetCond::Always,
                ttl: Ttl::In(2_000),
                get: false,
                name: "set".into(),
            },
        )
        .unwrap();
        let file = dir.path().join("snap");
        let info = a.write_snapshot(&file).unwrap();
        assert_eq!(info.header.clock, 7_000);
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        b.load_snapshot(&file).unwrap();
        assert_eq!(ttl(&b, "k", true), Value::Int(2_000));
        assert_eq!(
            b.read_view(|v| v.expired_keys(9_000, 10)).unwrap(),
            vec![b"k".to_vec()]
        );
        at(&b, 2, 9_000, WriteCmd::Reap(vec!["k".into()])).unwrap();
        assert_eq!(b.dbsize().unwrap(), 0);
        // A database whose values are plain strings (the first redb layout).
        drop(b);
        {
            let gen = std::fs::read_to_string(dir.path().join("b").join(CURRENT)).unwrap();
            let path = dir.path().join("b").join(gen.trim()).join(DB_FILE);
            // Closed on a thread of its own: wait for its lock to go.
            let db = (0..400)
                .find_map(|_| {
                    redb::Database::create(&path).ok().or_else(|| {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        None
                    })
                })
                .expect("the database reopens");
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(KV).unwrap();
                for i in 0..5000u64 {
                    let k = dkey(format!("old{i}").as_bytes());
                    t.insert(k.as_slice(), format!("raw{i}").as_bytes())
                        .unwrap();
                }
                t.insert(COUNT, 5000u64.to_be_bytes().as_slice()).unwrap();
                t.remove(FORMAT).unwrap();
            }
            txn.commit().unwrap();
        }
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        assert_eq!(b.get(b"old0").unwrap(), Some(b"raw0".to_vec()));
        assert_eq!(b.get(b"old4999").unwrap(), Some(b"raw4999".to_vec()));
        assert_eq!(b.dbsize().unwrap(), 5000);
        drop(b);
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        assert_eq!(
            b.get(b"old17").unwrap(),
            Some(b"raw17".to_vec()),
            "tagged once"
        );
    }

    /// WATCH at apply time: a watched key written or removed after the
    /// watch's index makes EXEC a null reply on every node; untouched keys
    /// (present or absent) let it run. Versions and deletion marks survive
    /// a snapshot, so a node that loaded one decides alike.
    #[test]
    fn exec_after_watch_runs_only_if_no_watched_key_changed() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("a")).unwrap();
        let watched = |since: u64, k: &str| WriteCmd::ExecWatched {
            keys: vec![(k.into(), since)],
            cmds: vec![TxCmd::Write(set(
                "c",
                &format!("at{since}"),
                SetCond::Always,
            ))],
        };
        let ran = |r: Result<Reply, KvError>| match r.unwrap() {
            Ok(Value::List(_)) => true,
            Ok(Value::NilArray) => false,
            other => panic!("{other:?}"),
        };
        sm.apply(1, Some(&set("a", "1", SetCond::Always)))
            .unwrap()
            .unwrap();
        sm.apply(2, Some(&set("b", "1", SetCond::Always)))
            .unwrap()
            .unwrap();
        assert!(ran(sm.apply(3, Some(&watched(2, "a")))), "untouched");
        sm.apply(4, Some(&set("a", "2", SetCond::Always)))
            .unwrap()
            .unwrap();
        assert!(!ran(sm.apply(5, Some(&watched(3, "a")))), "written after");
        assert_eq!(sm.get(b"c").unwrap(), Some(b"at2".to_vec()), "did not run");
        assert!(
            ran(sm.apply(6, Some(&watched(4, "a")))),
            "written at, not after"
        );
        assert!(
            ran(sm.apply(7, Some(&watched(6, "m")))),
            "absent throughout"
        );
        sm.apply(8, Some(&set("m", "1", SetCond::Always)))
            .unwrap()
            .unwrap();
        sm.apply(9, Some(&WriteCmd::Del(vec!["m".into()])))
            .unwrap()
            .unwrap();
        assert!(
            !ran(sm.apply(10, Some(&watched(7, "m")))),
            "created and removed"
        );
        assert!(ran(sm.apply(11, Some(&watched(9, "m")))), "removed before");
        // The same decisions on a node that loaded a snapshot.
        let file = dir.path().join("snap");
        sm.write_snapshot(&file).unwrap();
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        b.load_snapshot(&file).unwrap();
        assert!(!ran(b.apply(12, Some(&watched(3, "a")))));
        assert!(ran(b.apply(13, Some(&watched(4, "a")))));
        assert!(!ran(b.apply(14, Some(&watched(7, "m")))));
        assert!(ran(b.apply(15, Some(&watched(9, "m")))));
    }

    /// Hashes: a type of their own (WRONGTYPE both ways), removed when
    /// their last field goes, keeping their expiry when changed, moved by
    /// RENAME, and the same after a snapshot.
    #[test]
    fn hashes_are_a_type_of_their_own_and_survive_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachine::open(&dir.path().join("a")).unwrap();
        let mut i = 0;
        let mut run = |cmd: WriteCmd| {
            i += 1;
            at(&sm, i, 1_000, cmd)
        };
        let hset = |pairs: &[(&str, &str)]| WriteCmd::HSet {
            key: "h".into(),
            pairs: pairs
                .iter()
                .map(|(f, v)| (f.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            ok: false,
        };
        assert_eq!(run(hset(&[("a", "1"), ("b", "2")])), Ok(Value::Int(2)));
        assert_eq!(run(hset(&[("a", "9"), ("c", "3")])), Ok(Value::Int(1)));
        let read = |sm: &StateMachine, h: HashRead| {
            sm.read_view(|v| v.read(&ReadCmd::Hash("h".into(), h)))
        };
        assert_eq!(
            read(&sm, HashRead::Keys),
            Ok(Value::List(vec![
                Value::Bulk(b"a".to_vec()),
                Value::Bulk(b"b".to_vec()),
                Value::Bulk(b"c".to_vec())
            ])),
            "insertion order"
        );
        assert_eq!(sm.get(b"h"), Err(KvError::WrongType));
        assert_eq!(
            run(WriteCmd::Append("h".into(), "x".into())),
            Err(KvError::WrongType)
        );
        run(set("s", "v", SetCond::Always)).unwrap();
        assert_eq!(
            run(WriteCmd::HSet {
                key: "s".into(),
                pairs: vec![(b"f".to_vec(), b"v".to_vec())],
                ok: false
            }),
            Err(KvError::WrongType)
        );
        assert_eq!(
            sm.read_view(|v| v.read(&ReadCmd::Type("h".into()))),
            Ok(Value::Status("hash".into()))
        );
        let mget = sm.read_view(|v| v.read(&ReadCmd::MGet(vec!["h".into(), "s".into()])));
        assert_eq!(mget, Ok(Value::Array(vec![None, Some(b"v".to_vec())])));
        run(WriteCmd::Expire {
            key: "h".into(),
            at: Ttl::In(5_000),
            cond: ExpireCond::default(),
            name: "expire".into(),
        })
        .unwrap();
        assert_eq!(
            run(WriteCmd::HIncrBy("h".into(), "a".into(), 1)),
            Ok(Value::Int(10))
        );
        assert_eq!(
            ttl(&sm, "h", true),
            Value::Int(5_000),
            "a change keeps the expiry"
        );
        run(WriteCmd::Rename {
            from: "h".into(),
            to: "h2".into(),
            nx: false,
        })
        .unwrap();
        run(WriteCmd::Rename {
            from: "h2".into(),
            to: "h".into(),
            nx: false,
        })
        .unwrap();
        assert_eq!(
            read(&sm, HashRead::Get(b"a".to_vec())),
            Ok(Value::Bulk(b"10".to_vec()))
        );
        let file = dir.path().join("snap");
        sm.write_snapshot(&file).unwrap();
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        b.load_snapshot(&file).unwrap();
        assert_eq!(read(&b, HashRead::Len), Ok(Value::Int(3)));
        assert_eq!(ttl(&b, "h", true), Value::Int(5_000));
        assert_eq!(
            run(WriteCmd::HDel(
                "h".into(),
                vec!["a".into(), "b".into(), "c".into(), "z".into()]
            )),
            Ok(Value::Int(3))
        );
        assert_eq!(
            sm.read_view(|v| v.read(&ReadCmd::Exists(vec!["h".into()]))),
            Ok(Value::Int(0)),
            "the last field took the key with it"
        );
        assert!(!sm.read_view(|v| v.has_expiring_keys()).unwrap());
    }

    /// Lists and sets keep their type, order and expiry through a snapshot.
    #[test]
    fn lists_and_sets_survive_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateMachine::open(&dir.path().join("a")).unwrap();
        let push = WriteCmd::Push {
            key: "l".into(),
            elems: vec!["x".into(), "y".into(), "z".into()],
            left: true,
        };
        assert_eq!(at(&a, 1, 5, push), Ok(Value::Int(3)));
        let sadd = WriteCmd::SAdd("s".into(), vec!["m".into(), "n".into(), "m".into()]);
        assert_eq!(at(&a, 2, 5, sadd), Ok(Value::Int(2)));
        let file = dir.path().join("snap");
        a.write_snapshot(&file).unwrap();
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        b.load_snapshot(&file).unwrap();
        for sm in [&a, &b] {
            let l = sm.read_view(|v| v.read(&ReadCmd::Coll("l".into(), CollRead::LRange(0, -1))));
            let want = ["z", "y", "x"].map(|e| Value::Bulk(e.into())).to_vec();
            assert_eq!(l, Ok(Value::List(want)));
            let t = sm.read_view(|v| v.read(&ReadCmd::Type("s".into())));
            assert_eq!(t, Ok(Value::Status("set".into())));
            let card = sm.read_view(|v| v.read(&ReadCmd::Coll("s".into(), CollRead::SCard)));
            assert_eq!(card, Ok(Value::Int(2)));
        }
    }

    /// A sorted set stays in (score, member) order through changes and a
    /// snapshot; scores print as Redis prints them.
    #[test]
    fn sorted_sets_keep_score_order_through_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateMachine::open(&dir.path().join("a")).unwrap();
        let zadd = |pairs: &[(f64, &str)]| WriteCmd::ZAdd {
            key: "z".into(),
            pairs: pairs
                .iter()
                .map(|(s, m)| (s.to_bits(), m.as_bytes().to_vec()))
                .collect(),
            cond: SetCond::Always,
            cmp: 0,
            ch: false,
            incr: false,
        };
        assert_eq!(
            at(&a, 1, 5, zadd(&[(2.0, "b"), (1.5, "c"), (2.0, "a")])),
            Ok(Value::Int(3))
        );
        assert_eq!(
            at(
                &a,
                2,
                5,
                WriteCmd::ZIncrBy("z".into(), 1.0f64.to_bits(), "c".into())
            ),
            Ok(Value::Double("2.5".into()))
        );
        let file = dir.path().join("snap");
        a.write_snapshot(&file).unwrap();
        let b = StateMachine::open(&dir.path().join("b")).unwrap();
        b.load_snapshot(&file).unwrap();
        for sm in [&a, &b] {
            let r = sm.read_view(|v| {
                v.read(&ReadCmd::Z(
                    "z".into(),
                    ZRead::Range {
                        by_score: false,
                        start: b"0".to_vec(),
                        stop: b"-1".to_vec(),
                        rev: false,
                        limit: None,
                        with_scores: false,
                    },
                ))
            });
            let want = ["a", "b", "c"].map(|m| Value::Bulk(m.into())).to_vec();
            assert_eq!(r, Ok(Value::List(want)), "ties by member, then by score");
        }
        assert_eq!(crate::command::format_double(3.0), "3");
        assert_eq!(crate::command::format_double(-0.0), "-0");
        assert_eq!(crate::command::format_double(f64::NEG_INFINITY), "-inf");
        assert_eq!(crate::command::format_double(0.1), "0.1");
    }
}
