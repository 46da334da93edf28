//! A RESP2 request parser with hard limits, and reply encoding.
//!
//! Requests are arrays of bulk strings (what every Redis client sends) or
//! inline commands (`PING\r\n`, for telnet). Lengths are checked as soon as
//! they are read: an over-long bulk string, an array with too many elements, or
//! a request that grows past the limit is rejected before its bytes are
//! buffered, so one client cannot make the server hold unbounded memory.

use crate::command::Outcome;

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

/// Appends a RESP2 encoding of `o` to `out`.
pub fn encode_outcome(out: &mut Vec<u8>, o: &Outcome) {
    match o {
        Outcome::Ok => out.extend_from_slice(b"+OK\r\n"),
        Outcome::Nil => out.extend_from_slice(b"$-1\r\n"),
        Outcome::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Outcome::Bulk(b) => bulk(out, b),
        Outcome::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                match i {
                    Some(b) => bulk(out, b),
                    None => out.extend_from_slice(b"$-1\r\n"),
                }
            }
        }
        Outcome::Error(e) => {
            out.push(b'-');
            out.extend(
                e.bytes()
                    .map(|c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Appends a simple string (`+...`).
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
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
    fn replies_encode_as_resp2() {
        let mut out = Vec::new();
        encode_outcome(&mut out, &Outcome::Array(vec![Some(b"a".to_vec()), None]));
        encode_outcome(&mut out, &Outcome::Int(-3));
        encode_outcome(&mut out, &Outcome::Error("ERR bad\r\nthing".into()));
        assert_eq!(
            out,
            b"*2\r\n$1\r\na\r\n$-1\r\n:-3\r\n-ERR bad  thing\r\n".to_vec()
        );
    }
}
