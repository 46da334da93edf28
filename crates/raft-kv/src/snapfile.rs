//! The snapshot file: the whole key space at one applied index, as a
//! leader streams it to a follower and as `raft-kv backup` saves it.
//!
//! ```text
//! header   "RKVSNAP\0"  version u32  index u64  term u64  keys u64  clock u64
//!          meta_count u32, then meta_count times: key_len u32 key value_len u32 value
//! records  key_len u32  key  value_len u32  value       (keys times)
//! trailer  0xFFFF_FFFF  records u64  crc32 u32          (of every byte before it)
//! ```
//!
//! Version 2 (this one) stores each value as the state machine does: a
//! tag byte (type, and whether an expiry time follows), the expiry time,
//! the data; and in the header the state's clock and the state machine's
//! own records (deletion marks for WATCH), which every replica must hold
//! alike. Version 1 (no clock,
//! plain string values) is still read.
//!
//! Integers are little-endian. A file with another magic is foreign, one
//! with another version is refused by name, and one whose trailer does not
//! match what came before is damaged; a reader checks all three, and
//! nothing read from a file is trusted before the trailer checked out.

use std::io::{Read, Write};
use std::path::Path;

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"RKVSNAP\0";
/// The format this build writes.
pub const VERSION: u32 = 2;
/// The oldest format this build reads.
pub const OLDEST_VERSION: u32 = 1;
/// One key and its value.
pub type Record = (Vec<u8>, Vec<u8>);

/// Bytes before the first record when there are no meta records.
pub const HEADER_LEN: u64 = 8 + 4 + 8 + 8 + 8 + 8 + 4;
/// The longest key or value a reader accepts (larger lengths mean damage):
/// the largest frame a command can arrive in.
const MAX_FIELD: u32 = 64 << 20;
const END: u32 = u32::MAX;
/// The most meta records a header holds.
const MAX_META: u32 = 1 << 16;
/// The most bytes a meta record's key or value holds.
const MAX_META_FIELD: u32 = 64;

/// What a snapshot file covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The last log index applied to the state.
    pub index: u64,
    /// That entry's term.
    pub term: u64,
    /// How many keys the state holds.
    pub keys: u64,
    /// The state's clock (milliseconds since the Unix epoch; 0 in version 1).
    pub clock: u64,
}

/// Why a snapshot file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// Not a raft-kv snapshot.
    #[error("not a raft-kv snapshot file (bad magic)")]
    Foreign,
    /// Written by a version of raft-kv whose format this build does not read.
    #[error("snapshot format version {0} is not supported (this build reads versions {OLDEST_VERSION} to {VERSION})")]
    Version(u32),
    /// The file is cut short or its contents do not match its checksum.
    #[error("damaged snapshot file: {0}")]
    Damaged(String),
    /// Reading or writing failed. (Not a `source`: the message already
    /// holds it, and error chains would print it twice.)
    #[error("snapshot file I/O: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for SnapError {
    fn from(e: std::io::Error) -> Self {
        SnapError::Io(e)
    }
}

/// Writes a snapshot file record by record.
pub struct Writer<W: Write> {
    w: W,
    crc: crc32fast::Hasher,
    records: u64,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    /// Starts a file with its header.
    pub fn new(w: W, h: Header) -> std::io::Result<Self> {
        Self::with_meta(w, h, &[])
    }

    /// Starts a file with its header and the state machine's own records.
    pub fn with_meta(w: W, h: Header, meta: &[Record]) -> std::io::Result<Self> {
        let mut wr = Writer {
            w,
            crc: crc32fast::Hasher::new(),
            records: 0,
            bytes: 0,
        };
        wr.put(MAGIC)?;
        wr.put(&VERSION.to_le_bytes())?;
        wr.put(&h.index.to_le_bytes())?;
        wr.put(&h.term.to_le_bytes())?;
        wr.put(&h.keys.to_le_bytes())?;
        wr.put(&h.clock.to_le_bytes())?;
        let n = u32::try_from(meta.len())
            .ok()
            .filter(|&n| n <= MAX_META)
            .ok_or_else(|| std::io::Error::other("too many meta records"))?;
        wr.put(&n.to_le_bytes())?;
        for (k, v) in meta {
            wr.field(k)?;
            wr.field(v)?;
        }
        Ok(wr)
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        self.w.write_all(b)
    }

    fn field(&mut self, b: &[u8]) -> std::io::Result<()> {
        let n = u32::try_from(b.len())
            .ok()
            .filter(|&n| n <= MAX_FIELD)
            .ok_or_else(|| std::io::Error::other(format!("field of {} bytes too long", b.len())))?;
        self.put(&n.to_le_bytes())?;
        self.put(b)
    }

    /// Adds one key and its value.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        if key.len() > MAX_FIELD as usize || value.len() > MAX_FIELD as usize {
            return Err(std::io::Error::other("field too long"));
        }
        self.field(key)?;
        self.field(value)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the trailer; returns the sink and the file's length.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.put(&END.to_le_bytes())?;
        self.put(&self.records.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        self.w.write_all(&crc.to_le_bytes())?;
        self.w.flush()?;
        Ok((self.w, self.bytes + 4))
    }
}

/// Reads a snapshot file record by record, checking it as it goes.
pub struct Reader<R: Read> {
    r: R,
    version: u32,
    meta: Vec<Record>,
    crc: crc32fast::Hasher,
    header: Header,
    records: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(r: R) -> Result<Self, SnapError> {
        let mut rd = Reader {
            r,
            crc: crc32fast::Hasher::new(),
            header: Header {
                index: 0,
                term: 0,
                keys: 0,
                clock: 0,
            },
            version: 0,
            meta: Vec::new(),
            records: 0,
            done: false,
        };
        let mut magic = [0u8; 8];
        rd.fill(&mut magic).map_err(|_| SnapError::Foreign)?;
        if &magic != MAGIC {
            return Err(SnapError::Foreign);
        }
        let version = rd.u32()?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(SnapError::Version(version));
        }
        rd.version = version;
        rd.header = Header {
            index: rd.u64()?,
            term: rd.u64()?,
            keys: rd.u64()?,
            clock: 0,
        };
        if version >= 2 {
            rd.header.clock = rd.u64()?;
            let n = rd.u32()?;
            if n > MAX_META {
                return Err(SnapError::Damaged(format!("{n} meta records")));
            }
            for _ in 0..n {
                let kl = rd.u32()?;
                if kl > MAX_META_FIELD {
                    return Err(SnapError::Damaged(format!("a meta key of {kl} bytes")));
                }
                let k = rd.field(kl)?;
                let vl = rd.u32()?;
                if vl > MAX_META_FIELD {
                    return Err(SnapError::Damaged(format!("a meta value of {vl} bytes")));
                }
                let v = rd.field(vl)?;
                rd.meta.push((k, v));
            }
        }
        Ok(rd)
    }

    /// The state machine's own records (trusted only once `next_record`
    /// returned `None`).
    pub fn meta(&self) -> &[Record] {
        &self.meta
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// What the file says it covers (trusted only once `next` returned `None`).
    pub fn header(&self) -> Header {
        self.header
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), SnapError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SnapError::Damaged("the file is cut short".into()),
            _ => SnapError::Io(e),
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, SnapError> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, SnapError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn field(&mut self, n: u32) -> Result<Vec<u8>, SnapError> {
        if n > MAX_FIELD {
            return Err(SnapError::Damaged(format!("a field claims {n} bytes")));
        }
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v)?;
        Ok(v)
    }

    /// The next key and value; `None` after the last one, once the trailer
    /// checked out.
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapError> {
        if self.done {
            return Ok(None);
        }
        let kl = self.u32()?;
        if kl == END {
            let records = self.u64()?;
            let want = self.crc.clone().finalize();
            let mut b = [0u8; 4];
            self.r.read_exact(&mut b).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    SnapError::Damaged("the file is cut short".into())
                }
                _ => SnapError::Io(e),
            })?;
            if u32::from_le_bytes(b) != want {
                return Err(SnapError::Damaged("checksum mismatch".into()));
            }
            if records != self.records || records != self.header.keys {
                return Err(SnapError::Damaged(format!(
                    "{} records read, trailer says {records}, header {}",
                    self.records, self.header.keys
                )));
            }
            let mut extra = [0u8; 1];
            if self.r.read(&mut extra)? != 0 {
                return Err(SnapError::Damaged("bytes after the trailer".into()));
            }
            self.done = true;
            return Ok(None);
        }
        let key = self.field(kl)?;
        let vl = self.u32()?;
        let value = self.field(vl)?;
        self.records += 1;
        Ok(Some((key, value)))
    }
}

/// Reads a whole file and checks it; returns its header.
pub fn verify(path: &Path) -> Result<Header, SnapError> {
    let f = std::fs::File::open(path)?;
    let mut r = Reader::new(std::io::BufReader::with_capacity(1 << 20, f))?;
    while r.next_record()?.is_some() {}
    Ok(r.header())
}

/// Bytes written to a big file between two syncs of it.
pub const SYNC_EVERY: u64 = 8 << 20;

/// A file written in bulk (a snapshot being written, received or loaded)
/// that is synced every [`SYNC_EVERY`] bytes. The disk is shared with the
/// Raft log, whose every save waits for an fsync: a file written whole and
/// synced once at the end makes that one fsync carry hundreds of megabytes,
/// and the log's saves queue behind it. Synced as it goes, the disk sees a
/// steady trickle instead.
#[derive(Debug)]
pub struct SyncingFile {
    file: std::fs::File,
    unsynced: u64,
}

impl SyncingFile {
    /// Wraps `file`.
    pub fn new(file: std::fs::File) -> Self {
        SyncingFile { file, unsynced: 0 }
    }

    /// Counts `n` bytes written to the file by other means, and syncs when
    /// they reach [`SYNC_EVERY`].
    pub fn wrote(file: &std::fs::File, unsynced: &mut u64, n: u64) -> std::io::Result<()> {
        *unsynced += n;
        if *unsynced >= SYNC_EVERY {
            file.sync_data()?;
            *unsynced = 0;
        }
        Ok(())
    }

    /// The file.
    pub fn into_inner(self) -> std::fs::File {
        self.file
    }
}

impl Write for SyncingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        SyncingFile::wrote(&self.file, &mut self.unsynced, n as u64)?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let h = Header {
            index: 7,
            term: 2,
            keys: 2,
            clock: 1_700_000_000_000,
        };
        let mut w = Writer::new(Vec::new(), h).unwrap();
        w.record(b"a", b"1").unwrap();
        w.record(b"bb", b"").unwrap();
        w.finish().unwrap().0
    }

    fn read_all(b: &[u8]) -> Result<Vec<Record>, SnapError> {
        let mut r = Reader::new(b)?;
        let mut out = vec![];
        while let Some(kv) = r.next_record()? {
            out.push(kv);
        }
        Ok(out)
    }

    /// A version-1 file (before values were tagged) still reads, with a
    /// zero clock.
    #[test]
    fn a_version_1_file_reads_back() {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        for n in [9u64, 3, 1] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(b"k");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(b"vv");
        b.extend_from_slice(&END.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let r = Reader::new(&b[..]).unwrap();
        assert_eq!(r.version(), 1);
        assert_eq!(
            r.header(),
            Header {
                index: 9,
                term: 3,
                keys: 1,
                clock: 0
            }
        );
        assert_eq!(read_all(&b).unwrap(), vec![(b"k".to_vec(), b"vv".to_vec())]);
        let mut future = b.clone();
        future[8] = 3;
        assert!(matches!(
            Reader::new(&future[..]),
            Err(SnapError::Version(3))
        ));
    }

    #[test]
    fn a_written_file_reads_back() {
        let b = sample();
        let r = Reader::new(&b[..]).unwrap();
        assert_eq!(r.header().index, 7);
        assert_eq!(
            read_all(&b).unwrap(),
            vec![(b"a".to_vec(), b"1".to_vec()), (b"bb".to_vec(), vec![])]
        );
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let b = sample();
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(read_all(&d).is_err(), "flipping byte {i} went unnoticed");
        }
        for n in 0..b.len() {
            assert!(read_all(&b[..n]).is_err(), "a cut at {n} went unnoticed");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(read_all(&longer).is_err());
    }

    #[test]
    fn foreign_and_future_files_are_refused_by_name() {
        assert!(matches!(
            read_all(b"REDIS0011...."),
            Err(SnapError::Foreign)
        ));
        let mut b = sample();
        b[8] = 9;
        assert!(matches!(read_all(&b), Err(SnapError::Version(9))));
    }
}
