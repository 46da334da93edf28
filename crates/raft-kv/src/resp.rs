//! The Redis edge: a RESP2 request parser with hard limits, reply
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

/// Finds `\r\n` from `from`; returns the index of `\r`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
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

/// Parses one command from the front of `buf`. `Ok(None)`: more bytes needed.
/// `Ok(Some((args, used)))`: a command and the bytes it took.
pub fn parse_command(buf: &[u8], limits: &Limits) -> Parsed {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        // Inline command.
        let Some(end) = line_end(buf, 0) else {
            if buf.len() > 64 * 1024 {
                return perr("too big inline request");
            }
            return Ok(None);
        };
        let args: Vec<Vec<u8>> = buf[..end]
            .split(|b| b.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .map(|a| a.to_vec())
            .collect();
        // The same limits as the multibulk form.
        if args.len() > limits.max_args {
            return perr("invalid multibulk length");
        }
        if args.iter().any(|a| a.len() > limits.max_bulk) {
            return perr("invalid bulk length");
        }
        return Ok(Some((args, end + 2)));
    }
    let Some(end) = line_end(buf, 1) else {
        if buf.len() > 64 {
            return perr("invalid multibulk length");
        }
        return Ok(None);
    };
    let n = parse_len(&buf[1..end])?;
    if n > limits.max_args as i64 {
        return perr("invalid multibulk length");
    }
    let mut pos = end + 2;
    if n <= 0 {
        return Ok(Some((Vec::new(), pos)));
    }
    let mut args = Vec::with_capacity((n as usize).min(1024));
    for _ in 0..n {
        if pos >= buf.len() {
            return need_more(buf, limits);
        }
        if buf[pos] != b'$' {
            return perr(format!("expected '$', got '{}'", buf[pos] as char));
        }
        let Some(end) = line_end(buf, pos + 1) else {
            if buf.len() - pos > 64 {
                return perr("invalid bulk length");
            }
            return need_more(buf, limits);
        };
        let len = parse_len(&buf[pos + 1..end])?;
        if len < 0 || len > limits.max_bulk as i64 {
            return perr("invalid bulk length");
        }
        let start = end + 2;
        let stop = start + len as usize;
        if stop + 2 > buf.len() {
            if stop + 2 > limits.max_request {
                return perr("request too large");
            }
            return need_more(buf, limits);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return perr("bulk string not terminated by CRLF");
        }
        args.push(buf[start..stop].to_vec());
        pos = stop + 2;
    }
    Ok(Some((args, pos)))
}

fn need_more(buf: &[u8], limits: &Limits) -> Parsed {
    if buf.len() > limits.max_request {
        return perr("request too large");
    }
    Ok(None)
}

/// The Redis reply code for an error: clients and tools key on it
/// (`TRYAGAIN` and `UNKNOWN` tell a retrying client what it may assume).
fn error_code(e: &KvError) -> &'static str {
    match e {
        KvError::NoLeader | KvError::NotApplied(_) => "TRYAGAIN",
        KvError::Unknown(_) => "UNKNOWN",
        KvError::WrongPassword => "WRONGPASS",
        KvError::AuthRequired => "NOAUTH",
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
    match r {
        Ok(Value::Ok) => out.extend_from_slice(b"+OK\r\n"),
        Ok(Value::Status(s)) => simple(out, s),
        Ok(Value::Nil) => out.extend_from_slice(b"$-1\r\n"),
        Ok(Value::Int(n)) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Ok(Value::Bulk(b)) => bulk(out, b),
        Ok(Value::Array(items)) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                match i {
                    Some(b) => bulk(out, b),
                    None => out.extend_from_slice(b"$-1\r\n"),
                }
            }
        }
        Err(e) => error_line(out, &error_reply(e)),
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
            b'+' | b'-' | b':' => Some(end + 2),
            b'$' => {
                let n: i64 = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
                if n < 0 {
                    return Some(end + 2);
                }
                let stop = end + 2 + n as usize + 2;
                (stop <= buf.len()).then_some(stop)
            }
            b'*' => {
                let n: i64 = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
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

    #[test]
    fn reply_boundaries() {
        assert_eq!(reply_len(b"+OK\r\n"), Some(5));
        assert_eq!(reply_len(b"$3\r\nabc\r\n:1\r\n"), Some(9));
        assert_eq!(reply_len(b"$3\r\nab"), None);
        assert_eq!(reply_len(b"*2\r\n$1\r\na\r\n$-1\r\n"), Some(16));
        assert_eq!(reply_len(b"$-1\r\n"), Some(5));
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
