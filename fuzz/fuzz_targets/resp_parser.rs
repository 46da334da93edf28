//! Any bytes from a client: the RESP parser returns commands, "need more" or
//! an error, never panics, never claims more bytes than it was given, and
//! respects its limits; and one parser fed the same bytes in two pieces (cut
//! where the first byte says) gives what it gives for the whole input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use raft_kv::resp::{parse_command, Limits, RequestParser};

fn run(data: &[u8], cuts: &[usize], limits: &Limits) -> (Vec<Vec<Vec<u8>>>, bool) {
    let mut p = RequestParser::new();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut last = 0;
    for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
        buf.extend_from_slice(&data[last..cut]);
        last = cut;
        let mut pos = 0;
        loop {
            match p.next(&buf, &mut pos, limits) {
                Ok(Some(args)) => {
                    assert!(args.len() <= limits.max_args);
                    assert!(args.iter().all(|a| a.len() <= limits.max_bulk));
                    out.push(args);
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
        assert!(pos <= buf.len());
        buf.drain(..pos);
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_bulk: 64,
        max_args: 16,
        ..Limits::default()
    };
    let mut at = 0;
    while at < data.len() {
        match parse_command(&data[at..], &limits) {
            Ok(Some((args, used))) => {
                assert!(used > 0 && at + used <= data.len());
                assert!(args.len() <= limits.max_args);
                assert!(args.iter().all(|a| a.len() <= limits.max_bulk));
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Some((&first, rest)) = data.split_first() {
        let whole = run(rest, &[], &limits);
        let cut = usize::from(first) % (rest.len() + 1);
        assert_eq!(run(rest, &[cut], &limits), whole, "cut at {cut}");
    }
});
