//! A linearizability checker for histories of the key-value store, after Wing
//! and Gong with Lowe's memoisation: search for an order of the operations
//! that respects real time (an operation that returned before another was
//! invoked comes first) and the store's semantics, applied to a model that
//! maps keys to values.
//!
//! Operations: SET and MSET (write one or several keys at one instant), GET
//! and MGET (read one or several keys at one instant), INCR (read-modify-write
//! returning the new value), CAS (`CAS key expected new`, returning 1 when
//! it swapped, 0 when the value differed) and transactions (MULTI ... EXEC:
//! SETs, GETs and INCRs on several keys, all at one instant, each seeing the
//! ones before it).
//!
//! Keys may expire: `SET key value PX ttl` ([`Kind::SetPx`]). The store
//! decides expiry by the time the leader stamped on each entry, and the
//! checker knows that time only within bounds, so it checks what those bounds
//! allow (call and return times must then be microseconds of the leaders'
//! wall clock, from [`check_with_clock`]'s origin):
//!
//! * the expiry time E of a `SET ... PX ttl` lies between its invocation
//!   plus `ttl` and its return plus `ttl`;
//! * a key may be seen expired only by an operation that returned at E or
//!   later (the store's clock never runs ahead of the leaders' clocks);
//! * a key may be seen live only by an operation whose store clock was below
//!   E; that clock is at least the invocation time of every write that
//!   returned before the operation was invoked (each write is stamped after
//!   it was sent, and applied before the operation reads);
//! * once seen expired, a key stays absent until written again (the store's
//!   clock never runs back).
//!
//! An operation whose outcome is unknown (the client saw an error that does
//! not rule it out, or lost the connection) may take effect at any point after
//! it was invoked, or never. A read whose outcome is unknown says nothing and
//! is ignored.
//!
//! The search is memoised on (set of operations placed, model state). Three
//! reductions keep it fast, each exact (none can accept a history the plain
//! search would reject, nor the reverse):
//!
//! * keys that no operation ties together are checked separately
//!   (linearizability is local, Herlihy and Wing): the history splits into
//!   the connected components of "an operation touches both keys";
//! * an unknown SET/MSET none of whose values can be observed (no read
//!   returned it, no INCR or CAS could see it) is dropped: it changes nothing
//!   any operation saw;
//! * unknown operations with identical effects (say, two unknown INCRs of the
//!   same key) are placed in the order they were invoked: swapping two of
//!   them gives the same states.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// One command inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStep {
    /// SET key value.
    Set(String, String),
    /// GET key, and what it returned.
    Get(String, Option<String>),
    /// INCR key, and what it returned.
    Incr(String, i64),
}

impl TxStep {
    fn key(&self) -> &str {
        match self {
            TxStep::Set(k, _) | TxStep::Get(k, _) | TxStep::Incr(k, _) => k,
        }
    }
}

/// What an operation did. Keys and values are the store's strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// SET (one pair) or MSET (several): every pair written at one instant.
    Write(Vec<(String, String)>),
    /// GET (one key) or MGET (several): the values the keys had at one
    /// instant (`None`: the key did not exist).
    Read(Vec<(String, Option<String>)>),
    /// INCR of `key`, which returned `value` (the value after the increment).
    Incr {
        /// The key.
        key: String,
        /// What INCR returned.
        value: i64,
    },
    /// `CAS key expected new`, which returned 1 (`swapped`) or 0.
    Cas {
        /// The key.
        key: String,
        /// The value it had to have.
        expected: String,
        /// The value it was set to if it had it.
        new: String,
        /// Whether it swapped (the reply 1).
        swapped: bool,
    },
    /// MULTI ... EXEC: the steps in order, at one instant.
    Tx(Vec<TxStep>),
    /// `SET key value PX ttl_ms`: the key holds `value` until it expires.
    SetPx {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Milliseconds to live, from the leader's stamp on the entry.
        ttl_ms: u64,
    },
}

impl Kind {
    /// A SET of one key.
    pub fn set(key: &str, value: &str) -> Kind {
        Kind::Write(vec![(key.to_string(), value.to_string())])
    }

    /// A GET of one key that returned `value`.
    pub fn get(key: &str, value: Option<&str>) -> Kind {
        Kind::Read(vec![(key.to_string(), value.map(str::to_string))])
    }

    /// The keys the operation touches.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Kind::Write(p) => p.iter().map(|(k, _)| k.as_str()).collect(),
            Kind::Read(p) => p.iter().map(|(k, _)| k.as_str()).collect(),
            Kind::Incr { key, .. } | Kind::Cas { key, .. } | Kind::SetPx { key, .. } => {
                vec![key.as_str()]
            }
            Kind::Tx(steps) => {
                let mut ks: Vec<&str> = Vec::new();
                for st in steps {
                    if !ks.contains(&st.key()) {
                        ks.push(st.key());
                    }
                }
                ks
            }
        }
    }
}

/// One operation, with the times it was invoked and returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// What it did.
    pub kind: Kind,
    /// When the client sent it (any monotonic unit).
    pub call: u64,
    /// When the client got the answer; `None` for an unknown outcome. What
    /// `kind` says an unknown operation returned (INCR's value, CAS's
    /// `swapped`, a read's values) is ignored.
    pub ret: Option<u64>,
}

/// Why a history was not shown linearizable.
#[derive(Debug)]
pub enum CheckError {
    /// No order of the operations on these keys explains what they returned.
    NotLinearizable(Box<Stuck>),
    /// The search of the operations on these keys visited `states` states
    /// without an answer (see [`check_with_budget`]).
    GaveUp {
        /// The keys.
        keys: Vec<String>,
        /// How many states were visited.
        states: usize,
    },
}

/// Where the search got stuck: the longest order it found and what could not
/// come next.
#[derive(Debug)]
pub struct Stuck {
    /// The keys of the independent part of the history that failed.
    pub keys: Vec<String>,
    /// How many operations of that part must be placed (acknowledged ones).
    pub required: usize,
    /// How many of them could be placed at best.
    pub placed: usize,
    /// The model's state after them (`None`: absent).
    pub state: Vec<(String, Option<String>)>,
    /// The operations that could have come next, none of which fits.
    pub stuck_at: Vec<Op>,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::NotLinearizable(s) => {
                write!(
                    f,
                    "keys {:?}: not linearizable; {} of {} acknowledged operations placed, \
                     reaching state {:?}, then none of these fits: {:?}",
                    s.keys, s.placed, s.required, s.state, s.stuck_at
                )
            }
            CheckError::GaveUp { keys, states } => write!(
                f,
                "keys {keys:?}: the search gave up after {states} states (inconclusive)"
            ),
        }
    }
}

impl std::error::Error for CheckError {}

/// The default state budget of [`check`]: about a hundred bytes each.
pub const DEFAULT_BUDGET: usize = 2_000_000;

/// Checks a history; every key starts absent.
pub fn check(history: &[Op]) -> Result<(), CheckError> {
    check_with_budget(history, DEFAULT_BUDGET)
}

/// [`check`], giving up (inconclusively) after visiting `budget` states in
/// one independent part of the history. Expiring keys' times are read as
/// microseconds since the Unix epoch (see [`check_with_clock`]).
pub fn check_with_budget(history: &[Op], budget: usize) -> Result<(), CheckError> {
    check_with_clock(history, 0, budget)
}

/// How far the checker lets a time it derives for an expiring key be off:
/// the store keeps whole milliseconds, and the client and the leaders read
/// two clocks (monotonic and wall) that may drift a little apart.
pub const CLOCK_SLACK_US: u64 = 5_000;

/// [`check_with_budget`] for a history whose call and return times are
/// microseconds since `origin_us`, itself microseconds since the Unix epoch
/// on the leaders' clock: what expiring keys ([`Kind::SetPx`]) need.
pub fn check_with_clock(history: &[Op], origin_us: u64, budget: usize) -> Result<(), CheckError> {
    let clock = Clock::new(history, origin_us);
    // Unknown reads say nothing.
    let ops: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].ret.is_some() || !matches!(history[i].kind, Kind::Read(_)))
        .filter(|&i| !history[i].kind.keys().is_empty())
        .collect();
    // Connected components of keys.
    let mut key_id: HashMap<&str, usize> = HashMap::new();
    for &i in &ops {
        for k in history[i].kind.keys() {
            let n = key_id.len();
            key_id.entry(k).or_insert(n);
        }
    }
    let mut parent: Vec<usize> = (0..key_id.len()).collect();
    fn root(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    for &i in &ops {
        let ks = history[i].kind.keys();
        let a = root(&mut parent, key_id[ks[0]]);
        for k in &ks[1..] {
            let b = root(&mut parent, key_id[k]);
            parent[b] = a;
        }
    }
    let mut parts: HashMap<usize, Vec<usize>> = HashMap::new();
    for &i in &ops {
        let r = root(&mut parent, key_id[history[i].kind.keys()[0]]);
        parts.entry(r).or_default().push(i);
    }
    let mut parts: Vec<Vec<usize>> = parts.into_values().collect();
    parts.sort();
    for part in parts {
        let owned: Vec<&Op> = part.iter().map(|&i| &history[i]).collect();
        Part::new(&owned, &clock).search(budget)?;
    }
    Ok(())
}

/// What the checker knows of the store's clock from a history.
struct Clock {
    origin_us: u64,
    /// Acknowledged writes by return time, with the latest invocation time
    /// of any write that returned no later (a floor for the store's clock).
    floors: Vec<(u64, u64)>,
}

impl Clock {
    fn new(history: &[Op], origin_us: u64) -> Self {
        let mut writes: Vec<(u64, u64)> = history
            .iter()
            .filter(|o| !matches!(o.kind, Kind::Read(_)))
            .filter_map(|o| o.ret.map(|r| (r, o.call)))
            .collect();
        writes.sort_unstable();
        let mut max = 0;
        for w in &mut writes {
            max = max.max(w.1);
            w.1 = max;
        }
        Clock {
            origin_us,
            floors: writes,
        }
    }

    /// A lower bound of the store's clock (absolute microseconds) for an
    /// operation invoked at `call`: writes that returned before it were
    /// stamped no earlier than they were invoked (less the store's
    /// millisecond rounding).
    fn floor(&self, call: u64) -> u64 {
        let n = self.floors.partition_point(|&(r, _)| r < call);
        match n {
            0 => 0,
            n => (self.origin_us + self.floors[n - 1].1).saturating_sub(1_000),
        }
    }

    /// The expiry time bounds (absolute microseconds) of a `SET ... PX`.
    fn deadline(&self, op: &Op, ttl_ms: u64) -> (u64, u64) {
        let ttl = ttl_ms.saturating_mul(1_000);
        let lo = (self.origin_us + op.call + ttl).saturating_sub(1_000);
        let hi = op.ret.map_or(u64::MAX, |r| {
            self.origin_us.saturating_add(r).saturating_add(ttl)
        });
        (lo, hi)
    }
}

/// A key in the model: its value and, for a key that will expire, the
/// bounds of its expiry time (absolute microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Cell {
    v: Val,
    exp: Option<(u64, u64)>,
}

impl Cell {
    const ABSENT: Cell = Cell {
        v: Val::Absent,
        exp: None,
    };

    fn plain(v: Val) -> Cell {
        Cell { v, exp: None }
    }
}

/// A value in the model. Strings that are canonical integers are integers, so
/// a SET of "5" and an INCR to 5 give the same state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Val {
    Absent,
    Int(i64),
    Str(u32),
}

#[derive(Default)]
struct Strings {
    ids: HashMap<String, u32>,
    all: Vec<String>,
}

impl Strings {
    fn val(&mut self, s: &str) -> Val {
        if let Ok(n) = s.parse::<i64>() {
            if n.to_string() == s {
                return Val::Int(n);
            }
        }
        let next = self.all.len() as u32;
        let id = *self.ids.entry(s.to_string()).or_insert(next);
        if id == next {
            self.all.push(s.to_string());
        }
        Val::Str(id)
    }

    fn show(&self, v: Val) -> Option<String> {
        match v {
            Val::Absent => None,
            Val::Int(n) => Some(n.to_string()),
            Val::Str(i) => Some(self.all[i as usize].clone()),
        }
    }

    /// What INCR makes of a value: the store parses it as an i64.
    fn as_int(&self, v: Val) -> Option<i64> {
        match v {
            Val::Absent => Some(0),
            Val::Int(n) => Some(n),
            Val::Str(i) => self.all[i as usize].parse().ok(),
        }
    }
}

/// An operation on a part's keys (indices into the part's key list). The
/// `Option` results are `None` for an unknown outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    Write(Vec<(usize, Val)>),
    Read(Vec<(usize, Val)>),
    Incr(usize, Option<i64>),
    Cas(usize, Val, Val, Option<bool>),
    /// A transaction: its steps applied one after the other at one instant
    /// (an unknown one's reads are left out).
    Tx(Vec<Step>),
    /// A write of a key that expires within these bounds.
    SetPx(usize, Val, (u64, u64)),
}

impl Step {
    /// The state after this step, or `None` when what it returned does not
    /// fit `state` (for an unknown step: when it would change nothing, which
    /// is the same as never placing it).
    fn apply(&self, state: &[Cell], strings: &Strings) -> Option<Vec<Cell>> {
        match self {
            Step::Read(p) => p
                .iter()
                .all(|&(k, v)| state[k].v == v)
                .then(|| state.to_vec()),
            Step::Write(p) => {
                let mut s = state.to_vec();
                for &(k, v) in p {
                    s[k] = Cell::plain(v);
                }
                Some(s)
            }
            Step::SetPx(k, v, exp) => {
                let mut s = state.to_vec();
                s[*k] = Cell {
                    v: *v,
                    exp: Some(*exp),
                };
                Some(s)
            }
            Step::Incr(k, result) => {
                let new = strings.as_int(state[*k].v)?.checked_add(1)?;
                if result.is_some_and(|r| r != new) {
                    return None;
                }
                // INCR keeps the key's expiry.
                let mut s = state.to_vec();
                s[*k].v = Val::Int(new);
                Some(s)
            }
            Step::Tx(steps) => {
                let mut s = state.to_vec();
                for st in steps {
                    s = st.apply(&s, strings)?;
                }
                Some(s)
            }
            Step::Cas(k, expected, new, swapped) => {
                let matches = state[*k].v == *expected;
                match swapped {
                    Some(false) if !matches => Some(state.to_vec()),
                    Some(true) | None if matches => {
                        // CAS keeps the key's expiry.
                        let mut s = state.to_vec();
                        s[*k].v = *new;
                        Some(s)
                    }
                    _ => None,
                }
            }
        }
    }

    /// The keys the step touches.
    fn keys(&self, out: &mut Vec<usize>) {
        match self {
            Step::Read(p) | Step::Write(p) => out.extend(p.iter().map(|&(k, _)| k)),
            Step::Incr(k, _) | Step::Cas(k, ..) | Step::SetPx(k, ..) => out.push(*k),
            Step::Tx(steps) => steps.iter().for_each(|s| s.keys(out)),
        }
    }
}

/// One independent part of a history, ready to search.
struct Part<'a> {
    keys: Vec<String>,
    clock: &'a Clock,
    strings: Strings,
    /// Acknowledged operations, by invocation time.
    known: Vec<(&'a Op, Step)>,
    /// Operations of unknown outcome, by invocation time.
    unknown: Vec<(&'a Op, Step)>,
    /// For each unknown operation, the previous one with an identical step.
    prev_same: Vec<Option<usize>>,
}

/// A search state: which operations are placed, and the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Node {
    /// Every acknowledged operation before this index (by invocation) is placed.
    lo: u32,
    /// The acknowledged operations placed beyond `lo`, in order.
    beyond: Vec<u32>,
    /// Which unknown operations are placed (a bit set).
    unknown: Vec<u64>,
    state: Vec<Cell>,
}

impl Node {
    fn known_placed(&self, i: usize) -> bool {
        i < self.lo as usize || self.beyond.binary_search(&(i as u32)).is_ok()
    }

    fn unknown_placed(&self, j: usize) -> bool {
        self.unknown[j / 64] & (1 << (j % 64)) != 0
    }

    fn place_known(&self, i: usize, state: Vec<Cell>) -> Node {
        let mut n = Node {
            lo: self.lo,
            beyond: self.beyond.clone(),
            unknown: self.unknown.clone(),
            state,
        };
        let i = i as u32;
        if i == n.lo {
            n.lo += 1;
            let run = n
                .beyond
                .iter()
                .zip(n.lo..)
                .take_while(|(b, want)| **b == *want)
                .count();
            n.beyond.drain(..run);
            n.lo += run as u32;
        } else if let Err(at) = n.beyond.binary_search(&i) {
            n.beyond.insert(at, i);
        }
        n
    }

    fn place_unknown(&self, j: usize, state: Vec<Cell>) -> Node {
        let mut unknown = self.unknown.clone();
        unknown[j / 64] |= 1 << (j % 64);
        Node {
            lo: self.lo,
            beyond: self.beyond.clone(),
            unknown,
            state,
        }
    }
}

impl<'a> Part<'a> {
    fn new(ops: &[&'a Op], clock: &'a Clock) -> Self {
        let mut keys: Vec<String> = Vec::new();
        let mut key_ix: HashMap<String, usize> = HashMap::new();
        let mut strings = Strings::default();
        let mut ix = |k: &str, keys: &mut Vec<String>| -> usize {
            *key_ix.entry(k.to_string()).or_insert_with(|| {
                keys.push(k.to_string());
                keys.len() - 1
            })
        };
        let mut steps: Vec<(&'a Op, Step)> = Vec::with_capacity(ops.len());
        for &op in ops {
            let known = op.ret.is_some();
            let step = match &op.kind {
                Kind::Write(p) => Step::Write(
                    p.iter()
                        .map(|(k, v)| (ix(k, &mut keys), strings.val(v)))
                        .collect(),
                ),
                Kind::Read(p) => Step::Read(
                    p.iter()
                        .map(|(k, v)| {
                            let v = v.as_deref().map_or(Val::Absent, |v| strings.val(v));
                            (ix(k, &mut keys), v)
                        })
                        .collect(),
                ),
                Kind::Incr { key, value } => {
                    Step::Incr(ix(key, &mut keys), known.then_some(*value))
                }
                Kind::Cas {
                    key,
                    expected,
                    new,
                    swapped,
                } => Step::Cas(
                    ix(key, &mut keys),
                    strings.val(expected),
                    strings.val(new),
                    known.then_some(*swapped),
                ),
                Kind::SetPx { key, value, ttl_ms } => Step::SetPx(
                    ix(key, &mut keys),
                    strings.val(value),
                    clock.deadline(op, *ttl_ms),
                ),
                Kind::Tx(tx) => Step::Tx(
                    tx.iter()
                        .filter_map(|st| match st {
                            TxStep::Set(k, v) => {
                                Some(Step::Write(vec![(ix(k, &mut keys), strings.val(v))]))
                            }
                            TxStep::Get(k, v) if known => {
                                let v = v.as_deref().map_or(Val::Absent, |v| strings.val(v));
                                Some(Step::Read(vec![(ix(k, &mut keys), v)]))
                            }
                            TxStep::Get(..) => None,
                            TxStep::Incr(k, n) => {
                                Some(Step::Incr(ix(k, &mut keys), known.then_some(*n)))
                            }
                        })
                        .collect(),
                ),
            };
            steps.push((op, step));
        }
        let prunable = unobservable(&steps, keys.len());
        let (mut known, mut unknown): (Vec<_>, Vec<_>) = steps
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !prunable[*i])
            .map(|(_, s)| s)
            .partition(|(op, _)| op.ret.is_some());
        known.sort_by_key(|(op, _)| op.call);
        unknown.sort_by_key(|(op, _)| op.call);
        let prev_same = (0..unknown.len())
            .map(|j| (0..j).rev().find(|&p| unknown[p].1 == unknown[j].1))
            .collect();
        Part {
            keys,
            clock,
            strings,
            known,
            unknown,
            prev_same,
        }
    }

    /// The states `op` may see, for each key it touches that will expire:
    /// still live (if its store clock can be below the expiry time) or
    /// expired and gone (if it returned after the earliest expiry time).
    fn expiries<'s>(&self, state: &'s [Cell], op: &Op, step: &Step) -> Vec<Cow<'s, [Cell]>> {
        // Most states have no expiring key: no copy for them.
        if state.iter().all(|c| c.exp.is_none()) {
            return vec![Cow::Borrowed(state)];
        }
        let mut keys = Vec::new();
        step.keys(&mut keys);
        keys.sort_unstable();
        keys.dedup();
        let mut out = vec![Cow::Borrowed(state)];
        for k in keys {
            let Some((lo, hi)) = state[k].exp else {
                continue;
            };
            let floor = self.clock.floor(op.call);
            let live = hi.saturating_add(CLOCK_SLACK_US) > floor;
            let ret = op.ret.map_or(u64::MAX, |r| self.clock.origin_us + r);
            let expired = lo <= ret.saturating_add(CLOCK_SLACK_US);
            let mut next = Vec::with_capacity(out.len() * 2);
            for s in out {
                if expired {
                    let mut gone = s.to_vec();
                    gone[k] = Cell::ABSENT;
                    next.push(Cow::Owned(gone));
                }
                if live {
                    next.push(s);
                }
            }
            out = next;
        }
        out
    }

    fn search(&self, budget: usize) -> Result<(), CheckError> {
        let m = self.known.len();
        let start = Node {
            lo: 0,
            beyond: Vec::new(),
            unknown: vec![0; self.unknown.len().div_ceil(64)],
            state: vec![Cell::ABSENT; self.keys.len()],
        };
        let mut seen: HashSet<Node> = HashSet::new();
        seen.insert(start.clone());
        let mut stack = vec![start];
        // The dead end with the most acknowledged operations placed.
        let mut best: Option<(usize, Vec<Cell>, Vec<&Op>)> = None;
        while let Some(node) = stack.pop() {
            if node.lo as usize == m {
                return Ok(());
            }
            // The next operation must have been invoked before every
            // unplaced acknowledged one returned. By invocation order, stop
            // at the first that was invoked after that horizon.
            let mut horizon = u64::MAX;
            let mut known_next = Vec::new();
            for i in node.lo as usize..m {
                let op = self.known[i].0;
                if op.call > horizon {
                    break;
                }
                if node.known_placed(i) {
                    continue;
                }
                horizon = horizon.min(op.ret.unwrap_or(u64::MAX));
                known_next.push(i);
            }
            known_next.retain(|&i| self.known[i].0.call <= horizon);
            // Explored first: the acknowledged operation that returned first.
            known_next.sort_by_key(|&i| std::cmp::Reverse(self.known[i].0.ret));
            let unknown_next = (0..self.unknown.len()).filter(|&j| {
                self.unknown[j].0.call <= horizon
                    && !node.unknown_placed(j)
                    && self.prev_same[j].is_none_or(|p| node.unknown_placed(p))
            });
            let mut fits = false;
            // Unknown operations go on the stack first: tried last.
            let mut children = Vec::new();
            for j in unknown_next {
                let (op, step) = &self.unknown[j];
                for state in self.expiries(&node.state, op, step) {
                    if let Some(s) = step.apply(&state, &self.strings) {
                        fits = true;
                        children.push(node.place_unknown(j, s));
                    }
                }
            }
            for &i in &known_next {
                let (op, step) = &self.known[i];
                for state in self.expiries(&node.state, op, step) {
                    if let Some(s) = step.apply(&state, &self.strings) {
                        fits = true;
                        children.push(node.place_known(i, s));
                    }
                }
            }
            for child in children {
                if seen.insert(child.clone()) {
                    if seen.len() > budget {
                        return Err(CheckError::GaveUp {
                            keys: self.keys.clone(),
                            states: seen.len(),
                        });
                    }
                    stack.push(child);
                }
            }
            let placed = node.lo as usize + node.beyond.len();
            if !fits && best.as_ref().is_none_or(|b| placed > b.0) {
                let stuck = known_next.iter().map(|&i| self.known[i].0).collect();
                best = Some((placed, node.state.clone(), stuck));
            }
        }
        let (placed, state, stuck) = best.unwrap_or_default();
        Err(CheckError::NotLinearizable(Box::new(Stuck {
            keys: self.keys.clone(),
            required: m,
            placed,
            state: self
                .keys
                .iter()
                .zip(&state)
                .map(|(k, c)| (k.clone(), self.strings.show(c.v)))
                .collect(),
            stuck_at: stuck.into_iter().cloned().collect(),
        })))
    }
}

/// Which steps are unknown writes that no operation could observe, so that
/// dropping them changes nothing: for each key they write, no read returned
/// their value, no INCR touches the key, no CAS on the key expects their
/// value, and no acknowledged failed CAS on the key (that returned after the
/// write was invoked) expects a value anything writes to the key. Proof:
/// take an order that places such a write W. Until the next write of each of
/// its keys, the key holds W's value; no read there can return it, no INCR
/// and no successful CAS can be there. An unknown CAS there failed and can be
/// dropped too; an acknowledged failed CAS there expects a value never
/// written, so without W it still fails. Without W, every other operation
/// returns the same.
fn unobservable(steps: &[(&Op, Step)], keys: usize) -> Vec<bool> {
    let mut read: HashSet<(usize, Val)> = HashSet::new();
    let mut written: HashSet<(usize, Val)> = HashSet::new();
    let mut incr = vec![false; keys];
    let mut cas_expects: HashSet<(usize, Val)> = HashSet::new();
    // Per key: the latest return of an acknowledged failed CAS expecting a
    // value that something writes (filled in below).
    let mut failed_cas: Vec<(usize, Val, u64)> = Vec::new();
    for (op, step) in steps {
        let inner: Vec<&Step> = match step {
            Step::Tx(inner) => inner.iter().collect(),
            other => vec![other],
        };
        for step in inner {
            note_step(
                op,
                step,
                &mut read,
                &mut written,
                &mut incr,
                &mut cas_expects,
                &mut failed_cas,
            );
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn note_step(
        op: &Op,
        step: &Step,
        read: &mut HashSet<(usize, Val)>,
        written: &mut HashSet<(usize, Val)>,
        incr: &mut [bool],
        cas_expects: &mut HashSet<(usize, Val)>,
        failed_cas: &mut Vec<(usize, Val, u64)>,
    ) {
        match step {
            Step::Read(p) if op.ret.is_some() => read.extend(p.iter().copied()),
            Step::Read(_) => {}
            Step::Write(p) => written.extend(p.iter().copied()),
            Step::SetPx(k, v, _) => {
                written.insert((*k, *v));
            }
            Step::Incr(k, _) => incr[*k] = true,
            Step::Cas(k, e, n, swapped) => {
                cas_expects.insert((*k, *e));
                written.insert((*k, *n));
                if let (Some(false), Some(ret)) = (swapped, op.ret) {
                    failed_cas.push((*k, *e, ret));
                }
            }
            // (Transactions do not nest.)
            Step::Tx(_) => {}
        }
    }
    let mut observing_cas_until: Vec<Option<u64>> = vec![None; keys];
    for (k, e, ret) in failed_cas {
        if written.contains(&(k, e)) {
            let until = &mut observing_cas_until[k];
            *until = Some(until.map_or(ret, |u| u.max(ret)));
        }
    }
    steps
        .iter()
        .map(|(op, step)| match step {
            Step::Write(p) if op.ret.is_none() => p.iter().all(|&(k, v)| {
                !incr[k]
                    && !read.contains(&(k, v))
                    && !cas_expects.contains(&(k, v))
                    && observing_cas_until[k].is_none_or(|until| until < op.call)
            }),
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, call: u64, ret: u64) -> Op {
        Op {
            kind,
            call,
            ret: Some(ret),
        }
    }
    fn unknown(kind: Kind, call: u64) -> Op {
        Op {
            kind,
            call,
            ret: None,
        }
    }
    fn w(v: &str, call: u64, ret: u64) -> Op {
        op(Kind::set("x", v), call, ret)
    }
    fn r(v: Option<&str>, call: u64, ret: u64) -> Op {
        op(Kind::get("x", v), call, ret)
    }
    fn mset(pairs: &[(&str, &str)], call: u64, ret: u64) -> Op {
        op(mset_kind(pairs), call, ret)
    }
    fn mset_kind(pairs: &[(&str, &str)]) -> Kind {
        Kind::Write(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    fn mget(pairs: &[(&str, Option<&str>)], call: u64, ret: u64) -> Op {
        op(
            Kind::Read(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                    .collect(),
            ),
            call,
            ret,
        )
    }
    fn incr(key: &str, value: i64) -> Kind {
        Kind::Incr {
            key: key.into(),
            value,
        }
    }
    fn cas(key: &str, expected: &str, new: &str, swapped: bool) -> Kind {
        Kind::Cas {
            key: key.into(),
            expected: expected.into(),
            new: new.into(),
            swapped,
        }
    }
    /// A transaction is one instant: its reads see its own earlier steps,
    /// others see all of it or none of it, and an unknown one may have
    /// happened or not.
    #[test]
    fn transactions_are_one_instant() {
        let tx = |steps: Vec<TxStep>| Kind::Tx(steps);
        let set = |k: &str, v: &str| TxStep::Set(k.into(), v.into());
        let get = |k: &str, v: Option<&str>| TxStep::Get(k.into(), v.map(Into::into));
        // Reads inside see the writes before them.
        assert!(check(&[op(
            tx(vec![
                set("a", "1"),
                get("a", Some("1")),
                TxStep::Incr("n".into(), 1)
            ]),
            0,
            1
        )])
        .is_ok());
        assert!(check(&[op(tx(vec![get("a", Some("1")), set("a", "1")]), 0, 1)]).is_err());
        // Half a transaction seen after it returned: rejected.
        let half = rejected(&[
            op(tx(vec![set("a", "1"), set("b", "1")]), 0, 1),
            op(
                Kind::Read(vec![("a".into(), Some("1".into())), ("b".into(), None)]),
                2,
                3,
            ),
        ]);
        assert!(format!("{half:?}").contains('a'), "{half:?}");
        // Concurrent with a read, the read sees all or nothing.
        let both = Kind::Read(vec![
            ("a".into(), Some("1".into())),
            ("b".into(), Some("1".into())),
        ]);
        assert!(check(&[
            op(tx(vec![set("a", "1"), set("b", "1")]), 0, 5),
            op(both, 1, 2)
        ])
        .is_ok());
        // An unknown transaction: its INCR may or may not have happened.
        let h = [
            unknown(
                tx(vec![TxStep::Incr("n".into(), 99), get("x", Some("zz"))]),
                0,
            ),
            op(incr("n", 2), 5, 6),
        ];
        assert!(check(&h).is_ok());
        let h = [
            unknown(tx(vec![TxStep::Incr("n".into(), 99)]), 0),
            op(incr("n", 3), 5, 6),
        ];
        assert!(check(&h).is_err(), "one unknown INCR cannot make 3");
    }

    fn rejected(h: &[Op]) -> Box<Stuck> {
        match check(h) {
            Err(CheckError::NotLinearizable(s)) => s,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn sequential_histories() {
        assert!(check(&[r(None, 0, 1), w("a", 2, 3), r(Some("a"), 4, 5)]).is_ok());
        // A read after a completed write must not see the older state.
        rejected(&[w("a", 0, 1), w("b", 2, 3), r(Some("a"), 4, 5)]);
        rejected(&[w("a", 0, 1), r(None, 2, 3)]);
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // The read overlaps the write: old or new value are both fine.
        assert!(check(&[w("a", 0, 1), w("b", 2, 6), r(Some("a"), 3, 4)]).is_ok());
        assert!(check(&[w("a", 0, 1), w("b", 2, 6), r(Some("b"), 3, 4)]).is_ok());
        // But once one read saw the new value, a later read cannot see the old one.
        rejected(&[
            w("a", 0, 1),
            w("b", 2, 10),
            r(Some("b"), 3, 4),
            r(Some("a"), 5, 6),
        ]);
        // Two concurrent INCRs return 1 and 2 in either order.
        for (a, b) in [(1, 2), (2, 1)] {
            assert!(check(&[op(incr("n", a), 0, 5), op(incr("n", b), 1, 6)]).is_ok());
        }
        // An MGET overlapping an MSET sees all of the old pair or all of the new.
        let before = mset(&[("a", "1"), ("b", "1")], 0, 1);
        let during = mset(&[("a", "2"), ("b", "2")], 2, 10);
        for v in ["1", "2"] {
            let read = mget(&[("a", Some(v)), ("b", Some(v))], 3, 4);
            assert!(check(&[before.clone(), during.clone(), read]).is_ok());
        }
        // Two concurrent CAS on the same expected value: either one wins.
        for first in [true, false] {
            assert!(check(&[
                op(Kind::set("k", "0"), 0, 1),
                op(cas("k", "0", "a", first), 2, 5),
                op(cas("k", "0", "b", !first), 3, 6),
                op(Kind::get("k", Some(if first { "a" } else { "b" })), 7, 8),
            ])
            .is_ok());
        }
    }

    fn px(key: &str, value: &str, ttl_ms: u64) -> Kind {
        Kind::SetPx {
            key: key.into(),
            value: value.into(),
            ttl_ms,
        }
    }

    /// Times in these histories are microseconds of the Unix clock.
    const MS: u64 = 1_000;

    #[test]
    fn expiring_keys_vanish_within_the_stamp_bounds() {
        let set = op(px("k", "v", 100), 0, MS);
        // Seen live before its earliest expiry, gone after it.
        assert!(check(&[set.clone(), op(Kind::get("k", Some("v")), 50 * MS, 51 * MS)]).is_ok());
        assert!(check(&[set.clone(), op(Kind::get("k", None), 200 * MS, 201 * MS)]).is_ok());
        // Gone long before it may have expired: rejected.
        rejected(&[set.clone(), op(Kind::get("k", None), 20 * MS, 21 * MS)]);
        // An unknown SET ... PX may expire whenever it was applied.
        assert!(check(&[
            unknown(px("k", "v", 100), 0),
            op(Kind::get("k", Some("v")), 500 * MS, 501 * MS),
            op(Kind::get("k", None), 600 * MS, 601 * MS),
        ])
        .is_ok());
    }

    #[test]
    fn an_expired_key_seen_live_after_a_later_write_returned_is_rejected() {
        let set = op(px("k", "v", 100), 0, MS);
        // A write invoked at 300 ms (on another key) returned before the
        // read: the store's clock is past 300 ms, the key's expiry is at
        // most 101 ms.
        let other = op(Kind::set("x", "1"), 300 * MS, 301 * MS);
        let read = op(Kind::get("k", Some("v")), 310 * MS, 311 * MS);
        rejected(&[set.clone(), other.clone(), read.clone()]);
        // With no write since, the store's clock may lag: accepted.
        assert!(check(&[set.clone(), read.clone()]).is_ok());
        // Seen expired, then live again: rejected (time never runs back).
        rejected(&[
            set.clone(),
            op(Kind::get("k", None), 150 * MS, 151 * MS),
            op(Kind::get("k", Some("v")), 160 * MS, 161 * MS),
        ]);
    }

    #[test]
    fn incr_and_cas_keep_an_expiry_and_set_clears_it() {
        let set = op(px("n", "5", 100), 0, MS);
        let incr = op(incr("n", 6), 10 * MS, 11 * MS);
        let late = op(Kind::set("x", "1"), 400 * MS, 401 * MS);
        assert!(check(&[
            set.clone(),
            incr.clone(),
            late.clone(),
            op(Kind::get("n", None), 500 * MS, 501 * MS)
        ])
        .is_ok());
        rejected(&[
            set.clone(),
            incr.clone(),
            late.clone(),
            op(Kind::get("n", Some("6")), 500 * MS, 501 * MS),
        ]);
        let cas = op(cas("n", "5", "7", true), 10 * MS, 11 * MS);
        rejected(&[
            set.clone(),
            cas,
            late.clone(),
            op(Kind::get("n", Some("7")), 500 * MS, 501 * MS),
        ]);
        // A plain SET removes the expiry.
        let plain = op(Kind::set("n", "8"), 10 * MS, 11 * MS);
        let read = |v| op(Kind::get("n", v), 500 * MS, 501 * MS);
        assert!(check(&[set.clone(), plain.clone(), late.clone(), read(Some("8"))]).is_ok());
        rejected(&[set, plain, late, read(None)]);
    }

    #[test]
    fn a_torn_mset_seen_by_an_mget_is_rejected() {
        let before = mset(&[("a", "1"), ("b", "1")], 0, 1);
        let during = mset(&[("a", "2"), ("b", "2")], 2, 10);
        for (a, b) in [("2", "1"), ("1", "2")] {
            let s = rejected(&[
                before.clone(),
                during.clone(),
                mget(&[("a", Some(a)), ("b", Some(b))], 3, 4),
            ]);
            assert_eq!(s.keys.len(), 2);
        }
        // Nor two GETs in a row seeing the new value of one key, then the
        // old value of the other.
        rejected(&[
            before.clone(),
            during.clone(),
            op(Kind::get("a", Some("2")), 3, 4),
            op(Kind::get("b", Some("1")), 5, 6),
        ]);
        // Even when the MSET's outcome is unknown: all of it or none of it.
        rejected(&[
            before,
            unknown(mset_kind(&[("a", "2"), ("b", "2")]), 2),
            op(Kind::get("a", Some("2")), 3, 4),
            op(Kind::get("b", Some("1")), 5, 6),
        ]);
    }

    #[test]
    fn an_incr_that_returns_a_value_twice_is_rejected() {
        rejected(&[op(incr("n", 1), 0, 5), op(incr("n", 1), 1, 6)]);
        // An unknown INCR does not explain a repeat either.
        rejected(&[
            op(incr("n", 1), 0, 1),
            unknown(incr("n", 0), 2),
            op(incr("n", 2), 3, 4),
            op(incr("n", 2), 5, 6),
        ]);
        // A skipped value needs an INCR that could have taken it.
        rejected(&[op(incr("n", 1), 0, 1), op(incr("n", 3), 2, 3)]);
        rejected(&[
            op(incr("n", 1), 0, 1),
            op(incr("n", 3), 2, 3),
            unknown(incr("n", 0), 4),
        ]);
        assert!(check(&[
            op(incr("n", 1), 0, 1),
            unknown(incr("n", 0), 2),
            op(incr("n", 3), 4, 5),
        ])
        .is_ok());
        // INCR reads what SET and CAS wrote.
        assert!(check(&[
            op(Kind::set("n", "41"), 0, 1),
            op(incr("n", 42), 2, 3),
            op(cas("n", "42", "7", true), 4, 5),
            op(incr("n", 8), 6, 7),
        ])
        .is_ok());
        rejected(&[op(Kind::set("n", "41"), 0, 1), op(incr("n", 1), 2, 3)]);
    }

    #[test]
    fn a_cas_that_succeeds_against_a_stale_value_is_rejected() {
        let h = [
            w("old", 0, 1),
            w("new", 2, 3),
            op(cas("x", "old", "z", true), 4, 5),
        ];
        let s = rejected(&h);
        assert_eq!(s.placed, 2);
        assert_eq!(s.state, vec![("x".to_string(), Some("new".to_string()))]);
        // Overlapping the second write, it may have come first.
        assert!(check(&[
            w("old", 0, 1),
            w("new", 2, 6),
            op(cas("x", "old", "z", true), 4, 5),
            r(Some("new"), 7, 8),
        ])
        .is_ok());
        // A CAS that fails although the value was the expected one.
        rejected(&[w("old", 0, 1), op(cas("x", "old", "z", false), 2, 3)]);
        // Two CAS from the same value cannot both succeed.
        rejected(&[
            w("old", 0, 1),
            op(cas("x", "old", "a", true), 2, 5),
            op(cas("x", "old", "b", true), 3, 6),
        ]);
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        // Never applied.
        assert!(check(&[
            w("a", 0, 1),
            unknown(Kind::set("x", "b"), 2),
            r(Some("a"), 10, 11)
        ])
        .is_ok());
        // Applied long after its client gave up.
        assert!(check(&[
            w("a", 0, 1),
            unknown(Kind::set("x", "b"), 2),
            r(Some("a"), 10, 11),
            r(Some("b"), 20, 21),
        ])
        .is_ok());
        // But not before it was sent.
        rejected(&[
            w("a", 0, 1),
            r(Some("b"), 2, 3),
            unknown(Kind::set("x", "b"), 5),
        ]);
        // An unknown MSET, applied late, on both keys at once.
        assert!(check(&[
            mset(&[("a", "1"), ("b", "1")], 0, 1),
            unknown(mset_kind(&[("a", "2"), ("b", "2")]), 2),
            mget(&[("a", Some("1")), ("b", Some("1"))], 10, 11),
            mget(&[("a", Some("2")), ("b", Some("2"))], 20, 21),
        ])
        .is_ok());
        // An unknown CAS applied late, or never.
        for (got, ok) in [("z", true), ("old", true), ("other", false)] {
            let h = [
                w("old", 0, 1),
                unknown(cas("x", "old", "z", false), 2),
                r(Some("old"), 3, 4),
                r(Some(got), 5, 6),
            ];
            assert_eq!(check(&h).is_ok(), ok, "{got}");
        }
        // An unknown write explains a failed CAS (and must, so it is kept).
        let h = [
            w("a", 0, 1),
            unknown(Kind::set("x", "b"), 2),
            op(cas("x", "a", "c", false), 3, 4),
        ];
        assert!(check(&h).is_ok());
        assert!(check(&h[..1].iter().chain(&h[2..]).cloned().collect::<Vec<_>>()).is_err());
        // Unknown reads say nothing.
        assert!(check(&[w("a", 0, 1), unknown(Kind::get("x", Some("zz")), 2)]).is_ok());
    }

    #[test]
    fn a_stale_read_after_a_failover_is_caught() {
        // The deposed leader answers from its old state after the new
        // leader acknowledged "new".
        let h = [w("old", 0, 1), w("new", 5, 9), r(Some("old"), 12, 13)];
        let s = rejected(&h);
        assert_eq!(s.placed, 2);
        assert_eq!(s.stuck_at, vec![h[2].clone()]);
    }

    #[test]
    fn independent_keys_are_checked_separately_and_all_must_hold() {
        let mut h = Vec::new();
        for k in 0..20u64 {
            let key = format!("k{k}");
            h.push(op(Kind::set(&key, "1"), k, 100));
            h.push(op(Kind::get(&key, Some("1")), 101, 102));
        }
        assert!(check(&h).is_ok());
        h.push(op(Kind::get("k7", None), 103, 104));
        let s = rejected(&h);
        assert_eq!(s.keys, vec!["k7".to_string()]);
    }

    #[test]
    fn a_search_over_budget_gives_up_rather_than_answering() {
        // Many concurrent writes and a read that fits none of them: the plain
        // search tries every order of the writes before it can say no.
        let mut h: Vec<Op> = (0..12).map(|i| w(&format!("v{i}"), 0, 100)).collect();
        h.push(r(Some("nope"), 1, 99));
        assert!(matches!(
            check_with_budget(&h, 1000),
            Err(CheckError::GaveUp { .. })
        ));
        assert!(matches!(check(&h), Err(CheckError::NotLinearizable(_))));
    }

    /// Draws in `[0, n)` from a seeded generator (`n` > 0).
    trait Below {
        fn below(&mut self, n: u64) -> u64;
    }
    impl Below for fastrand::Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.u64(0..n.max(1))
        }
    }

    /// A history made by running clients against a truly atomic map: each
    /// operation takes effect at one instant between its call and return;
    /// some clients give up (unknown outcome), their operation then taking
    /// effect later or never. Keys: pairs (a, b) and (c, d) for MSET/MGET,
    /// SET, GET and CAS; counter n for INCR and GET.
    fn simulated(seed: u64, ops: usize, clients: usize) -> Vec<Op> {
        #[derive(Clone)]
        struct Pending {
            kind: Kind,
            call: u64,
            done: bool,
        }
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut state: HashMap<String, String> = HashMap::new();
        let mut slots: Vec<Option<Pending>> = vec![None; clients];
        let mut zombies: Vec<Pending> = Vec::new();
        let mut out = Vec::new();
        let mut seq = 0u64;
        let mut t = 0u64;
        // Applies an operation to the map and fills in what it returned.
        let apply = |state: &mut HashMap<String, String>, kind: &mut Kind| match kind {
            Kind::Write(p) => {
                for (k, v) in p.iter() {
                    state.insert(k.clone(), v.clone());
                }
            }
            // (This workload's keys never expire: it has no clock.)
            Kind::SetPx { key, value, .. } => {
                state.insert(key.clone(), value.clone());
            }
            Kind::Read(p) => {
                for (k, v) in p.iter_mut() {
                    *v = state.get(k).cloned();
                }
            }
            Kind::Incr { key, value } => {
                let n: i64 = state.get(key).map_or(0, |v| v.parse().unwrap()) + 1;
                state.insert(key.clone(), n.to_string());
                *value = n;
            }
            Kind::Cas {
                key,
                expected,
                new,
                swapped,
            } => {
                *swapped = state.get(key) == Some(expected);
                if *swapped {
                    state.insert(key.clone(), new.clone());
                }
            }
            Kind::Tx(steps) => {
                for st in steps.iter_mut() {
                    match st {
                        TxStep::Set(k, v) => {
                            state.insert(k.clone(), v.clone());
                        }
                        TxStep::Get(k, v) => *v = state.get(k).cloned(),
                        TxStep::Incr(k, n) => {
                            *n = state.get(k).map_or(0, |v| v.parse().unwrap()) + 1;
                            state.insert(k.clone(), n.to_string());
                        }
                    }
                }
            }
        };
        while out.len() < ops {
            t += 1;
            // Now and then a zombie (an abandoned operation) takes effect.
            if !zombies.is_empty() && rng.below(50) == 0 {
                let z = zombies.swap_remove(rng.below(zombies.len() as u64) as usize);
                let mut kind = z.kind;
                apply(&mut state, &mut kind);
            }
            let c = rng.below(clients as u64) as usize;
            match slots[c].take() {
                None => {
                    seq += 1;
                    let v = format!("v{seq}");
                    let pair = if rng.below(2) == 0 {
                        ("a", "b")
                    } else {
                        ("c", "d")
                    };
                    let one = if rng.below(2) == 0 { pair.0 } else { pair.1 };
                    let kind = match rng.below(7) {
                        0 => Kind::set(one, &v),
                        1 => mset_kind(&[(pair.0, &v), (pair.1, &v)]),
                        2 => Kind::get(one, None),
                        3 => Kind::Read(vec![(pair.0.into(), None), (pair.1.into(), None)]),
                        4 => incr("n", 0),
                        5 => Kind::get("n", None),
                        _ => {
                            let expected = state
                                .get(one)
                                .cloned()
                                .filter(|_| rng.below(3) != 0)
                                .unwrap_or_else(|| format!("v{}", rng.below(seq)));
                            cas(one, &expected, &v, false)
                        }
                    };
                    slots[c] = Some(Pending {
                        kind,
                        call: t,
                        done: false,
                    });
                }
                Some(mut p) if !p.done => {
                    apply(&mut state, &mut p.kind);
                    p.done = true;
                    slots[c] = Some(p);
                }
                Some(p) => {
                    // Returns; one in forty gives up (before or after it took effect).
                    let ret = (rng.below(40) != 0).then_some(t);
                    out.push(Op {
                        kind: p.kind,
                        call: p.call,
                        ret,
                    });
                }
            }
            // A client may give up on an operation that has not taken effect.
            if rng.below(200) == 0 {
                let c = rng.below(clients as u64) as usize;
                if let Some(p) = slots[c].take_if(|p| !p.done) {
                    out.push(Op {
                        kind: p.kind.clone(),
                        call: p.call,
                        ret: None,
                    });
                    zombies.push(p);
                }
            }
        }
        // Operations still in flight at the end: their clients never heard back.
        for p in slots.into_iter().flatten() {
            out.push(Op {
                kind: p.kind,
                call: p.call,
                ret: None,
            });
        }
        out
    }

    #[test]
    fn histories_of_an_atomic_map_are_accepted_quickly() {
        for seed in 0..8 {
            let h = simulated(seed, 3000, 5);
            let unknown = h.iter().filter(|o| o.ret.is_none()).count();
            let t = std::time::Instant::now();
            if let Err(e) = check(&h) {
                panic!("seed {seed}: {e}");
            }
            println!(
                "seed {seed}: {} ops ({unknown} unknown) checked in {:?}",
                h.len(),
                t.elapsed()
            );
        }
    }

    #[test]
    fn damaged_histories_of_an_atomic_map_are_rejected() {
        // Each history gets one damage that no atomic map can produce: an
        // acknowledged INCR returns what another one returned, or an
        // acknowledged read returns a value first written after it returned.
        let mut damaged = 0;
        for seed in 0..40 {
            let mut h = simulated(100 + seed, 400, 4);
            if let Err(e) = check(&h) {
                panic!("seed {seed} before the damage: {e}");
            }
            let acked_incr = |o: &Op| o.ret.is_some() && matches!(o.kind, Kind::Incr { .. });
            if seed % 2 == 0 {
                let Some(a) = h.iter().position(acked_incr) else {
                    continue;
                };
                let Some(b) = h.iter().rposition(acked_incr).filter(|&b| b != a) else {
                    continue;
                };
                let Kind::Incr { value, .. } = h[a].kind else {
                    unreachable!()
                };
                if let Kind::Incr { value: v, .. } = &mut h[b].kind {
                    *v = value;
                }
            } else {
                let future = (0..h.len()).find_map(|r| {
                    let (Kind::Read(p), Some(ret)) = (&h[r].kind, h[r].ret) else {
                        return None;
                    };
                    let key = &p[0].0;
                    h.iter().find_map(|w| match &w.kind {
                        Kind::Write(p) if w.call > ret => p
                            .iter()
                            .find(|(k, _)| k == key)
                            .map(|(_, v)| (r, v.clone())),
                        _ => None,
                    })
                });
                let Some((r, v)) = future else {
                    continue;
                };
                if let Kind::Read(p) = &mut h[r].kind {
                    p[0].1 = Some(v);
                }
            }
            damaged += 1;
            assert!(
                matches!(check(&h), Err(CheckError::NotLinearizable(_))),
                "seed {seed}: the damage was not caught"
            );
        }
        assert!(damaged > 30, "only {damaged} histories damaged");
    }
}
