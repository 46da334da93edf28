//! The store's commands: [`Command`], parsed once from a client's request;
//! [`WriteCmd`], the form a write takes in the Raft log; [`ReadCmd`]; and
//! the [`Value`] a command yields.

use crate::error::KvError;
use serde::{Deserialize, Serialize};

/// A condition on SET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetCond {
    /// Always set.
    Always,
    /// Only if the key does not exist (NX).
    IfAbsent,
    /// Only if the key exists (XX).
    IfPresent,
}

/// What a write does to its key's expiry time. Relative times are turned
/// into absolute ones when the entry is applied, with the entry's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ttl {
    /// The key has no expiry afterwards (plain SET).
    Clear,
    /// The key keeps its expiry (KEEPTTL).
    Keep,
    /// Expires this many milliseconds after the entry's time.
    In(i64),
    /// Expires at this time (milliseconds since the Unix epoch).
    At(i64),
}

/// EXPIRE's conditions (XX may go with GT or LT).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpireCond {
    /// NX: only when the key has no expiry.
    pub nx: bool,
    /// XX: only when it has one.
    pub xx: bool,
    /// GT: only when the new time is later (no expiry counts as never).
    pub gt: bool,
    /// LT: only when the new time is earlier.
    pub lt: bool,
}

/// A write, as stored in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteCmd {
    /// SET key value [NX|XX].
    Set {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Condition.
        cond: SetCond,
    },
    /// DEL key...
    Del(Vec<Vec<u8>>),
    /// MSET key value ...
    MSet(Vec<(Vec<u8>, Vec<u8>)>),
    /// INCRBY key delta (INCR, DECR, INCRBY).
    IncrBy(#[serde(with = "serde_bytes")] Vec<u8>, i64),
    /// CAS key expected new: set to `new` only if the value equals `expected`.
    Cas {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Expected current value.
        #[serde(with = "serde_bytes")]
        expected: Vec<u8>,
        /// New value.
        #[serde(with = "serde_bytes")]
        new: Vec<u8>,
    },
    // Variants are only ever added at the end: the log holds their index.
    /// GETSET key value: set, answer the old value.
    GetSet(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// GETDEL key.
    GetDel(#[serde(with = "serde_bytes")] Vec<u8>),
    /// SETNX key value: 1 if set.
    SetNx(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// APPEND key value: the new length.
    Append(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// INCRBYFLOAT key increment (the increment as sent, parsed at apply).
    IncrByFloat(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// SETRANGE key offset value: the new length.
    SetRange(
        #[serde(with = "serde_bytes")] Vec<u8>,
        u64,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// MSETNX key value ...: 1 if all were set (none existed).
    MSetNx(Vec<(Vec<u8>, Vec<u8>)>),
    /// RENAME key newkey (`nx`: RENAMENX).
    Rename {
        /// Key.
        #[serde(with = "serde_bytes")]
        from: Vec<u8>,
        /// New name.
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
        /// Only if the new name is free.
        nx: bool,
    },
    /// COPY source destination [REPLACE].
    Copy {
        /// Source.
        #[serde(with = "serde_bytes")]
        from: Vec<u8>,
        /// Destination.
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
        /// Overwrite an existing destination.
        replace: bool,
    },
    /// FLUSHDB / FLUSHALL.
    FlushAll,
    /// MULTI ... EXEC: the queued commands, applied together in one entry.
    Exec(Vec<TxCmd>),
    /// SET with options beyond NX/XX: an expiry or KEEPTTL, and GET.
    SetWith {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// NX / XX.
        cond: SetCond,
        /// What happens to the key's expiry.
        ttl: Ttl,
        /// GET: answer the old value.
        get: bool,
        /// The command's name (set, setex, psetex), for its error message.
        name: String,
    },
    /// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT key time [NX|XX|GT|LT].
    Expire {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The new expiry (`In` or `At`).
        at: Ttl,
        /// The condition.
        cond: ExpireCond,
        /// The command's name, for its error message.
        name: String,
    },
    /// PERSIST key: 1 if an expiry was removed.
    Persist(#[serde(with = "serde_bytes")] Vec<u8>),
    /// GETEX key EX|PX|EXAT|PXAT|PERSIST: the value, and a new expiry. The
    /// option and its time stay as sent: as in Redis, the time is checked
    /// only once the key is found.
    GetEx {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The option (upper case).
        opt: String,
        /// Its time (empty for PERSIST).
        #[serde(with = "serde_bytes")]
        time: Vec<u8>,
    },
    /// EXEC after WATCH: the queued commands run only if no watched key
    /// was written or removed after its entry (the applied index when the
    /// client watched it); otherwise the reply is a null array.
    ExecWatched {
        /// The watched keys, each with the entry its watch started after.
        keys: Vec<(Vec<u8>, u64)>,
        /// The queued commands.
        cmds: Vec<TxCmd>,
    },
    /// HSET key field value ... (HMSET: `ok` is its `+OK` reply).
    HSet {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Fields and values.
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        /// HMSET.
        ok: bool,
    },
    /// HSETNX key field value.
    HSetNx(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// HDEL key field...
    HDel(#[serde(with = "serde_bytes")] Vec<u8>, Vec<Vec<u8>>),
    /// HINCRBY key field increment.
    HIncrBy(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
        i64,
    ),
    /// HINCRBYFLOAT key field increment (as sent).
    HIncrByFloat(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// LPUSH / RPUSH key element...
    Push {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Elements, pushed one after the other.
        elems: Vec<Vec<u8>>,
        /// At the head (LPUSH).
        left: bool,
    },
    /// LPOP / RPOP key [count].
    Pop {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// How many (`None`: one, answered as a bulk string).
        count: Option<u64>,
        /// From the head (LPOP).
        left: bool,
    },
    /// LREM key count element.
    LRem(
        #[serde(with = "serde_bytes")] Vec<u8>,
        i64,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// LTRIM key start stop.
    LTrim(#[serde(with = "serde_bytes")] Vec<u8>, i64, i64),
    /// SADD key member...
    SAdd(#[serde(with = "serde_bytes")] Vec<u8>, Vec<Vec<u8>>),
    /// SREM key member...
    SRem(#[serde(with = "serde_bytes")] Vec<u8>, Vec<Vec<u8>>),
    /// ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member ...
    ZAdd {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Scores (as f64 bits) and members.
        pairs: Vec<(u64, Vec<u8>)>,
        /// NX / XX.
        cond: SetCond,
        /// GT (1) or LT (-1), or neither (0).
        cmp: i8,
        /// CH: count changed members, not only added ones.
        ch: bool,
        /// INCR: add to the score; answer the new one.
        incr: bool,
    },
    /// ZREM key member...
    ZRem(#[serde(with = "serde_bytes")] Vec<u8>, Vec<Vec<u8>>),
    /// ZINCRBY key increment member (the increment as f64 bits).
    ZIncrBy(
        #[serde(with = "serde_bytes")] Vec<u8>,
        u64,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    /// Removes those of the keys whose expiry time has passed at the
    /// entry's time. The leader proposes it for keys it found expired; an
    /// empty one only moves the clock on.
    Reap(Vec<Vec<u8>>),
}

/// A command queued in a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxCmd {
    /// A write.
    Write(WriteCmd),
    /// A read, answered from the state the transaction's earlier commands
    /// left.
    Read(ReadTx),
    /// PING [message].
    Ping(Option<Vec<u8>>),
    /// ECHO message.
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A command whose answer was known when it was queued (SELECT 0).
    Reply(Value),
}

/// The reads a transaction may queue (those answered from single keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadTx {
    /// GET key.
    Get(#[serde(with = "serde_bytes")] Vec<u8>),
    /// MGET key...
    MGet(Vec<Vec<u8>>),
    /// EXISTS key...
    Exists(Vec<Vec<u8>>),
    /// STRLEN key.
    StrLen(#[serde(with = "serde_bytes")] Vec<u8>),
    /// GETRANGE key start end.
    GetRange(#[serde(with = "serde_bytes")] Vec<u8>, i64, i64),
    /// TYPE key.
    Type(#[serde(with = "serde_bytes")] Vec<u8>),
    /// DBSIZE.
    DbSize,
    /// KEYS pattern.
    Keys(#[serde(with = "serde_bytes")] Vec<u8>),
    /// TTL, PTTL, EXPIRETIME, PEXPIRETIME key.
    Ttl {
        /// Key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// In milliseconds.
        ms: bool,
        /// The expiry time itself.
        absolute: bool,
    },
    /// A read of the hash at a key.
    Hash(#[serde(with = "serde_bytes")] Vec<u8>, HashRead),
    /// A read of the list or set at a key.
    Coll(#[serde(with = "serde_bytes")] Vec<u8>, CollRead),
    /// A read of the sorted set at a key.
    Z(#[serde(with = "serde_bytes")] Vec<u8>, ZRead),
}

impl ReadTx {
    /// The transaction form of a read, if it has one.
    pub fn from_read(r: ReadCmd) -> Option<ReadTx> {
        Some(match r {
            ReadCmd::Get(k) => ReadTx::Get(k),
            ReadCmd::MGet(k) => ReadTx::MGet(k),
            ReadCmd::Exists(k) => ReadTx::Exists(k),
            ReadCmd::StrLen(k) => ReadTx::StrLen(k),
            ReadCmd::GetRange(k, a, b) => ReadTx::GetRange(k, a, b),
            ReadCmd::Type(k) => ReadTx::Type(k),
            ReadCmd::DbSize => ReadTx::DbSize,
            ReadCmd::Keys(p) => ReadTx::Keys(p),
            ReadCmd::Ttl { key, ms, absolute } => ReadTx::Ttl { key, ms, absolute },
            ReadCmd::Hash(key, h) => ReadTx::Hash(key, h),
            ReadCmd::Coll(key, c) => ReadTx::Coll(key, c),
            ReadCmd::Z(key, z) => ReadTx::Z(key, z),
            // Random, or a cursor: replicas would disagree / no use.
            ReadCmd::RandomKey | ReadCmd::Scan { .. } => return None,
        })
    }
}

/// A command's value (the domain's result; errors are [`KvError`]s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// Done (`+OK`).
    Ok,
    /// A status word (`+PONG`).
    Status(String),
    /// Nothing (a null bulk string).
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Vec<u8>),
    /// An array of optional bulk strings.
    Array(Vec<Option<Vec<u8>>>),
    /// An array of any values.
    List(Vec<Value>),
    /// A map (RESP3; a flat array of keys and values in RESP2).
    Map(Vec<(Value, Value)>),
    /// A set (RESP3; an array in RESP2).
    Set(Vec<Value>),
    /// Text for people (RESP3's verbatim string; a bulk string in RESP2).
    Verbatim(String),
    /// An error inside an array (EXEC's replies): its whole text, code first.
    Error(String),
    /// A null array (EXEC that did not run; `*-1` in RESP2).
    NilArray,
    /// A double, as Redis prints it (RESP3's double; a bulk string in
    /// RESP2).
    Double(String),
    /// Pairs, each a two-element `List` (RESP3: an array of pairs; RESP2:
    /// one flat array, as ZRANGE ... WITHSCORES answers).
    Pairs(Vec<Value>),
}

impl Value {
    /// A bulk string from text.
    pub fn text(s: impl Into<String>) -> Value {
        Value::Bulk(s.into().into_bytes())
    }
}

/// A `CLIENT` subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCmd {
    /// CLIENT SETNAME name.
    SetName(Vec<u8>),
    /// CLIENT GETNAME.
    GetName,
    /// CLIENT ID.
    Id,
    /// CLIENT SETINFO LIB-NAME|LIB-VER value.
    SetInfo {
        /// `true`: LIB-NAME; `false`: LIB-VER.
        lib_name: bool,
        /// The value.
        value: Vec<u8>,
    },
    /// CLIENT INFO.
    Info,
    /// CLIENT LIST [ID id ...].
    List(Vec<u64>),
    /// CLIENT KILL addr (old form: `Ok` or an error), or with filters
    /// (`ID id`, `ADDR addr`, `LADDR addr`, `SKIPME yes|no`: a count).
    Kill {
        /// The old one-argument form.
        old_form: bool,
        /// ID filter.
        id: Option<u64>,
        /// ADDR filter.
        addr: Option<String>,
        /// LADDR filter.
        laddr: Option<String>,
        /// SKIPME (default yes).
        skip_me: bool,
    },
    /// CLIENT NO-EVICT / NO-TOUCH / REPLY ON: accepted, nothing to do.
    NoOp,
}

/// A `COMMAND` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandQuery {
    /// COMMAND: every command's description.
    All,
    /// COMMAND COUNT.
    Count,
    /// COMMAND INFO [name ...].
    Info(Vec<Vec<u8>>),
    /// COMMAND DOCS [name ...].
    Docs(Vec<Vec<u8>>),
    /// COMMAND LIST.
    List,
}

/// A read, answered from one applied state after a read barrier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadCmd {
    /// GET key.
    Get(Vec<u8>),
    /// MGET key...
    MGet(Vec<Vec<u8>>),
    /// EXISTS key...
    Exists(Vec<Vec<u8>>),
    /// STRLEN key.
    StrLen(Vec<u8>),
    /// DBSIZE.
    DbSize,
    /// GETRANGE key start end.
    GetRange(Vec<u8>, i64, i64),
    /// TYPE key.
    Type(Vec<u8>),
    /// KEYS pattern.
    Keys(Vec<u8>),
    /// RANDOMKEY.
    RandomKey,
    /// TTL, PTTL, EXPIRETIME, PEXPIRETIME key.
    Ttl {
        /// Key.
        key: Vec<u8>,
        /// In milliseconds (PTTL, PEXPIRETIME) rather than seconds.
        ms: bool,
        /// The expiry time itself (EXPIRETIME) rather than what is left.
        absolute: bool,
    },
    /// A read of the hash at a key.
    Hash(Vec<u8>, HashRead),
    /// A read of the list or set at a key.
    Coll(Vec<u8>, CollRead),
    /// A read of the sorted set at a key.
    Z(Vec<u8>, ZRead),
    /// SCAN cursor [MATCH pattern] [COUNT n] [TYPE type].
    Scan {
        /// Where to go on (0: from the start).
        cursor: u64,
        /// MATCH.
        pattern: Option<Vec<u8>>,
        /// COUNT (default 10).
        count: usize,
        /// TYPE: only keys of this type (its name, lower case).
        kind: Option<Vec<u8>>,
    },
}

/// Most keys a cheap MGET or EXISTS reads ([`ReadCmd::is_cheap`]).
pub const CHEAP_READ_KEYS: usize = 64;

impl ReadCmd {
    /// A read of a bounded number of plain keys (at most
    /// [`CHEAP_READ_KEYS`]), answered on the connection's own task. The
    /// others (a pattern over every key, a scan, a collection, which is
    /// stored whole) can take long: a KEYS over a million keys takes half a
    /// second, and on the thread that runs Raft it cost the leadership.
    pub fn is_cheap(&self) -> bool {
        match self {
            ReadCmd::Get(_)
            | ReadCmd::StrLen(_)
            | ReadCmd::GetRange(..)
            | ReadCmd::Type(_)
            | ReadCmd::DbSize
            | ReadCmd::Ttl { .. } => true,
            ReadCmd::MGet(keys) | ReadCmd::Exists(keys) => keys.len() <= CHEAP_READ_KEYS,
            ReadCmd::Keys(_)
            | ReadCmd::RandomKey
            | ReadCmd::Hash(..)
            | ReadCmd::Coll(..)
            | ReadCmd::Z(..)
            | ReadCmd::Scan { .. } => false,
        }
    }
}

impl WriteCmd {
    /// A write whose cost is bounded by its own size (plain keys, no
    /// collection, no pattern, no copy of a stored value): a batch of
    /// these may be applied on the applier's task.
    pub fn is_cheap(&self) -> bool {
        matches!(
            self,
            WriteCmd::Set { .. }
                | WriteCmd::SetWith { .. }
                | WriteCmd::SetNx(..)
                | WriteCmd::GetSet(..)
                | WriteCmd::GetDel(_)
                | WriteCmd::Del(_)
                | WriteCmd::MSet(_)
                | WriteCmd::MSetNx(_)
                | WriteCmd::IncrBy(..)
                | WriteCmd::IncrByFloat(..)
                | WriteCmd::Cas { .. }
                | WriteCmd::Expire { .. }
                | WriteCmd::Persist(_)
        )
    }
}

/// A read of a hash (also queued in MULTI, so it travels in the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashRead {
    /// HGET key field.
    Get(#[serde(with = "serde_bytes")] Vec<u8>),
    /// HMGET key field...
    MGet(Vec<Vec<u8>>),
    /// HGETALL key.
    GetAll,
    /// HEXISTS key field.
    Exists(#[serde(with = "serde_bytes")] Vec<u8>),
    /// HLEN key.
    Len,
    /// HKEYS key.
    Keys,
    /// HVALS key.
    Vals,
    /// HSTRLEN key field.
    StrLen(#[serde(with = "serde_bytes")] Vec<u8>),
    /// HSCAN key cursor [MATCH pattern] [COUNT n]: every field at once
    /// (cursor 0), as Redis answers for a small hash.
    Scan(Option<Vec<u8>>),
}

/// A read of a list or a set (also queued in MULTI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollRead {
    /// LRANGE key start stop.
    LRange(i64, i64),
    /// LLEN key.
    LLen,
    /// LINDEX key index (as sent: as Redis, it is read after the key).
    LIndex(#[serde(with = "serde_bytes")] Vec<u8>),
    /// SMEMBERS key.
    SMembers,
    /// SISMEMBER key member.
    SIsMember(#[serde(with = "serde_bytes")] Vec<u8>),
    /// SCARD key.
    SCard,
    /// SSCAN key cursor [MATCH pattern] [COUNT n]: every member at once.
    SScan(Option<Vec<u8>>),
    /// SINTER key [key ...] (the other keys).
    SInter(Vec<Vec<u8>>),
    /// SUNION key [key ...] (the other keys).
    SUnion(Vec<Vec<u8>>),
}

/// A read of a sorted set (also queued in MULTI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ZRead {
    /// ZSCORE key member.
    Score(#[serde(with = "serde_bytes")] Vec<u8>),
    /// ZCARD key.
    Card,
    /// ZRANK / ZREVRANK key member [WITHSCORE].
    Rank {
        /// Member.
        #[serde(with = "serde_bytes")]
        member: Vec<u8>,
        /// ZREVRANK.
        rev: bool,
        /// WITHSCORE.
        with_score: bool,
    },
    /// ZRANGE key start stop [BYSCORE] [REV] [LIMIT offset count] [WITHSCORES].
    Range {
        /// By rank (`start`, `stop` as integers) or by score (as sent:
        /// `-inf`, `(1.5` ...).
        by_score: bool,
        /// Start (as sent).
        #[serde(with = "serde_bytes")]
        start: Vec<u8>,
        /// Stop (as sent).
        #[serde(with = "serde_bytes")]
        stop: Vec<u8>,
        /// REV.
        rev: bool,
        /// LIMIT offset count.
        limit: Option<(i64, i64)>,
        /// WITHSCORES.
        with_scores: bool,
    },
    /// ZSCAN key cursor [MATCH pattern] [COUNT n]: every member at once.
    Scan(Option<Vec<u8>>),
}

/// A cluster administration request (`RAFT.MEMBER ...`, `RAFT.TRANSFER`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCmd {
    /// RAFT.MEMBER LIST: the configuration in force.
    List,
    /// RAFT.MEMBER ADD id raft-addr [identity]: a new learner.
    Add {
        /// Its id.
        id: u64,
        /// Where peers reach it (its `--raft-addr`).
        addr: String,
        /// Its storage identity (INFO `raft_identity`); 0 if unknown.
        incarnation: u64,
    },
    /// RAFT.MEMBER PROMOTE id: a caught-up learner becomes a voter.
    Promote(u64),
    /// RAFT.MEMBER DEMOTE id: a voter becomes a learner.
    Demote(u64),
    /// RAFT.MEMBER REMOVE id.
    Remove(u64),
    /// RAFT.TRANSFER [id]: hand leadership over.
    Transfer(Option<u64>),
}

/// A client request, parsed once from its RESP arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// PING [message].
    Ping(Option<Vec<u8>>),
    /// ECHO message.
    Echo(Vec<u8>),
    /// AUTH [user] password.
    Auth(Option<Vec<u8>>, Vec<u8>),
    /// HELLO [protover [AUTH user pass] [SETNAME name]].
    Hello {
        /// The protocol asked for (2 or 3).
        proto: Option<i64>,
        /// AUTH user pass.
        auth: Option<(Vec<u8>, Vec<u8>)>,
        /// SETNAME name.
        setname: Option<Vec<u8>>,
    },
    /// CLIENT ...
    Client(ClientCmd),
    /// SELECT db (only 0 exists).
    Select(i64),
    /// QUIT.
    Quit,
    /// RESET.
    Reset,
    /// TIME.
    Time,
    /// COMMAND ...
    CommandInfo(CommandQuery),
    /// MULTI.
    Multi,
    /// EXEC.
    Exec,
    /// DISCARD.
    Discard,
    /// WATCH key...
    Watch(Vec<Vec<u8>>),
    /// UNWATCH.
    Unwatch,
    /// INFO [section].
    Info,
    /// RAFTKV.BACKUP: a consistent snapshot of the whole store, as one bulk
    /// reply in the snapshot file format (what `raft-kv backup` saves).
    Backup,
    /// Cluster administration (runs on the leader).
    Admin(AdminCmd),
    /// A replicated write.
    Write(WriteCmd),
    /// A linearizable read.
    Read(ReadCmd),
}

fn int_arg(b: &[u8]) -> Result<i64, KvError> {
    parse_int(b).ok_or(KvError::NotAnInteger)
}

/// An integer as Redis reads one (its `string2ll`): an optional `-`, then
/// digits without a leading zero (except `0` itself); no `+`, no spaces.
pub fn parse_int(b: &[u8]) -> Option<i64> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    if digits.is_empty()
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits[0] == b'0' && (digits.len() > 1 || b.len() > 1))
    {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl Command {
    /// Parses a request (`args[0]` is the command name, any case). The one
    /// place that knows each command's shape: adding a command adds an arm
    /// here, one where it runs (`sm` for writes and reads), and a test.
    pub fn parse(mut args: Vec<Vec<u8>>) -> Result<Command, KvError> {
        if args.is_empty() {
            return Err(KvError::Syntax);
        }
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        let n = args.len();
        let arity = || KvError::WrongArity(name.to_ascii_lowercase());
        let mut rest = args.split_off(1).into_iter();
        let mut next = || rest.next().unwrap_or_default();
        Ok(match (name.as_str(), n) {
            ("PING", 1) => Command::Ping(None),
            ("PING", 2) => Command::Ping(Some(next())),
            ("ECHO", 2) => Command::Echo(next()),
            ("AUTH", 2) => Command::Auth(None, next()),
            ("AUTH", 3) => {
                let user = next();
                Command::Auth(Some(user), next())
            }
            ("HELLO", _) => parse_hello(rest.collect())?,
            ("CLIENT", 2..) => Command::Client(parse_client(rest.collect())?),
            ("SELECT", 2) => Command::Select(int_arg(&next())?),
            ("QUIT", _) => Command::Quit,
            ("RESET", 1) => Command::Reset,
            ("TIME", 1) => Command::Time,
            ("MULTI", 1) => Command::Multi,
            ("EXEC", 1) => Command::Exec,
            ("DISCARD", 1) => Command::Discard,
            ("WATCH", 2..) => Command::Watch(rest.collect()),
            ("UNWATCH", 1) => Command::Unwatch,
            ("COMMAND", 1) => Command::CommandInfo(CommandQuery::All),
            ("COMMAND", _) => {
                let sub = String::from_utf8_lossy(&next()).to_ascii_uppercase();
                Command::CommandInfo(match sub.as_str() {
                    "COUNT" if n == 2 => CommandQuery::Count,
                    "LIST" if n == 2 => CommandQuery::List,
                    "INFO" => CommandQuery::Info(rest.collect()),
                    "DOCS" => CommandQuery::Docs(rest.collect()),
                    _ => {
                        return Err(KvError::UnknownSubcommand {
                            sub,
                            command: "COMMAND".into(),
                        })
                    }
                })
            }
            ("INFO", 1 | 2) => Command::Info,
            ("RAFTKV.BACKUP", 1) => Command::Backup,
            ("RAFT.MEMBER", 2..=5) => {
                let sub = String::from_utf8_lossy(&next()).to_ascii_uppercase();
                let id = |b: Vec<u8>| -> Result<u64, KvError> {
                    u64::try_from(int_arg(&b)?).map_err(|_| KvError::NotAnInteger)
                };
                Command::Admin(match (sub.as_str(), n) {
                    ("LIST", 2) => AdminCmd::List,
                    ("ADD", 4 | 5) => {
                        let i = id(next())?;
                        let addr = String::from_utf8(next()).map_err(|_| KvError::Syntax)?;
                        let incarnation = match rest.next() {
                            Some(b) => std::str::from_utf8(&b)
                                .ok()
                                .and_then(|t| u64::from_str_radix(t, 16).ok())
                                .ok_or(KvError::Syntax)?,
                            None => 0,
                        };
                        AdminCmd::Add {
                            id: i,
                            addr,
                            incarnation,
                        }
                    }
                    ("PROMOTE", 3) => AdminCmd::Promote(id(next())?),
                    ("DEMOTE", 3) => AdminCmd::Demote(id(next())?),
                    ("REMOVE", 3) => AdminCmd::Remove(id(next())?),
                    _ => return Err(KvError::Syntax),
                })
            }
            ("RAFT.TRANSFER", 1) => Command::Admin(AdminCmd::Transfer(None)),
            ("RAFT.TRANSFER", 2) => Command::Admin(AdminCmd::Transfer(Some(
                u64::try_from(int_arg(&next())?).map_err(|_| KvError::NotAnInteger)?,
            ))),
            ("SET", 3..) => {
                let (key, value) = (next(), next());
                parse_set(key, value, rest.collect())?
            }
            ("SETEX" | "PSETEX", 4) => {
                let key = next();
                let t = int_arg(&next())?;
                let lower = name.to_ascii_lowercase();
                let ms = if name == "SETEX" {
                    t.checked_mul(1000)
                } else {
                    Some(t)
                }
                .filter(|&ms| t > 0 && ms > 0)
                .ok_or_else(|| invalid_expire(&lower))?;
                Command::Write(WriteCmd::SetWith {
                    key,
                    value: next(),
                    cond: SetCond::Always,
                    ttl: Ttl::In(ms),
                    get: false,
                    name: lower,
                })
            }
            ("GETEX", 2..) => {
                let key = next();
                let opts: Vec<Vec<u8>> = rest.collect();
                match parse_opts(&opts, true)?.2 {
                    None => Command::Read(ReadCmd::Get(key)),
                    Some((opt, time)) => Command::Write(WriteCmd::GetEx { key, opt, time }),
                }
            }
            ("EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT", 3..) => {
                let key = next();
                let t = next();
                // As Redis: the options are checked before the time.
                let mut cond = ExpireCond::default();
                for opt in rest {
                    match String::from_utf8_lossy(&opt).to_ascii_uppercase().as_str() {
                        "NX" => cond.nx = true,
                        "XX" => cond.xx = true,
                        "GT" => cond.gt = true,
                        "LT" => cond.lt = true,
                        _ => {
                            return Err(KvError::Other(format!(
                                "Unsupported option {}",
                                String::from_utf8_lossy(&opt)
                            )))
                        }
                    }
                }
                if cond.nx && (cond.xx || cond.gt || cond.lt) {
                    return Err(KvError::Other(
                        "NX and XX, GT or LT options at the same time are not compatible".into(),
                    ));
                }
                if cond.gt && cond.lt {
                    return Err(KvError::Other(
                        "GT and LT options at the same time are not compatible".into(),
                    ));
                }
                let t = int_arg(&t)?;
                let lower = name.to_ascii_lowercase();
                let ms = if name.starts_with('P') {
                    Some(t)
                } else {
                    t.checked_mul(1000)
                }
                .ok_or_else(|| invalid_expire(&lower))?;
                let at = if name.ends_with("AT") {
                    Ttl::At(ms)
                } else {
                    Ttl::In(ms)
                };
                Command::Write(WriteCmd::Expire {
                    key,
                    at,
                    cond,
                    name: lower,
                })
            }
            ("PERSIST", 2) => Command::Write(WriteCmd::Persist(next())),
            ("TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME", 2) => Command::Read(ReadCmd::Ttl {
                key: next(),
                ms: name.starts_with('P'),
                absolute: name.ends_with("TIME"),
            }),
            ("DEL", 2..) => Command::Write(WriteCmd::Del(rest.collect())),
            ("MSET", _) if n >= 3 && n % 2 == 1 => {
                let mut pairs = Vec::with_capacity(n / 2);
                while let (Some(k), Some(v)) = (rest.next(), rest.next()) {
                    pairs.push((k, v));
                }
                Command::Write(WriteCmd::MSet(pairs))
            }
            ("INCR", 2) => Command::Write(WriteCmd::IncrBy(next(), 1)),
            ("DECR", 2) => Command::Write(WriteCmd::IncrBy(next(), -1)),
            ("INCRBY", 3) => {
                let key = next();
                Command::Write(WriteCmd::IncrBy(key, int_arg(&next())?))
            }
            ("DECRBY", 3) => {
                let key = next();
                let d = int_arg(&next())?
                    .checked_neg()
                    .ok_or(KvError::DecrementOverflow)?;
                Command::Write(WriteCmd::IncrBy(key, d))
            }
            ("CAS", 4) => Command::Write(WriteCmd::Cas {
                key: next(),
                expected: next(),
                new: next(),
            }),
            ("GETSET", 3) => {
                let k = next();
                Command::Write(WriteCmd::GetSet(k, next()))
            }
            ("GETDEL", 2) => Command::Write(WriteCmd::GetDel(next())),
            ("SETNX", 3) => {
                let k = next();
                Command::Write(WriteCmd::SetNx(k, next()))
            }
            ("APPEND", 3) => {
                let k = next();
                Command::Write(WriteCmd::Append(k, next()))
            }
            ("INCRBYFLOAT", 3) => {
                let k = next();
                let by = next();
                parse_float(&by)?;
                Command::Write(WriteCmd::IncrByFloat(k, by))
            }
            ("SETRANGE", 4) => {
                let k = next();
                let off = int_arg(&next())?;
                if off < 0 {
                    return Err(KvError::Other("offset is out of range".into()));
                }
                Command::Write(WriteCmd::SetRange(k, off as u64, next()))
            }
            ("MSETNX", _) if n >= 3 && n % 2 == 1 => {
                let mut pairs = Vec::with_capacity(n / 2);
                while let (Some(k), Some(v)) = (rest.next(), rest.next()) {
                    pairs.push((k, v));
                }
                Command::Write(WriteCmd::MSetNx(pairs))
            }
            ("UNLINK", 2..) => Command::Write(WriteCmd::Del(rest.collect())),
            ("RENAME" | "RENAMENX", 3) => {
                let from = next();
                Command::Write(WriteCmd::Rename {
                    from,
                    to: next(),
                    nx: name == "RENAMENX",
                })
            }
            ("COPY", 3..) => {
                let (from, to) = (next(), next());
                let mut replace = false;
                for opt in rest {
                    match String::from_utf8_lossy(&opt).to_ascii_uppercase().as_str() {
                        "REPLACE" => replace = true,
                        // One database: DB 0 is the only one there is.
                        "DB" => return Err(KvError::Other("DB index is out of range".into())),
                        _ => return Err(KvError::Syntax),
                    }
                }
                Command::Write(WriteCmd::Copy { from, to, replace })
            }
            ("FLUSHDB" | "FLUSHALL", 1 | 2) => {
                if let Some(mode) = rest.next() {
                    let m = String::from_utf8_lossy(&mode).to_ascii_uppercase();
                    if m != "SYNC" && m != "ASYNC" {
                        return Err(KvError::Syntax);
                    }
                }
                Command::Write(WriteCmd::FlushAll)
            }
            ("GETRANGE", 4) => {
                let k = next();
                let (a, b) = (int_arg(&next())?, int_arg(&next())?);
                Command::Read(ReadCmd::GetRange(k, a, b))
            }
            ("TYPE", 2) => Command::Read(ReadCmd::Type(next())),
            ("KEYS", 2) => Command::Read(ReadCmd::Keys(next())),
            ("RANDOMKEY", 1) => Command::Read(ReadCmd::RandomKey),
            ("SCAN", 2..) => {
                let cursor = std::str::from_utf8(&next())
                    .ok()
                    .and_then(|c| c.parse::<u64>().ok())
                    .ok_or(KvError::Other("invalid cursor".into()))?;
                let (mut pattern, mut count, mut kind) = (None, 10usize, None);
                while let Some(opt) = rest.next() {
                    let arg = rest.next().ok_or(KvError::Syntax)?;
                    match String::from_utf8_lossy(&opt).to_ascii_uppercase().as_str() {
                        "MATCH" => pattern = Some(arg),
                        "COUNT" => {
                            count = usize::try_from(int_arg(&arg)?)
                                .ok()
                                .filter(|&c| c >= 1)
                                .ok_or(KvError::Syntax)?
                                .min(100_000)
                        }
                        "TYPE" => kind = Some(arg.to_ascii_lowercase()),
                        _ => return Err(KvError::Syntax),
                    }
                }
                Command::Read(ReadCmd::Scan {
                    cursor,
                    pattern,
                    count,
                    kind,
                })
            }
            ("HSET" | "HMSET", _) if n >= 4 && n.is_multiple_of(2) => {
                let key = next();
                let mut pairs = Vec::with_capacity(n / 2);
                while let (Some(f), Some(v)) = (rest.next(), rest.next()) {
                    pairs.push((f, v));
                }
                Command::Write(WriteCmd::HSet {
                    key,
                    pairs,
                    ok: name == "HMSET",
                })
            }
            ("HSETNX", 4) => {
                let (k, f) = (next(), next());
                Command::Write(WriteCmd::HSetNx(k, f, next()))
            }
            ("HDEL", 3..) => {
                let k = next();
                Command::Write(WriteCmd::HDel(k, rest.collect()))
            }
            ("HINCRBY", 4) => {
                let (k, f) = (next(), next());
                Command::Write(WriteCmd::HIncrBy(k, f, int_arg(&next())?))
            }
            ("HINCRBYFLOAT", 4) => {
                let (k, f) = (next(), next());
                let by = next();
                if parse_float(&by)?.is_infinite() {
                    return Err(KvError::Other("value is NaN or Infinity".into()));
                }
                Command::Write(WriteCmd::HIncrByFloat(k, f, by))
            }
            ("HGET", 3) => {
                let k = next();
                Command::Read(ReadCmd::Hash(k, HashRead::Get(next())))
            }
            ("HMGET", 3..) => {
                let k = next();
                Command::Read(ReadCmd::Hash(k, HashRead::MGet(rest.collect())))
            }
            ("HGETALL", 2) => Command::Read(ReadCmd::Hash(next(), HashRead::GetAll)),
            ("HEXISTS", 3) => {
                let k = next();
                Command::Read(ReadCmd::Hash(k, HashRead::Exists(next())))
            }
            ("HLEN", 2) => Command::Read(ReadCmd::Hash(next(), HashRead::Len)),
            ("HKEYS", 2) => Command::Read(ReadCmd::Hash(next(), HashRead::Keys)),
            ("HVALS", 2) => Command::Read(ReadCmd::Hash(next(), HashRead::Vals)),
            ("HSTRLEN", 3) => {
                let k = next();
                Command::Read(ReadCmd::Hash(k, HashRead::StrLen(next())))
            }
            ("HSCAN", 3..) => {
                let k = next();
                let pattern = member_scan(&next(), rest)?;
                Command::Read(ReadCmd::Hash(k, HashRead::Scan(pattern)))
            }
            ("LPUSH" | "RPUSH", 3..) => {
                let key = next();
                Command::Write(WriteCmd::Push {
                    key,
                    elems: rest.collect(),
                    left: name == "LPUSH",
                })
            }
            ("LPOP" | "RPOP", 2 | 3) => {
                let key = next();
                let count = match rest.next() {
                    None => None,
                    // As Redis: one message for anything but a count.
                    Some(c) => Some(
                        parse_int(&c)
                            .and_then(|n| u64::try_from(n).ok())
                            .ok_or_else(|| {
                                KvError::Other("value is out of range, must be positive".into())
                            })?,
                    ),
                };
                Command::Write(WriteCmd::Pop {
                    key,
                    count,
                    left: name == "LPOP",
                })
            }
            ("LREM", 4) => {
                let key = next();
                let count = int_arg(&next())?;
                Command::Write(WriteCmd::LRem(key, count, next()))
            }
            ("LTRIM", 4) => {
                let key = next();
                let (a, b) = (int_arg(&next())?, int_arg(&next())?);
                Command::Write(WriteCmd::LTrim(key, a, b))
            }
            ("LRANGE", 4) => {
                let key = next();
                let (a, b) = (int_arg(&next())?, int_arg(&next())?);
                Command::Read(ReadCmd::Coll(key, CollRead::LRange(a, b)))
            }
            ("LLEN", 2) => Command::Read(ReadCmd::Coll(next(), CollRead::LLen)),
            ("LINDEX", 3) => {
                let key = next();
                Command::Read(ReadCmd::Coll(key, CollRead::LIndex(next())))
            }
            ("SADD", 3..) => {
                let key = next();
                Command::Write(WriteCmd::SAdd(key, rest.collect()))
            }
            ("SREM", 3..) => {
                let key = next();
                Command::Write(WriteCmd::SRem(key, rest.collect()))
            }
            ("SMEMBERS", 2) => Command::Read(ReadCmd::Coll(next(), CollRead::SMembers)),
            ("SISMEMBER", 3) => {
                let key = next();
                Command::Read(ReadCmd::Coll(key, CollRead::SIsMember(next())))
            }
            ("SCARD", 2) => Command::Read(ReadCmd::Coll(next(), CollRead::SCard)),
            ("SINTER" | "SUNION", 2..) => {
                let key = next();
                let others = rest.collect();
                Command::Read(ReadCmd::Coll(
                    key,
                    if name == "SINTER" {
                        CollRead::SInter(others)
                    } else {
                        CollRead::SUnion(others)
                    },
                ))
            }
            ("SSCAN", 3..) => {
                let k = next();
                let pattern = member_scan(&next(), rest)?;
                Command::Read(ReadCmd::Coll(k, CollRead::SScan(pattern)))
            }
            ("ZADD", 4..) => {
                let key = next();
                parse_zadd(key, rest.collect())?
            }
            ("ZREM", 3..) => {
                let key = next();
                Command::Write(WriteCmd::ZRem(key, rest.collect()))
            }
            ("ZINCRBY", 4) => {
                let key = next();
                let by = parse_score(&next())?;
                Command::Write(WriteCmd::ZIncrBy(key, by.to_bits(), next()))
            }
            ("ZSCORE", 3) => {
                let key = next();
                Command::Read(ReadCmd::Z(key, ZRead::Score(next())))
            }
            ("ZCARD", 2) => Command::Read(ReadCmd::Z(next(), ZRead::Card)),
            ("ZRANK" | "ZREVRANK", 3 | 4) => {
                let key = next();
                let member = next();
                let with_score = match rest.next() {
                    None => false,
                    Some(o) if o.eq_ignore_ascii_case(b"WITHSCORE") => true,
                    Some(_) => return Err(KvError::Syntax),
                };
                Command::Read(ReadCmd::Z(
                    key,
                    ZRead::Rank {
                        member,
                        rev: name == "ZREVRANK",
                        with_score,
                    },
                ))
            }
            ("ZRANGE", 4..) => {
                let (key, start, stop) = (next(), next(), next());
                let (mut by_score, mut rev, mut with_scores, mut limit) =
                    (false, false, false, None);
                while let Some(o) = rest.next() {
                    match String::from_utf8_lossy(&o).to_ascii_uppercase().as_str() {
                        "BYSCORE" => by_score = true,
                        "REV" => rev = true,
                        "WITHSCORES" => with_scores = true,
                        "LIMIT" => {
                            let (Some(a), Some(b)) = (rest.next(), rest.next()) else {
                                return Err(KvError::Syntax);
                            };
                            limit = Some((int_arg(&a)?, int_arg(&b)?));
                        }
                        _ => return Err(KvError::Syntax),
                    }
                }
                if limit.is_some() && !by_score {
                    return Err(KvError::Other(
                        "syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX"
                            .into(),
                    ));
                }
                if by_score {
                    parse_score_bound(&start)?;
                    parse_score_bound(&stop)?;
                } else {
                    int_arg(&start)?;
                    int_arg(&stop)?;
                }
                Command::Read(ReadCmd::Z(
                    key,
                    ZRead::Range {
                        by_score,
                        start,
                        stop,
                        rev,
                        limit,
                        with_scores,
                    },
                ))
            }
            ("ZSCAN", 3..) => {
                let k = next();
                let pattern = member_scan(&next(), rest)?;
                Command::Read(ReadCmd::Z(k, ZRead::Scan(pattern)))
            }
            ("GET", 2) => Command::Read(ReadCmd::Get(next())),
            ("MGET", 2..) => Command::Read(ReadCmd::MGet(rest.collect())),
            ("EXISTS", 2..) => Command::Read(ReadCmd::Exists(rest.collect())),
            ("STRLEN", 2) => Command::Read(ReadCmd::StrLen(next())),
            ("DBSIZE", 1) => Command::Read(ReadCmd::DbSize),
            (
                "GETSET" | "GETDEL" | "SETNX" | "APPEND" | "INCRBYFLOAT" | "SETRANGE" | "MSETNX"
                | "UNLINK" | "RENAME" | "RENAMENX" | "COPY" | "FLUSHDB" | "FLUSHALL" | "GETRANGE"
                | "TYPE" | "KEYS" | "RANDOMKEY" | "SCAN" | "MULTI" | "EXEC" | "DISCARD" | "WATCH"
                | "UNWATCH" | "PING" | "ECHO" | "AUTH" | "CLIENT" | "SELECT" | "RESET" | "TIME"
                | "SET" | "DEL" | "MSET" | "INCR" | "DECR" | "INCRBY" | "DECRBY" | "CAS" | "GET"
                | "MGET" | "EXISTS" | "STRLEN" | "DBSIZE" | "INFO" | "RAFT.MEMBER"
                | "RAFT.TRANSFER" | "SETEX" | "PSETEX" | "GETEX" | "EXPIRE" | "PEXPIRE"
                | "EXPIREAT" | "PEXPIREAT" | "PERSIST" | "TTL" | "PTTL" | "EXPIRETIME"
                | "PEXPIRETIME" | "HSET" | "HMSET" | "HSETNX" | "HDEL" | "HINCRBY" | "HINCRBYFLOAT"
                | "HGET" | "HMGET" | "HGETALL" | "HEXISTS" | "HLEN" | "HKEYS" | "HVALS" | "HSTRLEN"
                | "HSCAN" | "LPUSH" | "RPUSH" | "LPOP" | "RPOP" | "LREM" | "LTRIM" | "LRANGE"
                | "LLEN" | "LINDEX" | "SADD" | "SREM" | "SMEMBERS" | "SISMEMBER" | "SCARD"
                | "SINTER" | "SUNION" | "SSCAN" | "ZADD" | "ZREM" | "ZINCRBY" | "ZSCORE" | "ZCARD"
                | "ZRANK" | "ZREVRANK" | "ZRANGE" | "ZSCAN",
                _,
            ) => return Err(arity()),
            _ => {
                // As Redis: the name and the arguments shown are cut to 128
                // characters, so a huge argument makes a short error.
                let mut shown = String::new();
                for a in rest {
                    if shown.len() >= 128 {
                        break;
                    }
                    let room = 128 - shown.len();
                    // Redis prints C strings: an argument ends at a NUL.
                    let a = a.split(|&b| b == 0).next().unwrap_or_default();
                    let text = String::from_utf8_lossy(&a[..a.len().min(room)]).into_owned();
                    shown.push('\'');
                    shown.push_str(&text);
                    shown.push_str("' ");
                }
                let name = args[0].split(|&b| b == 0).next().unwrap_or_default();
                let name = &name[..name.len().min(128)];
                return Err(KvError::UnknownCommand {
                    name: String::from_utf8_lossy(name).into_owned(),
                    args: shown,
                });
            }
        })
    }
}

fn invalid_expire(command: &str) -> KvError {
    KvError::Other(format!("invalid expire time in '{command}' command"))
}

/// The options of SET (`NX`, `XX`, `GET`, `EX s`, `PX ms`, `EXAT s`,
/// `PXAT ms`, `KEEPTTL`) or of GETEX (the timed ones and `PERSIST`), with
/// Redis's rules: an option may repeat (the last time counts), two that
/// conflict are a syntax error. The expiry option comes back as sent: see
/// [`ttl_option`].
#[allow(clippy::type_complexity)]
fn parse_opts(
    opts: &[Vec<u8>],
    getex: bool,
) -> Result<(SetCond, bool, Option<(String, Vec<u8>)>), KvError> {
    let (mut cond, mut get) = (SetCond::Always, false);
    // The expiry option seen (its name) and its argument.
    let mut timed: Option<(String, Vec<u8>)> = None;
    let mut i = 0;
    while i < opts.len() {
        let o = String::from_utf8_lossy(&opts[i]).to_ascii_uppercase();
        let same_or_none = |t: &Option<(String, Vec<u8>)>| t.as_ref().is_none_or(|(n, _)| *n == o);
        match o.as_str() {
            "NX" if !getex && cond != SetCond::IfPresent => cond = SetCond::IfAbsent,
            "XX" if !getex && cond != SetCond::IfAbsent => cond = SetCond::IfPresent,
            "GET" if !getex => get = true,
            "KEEPTTL" if !getex && same_or_none(&timed) => timed = Some((o, Vec::new())),
            "PERSIST" if getex && same_or_none(&timed) => timed = Some((o, Vec::new())),
            "EX" | "PX" | "EXAT" | "PXAT" if same_or_none(&timed) && i + 1 < opts.len() => {
                timed = Some((o, opts[i + 1].clone()));
                i += 1;
            }
            _ => return Err(KvError::Syntax),
        }
        i += 1;
    }
    Ok((cond, get, timed))
}

/// The expiry an option of SET or GETEX names (`EX 10`, `KEEPTTL` ...),
/// or Redis's error for its time.
pub fn ttl_option(opt: &str, arg: &[u8], command: &str) -> Result<Ttl, KvError> {
    Ok(match opt {
        "KEEPTTL" => Ttl::Keep,
        "PERSIST" => Ttl::Clear,
        n => {
            let t = int_arg(arg)?;
            let ms = if n.starts_with('P') {
                Some(t)
            } else {
                t.checked_mul(1000)
            }
            .filter(|&ms| t > 0 && ms > 0)
            .ok_or_else(|| invalid_expire(command))?;
            if n.ends_with("AT") {
                Ttl::At(ms)
            } else {
                Ttl::In(ms)
            }
        }
    })
}

/// SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL].
fn parse_set(key: Vec<u8>, value: Vec<u8>, opts: Vec<Vec<u8>>) -> Result<Command, KvError> {
    let (cond, get, timed) = parse_opts(&opts, false)?;
    let ttl = match timed {
        Some((opt, arg)) => Some(ttl_option(&opt, &arg, "set")?),
        None => None,
    };
    Ok(Command::Write(match (ttl, get) {
        (None, false) => WriteCmd::Set { key, value, cond },
        (ttl, get) => WriteCmd::SetWith {
            key,
            value,
            cond,
            ttl: ttl.unwrap_or(Ttl::Clear),
            get,
            name: "set".into(),
        },
    }))
}

/// HSCAN's, SSCAN's and ZSCAN's arguments after the key: a cursor (checked,
/// then unused: every member comes at once) and `MATCH`/`COUNT`; the
/// pattern.
fn member_scan(
    cursor: &[u8],
    mut rest: impl Iterator<Item = Vec<u8>>,
) -> Result<Option<Vec<u8>>, KvError> {
    std::str::from_utf8(cursor)
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
        .ok_or(KvError::Other("invalid cursor".into()))?;
    let mut pattern = None;
    while let Some(opt) = rest.next() {
        let arg = rest.next().ok_or(KvError::Syntax)?;
        match String::from_utf8_lossy(&opt).to_ascii_uppercase().as_str() {
            "MATCH" => pattern = Some(arg),
            "COUNT" => {
                if int_arg(&arg)? < 1 {
                    return Err(KvError::Syntax);
                }
            }
            _ => return Err(KvError::Syntax),
        }
    }
    Ok(pattern)
}

/// A sorted set score as Redis takes one (`inf`, `+inf`, `-inf`; not NaN).
pub fn parse_score(b: &[u8]) -> Result<f64, KvError> {
    parse_float(b)
}

/// A ZRANGE BYSCORE bound: a score, `(` before it when exclusive.
pub fn parse_score_bound(b: &[u8]) -> Result<(f64, bool), KvError> {
    let bad = || KvError::Other("min or max is not a float".into());
    match b.strip_prefix(b"(") {
        Some(rest) => Ok((parse_float(rest).map_err(|_| bad())?, true)),
        None => Ok((parse_float(b).map_err(|_| bad())?, false)),
    }
}

/// ZADD's options and pairs, with Redis's errors.
fn parse_zadd(key: Vec<u8>, args: Vec<Vec<u8>>) -> Result<Command, KvError> {
    let (mut cond, mut cmp, mut ch, mut incr) = (SetCond::Always, 0i8, false, false);
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    let mut i = 0;
    while i < args.len() {
        match String::from_utf8_lossy(&args[i])
            .to_ascii_uppercase()
            .as_str()
        {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            "CH" => ch = true,
            "INCR" => incr = true,
            _ => break,
        }
        i += 1;
    }
    let rest = &args[i..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err(KvError::Syntax);
    }
    if nx && xx {
        return Err(KvError::Other(
            "XX and NX options at the same time are not compatible".into(),
        ));
    }
    if ((gt || lt) && nx) || (gt && lt) {
        return Err(KvError::Other(
            "GT, LT, and/or NX options at the same time are not compatible".into(),
        ));
    }
    if incr && rest.len() > 2 {
        return Err(KvError::Other(
            "INCR option supports a single increment-element pair".into(),
        ));
    }
    if nx {
        cond = SetCond::IfAbsent;
    }
    if xx {
        cond = SetCond::IfPresent;
    }
    if gt {
        cmp = 1;
    }
    if lt {
        cmp = -1;
    }
    let mut pairs = Vec::with_capacity(rest.len() / 2);
    for p in rest.chunks(2) {
        pairs.push((parse_score(&p[0])?.to_bits(), p[1].clone()));
    }
    Ok(Command::Write(WriteCmd::ZAdd {
        key,
        pairs,
        cond,
        cmp,
        ch,
        incr,
    }))
}

/// A double as Redis prints one: whole numbers as integers, others in
/// their shortest form, `inf`, `-inf`, `-0`.
pub fn format_double(d: f64) -> String {
    if d.is_infinite() {
        return if d > 0.0 { "inf" } else { "-inf" }.into();
    }
    if d == 0.0 {
        return if d.is_sign_negative() { "-0" } else { "0" }.into();
    }
    if d.fract() == 0.0 && d.abs() < 9.007_199_254_740_992e15 {
        return format!("{}", d as i64);
    }
    let s = format!("{d}");
    // Rust writes large and small numbers in full; Redis (fpconv) writes an
    // exponent past 21 digits.
    if s.len() > 24 {
        let e = format!("{d:e}");
        return e.replacen('e', "e+", 1).replace("e+-", "e-");
    }
    s
}

/// A float argument as Redis takes one (`inf` is one, `nan` is not).
pub fn parse_float(b: &[u8]) -> Result<f64, KvError> {
    std::str::from_utf8(b)
        .ok()
        .filter(|s| !s.is_empty() && !s.starts_with(|c: char| c.is_whitespace()))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| !f.is_nan())
        .ok_or(KvError::NotAFloat)
}

/// Formats a float as Redis's INCRBYFLOAT does: plain decimal, no exponent,
/// no trailing zeros. Redis computes in 80-bit long doubles; rounding to 16
/// significant digits first hides the f64 noise that would otherwise show
/// (0.1 + 0.2 reads "0.3", as in Redis).
pub fn format_float(f: f64) -> String {
    let rounded: f64 = format!("{f:.15e}").parse().unwrap_or(f);
    let s = format!("{rounded}");
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

fn parse_hello(args: Vec<Vec<u8>>) -> Result<Command, KvError> {
    let mut it = args.into_iter();
    let Some(v) = it.next() else {
        return Ok(Command::Hello {
            proto: None,
            auth: None,
            setname: None,
        });
    };
    let proto = int_arg(&v).map_err(|_| KvError::ProtoNotInteger)?;
    let (mut auth, mut setname) = (None, None);
    while let Some(opt) = it.next() {
        let name = String::from_utf8_lossy(&opt).into_owned();
        match name.to_ascii_uppercase().as_str() {
            "AUTH" => match (it.next(), it.next()) {
                (Some(u), Some(p)) => auth = Some((u, p)),
                _ => return Err(KvError::HelloSyntax(name)),
            },
            "SETNAME" => match it.next() {
                Some(n) => setname = Some(n),
                None => return Err(KvError::HelloSyntax(name)),
            },
            _ => return Err(KvError::HelloSyntax(name)),
        }
    }
    Ok(Command::Hello {
        proto: Some(proto),
        auth,
        setname,
    })
}

fn parse_client(args: Vec<Vec<u8>>) -> Result<ClientCmd, KvError> {
    let sub = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
    let n = args.len();
    let arity = || KvError::WrongArity(format!("client|{}", sub.to_ascii_lowercase()));
    let mut rest = args.into_iter().skip(1);
    let id = |b: &[u8]| -> Result<u64, KvError> {
        u64::try_from(int_arg(b)?).map_err(|_| KvError::NotAnInteger)
    };
    Ok(match sub.as_str() {
        "SETNAME" if n == 2 => ClientCmd::SetName(rest.next().unwrap_or_default()),
        "GETNAME" if n == 1 => ClientCmd::GetName,
        "ID" if n == 1 => ClientCmd::Id,
        "INFO" if n == 1 => ClientCmd::Info,
        "SETINFO" if n == 3 => {
            let attr =
                String::from_utf8_lossy(&rest.next().unwrap_or_default()).to_ascii_uppercase();
            let value = rest.next().unwrap_or_default();
            match attr.as_str() {
                "LIB-NAME" => ClientCmd::SetInfo {
                    lib_name: true,
                    value,
                },
                "LIB-VER" => ClientCmd::SetInfo {
                    lib_name: false,
                    value,
                },
                _ => return Err(KvError::Other(format!("Unrecognized option '{attr}'"))),
            }
        }
        "LIST" => {
            let mut ids = Vec::new();
            let mut r = rest.peekable();
            while let Some(opt) = r.next() {
                match String::from_utf8_lossy(&opt).to_ascii_uppercase().as_str() {
                    "ID" => {
                        for i in r.by_ref() {
                            ids.push(
                                id(&i).map_err(|_| KvError::Other("Invalid client ID".into()))?,
                            );
                        }
                    }
                    "TYPE" => {
                        let _ = r.next();
                    }
                    _ => return Err(KvError::Syntax),
                }
            }
            ClientCmd::List(ids)
        }
        "KILL" if n == 2 => ClientCmd::Kill {
            old_form: true,
            id: None,
            addr: Some(String::from_utf8_lossy(&rest.next().unwrap_or_default()).into_owned()),
            laddr: None,
            skip_me: false,
        },
        "KILL" if n >= 3 && n % 2 == 1 => {
            let (mut fid, mut addr, mut laddr, mut skip_me) = (None, None, None, true);
            while let (Some(k), Some(v)) = (rest.next(), rest.next()) {
                let text = String::from_utf8_lossy(&v).into_owned();
                match String::from_utf8_lossy(&k).to_ascii_uppercase().as_str() {
                    "ID" => {
                        fid = Some(id(&v).map_err(|_| {
                            KvError::Other("client-id should be greater than 0".into())
                        })?)
                    }
                    "ADDR" => addr = Some(text),
                    "LADDR" => laddr = Some(text),
                    "SKIPME" => match text.to_ascii_lowercase().as_str() {
                        "yes" => skip_me = true,
                        "no" => skip_me = false,
                        _ => return Err(KvError::Syntax),
                    },
                    // Filters this store has no notion of match nobody.
                    "TYPE" | "USER" | "MAXAGE" => fid = Some(0),
                    _ => return Err(KvError::Syntax),
                }
            }
            ClientCmd::Kill {
                old_form: false,
                id: fid,
                addr,
                laddr,
                skip_me,
            }
        }
        "NO-EVICT" | "NO-TOUCH" if n == 2 => ClientCmd::NoOp,
        "REPLY" if n == 2 => ClientCmd::NoOp,
        "SETNAME" | "GETNAME" | "ID" | "INFO" | "SETINFO" | "KILL" | "NO-EVICT" | "NO-TOUCH"
        | "REPLY" => return Err(arity()),
        _ => {
            return Err(KvError::UnknownSubcommand {
                sub,
                command: "CLIENT".into(),
            })
        }
    })
}

/// The Redis version `HELLO` reports: the command set and replies follow
/// Redis 7.2 (client libraries gate features on it).
pub const REDIS_VERSION: &str = "7.2.0";

/// The commands this store serves, for `COMMAND`: name, arity (negative:
/// at least that many), flags, first key, last key, key step.
/// One `COMMAND` entry: name, arity, flags, first key, last key, step.
type CommandDesc = (&'static str, i64, &'static [&'static str], i64, i64, i64);

const TABLE: &[CommandDesc] = &[
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("set", -3, &["write", "denyoom"], 1, 1, 1),
    ("del", -2, &["write"], 1, -1, 1),
    ("exists", -2, &["readonly", "fast"], 1, -1, 1),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("mset", -3, &["write", "denyoom"], 1, -1, 2),
    ("incr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("decr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("incrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("decrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("strlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("dbsize", 1, &["readonly", "fast"], 0, 0, 0),
    ("cas", 4, &["write", "denyoom"], 1, 1, 1),
    ("getset", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("getdel", 2, &["write", "fast"], 1, 1, 1),
    ("setnx", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("append", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("incrbyfloat", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("setrange", 4, &["write", "denyoom"], 1, 1, 1),
    ("getrange", 4, &["readonly"], 1, 1, 1),
    ("msetnx", -3, &["write", "denyoom"], 1, -1, 2),
    ("unlink", -2, &["write", "fast"], 1, -1, 1),
    ("rename", 3, &["write"], 1, 2, 1),
    ("renamenx", 3, &["write", "fast"], 1, 2, 1),
    ("copy", -3, &["write", "denyoom"], 1, 2, 1),
    ("flushdb", -1, &["write"], 0, 0, 0),
    ("flushall", -1, &["write"], 0, 0, 0),
    ("type", 2, &["readonly", "fast"], 1, 1, 1),
    ("keys", 2, &["readonly"], 0, 0, 0),
    ("randomkey", 1, &["readonly"], 0, 0, 0),
    ("scan", -2, &["readonly"], 0, 0, 0),
    ("setex", 4, &["write", "denyoom"], 1, 1, 1),
    ("psetex", 4, &["write", "denyoom"], 1, 1, 1),
    ("getex", -2, &["write", "fast"], 1, 1, 1),
    ("expire", -3, &["write", "fast"], 1, 1, 1),
    ("pexpire", -3, &["write", "fast"], 1, 1, 1),
    ("expireat", -3, &["write", "fast"], 1, 1, 1),
    ("pexpireat", -3, &["write", "fast"], 1, 1, 1),
    ("persist", 2, &["write", "fast"], 1, 1, 1),
    ("ttl", 2, &["readonly", "fast"], 1, 1, 1),
    ("hset", -4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("hmset", -4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("hsetnx", 4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("hdel", -3, &["write", "fast"], 1, 1, 1),
    ("hincrby", 4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("hincrbyfloat", 4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("hget", 3, &["readonly", "fast"], 1, 1, 1),
    ("hmget", -3, &["readonly", "fast"], 1, 1, 1),
    ("hgetall", 2, &["readonly"], 1, 1, 1),
    ("hexists", 3, &["readonly", "fast"], 1, 1, 1),
    ("hlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("hkeys", 2, &["readonly"], 1, 1, 1),
    ("hvals", 2, &["readonly"], 1, 1, 1),
    ("hstrlen", 3, &["readonly", "fast"], 1, 1, 1),
    ("hscan", -3, &["readonly"], 1, 1, 1),
    ("lpush", -3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("rpush", -3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("lpop", -2, &["write", "fast"], 1, 1, 1),
    ("rpop", -2, &["write", "fast"], 1, 1, 1),
    ("lrem", 4, &["write"], 1, 1, 1),
    ("ltrim", 4, &["write"], 1, 1, 1),
    ("lrange", 4, &["readonly"], 1, 1, 1),
    ("llen", 2, &["readonly", "fast"], 1, 1, 1),
    ("lindex", 3, &["readonly"], 1, 1, 1),
    ("sadd", -3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("srem", -3, &["write", "fast"], 1, 1, 1),
    ("smembers", 2, &["readonly"], 1, 1, 1),
    ("sismember", 3, &["readonly", "fast"], 1, 1, 1),
    ("scard", 2, &["readonly", "fast"], 1, 1, 1),
    ("sinter", -2, &["readonly"], 1, -1, 1),
    ("sunion", -2, &["readonly"], 1, -1, 1),
    ("sscan", -3, &["readonly"], 1, 1, 1),
    ("zadd", -4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("zrem", -3, &["write", "fast"], 1, 1, 1),
    ("zincrby", 4, &["write", "denyoom", "fast"], 1, 1, 1),
    ("zscore", 3, &["readonly", "fast"], 1, 1, 1),
    ("zcard", 2, &["readonly", "fast"], 1, 1, 1),
    ("zrank", -3, &["readonly", "fast"], 1, 1, 1),
    ("zrevrank", -3, &["readonly", "fast"], 1, 1, 1),
    ("zrange", -4, &["readonly"], 1, 1, 1),
    ("zscan", -3, &["readonly"], 1, 1, 1),
    ("pttl", 2, &["readonly", "fast"], 1, 1, 1),
    ("expiretime", 2, &["readonly", "fast"], 1, 1, 1),
    ("pexpiretime", 2, &["readonly", "fast"], 1, 1, 1),
    (
        "multi",
        1,
        &["noscript", "loading", "stale", "fast", "allow_busy"],
        0,
        0,
        0,
    ),
    (
        "exec",
        1,
        &["noscript", "loading", "stale", "skip_slowlog"],
        0,
        0,
        0,
    ),
    (
        "discard",
        1,
        &["noscript", "loading", "stale", "fast", "allow_busy"],
        0,
        0,
        0,
    ),
    (
        "watch",
        -2,
        &["noscript", "loading", "stale", "fast"],
        1,
        -1,
        1,
    ),
    (
        "unwatch",
        1,
        &["noscript", "loading", "stale", "fast"],
        0,
        0,
        0,
    ),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("echo", 2, &["fast"], 0, 0, 0),
    (
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    (
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    ("client", -2, &["loading", "stale"], 0, 0, 0),
    ("select", 2, &["loading", "stale", "fast"], 0, 0, 0),
    (
        "quit",
        -1,
        &["loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    (
        "reset",
        1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        0,
        0,
        0,
    ),
    ("time", 1, &["loading", "stale", "fast"], 0, 0, 0),
    ("command", -1, &["loading", "stale"], 0, 0, 0),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("raftkv.backup", 1, &["admin"], 0, 0, 0),
    ("raft.member", -2, &["admin"], 0, 0, 0),
    ("raft.transfer", -1, &["admin"], 0, 0, 0),
];

/// The names of the commands this store serves, in lower case (what
/// `COMMAND` lists; the metrics count commands by them).
pub fn names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|e| e.0)
}

fn command_entry(e: &CommandDesc) -> Value {
    let (name, arity, flags, first, last, step) = *e;
    Value::List(vec![
        Value::text(name),
        Value::Int(arity),
        Value::Set(flags.iter().map(|f| Value::Status((*f).into())).collect()),
        Value::Int(first),
        Value::Int(last),
        Value::Int(step),
        Value::Set(Vec::new()),
        Value::Set(Vec::new()),
        Value::List(Vec::new()),
        Value::List(Vec::new()),
    ])
}

fn find_command(name: &[u8]) -> Option<&'static CommandDesc> {
    let lower = String::from_utf8_lossy(name).to_ascii_lowercase();
    TABLE.iter().find(|e| e.0 == lower)
}

/// The answer to a `COMMAND` query.
pub fn describe(q: &CommandQuery) -> Value {
    match q {
        CommandQuery::All => Value::List(TABLE.iter().map(command_entry).collect()),
        CommandQuery::Count => Value::Int(TABLE.len() as i64),
        CommandQuery::List => Value::List(TABLE.iter().map(|e| Value::text(e.0)).collect()),
        CommandQuery::Info(names) if names.is_empty() => {
            Value::List(TABLE.iter().map(command_entry).collect())
        }
        CommandQuery::Info(names) => Value::List(
            names
                .iter()
                .map(|n| find_command(n).map_or(Value::Nil, command_entry))
                .collect(),
        ),
        CommandQuery::Docs(names) => {
            let pick: Vec<_> = if names.is_empty() {
                TABLE.iter().collect()
            } else {
                names.iter().filter_map(|n| find_command(n)).collect()
            };
            Value::Map(
                pick.into_iter()
                    .map(|e| (Value::text(e.0), Value::Map(Vec::new())))
                    .collect(),
            )
        }
    }
}

/// The most bytes a command or forwarded message may claim: a client request
/// is at most 64 MiB, and so is what one connection's pipeline forwards at a
/// time. A damaged length field costs at most this much memory, briefly.
pub(crate) const MAX_DECODE: usize = 128 << 20;

/// The first byte of an entry that carries the leader's time. A plain
/// encoded command never starts with it: bincode writes the variant index
/// as a varint, whose first byte is below 251 or a length marker up to 254.
const STAMPED: u8 = 0xFF;

pub(crate) fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

impl WriteCmd {
    /// Encodes for the log.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain owned data into a Vec cannot fail.
        bincode::serde::encode_to_vec(self, config()).unwrap_or_default()
    }

    /// The size of [`WriteCmd::encode`]'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        let mut w = bincode::enc::write::SizeWriter::default();
        match bincode::serde::encode_into_writer(self, &mut w, config()) {
            Ok(()) => w.bytes_written,
            Err(_) => usize::MAX,
        }
    }

    /// The size of [`WriteCmd::encode_at`]'s output: the entry in the log.
    pub fn entry_len(&self) -> usize {
        self.encoded_len().saturating_add(9)
    }

    /// Encodes for the log with the leader's time (milliseconds since the
    /// Unix epoch): the clock every node applies the entry at.
    pub fn encode_at(&self, at_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.encoded_len());
        out.push(STAMPED);
        out.extend_from_slice(&at_ms.to_be_bytes());
        // Encoding plain owned data into a Vec cannot fail.
        let _ = bincode::serde::encode_into_std_write(self, &mut out, config());
        out
    }

    /// Decodes a log entry and its time (`None` for entries written before
    /// entries carried one); `None` when it is not a command of this store.
    pub fn decode_entry(bytes: &[u8]) -> Option<(Option<u64>, Self)> {
        match bytes.split_first() {
            Some((&STAMPED, rest)) if rest.len() >= 8 => {
                let (at, cmd) = rest.split_at(8);
                let at = u64::from_be_bytes(at.try_into().ok()?);
                Some((Some(at), Self::decode(cmd)?))
            }
            _ => Some((None, Self::decode(bytes)?)),
        }
    }

    /// Decodes a log entry; `None` when it is not a command of this store.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        // A damaged entry must not make the decoder reserve what its length
        // fields claim: nothing decodes to more than the entry holds.
        if bytes.len() > MAX_DECODE {
            return None;
        }
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MAX_DECODE>())
            .ok()
            .map(|(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads and writes whose cost grows with what is stored are not run
    /// on the thread that runs Raft.
    #[test]
    fn reads_and_writes_over_many_keys_or_collections_are_not_cheap() {
        let k = || b"k".to_vec();
        assert!(ReadCmd::Get(k()).is_cheap());
        assert!(ReadCmd::DbSize.is_cheap());
        assert!(ReadCmd::MGet(vec![k(); CHEAP_READ_KEYS]).is_cheap());
        assert!(!ReadCmd::MGet(vec![k(); CHEAP_READ_KEYS + 1]).is_cheap());
        assert!(!ReadCmd::Exists(vec![k(); CHEAP_READ_KEYS + 1]).is_cheap());
        assert!(!ReadCmd::Keys(b"*".to_vec()).is_cheap());
        assert!(!ReadCmd::RandomKey.is_cheap());
        assert!(!ReadCmd::Hash(k(), HashRead::GetAll).is_cheap());
        assert!(!ReadCmd::Scan {
            cursor: 0,
            pattern: None,
            count: 10,
            kind: None
        }
        .is_cheap());
        let set = WriteCmd::Set {
            key: k(),
            value: k(),
            cond: SetCond::Always,
        };
        assert!(set.is_cheap());
        assert!(WriteCmd::IncrBy(k(), 1).is_cheap());
        assert!(!WriteCmd::FlushAll.is_cheap());
        assert!(!WriteCmd::Exec(Vec::new()).is_cheap());
        assert!(!WriteCmd::HDel(k(), vec![k()]).is_cheap());
    }

    /// A damaged entry whose length fields claim gigabytes is refused. (The
    /// `log_commands` fuzz target, run with an RSS limit, checks that no such
    /// claim is reserved: before the decode limit it allocated 4 GB.)
    #[test]
    fn damaged_length_fields_are_refused() {
        let good = WriteCmd::Set {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            cond: SetCond::Always,
        };
        assert_eq!(WriteCmd::decode(&good.encode()), Some(good.clone()));
        assert_eq!(good.encoded_len(), good.encode().len());
        let big = WriteCmd::MSet(vec![(vec![1; 300], vec![2; 70_000]); 3]);
        assert_eq!(big.encoded_len(), big.encode().len());
        // Variant 1 (Del), then a varint claiming 2^32 - 1 keys.
        let bogus = [1u8, 0xfc, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(WriteCmd::decode(&bogus), None);
        // Variant 0 (Set), a key claiming 2^32 - 1 bytes.
        let bogus = [0u8, 0xfc, 0xff, 0xff, 0xff, 0xff, b'k'];
        assert_eq!(WriteCmd::decode(&bogus), None);
        assert_eq!(
            crate::forward::Forward::decode(&[0u8, 0xfc, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    fn args(s: &str) -> Vec<Vec<u8>> {
        s.split(' ').map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn requests_parse_into_typed_commands_with_clear_errors() {
        assert_eq!(
            Command::parse(args("set k v NX")),
            Ok(Command::Write(WriteCmd::Set {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                cond: SetCond::IfAbsent
            }))
        );
        assert_eq!(Command::parse(args("SET k v EX")), Err(KvError::Syntax));
        assert_eq!(
            Command::parse(args("GET")),
            Err(KvError::WrongArity("get".into()))
        );
        assert_eq!(
            Command::parse(args("DECRBY k -9223372036854775808")),
            Err(KvError::DecrementOverflow)
        );
        assert_eq!(
            Command::parse(args("INCRBY k x")),
            Err(KvError::NotAnInteger)
        );
        assert_eq!(
            Command::parse(args("MSET a 1 b 2")),
            Ok(Command::Write(WriteCmd::MSet(vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ])))
        );
        assert_eq!(
            Command::parse(args("MSET a 1 b")),
            Err(KvError::WrongArity("mset".into()))
        );
        assert_eq!(
            Command::parse(args("MGET a b")),
            Ok(Command::Read(ReadCmd::MGet(vec![
                b"a".to_vec(),
                b"b".to_vec()
            ])))
        );
        assert!(matches!(
            Command::parse(args("FLUSHNEVER now")),
            Err(KvError::UnknownCommand { name, args }) if name == "FLUSHNEVER" && args == "'now' "
        ));
        assert_eq!(Command::parse(args("FLUSHALL now")), Err(KvError::Syntax));
        assert_eq!(
            Command::parse(args("INCRBY a +5")),
            Err(KvError::NotAnInteger),
            "Redis takes no '+'"
        );
        assert_eq!(
            Command::parse(args("INCRBY a 05")),
            Err(KvError::NotAnInteger)
        );
        assert_eq!(parse_int(b"-0"), None);
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        assert!(crate::sm::glob_match(b"k[^1]*", b"k2x"));
        assert!(!crate::sm::glob_match(b"k[^1]*", b"k1"));
        assert!(crate::sm::glob_match(b"\\*", b"*"));
        assert!(!crate::sm::glob_match(b"\\*", b"a"));
        assert!(crate::sm::glob_match(b"h?llo", b"hello"));
        assert!(crate::sm::glob_match(b"h[a-e]llo", b"hello"));
        assert_eq!(format_float(0.1 + 0.2), "0.3");
        assert_eq!(format_float(1e20), "100000000000000000000");
        assert_eq!(format_float(-0.0), "0");
    }

    #[test]
    fn cluster_administration_commands_parse_and_bad_ones_are_refused() {
        assert_eq!(
            Command::parse(args("raft.member list")),
            Ok(Command::Admin(AdminCmd::List))
        );
        assert_eq!(
            Command::parse(args("RAFT.MEMBER ADD 4 10.0.0.4:7000 ff01")),
            Ok(Command::Admin(AdminCmd::Add {
                id: 4,
                addr: "10.0.0.4:7000".into(),
                incarnation: 0xff01
            }))
        );
        assert_eq!(
            Command::parse(args("RAFT.MEMBER ADD 4 10.0.0.4:7000")),
            Ok(Command::Admin(AdminCmd::Add {
                id: 4,
                addr: "10.0.0.4:7000".into(),
                incarnation: 0
            }))
        );
        assert_eq!(
            Command::parse(args("RAFT.MEMBER REMOVE 3")),
            Ok(Command::Admin(AdminCmd::Remove(3)))
        );
        assert_eq!(
            Command::parse(args("RAFT.TRANSFER")),
            Ok(Command::Admin(AdminCmd::Transfer(None)))
        );
        assert_eq!(
            Command::parse(args("RAFT.TRANSFER 2")),
            Ok(Command::Admin(AdminCmd::Transfer(Some(2))))
        );
        for bad in [
            "RAFT.MEMBER ADD x 10.0.0.4:7000",
            "RAFT.MEMBER PROMOTE -1",
            "RAFT.TRANSFER 99999999999999999999",
        ] {
            assert_eq!(
                Command::parse(args(bad)),
                Err(KvError::NotAnInteger),
                "{bad}"
            );
        }
        for bad in [
            "RAFT.MEMBER FROB 1",
            "RAFT.MEMBER LIST 1",
            "RAFT.MEMBER ADD 4 10.0.0.4:7000 not-hex",
        ] {
            assert_eq!(Command::parse(args(bad)), Err(KvError::Syntax), "{bad}");
        }
        assert_eq!(
            Command::parse(args("RAFT.MEMBER")),
            Err(KvError::WrongArity("raft.member".into()))
        );
    }

    #[test]
    fn connection_commands_parse_as_redis_does() {
        let p =
            |args: &[&str]| Command::parse(args.iter().map(|a| a.as_bytes().to_vec()).collect());
        assert_eq!(
            p(&["hello", "3", "auth", "default", "pw", "setname", "app"]),
            Ok(Command::Hello {
                proto: Some(3),
                auth: Some((b"default".to_vec(), b"pw".to_vec())),
                setname: Some(b"app".to_vec()),
            })
        );
        assert_eq!(
            p(&["HELLO"]),
            Ok(Command::Hello {
                proto: None,
                auth: None,
                setname: None
            })
        );
        assert_eq!(p(&["HELLO", "x"]), Err(KvError::ProtoNotInteger));
        assert_eq!(
            p(&["HELLO", "3", "AUTH", "u"]),
            Err(KvError::HelloSyntax("AUTH".into()))
        );
        assert_eq!(
            p(&["HELLO", "3", "BOGUS"]),
            Err(KvError::HelloSyntax("BOGUS".into()))
        );
        assert_eq!(
            p(&["client", "setinfo", "lib-name", "x"]),
            Ok(Command::Client(ClientCmd::SetInfo {
                lib_name: true,
                value: b"x".to_vec()
            }))
        );
        assert_eq!(
            p(&["client", "kill", "id", "7", "skipme", "no"]),
            Ok(Command::Client(ClientCmd::Kill {
                old_form: false,
                id: Some(7),
                addr: None,
                laddr: None,
                skip_me: false
            }))
        );
        assert!(matches!(
            p(&["client", "nope"]),
            Err(KvError::UnknownSubcommand { .. })
        ));
        assert_eq!(
            p(&["client", "getname", "x"]),
            Err(KvError::WrongArity("client|getname".into()))
        );
        assert_eq!(p(&["select", "x"]), Err(KvError::NotAnInteger));
        assert_eq!(
            p(&["command", "count"]),
            Ok(Command::CommandInfo(CommandQuery::Count))
        );
        assert!(matches!(describe(&CommandQuery::Count), Value::Int(n) if n > 20));
        assert!(matches!(
            describe(&CommandQuery::Info(vec![b"GET".to_vec(), b"nope".to_vec()])),
            Value::List(v) if v.len() == 2 && v[1] == Value::Nil
        ));
    }
}
