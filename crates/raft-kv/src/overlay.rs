//! The state machine's layers: the keys written since the last flush, in
//! memory, over the redb table the flushes built.
//!
//! An applied batch writes only to memory (`active`). A flush freezes
//! `active` (it becomes `frozen`; a new, empty `active` takes the next
//! batches), writes it to redb in one transaction, in key order, and then
//! drops it. A key written many times between flushes reaches the disk
//! once, and a leaf page of the B-tree is copied once per flush rather
//! than once per batch.
//!
//! The maps are persistent (`imbl::OrdMap`): cloning one costs a reference
//! count, and a write after a clone copies only the path to its key. A
//! [`Layers`] value is therefore one applied state that a reader keeps for
//! as long as it likes (a snapshot scan, a `KEYS`) while batches and
//! flushes go on publishing new ones.

use crate::error::KvError;
use imbl::OrdMap;
use std::ops::Bound;
use std::sync::Arc;

/// The redb table every layer rests on.
pub(crate) type ReadTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;
/// Bytes shared between the maps of successive states.
pub(crate) type Shared = Arc<[u8]>;
/// Keys written since a flush: a value, or `None` where a key was removed.
pub(crate) type Mem = OrdMap<Shared, Option<Shared>>;

/// What a memory entry costs beyond its key and value (the map's share of
/// a node, two reference-counted headers), for the flush trigger.
const ENTRY_OVERHEAD: usize = 64;

/// A key or value read from one of the layers.
pub(crate) enum Val {
    Mem(Shared),
    Disk(redb::AccessGuard<'static, &'static [u8]>),
}

impl Val {
    pub(crate) fn value(&self) -> &[u8] {
        match self {
            Val::Mem(b) => b,
            Val::Disk(g) => g.value(),
        }
    }
}

/// One applied state: memory over redb.
#[derive(Clone)]
pub(crate) struct Layers {
    /// Written since the last freeze; the applier writes here.
    pub(crate) active: Mem,
    /// Bytes written to `active` (keys, values, overhead; rewrites count
    /// again): when a flush is due early.
    pub(crate) active_bytes: usize,
    /// Frozen by a flush that has not finished: on its way to `base`.
    pub(crate) frozen: Option<Mem>,
    /// `active_bytes` when `frozen` froze.
    pub(crate) frozen_bytes: usize,
    /// The database as of the last finished flush.
    pub(crate) base: Arc<ReadTable>,
}

impl Layers {
    /// A state that is all in the database.
    pub(crate) fn on(base: Arc<ReadTable>) -> Layers {
        Layers {
            active: Mem::new(),
            active_bytes: 0,
            frozen: None,
            frozen_bytes: 0,
            base,
        }
    }

    /// A key's value, from the newest layer that knows the key.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Val>, KvError> {
        match self.active.get(key) {
            Some(v) => Ok(v.clone().map(Val::Mem)),
            None => self.below_active(key),
        }
    }

    /// A key's value from the frozen layer or the database.
    fn below_active(&self, key: &[u8]) -> Result<Option<Val>, KvError> {
        if let Some(v) = self.frozen.as_ref().and_then(|f| f.get(key)) {
            return Ok(v.clone().map(Val::Mem));
        }
        Ok(self.base.get(key)?.map(Val::Disk))
    }

    /// Writes a key; returns its old value.
    pub(crate) fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<Option<Val>, KvError> {
        self.active_bytes += key.len() + value.len() + ENTRY_OVERHEAD;
        // One walk of `active` when the key is there already. (A failure
        // below fails the whole batch, whose state is then dropped.)
        if let Some(old) = self
            .active
            .insert(Shared::from(key), Some(Shared::from(value)))
        {
            return Ok(old.map(Val::Mem));
        }
        self.below_active(key)
    }

    /// Removes a key; returns its old value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Result<Option<Val>, KvError> {
        let old = self.get(key)?;
        if old.is_some() {
            self.active_bytes += key.len() + ENTRY_OVERHEAD;
            self.active.insert(Shared::from(key), None);
        }
        Ok(old)
    }

    /// The live keys in `[lo, hi)` with their values, in key order.
    pub(crate) fn range(&self, lo: &[u8], hi: &[u8]) -> Result<Merged<'_>, KvError> {
        let bounds = || (Bound::Included(lo), Bound::Excluded(hi));
        Ok(Merged {
            active: { Box::new(self.active.range::<_, [u8]>(bounds())) as MemIter<'_> }.peekable(),
            frozen: self
                .frozen
                .as_ref()
                .map(|f: &Mem| (Box::new(f.range::<_, [u8]>(bounds())) as MemIter<'_>).peekable()),
            base: self.base.range::<&[u8]>(lo..hi)?,
            base_head: None,
        })
    }

    /// Freezes `active`: it becomes `frozen` (to be written to the
    /// database) and a new, empty `active` takes the next writes. Returns
    /// the frozen layer; `None` when there is nothing to write.
    pub(crate) fn freeze(&mut self) -> Option<Mem> {
        if self.active.is_empty() || self.frozen.is_some() {
            return None;
        }
        let frozen = std::mem::take(&mut self.active);
        self.frozen_bytes = std::mem::take(&mut self.active_bytes);
        self.frozen = Some(frozen.clone());
        Some(frozen)
    }

    /// After a flush that could not write the frozen layer: it goes back
    /// into `active`, under what was written since it froze.
    pub(crate) fn thaw_unwritten(&mut self) {
        if let Some(frozen) = self.frozen.take() {
            let active = std::mem::take(&mut self.active);
            self.active = active.union(frozen);
            self.active_bytes += std::mem::take(&mut self.frozen_bytes);
        }
    }

    /// After a flush that wrote the frozen layer: `base` holds it now.
    pub(crate) fn settle(&mut self, base: Arc<ReadTable>) {
        self.frozen = None;
        self.frozen_bytes = 0;
        self.base = base;
    }

    /// Writes the frozen layer's keys to `t`, in key order.
    pub(crate) fn write_to(
        mem: &Mem,
        t: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    ) -> Result<(), KvError> {
        for (k, v) in mem.iter() {
            match v {
                Some(v) => {
                    t.insert(&**k, &**v)?;
                }
                None => {
                    t.remove(&**k)?;
                }
            }
        }
        Ok(())
    }
}

type MemIter<'a> = Box<dyn Iterator<Item = (&'a Shared, &'a Option<Shared>)> + 'a>;
type Guard = redb::AccessGuard<'static, &'static [u8]>;

/// The three layers' ranges merged: for each key, the newest layer's
/// entry; removed keys left out.
pub(crate) struct Merged<'a> {
    active: std::iter::Peekable<MemIter<'a>>,
    frozen: Option<std::iter::Peekable<MemIter<'a>>>,
    base: redb::Range<'static, &'static [u8], &'static [u8]>,
    base_head: Option<(Guard, Guard)>,
}

impl Iterator for Merged<'_> {
    type Item = Result<(Val, Val), KvError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.base_head.is_none() {
                match self.base.next() {
                    Some(Ok(kv)) => self.base_head = Some(kv),
                    Some(Err(e)) => return Some(Err(e.into())),
                    None => {}
                }
            }
            let (in_active, in_frozen, in_base) = {
                let a = self.active.peek().map(|(k, _)| &***k);
                let f = self
                    .frozen
                    .as_mut()
                    .and_then(|it| it.peek())
                    .map(|(k, _)| &***k);
                let b = self.base_head.as_ref().map(|(k, _)| k.value());
                let min = [a, f, b].into_iter().flatten().min()?;
                (a == Some(min), f == Some(min), b == Some(min))
            };
            let mut entry: Option<(Val, Option<Val>)> = None;
            if in_base {
                if let Some((k, v)) = self.base_head.take() {
                    entry = Some((Val::Disk(k), Some(Val::Disk(v))));
                }
            }
            if in_frozen {
                if let Some((k, v)) = self.frozen.as_mut().and_then(|it| it.next()) {
                    entry = Some((Val::Mem(k.clone()), v.clone().map(Val::Mem)));
                }
            }
            if in_active {
                if let Some((k, v)) = self.active.next() {
                    entry = Some((Val::Mem(k.clone()), v.clone().map(Val::Mem)));
                }
            }
            match entry? {
                (k, Some(v)) => return Some(Ok((k, v))),
                // Removed in a newer layer.
                (_, None) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableDatabase as _;
    use std::collections::BTreeMap;

    const T: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("t");

    fn base(db: &redb::Database) -> Arc<ReadTable> {
        Arc::new(db.begin_read().unwrap().open_table(T).unwrap())
    }

    /// A database with the table, empty.
    fn empty_db(dir: &tempfile::TempDir) -> redb::Database {
        let db = redb::Database::create(dir.path().join("db")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap();
        txn.commit().unwrap();
        db
    }

    /// What a flush does: the frozen layer into the database, then the
    /// layers rest on it.
    fn write_frozen(db: &redb::Database, l: &mut Layers, frozen: &Mem) {
        let txn = db.begin_write().unwrap();
        Layers::write_to(frozen, &mut txn.open_table(T).unwrap()).unwrap();
        txn.commit().unwrap();
        l.settle(base(db));
    }

    /// Random writes and removes over a few hundred keys, frozen, written
    /// to the database, thawed after a failure, at random moments: every
    /// get and every range agrees with a plain map.
    #[test]
    fn layers_read_as_one_map_through_freezes_and_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = empty_db(&dir);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut l = Layers::on(base(&db));
        let mut checked_ranges = 0;
        for step in 0..20_000u32 {
            let k = format!("k{:03}", rng.u32(..300)).into_bytes();
            match rng.u32(..100) {
                0..=54 => {
                    let v = step.to_be_bytes();
                    let old = l.insert(&k, &v).unwrap().map(|v| v.value().to_vec());
                    assert_eq!(old, model.insert(k, v.to_vec()));
                }
                55..=84 => {
                    let old = l.remove(&k).unwrap().map(|v| v.value().to_vec());
                    assert_eq!(old, model.remove(&k));
                }
                85..=89 => {
                    let _ = l.freeze();
                }
                90..=93 => {
                    if let Some(f) = l.frozen.clone() {
                        write_frozen(&db, &mut l, &f);
                    }
                }
                94 => l.thaw_unwritten(),
                _ => {
                    let a = format!("k{:03}", rng.u32(..300)).into_bytes();
                    let b = format!("k{:03}", rng.u32(..310)).into_bytes();
                    let got: Vec<(Vec<u8>, Vec<u8>)> = l
                        .range(&a, &b)
                        .unwrap()
                        .map(|kv| {
                            let (k, v) = kv.unwrap();
                            (k.value().to_vec(), v.value().to_vec())
                        })
                        .collect();
                    let want: Vec<(Vec<u8>, Vec<u8>)> = if a <= b {
                        model
                            .range(a.clone()..b.clone())
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    assert_eq!(got, want, "range {a:?}..{b:?} at step {step}");
                    checked_ranges += 1;
                }
            }
            let probe = format!("k{:03}", rng.u32(..300)).into_bytes();
            assert_eq!(
                l.get(&probe).unwrap().map(|v| v.value().to_vec()),
                model.get(&probe).cloned(),
                "get {probe:?} at step {step}"
            );
        }
        assert!(checked_ranges > 500);
    }

    /// A reader's copy of the layers keeps its state while the writer goes
    /// on: one applied state, whatever happens after.
    #[test]
    fn a_cloned_state_does_not_change_under_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = empty_db(&dir);
        let mut l = Layers::on(base(&db));
        for i in 0..1000u32 {
            l.insert(&i.to_be_bytes(), b"old").unwrap();
        }
        let seen = l.clone();
        let frozen = l.freeze().unwrap();
        for i in 0..1000u32 {
            if i % 2 == 0 {
                l.remove(&i.to_be_bytes()).unwrap();
            } else {
                l.insert(&i.to_be_bytes(), b"new").unwrap();
            }
        }
        write_frozen(&db, &mut l, &frozen);
        let all: Vec<Vec<u8>> = seen
            .range(&[0u8; 4], &[0xffu8; 4])
            .unwrap()
            .map(|kv| kv.unwrap().1.value().to_vec())
            .collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(|v| v == b"old"));
        assert_eq!(l.range(&[0u8; 4], &[0xffu8; 4]).unwrap().count(), 500);
    }
}
