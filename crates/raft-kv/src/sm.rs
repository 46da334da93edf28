//! The state machine: committed writes applied to a sled tree, with the applied
//! index written in the same atomic batch as the data it covers. After a
//! restart the store resumes exactly after the last applied entry: nothing is
//! lost (the Raft log re-delivers the rest) and nothing is applied twice.
//!
//! Reads of several keys (MGET, EXISTS, DBSIZE with its keys) go through a
//! [`ReadView`]: a sled batch is atomic on disk, but a reader doing one `get`
//! per key could otherwise see some keys before a batch and others after it.
//! A read-write gate makes each applied batch and each view exclusive.

use crate::command::{ReadCmd, SetCond, Value, WriteCmd};
use crate::error::{KvError, Reply};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{PoisonError, RwLock};
use tokio::sync::watch;

const APPLIED: &[u8] = b"m:applied";
const COUNT: &[u8] = b"m:count";
const DATA: &[u8] = b"d:";

/// The key-value state machine.
#[derive(Debug)]
pub struct StateMachine {
    db: ClosedElsewhere,
    applied_tx: watch::Sender<u64>,
    /// Held for writing while a batch goes into sled and its index is
    /// published, for reading by a [`ReadView`]: a view sees every batch
    /// entirely or not at all. It guards no data of its own, so a poisoned
    /// gate (a panic elsewhere) is simply taken over.
    gate: RwLock<()>,
}

/// The database handle, closed on a thread of its own when dropped: sled
/// flushes on close, and on a full or hung disk that flush never returns;
/// it must not block an async runtime thread (nor what that thread was
/// about to run). Every write is already durable or re-delivered by the log.
#[derive(Debug)]
struct ClosedElsewhere(Option<sled::Db>);

impl std::ops::Deref for ClosedElsewhere {
    type Target = sled::Db;
    fn deref(&self) -> &sled::Db {
        // Only `drop` takes it out.
        self.0.as_ref().expect("the database is open until dropped")
    }
}

impl Drop for ClosedElsewhere {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("sm-close".into())
                .spawn(move || drop(db));
        }
    }
}

/// A view of one applied state: every read through it sees the same batches.
/// Get one with [`StateMachine::read_view`]; the applier waits while it lives.
#[derive(Debug)]
pub struct ReadView<'a> {
    db: &'a sled::Db,
}

impl ReadView<'_> {
    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.db.get(dkey(key))?.map(|v| v.to_vec()))
    }

    /// Whether a key exists.
    pub fn exists(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.db.contains_key(dkey(key))?)
    }

    /// The number of keys.
    pub fn dbsize(&self) -> Result<u64, KvError> {
        Ok(u64_of(self.db.get(COUNT)?))
    }

    /// Answers a read from this view.
    pub fn read(&self, cmd: &ReadCmd) -> Reply {
        Ok(match cmd {
            ReadCmd::Get(k) => self.get(k)?.map_or(Value::Nil, Value::Bulk),
            ReadCmd::MGet(keys) => {
                Value::Array(keys.iter().map(|k| self.get(k)).collect::<Result<_, _>>()?)
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
            ReadCmd::StrLen(k) => Value::Int(self.get(k)?.map_or(0, |v| v.len() as i64)),
            ReadCmd::DbSize => Value::Int(self.dbsize()? as i64),
        })
    }

    /// The index of the last entry this view covers.
    pub fn applied(&self) -> Result<u64, KvError> {
        Ok(u64_of(self.db.get(APPLIED)?))
    }
}

fn dkey(k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.len() + 2);
    v.extend_from_slice(DATA);
    v.extend_from_slice(k);
    v
}

fn u64_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

impl StateMachine {
    /// Opens (or creates) the state machine in `path`.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        // No periodic fsync: the Raft log is the durable record, and the applied
        // index travels with the data, so after a crash the log re-delivers
        // whatever the state machine lost. Skipping it keeps the disk free for
        // the log's own flushes. Shutdown flushes explicitly.
        // A handle closed just before (on its own thread, see
        // `ClosedElsewhere`) may still hold sled's file lock for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match sled::Config::new().path(path).flush_every_ms(None).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(KvError::Storage(format!(
                        "{}: cannot open the state machine: {e}",
                        path.display()
                    )))
                }
            }
        };
        let applied = u64_of(db.get(APPLIED)?);
        let (applied_tx, _) = watch::channel(applied);
        Ok(StateMachine {
            db: ClosedElsewhere(Some(db)),
            applied_tx,
            gate: RwLock::new(()),
        })
    }

    /// The index of the last applied entry.
    pub fn applied(&self) -> u64 {
        *self.applied_tx.borrow()
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

    /// Applies consecutive entries as one atomic sled batch that also records
    /// the last index. Entries at or below the applied index are skipped
    /// (never applied twice) and answered with an error outcome. There is one
    /// applier (the node's apply loop); read views see the batch entirely or
    /// not at all.
    pub fn apply_many(&self, entries: &[(u64, Option<&WriteCmd>)]) -> Result<Vec<Reply>, KvError> {
        let applied = self.applied();
        let mut st = Staged {
            db: &self.db,
            writes: HashMap::new(),
            count: u64_of(self.db.get(COUNT)?),
        };
        let count_before = st.count;
        let mut last = applied;
        let mut outcomes = Vec::with_capacity(entries.len());
        for &(index, cmd) in entries {
            if index <= last {
                outcomes.push(Err(KvError::AlreadyApplied));
                continue;
            }
            last = index;
            outcomes.push(match cmd {
                None => Ok(Value::Ok),
                Some(cmd) => st.stage(cmd)?,
            });
        }
        if last == applied {
            return Ok(outcomes);
        }
        let mut b = sled::Batch::default();
        for (k, v) in st.writes {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        if st.count != count_before {
            b.insert(COUNT, &st.count.to_be_bytes());
        }
        b.insert(APPLIED, &last.to_be_bytes());
        // Staging above only read: the one applier is the only writer. The
        // gate covers what readers could see change.
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.db.apply_batch(b)?;
        self.applied_tx.send_replace(last);
        Ok(outcomes)
    }

    /// Runs `f` on a view of one applied state: all the keys a command reads
    /// (MGET, multi-key EXISTS, DBSIZE) come from the same batches. Batches
    /// wait until `f` returns, so keep it short and never block in it.
    pub fn read_view<T>(&self, f: impl FnOnce(&ReadView<'_>) -> T) -> T {
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        f(&ReadView { db: &self.db })
    }

    /// [`StateMachine::read_view`] if no batch is being applied right now;
    /// `None` otherwise (async callers wait without blocking their thread,
    /// which a stalled batch could hold forever).
    pub fn try_read_view<T>(&self, f: impl FnOnce(&ReadView<'_>) -> T) -> Option<T> {
        let _gate = match self.gate.try_read() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(f(&ReadView { db: &self.db }))
    }

    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read_view(|v| v.get(key))
    }

    /// The number of keys.
    pub fn dbsize(&self) -> Result<u64, KvError> {
        self.read_view(|v| v.dbsize())
    }

    /// Makes applied state durable (on shutdown).
    pub fn flush(&self) -> Result<(), KvError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Writes of one batch not yet in sled: reads see them first.
struct Staged<'a> {
    db: &'a sled::Db,
    /// Data key -> new value, or `None` for deleted.
    writes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    count: u64,
}

impl Staged<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let k = dkey(key);
        if let Some(v) = self.writes.get(&k) {
            return Ok(v.clone());
        }
        Ok(self.db.get(k)?.map(|v| v.to_vec()))
    }

    fn exists(&self, key: &[u8]) -> Result<bool, KvError> {
        let k = dkey(key);
        if let Some(v) = self.writes.get(&k) {
            return Ok(v.is_some());
        }
        Ok(self.db.contains_key(k)?)
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), KvError> {
        let existed = self.exists(key)?;
        self.put_known(key, value, existed);
        Ok(())
    }

    /// `put` when the caller already looked the key up.
    fn put_known(&mut self, key: &[u8], value: Vec<u8>, existed: bool) {
        if !existed {
            self.count += 1;
        }
        self.writes.insert(dkey(key), Some(value));
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool, KvError> {
        if !self.exists(key)? {
            return Ok(false);
        }
        self.count -= 1;
        self.writes.insert(dkey(key), None);
        Ok(true)
    }

    /// Stages one write; the outer error is a storage failure, the inner
    /// one the command's own result.
    fn stage(&mut self, cmd: &WriteCmd) -> Result<Reply, KvError> {
        Ok(Ok(match cmd {
            WriteCmd::Set { key, value, cond } => {
                let exists = self.exists(key)?;
                let go = match cond {
                    SetCond::Always => true,
                    SetCond::IfAbsent => !exists,
                    SetCond::IfPresent => exists,
                };
                if !go {
                    return Ok(Ok(Value::Nil));
                }
                self.put_known(key, value.clone(), exists);
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
                    self.put(k, v.clone())?;
                }
                Value::Ok
            }
            WriteCmd::IncrBy(key, delta) => {
                let n: i64 = match self.get(key)? {
                    None => 0,
                    Some(v) => match std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()) {
                        Some(n) => n,
                        None => return Ok(Err(KvError::NotAnInteger)),
                    },
                };
                let Some(new) = n.checked_add(*delta) else {
                    return Ok(Err(KvError::Overflow));
                };
                self.put(key, new.to_string().into_bytes())?;
                Value::Int(new)
            }
            WriteCmd::Cas { key, expected, new } => {
                if self.get(key)?.as_deref() == Some(expected.as_slice()) {
                    self.put(key, new.clone())?;
                    Value::Int(1)
                } else {
                    Value::Int(0)
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    /// it sees. (With the gate taken out of `read_view`, 380 to 790 reads of
    /// 5,000 to 11,000 tore in each of five runs.)
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
                    let cmd = if i % 5 == 0 {
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
}
