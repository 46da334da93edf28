//! The state machine: committed writes applied to a sled tree, with the applied
//! index written in the same atomic batch as the data it covers. After a
//! restart the store resumes exactly after the last applied entry: nothing is
//! lost (the Raft log re-delivers the rest) and nothing is applied twice.

use crate::command::{Outcome, SetCond, WriteCmd};
use std::path::Path;
use tokio::sync::watch;

const APPLIED: &[u8] = b"m:applied";
const COUNT: &[u8] = b"m:count";
const DATA: &[u8] = b"d:";

/// The key-value state machine.
#[derive(Debug)]
pub struct StateMachine {
    db: sled::Db,
    applied_tx: watch::Sender<u64>,
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
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        // No periodic fsync: the Raft log is the durable record, and the applied
        // index travels with the data, so after a crash the log re-delivers
        // whatever the state machine lost. Skipping it keeps the disk free for
        // the log's own flushes. Shutdown flushes explicitly.
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                anyhow::anyhow!("{}: cannot open the state machine: {e}", path.display())
            })?;
        let applied = u64_of(db.get(APPLIED)?);
        let (applied_tx, _) = watch::channel(applied);
        Ok(StateMachine { db, applied_tx })
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
    pub fn apply(&self, index: u64, cmd: Option<&WriteCmd>) -> anyhow::Result<Outcome> {
        if index <= self.applied() {
            // Already applied before a restart: never apply twice.
            return Ok(Outcome::Error("ERR already applied".into()));
        }
        let mut b = sled::Batch::default();
        let mut count = u64_of(self.db.get(COUNT)?);
        let count_before = count;
        let outcome = match cmd {
            None => Outcome::Ok,
            Some(cmd) => self.stage(cmd, &mut b, &mut count)?,
        };
        if count != count_before {
            b.insert(COUNT, &count.to_be_bytes());
        }
        b.insert(APPLIED, &index.to_be_bytes());
        self.db.apply_batch(b)?;
        self.applied_tx.send_replace(index);
        Ok(outcome)
    }

    fn stage(
        &self,
        cmd: &WriteCmd,
        b: &mut sled::Batch,
        count: &mut u64,
    ) -> anyhow::Result<Outcome> {
        Ok(match cmd {
            WriteCmd::Set { key, value, cond } => {
                let exists = self.db.contains_key(dkey(key))?;
                let go = match cond {
                    SetCond::Always => true,
                    SetCond::IfAbsent => !exists,
                    SetCond::IfPresent => exists,
                };
                if !go {
                    return Ok(Outcome::Nil);
                }
                if !exists {
                    *count += 1;
                }
                b.insert(dkey(key), value.as_slice());
                Outcome::Ok
            }
            WriteCmd::Del(keys) => {
                let mut n = 0;
                let mut seen = std::collections::HashSet::new();
                for k in keys {
                    if seen.insert(k) && self.db.contains_key(dkey(k))? {
                        n += 1;
                        b.remove(dkey(k));
                    }
                }
                *count -= n as u64;
                Outcome::Int(n)
            }
            WriteCmd::MSet(pairs) => {
                let mut fresh = std::collections::HashSet::new();
                for (k, v) in pairs {
                    if !self.db.contains_key(dkey(k))? && fresh.insert(k) {
                        *count += 1;
                    }
                    b.insert(dkey(k), v.as_slice());
                }
                Outcome::Ok
            }
            WriteCmd::IncrBy(key, delta) => {
                let cur = self.db.get(dkey(key))?;
                let n: i64 = match &cur {
                    None => 0,
                    Some(v) => match std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                        Some(n) => n,
                        None => {
                            return Ok(Outcome::Error(
                                "ERR value is not an integer or out of range".into(),
                            ))
                        }
                    },
                };
                let Some(new) = n.checked_add(*delta) else {
                    return Ok(Outcome::Error(
                        "ERR increment or decrement would overflow".into(),
                    ));
                };
                if cur.is_none() {
                    *count += 1;
                }
                b.insert(dkey(key), new.to_string().as_bytes());
                Outcome::Int(new)
            }
            WriteCmd::Cas { key, expected, new } => {
                let cur = self.db.get(dkey(key))?;
                if cur.as_deref() == Some(expected.as_slice()) {
                    b.insert(dkey(key), new.as_slice());
                    Outcome::Int(1)
                } else {
                    Outcome::Int(0)
                }
            }
        })
    }

    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.db.get(dkey(key))?.map(|v| v.to_vec()))
    }

    /// The number of keys.
    pub fn dbsize(&self) -> anyhow::Result<u64> {
        Ok(u64_of(self.db.get(COUNT)?))
    }

    /// Every key and value, in key order (tests compare replicas with it).
    pub fn dump(&self) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.db
            .scan_prefix(DATA)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k[DATA.len()..].to_vec(), v.to_vec()))
            })
            .collect()
    }

    /// Makes applied state durable (on shutdown).
    pub fn flush(&self) -> anyhow::Result<()> {
        self.db.flush()?;
        Ok(())
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
            assert_eq!(sm.apply(1, None).unwrap(), Outcome::Ok);
            assert_eq!(
                sm.apply(2, Some(&set("a", "1", SetCond::Always))).unwrap(),
                Outcome::Ok
            );
            assert_eq!(
                sm.apply(3, Some(&set("a", "2", SetCond::IfAbsent)))
                    .unwrap(),
                Outcome::Nil
            );
            assert_eq!(
                sm.apply(4, Some(&set("b", "x", SetCond::IfPresent)))
                    .unwrap(),
                Outcome::Nil
            );
            assert_eq!(
                sm.apply(5, Some(&WriteCmd::IncrBy("a".into(), 41)))
                    .unwrap(),
                Outcome::Int(42)
            );
            assert_eq!(
                sm.apply(6, Some(&WriteCmd::IncrBy("a".into(), i64::MAX)))
                    .unwrap(),
                Outcome::Error("ERR increment or decrement would overflow".into())
            );
            let cas = |e: &str, n: &str| WriteCmd::Cas {
                key: "a".into(),
                expected: e.into(),
                new: n.into(),
            };
            assert_eq!(sm.apply(7, Some(&cas("41", "x"))).unwrap(), Outcome::Int(0));
            assert_eq!(sm.apply(8, Some(&cas("42", "x"))).unwrap(), Outcome::Int(1));
            assert_eq!(
                sm.apply(9, Some(&WriteCmd::IncrBy("a".into(), 1))).unwrap(),
                Outcome::Error("ERR value is not an integer or out of range".into())
            );
            sm.apply(
                10,
                Some(&WriteCmd::MSet(vec![
                    ("c".into(), "3".into()),
                    ("d".into(), "4".into()),
                    ("c".into(), "5".into()),
                ])),
            )
            .unwrap();
            assert_eq!(sm.dbsize().unwrap(), 3);
            assert_eq!(
                sm.apply(
                    11,
                    Some(&WriteCmd::Del(vec!["c".into(), "c".into(), "zz".into()]))
                )
                .unwrap(),
                Outcome::Int(1)
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
            Outcome::Error(_)
        ));
        assert_eq!(sm.get(b"a").unwrap(), Some(b"x".to_vec()));
    }
}
