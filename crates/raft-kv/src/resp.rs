//! The Redis edge: an incremental request parser with hard limits, reply
//! encoding, and the one place that spells Redis error replies
//! ([`error_reply`]).
//!
//! Requests are arrays of bulk strings (what every Redis client sends) or
//! inline commands (`PING\r\n`, for telnet). Lengths are checked as soon as
//! they are read: an over-long bulk string, an array with too many elements, or
//! a request that grows past the limit is rejected before its bytes are
//! buffered, so one client cannot make the server hold unbounded memory.

use crate::command::Value;
use crate::error::{KvError, Reply};

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest bulk string.
    pub max_bulk: usize,
    /// Most elements in one command.
    pub max_args: usize,
    /// Most bytes one request may occupy while being read.
    pub max_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: 16 << 20,
            max_args: 1 << 20,
            max_request: 64 << 20,
        }
    }
}

impl Limits {
    /// The limits before AUTH on a server with a password, as Redis has
    /// had since CVE-2021-32675: at most 10 elements of 16 KiB each.
    pub fn unauthenticated() -> Self {
        Limits {
            max_bulk: 16 << 10,
            max_args: 10,
            max_request: 10 * ((16 << 10) + 32) + 32,
        }
    }
}

/// Longest inline command (`PING\r\n` typed into telnet).
const MAX_INLINE: usize = 64 * 1024;
/// Longest length line (`*N` or `$N`), CRLF included.
const MAX_LENGTH_LINE: usize = 32;

/// A malformed or oversized request. The connection is answered with
/// `-ERR Protocol error: ...` and closed, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

fn perr<T>(s: impl Into<String>) -> Result<T, ProtocolError> {
    Err(ProtocolError(s.into()))
}

/// The result of [`parse_command`]: `None` when more bytes are needed, else
/// the command's arguments and the number of bytes it took.
pub type Parsed = Result<Option<(Vec<Vec<u8>>, usize)>, ProtocolError>;

/// Finds `\r\n` in `buf[from..to]`; returns the index of `\r`.
fn line_end(buf: &[u8], from: usize, to: usize) -> Option<usize> {
    let to = to.min(buf.len());
    buf.get(from..to)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_len(line: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .map_or_else(|| perr("invalid length"), Ok)
}

/// Where a request being read stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests.
    Idle,
    /// An inline command whose first `scanned` bytes hold no line end.
    Inline { scanned: usize },
    /// `left` more elements of a multibulk request, next is a `$len` line.
    Element { left: usize },
    /// The body of the last argument: `len` bytes, then CRLF.
    Body { left: usize, len: usize },
    /// The CRLF after a body.
    Crlf { left: usize },
}

/// An incremental RESP request parser: each byte a client sends is looked
/// at a bounded number of times, whatever the pieces it arrives in, so the
/// CPU a request costs is linear in its size. Argument bodies are copied
/// out as they arrive and grow with the bytes received, never allocated
/// from a declared length.
#[derive(Debug)]
pub struct RequestParser {
    state: State,
    args: Vec<Vec<u8>>,
    /// Bytes of the current request consumed so far.
    request_bytes: usize,
}

impl Default for RequestParser {
    fn default() -> Self {
        RequestParser {
            state: State::Idle,
            args: Vec::new(),
            request_bytes: 0,
        }
    }
}

impl RequestParser {
    /// A parser between requests.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no request is partly read.
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    /// Reads from `buf[*pos..]`, advancing `*pos` past what it consumed.
    /// `Ok(Some(args))`: a whole request (possibly empty: skip it).
    /// `Ok(None)`: every byte given was consumed, or the rest is an
    /// unfinished line the caller must keep and extend.
    pub fn next(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        limits: &Limits,
    ) -> Result<Option<Vec<Vec<u8>>>, ProtocolError> {
        loop {
            let avail = buf.len() - *pos;
            if avail == 0 {
                return Ok(None);
            }
            match self.state {
                State::Idle => {
                    self.request_bytes = 0;
                    if buf[*pos] != b'*' {
                        self.state = State::Inline { scanned: 0 };
                        continue;
                    }
                    let Some(end) = line_end(buf, *pos + 1, *pos + MAX_LENGTH_LINE) else {
                        if avail >= MAX_LENGTH_LINE {
                            return perr("invalid multibulk length");
                        }
                        return Ok(None);
                    };
                    let n = parse_len(&buf[*pos + 1..end])?;
                    if n > limits.max_args as i64 {
                        return perr("invalid multibulk length");
                    }
                    self.consume(pos, end + 2, limits)?;
                    if n <= 0 {
                        return Ok(Some(Vec::new()));
                    }
                    self.args = Vec::with_capacity((n as usize).min(16));
                    self.state = State::Element { left: n as usize };
                }
                State::Inline { scanned } => {
                    // A line ends at LF (telnet and `nc` may send a bare
                    // LF, which Redis takes too); a CR before it is dropped.
                    let from = *pos + scanned;
                    let Some(nl) = buf[from..].iter().position(|&b| b == b'\n') else {
                        if avail > MAX_INLINE {
                            return perr("too big inline request");
                        }
                        self.state = State::Inline { scanned: avail };
                        return Ok(None);
                    };
                    let end = from + nl;
                    if end - *pos > MAX_INLINE {
                        return perr("too big inline request");
                    }
                    let line = &buf[*pos..end];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let words = || {
                        line.split(|b| b.is_ascii_whitespace())
                            .filter(|a| !a.is_empty())
                    };
                    // The same limits as the multibulk form, checked before
                    // anything is copied.
                    if words().count() > limits.max_args {
                        return perr("invalid multibulk length");
                    }
                    if words().any(|a| a.len() > limits.max_bulk) {
                        return perr("invalid bulk length");
                    }
                    let args: Vec<Vec<u8>> = words().map(<[u8]>::to_vec).collect();
                    *pos = end + 1;
                    self.state = State::Idle;
                    return Ok(Some(args));
                }
                State::Element { left } => {
                    if buf[*pos] != b'$' {
                        return perr(format!("expected '$', got '{}'", buf[*pos] as char));
                    }
                    let Some(end) = line_end(buf, *pos + 1, *pos + MAX_LENGTH_LINE) else {
                        if avail >= MAX_LENGTH_LINE {
                            return perr("invalid bulk length");
                        }
                        return Ok(None);
                    };
                    let len = parse_len(&buf[*pos + 1..end])?;
                    if len < 0 || len > limits.max_bulk as i64 {
                        return perr("invalid bulk length");
                    }
                    let len = len as usize;
                    self.consume(pos, end + 2, limits)?;
                    if self.request_bytes + len + 2 > limits.max_request {
                        return perr("request too large");
                    }
                    // Grows as the bytes arrive: a declared length costs
                    // nothing until it is sent.
                    self.args.push(Vec::new());
                    self.state = State::Body { left, len };
                }
                State::Body { left, len } => {
                    let arg = self.args.last_mut().expect("a body follows its header");
                    let take = (len - arg.len()).min(avail);
                    arg.extend_from_slice(&buf[*pos..*pos + take]);
                    let done = arg.len() == len;
                    self.consume(pos, *pos + take, limits)?;
                    if done {
                        self.state = State::Crlf { left };
                    }
                }
                State::Crlf { left } => {
                    if avail < 2 {
                        return Ok(None);
                    }
                    if &buf[*pos..*pos + 2] != b"\r\n" {
                        return perr("bulk string not terminated by CRLF");
                    }
                    self.consume(pos, *pos + 2, limits)?;
                    if left == 1 {
                        self.state = State::Idle;
                        return Ok(Some(std::mem::take(&mut self.args)));
                    }
                    self.state = State::Element { left: left - 1 };
                }
            }
        }
    }

    fn consume(
        &mut self,
        pos: &mut usize,
        to: usize,
        limits: &Limits,
    ) -> Result<(), ProtocolError> {
        self.request_bytes += to - *pos;
        *pos = to;
        if self.request_bytes > limits.max_request {
            return perr("request too large");
        }
        Ok(())
    }
}

/// Parses one command from the front of `buf`, all of it at once.
/// `Ok(None)`: more bytes needed. `Ok(Some((args, used)))`: a command and
/// the bytes it took. (The server uses [`RequestParser`], which keeps its
/// place between reads.)
pub fn parse_command(buf: &[u8], limits: &Limits) -> Parsed {
    let mut parser = RequestParser::new();
    let mut pos = 0;
    match parser.next(buf, &mut pos, limits)? {
        Some(args) => Ok(Some((args, pos))),
        None => Ok(None),
    }
}

/// The Redis reply code for an error: clients and tools key on it
/// (`TRYAGAIN` and `UNKNOWN` tell a retrying client what it may assume).
pub fn error_code(e: &KvError) -> &'static str {
    match e {
        KvError::NoLeader | KvError::NotApplied(_) => "TRYAGAIN",
        KvError::Unknown(_) => "UNKNOWN",
        KvError::WrongPassword => "WRONGPASS",
        KvError::AuthRequired | KvError::HelloAuthRequired => "NOAUTH",
        KvError::NoProto => "NOPROTO",
        KvError::ExecAbort => "EXECABORT",
        KvError::WrongType => "WRONGTYPE",
        KvError::Stopped(_) => "ERR",
        _ => "ERR",
    }
}

/// The text of an error reply (after the `-`).
pub fn error_reply(e: &KvError) -> String {
    format!("{} {e}", error_code(e))
}

/// Appends an error reply; line breaks in the text become spaces.
pub fn error_line(out: &mut Vec<u8>, text: &str) {
    out.push(b'-');
    out.extend(
        text.bytes()
            .map(|c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
    );
    out.extend_from_slice(b"\r\n");
}

/// Appends a RESP2 encoding of a command's reply to `out`.
pub fn encode_reply(out: &mut Vec<u8>, r: &Reply) {
    encode_reply_as(out, r, false)
}

/// Appends a command's reply to `out`, in RESP3 when `resp3` (maps, sets,
/// nulls and verbatim strings as RESP3 has them), else in RESP2.
pub fn encode_reply_as(out: &mut Vec<u8>, r: &Reply, resp3: bool) {
    match r {
        Ok(v) => encode_value(out, v, resp3),
        Err(e) => error_line(out, &error_reply(e)),
    }
}

fn null(out: &mut Vec<u8>, resp3: bool) {
    out.extend_from_slice(if resp3 { b"_\r\n" } else { b"$-1\r\n" });
}

fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn encode_value(out: &mut Vec<u8>, v: &Value, resp3: bool) {
    match v {
        Value::Ok => out.extend_from_slice(b"+OK\r\n"),
        Value::Status(s) => simple(out, s),
        Value::Nil => null(out, resp3),
        Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Value::Bulk(b) => bulk(out, b),
        Value::Array(items) => {
            header(out, b'*', items.len());
            for i in items {
                match i {
                    Some(b) => bulk(out, b),
                    None => null(out, resp3),
                }
            }
        }
        Value::List(items) => {
            header(out, b'*', items.len());
            for i in items {
                encode_value(out, i, resp3);
            }
        }
        Value::Set(items) => {
            header(out, if resp3 { b'~' } else { b'*' }, items.len());
            for i in items {
                encode_value(out, i, resp3);
            }
        }
        Value::Map(pairs) => {
            if resp3 {
                header(out, b'%', pairs.len());
            } else {
                header(out, b'*', pairs.len() * 2);
            }
            for (k, v) in pairs {
                encode_value(out, k, resp3);
                encode_value(out, v, resp3);
            }
        }
        Value::Error(text) => error_line(out, text),
        Value::NilArray => out.extend_from_slice(if resp3 { b"_\r\n" } else { b"*-1\r\n" }),
        Value::Double(text) => {
            if resp3 {
                out.push(b',');
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            } else {
                bulk(out, text.as_bytes());
            }
        }
        Value::Pairs(items) => {
            if resp3 {
                header(out, b'*', items.len());
                for i in items {
                    encode_value(out, i, resp3);
                }
            } else {
                let flat: Vec<&Value> = items
                    .iter()
                    .flat_map(|i| match i {
                        Value::List(parts) => parts.iter().collect::<Vec<_>>(),
                        other => vec![other],
                    })
                    .collect();
                header(out, b'*', flat.len());
                for i in flat {
                    encode_value(out, i, resp3);
                }
            }
        }
        Value::Verbatim(text) => {
            if resp3 {
                header(out, b'=', text.len() + 4);
                out.extend_from_slice(b"txt:");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            } else {
                bulk(out, text.as_bytes());
            }
        }
    }
}

/// Appends a simple string (`+...`).
fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// Length of the first complete RESP reply in `buf`, if there is one.
pub fn reply_len(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], from: usize) -> Option<usize> {
        buf.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    }
    fn one(buf: &[u8], at: usize) -> Option<usize> {
        let end = line(buf, at)?;
        match *buf.get(at)? {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some(end + 2),
            b'$' | b'=' | b'!' => {
                let n: i64 = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
                if n < 0 {
                    return Some(end + 2);
                }
                let stop = end + 2 + n as usize + 2;
                (stop <= buf.len()).then_some(stop)
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n: i64 = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
                let n = if matches!(buf[at], b'%' | b'|') {
                    n * 2
                } else {
                    n
                };
                let mut pos = end + 2;
                for _ in 0..n.max(0) {
                    pos = one(buf, pos)?;
                }
                Some(pos)
            }
            _ => None,
        }
    }
    one(buf, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Parsed {
        parse_command(
            b,
            &Limits {
                max_bulk: 100,
                max_args: 10,
                max_request: 1000,
            },
        )
    }

    #[test]
    fn arrays_inline_and_partial_input() {
        let req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let (args, used) = parse(req).unwrap().unwrap();
        assert_eq!(
            args,
            vec![b"SET".to_vec(), b"k".to_vec(), b"hello".to_vec()]
        );
        let (args2, used2) = parse(&req[used..]).unwrap().unwrap();
        assert_eq!(args2, vec![b"PING".to_vec()]);
        assert_eq!(used + used2, req.len());
        for cut in 1..used {
            assert_eq!(parse(&req[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(
            parse(b"PING  hi\r\n").unwrap().unwrap().0,
            vec![b"PING".to_vec(), b"hi".to_vec()]
        );
        assert_eq!(parse(b"*0\r\n").unwrap().unwrap().0, Vec::<Vec<u8>>::new());
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused_early() {
        assert!(parse(b"*x\r\n").is_err());
        assert!(parse(b"*1\r\n+OK\r\n").is_err());
        assert!(parse(b"*1\r\n$-5\r\n").is_err());
        assert!(parse(b"*1\r\n$3\r\nabcd\r\n").is_err(), "missing CRLF");
        assert!(
            parse(b"*1\r\n$101\r\n").is_err(),
            "bulk over the limit, refused before its bytes"
        );
        assert!(parse(b"*11\r\n").is_err(), "too many elements");
        assert!(parse(b"*99999999999999999999\r\n").is_err());
        let mut endless = b"*10\r\n".to_vec();
        for _ in 0..9 {
            endless.extend_from_slice(b"$100\r\n");
            endless.extend_from_slice(&[b'a'; 100]);
            endless.extend_from_slice(b"\r\n");
        }
        assert_eq!(
            parse(&endless),
            Ok(None),
            "under the request limit: waits for more"
        );
        endless.extend_from_slice(b"$100\r\n");
        assert!(
            parse(&endless).is_err(),
            "the next element would pass max_request: refused before its bytes arrive"
        );
        assert!(parse(&[b'*'; 100]).is_err(), "endless length line");
        // Inline commands obey the same limits (found by fuzzing).
        assert!(
            parse(b"a b c d e f g h i j k\r\n").is_err(),
            "11 inline args"
        );
        assert!(parse(b"a b c d e f g h i j\r\n").is_ok());
        let long = [b"GET ".as_slice(), &[b'k'; 101], b"\r\n"].concat();
        assert!(parse(&long).is_err(), "inline argument over max_bulk");
    }

    /// Feeds `input` to one parser in pieces cut at `cuts`, keeping unparsed
    /// bytes as the server does; returns the requests (or the error).
    fn in_pieces(input: &[u8], cuts: &[usize]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let limits = Limits {
            max_bulk: 100,
            max_args: 10,
            max_request: 1000,
        };
        let mut p = RequestParser::new();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[last..cut]);
            last = cut;
            let mut pos = 0;
            while let Some(args) = p.next(&buf, &mut pos, &limits)? {
                out.push(args);
            }
            buf.drain(..pos);
        }
        Ok(out)
    }

    #[test]
    fn one_parser_fed_in_pieces_gives_what_the_whole_input_gives() {
        let input: &[u8] = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhe\r\no\r\nPING\r\n*0\r\n\
            *2\r\n$4\r\nECHO\r\n$0\r\n\r\nGET  key\nINFO\r\n*1\r\n$4\r\nPING\r\n";
        let whole = in_pieces(input, &[]).unwrap();
        assert_eq!(whole.len(), 7, "{whole:?}");
        assert!(whole[2].is_empty(), "*0 is an empty request");
        assert_eq!(whole[0][2], b"he\r\no".to_vec());
        assert_eq!(
            whole[4],
            vec![b"GET".to_vec(), b"key".to_vec()],
            "bare LF ends an inline command"
        );
        // Every single cut, and every pair of cuts.
        for a in 0..input.len() {
            assert_eq!(in_pieces(input, &[a]).unwrap(), whole, "cut at {a}");
            for b in a..input.len() {
                assert_eq!(
                    in_pieces(input, &[a, b]).unwrap(),
                    whole,
                    "cuts at {a}, {b}"
                );
            }
        }
        // One byte at a time.
        let all: Vec<usize> = (1..input.len()).collect();
        assert_eq!(in_pieces(input, &all).unwrap(), whole);
        // Errors come out the same, whatever the pieces.
        let bad = b"*2\r\n$3\r\nGET\r\n$101\r\n";
        assert!(in_pieces(bad, &[]).is_err());
        for a in 0..bad.len() {
            assert!(in_pieces(bad, &[a]).is_err(), "cut at {a}");
        }
    }

    #[test]
    fn reply_boundaries() {
        assert_eq!(reply_len(b"+OK\r\n"), Some(5));
        assert_eq!(reply_len(b"$3\r\nabc\r\n:1\r\n"), Some(9));
        assert_eq!(reply_len(b"$3\r\nab"), None);
        assert_eq!(reply_len(b"*2\r\n$1\r\na\r\n$-1\r\n"), Some(16));
        assert_eq!(reply_len(b"$-1\r\n"), Some(5));
    }

    #[test]
    fn replies_encode_as_resp3_and_fall_back_to_resp2() {
        let v = Value::Map(vec![
            (Value::text("proto"), Value::Int(3)),
            (
                Value::text("flags"),
                Value::Set(vec![Value::Status("fast".into())]),
            ),
            (Value::text("none"), Value::Nil),
            (Value::text("info"), Value::Verbatim("a:1\r\n".into())),
            (Value::text("mget"), Value::Array(vec![None])),
        ]);
        let mut three = Vec::new();
        encode_reply_as(&mut three, &Ok(v.clone()), true);
        assert_eq!(
            String::from_utf8(three.clone()).unwrap(),
            "%5\r\n$5\r\nproto\r\n:3\r\n$5\r\nflags\r\n~1\r\n+fast\r\n$4\r\nnone\r\n_\r\n\
             $4\r\ninfo\r\n=9\r\ntxt:a:1\r\n\r\n$4\r\nmget\r\n*1\r\n_\r\n"
        );
        assert_eq!(reply_len(&three), Some(three.len()));
        let mut two = Vec::new();
        encode_reply_as(&mut two, &Ok(v), false);
        assert_eq!(
            String::from_utf8(two.clone()).unwrap(),
            "*10\r\n$5\r\nproto\r\n:3\r\n$5\r\nflags\r\n*1\r\n+fast\r\n$4\r\nnone\r\n$-1\r\n\
             $4\r\ninfo\r\n$5\r\na:1\r\n\r\n$4\r\nmget\r\n*1\r\n$-1\r\n"
        );
        assert_eq!(reply_len(&two), Some(two.len()));
    }

    #[test]
    fn replies_encode_as_resp2() {
        let mut out = Vec::new();
        encode_reply(&mut out, &Ok(Value::Array(vec![Some(b"a".to_vec()), None])));
        encode_reply(&mut out, &Ok(Value::Int(-3)));
        encode_reply(&mut out, &Err(KvError::Raft("bad\r\nthing".into())));
        assert_eq!(
            out,
            b"*2\r\n$1\r\na\r\n$-1\r\n:-3\r\n-ERR bad  thing\r\n".to_vec()
        );
    }
}
