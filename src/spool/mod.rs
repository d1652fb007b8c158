//! The spool: a crash-safe, bounded, per-target segment log on disk.
//!
//! One [`Spool`] owns one directory, `<buffer.dir>/<target>/`, and keeps the
//! requests meant for that target while it cannot take them, in the order
//! forkd accepted them. It is a synchronous storage engine: appends are queued
//! to a dedicated writer thread (std::fs, one `fdatasync` per batch), reads are
//! positioned reads on the segment files. Async callers only await completions.
//!
//! # Positions
//!
//! Every frame has a log position (LSN): a byte offset in one endless log made
//! of the data areas of all segments (segment headers are not counted). A
//! segment file is named after the position of its first frame, so a position
//! maps to a file and an offset without any index on disk.
//!
//! # Directory
//!
//! ```text
//! <dir>/lock                      flock(2) held by the one process that writes here
//! <dir>/cursor                    position of the oldest record not yet delivered
//! <dir>/00000000000000000000.seg  segments, named by base position, 20 digits
//! <dir>/00000000000067108864.seg
//! <dir>/rejected/00000000000000000000.rec   records the target refused for good
//! ```
//! Files are created 0600 and directories 0700.
//!
//! # Segment file
//!
//! All integers little-endian.
//!
//! ```text
//! offset size  field
//!      0    8  magic "FORKDSEG"
//!      8    2  format version (1)
//!     10    2  header length (32)
//!     12    4  reserved, zero
//!     16    8  base position (must equal the file name)
//!     24    4  reserved, zero
//!     28    4  CRC-32C of bytes 0..28
//!     32    …  record frames, back to back
//! ```
//!
//! # Record frame
//!
//! ```text
//! offset size  field
//!      0    4  magic "FKR1"
//!      4    4  payload length P
//!      8    4  header CRC: CRC-32C of bytes 0..8
//!     12    4  record CRC: CRC-32C of bytes 0..12 followed by the payload
//!     16    P  payload
//! ```
//!
//! The header CRC makes the length trustworthy on its own, so a damaged payload
//! costs one record and the scan continues right after it. A frame whose
//! header is damaged is skipped by searching forward for the next valid frame.
//!
//! # Payload
//!
//! ```text
//! u64        accepted-at, milliseconds since the Unix epoch
//! u8  + …    method
//! u16 + …    request id (UTF-8)
//! u32 + …    path and query
//! u16        header count N, then N times: u16 + name, u32 + value
//! u32 + …    body (must end exactly at the end of the payload)
//! ```
//!
//! # Cursor
//!
//! The file `cursor` holds the position of the oldest undelivered record
//! (magic `FKCURSR1`, u64, CRC-32C; replaced by temp file + rename + directory
//! fsync). Acknowledgements move the cursor in memory; the writer makes it
//! durable at most `cursor_sync_interval` later and at close. A crash in that
//! window re-delivers the records acknowledged in it (at-least-once). A segment
//! wholly behind the cursor is deleted only after that cursor is durable.
//!
//! # Recovery at open
//!
//! Every segment after the cursor is scanned and every record CRC checked. A
//! torn tail (an incomplete frame or zero fill at the end of the last segment)
//! is truncated: under `fsync = "always"` it was never acknowledged and is not
//! counted; under the other modes it may have been (a power loss within the
//! sync interval), so one record is counted in `dropped_corrupt`. A damaged
//! record anywhere is skipped and counted; a segment that cannot be read or
//! has a bad header is skipped with a warning; temp files are removed;
//! segments wholly behind the cursor are deleted. Frames whose `fdatasync`
//! failed are not there to be found: the writer cut them off before their
//! callers got the error (`writer`), unless the cut failed and the process
//! stopped before a retry succeeded.
//!
//! # Bounds and admission
//!
//! `max_size` bounds the bytes of unacknowledged records, framing included,
//! plus outstanding reservations. The daemon reserves a record's size before
//! it forwards anything ([`Spool::try_reserve`]); `when_full` decides a
//! reservation that does not fit. Appends after admission may overcommit
//! ([`Spool::reserve_overcommit`]) by at most what is in flight. Segments are
//! at most a quarter of `max_size` (and never under 64 KiB), so the disk
//! holds at most about `max_size` plus one segment.

mod cursor;
mod format;
mod fsutil;
pub mod inspect;
mod rejected;
mod scan;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::{oneshot, watch};

pub use format::{DecodeError, Record, truncate_to_millis};
pub use rejected::RejectedStats;

use format::SEGMENT_HEADER_LEN;
use fsutil::DirLock;
use writer::{Active, Append, Cmd, Writer};

/// The pure decoding functions of the on-disk format, for fuzzing and
/// property tests: they take bytes and touch no file. Not a stable API.
#[doc(hidden)]
pub mod fuzzing;

/// Smallest segment the spool will make when it shrinks segments to fit a small `max_size`.
pub const MIN_SEGMENT_SIZE: u64 = 64 << 10;
/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// When appended records are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// An append completes after an `fdatasync` covering it (group commit).
    Always,
    /// Never fsync while running (the OS writes back); sync at clean close.
    Never,
    /// Appends complete after `write`; data is synced at most this long after.
    Interval(Duration),
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => match humantime::parse_duration(other) {
                Ok(d) if !d.is_zero() => Ok(FsyncPolicy::Interval(d)),
                Ok(_) => Err("an fsync interval must be above zero".into()),
                Err(_) => Err(format!(
                    "expected \"always\", \"never\" or an interval such as \"100ms\", got {other:?}"
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for FsyncPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What happens to a reservation that does not fit under `max_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse it: the daemon answers 503 and forwards nothing.
    Reject,
    /// Evict the oldest records until it fits (counted).
    DropOldest,
    /// Do not keep this record (counted).
    DropNewest,
}

impl fmt::Display for WhenFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WhenFull::Reject => "reject",
            WhenFull::DropOldest => "drop_oldest",
            WhenFull::DropNewest => "drop_newest",
        })
    }
}

/// Settings of one spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Bound on unacknowledged bytes (framing included) plus reservations.
    pub max_size: u64,
    /// Preferred segment size; shrunk to a quarter of `max_size` when that is smaller.
    pub segment_size: u64,
    pub when_full: WhenFull,
    pub fsync: FsyncPolicy,
    /// Bound on the `rejected/` area.
    pub rejected_max_size: u64,
    /// Longest time an acknowledgement stays in memory only.
    pub cursor_sync_interval: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            max_size: 1 << 30,
            segment_size: DEFAULT_SEGMENT_SIZE,
            when_full: WhenFull::Reject,
            fsync: FsyncPolicy::Always,
            rejected_max_size: 64 << 20,
            cursor_sync_interval: Duration::from_millis(100),
        }
    }
}

impl SpoolOptions {
    /// The segment size actually used.
    pub fn effective_segment_size(&self) -> u64 {
        self.segment_size
            .min((self.max_size / 4).max(MIN_SEGMENT_SIZE))
            .max(1)
    }
}

/// Errors of the spool. Each renders as one line naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {} is in use by another process{holder}", dir.display())]
    Locked { dir: PathBuf, holder: String },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record cannot be stored: {0}")]
    Unencodable(&'static str),
    #[error("spool {} is closed", .0.display())]
    Closed(PathBuf),
}

impl SpoolError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        SpoolError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the error is the disk being full (ENOSPC or a quota).
    pub fn is_storage_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
    }

    /// A copy for the second and later callers of a failed batch.
    fn duplicate(&self) -> Self {
        match self {
            SpoolError::Locked { dir, holder } => SpoolError::Locked {
                dir: dir.clone(),
                holder: holder.clone(),
            },
            SpoolError::Io { op, path, source } => SpoolError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            SpoolError::Unencodable(why) => SpoolError::Unencodable(why),
            SpoolError::Closed(dir) => SpoolError::Closed(dir.clone()),
        }
    }
}

/// Why a reservation was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `when_full = "reject"`: the client should get 503.
    #[error("spool is full")]
    Rejected,
    /// `when_full = "drop_newest"`: this record is not kept.
    #[error("spool is full; record dropped")]
    Dropped,
}

/// A snapshot of a spool's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records not yet acknowledged (written or queued).
    pub records: u64,
    /// Their bytes, framing included.
    pub bytes: u64,
    /// Bytes reserved by admitted requests not yet appended.
    pub reserved_bytes: u64,
    /// Accepted-at time of the oldest unacknowledged record.
    pub oldest_accepted_at: Option<SystemTime>,
    /// Segment files on disk.
    pub segments: u64,
    /// Records evicted by `drop_oldest`. One evicted after the reader had
    /// read it (it may be on its way to the target) counts only if its
    /// delivery is not acknowledged, once the reader rewinds or is dropped.
    pub dropped_full: u64,
    /// Reservations refused under `drop_newest`.
    pub dropped_newest: u64,
    /// Damaged records skipped (at open or when read).
    pub dropped_corrupt: u64,
    /// The last write error, cleared by the next successful write.
    pub write_error: Option<String>,
    pub rejected: RejectedStats,
}

/// Index entry of one unacknowledged, written record (16 bytes each).
#[derive(Debug, Clone, Copy)]
struct Entry {
    lsn: u64,
    len: u32,
    accepted_s: u32,
}

impl Entry {
    fn end(&self) -> u64 {
        self.lsn + u64::from(self.len)
    }

    fn seconds(t: SystemTime) -> u32 {
        t.duration_since(UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0)
    }
}

/// State shared by handles, readers, reservations and the writer thread.
struct Core {
    dir: PathBuf,
    opts: SpoolOptions,
    segment_limit: u64,
    state: Mutex<State>,
    /// Committed end position, for readers waiting for data.
    committed: watch::Sender<u64>,
    rejected: Mutex<rejected::RejectedStore>,
    /// Tests: how many of the next segment `fdatasync`s fail.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicU32,
    /// Tests: how many of the next cuts after a failed sync fail.
    #[cfg(test)]
    fail_cuts: std::sync::atomic::AtomicU32,
}

/// Tests: takes one from `counter` if it is not zero (an injected failure).
#[cfg(test)]
fn injected(counter: &std::sync::atomic::AtomicU32) -> bool {
    use std::sync::atomic::Ordering;
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// Where a failed sync left frames that must never be read back: every
/// frame from log position `from` on that was written in writer epoch
/// `epoch` (the writer starts a new epoch when it has cut the log back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cut {
    epoch: u64,
    from: u64,
    /// The failed sync's error kind (a full disk stays a full disk for
    /// the groups failed after it).
    kind: io::ErrorKind,
}

struct State {
    /// Bound and policy in force (start from the options; changed by `set_bounds`).
    max_size: u64,
    when_full: WhenFull,
    /// Written, unacknowledged records in log order.
    index: VecDeque<Entry>,
    index_bytes: u64,
    /// Position after the last written frame.
    end: u64,
    /// Segments on disk: base position to data length.
    segments: BTreeMap<u64, u64>,
    pending_bytes: u64,
    pending_records: u64,
    reserved: u64,
    durable_cursor: u64,
    dropped_full: u64,
    dropped_newest: u64,
    dropped_corrupt: u64,
    /// The last write or sync failure and the log end when it happened.
    /// Records published later and ending beyond that position were written
    /// after it and clear it; records written before it (a pipelined sync
    /// finishing late) do not.
    write_error: Option<(u64, String)>,
    /// The last failed sync, until the writer has cut the log back (and
    /// after, for the syncer to fail the jobs of that epoch still queued).
    cut: Option<Cut>,
    /// How far the reader has read (one per spool: the target's delivery
    /// worker; another reader's reads and drop settle as the worker's
    /// would): records before it may be on their way to the target.
    read_to: u64,
    /// Ends of the records `drop_oldest` evicted after a reader had read
    /// them, in log order: not counted in `dropped_full` unless their
    /// delivery is not acknowledged ([`State::settle_evicted_read`]).
    evicted_read: VecDeque<u64>,
    nudged: bool,
    closed: bool,
}

impl State {
    fn new(opts: &SpoolOptions) -> Self {
        State {
            max_size: opts.max_size,
            when_full: opts.when_full,
            index: VecDeque::new(),
            index_bytes: 0,
            end: 0,
            segments: BTreeMap::new(),
            pending_bytes: 0,
            pending_records: 0,
            reserved: 0,
            durable_cursor: 0,
            dropped_full: 0,
            dropped_newest: 0,
            dropped_corrupt: 0,
            write_error: None,
            cut: None,
            read_to: 0,
            evicted_read: VecDeque::new(),
            nudged: false,
            closed: false,
        }
    }

    fn cursor(&self) -> u64 {
        self.index.front().map_or(self.end, |e| e.lsn)
    }

    fn used(&self) -> u64 {
        self.index_bytes + self.pending_bytes + self.reserved
    }

    /// True when `bytes` more would take the spool past `max_size`.
    fn over_with(&self, bytes: u64) -> bool {
        self.used().saturating_add(bytes) > self.max_size
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let e = self.index.pop_front()?;
        self.index_bytes -= u64::from(e.len);
        Some(e)
    }

    /// The records evicted after being read whose delivery was not
    /// acknowledged (the reader went back to the cursor, past them, or
    /// is gone): lost after all, and counted so.
    fn settle_evicted_read(&mut self) {
        self.dropped_full += self.evicted_read.len() as u64;
        self.evicted_read.clear();
        self.read_to = self.cursor();
    }
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in
        // a way that matters more than stopping the daemon would: carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cursor_dirty(&self) -> bool {
        let st = self.lock();
        st.cursor() != st.durable_cursor
    }

    fn cursor_to_persist(&self) -> Option<u64> {
        let mut st = self.lock();
        st.nudged = false;
        let c = st.cursor();
        (c != st.durable_cursor).then_some(c)
    }

    /// Records a durable cursor; returns the segments now deletable (never `active`).
    fn cursor_persisted(&self, position: u64, active: u64) -> Vec<u64> {
        let mut st = self.lock();
        st.durable_cursor = position;
        let doomed = passed_segments(&st.segments, active, position);
        for base in &doomed {
            st.segments.remove(base);
        }
        doomed
    }

    fn publish(&self, entries: impl Iterator<Item = Entry>, base: u64, seg_len: u64, end: u64) {
        {
            let mut st = self.lock();
            for e in entries {
                st.pending_bytes = st.pending_bytes.saturating_sub(u64::from(e.len));
                st.pending_records = st.pending_records.saturating_sub(1);
                st.index_bytes += u64::from(e.len);
                st.index.push_back(e);
            }
            st.end = end;
            st.segments.insert(base, seg_len);
            if st.write_error.as_ref().is_some_and(|(at, _)| end > *at) {
                st.write_error = None;
            }
        }
        self.committed.send_replace(end);
    }

    fn add_segment(&self, base: u64) {
        self.lock().segments.insert(base, 0);
    }

    /// `fdatasync` of a segment file.
    fn sync_segment(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if injected(&self.fail_syncs) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        file.sync_data()
    }

    fn has_write_error(&self) -> bool {
        self.lock().write_error.is_some()
    }

    /// Records a write or sync failure at log position `at` (the log end
    /// when the failed write would have started, or the end of the failed
    /// sync's data).
    fn write_failed(&self, at: u64, error: String) {
        self.lock().write_error = Some((at, error));
    }

    /// The spool can be written again (the writability probe succeeded).
    fn write_recovered(&self) {
        self.lock().write_error = None;
    }

    fn release(&self, bytes: u64) {
        {
            let mut st = self.lock();
            st.reserved = st.reserved.saturating_sub(bytes);
        }
        self.wake_readers();
    }

    /// Wakes [`Reader::wait`] without new records: room reserved for a
    /// record was given back, or appends failed, so the spool may have
    /// become idle (its target's worker then sets the target `up`).
    fn wake_readers(&self) {
        self.committed.send_modify(|_| {});
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        self.dir.join(scan::segment_name(base))
    }
}

/// The writer thread and the directory lock, released when the last handle goes.
struct Handle {
    core: Arc<Core>,
    tx: mpsc::Sender<Cmd>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Released as soon as the writer has stopped, even while stale clones exist.
    lock: Mutex<Option<DirLock>>,
}

impl Handle {
    fn stop(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!(dir = %self.core.dir.display(), "spool writer thread panicked");
        }
        self.core.lock().closed = true;
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop(Cmd::Shutdown);
    }
}

/// A handle on one spool directory. Cheap to clone; the writer stops and the
/// lock is released when the last clone is dropped or [`Spool::close`] is called.
#[derive(Clone)]
pub struct Spool {
    handle: Arc<Handle>,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.handle.core.dir)
            .finish()
    }
}

/// Room held in a spool for one record. Dropping it gives the room back.
#[must_use = "a reservation holds spool room until it is appended or dropped"]
#[derive(Debug)]
pub struct Reservation {
    core: Arc<Core>,
    bytes: u64,
}

/// The segments wholly behind `position`, never `active`: those whose end,
/// the next segment's base (where the writer sealed it), is at or before
/// it. Not the published length in `segments`: that trails what was
/// written when the writer rolled while a group in the old segment was
/// still being synced, and deleting the segment then would lose that
/// group once it is acknowledged.
fn passed_segments(segments: &BTreeMap<u64, u64>, active: u64, position: u64) -> Vec<u64> {
    segments
        .keys()
        .zip(segments.keys().skip(1))
        .filter(|&(&base, &end)| base != active && end <= position)
        .map(|(&base, _)| base)
        .collect()
}

/// Adds `bytes` to the reserved room; the caller holds the state's lock.
fn reserve_locked(core: &Arc<Core>, st: &mut State, bytes: u64) -> Reservation {
    st.reserved += bytes;
    Reservation {
        core: core.clone(),
        bytes,
    }
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core").field("dir", &self.dir).finish()
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.core.release(self.bytes);
        }
    }
}

/// A record read back from the spool, with its position for [`Spool::ack`].
#[derive(Debug, Clone)]
pub struct Spooled {
    /// Position of the record.
    pub lsn: u64,
    /// Position just after it: acknowledging this acknowledges the record and
    /// everything before it.
    pub end: u64,
    pub record: Record,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering what a crash left.
    ///
    /// Fails with [`SpoolError::Locked`] if another process has it open.
    pub fn open(dir: impl AsRef<Path>, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, opts, writer::pipelining_pays())
    }

    /// [`Spool::open`], with a syncer thread under `fsync = "always"` only
    /// if `pipelined`.
    fn open_with(
        dir: impl AsRef<Path>,
        opts: SpoolOptions,
        pipelined: bool,
    ) -> Result<Spool, SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        fsutil::create_dir(&dir)?;
        let lock = DirLock::acquire(&dir)?;
        let recovered = recover(&dir, &opts)?;
        let rejected = rejected::RejectedStore::open(&dir, opts.rejected_max_size)?;
        let segment_limit = opts.effective_segment_size();
        let (committed, _) = watch::channel(recovered.state.end);
        let core = Arc::new(Core {
            dir: dir.clone(),
            opts,
            segment_limit,
            state: Mutex::new(recovered.state),
            committed,
            rejected: Mutex::new(rejected),
            #[cfg(test)]
            fail_syncs: std::sync::atomic::AtomicU32::new(0),
            #[cfg(test)]
            fail_cuts: std::sync::atomic::AtomicU32::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            core: core.clone(),
            active: recovered.active,
            pos: None,
            gather: writer::Gather::default(),
            unsynced_since: None,
            cursor_dirty_since: None,
            probe_at: None,
            failed_len: 0,
            syncer: None,
            pipelined,
            wake: Some(tx.clone()),
            epoch: 0,
            unsynced_sealed: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("forkd-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SpoolError::io("start writer thread for", &dir, e))?;
        Ok(Spool {
            handle: Arc::new(Handle {
                core,
                tx,
                thread: Mutex::new(Some(thread)),
                lock: Mutex::new(Some(lock)),
            }),
        })
    }

    fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    /// The directory this spool owns.
    pub fn dir(&self) -> &Path {
        &self.core().dir
    }

    pub fn options(&self) -> &SpoolOptions {
        &self.core().opts
    }

    /// Admission: reserves room for `bytes` (a record's [`Record::encoded_len`]).
    ///
    /// Under `drop_oldest` the oldest written records are evicted to make room,
    /// and the reservation is granted even when eviction alone cannot make it
    /// fit (the overshoot is bounded by what is in flight).
    pub fn try_reserve(&self, bytes: u64) -> Result<Reservation, Refused> {
        let core = self.core();
        let mut st = core.lock();
        if st.over_with(bytes) {
            match st.when_full {
                WhenFull::Reject => return Err(Refused::Rejected),
                WhenFull::DropNewest => {
                    st.dropped_newest += 1;
                    return Err(Refused::Dropped);
                }
                WhenFull::DropOldest => self.evict_locked(&mut st, bytes),
            }
        }
        Ok(reserve_locked(core, &mut st, bytes))
    }

    /// [`try_reserve`](Self::try_reserve) when it drops nothing: `None` when
    /// the record does not fit and `when_full` would drop a record to admit
    /// it (the newest, or the oldest ones). A fork asks every target this
    /// first, so that a refusal (`reject`) comes before any spool has lost a
    /// record for a request that is then refused.
    pub fn try_reserve_lossless(&self, bytes: u64) -> Option<Result<Reservation, Refused>> {
        let core = self.core();
        let mut st = core.lock();
        if st.over_with(bytes) {
            return match st.when_full {
                WhenFull::Reject => Some(Err(Refused::Rejected)),
                WhenFull::DropNewest | WhenFull::DropOldest => None,
            };
        }
        Some(Ok(reserve_locked(core, &mut st, bytes)))
    }

    /// Reserves room that the caller must have whatever the bound says: for a
    /// request already admitted whose live send failed. `drop_oldest` still
    /// evicts to make room; other policies overcommit.
    pub fn reserve_overcommit(&self, bytes: u64) -> Reservation {
        let core = self.core();
        let mut st = core.lock();
        if st.when_full == WhenFull::DropOldest && st.over_with(bytes) {
            self.evict_locked(&mut st, bytes);
        }
        reserve_locked(core, &mut st, bytes)
    }

    /// Changes the bound and the full policy of an open spool (reload, or
    /// the active target changed, which changes the default policy).
    pub fn set_bounds(&self, max_size: u64, when_full: WhenFull) {
        let mut st = self.core().lock();
        st.max_size = max_size;
        st.when_full = when_full;
    }

    /// The bound and full policy in force.
    pub fn bounds(&self) -> (u64, WhenFull) {
        let st = self.core().lock();
        (st.max_size, st.when_full)
    }

    fn evict_locked(&self, st: &mut State, bytes: u64) {
        let before = st.cursor();
        while st.over_with(bytes) {
            let Some(evicted) = st.pop_front() else {
                break;
            };
            if evicted.lsn < st.read_to {
                // On its way to the target: lost only if that fails.
                st.evicted_read.push_back(evicted.end());
            } else {
                st.dropped_full += 1;
            }
        }
        if st.cursor() != before {
            self.nudge_locked(st);
        }
    }

    fn nudge_locked(&self, st: &mut State) {
        if !st.nudged {
            st.nudged = true;
            let _ = self.handle.tx.send(Cmd::Nudge);
        }
    }

    /// Appends `record` within `reservation`. The record is queued at once, so
    /// appends are ordered by the time of this call; the returned future
    /// completes with the record's position once it is as durable as the fsync
    /// policy says, or with the write error.
    pub fn append(
        &self,
        reservation: Reservation,
        record: impl Into<Arc<Record>>,
    ) -> impl Future<Output = Result<u64, SpoolError>> + Send + 'static {
        let rx = self.enqueue(reservation, record);
        async move {
            rx?.await
                .unwrap_or_else(|_| Err(SpoolError::Closed(PathBuf::new())))
        }
    }

    /// [`Spool::append`] for synchronous callers: blocks until durable.
    /// Must not be called from inside an async runtime thread.
    pub fn append_blocking(
        &self,
        reservation: Reservation,
        record: impl Into<Arc<Record>>,
    ) -> Result<u64, SpoolError> {
        let rx = self.enqueue(reservation, record)?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(SpoolError::Closed(self.dir().to_path_buf())))
    }

    fn enqueue(
        &self,
        mut reservation: Reservation,
        record: impl Into<Arc<Record>>,
    ) -> Result<oneshot::Receiver<Result<u64, SpoolError>>, SpoolError> {
        let record: Arc<Record> = record.into();
        let len = record
            .checked_encoded_len()
            .map_err(SpoolError::Unencodable)?;
        let core = self.core();
        let (reply, rx) = oneshot::channel();
        {
            let mut st = core.lock();
            if st.closed {
                return Err(SpoolError::Closed(core.dir.clone()));
            }
            st.reserved = st.reserved.saturating_sub(reservation.bytes);
            reservation.bytes = 0;
            st.pending_bytes += len;
            st.pending_records += 1;
            // Sent under the lock so that queue order is reservation order.
            if self
                .handle
                .tx
                .send(Cmd::Append(Append { record, len, reply }))
                .is_err()
            {
                st.pending_bytes -= len;
                st.pending_records -= 1;
                return Err(SpoolError::Closed(core.dir.clone()));
            }
        }
        Ok(rx)
    }

    /// Acknowledges every record before position `end` (a [`Spooled::end`]):
    /// they were delivered and may be deleted. Positions at or behind the
    /// cursor are ignored.
    pub fn ack(&self, end: u64) {
        let core = self.core();
        let mut st = core.lock();
        let before = st.cursor();
        while st.index.front().is_some_and(|e| e.lsn < end) {
            st.pop_front();
        }
        // Evicted while on their way, and delivered after all: not dropped.
        while st.evicted_read.front().is_some_and(|&e| e <= end) {
            st.evicted_read.pop_front();
        }
        if st.cursor() != before {
            self.nudge_locked(&mut st);
        }
    }

    /// A reader positioned at the cursor. A spool has one (the delivery
    /// worker's): `drop_oldest` evictions of records it has read are
    /// counted by its acknowledgements and rewinds ([`SpoolStats::dropped_full`]).
    pub fn reader(&self) -> Reader {
        let core = self.core().clone();
        let next = core.lock().cursor();
        let committed = core.committed.subscribe();
        Reader {
            core,
            next,
            file: None,
            committed,
        }
    }

    /// Keeps a record the target refused for good in the `rejected/` area.
    pub fn reject(&self, record: &Record) -> Result<(), SpoolError> {
        record.check_encodable().map_err(SpoolError::Unencodable)?;
        self.core()
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(record)
    }

    /// Wakes the reader's [`Reader::wait`] though nothing was appended: for
    /// a caller whose target changed state with nothing to spool.
    pub fn wake_readers(&self) {
        self.core().wake_readers();
    }

    /// Whether nothing is spooled, pending or reserved: [`stats`](Self::stats)
    /// without the rejected area's lock, which is held across fsyncs.
    pub fn is_idle(&self) -> bool {
        let st = self.core().lock();
        st.index.is_empty() && st.pending_records == 0 && st.reserved == 0
    }

    /// Counters for metrics and `/status`.
    pub fn stats(&self) -> SpoolStats {
        let core = self.core();
        let rejected = core
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats();
        let st = core.lock();
        SpoolStats {
            records: st.index.len() as u64 + st.pending_records,
            bytes: st.index_bytes + st.pending_bytes,
            reserved_bytes: st.reserved,
            oldest_accepted_at: st
                .index
                .front()
                .map(|e| UNIX_EPOCH + Duration::from_secs(u64::from(e.accepted_s))),
            segments: st.segments.len() as u64,
            dropped_full: st.dropped_full,
            dropped_newest: st.dropped_newest,
            dropped_corrupt: st.dropped_corrupt,
            write_error: st.write_error.as_ref().map(|(_, e)| e.clone()),
            rejected,
        }
    }

    /// Stops the writer after syncing data and persisting the cursor, and
    /// releases the directory lock once every clone of this handle is gone.
    pub fn close(self) {
        self.handle.stop(Cmd::Shutdown);
    }

    /// Holds the writer until the returned sender is dropped: appends
    /// queued meanwhile are written as one batch.
    #[cfg(test)]
    fn hold_writer(&self) -> mpsc::Sender<()> {
        let (release, held) = mpsc::channel();
        let _ = self.handle.tx.send(Cmd::Hold(held));
        release
    }

    /// Stops the writer at once without syncing or persisting the cursor, as a
    /// crash would. For tests of recovery.
    #[doc(hidden)]
    pub fn abandon(self) {
        self.handle.stop(Cmd::Abort);
    }
}

/// Reads records in log order, from the cursor on.
///
/// There is one reader per delivery worker. It reads only what the writer has
/// published, so it never sees a partial frame.
pub struct Reader {
    core: Arc<Core>,
    next: u64,
    file: Option<(u64, Arc<File>)>,
    committed: watch::Receiver<u64>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.core.lock().settle_evicted_read();
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").field("next", &self.next).finish()
    }
}

impl Reader {
    /// Position of the next record this reader will return.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Goes back to the cursor: the oldest record not yet acknowledged.
    pub fn rewind(&mut self) {
        let mut st = self.core.lock();
        st.settle_evicted_read();
        self.next = st.cursor();
    }

    /// Waits until there is something past the read position, or until
    /// the spool may have become idle since the last read (a reservation
    /// given back, an append failed, [`Spool::wake_readers`]): a caller
    /// that checks [`Spool::is_idle`] after an empty read and then waits
    /// misses neither.
    pub async fn wait(&mut self) {
        if *self.committed.borrow() > self.next {
            return;
        }
        // Returns at once if anything was published or given back since
        // `plan` marked the channel seen.
        let _ = self.committed.changed().await;
    }

    /// Returns up to `max_records` records (and about `max_bytes`, at least
    /// one record) after the read position, in order; empty when caught up.
    /// Damaged records are skipped and counted.
    pub fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Spooled>, SpoolError> {
        loop {
            let Some((entries, base, file)) = self.plan(max_records.max(1), max_bytes)? else {
                return Ok(Vec::new());
            };
            let out = self.read_entries(&entries, base, &file)?;
            if !out.is_empty() {
                return Ok(out);
            }
            // Everything planned was damaged: plan again past it.
        }
    }

    /// Picks the next contiguous run of entries in one segment and the file holding it.
    #[allow(clippy::type_complexity)]
    fn plan(
        &mut self,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Option<(Vec<Entry>, u64, Arc<File>)>, SpoolError> {
        // Marked seen before the state is read: what changes after this
        // wakes `wait`.
        self.committed.borrow_and_update();
        let st = self.core.lock();
        self.next = self.next.max(st.cursor());
        let start = st.index.partition_point(|e| e.lsn < self.next);
        let Some(first) = st.index.get(start).copied() else {
            // Caught up. Step over what is published but not indexed (records
            // skipped as damaged at open) so that `wait` waits for new data
            // instead of returning at once forever.
            self.next = self.next.max(st.end);
            return Ok(None);
        };
        let Some((&base, &seg_len)) = st.segments.range(..=first.lsn).next_back() else {
            return Ok(None);
        };
        let seg_end = base + seg_len;
        let mut entries = vec![first];
        let mut bytes = u64::from(first.len);
        for e in st.index.range(start + 1..) {
            let prev_end = entries.last().map_or(first.end(), Entry::end);
            if entries.len() >= max_records
                || e.lsn != prev_end
                || e.end() > seg_end
                || bytes + u64::from(e.len) > max_bytes
            {
                break;
            }
            bytes += u64::from(e.len);
            entries.push(*e);
        }
        // Open under the lock: the segment cannot be deleted while entries in it are indexed.
        let file = match &self.file {
            Some((b, f)) if *b == base => f.clone(),
            _ => {
                let path = self.core.segment_path(base);
                let f = Arc::new(File::open(&path).map_err(|e| SpoolError::io("open", &path, e))?);
                self.file = Some((base, f.clone()));
                f
            }
        };
        Ok(Some((entries, base, file)))
    }

    fn read_entries(
        &mut self,
        entries: &[Entry],
        base: u64,
        file: &File,
    ) -> Result<Vec<Spooled>, SpoolError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Vec::new());
        };
        let total = usize::try_from(last.end() - first.lsn).unwrap_or(usize::MAX);
        let mut buf = BytesMut::zeroed(total);
        let offset = SEGMENT_HEADER_LEN + (first.lsn - base);
        if let Err(e) = file.read_exact_at(&mut buf, offset) {
            return Err(SpoolError::io("read", &self.core.segment_path(base), e));
        }
        let buf: Bytes = buf.freeze();
        let mut out = Vec::with_capacity(entries.len());
        let mut damaged = Vec::new();
        for e in entries {
            let at = (e.lsn - first.lsn) as usize;
            let frame = buf.slice(at..at + e.len as usize);
            match format::decode_frame(&frame) {
                Ok((record, _)) => out.push(Spooled {
                    lsn: e.lsn,
                    end: e.end(),
                    record,
                }),
                Err(err) => {
                    tracing::warn!(
                        dir = %self.core.dir.display(), position = e.lsn, error = %err,
                        "skipping damaged spool record"
                    );
                    damaged.push(e.lsn);
                }
            }
        }
        self.next = last.end();
        let mut st = self.core.lock();
        // Read (a failed read above moves nothing): these may now be on
        // their way to the target.
        st.read_to = st.read_to.max(self.next);
        if !damaged.is_empty() {
            for lsn in damaged {
                if let Ok(i) = st.index.binary_search_by_key(&lsn, |e| e.lsn)
                    && let Some(e) = st.index.remove(i)
                {
                    st.index_bytes -= u64::from(e.len);
                    st.dropped_corrupt += 1;
                }
            }
        }
        Ok(out)
    }
}

/// Creates a directory (and parents) with mode 0700, as the spool does.
pub fn create_dir_private(dir: &Path) -> Result<(), SpoolError> {
    fsutil::create_dir(dir)
}

/// What recovery hands to the new spool.
struct Recovered {
    state: State,
    active: Active,
}

/// Scans the directory, repairs what a crash left, and rebuilds the index.
fn recover(dir: &Path, opts: &SpoolOptions) -> Result<Recovered, SpoolError> {
    let listing = scan::list_dir(dir).map_err(|e| SpoolError::io("list", dir, e))?;
    for tmp in &listing.temp_files {
        fs::remove_file(tmp).map_err(|e| SpoolError::io("remove", tmp, e))?;
    }
    let cursor = match cursor::load(dir).map_err(|e| SpoolError::io("read cursor in", dir, e))? {
        cursor::Stored::At(c) => Some(c),
        cursor::Stored::Missing => None,
        cursor::Stored::Corrupt => {
            tracing::warn!(dir = %dir.display(), "spool cursor is damaged; delivering from the oldest segment");
            None
        }
    };
    let behind = |lsn: u64| cursor.is_some_and(|c| lsn < c);
    let mut st = State::new(opts);
    let mut removed_any = false;
    let mut last_usable: Option<(u64, u64)> = None;
    let count = listing.segments.len();
    for (i, (base, path)) in listing.segments.iter().enumerate() {
        let base = *base;
        let is_last = i + 1 == count;
        let file_len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let data_len = file_len.saturating_sub(SEGMENT_HEADER_LEN);
        if !is_last && cursor.is_some_and(|c| base + data_len <= c) {
            // Left by a crash between the cursor write and the delete.
            fs::remove_file(path).map_err(|e| SpoolError::io("remove", path, e))?;
            removed_any = true;
            continue;
        }
        if st.end > base {
            tracing::warn!(path = %path.display(), "spool segment overlaps the previous one; skipping it");
            continue;
        }
        let expected = if st.segments.is_empty() {
            cursor.unwrap_or(base)
        } else {
            st.end
        };
        if base > expected {
            tracing::warn!(dir = %dir.display(), from = st.end, to = base, "spool segment missing; records in it are lost");
        }
        let scanned = match scan::scan_segment_file(base, path, true) {
            Ok(s) => s,
            Err(scan::SegmentError::Short(_)) if is_last => {
                // A segment whose creation was interrupted: it never held a record.
                fs::remove_file(path).map_err(|e| SpoolError::io("remove", path, e))?;
                removed_any = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable spool segment");
                st.segments.insert(base, data_len);
                st.end = base + data_len.max(1);
                continue;
            }
        };
        for r in scanned.records.iter().filter(|r| !behind(r.lsn)) {
            let e = Entry {
                lsn: r.lsn,
                len: u32::try_from(r.len).unwrap_or(u32::MAX),
                accepted_s: u32::try_from(r.accepted_ms / 1000).unwrap_or(u32::MAX),
            };
            st.index_bytes += u64::from(e.len);
            st.index.push_back(e);
        }
        let corrupt = scanned
            .corrupt
            .iter()
            .filter(|(lsn, _)| !behind(*lsn))
            .count() as u64;
        if corrupt > 0 {
            tracing::warn!(path = %path.display(), records = corrupt, "skipped damaged spool records");
        }
        st.dropped_corrupt += corrupt;
        let mut kept_len = scanned.data_len;
        if scanned.tail != scan::Tail::Clean {
            if is_last {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| SpoolError::io("open", path, e))?;
                f.set_len(SEGMENT_HEADER_LEN + scanned.valid_len)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| SpoolError::io("truncate torn tail of", path, e))?;
                let bytes = scanned.data_len - scanned.valid_len;
                if opts.fsync == FsyncPolicy::Always || scanned.tail == scan::Tail::Garbage {
                    // Garbage is counted as corrupt by the scan already.
                    // Under `always` a torn tail was never acknowledged: an
                    // append completes only after the fsync that covers all
                    // of its frame.
                    tracing::info!(
                        path = %path.display(), bytes,
                        "truncated an interrupted write at the end of the spool"
                    );
                } else {
                    // Appends were acknowledged before their data was
                    // durable: this may be an acknowledged record lost by a
                    // power loss within the fsync interval. SPEC.md counts
                    // such losses; one is counted (how many whole records
                    // went with it cannot be known).
                    st.dropped_corrupt += 1;
                    tracing::warn!(
                        path = %path.display(), bytes, fsync = %opts.fsync,
                        "truncated an incomplete record at the end of the spool; it may have been acknowledged (counted as corrupt)"
                    );
                }
                kept_len = scanned.valid_len;
                last_usable = Some((base, kept_len));
            } else if scanned.tail == scan::Tail::Torn && !behind(base + scanned.valid_len) {
                st.dropped_corrupt += 1;
                tracing::warn!(path = %path.display(), "spool segment ends in an incomplete record; skipped");
            }
        } else {
            // A clean segment. Appending continues in the last one if it ends
            // the log: the last file, or the one before it when the last
            // file was removed above (its creation was cut short), which
            // may be an empty segment that a new one would collide with.
            last_usable = Some((base, kept_len));
        }
        st.segments.insert(base, kept_len);
        st.end = base + kept_len;
    }
    if removed_any {
        fsutil::sync_dir(dir).map_err(|e| SpoolError::io("sync", dir, e))?;
    }
    if let Some(c) = cursor {
        st.end = st.end.max(c);
    }
    st.durable_cursor = cursor.unwrap_or(u64::MAX);
    let sync = opts.fsync != FsyncPolicy::Never;
    let active = match last_usable {
        Some((base, len)) if base + len == st.end => {
            let path = dir.join(scan::segment_name(base));
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| SpoolError::io("open", &path, e))?;
            Active {
                base,
                file: Arc::new(file),
                len,
            }
        }
        _ => {
            let base = st.end;
            let active = writer::create_segment(dir, base, sync)?;
            st.segments.insert(base, 0);
            active
        }
    };
    Ok(Recovered { state: st, active })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn record(id: usize, body_len: usize) -> Record {
        Record {
            accepted_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + id as u64),
            request_id: format!("req-{id}"),
            method: http::Method::POST,
            path_and_query: http::uri::PathAndQuery::from_static("/v1/logs"),
            headers: http::HeaderMap::new(),
            body: Bytes::from(vec![b'a' + (id % 26) as u8; body_len]),
        }
    }

    fn append(spool: &Spool, id: usize, body_len: usize) -> Result<u64, SpoolError> {
        let r = record(id, body_len);
        let reservation = spool.reserve_overcommit(r.encoded_len());
        spool.append_blocking(reservation, r)
    }

    /// Appends `records` (id, body length) as one batch of the writer;
    /// returns the names of those whose append succeeded, in order.
    fn append_batch(
        spool: &Spool,
        records: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Vec<String>, io::Error> {
        let held = spool.hold_writer();
        let queued: Vec<_> = records
            .into_iter()
            .map(|(id, len)| {
                let r = record(id, len);
                let reservation = spool.reserve_overcommit(r.encoded_len());
                (id, spool.append(reservation, r))
            })
            .collect();
        drop(held);
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        Ok(queued
            .into_iter()
            .filter_map(|(id, answer)| rt.block_on(answer).is_ok().then(|| format!("req-{id}")))
            .collect())
    }

    /// The request ids of every record from the cursor on, in log order.
    fn ids(spool: &Spool) -> Result<Vec<String>, SpoolError> {
        let mut reader = spool.reader();
        let mut out = Vec::new();
        loop {
            let batch = reader.read_batch(64, 1 << 20)?;
            if batch.is_empty() {
                return Ok(out);
            }
            out.extend(batch.into_iter().map(|s| s.record.request_id));
        }
    }

    /// A spool directory with `segment_size` segments.
    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        opts: SpoolOptions,
    }

    impl Fixture {
        fn new(segment_size: u64) -> Result<Fixture, Box<dyn std::error::Error>> {
            let dir = tempfile::tempdir()?;
            Ok(Fixture {
                path: dir.path().join("t"),
                _dir: dir,
                opts: SpoolOptions {
                    segment_size,
                    ..SpoolOptions::default()
                },
            })
        }

        fn open(&self, pipelined: bool) -> Result<Spool, SpoolError> {
            Spool::open_with(&self.path, self.opts.clone(), pipelined)
        }

        /// Stops `spool` as a crash would and opens it again: it must read
        /// back exactly `expected`, in order, with nothing counted corrupt.
        fn after_a_crash(&self, spool: Spool, expected: &[String], what: &str) -> TestResult {
            spool.abandon();
            let spool = Spool::open(&self.path, self.opts.clone())?;
            assert_eq!(ids(&spool)?, expected, "after a crash ({what})");
            assert_eq!(spool.stats().dropped_corrupt, 0, "{what}");
            spool.close();
            Ok(())
        }
    }

    fn names(ids: &[usize]) -> Vec<String> {
        ids.iter().map(|id| format!("req-{id}")).collect()
    }

    #[test]
    fn a_record_whose_sync_failed_is_not_read_back_after_a_crash() -> TestResult {
        for pipelined in [false, true] {
            let fx = Fixture::new(DEFAULT_SEGMENT_SIZE)?;
            let spool = fx.open(pipelined)?;
            append(&spool, 1, 3000)?;
            spool.core().fail_syncs.store(1, Ordering::Release);
            assert!(
                append(&spool, 2, 3000).is_err(),
                "an append whose sync failed succeeded"
            );
            // The failed frame is cut off without waiting for another append.
            let segment = fx.path.join(scan::segment_name(0));
            let cut_len = SEGMENT_HEADER_LEN + record(1, 3000).encoded_len();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while fs::metadata(&segment)?.len() != cut_len {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the failed frame is still in the segment (pipelined: {pipelined})"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            append(&spool, 3, 3000)?;
            let expected = names(&[1, 3]);
            assert_eq!(ids(&spool)?, expected, "pipelined: {pipelined}");
            fx.after_a_crash(spool, &expected, &format!("pipelined: {pipelined}"))?;
        }
        Ok(())
    }

    #[test]
    fn a_failed_sync_of_a_group_that_starts_a_segment_rolled_into_in_its_batch_loses_nothing()
    -> TestResult {
        // One record per segment: every group starts a segment, and a batch
        // of several records rolls between its groups. The first group's
        // sync fails; the cut takes the log back to that segment's start,
        // and the rest of the batch is written there and after.
        for pipelined in [false, true] {
            let fx = Fixture::new(4 << 10)?;
            let spool = fx.open(pipelined)?;
            append(&spool, 1, 3000)?;
            spool.core().fail_syncs.store(1, Ordering::Release);
            let mut expected = names(&[1]);
            expected.extend(append_batch(&spool, (2..6).map(|id| (id, 3000)))?);
            assert!(
                !expected.contains(&"req-2".to_string()),
                "the append whose sync failed succeeded"
            );
            if !pipelined {
                // Synced one by one after the cut. (With the syncer they were
                // written before the failure was known, and fail with it.)
                assert_eq!(expected, names(&[1, 3, 4, 5]));
            }
            append(&spool, 6, 3000)?;
            expected.push("req-6".into());
            assert_eq!(ids(&spool)?, expected, "live (pipelined: {pipelined})");
            fx.after_a_crash(spool, &expected, &format!("pipelined: {pipelined}"))?;
        }
        Ok(())
    }

    #[test]
    fn a_spool_whose_cut_after_a_failed_sync_fails_stays_not_writable_until_a_retry_cuts_it()
    -> TestResult {
        for pipelined in [false, true] {
            cut_failing_once_then_retried(pipelined)?;
        }
        Ok(())
    }

    fn cut_failing_once_then_retried(pipelined: bool) -> TestResult {
        let fx = Fixture::new(DEFAULT_SEGMENT_SIZE)?;
        let spool = fx.open(pipelined)?;
        append(&spool, 1, 3000)?;
        spool.core().fail_syncs.store(1, Ordering::Release);
        spool.core().fail_cuts.store(u32::MAX, Ordering::Release);
        assert!(append(&spool, 2, 3000).is_err());
        assert!(
            append(&spool, 3, 3000).is_err(),
            "an append was written after frames a failed sync left"
        );
        // The writer retries the cut on its own, with its writability probe
        // (two more failures, then it succeeds); until the frames are gone,
        // the spool never says it can be written. (The error is read first:
        // it is cleared only after the cut.)
        spool.core().fail_cuts.store(2, Ordering::Release);
        let segment = fx.path.join(scan::segment_name(0));
        let cut_len = SEGMENT_HEADER_LEN + record(1, 3000).encoded_len();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let writable = spool.stats().write_error.is_none();
            let cut = fs::metadata(&segment)?.len() == cut_len;
            assert!(
                cut || !writable,
                "the spool says it can be written while a failed sync's frames are in the log"
            );
            if cut && writable {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the failed frames were not cut or the error not cleared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        append(&spool, 4, 3000)?;
        fx.after_a_crash(spool, &names(&[1, 4]), &format!("pipelined: {pipelined}"))
    }

    #[test]
    fn records_acknowledged_around_failed_syncs_across_segments_are_exactly_those_read_back()
    -> TestResult {
        for pipelined in [true, false] {
            appends_around_failed_syncs(pipelined)?;
        }
        Ok(())
    }

    fn appends_around_failed_syncs(pipelined: bool) -> TestResult {
        // Four writers append as fast as they are answered into 16 KiB
        // segments (about five records each), so batches hold rolls and,
        // with the syncer, rolls fall between a group and its sync; up to
        // three syncs fail along the way. Whatever was acknowledged is read
        // back, once and in log order, and nothing that failed is, both live
        // and after a crash (the writers' last answers come after the last
        // cut: a failure is answered only once the log is cut back).
        let fx = Fixture::new(16 << 10)?;
        let spool = fx.open(pipelined)?;
        let done = AtomicUsize::new(0);
        let (acked, failed) = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..4)
                .map(|w| {
                    let (spool, done) = (&spool, &done);
                    scope.spawn(move || {
                        let mut acked = Vec::new();
                        let mut failed = 0;
                        for i in 0..150 {
                            let id = w * 1000 + i;
                            match append(spool, id, 2500 + 37 * (id % 13)) {
                                Ok(lsn) => acked.push((lsn, format!("req-{id}"))),
                                Err(_) => failed += 1,
                            }
                            done.fetch_add(1, Ordering::AcqRel);
                        }
                        (acked, failed)
                    })
                })
                .collect();
            for at in [100, 200, 300] {
                while done.load(Ordering::Acquire) < at {
                    std::thread::sleep(Duration::from_millis(1));
                }
                spool.core().fail_syncs.fetch_add(1, Ordering::AcqRel);
            }
            let mut acked = Vec::new();
            let mut failed = 0;
            for w in writers {
                let (a, f) = w.join().unwrap_or_default();
                acked.extend(a);
                failed += f;
            }
            (acked, failed)
        });
        assert!(failed > 0, "no sync failed (pipelined: {pipelined})");
        assert_eq!(acked.len() + failed, 600, "a writer stopped early");
        let mut acked = acked;
        acked.sort();
        let expected: Vec<String> = acked.into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids(&spool)?, expected, "live (pipelined: {pipelined})");
        fx.after_a_crash(spool, &expected, &format!("pipelined: {pipelined}"))
    }

    #[test]
    fn a_record_evicted_while_being_replayed_counts_as_dropped_only_if_its_delivery_is_not_acknowledged()
    -> TestResult {
        // Room for three records under `drop_oldest`; each case on a fresh
        // spool holding records 1, 2 (and 3).
        let one = record(1, 1000).encoded_len();
        let dir = tempfile::tempdir()?;
        let opts = SpoolOptions {
            max_size: 3 * one,
            when_full: WhenFull::DropOldest,
            ..SpoolOptions::default()
        };
        let mut n = 0;
        let mut spool_of = |records: usize| -> Result<Spool, Box<dyn std::error::Error>> {
            n += 1;
            let spool = Spool::open(dir.path().join(format!("t{n}")), opts.clone())?;
            for id in 1..=records {
                append(&spool, id, 1000)?;
            }
            Ok(spool)
        };
        let dropped = |spool: &Spool| spool.stats().dropped_full;

        // Read, evicted, delivered: not lost.
        let spool = spool_of(2)?;
        let mut reader = spool.reader();
        let read = reader.read_batch(64, 1 << 20)?;
        let _room = spool.try_reserve(2 * one)?;
        assert_eq!(spool.stats().records, 1, "record 1 was not evicted");
        assert_eq!(
            dropped(&spool),
            0,
            "a record on its way to the target was counted as dropped"
        );
        spool.ack(read.last().ok_or("nothing read")?.end);
        assert_eq!(
            dropped(&spool),
            0,
            "a delivered record was counted as dropped"
        );

        // Read, evicted; the first delivered, the second not (the worker
        // goes back to the cursor, past it): one lost.
        let spool = spool_of(3)?;
        let mut reader = spool.reader();
        let read = reader.read_batch(64, 1 << 20)?;
        let _room = spool.try_reserve(2 * one)?;
        assert_eq!(spool.stats().records, 1, "records 1 and 2 were not evicted");
        spool.ack(read.first().ok_or("nothing read")?.end);
        assert_eq!(dropped(&spool), 0);
        reader.rewind();
        assert_eq!(dropped(&spool), 1);

        // Read, evicted, and the worker stops: lost.
        let spool = spool_of(2)?;
        let mut reader = spool.reader();
        reader.read_batch(64, 1 << 20)?;
        let _room = spool.try_reserve(2 * one)?;
        drop(reader);
        assert_eq!(dropped(&spool), 1);

        // Record 1 read, record 2 not: record 2's eviction counts at once.
        let spool = spool_of(2)?;
        let mut reader = spool.reader();
        assert_eq!(reader.read_batch(1, 1 << 20)?.len(), 1);
        let _room = spool.try_reserve(3 * one)?;
        assert_eq!(spool.stats().records, 0, "records 1 and 2 were not evicted");
        assert_eq!(
            dropped(&spool),
            1,
            "an unread record's eviction was not counted"
        );

        // A read that failed read nothing: an eviction counts at once.
        let spool = spool_of(2)?;
        let segment = spool.dir().join(scan::segment_name(0));
        fs::OpenOptions::new()
            .write(true)
            .open(&segment)?
            .set_len(SEGMENT_HEADER_LEN)?;
        let mut reader = spool.reader();
        assert!(
            reader.read_batch(64, 1 << 20).is_err(),
            "a cut segment was read"
        );
        let _room = spool.try_reserve(2 * one)?;
        assert_eq!(dropped(&spool), 1, "a record never read was not counted");
        Ok(())
    }

    /// One step of the model test below.
    #[derive(Debug, Clone)]
    enum Step {
        /// Appends these records one by one (each waits for its answer).
        Append(Vec<usize>),
        /// Appends these records as one batch of the writer.
        Batch(Vec<usize>),
        /// Makes the next `fdatasync`s fail.
        FailSyncs(u32),
        /// Reads up to this many records and acknowledges them.
        Deliver(usize),
        /// Stops as a crash would, and opens again.
        Crash,
        /// Closes cleanly, and opens again.
        Reopen,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let bodies = || proptest::collection::vec(0usize..6000, 1..6);
        prop_oneof![
            4 => bodies().prop_map(Step::Append),
            3 => bodies().prop_map(Step::Batch),
            3 => (1u32..3).prop_map(Step::FailSyncs),
            3 => (1usize..8).prop_map(Step::Deliver),
            1 => Just(Step::Crash),
            1 => Just(Step::Reopen),
        ]
    }

    /// Runs `steps` against a spool of 8 KiB segments and checks it against
    /// a model: the records whose append succeeded, in order, less those
    /// delivered, are what a reader reads, live and after every reopen; after
    /// a crash, those delivered since the cursor was last made durable (at
    /// a clean close: the cursor's own interval is an hour here) come back
    /// first. A record whose append failed is never read.
    fn run_model(
        pipelined: bool,
        steps: &[Step],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        use proptest::prop_assert_eq;
        let fail =
            |e: &dyn std::fmt::Display| proptest::test_runner::TestCaseError::fail(e.to_string());
        let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
        let path = dir.path().join("t");
        let opts = SpoolOptions {
            segment_size: 8 << 10,
            cursor_sync_interval: Duration::from_secs(3600),
            ..SpoolOptions::default()
        };
        let open = || Spool::open_with(&path, opts.clone(), pipelined).map_err(|e| fail(&e));
        let mut spool = open()?;
        // Every record kept, in log order; how many were delivered; how
        // many of those the durable cursor has passed.
        let mut kept: Vec<String> = Vec::new();
        let (mut delivered, mut durable) = (0, 0);
        let mut next_id = 0;
        let mut reader = spool.reader();
        for step in steps {
            match step {
                Step::Append(bodies) => {
                    for &len in bodies {
                        next_id += 1;
                        if append(&spool, next_id, len).is_ok() {
                            kept.push(format!("req-{next_id}"));
                        }
                    }
                }
                Step::Batch(bodies) => {
                    let first = next_id + 1;
                    next_id += bodies.len();
                    let batch = (first..).zip(bodies.iter().copied());
                    kept.extend(append_batch(&spool, batch).map_err(|e| fail(&e))?);
                }
                Step::FailSyncs(n) => {
                    spool.core().fail_syncs.fetch_add(*n, Ordering::AcqRel);
                }
                Step::Deliver(n) => {
                    let read = reader.read_batch(*n, 1 << 30).map_err(|e| fail(&e))?;
                    let ids: Vec<String> =
                        read.iter().map(|s| s.record.request_id.clone()).collect();
                    let want = kept.len().min(delivered + read.len());
                    prop_assert_eq!(&ids[..], &kept[delivered..want]);
                    if let Some(last) = read.last() {
                        spool.ack(last.end);
                        delivered += read.len();
                    }
                }
                Step::Crash | Step::Reopen => {
                    drop(reader);
                    if matches!(step, Step::Crash) {
                        spool.abandon();
                    } else {
                        spool.close();
                        durable = delivered;
                    }
                    spool = open()?;
                    reader = spool.reader();
                    // Delivered since the durable cursor: delivered again.
                    kept.drain(..durable);
                    delivered = 0;
                    durable = 0;
                }
            }
            let live = ids(&spool).map_err(|e| fail(&e))?;
            prop_assert_eq!(&live[..], &kept[delivered..], "after {:?}", step);
        }
        spool.close();
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Appends one by one and in batches, failed syncs, deliveries,
        /// crashes and clean reopens, with and without the syncer: the
        /// spool holds exactly the model's records (see `run_model`).
        #[test]
        fn a_spool_with_failing_syncs_crashes_and_reopens_holds_exactly_what_was_acknowledged(
            pipelined in proptest::bool::ANY,
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            run_model(pipelined, &steps)?;
        }
    }

    #[test]
    fn a_segment_is_deleted_only_once_the_cursor_is_past_where_it_was_sealed() {
        // Segment 0 was sealed at 300 (the writer rolled there) while its
        // last group (200..300) was still being synced: only 200 of it is
        // published. A cursor at 200 has not passed it.
        let segments = BTreeMap::from([(0, 200), (300, 0)]);
        assert_eq!(passed_segments(&segments, 300, 200), Vec::<u64>::new());
        assert_eq!(passed_segments(&segments, 300, 299), Vec::<u64>::new());
        assert_eq!(passed_segments(&segments, 300, 300), vec![0]);
        // The active segment is never deleted, wherever the cursor is.
        let segments = BTreeMap::from([(0, 300), (300, 100), (400, 0)]);
        assert_eq!(passed_segments(&segments, 400, 450), vec![0, 300]);
        assert_eq!(
            passed_segments(&BTreeMap::from([(0, 10)]), 0, 10),
            Vec::<u64>::new()
        );
    }
}
