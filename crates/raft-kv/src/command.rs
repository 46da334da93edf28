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
    /// COMMAND (an empty list: clients only probe it).
    CommandList,
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
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(KvError::NotAnInteger)
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
            ("COMMAND", _) => Command::CommandList,
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
                let opts: Vec<String> = rest
                    .map(|a| String::from_utf8_lossy(&a).to_ascii_uppercase())
                    .collect();
                let cond = match opts.as_slice() {
                    [] => SetCond::Always,
                    [x] if x == "NX" => SetCond::IfAbsent,
                    [x] if x == "XX" => SetCond::IfPresent,
                    _ => return Err(KvError::Syntax),
                };
                Command::Write(WriteCmd::Set { key, value, cond })
            }
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
            ("GET", 2) => Command::Read(ReadCmd::Get(next())),
            ("MGET", 2..) => Command::Read(ReadCmd::MGet(rest.collect())),
            ("EXISTS", 2..) => Command::Read(ReadCmd::Exists(rest.collect())),
            ("STRLEN", 2) => Command::Read(ReadCmd::StrLen(next())),
            ("DBSIZE", 1) => Command::Read(ReadCmd::DbSize),
            (
                "PING" | "ECHO" | "AUTH" | "SET" | "DEL" | "MSET" | "INCR" | "DECR" | "INCRBY"
                | "DECRBY" | "CAS" | "GET" | "MGET" | "EXISTS" | "STRLEN" | "DBSIZE" | "INFO"
                | "RAFT.MEMBER" | "RAFT.TRANSFER",
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
                    let text = String::from_utf8_lossy(&a[..a.len().min(room)]).into_owned();
                    shown.push('\'');
                    shown.push_str(&text);
                    shown.push_str("' ");
                }
                let name = &args[0][..args[0].len().min(128)];
                return Err(KvError::UnknownCommand {
                    name: String::from_utf8_lossy(name).into_owned(),
                    args: shown,
                });
            }
        })
    }
}

/// The most bytes a command or forwarded message may claim: a client request
/// is at most 64 MiB, and so is what one connection's pipeline forwards at a
/// time. A damaged length field costs at most this much memory, briefly.
pub(crate) const MAX_DECODE: usize = 128 << 20;

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
            Command::parse(args("FLUSHALL now")),
            Err(KvError::UnknownCommand { name, args }) if name == "FLUSHALL" && args == "'now' "
        ));
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
}
