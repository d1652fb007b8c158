//! The writer thread: group commit of appends, fsync policy, cursor persistence
//! and segment deletion.
//!
//! One thread per spool owns the file it appends to. It takes every append
//! waiting in its queue as one batch and writes the batch with one `writev`
//! per segment touched (more only past 1,024 iovecs): frame heads are encoded
//! into one buffer, and bodies of 2 KiB or more are handed to the kernel
//! straight from their `Bytes`, so a body is never copied in user space on its
//! way to disk.
//!
//! Under `fsync = "always"`, when the process may run on more than one CPU, a
//! second thread, the syncer, makes the written batches durable: it takes
//! every batch written since its last `fdatasync`, syncs once for all of them,
//! and only then publishes their records to readers and completes their
//! callers. Writing batch N+1 overlaps the sync of batch N, so the disk is
//! never idle while the writer encodes, and a sync covers everything written
//! during the previous one (pipelined group commit). On a single CPU the
//! writer syncs each batch itself: there the hand-off between two threads
//! costs more CPU than the overlap saves (measured in `docs/performance.md`:
//! 25 % more spooled requests per second without the syncer on one core).
//! Under the other policies the writer publishes and completes right after the
//! write.
//!
//! A failed sync fails its groups and every group written after them in the
//! same epoch, and the writer cuts the log back to the first failed frame
//! (deleting later segments, truncating that one) before it answers them or
//! writes again, so that recovery, which reads every frame on disk, does not
//! bring back a request whose caller was told it failed
//! (`docs/spool-format.md`).

use std::fs::{self, File};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::format::{Record, SEGMENT_HEADER_LEN, SegmentHeader};
use super::{Core, Cut, Entry, FsyncPolicy, SpoolError, cursor, fsutil, scan};

/// Most records taken into one batch.
const MAX_BATCH_RECORDS: usize = 4096;
/// Most bytes taken into one batch (a batch always takes at least one record).
const MAX_BATCH_BYTES: u64 = 8 << 20;
/// While the last write failed, how often the writer checks on its own
/// whether the spool can be written again (see [`Writer::probe_writable`]).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Bodies at least this long are written from their own buffer; shorter
/// ones are copied next to their frame head, where the copy costs less than
/// one more iovec.
const GATHER_MIN_BODY: usize = 2 << 10;
/// Most iovecs one `writev` takes (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;
/// Capacity of the head buffer kept between batches; a larger one (a batch
/// of many small records) is freed after its write.
const KEEP_HEADS: usize = 1 << 20;

pub(super) struct Append {
    pub record: Arc<Record>,
    /// The record's [`Record::encoded_len`], computed once at enqueue.
    pub len: u64,
    pub reply: oneshot::Sender<Result<u64, SpoolError>>,
}

impl Append {
    /// Lets go of the record, then gives the reply channel to answer on.
    ///
    /// The record goes first: once the caller has its answer it releases the
    /// request's memory budget, so a body still held here after that would
    /// be memory outside `max_inflight_bytes` for as long as this thread is
    /// not scheduled (on one CPU, while the woken request path runs).
    fn into_reply(self) -> oneshot::Sender<Result<u64, SpoolError>> {
        let Append { record, reply, .. } = self;
        drop(record);
        reply
    }
}

#[allow(clippy::large_enum_variant)] // appends are the common message; boxing costs an allocation each
pub(super) enum Cmd {
    Append(Append),
    /// Something changed that the writer should look at (an ack moved the cursor).
    Nudge,
    /// Appends whose sync failed (from the syncer), each group with its
    /// error: answered once the log is cut back ([`Writer::answer_failed`]).
    Failed(Vec<(Vec<Append>, SpoolError)>),
    /// Sync everything, persist the cursor, and stop.
    Shutdown,
    /// Stop at once, as a crash would (tests only).
    Abort,
    /// Take no command until the sender is dropped or sends (tests only):
    /// what is queued meanwhile is taken as one batch.
    #[cfg(test)]
    Hold(Receiver<()>),
}

/// The segment being appended to.
pub(super) struct Active {
    pub base: u64,
    pub file: Arc<File>,
    /// Data bytes after the header.
    pub len: u64,
}

pub(super) struct Writer {
    pub core: Arc<Core>,
    pub active: Active,
    /// The active file's offset, when known (`writev` writes there).
    pub pos: Option<u64>,
    pub gather: Gather,
    pub unsynced_since: Option<Instant>,
    pub cursor_dirty_since: Option<Instant>,
    /// When to check again whether a spool whose last write failed can be written.
    pub probe_at: Option<Instant>,
    /// Bytes of the last write that failed: what the check tries to write.
    pub failed_len: u64,
    /// The syncer thread (`fsync = "always"` only).
    pub syncer: Option<Syncer>,
    /// Whether to start the syncer (see [`pipelining_pays`]).
    pub pipelined: bool,
    /// A sender of this writer's commands, for the syncer.
    pub wake: Option<mpsc::Sender<Cmd>>,
    /// Incremented each time the log is cut back after a failed sync: the
    /// groups written before the cut are told apart from those after it.
    pub epoch: u64,
    /// Bases of the segments sealed and never synced (`fsync = "never"`),
    /// less those deleted since: a clean close syncs them.
    pub unsynced_sealed: Vec<u64>,
}

/// Whether a separate syncer thread is worth its hand-off: only when the
/// process may run on more than one CPU (affinity and cgroup quota count).
pub(super) fn pipelining_pays() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

/// A group's bytes as they will be written: frame heads, and bodies shorter
/// than [`GATHER_MIN_BODY`], copied into `heads`; longer bodies referenced
/// where they are.
#[derive(Default)]
pub(super) struct Gather {
    heads: Vec<u8>,
    /// Each long body with the length of `heads` written before it.
    bodies: Vec<(usize, Bytes)>,
    len: u64,
}

impl Gather {
    /// Adds one frame; `encoded_len` is the record's [`Record::encoded_len`].
    fn push(&mut self, record: &Record, encoded_len: u64) {
        record.encode_head_into(&mut self.heads, encoded_len);
        if record.body.len() < GATHER_MIN_BODY {
            self.heads.extend_from_slice(&record.body);
        } else {
            self.bodies.push((self.heads.len(), record.body.clone()));
        }
        self.len += encoded_len;
    }

    /// Bytes gathered.
    fn len(&self) -> u64 {
        self.len
    }

    /// Forgets the group (and releases its bodies).
    fn clear(&mut self) {
        self.bodies.clear();
        self.heads.clear();
        if self.heads.capacity() > KEEP_HEADS {
            self.heads = Vec::new();
        }
        self.len = 0;
    }

    /// Writes the group at `file`'s current offset: `writev` of at most
    /// [`MAX_IOVECS`] slices at a time, partial writes continued.
    fn write_to(&self, mut file: &File) -> io::Result<()> {
        let mut slices = Vec::with_capacity(2 * self.bodies.len() + 1);
        let mut from = 0;
        for (at, body) in &self.bodies {
            if *at > from {
                slices.push(IoSlice::new(&self.heads[from..*at]));
            }
            slices.push(IoSlice::new(body));
            from = *at;
        }
        if self.heads.len() > from {
            slices.push(IoSlice::new(&self.heads[from..]));
        }
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let n = rest.len().min(MAX_IOVECS);
            match file.write_vectored(&rest[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => IoSlice::advance_slices(&mut rest, written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A written group waiting for its `fdatasync`.
pub(super) struct SyncJob {
    file: Arc<File>,
    /// The writer's epoch when the group was written.
    epoch: u64,
    base: u64,
    /// Segment data length after this group.
    seg_len: u64,
    group: Vec<(Append, u64)>,
}

/// The thread that syncs written groups and completes their callers.
pub(super) struct Syncer {
    tx: Option<mpsc::Sender<SyncJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the syncer; `None` if the thread cannot be started (the writer
    /// then syncs inline). `writer` wakes the writer after a failed sync.
    pub fn start(core: Arc<Core>, writer: mpsc::Sender<Cmd>) -> Option<Syncer> {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        let thread = std::thread::Builder::new()
            .name("forkd-spool-sync".into())
            .spawn(move || sync_loop(&core, &rx, &writer))
            .ok()?;
        Some(Syncer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands a job over; gives it back if the syncer is gone.
    fn submit(&self, job: SyncJob) -> Result<(), SyncJob> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// Lets the syncer finish every job handed over, then stops it.
    fn finish(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("spool syncer thread panicked");
        }
    }
}

fn sync_loop(core: &Core, rx: &Receiver<SyncJob>, writer: &mpsc::Sender<Cmd>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let failed = sync_and_complete(core, jobs);
        if failed.is_empty() {
            continue;
        }
        // The writer cuts the log back, then answers them.
        if let Err(mpsc::SendError(Cmd::Failed(failed))) = writer.send(Cmd::Failed(failed)) {
            for (appends, err) in failed {
                fail_all(core, appends.into_iter(), &err);
            }
        }
    }
}

/// One `fdatasync` per segment file touched by `jobs`, then publication and
/// completion in log order. On failure the log from the first frame of
/// `jobs` on is to be cut back (a [`Cut`]), and their appends are returned
/// with the error, to be failed once it is ([`Writer::answer_failed`]).
///
/// Their frames are in the segment, and a restart would read them back:
/// the target would get requests whose clients were told they failed. So
/// the groups written after them in the same epoch fail too, unsynced, and
/// the writer truncates the log where the first failed group starts before
/// it writes anything more or answers any of them.
fn sync_and_complete(core: &Core, jobs: Vec<SyncJob>) -> Vec<(Vec<Append>, SpoolError)> {
    let cut = core.lock().cut;
    let mut failed = Vec::new();
    let (doomed, jobs): (Vec<SyncJob>, Vec<SyncJob>) = jobs
        .into_iter()
        .partition(|j| cut.is_some_and(|c| c.epoch == j.epoch && j.base + j.seg_len > c.from));
    for job in doomed {
        let kind = cut.map_or(io::ErrorKind::Other, |c| c.kind);
        let err = SpoolError::io(
            "sync",
            &core.segment_path(job.base),
            io::Error::new(kind, "written after a failed sync; cut off the log"),
        );
        failed.push((job.group.into_iter().map(|(a, _)| a).collect(), err));
    }
    let mut synced: Vec<u64> = Vec::with_capacity(1);
    let mut failure = None;
    for job in &jobs {
        if synced.contains(&job.base) {
            continue;
        }
        synced.push(job.base);
        if let Err(e) = core.sync_segment(&job.file) {
            let kind = e.kind();
            failure = Some((
                SpoolError::io("sync", &core.segment_path(job.base), e),
                kind,
            ));
            break;
        }
    }
    match failure {
        None => {
            for job in jobs {
                complete(core, job.base, job.seg_len, job.group);
            }
        }
        Some((err, kind)) => {
            let at = jobs.iter().map(|j| j.base + j.seg_len).max().unwrap_or(0);
            // Groups are never empty; each starts at its first record.
            let first = jobs
                .iter()
                .filter_map(|j| j.group.first().map(|(_, lsn)| (*lsn, j.epoch)))
                .min();
            {
                // Under one lock: the writer may cut back at once.
                let mut st = core.lock();
                if let Some((from, epoch)) = first {
                    st.cut = Some(Cut { epoch, from, kind });
                }
                st.write_error = Some((at, err.to_string()));
            }
            tracing::warn!(dir = %core.dir.display(), error = %err, "spool sync failed");
            for job in jobs {
                let appends = job.group.into_iter().map(|(a, _)| a).collect();
                failed.push((appends, err.duplicate()));
            }
        }
    }
    failed
}

/// Publishes a durable (as the policy says) group to readers and completes its callers.
fn complete(core: &Core, base: u64, seg_len: u64, group: Vec<(Append, u64)>) {
    let entries = group.iter().map(|(a, lsn)| Entry {
        lsn: *lsn,
        len: u32::try_from(a.len).unwrap_or(u32::MAX),
        accepted_s: Entry::seconds(a.record.accepted_at),
    });
    core.publish(entries, base, seg_len, base + seg_len);
    for (append, lsn) in group {
        let _ = append.into_reply().send(Ok(lsn));
    }
}

impl Writer {
    pub fn run(mut self, rx: Receiver<Cmd>) {
        if self.core.opts.fsync == FsyncPolicy::Always
            && self.pipelined
            && let Some(wake) = self.wake.take()
        {
            self.syncer = Syncer::start(self.core.clone(), wake);
        }
        // Only the syncer keeps a sender of its own (every handle sends
        // `Shutdown` or `Abort` when it goes, so `recv` need not fail).
        self.wake = None;
        loop {
            let cmd = match self.next_deadline() {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(deadline) => {
                    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                }
            };
            let stop = match cmd {
                Ok(Cmd::Append(first)) => {
                    let (batch, stop) = self.collect(first, &rx);
                    self.write_batch(batch);
                    stop
                }
                Ok(Cmd::Failed(failed)) => {
                    self.answer_failed(failed);
                    None
                }
                Ok(Cmd::Nudge) | Err(RecvTimeoutError::Timeout) => None,
                #[cfg(test)]
                Ok(Cmd::Hold(release)) => {
                    let _ = release.recv();
                    None
                }
                Ok(Cmd::Shutdown) | Err(RecvTimeoutError::Disconnected) => Some(Cmd::Shutdown),
                Ok(Cmd::Abort) => Some(Cmd::Abort),
            };
            match stop {
                Some(Cmd::Abort) => return,
                Some(_) => {
                    self.shutdown(&rx);
                    return;
                }
                None => self.housekeeping(false),
            }
        }
    }

    /// Takes every append already queued behind `first`, up to the batch
    /// limits (answering the syncer's failures met on the way).
    fn collect(&mut self, first: Append, rx: &Receiver<Cmd>) -> (Vec<Append>, Option<Cmd>) {
        let mut bytes = first.len;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_RECORDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(Cmd::Append(a)) => {
                    bytes += a.len;
                    batch.push(a);
                }
                Ok(Cmd::Nudge) => {}
                Ok(Cmd::Failed(failed)) => self.answer_failed(failed),
                #[cfg(test)]
                Ok(Cmd::Hold(release)) => {
                    let _ = release.recv();
                }
                Ok(stop @ (Cmd::Shutdown | Cmd::Abort)) => return (batch, Some(stop)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return (batch, Some(Cmd::Shutdown)),
            }
        }
        (batch, None)
    }

    /// When the writer must wake up without a command: a due fsync or cursor write.
    fn next_deadline(&mut self) -> Option<Instant> {
        let mut deadline = None;
        if let (FsyncPolicy::Interval(every), Some(since)) =
            (self.core.opts.fsync, self.unsynced_since)
        {
            deadline = Some(since + every);
        }
        if self.cursor_dirty_since.is_none() && self.core.cursor_dirty() {
            self.cursor_dirty_since = Some(Instant::now());
        }
        if let Some(since) = self.cursor_dirty_since {
            let due = since + self.core.opts.cursor_sync_interval;
            deadline = Some(deadline.map_or(due, |d: Instant| d.min(due)));
        }
        if self.core.has_write_error() {
            let due = *self
                .probe_at
                .get_or_insert_with(|| Instant::now() + PROBE_EVERY);
            deadline = Some(deadline.map_or(due, |d: Instant| d.min(due)));
        } else {
            self.probe_at = None;
        }
        deadline
    }

    fn write_batch(&mut self, batch: Vec<Append>) {
        if let Err(e) = self.cut_or_flag() {
            // Written after the frames a failed sync left, these could not
            // be told apart from them at the next open: not written at all.
            self.failed_len = batch.iter().map(|a| a.len).sum();
            fail_all(
                &self.core,
                batch.into_iter(),
                &self.cut_pending().unwrap_or(e),
            );
            return;
        }
        let mut group: Vec<(Append, u64)> = Vec::with_capacity(batch.len());
        self.gather.clear();
        let mut rest = batch.into_iter();
        while let Some(append) = rest.next() {
            let group_len = self.gather.len();
            if self.active.len + group_len > 0
                && self.active.len + group_len + append.len > self.core.segment_limit
            {
                // A failed sync answered inline (`commit_group`) may have cut
                // the log back: roll only if the active segment is still
                // full, and write nothing more while a cut is still due.
                let result = self.commit_group(&mut group).and_then(|()| {
                    if let Some(e) = self.cut_pending() {
                        return Err(e);
                    }
                    if self.active.len > 0 && self.active.len + append.len > self.core.segment_limit
                    {
                        return self.roll();
                    }
                    Ok(())
                });
                if let Err(e) = result {
                    // A segment that cannot be created is a write error too.
                    self.failed_len = append.len;
                    self.core
                        .write_failed(self.active.base + self.active.len, e.to_string());
                    fail_all(&self.core, std::iter::once(append).chain(rest), &e);
                    return;
                }
            }
            let lsn = self.active.base + self.active.len + self.gather.len();
            self.gather.push(&append.record, append.len);
            group.push((append, lsn));
        }
        if let Err(e) = self.commit_group(&mut group) {
            tracing::warn!(dir = %self.core.dir.display(), error = %e, "spool write failed");
        }
    }

    /// Writes the buffered group to the active segment; then hands it to the
    /// syncer (`always`) or publishes it and completes its callers. On a write
    /// failure the segment is cut back to where the group started and every
    /// caller gets the error.
    fn commit_group(&mut self, group: &mut Vec<(Append, u64)>) -> Result<(), SpoolError> {
        if group.is_empty() {
            return Ok(());
        }
        let offset = SEGMENT_HEADER_LEN + self.active.len;
        let written = match self.pos {
            Some(pos) if pos == offset => Ok(()),
            _ => (&*self.active.file).seek(SeekFrom::Start(offset)).map(drop),
        }
        .and_then(|()| self.gather.write_to(&self.active.file));
        if let Err(e) = written {
            // Cut back any partial write so the next batch starts on a frame boundary.
            let _ = self.active.file.set_len(offset);
            self.pos = None;
            self.failed_len = self.gather.len();
            let err = SpoolError::io("append to", &self.segment_path(self.active.base), e);
            self.core
                .write_failed(self.active.base + self.active.len, err.to_string());
            fail_all(&self.core, group.drain(..).map(|(a, _)| a), &err);
            self.gather.clear();
            return Err(err);
        }
        self.active.len += self.gather.len();
        self.pos = Some(SEGMENT_HEADER_LEN + self.active.len);
        self.gather.clear();
        let group = std::mem::take(group);
        if self.core.opts.fsync == FsyncPolicy::Always {
            let job = SyncJob {
                file: self.active.file.clone(),
                epoch: self.epoch,
                base: self.active.base,
                seg_len: self.active.len,
                group,
            };
            let unsent = match &self.syncer {
                Some(syncer) => syncer.submit(job),
                None => Err(job),
            };
            if let Err(job) = unsent {
                let failed = sync_and_complete(&self.core, vec![job]);
                self.answer_failed(failed);
            }
            return Ok(());
        }
        if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        complete(&self.core, self.active.base, self.active.len, group);
        Ok(())
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        self.core.dir.join(scan::segment_name(base))
    }

    /// Seals the active segment and starts a new one at the current end.
    /// (Under `always` the syncer syncs the old segment with its last jobs.)
    fn roll(&mut self) -> Result<(), SpoolError> {
        match self.core.opts.fsync {
            FsyncPolicy::Interval(_) => self.sync_active()?,
            FsyncPolicy::Never => self.unsynced_sealed.push(self.active.base),
            FsyncPolicy::Always => {}
        }
        let base = self.active.base + self.active.len;
        let active = create_segment(
            &self.core.dir,
            base,
            self.core.opts.fsync != FsyncPolicy::Never,
        )?;
        self.active = active;
        self.pos = None;
        self.core.add_segment(base);
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), SpoolError> {
        self.active
            .file
            .sync_data()
            .map_err(|e| SpoolError::io("sync", &self.segment_path(self.active.base), e))?;
        self.unsynced_since = None;
        Ok(())
    }

    /// Fails appends whose sync failed, after cutting the log back: a caller
    /// told that its record failed never finds it read back after a restart
    /// (unless the cut itself failed; it is retried, and the spool stays
    /// not writable until it succeeds).
    fn answer_failed(&mut self, failed: Vec<(Vec<Append>, SpoolError)>) {
        if failed.is_empty() {
            return;
        }
        // A failed cut is retried (the error it leaves keeps the probe
        // running); the callers are answered either way.
        let _ = self.cut_or_flag();
        for (appends, err) in failed {
            fail_all(&self.core, appends.into_iter(), &err);
        }
    }

    /// [`Writer::cut_back_if_due`]; a failure is logged and recorded as the
    /// spool's write error (so the writability probe keeps running, and
    /// housekeeping retries the cut), and means the cut is still due.
    fn cut_or_flag(&mut self) -> Result<(), SpoolError> {
        let result = self.cut_back_if_due();
        if let Err(e) = &result {
            tracing::warn!(dir = %self.core.dir.display(), error = %e, "spool cannot cut back a failed sync");
            self.core
                .write_failed(self.active.base + self.active.len, e.to_string());
        }
        result
    }

    /// The error for appends while a failed sync is still to be cut off the
    /// log (with that sync's error kind: a full disk stays a full disk).
    fn cut_pending(&self) -> Option<SpoolError> {
        let cut = self.due_cut()?;
        Some(SpoolError::io(
            "append to",
            &self.segment_path(self.active.base),
            io::Error::new(cut.kind, "a failed sync is not cut off the log yet"),
        ))
    }

    /// The failed sync this writer has still to cut off the log (one of its
    /// own epoch; an older one was cut already).
    fn due_cut(&self) -> Option<Cut> {
        self.core.lock().cut.filter(|c| c.epoch == self.epoch)
    }

    /// After a failed sync ([`sync_and_complete`]): truncates the log at the
    /// first frame of the failed groups, so that no frame whose caller got
    /// an error is read back at the next open, and starts a new epoch.
    fn cut_back_if_due(&mut self) -> Result<(), SpoolError> {
        if let Some(cut) = self.due_cut() {
            self.cut_back(cut.from)?;
            self.epoch += 1;
            tracing::info!(dir = %self.core.dir.display(), at = cut.from, "spool cut back to before the groups whose sync failed");
        }
        Ok(())
    }

    /// Makes `from` the end of the log. Nothing at or after it was published
    /// (every group ending past it failed), so no reader or caller loses
    /// anything: the segments after the one holding `from` are deleted, then
    /// that one is truncated at `from` and appended to again.
    fn cut_back(&mut self, from: u64) -> Result<(), SpoolError> {
        let bases: Vec<u64> = self.core.lock().segments.keys().copied().collect();
        // Never below the cursor, so the segment holding `from` is still there.
        let keep = bases
            .iter()
            .copied()
            .filter(|&b| b <= from)
            .max()
            .unwrap_or(self.active.base);
        let later: Vec<u64> = bases.into_iter().filter(|&b| b > keep).collect();
        for base in &later {
            let path = self.segment_path(*base);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io("remove", &path, e)),
            }
            self.core.lock().segments.remove(base);
        }
        self.unsynced_sealed.retain(|base| !later.contains(base));
        if !later.is_empty() {
            fsutil::sync_dir(&self.core.dir)
                .map_err(|e| SpoolError::io("sync", &self.core.dir, e))?;
        }
        let path = self.segment_path(keep);
        let file = if keep == self.active.base {
            self.active.file.clone()
        } else {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| SpoolError::io("open", &path, e))?;
            Arc::new(file)
        };
        #[cfg(test)]
        if super::injected(&self.core.fail_cuts) {
            return Err(SpoolError::io(
                "cut back",
                &path,
                io::Error::other("injected failure"),
            ));
        }
        let Some(len) = from.checked_sub(keep) else {
            return Err(SpoolError::io(
                "cut back",
                &path,
                io::Error::other(format!("position {from} is before the segment")),
            ));
        };
        file.set_len(SEGMENT_HEADER_LEN + len)
            .and_then(|()| file.sync_all())
            .map_err(|e| SpoolError::io("cut back", &path, e))?;
        {
            let mut st = self.core.lock();
            if let Some(published) = st.segments.get_mut(&keep) {
                *published = (*published).min(len);
            }
            // The next group published clears the error: it is written after it.
            if let Some((at, _)) = st.write_error.as_mut() {
                *at = (*at).min(from);
            }
        }
        self.active = Active {
            base: keep,
            file,
            len,
        };
        self.pos = None;
        Ok(())
    }

    /// Periodic duties: cutting back a failed sync, interval fsync, cursor
    /// persistence, segment deletion.
    fn housekeeping(&mut self, force: bool) {
        let cut = self.cut_or_flag().is_ok();
        if let (FsyncPolicy::Interval(every), Some(since)) =
            (self.core.opts.fsync, self.unsynced_since)
            && (force || since.elapsed() >= every)
            && let Err(e) = self.sync_active()
        {
            tracing::warn!(error = %e, "spool fsync failed");
        }
        let cursor_due = self
            .cursor_dirty_since
            .is_some_and(|since| since.elapsed() >= self.core.opts.cursor_sync_interval);
        if force || cursor_due {
            self.cursor_dirty_since = None;
            if let Err(e) = self.persist_cursor() {
                tracing::warn!(error = %e, "spool cursor write failed");
            }
        }
        if self.probe_at.is_some_and(|at| Instant::now() >= at) {
            self.probe_at = None;
            // Not writable while a failed sync's frames are still in the log.
            if self.core.has_write_error() && cut {
                self.probe_writable();
            }
        }
    }

    /// Clears the write error once as many bytes as the failed write held
    /// (4 KiB to 1 MiB) can be written and synced in the spool directory.
    ///
    /// Without this the error (and `/readyz` 503) would last until the next
    /// append succeeds, and an instance that a load balancer took out of
    /// rotation for it would get no append to prove it can write again.
    fn probe_writable(&mut self) {
        let path = self.core.dir.join("writable.tmp");
        let len = self.failed_len.clamp(4 << 10, 1 << 20) as usize;
        let result = fsutil::create_truncate(&path).and_then(|f| {
            f.write_all_at(&vec![0u8; len], 0)?;
            if self.core.opts.fsync != FsyncPolicy::Never {
                f.sync_data()?;
            }
            Ok(())
        });
        let _ = fs::remove_file(&path);
        if result.is_ok() {
            tracing::info!(dir = %self.core.dir.display(), "spool can be written again");
            self.core.write_recovered();
        }
    }

    /// Makes the in-memory cursor durable, then deletes the segments it passed.
    ///
    /// The order matters: a segment is unlinked only after a durable cursor
    /// beyond it exists, so a crash in between loses nothing and the next open
    /// deletes the leftovers.
    fn persist_cursor(&mut self) -> Result<(), SpoolError> {
        let Some(position) = self.core.cursor_to_persist() else {
            return Ok(());
        };
        cursor::store(&self.core.dir, position)
            .map_err(|e| SpoolError::io("write cursor in", &self.core.dir, e))?;
        let doomed = self.core.cursor_persisted(position, self.active.base);
        if doomed.is_empty() {
            return Ok(());
        }
        self.unsynced_sealed.retain(|base| !doomed.contains(base));
        for base in &doomed {
            let path = self.segment_path(*base);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete delivered segment")
                }
            }
        }
        fsutil::sync_dir(&self.core.dir).map_err(|e| SpoolError::io("sync", &self.core.dir, e))
    }

    fn shutdown(&mut self, rx: &Receiver<Cmd>) {
        if let Some(syncer) = &mut self.syncer {
            syncer.finish();
        }
        // The syncer's last failures (appends queued behind the shutdown
        // are dropped, and their callers told the spool closed).
        while let Ok(cmd) = rx.try_recv() {
            if let Cmd::Failed(failed) = cmd {
                self.answer_failed(failed);
            }
        }
        let _ = self.cut_or_flag();
        // Every policy syncs at a clean close: under `never`, the segments
        // sealed since the spool opened too (those still there once the
        // cursor is written and delivered segments are deleted), and the
        // directory that holds their names.
        if let Err(e) = self.sync_active() {
            tracing::warn!(error = %e, "spool fsync at close failed");
        }
        self.housekeeping(true);
        self.sync_sealed();
    }

    /// Syncs every segment sealed and never synced, then the directory;
    /// a failure is logged and the others are still synced.
    fn sync_sealed(&mut self) {
        if self.unsynced_sealed.is_empty() {
            return;
        }
        for base in std::mem::take(&mut self.unsynced_sealed) {
            let path = self.segment_path(base);
            match fs::File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => {}
                // Deleted once delivered.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "spool fsync at close failed")
                }
            }
        }
        if let Err(e) = fsutil::sync_dir(&self.core.dir) {
            tracing::warn!(dir = %self.core.dir.display(), error = %e, "spool fsync at close failed");
        }
    }
}

/// Fails appends that were not written: they stop counting as pending (in
/// `stats` and against `max_size`) and their callers get the error.
fn fail_all(core: &Core, appends: impl Iterator<Item = Append>, err: &SpoolError) {
    let appends: Vec<Append> = appends.collect();
    {
        let mut st = core.lock();
        for append in &appends {
            st.pending_bytes = st.pending_bytes.saturating_sub(append.len);
            st.pending_records = st.pending_records.saturating_sub(1);
        }
    }
    core.wake_readers();
    for append in appends {
        let _ = append.into_reply().send(Err(err.duplicate()));
    }
}

/// Creates a new segment file with its header; with `sync`, makes it and its
/// directory entry durable.
pub(super) fn create_segment(
    dir: &std::path::Path,
    base: u64,
    sync: bool,
) -> Result<Active, SpoolError> {
    let path = dir.join(scan::segment_name(base));
    let mut created = false;
    let result = (|| {
        let file = fsutil::create_new(&path)?;
        created = true;
        file.write_all_at(&SegmentHeader { base }.encode(), 0)?;
        if sync {
            file.sync_data()?;
            fsutil::sync_dir(dir)?;
        }
        Ok::<_, io::Error>(file)
    })();
    match result {
        Ok(file) => Ok(Active {
            base,
            file: Arc::new(file),
            len: 0,
        }),
        Err(e) => {
            // Never a file this call did not create (a segment in use).
            if created {
                let _ = fs::remove_file(&path);
            }
            Err(SpoolError::io("create segment", &path, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::format::decode_frame;
    use http::{HeaderMap, Method};
    use std::time::UNIX_EPOCH;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn record(id: usize, body_len: usize) -> Record {
        Record {
            accepted_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + id as u64),
            request_id: format!("req-{id}"),
            method: Method::POST,
            path_and_query: http::uri::PathAndQuery::from_static("/v1/logs?n=1"),
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'a' + (id % 26) as u8; body_len]),
        }
    }

    #[test]
    fn a_sync_that_completes_after_a_later_write_failed_leaves_the_spool_not_writable() -> TestResult
    {
        use crate::spool::{Spool, SpoolOptions};
        let dir = tempfile::tempdir()?;
        let spool = Spool::open(dir.path().join("t"), SpoolOptions::default())?;
        let append = |id| -> Result<u64, Box<dyn std::error::Error>> {
            let r = record(id, 100);
            let res = spool.try_reserve(r.encoded_len())?;
            Ok(spool.append_blocking(res, r)?)
        };
        append(1)?;
        let core = spool.core().clone();
        let end = spool.stats().bytes;
        // The next write, at the log end, fails (a full disk)...
        core.write_failed(end, "disk full".into());
        // ...while a group written before it completes its sync late (the
        // pipelined syncer): that says nothing about the disk now.
        core.publish(std::iter::empty(), 0, end, end);
        assert!(
            spool.stats().write_error.is_some(),
            "an older sync cleared the error of a newer write"
        );
        // A group written after the failure did reach the disk.
        append(2)?;
        assert_eq!(spool.stats().write_error, None);
        spool.close();
        Ok(())
    }

    #[test]
    fn a_group_of_more_frames_than_one_writev_takes_is_written_whole_and_in_order() -> TestResult {
        // Long and short bodies alternate, so the group needs far more than
        // MAX_IOVECS slices, and both sides of GATHER_MIN_BODY are covered.
        let sizes = [
            GATHER_MIN_BODY,
            GATHER_MIN_BODY - 1,
            0,
            5000,
            GATHER_MIN_BODY + 1,
        ];
        let records: Vec<Record> = (0..1500)
            .map(|i| record(i, sizes[i % sizes.len()]))
            .collect();
        let mut gather = Gather::default();
        for r in &records {
            gather.push(r, r.encoded_len());
        }
        let expected: u64 = records.iter().map(Record::encoded_len).sum();
        assert_eq!(gather.len(), expected);
        let file = tempfile::tempfile()?;
        (&file).seek(SeekFrom::Start(7))?;
        gather.write_to(&file)?;

        let mut bytes = Vec::new();
        (&file).seek(SeekFrom::Start(0))?;
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        assert_eq!(bytes.len() as u64, 7 + expected);
        let mut rest = Bytes::from(bytes).slice(7..);
        for r in &records {
            let (back, len) = decode_frame(&rest)?;
            assert_eq!(&back, r);
            rest = rest.slice(len as usize..);
        }
        assert!(rest.is_empty());

        gather.clear();
        assert_eq!(gather.len(), 0);
        assert!(gather.bodies.is_empty(), "a cleared group holds no bodies");
        Ok(())
    }
}
