//! The durable event spool: every event the agent produces is written here before anything tries
//! to send it, and leaves only after the server has acknowledged it. The spool knows nothing of
//! events themselves: a record is opaque payload bytes plus a [`Class`].
//!
//! # On disk
//!
//! One directory, created 0700, holding:
//!
//! - `spool-<first seq, 20 digits>.log`: append-only segments, oldest first by name. A new segment
//!   starts when the next record would take the current one past
//!   [`SpoolConfig::segment_bytes`]. A segment's first record carries the sequence number in its
//!   name, and each later record the next number. A record is an 18-byte header, then the payload:
//!
//!   | bytes    | field                                                 |
//!   |----------|-------------------------------------------------------|
//!   | `0`      | magic and format version, `0xE1`                      |
//!   | `1..5`   | payload length, u32 little-endian                     |
//!   | `5..13`  | sequence number, u64 little-endian                    |
//!   | `13`     | class: `1` critical, `2` droppable                    |
//!   | `14..18` | CRC-32C of bytes `0..14` then of the payload, u32 LE  |
//!
//! - `acked`: the acknowledged cursor, the highest sequence number the server has confirmed:
//!   `TSAC`, the number as u64 LE, then the CRC-32C of those 12 bytes. It is replaced atomically
//!   (`acked.tmp` written and fsynced, renamed over `acked`, directory fsynced).
//! - `lock`: held with `flock` while the spool is open, so two processes never share it.
//!
//! Sequence numbers start at 1 and only go up, across restarts too: at open the next number is
//! one past the highest of the surviving records, the cursor and the segment names. Numbers of
//! records lost in a crash (never fsynced) may be given again to new records; the server
//! recognises events by their own ids, never by these numbers.
//!
//! # Durability
//!
//! [`Spool::append`] hands the record to the kernel at once (one positioned write on the open
//! segment), so an agent that is killed (even with SIGKILL) loses nothing. Surviving a power
//! loss or a kernel crash takes an fsync: [`run_syncer`] does one within about
//! [`SpoolConfig::fsync_interval`] of any append, and [`Spool::sync`] does one on demand (and
//! returns only when everything appended before the call is on disk). Appends never wait for an
//! fsync, which is what keeps them cheap.
//!
//! [`Spool::ack`] writes the cursor durably before it deletes anything, so a crash in between
//! leaves segments that the next open recognises as acknowledged and deletes. Every segment
//! whose records are all acknowledged is deleted, except the newest: records keep going into it,
//! and it keeps the highest sequence number on disk even if the cursor file is lost.
//!
//! # Recovery at open
//!
//! Every segment is read and every record checked (magic, length, checksum, class, sequence).
//! A bad record does not end the segment: recovery skips the damaged stretch and goes on with
//! the next intact record after it, so that one flipped byte costs one record, not everything
//! after it. The damaged stretch is reported in [`Recovery`] with the bytes and, where the
//! numbers around it tell, the records lost, and the lost record itself when its header still
//! describes it (so the caller can say what kind of event it was). Damage that runs to the end
//! of the newest segment is the normal result of a crash in the middle of a write: the file is
//! truncated after its last intact record and new records follow. Damage elsewhere is left on
//! disk as it is (the evidence stays); the segment is deleted once acknowledgements move past
//! it. A cursor file that cannot be read counts as zero: records are then sent again, never
//! skipped.
//!
//! ## Finding the next record after damage
//!
//! The length of a damaged record cannot be trusted, so recovery looks for the next record at
//! every later offset and takes the first offset where a whole record checks out: the magic, a
//! length within [`MAX_PAYLOAD`] that fits in the file, a known class, a sequence number in the
//! only range an honest record there could have, and the CRC-32C over header and payload. That
//! range is narrow: the record must come after every record already kept (at least the number
//! that was due at the damage), and every record skipped takes at least [`HEADER_LEN`] bytes, so
//! its number can be at most one per [`HEADER_LEN`] bytes skipped beyond the number due (and
//! below the next segment's first number). Why payload bytes are not taken for a record:
//!
//! - by accident: bytes that are not a record pass the magic (1 in 256), the class (1 in 128),
//!   the length (1 in 4,096) and the sequence range (for arbitrary bytes, next to none) and then
//!   a 32-bit checksum over everything they claim to hold: less than one offset in 2^59 even
//!   before the sequence range is counted, where a damaged stretch is a few hundred offsets;
//! - on purpose: payloads are events the agent encodes. What a local user controls in them
//!   (executable paths, unit names, error details made from them) is text that cannot hold a
//!   zero byte, and every header holds several: the length's top byte (a payload is at most
//!   1 MiB) and the sequence number's top bytes.
//!
//! And a record that is found was written by the spool: records are never rewritten in place,
//! so an intact record is what was appended, whatever happened around it.
//!
//! A segment name or a cursor above 2^63 - 1 is damage too: such a file is not taken for a
//! segment, and such a cursor counts as zero.
//!
//! # When the bound or the disk is full
//!
//! The spool's size is the bytes of its segment files. A [`Class::Droppable`] record that would
//! take it past [`SpoolConfig::max_bytes`] is refused with [`SpoolError::Full`] and counted in
//! [`SpoolStats::dropped_droppable`]. A [`Class::Critical`] record may go on into
//! [`SpoolConfig::critical_reserve_bytes`] beyond that; past the reserve it is refused with
//! [`SpoolError::Full`] too, so the caller can refuse the operation instead of performing it
//! without its event. A write that fails (ENOSPC, EIO) is rolled back by truncating the segment to
//! its last good length and reported as [`SpoolError::Io`]; the spool takes records again once
//! the disk does.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::watch;

/// Bytes in a record header.
pub const HEADER_LEN: usize = 18;
/// The largest payload a record may carry. Events are a few hundred bytes; the bound also lets
/// recovery tell a damaged length field from a real one.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// First byte of every record: the format's magic and version. Not zero, so that a stretch of
/// zeros (what a crash can leave after a file's last write) is never taken for a record.
const RECORD_MAGIC: u8 = 0xE1;
/// The bytes of the header that the checksum covers (all but the checksum itself).
const CHECKED_HEADER: usize = 14;
const SEGMENT_PREFIX: &str = "spool-";
const SEGMENT_SUFFIX: &str = ".log";
const CURSOR_FILE: &str = "acked";
/// What [`crate::durable::write_atomically`] leaves if a crash interrupts it.
const CURSOR_TMP: &str = "acked.tmp";
const CURSOR_MAGIC: &[u8; 4] = b"TSAC";
const CURSOR_LEN: usize = 16;
const LOCK_FILE: &str = "lock";
/// The highest sequence number a segment name or the cursor may carry. At a million records a
/// second the spool would take 290,000 years to get there, so a larger number read from disk
/// is damage; bounding them keeps the arithmetic on numbers from disk (one past the highest,
/// the next record) from overflowing.
const MAX_SEQ: u64 = i64::MAX as u64;

/// Whether a record may be dropped when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Must never be dropped (issuance, revocation): accepted into the critical reserve, and
    /// refused only when that is used up too, so that the caller can refuse the operation.
    Critical,
    /// May be dropped, and counted, when the spool reaches its bound (deliveries, denials).
    Droppable,
}

impl Class {
    fn to_byte(self) -> u8 {
        match self {
            Class::Critical => 1,
            Class::Droppable => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Class> {
        match byte {
            1 => Some(Class::Critical),
            2 => Some(Class::Droppable),
            _ => None,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Critical => "critical",
            Class::Droppable => "droppable",
        })
    }
}

/// Sizes and timing of a spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// A new segment starts when the next record would take the current one past this.
    pub segment_bytes: u64,
    /// Droppable records are refused beyond this many bytes of segment files.
    pub max_bytes: u64,
    /// How far beyond `max_bytes` critical records are still accepted.
    pub critical_reserve_bytes: u64,
    /// [`run_syncer`] fsyncs this long after the first append it has not yet synced.
    pub fsync_interval: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_bytes: 4 << 20,
            max_bytes: 256 << 20,
            critical_reserve_bytes: 32 << 20,
            fsync_interval: Duration::from_millis(50),
        }
    }
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed (ENOSPC, EIO, permissions). A failed append recorded nothing, and
    /// the spool takes records again once the cause is gone.
    #[error("event spool: cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done: `write`, `fsync`, `open`, ...
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The error from the system.
        #[source]
        source: io::Error,
    },
    /// The record would take the spool past its bound for its class; it was not written.
    #[error(
        "event spool {} is full: {used} bytes used, a {dropped_class} record may not take it past {limit}",
        dir.display()
    )]
    Full {
        /// The class of the refused record.
        dropped_class: Class,
        /// The spool directory.
        dir: PathBuf,
        /// Bytes of segment files when the record was refused.
        used: u64,
        /// The bound for that class.
        limit: u64,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error(
        "event spool {}: a {len}-byte record is larger than the {max}-byte limit",
        dir.display()
    )]
    TooLarge {
        /// The spool directory.
        dir: PathBuf,
        /// The payload's length.
        len: usize,
        /// [`MAX_PAYLOAD`].
        max: usize,
    },
    /// An acknowledgement named a sequence number that was never given out.
    #[error("event spool {}: cannot acknowledge up to {up_to}: the last record is {last}", dir.display())]
    AckBeyondEnd {
        /// The spool directory.
        dir: PathBuf,
        /// The sequence number acknowledged.
        up_to: u64,
        /// The last sequence number given out.
        last: u64,
    },
    /// Another process has the spool open.
    #[error("event spool: {} is held by another process", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The configuration cannot work.
    #[error("event spool {}: {reason}", dir.display())]
    Config {
        /// The spool directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> SpoolError {
    SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What was wrong with a bad record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a record header.
    ShortHeader,
    /// The file ends inside a record's payload.
    ShortPayload {
        /// The length the header announced.
        expected: u32,
    },
    /// The first byte is not the record magic.
    BadMagic(u8),
    /// The length is beyond [`MAX_PAYLOAD`].
    BadLength(u32),
    /// The checksum does not match the header and payload.
    ChecksumMismatch,
    /// An intact record with an unknown class.
    BadClass(u8),
    /// An intact record out of sequence (or running into the next segment's numbers).
    BadSequence {
        /// The number in the record.
        found: u64,
        /// The number that should have been there.
        expected: u64,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::ShortHeader => f.write_str("file ends inside a record header"),
            Damage::ShortPayload { expected } => {
                write!(f, "file ends inside a {expected}-byte payload")
            }
            Damage::BadMagic(byte) => write!(f, "no record magic (found {byte:#04x})"),
            Damage::BadLength(len) => write!(f, "impossible payload length {len}"),
            Damage::ChecksumMismatch => f.write_str("checksum mismatch"),
            Damage::BadClass(byte) => write!(f, "unknown class {byte}"),
            Damage::BadSequence { found, expected } => {
                write!(f, "sequence number {found} where {expected} was due")
            }
        }
    }
}

/// A lost record as its damaged header still describes it: kept when the header's length runs
/// exactly to the next intact record, so the damage is most likely in the payload or the
/// checksum, and the class and payload are probably what was written (but unverified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRecord {
    /// The class byte, if it names a class.
    pub class: Option<Class>,
    /// The payload bytes, unverified.
    pub payload: Vec<u8>,
}

/// A damaged stretch of a segment found at open, and what was lost in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    /// The segment file.
    pub path: PathBuf,
    /// What was wrong with the record at `offset`.
    pub damage: Damage,
    /// Where the damage starts: the end of the last intact record before it.
    pub offset: u64,
    /// Bytes from `offset` to the next intact record (or the end of the file): lost.
    pub lost_bytes: u64,
    /// The sequence number of the first lost record.
    pub first_lost_seq: u64,
    /// How many records were lost, when the numbers around the damage tell: the next intact
    /// record, or the next segment's first number. Not for damage at the end of the newest
    /// segment (a write cut short by a crash), where at least one was.
    pub lost_records: Option<u64>,
    /// The one record lost, as its header described it, when that can be trusted that far.
    pub lost_record: Option<LostRecord>,
    /// Whether the damage ran to the end of the newest segment and was cut off; otherwise the
    /// bytes are left on disk and skipped.
    pub truncated: bool,
}

impl fmt::Display for DamagedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} at byte {}: {} bytes lost from sequence number {}",
            self.path.display(),
            self.damage,
            self.offset,
            self.lost_bytes,
            self.first_lost_seq
        )?;
        if let Some(records) = self.lost_records {
            write!(f, " ({records} records)")?;
        }
        f.write_str(if self.truncated {
            "; truncated"
        } else {
            "; skipped"
        })
    }
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments kept.
    pub segments: usize,
    /// Intact records not yet acknowledged.
    pub pending_records: u64,
    /// The acknowledged cursor.
    pub acked: u64,
    /// Damaged stretches and what was lost in each, in file order.
    pub damaged: Vec<DamagedRange>,
    /// Intact records found after a damaged stretch in the same segment, and kept.
    pub recovered_after_damage: u64,
    /// Fully acknowledged segments (or empty ones) deleted: a crash between writing the cursor
    /// and deleting them, or between creating a segment and writing to it.
    pub removed_segments: usize,
    /// A temporary cursor file was left by a crash during an acknowledgement and removed; the
    /// previous cursor stands.
    pub removed_cursor_tmp: bool,
    /// Why the cursor file could not be used: the cursor restarts from zero, so records still on
    /// disk are sent again (the server drops duplicates).
    pub cursor_reset: Option<String>,
}

impl Recovery {
    /// Bytes of records lost to damage.
    pub fn lost_bytes(&self) -> u64 {
        self.damaged.iter().map(|d| d.lost_bytes).sum()
    }

    /// Records known to be lost to damage (a write cut short at the end of the newest segment
    /// counts as one).
    pub fn lost_records(&self) -> u64 {
        self.damaged
            .iter()
            .map(|d| d.lost_records.unwrap_or(1))
            .sum()
    }

    /// Whether nothing was damaged.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.cursor_reset.is_none()
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} records pending after {}",
            self.segments, self.pending_records, self.acked
        )?;
        if !self.damaged.is_empty() {
            write!(
                f,
                "; {} bytes lost, {} intact records after damage kept",
                self.lost_bytes(),
                self.recovered_after_damage
            )?;
            for damaged in &self.damaged {
                write!(f, "; {damaged}")?;
            }
        }
        if let Some(reason) = &self.cursor_reset {
            write!(f, "; cursor reset to 0: {reason}")?;
        }
        Ok(())
    }
}

/// Counters and sizes of an open spool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// The last sequence number given out (0 before the first record).
    pub last_seq: u64,
    /// The acknowledged cursor.
    pub acked: u64,
    /// Every record up to this number has been fsynced by this process or found at open.
    pub durable_seq: u64,
    /// Records not yet acknowledged.
    pub pending_records: u64,
    /// Bytes (headers included) of records not yet acknowledged.
    pub pending_bytes: u64,
    /// Bytes of segment files: what the size bound applies to.
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Droppable records refused because the spool was full, since open.
    pub dropped_droppable: u64,
    /// Critical records refused because the reserve was used up too, since open.
    pub refused_critical: u64,
    /// Records found damaged when read for upload, and skipped, since open (counted at each
    /// read that meets one).
    pub corrupt_skipped: u64,
}

/// An open spool. Every method takes `&self`; share it in an `Arc`. Dropping it does not fsync:
/// call [`Spool::sync`] first ([`run_syncer`] does when it stops).
pub struct Spool {
    /// The spool directory.
    dir: PathBuf,
    /// Sizes and timing, as given to [`Spool::open`].
    config: SpoolConfig,
    /// Segments, numbers and cursor; see [`State`].
    state: Mutex<State>,
    /// Held for a whole [`Spool::sync`], fsyncs included, so that a sync that finds nothing left
    /// to do knows that an earlier sync still running has finished.
    sync_round: Mutex<()>,
    /// Held for a whole [`Spool::ack`], so that cursor files are written in order.
    ack_round: Mutex<()>,
    /// The last sequence number given out; every append moves it on.
    latest: watch::Sender<u64>,
    /// Counted outside the state lock: see the fields of [`SpoolStats`] by the same names.
    dropped_droppable: AtomicU64,
    /// See [`SpoolStats::refused_critical`].
    refused_critical: AtomicU64,
    /// See [`SpoolStats::corrupt_skipped`].
    corrupt_skipped: AtomicU64,
    /// The `flock` on the lock file, released when the spool is dropped.
    _lock: Flock<File>,
}

/// What appends, syncs and acknowledgements change, behind one mutex. File I/O other than the
/// append's own write happens outside it.
struct State {
    /// Segments that take no more records, oldest first.
    sealed: VecDeque<Segment>,
    /// The segment records go into; `None` until the first append after open or a roll.
    active: Option<Segment>,
    /// The number the next record gets.
    next_seq: u64,
    /// The acknowledged cursor, as persisted.
    acked: u64,
    /// Bytes of all segment files.
    disk_bytes: u64,
    /// Files written since the last fsync, in the order they were first written.
    unsynced: Vec<(Arc<File>, Arc<Path>)>,
    /// A segment was created since the last fsync of the directory.
    dir_unsynced: bool,
    /// Every record up to this one is on disk.
    durable_seq: u64,
    /// A failed write could not be rolled back either: the active segment holds bytes beyond
    /// its good length, to be cut before the next write.
    torn_tail: bool,
    /// Reused for encoding records, so that appends do not allocate.
    buf: Vec<u8>,
}

/// One segment file.
struct Segment {
    /// The file's path, for errors and deletion.
    path: Arc<Path>,
    /// The number in the file name: that of its first record.
    first_seq: u64,
    /// The open file: written by appends (the active segment), read for upload. Shared with
    /// reads in progress, which may outlive the segment's deletion.
    file: Arc<File>,
    /// Where each intact record starts. A record runs to the next one's start (or `len`): bytes
    /// of a damaged stretch after it are read with it and ignored.
    offsets: Vec<u64>,
    /// The number of each intact record, when recovery skipped damage in this segment; `None`
    /// when record `i` has number `first_seq + i`, as in every segment without damage.
    seqs: Option<Vec<u64>>,
    /// Bytes of intact records: where the next record goes.
    len: u64,
    /// Bytes the file takes on disk (more than `len` for an older segment with a damaged tail).
    disk_len: u64,
}

impl Segment {
    /// The number of record `index`.
    fn seq_at(&self, index: usize) -> u64 {
        match &self.seqs {
            Some(seqs) => seqs[index],
            None => self.first_seq + index as u64,
        }
    }

    /// The number of the last intact record, or `first_seq - 1` if there is none.
    fn last_seq(&self) -> u64 {
        match self.offsets.len() {
            0 => self.first_seq - 1,
            n => self.seq_at(n - 1),
        }
    }

    /// The index of the first record numbered above `seq` (`offsets.len()` if none is).
    fn index_after(&self, seq: u64) -> usize {
        match &self.seqs {
            Some(seqs) => seqs.partition_point(|&s| s <= seq),
            None => (seq.saturating_add(1).saturating_sub(self.first_seq))
                .min(self.offsets.len() as u64) as usize,
        }
    }

    /// Where record `index` ends.
    fn end_of(&self, index: usize) -> u64 {
        self.offsets.get(index + 1).copied().unwrap_or(self.len)
    }

    /// Indexes a record just written at the end.
    fn push(&mut self, offset: u64, seq: u64) {
        self.offsets.push(offset);
        if let Some(seqs) = &mut self.seqs {
            seqs.push(seq);
        }
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens the spool in `dir` (created 0700 if missing), checks every record, repairs what a
    /// crash left, and reports it. Fails with [`SpoolError::Locked`] if another process has it.
    pub fn open(
        dir: impl AsRef<Path>,
        config: SpoolConfig,
    ) -> Result<(Spool, Recovery), SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        if config.segment_bytes == 0 || config.max_bytes == 0 {
            return Err(SpoolError::Config {
                dir,
                reason: "segment_bytes and max_bytes must not be zero".into(),
            });
        }
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error("set permissions of", &dir, e))?;
        let lock = lock_dir(&dir)?;
        let mut recovery = Recovery::default();

        let tmp = dir.join(CURSOR_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => recovery.removed_cursor_tmp = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &tmp, e)),
        }
        let (acked, cursor_reset) = read_cursor(&dir)?;
        recovery.acked = acked;
        recovery.cursor_reset = cursor_reset;

        let names = list_segments(&dir)?;
        let mut found = Vec::with_capacity(names.len());
        let mut highest = acked;
        let mut dir_changed = false;
        for (i, (first_seq, path)) in names.iter().enumerate() {
            let next_first = names.get(i + 1).map(|(seq, _)| *seq);
            let newest = next_first.is_none();
            let file = OpenOptions::new()
                .read(true)
                .write(newest)
                .open(path)
                .map_err(|e| io_error("open", path, e))?;
            let scan = scan_segment(&file, *first_seq, next_first)
                .map_err(|e| io_error("read", path, e))?;
            let mut disk_len = scan.file_len;
            let truncate = newest && scan.good_len < scan.file_len;
            if truncate {
                file.set_len(scan.good_len)
                    .map_err(|e| io_error("truncate", path, e))?;
                disk_len = scan.good_len;
            }
            recovery.recovered_after_damage += scan.recovered_after_damage;
            for mut damaged in scan.damaged {
                damaged.path = path.clone();
                if damaged.lost_records.is_none() {
                    // Damage at the end of an older segment: the next one's first number tells.
                    damaged.lost_records =
                        next_first.map(|next| next.saturating_sub(damaged.first_lost_seq));
                }
                damaged.truncated =
                    truncate && damaged.offset + damaged.lost_bytes == scan.file_len;
                recovery.damaged.push(damaged);
            }
            // What was fsynced before a crash is on disk, but what a killed process wrote may
            // still be only in the page cache: sync it, so that durable_seq means what it says.
            file.sync_all().map_err(|e| io_error("fsync", path, e))?;
            let segment = Segment {
                path: Arc::from(path.as_path()),
                first_seq: *first_seq,
                file: Arc::new(file),
                offsets: scan.offsets,
                seqs: scan.seqs,
                len: scan.good_len,
                disk_len,
            };
            highest = highest.max(first_seq - 1).max(segment.last_seq());
            found.push(segment);
        }

        // The newest segment goes on taking records if it has some and its numbers run on to the
        // next one; an empty file (a crash between creating and writing it) is deleted.
        let mut active = None;
        let mut removed = Vec::new();
        if let Some(newest) = found.pop() {
            if newest.offsets.is_empty() {
                removed.push(newest);
            } else if newest.last_seq() == highest {
                active = Some(newest);
            } else {
                found.push(newest);
            }
        }
        let mut state = State {
            sealed: found.into(),
            active,
            next_seq: highest.saturating_add(1),
            acked,
            disk_bytes: 0,
            unsynced: Vec::new(),
            dir_unsynced: false,
            durable_seq: highest,
            torn_tail: false,
            buf: Vec::with_capacity(HEADER_LEN + 512),
        };
        state.disk_bytes = state.segments().map(|s| s.disk_len).sum();
        removed.extend(state.take_acked_segments());
        for segment in &removed {
            match fs::remove_file(&segment.path) {
                Ok(()) => dir_changed = true,
                Err(e) => tracing::warn!(file = %segment.path.display(), error = %e,
                    "cannot delete an acknowledged event spool segment"),
            }
        }
        recovery.removed_segments = removed.len();
        dir_changed |= recovery.damaged.iter().any(|d| d.truncated) || recovery.removed_cursor_tmp;
        if dir_changed {
            sync_dir(&dir)?;
        }
        recovery.segments = state.segments().count();
        recovery.pending_records = state.pending().0;

        let (latest, _) = watch::channel(highest);
        let spool = Spool {
            dir,
            config,
            state: Mutex::new(state),
            sync_round: Mutex::new(()),
            ack_round: Mutex::new(()),
            latest,
            dropped_droppable: AtomicU64::new(0),
            refused_critical: AtomicU64::new(0),
            corrupt_skipped: AtomicU64::new(0),
            _lock: lock,
        };
        Ok((spool, recovery))
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a record and returns its sequence number. The record is with the kernel when this
    /// returns (it survives the agent being killed) and on disk after the next [`Spool::sync`].
    /// Refused with [`SpoolError::Full`] when the bound for `class` is reached (see the module
    /// documentation); nothing is written then, nor when an [`SpoolError::Io`] is returned.
    pub fn append(&self, class: Class, payload: &[u8]) -> Result<u64, SpoolError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(SpoolError::TooLarge {
                dir: self.dir.clone(),
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let size = (HEADER_LEN + payload.len()) as u64;
        let limit = match class {
            Class::Droppable => self.config.max_bytes,
            Class::Critical => self
                .config
                .max_bytes
                .saturating_add(self.config.critical_reserve_bytes),
        };
        let mut guard = self.lock_state();
        let state = &mut *guard;
        if state.disk_bytes + size > limit {
            let used = state.disk_bytes;
            drop(guard);
            let counter = match class {
                Class::Droppable => &self.dropped_droppable,
                Class::Critical => &self.refused_critical,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(SpoolError::Full {
                dropped_class: class,
                dir: self.dir.clone(),
                used,
                limit,
            });
        }
        if state.torn_tail {
            if let Some(active) = &state.active {
                active
                    .file
                    .set_len(active.len)
                    .map_err(|e| io_error("truncate", &active.path, e))?;
            }
            state.torn_tail = false;
        }
        let roll = match &state.active {
            None => true,
            // A record larger than a segment still gets one to itself.
            Some(active) => {
                !active.offsets.is_empty() && active.len + size > self.config.segment_bytes
            }
        };
        if roll {
            let segment = self.create_segment(state.next_seq)?;
            state.dir_unsynced = true;
            state.sealed.extend(state.active.take());
            state.active = Some(segment);
        }
        let State {
            active: Some(active),
            buf,
            ..
        } = state
        else {
            // Not reached: a segment was just created if there was none.
            return Err(io_error(
                "write",
                &self.dir,
                io::Error::other("no active segment"),
            ));
        };

        let seq = state.next_seq;
        encode_record(buf, class, seq, payload);
        if let Err(e) = active.file.write_all_at(buf, active.len) {
            // Part of the record may have reached the file: cut it off, or the next record would
            // follow garbage. If even that fails, the next append tries again first.
            if active.file.set_len(active.len).is_err() {
                state.torn_tail = true;
            }
            return Err(io_error("write", &active.path, e));
        }
        active.push(active.len, seq);
        active.len += size;
        active.disk_len = active.len;
        state.disk_bytes += size;
        state.next_seq += 1;
        if !state
            .unsynced
            .last()
            .is_some_and(|(file, _)| Arc::ptr_eq(file, &active.file))
        {
            state
                .unsynced
                .push((active.file.clone(), active.path.clone()));
        }
        drop(guard);
        // Two appends may get here in either order; the value only ever moves forward.
        self.latest.send_if_modified(|latest| {
            let newer = seq > *latest;
            if newer {
                *latest = seq;
            }
            newer
        });
        Ok(seq)
    }

    /// Fsyncs everything appended before this call (segment files and, for new segments, the
    /// directory). Appends go on meanwhile.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let _round = self
            .sync_round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (files, dir, target) = {
            let mut state = self.lock_state();
            (
                std::mem::take(&mut state.unsynced),
                std::mem::replace(&mut state.dir_unsynced, false),
                state.next_seq - 1,
            )
        };
        let mut result = Ok(());
        for (file, path) in &files {
            if let Err(e) = file.sync_data() {
                result = Err(io_error("fsync", path, e));
                break;
            }
        }
        if result.is_ok() && dir {
            result = sync_dir(&self.dir);
        }
        let mut state = self.lock_state();
        match result {
            Ok(()) => state.durable_seq = state.durable_seq.max(target),
            Err(_) => {
                // Try these again next time, before whatever was written since. (After a failed
                // fsync Linux may have dropped the dirty pages; the records stay readable while
                // the agent runs, so the uploader can still deliver them.)
                let later = std::mem::replace(&mut state.unsynced, files);
                state.unsynced.extend(later);
                state.dir_unsynced |= dir;
            }
        }
        result
    }

    /// Records with sequence numbers above both `after` and the acknowledged cursor, in order: at
    /// most `max_records`, and no more payload bytes than `max_bytes` except that the first
    /// record is always returned. A record found damaged here (the disk changed under the spool)
    /// is logged, counted in [`SpoolStats::corrupt_skipped`] and skipped.
    pub fn read_unacked(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Class, Vec<u8>)>, SpoolError> {
        // Records never change once written and a deleted file stays readable through its open
        // handle, so the files are read outside the lock, from a plan made under it.
        struct Chunk {
            file: Arc<File>,
            path: Arc<Path>,
            /// The numbers of the records to read.
            seqs: Vec<u64>,
            /// Offsets of the records to read, then where the last one ends.
            bounds: Vec<u64>,
        }
        let mut plan: Vec<Chunk> = Vec::new();
        {
            let state = self.lock_state();
            let after = after.max(state.acked);
            let mut records = 0usize;
            let mut bytes = 0usize;
            'segments: for segment in state.segments() {
                if segment.last_seq() <= after || segment.offsets.is_empty() {
                    continue;
                }
                let start = segment.index_after(after);
                let mut bounds = Vec::new();
                let mut seqs = Vec::new();
                let mut stop = false;
                for index in start..segment.offsets.len() {
                    let offset = segment.offsets[index];
                    let end = segment.end_of(index);
                    let payload = ((end - offset) as usize).saturating_sub(HEADER_LEN);
                    if records == max_records || (records > 0 && bytes + payload > max_bytes) {
                        stop = true;
                        break;
                    }
                    if bounds.is_empty() {
                        bounds.push(offset);
                    }
                    bounds.push(end);
                    seqs.push(segment.seq_at(index));
                    records += 1;
                    bytes += payload;
                }
                if !seqs.is_empty() {
                    plan.push(Chunk {
                        file: segment.file.clone(),
                        path: segment.path.clone(),
                        seqs,
                        bounds,
                    });
                }
                if stop {
                    break 'segments;
                }
            }
        }

        let mut out = Vec::new();
        for chunk in plan {
            let (Some(&start), Some(&end)) = (chunk.bounds.first(), chunk.bounds.last()) else {
                continue;
            };
            let mut bytes = vec![0u8; (end - start) as usize];
            chunk
                .file
                .read_exact_at(&mut bytes, start)
                .map_err(|e| io_error("read", &chunk.path, e))?;
            for (pair, &seq) in chunk.bounds.windows(2).zip(&chunk.seqs) {
                let record = &bytes[(pair[0] - start) as usize..(pair[1] - start) as usize];
                match decode_record(record, seq) {
                    Some((class, payload)) => out.push((seq, class, payload.to_vec())),
                    None => {
                        self.corrupt_skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(file = %chunk.path.display(), seq, offset = pair[0],
                            bytes = record.len(), "event spool record damaged on disk; skipped");
                    }
                }
            }
        }
        Ok(out)
    }

    /// Records that the server has everything up to `up_to`: persists the cursor, then deletes
    /// the segments whose records are all acknowledged (but never the newest). Acknowledging an
    /// older number again does nothing; one never given out is refused.
    pub fn ack(&self, up_to: u64) -> Result<(), SpoolError> {
        let _round = self
            .ack_round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        {
            let state = self.lock_state();
            if up_to <= state.acked {
                return Ok(());
            }
            let last = state.next_seq - 1;
            if up_to > last {
                return Err(SpoolError::AckBeyondEnd {
                    dir: self.dir.clone(),
                    up_to,
                    last,
                });
            }
        }
        write_cursor(&self.dir, up_to)?;
        let removed = {
            let mut state = self.lock_state();
            state.acked = up_to;
            state.take_acked_segments()
        };
        // A segment whose deletion fails or is lost in a crash is deleted at the next open.
        for segment in removed {
            if let Err(e) = fs::remove_file(&segment.path) {
                tracing::warn!(file = %segment.path.display(), error = %e,
                    "cannot delete an acknowledged event spool segment");
            }
        }
        Ok(())
    }

    /// The acknowledged cursor: the highest sequence number the server has confirmed.
    pub fn acked(&self) -> u64 {
        self.lock_state().acked
    }

    /// Follows the last sequence number given out: it changes on every append, so an uploader can
    /// wait for new records instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Counters and sizes.
    pub fn stats(&self) -> SpoolStats {
        let state = self.lock_state();
        let (pending_records, pending_bytes) = state.pending();
        SpoolStats {
            last_seq: state.next_seq - 1,
            acked: state.acked,
            durable_seq: state.durable_seq,
            pending_records,
            pending_bytes,
            disk_bytes: state.disk_bytes,
            segments: state.segments().count(),
            dropped_droppable: self.dropped_droppable.load(Ordering::Relaxed),
            refused_critical: self.refused_critical.load(Ordering::Relaxed),
            corrupt_skipped: self.corrupt_skipped.load(Ordering::Relaxed),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, so should a panic ever poison it, the state is
        // still whole.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn create_segment(&self, first_seq: u64) -> Result<Segment, SpoolError> {
        let path = self.dir.join(segment_name(first_seq));
        // Every record on disk has a lower number than `first_seq`, so a file by this name can
        // only be an empty segment whose deletion at open failed: truncating it loses nothing,
        // where refusing would stop every append.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error("create", &path, e))?;
        Ok(Segment {
            path: Arc::from(path.as_path()),
            first_seq,
            file: Arc::new(file),
            offsets: Vec::new(),
            seqs: None,
            len: 0,
            disk_len: 0,
        })
    }
}

impl State {
    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.sealed.iter().chain(self.active.iter())
    }

    /// Records and bytes above the cursor.
    fn pending(&self) -> (u64, u64) {
        let mut records = 0;
        let mut bytes = 0;
        for segment in self.segments() {
            if segment.last_seq() <= self.acked || segment.offsets.is_empty() {
                continue;
            }
            let start = segment.index_after(self.acked);
            records += (segment.offsets.len() - start) as u64;
            bytes += segment.len - segment.offsets[start];
        }
        (records, bytes)
    }

    /// Takes out the sealed segments whose every number is acknowledged. A sealed segment
    /// accounts for the numbers up to the next segment's first, so that records lost to damage
    /// do not keep it forever.
    fn take_acked_segments(&mut self) -> Vec<Segment> {
        let mut removed = Vec::new();
        while let Some(front) = self.sealed.front() {
            let next_first = self
                .sealed
                .get(1)
                .or(self.active.as_ref())
                .map(|next| next.first_seq);
            let covered = next_first.map_or(front.last_seq(), |next| next - 1);
            if covered > self.acked {
                break;
            }
            if let Some(segment) = self.sealed.pop_front() {
                self.disk_bytes -= segment.disk_len;
                removed.push(segment);
            }
        }
        removed
    }
}

/// Fsyncs the spool's files in the background, within about
/// [`SpoolConfig::fsync_interval`] of any append, until `stop` resolves; then syncs once more.
/// Sleeps while nothing is appended. Failures are logged and retried after the interval.
pub async fn run_syncer(spool: Arc<Spool>, stop: impl Future<Output = ()>) {
    let interval = spool.config.fsync_interval;
    let mut appended = spool.subscribe();
    tokio::pin!(stop);
    let mut retry = false;
    loop {
        if !retry {
            tokio::select! {
                _ = &mut stop => break,
                changed = appended.changed() => if changed.is_err() { break },
            }
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(interval) => {}
        }
        // Whatever is appended from here on is left for the next round.
        appended.borrow_and_update();
        retry = !sync_in_background(&spool).await;
    }
    sync_in_background(&spool).await;
}

/// Runs [`Spool::sync`] on the blocking pool (an fsync can take long); logs a failure.
async fn sync_in_background(spool: &Arc<Spool>) -> bool {
    let spool = spool.clone();
    match tokio::task::spawn_blocking(move || spool.sync()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "event spool fsync failed; retrying");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "event spool fsync task failed; retrying");
            false
        }
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The first sequence number in a segment file's name, if it is one.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&seq| seq > 0 && seq <= MAX_SEQ)
}

/// The segments in `dir`, oldest first. Other files are left alone.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error("list", dir, e))? {
        let entry = entry.map_err(|e| io_error("list", dir, e))?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push((seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_error("open", &path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(SpoolError::Locked { path }),
        Err((_, errno)) => Err(io_error("lock", &path, io::Error::from(errno))),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("fsync", dir, e))
}

/// The cursor from disk; zero (and why) if the file is unreadable as a cursor.
fn read_cursor(dir: &Path) -> Result<(u64, Option<String>), SpoolError> {
    let path = dir.join(CURSOR_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(io_error("read", &path, e)),
    };
    let cursor = (bytes.len() == CURSOR_LEN && bytes[..4] == *CURSOR_MAGIC)
        .then(|| {
            let value = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
            let crc = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
            (crc32c(&[&bytes[..12]]) == crc && value <= MAX_SEQ).then_some(value)
        })
        .flatten();
    Ok(match cursor {
        Some(value) => (value, None),
        None => (
            0,
            Some(format!(
                "{} is not a valid cursor ({} bytes)",
                path.display(),
                bytes.len()
            )),
        ),
    })
}

/// Replaces the cursor file atomically and durably.
fn write_cursor(dir: &Path, acked: u64) -> Result<(), SpoolError> {
    let mut bytes = [0u8; CURSOR_LEN];
    bytes[..4].copy_from_slice(CURSOR_MAGIC);
    bytes[4..12].copy_from_slice(&acked.to_le_bytes());
    let crc = crc32c(&[&bytes[..12]]);
    bytes[12..].copy_from_slice(&crc.to_le_bytes());
    let path = dir.join(CURSOR_FILE);
    crate::durable::write_atomically(&path, &bytes, 0o600)
        .map_err(|e| io_error("replace", &path, e))
}

/// Encodes a record into `buf` (cleared first).
fn encode_record(buf: &mut Vec<u8>, class: Class, seq: u64, payload: &[u8]) {
    buf.clear();
    buf.push(RECORD_MAGIC);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(class.to_byte());
    let crc = crc32c(&[&buf[..CHECKED_HEADER], payload]);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// A header's fields, unchecked.
struct Header {
    magic: u8,
    len: u32,
    seq: u64,
    class: u8,
    crc: u32,
}

impl Header {
    fn parse(bytes: &[u8; HEADER_LEN]) -> Header {
        let [
            magic,
            l0,
            l1,
            l2,
            l3,
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            class,
            c0,
            c1,
            c2,
            c3,
        ] = *bytes;
        Header {
            magic,
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            seq: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            class,
            crc: u32::from_le_bytes([c0, c1, c2, c3]),
        }
    }
}

/// Checks one whole record, read back for upload, against the number the index gives it. The
/// bytes may run on past the record (into a damaged stretch recovery skipped), never short.
fn decode_record(record: &[u8], seq: u64) -> Option<(Class, &[u8])> {
    let (header_bytes, rest) = record.split_first_chunk::<HEADER_LEN>()?;
    let header = Header::parse(header_bytes);
    let payload = rest.get(..header.len as usize)?;
    let valid = header.magic == RECORD_MAGIC
        && header.seq == seq
        && crc32c(&[&header_bytes[..CHECKED_HEADER], payload]) == header.crc;
    if !valid {
        return None;
    }
    Some((Class::from_byte(header.class)?, payload))
}

/// What reading a segment at open found.
struct Scan {
    /// Where each intact record starts.
    offsets: Vec<u64>,
    /// Their numbers, if damage made them jump; see [`Segment::seqs`].
    seqs: Option<Vec<u64>>,
    /// The end of the last intact record.
    good_len: u64,
    file_len: u64,
    /// Damaged stretches, in file order (`path` left empty, `lost_records` unknown for one at
    /// the end of the file, `truncated` false: the caller knows the rest).
    damaged: Vec<DamagedRange>,
    /// Intact records found after a damaged stretch.
    recovered_after_damage: u64,
}

/// A file read through a window of its bytes, so that recovery can look at every offset of a
/// damaged stretch without a system call per byte.
struct Window<'a> {
    file: &'a File,
    file_len: u64,
    /// The file offset of `buf[0]`.
    start: u64,
    buf: Vec<u8>,
}

impl<'a> Window<'a> {
    /// Bytes read at once (more when one record needs more).
    const SIZE: usize = 256 << 10;

    fn new(file: &'a File, file_len: u64) -> Self {
        Window {
            file,
            file_len,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// `len` bytes at `offset`; the caller has checked that they are within the file.
    fn get(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let end = offset + len as u64;
        if offset < self.start || end > self.start + self.buf.len() as u64 {
            let size = (len.max(Self::SIZE) as u64).min(self.file_len - offset) as usize;
            self.buf.resize(size, 0);
            self.file.read_exact_at(&mut self.buf, offset)?;
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        Ok(&self.buf[from..from + len])
    }
}

/// Checks the record at `pos` (with `pos < file_len`) in everything but its sequence number:
/// its header, or what is wrong with it.
fn check_record(window: &mut Window<'_>, pos: u64) -> io::Result<Result<Header, Damage>> {
    let left = window.file_len - pos;
    if left < HEADER_LEN as u64 {
        return Ok(Err(Damage::ShortHeader));
    }
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes.copy_from_slice(window.get(pos, HEADER_LEN)?);
    let header = Header::parse(&header_bytes);
    if header.magic != RECORD_MAGIC {
        return Ok(Err(Damage::BadMagic(header.magic)));
    }
    if header.len as usize > MAX_PAYLOAD {
        return Ok(Err(Damage::BadLength(header.len)));
    }
    if left - (HEADER_LEN as u64) < u64::from(header.len) {
        return Ok(Err(Damage::ShortPayload {
            expected: header.len,
        }));
    }
    let payload = window.get(pos + HEADER_LEN as u64, header.len as usize)?;
    if crc32c(&[&header_bytes[..CHECKED_HEADER], payload]) != header.crc {
        return Ok(Err(Damage::ChecksumMismatch));
    }
    if Class::from_byte(header.class).is_none() {
        return Ok(Err(Damage::BadClass(header.class)));
    }
    Ok(Ok(header))
}

/// Whether an intact record numbered `seq`, found `skipped` bytes after a damaged stretch began,
/// can be an honest one: due at least, at most one number further per [`HEADER_LEN`] bytes
/// skipped (every lost record took that much), and below the next segment's first number.
fn plausible_seq(seq: u64, due: u64, skipped: u64, limit_seq: Option<u64>) -> bool {
    seq >= due && seq - due <= skipped / HEADER_LEN as u64 && below(seq, limit_seq)
}

/// Whether `seq` is below the next segment's first number, and leaves a number for the next
/// record (no honest spool gets near 2^64 records; a crafted one must not overflow).
fn below(seq: u64, limit_seq: Option<u64>) -> bool {
    seq < limit_seq.unwrap_or(u64::MAX)
}

/// The first intact record at or after `from` whose number fits a damaged stretch that began at
/// `damage_at` where `due` was the next number (see the module documentation).
fn resynchronise(
    window: &mut Window<'_>,
    from: u64,
    damage_at: u64,
    due: u64,
    limit_seq: Option<u64>,
) -> io::Result<Option<(u64, Header)>> {
    let mut candidate = from;
    while candidate + HEADER_LEN as u64 <= window.file_len {
        let span = ((window.file_len - candidate) as usize).min(Window::SIZE);
        let bytes = window.get(candidate, span)?;
        let Some(at) = bytes.iter().position(|&b| b == RECORD_MAGIC) else {
            candidate += span as u64;
            continue;
        };
        candidate += at as u64;
        if candidate + HEADER_LEN as u64 > window.file_len {
            break;
        }
        if let Ok(header) = check_record(window, candidate)?
            && plausible_seq(header.seq, due, candidate - damage_at, limit_seq)
        {
            return Ok(Some((candidate, header)));
        }
        candidate += 1;
    }
    Ok(None)
}

/// Reads a segment record by record, skipping damaged stretches (see the module
/// documentation). `limit_seq` is the next segment's first number: no record here may reach
/// it. Never panics, whatever the file holds.
fn scan_segment(file: &File, first_seq: u64, limit_seq: Option<u64>) -> io::Result<Scan> {
    let file_len = file.metadata()?.len();
    let mut window = Window::new(file, file_len);
    let mut offsets = Vec::new();
    let mut seqs = Vec::new();
    let mut jumped = false;
    let mut damaged = Vec::new();
    let mut recovered_after_damage = 0;
    let mut pos = 0u64;
    let mut good_len = 0u64;
    let mut expected = first_seq;
    while pos < file_len {
        let damage = match check_record(&mut window, pos)? {
            Ok(header) if header.seq == expected && below(header.seq, limit_seq) => {
                offsets.push(pos);
                seqs.push(header.seq);
                if !damaged.is_empty() {
                    recovered_after_damage += 1;
                }
                pos += (HEADER_LEN as u64) + u64::from(header.len);
                good_len = pos;
                expected += 1;
                continue;
            }
            Ok(header) => Damage::BadSequence {
                found: header.seq,
                expected,
            },
            Err(damage) => damage,
        };
        let next = resynchronise(&mut window, pos + 1, pos, expected, limit_seq)?;
        let end = next.as_ref().map_or(file_len, |(at, _)| *at);
        let lost_records = next.as_ref().map(|(_, header)| header.seq - expected);
        damaged.push(DamagedRange {
            path: PathBuf::new(),
            damage,
            offset: pos,
            lost_bytes: end - pos,
            first_lost_seq: expected,
            lost_records,
            lost_record: lost_record(&mut window, pos, end, lost_records)?,
            truncated: false,
        });
        match next {
            Some((at, header)) => {
                jumped |= header.seq != expected;
                expected = header.seq;
                pos = at;
            }
            None => break,
        }
    }
    Ok(Scan {
        offsets,
        seqs: jumped.then_some(seqs),
        good_len,
        file_len,
        damaged,
        recovered_after_damage,
    })
}

/// The one record lost between `start` and `end`, as its header describes it, if the header's
/// length runs exactly to `end`.
fn lost_record(
    window: &mut Window<'_>,
    start: u64,
    end: u64,
    lost_records: Option<u64>,
) -> io::Result<Option<LostRecord>> {
    if lost_records != Some(1) || end - start < HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes.copy_from_slice(window.get(start, HEADER_LEN)?);
    let header = Header::parse(&header_bytes);
    if header.magic != RECORD_MAGIC || u64::from(header.len) != end - start - HEADER_LEN as u64 {
        return Ok(None);
    }
    Ok(Some(LostRecord {
        class: Class::from_byte(header.class),
        payload: window
            .get(start + HEADER_LEN as u64, header.len as usize)?
            .to_vec(),
    }))
}

/// CRC-32C (Castagnoli) over the concatenation of `parts`.
///
/// The checksum is there to catch torn writes and media errors, not tampering: whoever can write
/// the 0700 directory can write well-formed records anyway, so a cryptographic digest would add
/// cost and nothing else. CRC-32C catches every burst error up to 32 bits and any other damage
/// but for one chance in 2^32; it is the checksum file systems and storage protocols use for the
/// same job, and a table of 256 words is all it takes, so it needs no extra crate. At a few
/// hundred bytes per record the byte-wise table is far from being the bottleneck.
fn crc32c(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in parts {
        for &byte in *part {
            crc = CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

/// The reflected CRC-32C polynomial.
const CRC32C_POLY: u32 = 0x82F6_3B78;

static CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn small_segments() -> SpoolConfig {
        SpoolConfig {
            segment_bytes: 256,
            ..SpoolConfig::default()
        }
    }

    fn open(dir: &Path, config: SpoolConfig) -> (Spool, Recovery) {
        Spool::open(dir, config).unwrap()
    }

    fn read_all(spool: &Spool) -> Vec<(u64, Class, Vec<u8>)> {
        spool.read_unacked(0, usize::MAX, usize::MAX).unwrap()
    }

    fn seqs(records: &[(u64, Class, Vec<u8>)]) -> Vec<u64> {
        records.iter().map(|r| r.0).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, path)| path)
            .collect()
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("event {i} {}", "x".repeat((i % 7) as usize * 5)).into_bytes()
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
        assert_eq!(crc32c(&[b"1234", b"56789"]), 0xE306_9283);
    }

    #[test]
    fn records_survive_restarts_and_acknowledged_ones_do_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, recovery) = open(dir.path(), SpoolConfig::default());
            assert!(recovery.is_clean());
            for i in 1..=5 {
                let class = if i % 2 == 0 {
                    Class::Droppable
                } else {
                    Class::Critical
                };
                assert_eq!(spool.append(class, &payload(i)).unwrap(), i);
            }
            let records = read_all(&spool);
            assert_eq!(seqs(&records), [1, 2, 3, 4, 5]);
            assert_eq!(records[1].1, Class::Droppable);
            assert_eq!(records[2].2, payload(3));
            spool.ack(2).unwrap();
            assert_eq!(spool.acked(), 2);
        }
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let (spool, recovery) = open(dir.path(), SpoolConfig::default());
        assert!(recovery.is_clean(), "{recovery}");
        assert_eq!(recovery.acked, 2);
        assert_eq!(recovery.pending_records, 3);
        assert_eq!(spool.acked(), 2);
        let records = read_all(&spool);
        assert_eq!(seqs(&records), [3, 4, 5]);
        assert_eq!(records[0].2, payload(3));
        assert_eq!(records[0].1, Class::Critical);
        assert_eq!(spool.append(Class::Critical, b"after restart").unwrap(), 6);
        let stats = spool.stats();
        assert_eq!(stats.last_seq, 6);
        assert_eq!(stats.pending_records, 4);
        drop(spool);

        let (spool, _) = open(dir.path(), SpoolConfig::default());
        assert_eq!(seqs(&read_all(&spool)), [3, 4, 5, 6]);
        assert_eq!(spool.append(Class::Critical, b"again").unwrap(), 7);
    }

    #[test]
    fn reads_stop_at_the_limits_but_always_return_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), small_segments());
        for i in 1..=20 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        assert!(spool.stats().segments > 3);
        assert_eq!(
            seqs(&spool.read_unacked(0, 4, usize::MAX).unwrap()),
            [1, 2, 3, 4]
        );
        assert_eq!(
            seqs(&spool.read_unacked(4, 3, usize::MAX).unwrap()),
            [5, 6, 7]
        );
        assert_eq!(
            seqs(&spool.read_unacked(18, 10, usize::MAX).unwrap()),
            [19, 20]
        );
        assert!(spool.read_unacked(20, 10, usize::MAX).unwrap().is_empty());
        assert!(spool.read_unacked(0, 0, usize::MAX).unwrap().is_empty());
        // A byte limit smaller than one record still returns that record.
        assert_eq!(seqs(&spool.read_unacked(0, 10, 1).unwrap()), [1]);
        let bytes = payload(1).len() + payload(2).len();
        assert_eq!(seqs(&spool.read_unacked(0, 10, bytes).unwrap()), [1, 2]);
        // Acknowledged records are never returned, whatever the caller asks for.
        spool.ack(10).unwrap();
        assert_eq!(
            seqs(&spool.read_unacked(3, 2, usize::MAX).unwrap()),
            [11, 12]
        );
        let all: Vec<u64> = (11..=20).collect();
        assert_eq!(seqs(&read_all(&spool)), all);
    }

    #[test]
    fn a_tail_cut_anywhere_in_the_last_record_keeps_the_good_prefix() {
        let pristine = tempfile::tempdir().unwrap();
        let (spool, _) = open(pristine.path(), SpoolConfig::default());
        for i in 1..=3 {
            spool.append(Class::Critical, &payload(i + 10)).unwrap();
        }
        drop(spool);
        let [segment] = segment_files(pristine.path()).try_into().unwrap();
        let name = segment.file_name().unwrap().to_owned();
        let bytes = fs::read(&segment).unwrap();
        let last_len = HEADER_LEN + payload(13).len();
        let last_start = bytes.len() - last_len;

        for cut in last_start..bytes.len() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(&name);
            fs::write(&path, &bytes[..cut]).unwrap();
            let (spool, recovery) = open(dir.path(), SpoolConfig::default());
            if cut == last_start {
                assert!(recovery.is_clean(), "cut at {cut}: {recovery}");
            } else {
                assert_eq!(recovery.damaged.len(), 1, "cut at {cut}");
                let damaged = &recovery.damaged[0];
                assert_eq!(
                    damaged.lost_bytes,
                    (cut - last_start) as u64,
                    "cut at {cut}"
                );
                assert_eq!(damaged.offset, last_start as u64);
                assert_eq!(damaged.first_lost_seq, 3);
                assert_eq!(damaged.lost_records, None);
                assert!(damaged.truncated);
                assert!(recovery.lost_bytes() > 0);
            }
            assert_eq!(fs::metadata(&path).unwrap().len(), last_start as u64);
            assert_eq!(seqs(&read_all(&spool)), [1, 2]);
            assert_eq!(spool.append(Class::Critical, b"new").unwrap(), 3);
            drop(spool);

            let (spool, recovery) = open(dir.path(), SpoolConfig::default());
            assert!(recovery.is_clean(), "cut at {cut}: {recovery}");
            let records = read_all(&spool);
            assert_eq!(seqs(&records), [1, 2, 3]);
            assert_eq!(records[2].2, b"new");
        }
    }

    #[test]
    fn a_flipped_payload_byte_costs_that_record_only() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        for i in 1..=3 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        drop(spool);
        let [segment] = segment_files(dir.path()).try_into().unwrap();
        let mut bytes = fs::read(&segment).unwrap();
        let second = HEADER_LEN + payload(1).len();
        bytes[second + HEADER_LEN + 2] ^= 0x01;
        fs::write(&segment, &bytes).unwrap();

        let (spool, recovery) = open(dir.path(), SpoolConfig::default());
        assert_eq!(recovery.damaged.len(), 1);
        let damaged = &recovery.damaged[0];
        assert_eq!(damaged.damage, Damage::ChecksumMismatch);
        assert_eq!(damaged.offset, second as u64);
        assert_eq!(damaged.lost_bytes, (HEADER_LEN + payload(2).len()) as u64);
        assert_eq!((damaged.first_lost_seq, damaged.lost_records), (2, Some(1)));
        assert!(!damaged.truncated);
        let lost = damaged
            .lost_record
            .as_ref()
            .expect("the header still tells");
        assert_eq!(lost.class, Some(Class::Critical));
        assert_eq!(lost.payload.len(), payload(2).len());
        assert_eq!(recovery.recovered_after_damage, 1);
        assert_eq!(recovery.lost_records(), 1);
        let records = read_all(&spool);
        assert_eq!(seqs(&records), [1, 3]);
        assert_eq!(records[1].2, payload(3));
        assert_eq!(spool.append(Class::Critical, b"four").unwrap(), 4);
        drop(spool);
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        assert_eq!(seqs(&read_all(&spool)), [1, 3, 4]);
    }

    /// A pristine spool of `count` records over several segments, as file names and bytes, and
    /// each record's segment index, offset, length and payload.
    fn pristine(count: u64, config: &SpoolConfig) -> (Vec<(PathBuf, Vec<u8>)>, Vec<Placed>) {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), config.clone());
        for i in 1..=count {
            let class = if i % 3 == 0 {
                Class::Droppable
            } else {
                Class::Critical
            };
            spool.append(class, &payload(i)).unwrap();
        }
        drop(spool);
        let files: Vec<(PathBuf, Vec<u8>)> = segment_files(dir.path())
            .into_iter()
            .map(|path| {
                (
                    PathBuf::from(path.file_name().unwrap()),
                    fs::read(&path).unwrap(),
                )
            })
            .collect();
        let mut placed = Vec::new();
        let mut seq = 1;
        for (segment, (_, bytes)) in files.iter().enumerate() {
            let mut offset = 0;
            while offset < bytes.len() {
                let len = HEADER_LEN + payload(seq).len();
                placed.push(Placed {
                    seq,
                    segment,
                    offset,
                    len,
                });
                offset += len;
                seq += 1;
            }
        }
        assert_eq!(seq, count + 1);
        (files, placed)
    }

    struct Placed {
        seq: u64,
        segment: usize,
        offset: usize,
        len: usize,
    }

    /// Writes `files` with the bytes at `flips` (segment, offset, xor mask) changed into a new
    /// directory, opens it, and checks that exactly the records with no changed byte come back,
    /// each with its payload. Returns the recovery report.
    fn open_damaged(
        files: &[(PathBuf, Vec<u8>)],
        placed: &[Placed],
        flips: &[(usize, usize, u8)],
        config: &SpoolConfig,
    ) -> Recovery {
        let dir = tempfile::tempdir().unwrap();
        for (segment, (name, bytes)) in files.iter().enumerate() {
            let mut bytes = bytes.clone();
            for &(s, offset, mask) in flips {
                if s == segment {
                    bytes[offset] ^= mask;
                }
            }
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        let (spool, recovery) = open(dir.path(), config.clone());
        let touched = |p: &Placed| {
            flips
                .iter()
                .any(|&(s, o, _)| s == p.segment && (p.offset..p.offset + p.len).contains(&o))
        };
        let want: Vec<u64> = placed
            .iter()
            .filter(|p| !touched(p))
            .map(|p| p.seq)
            .collect();
        let records = read_all(&spool);
        assert_eq!(seqs(&records), want, "flips {flips:?}: {recovery}");
        for (seq, _, body) in &records {
            assert_eq!(*body, payload(*seq), "record {seq}, flips {flips:?}");
        }
        let lost = placed.len() - want.len();
        let last_touched = placed.last().is_some_and(touched);
        if !last_touched {
            assert_eq!(
                recovery.lost_records(),
                lost as u64,
                "flips {flips:?}: {recovery}"
            );
        }
        let last = placed.len() as u64;
        let next = spool.append(Class::Critical, b"after").unwrap();
        assert!(next > *want.last().unwrap_or(&0) && next <= last + 1);
        recovery
    }

    #[test]
    fn any_one_flipped_byte_costs_only_its_own_record() {
        let config = SpoolConfig {
            segment_bytes: 400,
            ..SpoolConfig::default()
        };
        let (files, placed) = pristine(16, &config);
        assert!(files.len() >= 2, "several segments");
        for (segment, (_, bytes)) in files.iter().enumerate() {
            for offset in 0..bytes.len() {
                for mask in [0x01, 0xff] {
                    open_damaged(&files, &placed, &[(segment, offset, mask)], &config);
                }
            }
        }
    }

    #[test]
    fn one_flipped_byte_in_the_middle_of_846_records_costs_one() {
        // The case that used to lose everything after the damage: 423 of 846 records here.
        let config = SpoolConfig::default();
        let (files, placed) = pristine(846, &config);
        assert_eq!(files.len(), 1);
        let middle = &placed[422];
        let recovery = open_damaged(
            &files,
            &placed,
            &[(0, middle.offset + HEADER_LEN + 3, 0x04)],
            &config,
        );
        assert_eq!(recovery.lost_records(), 1);
        assert_eq!(recovery.recovered_after_damage, 846 - 423);
    }

    #[test]
    fn many_flipped_bytes_cost_only_the_records_they_hit() {
        let config = SpoolConfig {
            segment_bytes: 2048,
            ..SpoolConfig::default()
        };
        let (files, placed) = pristine(120, &config);
        let mut random = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        for round in 0..300 {
            let count = 1 + round % 12;
            let flips: Vec<(usize, usize, u8)> = (0..count)
                .map(|_| {
                    let segment = next() as usize % files.len();
                    let offset = next() as usize % files[segment].1.len();
                    (segment, offset, (next() % 255 + 1) as u8)
                })
                .collect();
            open_damaged(&files, &placed, &flips, &config);
        }
    }

    #[test]
    fn recovery_never_takes_a_record_inside_another_ones_payload() {
        // Record 2's payload holds a well-formed record numbered 3; the damage is in record 1.
        let dir = tempfile::tempdir().unwrap();
        let mut inner = Vec::new();
        encode_record(&mut inner, Class::Critical, 3, b"forged");
        {
            let (spool, _) = open(dir.path(), SpoolConfig::default());
            spool.append(Class::Critical, b"first").unwrap();
            spool.append(Class::Critical, &inner).unwrap();
            spool.append(Class::Critical, b"third").unwrap();
        }
        let [segment] = segment_files(dir.path()).try_into().unwrap();
        let mut bytes = fs::read(&segment).unwrap();
        bytes[HEADER_LEN] ^= 0x20;
        fs::write(&segment, &bytes).unwrap();

        let (spool, recovery) = open(dir.path(), SpoolConfig::default());
        let records = read_all(&spool);
        assert_eq!(seqs(&records), [2, 3], "{recovery}");
        assert_eq!(records[0].2, inner);
        assert_eq!(records[1].2, b"third");
    }

    #[test]
    fn any_file_is_recovered_from_without_a_panic() {
        let mut random = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        for round in 0..200u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = Vec::new();
            let mut record = Vec::new();
            let pieces = next() % 20;
            for _ in 0..pieces {
                match next() % 4 {
                    // A well-formed record with any number, class byte or length.
                    0 => {
                        let body: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
                        let class = if next() % 2 == 0 {
                            Class::Critical
                        } else {
                            Class::Droppable
                        };
                        let seq = [1, 2, next(), u64::MAX][(next() % 4) as usize];
                        encode_record(&mut record, class, seq, &body);
                        bytes.extend_from_slice(&record);
                    }
                    1 => bytes.extend((0..next() % 64).map(|_| next() as u8)),
                    2 => bytes.push(RECORD_MAGIC),
                    _ => bytes.extend_from_slice(&(next() as u32).to_le_bytes()),
                }
            }
            let first = [1, u64::MAX, 1 + next() % 1000][(round % 3) as usize];
            fs::write(dir.path().join(segment_name(first)), &bytes).unwrap();
            if round % 2 == 0 {
                fs::write(dir.path().join(segment_name(first / 2 + 1)), &bytes).unwrap();
            }
            if let Ok((spool, _)) = Spool::open(dir.path(), SpoolConfig::default()) {
                let _ = spool.read_unacked(0, usize::MAX, usize::MAX);
                let _ = spool.stats();
            }
        }
    }

    #[test]
    fn zeros_or_an_impossible_length_after_the_last_record_are_cut_off() {
        let mut huge_length = vec![RECORD_MAGIC];
        huge_length.extend_from_slice(&u32::MAX.to_le_bytes());
        huge_length.extend_from_slice(&[0u8; 40]);
        let cases = [
            (vec![0u8; 4096], Damage::BadMagic(0)),
            (huge_length, Damage::BadLength(u32::MAX)),
        ];
        for (tail, damage) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _) = open(dir.path(), SpoolConfig::default());
            spool.append(Class::Critical, b"one").unwrap();
            spool.append(Class::Critical, b"two").unwrap();
            drop(spool);
            let [segment] = segment_files(dir.path()).try_into().unwrap();
            let good = fs::metadata(&segment).unwrap().len();
            let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
            io::Write::write_all(&mut file, &tail).unwrap();
            drop(file);

            let (spool, recovery) = open(dir.path(), SpoolConfig::default());
            assert_eq!(recovery.damaged.len(), 1);
            assert_eq!(recovery.damaged[0].damage, damage);
            assert_eq!(recovery.lost_bytes(), tail.len() as u64);
            assert_eq!(fs::metadata(&segment).unwrap().len(), good);
            assert_eq!(seqs(&read_all(&spool)), [1, 2]);
            assert_eq!(spool.append(Class::Critical, b"three").unwrap(), 3);
        }
    }

    #[test]
    fn a_record_damaged_after_open_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        for i in 1..=3 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        let [segment] = segment_files(dir.path()).try_into().unwrap();
        let offset = (HEADER_LEN + payload(1).len() + HEADER_LEN) as u64;
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.write_all_at(b"?", offset).unwrap();

        assert_eq!(seqs(&read_all(&spool)), [1, 3]);
        assert_eq!(spool.stats().corrupt_skipped, 1);
    }

    #[test]
    fn damage_in_an_older_segment_costs_the_damaged_record_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            segment_bytes: 3 * (HEADER_LEN as u64 + 8),
            ..SpoolConfig::default()
        };
        let (spool, _) = open(dir.path(), config.clone());
        for i in 1..=9u64 {
            spool.append(Class::Critical, &i.to_le_bytes()).unwrap();
        }
        drop(spool);
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 3);
        let mut middle = fs::read(&files[1]).unwrap();
        let middle_len = middle.len() as u64;
        middle[HEADER_LEN + 8 + 6] ^= 0x80; // the sequence number of record 5
        fs::write(&files[1], &middle).unwrap();

        for _ in 0..2 {
            let (spool, recovery) = open(dir.path(), config.clone());
            assert_eq!(recovery.damaged.len(), 1, "{recovery}");
            let damaged = &recovery.damaged[0];
            assert_eq!(damaged.path, files[1]);
            assert_eq!(damaged.offset, HEADER_LEN as u64 + 8);
            assert_eq!(damaged.first_lost_seq, 5);
            assert_eq!(damaged.lost_records, Some(1));
            assert!(!damaged.truncated);
            assert_eq!(fs::metadata(&files[1]).unwrap().len(), middle_len);
            assert_eq!(seqs(&read_all(&spool)), [1, 2, 3, 4, 6, 7, 8, 9]);
            assert_eq!(spool.stats().pending_records, 8);
            assert_eq!(spool.read_unacked(4, 1, usize::MAX).unwrap()[0].0, 6);
        }

        let (spool, _) = open(dir.path(), config.clone());
        assert_eq!(spool.append(Class::Critical, b"ten").unwrap(), 10);
        spool.ack(5).unwrap();
        assert_eq!(seqs(&read_all(&spool)), [6, 7, 8, 9, 10]);
        assert_eq!(spool.stats().pending_records, 5);
        spool.ack(7).unwrap();
        assert!(
            !files[1].exists(),
            "the damaged segment goes once acknowledged past"
        );
        drop(spool);
        let (spool, recovery) = open(dir.path(), config);
        assert!(recovery.is_clean(), "{recovery}");
        assert_eq!(seqs(&read_all(&spool)), [8, 9, 10]);
    }

    #[test]
    fn damage_in_the_middle_of_the_newest_segment_keeps_it_taking_records() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        for i in 1..=6 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        drop(spool);
        let [segment] = segment_files(dir.path()).try_into().unwrap();
        let mut bytes = fs::read(&segment).unwrap();
        let len = bytes.len() as u64;
        let third = HEADER_LEN * 2 + payload(1).len() + payload(2).len();
        bytes[third + 1] ^= 0x40; // the length of record 3
        fs::write(&segment, &bytes).unwrap();

        let (spool, recovery) = open(dir.path(), SpoolConfig::default());
        assert_eq!(recovery.damaged[0].lost_records, Some(1), "{recovery}");
        assert_eq!(recovery.recovered_after_damage, 3);
        assert_eq!(fs::metadata(&segment).unwrap().len(), len, "nothing cut");
        assert_eq!(spool.append(Class::Critical, b"seven").unwrap(), 7);
        assert_eq!(
            segment_files(dir.path()).len(),
            1,
            "the same segment goes on"
        );
        assert_eq!(seqs(&read_all(&spool)), [1, 2, 4, 5, 6, 7]);
        spool.ack(4).unwrap();
        assert_eq!(spool.stats().pending_records, 3);
        drop(spool);
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        assert_eq!(seqs(&read_all(&spool)), [5, 6, 7]);
    }

    #[test]
    fn fully_acknowledged_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let config = small_segments();
        let (spool, _) = open(dir.path(), config.clone());
        for i in 1..=40 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        let before = segment_files(dir.path());
        assert!(before.len() >= 5);
        let disk_before = spool.stats().disk_bytes;

        spool.ack(20).unwrap();
        let after = segment_files(dir.path());
        assert!(after.len() < before.len());
        // What is left starts with the segment holding record 21 (or the one just before it).
        let first_left = list_segments(dir.path()).unwrap()[0].0;
        assert!(first_left <= 21);
        let next_after_first = list_segments(dir.path()).unwrap()[1].0;
        assert!(next_after_first > 21);
        assert!(spool.stats().disk_bytes < disk_before);
        assert_eq!(seqs(&read_all(&spool))[0], 21);

        spool.ack(40).unwrap();
        assert_eq!(
            segment_files(dir.path()).len(),
            1,
            "only the newest segment stays"
        );
        let stats = spool.stats();
        assert_eq!(stats.pending_records, 0);
        assert_eq!(stats.pending_bytes, 0);
        assert_eq!(stats.segments, 1);
        drop(spool);

        let (spool, recovery) = open(dir.path(), config);
        assert!(recovery.is_clean());
        assert_eq!(recovery.pending_records, 0);
        assert!(read_all(&spool).is_empty());
        assert_eq!(spool.append(Class::Critical, b"next").unwrap(), 41);
    }

    #[test]
    fn segments_acknowledged_before_a_crash_are_deleted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), small_segments());
        for i in 1..=30 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        drop(spool);
        let before = segment_files(dir.path()).len();
        // The cursor made it to disk, the deletions did not.
        write_cursor(dir.path(), 30).unwrap();

        let (spool, recovery) = open(dir.path(), small_segments());
        assert_eq!(recovery.removed_segments, before - 1);
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert!(read_all(&spool).is_empty());
        assert_eq!(spool.append(Class::Critical, b"next").unwrap(), 31);
    }

    #[test]
    fn a_full_spool_drops_droppable_records_and_keeps_a_reserve_for_critical_ones() {
        let dir = tempfile::tempdir().unwrap();
        let record = (HEADER_LEN + 100) as u64;
        let config = SpoolConfig {
            segment_bytes: 2 * record,
            max_bytes: 8 * record + 10,
            critical_reserve_bytes: 3 * record,
            ..SpoolConfig::default()
        };
        let (spool, _) = open(dir.path(), config);
        let body = [7u8; 100];
        for _ in 0..8 {
            spool.append(Class::Droppable, &body).unwrap();
        }
        match spool.append(Class::Droppable, &body) {
            Err(SpoolError::Full {
                dropped_class: Class::Droppable,
                used,
                ..
            }) => assert_eq!(used, 8 * record),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(spool.stats().dropped_droppable, 1);

        for _ in 0..3 {
            spool.append(Class::Critical, &body).unwrap();
        }
        match spool.append(Class::Critical, &body) {
            Err(
                e @ SpoolError::Full {
                    dropped_class: Class::Critical,
                    ..
                },
            ) => assert!(e.to_string().contains(&dir.path().display().to_string())),
            other => panic!("expected Full, got {other:?}"),
        }
        assert!(spool.append(Class::Droppable, &body).is_err());
        let stats = spool.stats();
        assert_eq!(stats.dropped_droppable, 2);
        assert_eq!(stats.refused_critical, 1);
        assert_eq!(stats.last_seq, 11);
        assert_eq!(stats.disk_bytes, 11 * record);

        // Acknowledgements free the space again.
        spool.ack(11).unwrap();
        assert_eq!(spool.append(Class::Droppable, &body).unwrap(), 12);
        assert_eq!(seqs(&read_all(&spool)), [12]);
    }

    #[test]
    fn concurrent_appends_get_unique_numbers_and_all_can_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            segment_bytes: 8 << 10,
            ..SpoolConfig::default()
        };
        let (spool, _) = open(dir.path(), config.clone());
        let spool = Arc::new(spool);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let spool = spool.clone();
                std::thread::spawn(move || {
                    (0..500)
                        .map(|i| {
                            let body = format!("thread {t} event {i}");
                            (
                                spool.append(Class::Critical, body.as_bytes()).unwrap(),
                                body,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut written: Vec<(u64, String)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        written.sort();
        let numbers: Vec<u64> = written.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(numbers, (1..=4000).collect::<Vec<u64>>());

        let check = |records: Vec<(u64, Class, Vec<u8>)>| {
            assert_eq!(records.len(), written.len());
            for ((seq, _, body), (want_seq, want_body)) in records.iter().zip(&written) {
                assert_eq!(seq, want_seq);
                assert_eq!(body, want_body.as_bytes());
            }
        };
        check(read_all(&spool));
        drop(spool);
        let (spool, recovery) = open(dir.path(), config);
        assert!(recovery.is_clean());
        check(read_all(&spool));
    }

    #[test]
    fn a_cursor_left_half_written_by_a_crash_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        for i in 1..=5 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        spool.ack(3).unwrap();
        drop(spool);
        // A crash after writing the temporary file and before the rename: it even holds a
        // valid, newer cursor, which was never confirmed by the rename.
        let tmp = dir.path().join(CURSOR_TMP);
        fs::copy(dir.path().join(CURSOR_FILE), &tmp).unwrap();
        let mut newer = fs::read(&tmp).unwrap();
        newer[4] = 5;
        let crc = crc32c(&[&newer[..12]]);
        newer[12..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&tmp, &newer).unwrap();

        let (spool, recovery) = open(dir.path(), SpoolConfig::default());
        assert!(recovery.removed_cursor_tmp);
        assert!(recovery.is_clean());
        assert!(!tmp.exists());
        assert_eq!(spool.acked(), 3);
        assert_eq!(seqs(&read_all(&spool)), [4, 5]);
    }

    #[test]
    fn a_damaged_cursor_restarts_from_zero_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        for i in 1..=4 {
            spool.append(Class::Critical, &payload(i)).unwrap();
        }
        spool.ack(2).unwrap();
        drop(spool);
        fs::write(dir.path().join(CURSOR_FILE), b"garbage").unwrap();

        let (spool, recovery) = open(dir.path(), SpoolConfig::default());
        assert!(recovery.cursor_reset.is_some());
        assert!(!recovery.is_clean());
        assert_eq!(spool.acked(), 0);
        assert_eq!(seqs(&read_all(&spool)), [1, 2, 3, 4]);
        assert_eq!(spool.append(Class::Critical, b"x").unwrap(), 5);
    }

    #[test]
    fn subscribers_see_every_append() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        let mut latest = spool.subscribe();
        assert!(!latest.has_changed().unwrap());
        let seq = spool.append(Class::Droppable, b"one").unwrap();
        assert!(latest.has_changed().unwrap());
        assert_eq!(*latest.borrow_and_update(), seq);
        assert!(!latest.has_changed().unwrap());
    }

    #[tokio::test]
    async fn the_syncer_makes_records_durable_before_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        let spool = Arc::new(spool);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let syncer = tokio::spawn(run_syncer(spool.clone(), async move {
            let _ = stop_rx.await;
        }));
        let mut last = 0;
        for i in 1..=10 {
            last = spool.append(Class::Critical, &payload(i)).unwrap();
        }
        stop_tx.send(()).unwrap();
        syncer.await.unwrap();
        assert_eq!(spool.stats().durable_seq, last);

        spool.append(Class::Critical, b"more").unwrap();
        assert_eq!(spool.stats().durable_seq, last);
        spool.sync().unwrap();
        assert_eq!(spool.stats().durable_seq, last + 1);
    }

    #[test]
    fn refusals_name_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = open(dir.path(), SpoolConfig::default());
        spool.append(Class::Critical, b"one").unwrap();
        assert!(matches!(
            spool.ack(2),
            Err(SpoolError::AckBeyondEnd {
                up_to: 2,
                last: 1,
                ..
            })
        ));
        spool.ack(1).unwrap();
        spool.ack(1).unwrap();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let err = spool.append(Class::Critical, &big).unwrap_err();
        assert!(matches!(err, SpoolError::TooLarge { .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        match Spool::open(dir.path(), SpoolConfig::default()) {
            Err(SpoolError::Locked { path }) => assert_eq!(path, dir.path().join(LOCK_FILE)),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(spool);
        assert!(Spool::open(dir.path(), SpoolConfig::default()).is_ok());
    }
}
